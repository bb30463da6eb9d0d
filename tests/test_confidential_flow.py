"""``@confidential`` on a real Metaflow run (``examples/confidential_inference.py``): its confidential steps run
through the ``confidential step`` trampoline in Gramine enclaves (``gramine-direct``: here the double in
``tests/gramine_double``, Gramine itself in the GitHub workflow's ``gramine`` job), their evidence judged
and recorded, their artifacts sealed in the datastore and opened by the next confidential step only; and
every mistake refused before the run starts, in one line naming the fix."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from confidential_samples import client_json, flow_env, tiny_flow
from conftest import PROJECT
from service_servers import metaflow_ui

from metaflow_stack.confidential.attest import TaskIdentity

pytestmark = pytest.mark.slow
pytest.importorskip("dcap_qvl", reason="pip install 'metaflow-stack[confidential]'")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("confidential")
    (root / ".metaflow").mkdir()
    shutil.copy(PROJECT / "examples" / "confidential_inference.py", root)
    done = subprocess.run(
        [sys.executable, "confidential_inference.py", "run", "--patients", "12"],
        cwd=root, env=flow_env(root), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, done.stdout + done.stderr


def test_the_confidential_steps_ran_in_one_enclave_and_their_evidence_is_recorded(run: tuple[Path, str]) -> None:
    root, output = run
    assert "predicted classes: {" in output
    found = client_json(root, """
run = Flow("ConfidentialInferenceFlow").latest_run
rows = {s.id: [m.value for m in s.task.metadata if m.name == "confidential-verification"] for s in run}
print(json.dumps(rows))""")  # fmt: skip
    assert found["train"] == [] and found["end"] == []  # only the confidential steps
    for step in ("score", "summarise"):
        (recorded,) = found[step]
        verification = json.loads(recorded)
        assert verification["attested"] is False and verification["mode"] == "direct"
    enclaves = list((root / "state" / "confidential" / "enclaves").iterdir())
    # Each prepared once; two measurements: `score` trusts sklearn and numpy (its model comes from outside a
    # TEE, pickled), `summarise` reads only sealed values and trusts nothing.
    assert len(enclaves) == 2


def test_the_agent_and_the_ui_show_each_confidential_tasks_verification(run: tuple[Path, str], chromium) -> None:
    """What the launcher recorded, as `metaflow agent tasks` (and its MCP tool) and the UI's task page show it:
    only on the confidential steps, unattested in direct mode, and why."""
    from metaflow_stack.agent import Queries
    from metaflow_stack.agent.local_source import LocalSource

    root, _ = run
    queries = Queries(LocalSource(root / ".metaflow"))
    latest = queries.list_runs("ConfidentialInferenceFlow").runs[0].pathspec
    tasks = {t.step_name: t for t in queries.run_tasks(latest).tasks}
    assert tasks["train"].confidential is None and tasks["end"].confidential is None
    shown = tasks["score"].confidential
    assert shown is not None and (shown.attested, shown.mode, shown.tee) == (False, "direct", None)
    assert shown.why == "gramine-direct gives no quote (development only)"
    with metaflow_ui(root / ".metaflow") as url:
        score = tasks["score"].pathspec
        page_data = httpx.get(f"{url}/api/tasks/{score}", timeout=30).json()
        assert page_data["confidential"]["attested"] is False and page_data["confidential"]["mode"] == "direct"
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/{score}")
        section = page.locator("section[data-confidential='unattested']")
        section.wait_for(timeout=30_000)
        assert "Confidential computing" in section.inner_text() and "gramine-direct" in section.inner_text()
        page.goto(f"{url}/{tasks['train'].pathspec}")
        page.get_by_text("Attempts").first.wait_for(timeout=30_000)
        assert page.locator("section[data-confidential]").count() == 0
        page.close()


def test_sealed_values_are_ciphertext_outside_and_open_only_in_the_next_enclave(run: tuple[Path, str]) -> None:
    root, _ = run
    found = client_json(root, """
from metaflow_stack.confidential.seal import Sealed, SealedError
run = Flow("ConfidentialInferenceFlow").latest_run
sealed = run["score"].task["predictions"].data
try:
    sealed.count(0)
    used = "opened"
except SealedError as exc:
    used = str(exc)
counts = run["summarise"].task["counts"].data
model = type(run["score"].task["model"].data).__name__
print(json.dumps({"type": type(sealed).__name__, "repr": repr(sealed), "used": used, "model": model,
                  "counts": {str(k): v for k, v in counts.items()}}))""")  # fmt: skip
    assert found["type"] == "Sealed" and "opens only in an attested enclave" in found["repr"]
    assert "predictions is sealed: its data key is released only to an attested enclave" in found["used"]
    assert sum(found["counts"].values()) == 12  # the next enclave opened all twelve predictions
    values = [p for p in (root / ".metaflow" / "ConfidentialInferenceFlow" / "data").rglob("*") if p.is_file()]
    stored = [gzip.decompress(p.read_bytes()) for p in values if p.read_bytes()[:2] == b"\x1f\x8b"]
    # Ciphertext in the store: the predictions, and the model the step read (it leaves a sealing step sealed).
    assert found["model"] == "Sealed" and sum(b"MFSEAL1\x00" in value for value in stored) == 2


@pytest.mark.parametrize(
    ("decorator", "says"),
    [
        ('@confidential(mode="sgx")', "policy: is needed to trust a TEE of mode sgx"),
        ('@confidential(mode="sgx", policy="bad.toml")', "policy.sgx.mr_enclave[0]: String should match pattern"),
        ('@confidential(mode="sgx", policy="missing.toml")', "missing.toml does not exist"),
        ('@confidential(enclave_size="3G")', "enclave_size: '3G' is not a power of two"),
        ('@confidential(backend="nitro")', "backend: 'nitro' is not one of gramine, phala"),
        ('@confidential(mode="tdx")', "mode: 'tdx' is not one of gramine's: direct, sgx"),
        ('@confidential(backend="phala", mode="sgx")', "mode: 'sgx' is not one of phala's: tdx"),
        ('@confidential(backend="phala")', "policy: is needed to trust a TEE of mode tdx"),
        ('@confidential(backend="phala", policy="tdx.toml")', "a Phala CVM reaches the run's datastore over the"),
        ("@confidential(threads=0)", "threads: 0 is not a number of threads"),
        ("@confidential(isv_svn=70000)", "isv_svn: 70000 is not a number from 0 to 65535"),
        ('@confidential(trust=["os.path"])', "trust: 'os.path' is in os, whose classes a confidential step never"),
        ('@confidential(container="yes")', "container: 'yes' is not True or False"),
        ('@confidential(backend="phala", policy="tdx.toml", container=True)', "container: is Gramine's: a phala"),
    ],
)
def test_a_mistake_is_refused_before_the_run_starts(tmp_path: Path, decorator: str, says: str) -> None:
    _refused(tmp_path, decorator, says)


@pytest.mark.parametrize(
    ("decorator", "says", "fix"),
    [
        ("@confidential", "start: its pypi environment would not be in the enclave, which runs this machine's",
         "container=True to install it in the step's image, or @pypi(disabled=True)"),
        ('@confidential(backend="phala", policy="tdx.toml")', "its pypi environment would not be in its CVM",
         "@pypi(disabled=True), and image= an image with the step's packages"),
        ('@confidential(container=True)\n    @conda(packages={"numpy": "2.1.0"})',
         "its conda packages (numpy) cannot go into its image yet", "use @pypi for them"),
        ('@confidential(container=True)\n    @pypi(python="3.12", packages={"tabulate": "0.9.0"})',
         "its @pypi environment is for Python 3.12, and its image's Python is 3.11", '@pypi(python="3.11")'),
    ],
    ids=["gramine-here", "phala", "conda", "python"],
)  # fmt: skip
def test_a_steps_own_environment_its_tee_would_not_have_is_refused_before_the_run_starts(
    tmp_path: Path, decorator: str, says: str, fix: str
) -> None:
    """A TEE that runs an interpreter without the step's environment (this machine's Gramine, a CVM's image),
    and one its image cannot hold yet: refused, not silently missing (Metaflow reaches the check without
    micromamba: it solves after it)."""
    assert f"fix: {fix}" in _refused(tmp_path, decorator, says, "--environment", "pypi")


def test_with_worker_pool_leaves_a_confidential_step_that_runs_no_foreachs_items_alone(tmp_path: Path) -> None:
    """``--with worker_pool`` pools the foreach bodies only: a confidential step that is none is checked as any
    (here its mistake is found), not refused as combined with a pool (every such flow was)."""
    said = _refused(tmp_path, "@confidential(threads=0)", "threads: 0 is not a number", after=("--with", "worker_pool"))
    assert "combined" not in said


def _refused(tmp_path: Path, decorator: str, says: str, *options: str, after: tuple[str, ...] = ()) -> str:
    """What ``tiny_flow`` under ``decorator``, run with the top-level ``options`` (and ``after``: ``run``'s own),
    said when it stopped before its start step, saying ``says``."""
    (tmp_path / ".metaflow").mkdir()
    (tmp_path / "bad.toml").write_text("[sgx]\nmr_enclave = ['nope']\n")
    (tmp_path / "tdx.toml").write_text(f"[tdx]\nmr_td = ['{'91' * 48}']\nrt_mr3 = ['{'00' * 48}']\n")
    tiny_flow(tmp_path, decorator)
    line = [sys.executable, "tiny_flow.py", *options, "run", *after]
    done = subprocess.run(line, cwd=tmp_path, env=flow_env(tmp_path), capture_output=True, text=True, timeout=300)
    said = done.stderr + done.stdout
    assert done.returncode != 0 and says in said, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not list((tmp_path / ".metaflow").glob("TinyFlow/*/start"))
    return said


def test_an_enclave_dies_with_a_launcher_killed_outright(tmp_path: Path) -> None:
    """SIGKILL runs no way out of the launcher: the kernel kills its enclave (``PR_SET_PDEATHSIG``)."""
    (tmp_path / ".metaflow").mkdir()
    marker = tmp_path / "enclave.pids"
    body = f"open({str(marker)!r}, 'w').write(f'{{os.getpid()}} {{os.getppid()}}'); time.sleep(120)"
    tiny_flow(tmp_path, "@confidential", body=f"import os, time; {body}")
    run = subprocess.Popen([sys.executable, "tiny_flow.py", "run"], cwd=tmp_path, env=flow_env(tmp_path),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    enclave = None
    try:
        deadline = time.monotonic() + 240
        while not marker.is_file() or len(marker.read_text().split()) != 2:
            assert time.monotonic() < deadline and run.poll() is None, "the step never started in its enclave"
            time.sleep(0.2)
        enclave, launcher = (int(n) for n in marker.read_text().split())
        assert "confidential" in " ".join(psutil.Process(launcher).cmdline())  # the trampoline
        os.kill(launcher, signal.SIGKILL)
        assert psutil.wait_procs([psutil.Process(enclave)], timeout=10)[1] == [], "the enclave outlived its launcher"
    finally:
        for group in (run.pid, enclave):  # the flow's, and the enclave's own session if it outlived the test
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.killpg(group, signal.SIGKILL)
        run.wait(timeout=30)


def test_an_enclave_unpickles_from_outside_only_plain_data_sealed_values_and_what_it_trusts(tmp_path: Path) -> None:
    """An input made outside a TEE whose pickle needs a class (here a fitted scaler's) is refused in the
    enclave, naming the class and the fix, unless the step trusts that class; plain data and numpy arrays
    are always read. (The trusted case runs in the example flow, whose model class is trusted.)"""
    (tmp_path / ".metaflow").mkdir()
    (tmp_path / "tiny_flow.py").write_text("""import numpy
from metaflow import FlowSpec, confidential, step


class TinyFlow(FlowSpec):
    @step
    def start(self):
        from sklearn.preprocessing import StandardScaler

        self.scaler, self.plain = StandardScaler().fit([[1.0], [3.0]]), {"a": [1, 2.5, None]}
        self.array = numpy.arange(3)
        self.next(self.use)

    @confidential
    @step
    def use(self):
        assert self.plain == {"a": [1, 2.5, None]} and self.array.sum() == 3  # always read
        print(f"{self.scaler.mean_} read in the enclave")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TinyFlow()
""")
    done = subprocess.run([sys.executable, "tiny_flow.py", "run"], cwd=tmp_path, env=flow_env(tmp_path),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert "an input needs sklearn.preprocessing._data.StandardScaler" in output, output[-3000:]
    assert done.returncode != 0 and "trust=['sklearn.preprocessing._data.StandardScaler'])" in output
    assert "[2.] read in the enclave" not in output  # the value never reached the step


def test_unsealed_refuses_a_siblings_value_moved_into_an_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """A join reads each input's sealed value; one sealed by another task of that step (a foreach sibling's,
    moved there in the datastore) is refused, though it is of the run and the name."""
    import pickle
    from types import SimpleNamespace

    from metaflow import current

    from metaflow_stack.confidential import inside
    from metaflow_stack.confidential.seal import Sealed, SealedError, new_data_key, seal

    key = new_data_key()
    monkeypatch.setattr(inside, "_data_key", key)
    current._set_env(flow=SimpleNamespace(name="F", _graph_info={}), run_id="1", step_name="join", task_id="5")
    join = TaskIdentity(flow="F", run="1", step="join", task="5", attempt=0, code_digest="abc")

    def ordered(identity: TaskIdentity) -> None:  # the order the enclave's entry hands the task
        monkeypatch.setenv(
            inside.ORDER, inside.TaskOrder(identity=identity, nonce="ab" * 32, command="", env={}).model_dump_json()
        )

    ordered(join)

    def sealed_input(task: str, sealed_by: str, run: str = "1") -> SimpleNamespace:
        where = "/".join(("F", run, "work", sealed_by, "out"))  # the flow, run, step, task and name it was sealed as
        value = Sealed(seal(pickle.dumps(f"made by {sealed_by}"), key, where), where)
        return SimpleNamespace(out=value, _datastore=SimpleNamespace(step_name="work", task_id=task))

    assert inside.unsealed(sealed_input("3", "3"), "out") == "made by 3"
    with pytest.raises(SealedError, match=r"^out was sealed by work/2, and is read from work/3"):
        inside.unsealed(sealed_input("3", "2"), "out")
    with pytest.raises(SealedError, match=r"^out was sealed in run 0, not in this run 1"):
        inside.unsealed(sealed_input("3", "8", run="0"), "out")
    # In a run resuming run 0, its value cloned by ``resume`` (its task's id that of run 0) opens.
    ordered(join.model_copy(update={"lineage": "0"}))
    assert inside.unsealed(sealed_input("3", "8", run="0"), "out") == "made by 8"


def test_confidential_steps_compose_with_retry_catch_and_timeout(tmp_path: Path) -> None:
    """Each attempt is its own enclave: a failed first attempt is retried (a new attempt, a new quote and key),
    @catch keeps a failing confidential step's exception, and @timeout stops one that runs too long."""
    (tmp_path / ".metaflow").mkdir()
    (tmp_path / "composed_flow.py").write_text("""import time

from metaflow import FlowSpec, catch, confidential, current, retry, step, timeout


class ComposedFlow(FlowSpec):
    @step
    def start(self):
        self.items = [0, 1]
        self.next(self.work, foreach="items")

    @retry(times=1, minutes_between_retries=0)
    @confidential
    @step
    def work(self):
        if self.input == 0 and current.retry_count == 0:
            raise RuntimeError("the first attempt fails")
        self.doubled = self.input * 2
        self.next(self.join)

    @confidential(seal=False)
    @step
    def join(self, inputs):
        from metaflow_stack.confidential import unsealed

        self.total = sum(unsealed(i, "doubled") for i in inputs)
        self.next(self.slow)

    @catch(var="late")
    @timeout(seconds=5)
    @confidential(seal=False)
    @step
    def slow(self):
        time.sleep(60)
        self.next(self.end)

    @step
    def end(self):
        print("total", self.total, "late", type(self.late).__name__)


if __name__ == "__main__":
    ComposedFlow()
""")
    done = subprocess.run([sys.executable, "composed_flow.py", "run"], cwd=tmp_path, env=flow_env(tmp_path),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "total 2 late MetaflowExceptionWrapper" in done.stdout + done.stderr
    found = json.loads(subprocess.run([sys.executable, "-c", """import json
from metaflow import Flow, namespace
namespace(None)
run = Flow("ComposedFlow").latest_run
work = {t.index: [m.value for m in t.metadata if m.name == "confidential-verification"] for t in run["work"]}
print(json.dumps({"attempts": sorted(t.current_attempt for t in run["work"]), "verified": work,
                  "late": "TimeoutException" in str(run["slow"].task["late"].data)}))"""],
        cwd=tmp_path, env=flow_env(tmp_path), capture_output=True, text=True).stdout.splitlines()[-1])  # fmt: skip
    assert found["attempts"] == [0, 1] and found["late"]
    assert sorted(len(values) for values in found["verified"].values()) == [1, 2]  # each attempt its own evidence


RESUMED_FLOW = """import os

from metaflow import FlowSpec, confidential, step


class ResumedFlow(FlowSpec):
    @confidential
    @step
    def start(self):
        self.secret = 42
        self.next(self.middle)

    @step
    def middle(self):
        if os.environ.get("MIDDLE_FAILS"):
            raise RuntimeError("middle fails")
        self.next(self.use)

    @confidential(seal=False)
    @step
    def use(self):
        from metaflow_stack.confidential import unsealed

        self.total = unsealed(self, "secret") + 1
        self.next(self.end)

    @step
    def end(self):
        print("total", self.total)


if __name__ == "__main__":
    ResumedFlow()
"""


def test_a_resumed_run_opens_the_values_its_chain_sealed(tmp_path: Path) -> None:
    """``resume`` clones sealed values as they are (sealed under the first run's key, naming its place): a
    resume of a resume takes the key of its chain's first run, so its confidential step opens them."""
    (tmp_path / ".metaflow").mkdir()
    (tmp_path / "resumed_flow.py").write_text(RESUMED_FLOW)

    def flow(*args: str, fails: bool) -> str:
        env = flow_env(tmp_path) | ({"MIDDLE_FAILS": "1"} if fails else {})
        command = [sys.executable, "resumed_flow.py", *args, "--run-id-file", "run-id"]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        said = done.stdout + done.stderr
        assert (done.returncode != 0) == fails and ("middle fails" in said) == fails, said[-3000:]
        return (tmp_path / "run-id").read_text()

    first = flow("run", fails=True)
    second = flow("resume", "--origin-run-id", first, fails=True)  # start cloned: its value still sealed by run 1
    third = flow("resume", "--origin-run-id", second, fails=False)
    found = client_json(tmp_path, f"""run = Flow("ResumedFlow")["{third}"]
print(json.dumps({{"total": run["use"].task["total"].data, "secret": repr(run["start"].task["secret"].data),
                  "origin": run["use"].task.metadata_dict["origin-run-id"]}}))""")  # fmt: skip
    assert found["total"] == 43 and found["origin"] == second and len({first, second, third}) == 3
    assert found["secret"].startswith(f"<sealed artifact ResumedFlow/{first}/start/")  # cloned, never resealed


def _identity() -> TaskIdentity:
    return TaskIdentity(flow="F", run="1", step="score", task="2", attempt=0, code_digest="abc")


@pytest.mark.parametrize(
    ("env", "code", "says"),
    [
        ({"PYTHONPATH": "/datastore/evil"}, "abc", "the order sets PYTHONPATH: an order may set only input paths"),
        ({"LD_PRELOAD": "/x.so"}, "abc", "the order sets LD_PRELOAD"),
        ({"METAFLOW_INPUT_PATHS_0": "1/start/1"}, "other", "the order names other code than the enclave"),
    ],
)
def test_an_order_the_host_tampered_with_is_refused_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict, code: str, says: str
) -> None:
    """The enclave's entry reads the host's order once and refuses what could run other code in it; what
    it accepts, the quote binds (``TaskOrder.work``)."""
    from metaflow_stack.confidential import inside
    from metaflow_stack.confidential.seal import SealedError

    (tmp_path / "t1").mkdir()
    identity = _identity().model_copy(update={"code_digest": code})
    order = inside.TaskOrder(identity=identity, nonce="0" * 64, command="flow.py step start", env=env)
    (tmp_path / "t1" / "task.json").write_text(order.model_dump_json())
    monkeypatch.setenv(inside.EVIDENCE_ROOT, str(tmp_path))
    monkeypatch.setenv(inside.EXCHANGE, "t1")
    monkeypatch.setenv("METAFLOW_CODE_SHA", "abc")
    with pytest.raises(SealedError, match=says):
        inside.read_order()
    fair = order.model_copy(update={"env": {"METAFLOW_INPUT_PATHS_0": "1/start/1"}})
    assert fair.work() != order.model_copy(update={"command": "flow.py step end"}).work()
    monkeypatch.setenv(inside.EXCHANGE, "../t1")
    with pytest.raises(SealedError, match="is not a task's exchange folder"):
        inside.exchange_folder()


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("-c 'import os'", "the order runs '-c', not the flow file"),
        ("../elsewhere.py step score --run-id 1 --task-id 2 --retry-count 0", "not the flow file"),
        ("score_flow.py step end --run-id 1 --task-id 2 --retry-count 0", "another step than score"),
        ("score_flow.py step score --run-id 9 --task-id 2 --retry-count 0", "--run-id is not the 1"),
        ("score_flow.py step score --run-id 1 --task-id 2 --retry-count 1", "--retry-count is not the 0"),
        ("score_flow.py --evil x step score --run-id 1 --task-id 2 --retry-count 0", "passes --evil"),
    ],
)
def test_the_enclave_runs_only_a_task_of_its_step_never_what_the_host_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, says: str
) -> None:
    from metaflow_stack.confidential import inside
    from metaflow_stack.confidential.seal import SealedError

    (tmp_path / "score_flow.py").write_text("# the measured code's flow file\n")
    monkeypatch.chdir(tmp_path)
    fair = "score_flow.py --quiet --datastore local step score --run-id 1 --task-id 2 --retry-count 0 --tag 'a b'"
    order = inside.TaskOrder(identity=_identity(), nonce="0" * 64, command=fair, env={})
    assert inside.argv(order)[-2:] == ["--tag", "a b"]
    with pytest.raises(SealedError, match=says):
        inside.argv(order.model_copy(update={"command": command}))


TAMPERED_FLOW = """import glob, gzip, json, os, pickle
from metaflow import FlowSpec, confidential, current, step


class TinyFlow(FlowSpec):
    @step
    def start(self):
        self.plain = [1, 2, 3]
        self.next(self.tamper)

    @step
    def tamper(self):
        # As anyone who may write the datastore could: another value in the blob that carries plain on.
        root = os.path.join(os.getcwd(), ".metaflow", "TinyFlow")
        (record,) = glob.glob(os.path.join(root, current.run_id, "start", "*", "0.data.json"))
        with open(record) as found:
            key = json.load(found)["objects"]["plain"]
        with open(os.path.join(root, "data", key[:2], key), "wb") as blob:
            blob.write(gzip.compress(pickle.dumps([6, 6, 6], protocol=4)))
        self.next(self.use)

    @confidential
    @step
    def use(self):
        print(f"{self.plain} read in the enclave")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TinyFlow()
"""


def test_an_input_altered_in_the_datastore_stops_the_enclave_naming_it(tmp_path: Path) -> None:
    """Inputs made outside a TEE are authenticated, not only guarded: an input's blob rewritten in the
    datastore (here by the step before, as anyone who may write it could) stops the confidential task, naming
    the input, before its code sees the value."""
    (tmp_path / ".metaflow").mkdir()
    (tmp_path / "tiny_flow.py").write_text(TAMPERED_FLOW)
    done = subprocess.run([sys.executable, "tiny_flow.py", "run"], cwd=tmp_path, env=flow_env(tmp_path),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "/tamper/" in output, output[-3000:]
    assert "/plain: its blob in the datastore was altered" in output, output[-3000:]
    assert "] read in the enclave" not in output  # (the traceback quotes the line; it never printed)


RECORD_CHECK = """import json, sys
from pathlib import Path
from metaflow.datastore import FlowDataStore
from metaflow.plugins.datastores.local_storage import LocalStorage
from metaflow_stack.confidential.input_records import hold, snapshot
from metaflow_stack.confidential.seal import SealedError

root, run = sys.argv[1], sys.argv[2]
store = FlowDataStore("TinyFlow", None, storage_impl=LocalStorage, ds_root=root)
(task,) = [p.parent.name for p in (Path(root) / "TinyFlow" / run / "start").glob("*/0.data.json")]
expected = snapshot(store, [f"{run}/start/{task}"])
hold([store.get_task_datastore(run, "start", task, mode="r")], expected)  # as it was: held
record = Path(root) / "TinyFlow" / run / "start" / task / "0.data.json"
found = json.loads(record.read_text())
found["objects"]["a"], found["objects"]["b"] = found["objects"]["b"], found["objects"]["a"]  # values swapped
record.write_text(json.dumps(found))
for given in (expected, ""):  # the order's digest, and an order with none
    try:
        hold([store.get_task_datastore(run, "start", task, mode="r")], given)
    except SealedError as exc:
        print(exc)
"""


def test_an_input_record_changed_after_the_launcher_read_it_is_refused_in_the_tee(tmp_path: Path) -> None:
    """The launcher's digest of the inputs' records (their artifacts' blobs by name) is what the TEE holds the
    records Metaflow opened to: two values swapped in one after are refused, naming the input, and so is
    every record when the order carries no digest."""
    (tmp_path / ".metaflow").mkdir()
    tiny_flow(tmp_path, "", body="self.a, self.b = 1, 2")
    env = flow_env(tmp_path)
    subprocess.run([sys.executable, "tiny_flow.py", "run", "--run-id-file", "run-id"], cwd=tmp_path, env=env,
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    run = (tmp_path / "run-id").read_text()
    said = subprocess.run([sys.executable, "-c", RECORD_CHECK, str(tmp_path / ".metaflow"), run], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = said.stdout.splitlines()
    assert said.returncode == 0 and len(lines) == 2, said.stdout + said.stderr
    for line in lines:
        assert line.startswith("the records of this task's 1 input(s) in the datastore are not the ones it was")
        assert f": {run}/start/" in line, line
