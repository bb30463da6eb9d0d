"""``@confidential(container=True)``: a Gramine step's own image, GSC-style (``confidential.step_image``), built
once per code and settings on the stack's gramine image, its enclave prepared inside it at build time, and
each task run as a container of it, its evidence judged before its code runs.

Here the gramine image is the double in ``tests/gramine_double`` (its ``gramine-manifest`` and
``gramine-direct`` on the stack's confidential image); where Gramine is installed (the GitHub workflow's
``gramine`` job) it is the catalog's real one, built with Gramine from its package repository, and an SGX
step's image is signed there too."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest
from confidential_samples import client_json, flow_env, tiny_flow
from conftest import PROJECT, need
from rich.console import Console
from service_servers import metaflow_ui

pytestmark = [pytest.mark.docker, pytest.mark.slow]
pytest.importorskip("dcap_qvl", reason="pip install 'metaflow-stack[confidential]'")

#: Two confidential steps in their images, the second opening what the first sealed, then an ordinary end.
FLOW = """from metaflow import FlowSpec, confidential, step
from metaflow_stack.confidential import unsealed


class ImageFlow(FlowSpec):
    @confidential(container=True)
    @step
    def start(self):
        self.total = sum(range(10))
        self.next(self.double)

    @confidential(container=True)
    @step
    def double(self):
        self.result = unsealed(self, "total") * 2
        print(f"result {self.result}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ImageFlow()
"""


def _real_gramine() -> bool:
    return shutil.which("gramine-sgx-sign") is not None


@pytest.fixture(scope="module")
def gramine_image(docker_engine, state_dir: Path) -> str:
    """The image step images build FROM: the catalog's real one where Gramine is installed, else the double."""
    from metaflow_stack import builders, images

    if _real_gramine():
        return images.resolve("gramine")
    reference = "metaflow-stack/gramine-double:test"
    context = PROJECT / "tests" / "gramine_double"
    request = builders.BuildRequest(context, reference, {"BASE_IMAGE": images.resolve("confidential")})
    builders.build(request, Console(stderr=True))
    return reference


def _env(root: Path, gramine_image: str) -> dict[str, str]:
    """The run's environment, its state folder beside the flow's, not in it (Metaflow would package it)."""
    state = str(root.with_name(f"{root.name}-state"))
    return flow_env(root, METAFLOW_STACK_GRAMINE_IMAGE=gramine_image, METAFLOW_STACK_STATE_DIR=state)


def _run(root: Path, gramine_image: str) -> subprocess.CompletedProcess:
    env = _env(root, gramine_image)
    return subprocess.run([sys.executable, "image_flow.py", "run"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, gramine_image: str) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("confidential-image")
    (root / ".metaflow").mkdir()
    (root / "image_flow.py").write_text(FLOW)
    done = _run(root, gramine_image)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, done.stdout + done.stderr


def test_both_steps_ran_in_one_step_image_their_evidence_recorded_and_their_values_sealed(
    run: tuple[Path, str], gramine_image: str
) -> None:
    from metaflow_stack.agent import Queries
    from metaflow_stack.agent.local_source import LocalSource

    root, output = run
    found = client_json(root, """
run = Flow("ImageFlow").latest_run
rows = {s.id: [json.loads(m.value) for m in s.task.metadata if m.name == "confidential-verification"] for s in run}
rows["stdout"] = run["double"].task.stdout
rows["result"] = type(run["double"].task["result"].data).__name__
print(json.dumps(rows))""", _env(root, gramine_image))  # fmt: skip
    assert found["end"] == [] and found["result"] == "Sealed"
    (start,), (double,) = found["start"], found["double"]
    assert start["image"] == double["image"]  # one code package, one set of settings: one image
    assert start["image"].startswith("metaflow-stack/confidential-step:")
    assert (start["attested"], start["mode"]) == (False, "direct")
    assert "result 90" in found["stdout"]  # the second step opened what the first sealed, in its enclave
    assert output.count("built metaflow-stack/confidential-step:") == 1
    queries = Queries(LocalSource(root / ".metaflow"))
    latest = queries.list_runs("ImageFlow").runs[0].pathspec
    shown = {t.step_name: t.confidential for t in queries.run_tasks(latest).tasks}
    assert shown["start"] is not None and shown["start"].image == start["image"] and shown["end"] is None


def test_the_ui_shows_the_image_each_task_ran_in(run: tuple[Path, str], chromium) -> None:
    root, output = run
    reference = next(w for w in output.split() if w.startswith("metaflow-stack/confidential-step:"))
    start = client_json(root, 'print(json.dumps(Flow("ImageFlow").latest_run["start"].task.pathspec))')
    with metaflow_ui(root / ".metaflow") as url:
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/{start}")
        section = page.locator("section[data-confidential='unattested']")
        section.wait_for(timeout=30_000)
        assert f"Image\n{reference}" in section.inner_text().replace("\t", "\n")
        page.close()


def test_the_image_holds_the_code_and_the_enclave_prepared_for_its_own_paths(
    run: tuple[Path, str], docker_engine, gramine_image: str
) -> None:
    root, output = run
    reference = next(w for w in output.split() if w.startswith("metaflow-stack/confidential-step:"))

    def read(path: str) -> str:
        return docker_engine.run(reference, ["cat", path], remove=True)

    manifest = tomllib.loads(read("/opt/enclave/task.manifest"))
    assert manifest["libos"]["entrypoint"] == "/opt/stack/bin/python"
    assert manifest["fs"]["start_dir"] == "/opt/enclave/code"
    assert manifest["loader"]["env"]["METAFLOW_STACK_CONFIDENTIAL_TASK"] == {"passthrough": True}
    trusted = {entry["uri"].removeprefix("file:"): entry["sha256"] for entry in manifest["sgx"]["trusted_files"]}
    flow_file = "/opt/enclave/code/image_flow.py"
    assert trusted[flow_file] == hashlib.sha256((root / "image_flow.py").read_bytes()).hexdigest()
    assert json.loads(read("/opt/enclave/ready.json")) == {"stem": "task", "mr_enclave": None}  # direct: unsigned
    assert docker_engine.image.inspect(reference).config.user == "1000:1000"


def test_a_second_run_reuses_the_image_and_no_task_container_is_left(
    run: tuple[Path, str], docker_engine, gramine_image: str
) -> None:
    from metaflow_stack.confidential.step_image import LABEL

    root, _ = run
    again = _run(root, gramine_image)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert "is up to date" in said and "built metaflow-stack/confidential-step:" not in said
    assert docker_engine.container.list(all=True, filters=[("label", LABEL)]) == []


def test_a_task_container_goes_with_a_launcher_killed_outright(
    tmp_path: Path, docker_engine, gramine_image: str
) -> None:
    """SIGKILL runs no way out of the launcher: its watchdog removes the task's container."""
    from metaflow_stack.confidential.step_image import LABEL, OWNER
    from metaflow_stack.elsewhere import Launcher

    root = tmp_path / "flow"
    (root / ".metaflow").mkdir(parents=True)
    tiny_flow(root, "@confidential(container=True)", body="import time; time.sleep(120)")
    run = subprocess.Popen([sys.executable, "tiny_flow.py", "run"], cwd=root, env=_env(root, gramine_image),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (found := docker_engine.container.list(filters=[("label", LABEL)])):
            assert time.monotonic() < deadline and run.poll() is None, "the task's container never started"
            time.sleep(0.5)
        (container,) = found
        launcher = Launcher.parse(container.config.labels[OWNER])
        assert launcher is not None
        os.kill(launcher.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while docker_engine.container.exists(container.id):
            assert time.monotonic() < deadline, "the task's container outlived its launcher"
            time.sleep(0.5)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()


def test_a_gramine_image_that_is_nowhere_fails_the_run_at_its_start_in_one_line(tmp_path: Path, docker_engine) -> None:
    root = tmp_path / "flow"
    (root / ".metaflow").mkdir(parents=True)
    tiny_flow(root, "@confidential(container=True)")
    done = subprocess.run([sys.executable, "tiny_flow.py", "run"], cwd=root,
                          env=_env(root, "127.0.0.1:9/gramine:missing"), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "METAFLOW_STACK_GRAMINE_IMAGE names 127.0.0.1:9/gramine:missing" in said
    assert "unset METAFLOW_STACK_GRAMINE_IMAGE" in said and "Traceback" not in said


def _layers(saved: bytes) -> list[bytes]:
    """Every file of a ``docker save`` archive, a compressed layer decompressed: what the image holds."""
    found = []
    with tarfile.open(fileobj=io.BytesIO(saved)) as archive:
        for member in archive:
            data = archive.extractfile(member).read() if member.isfile() else b""
            found.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return found


def test_an_sgx_step_image_is_signed_with_the_runtime_key_which_no_layer_holds(
    docker_engine, tmp_path: Path, gramine_image: str
) -> None:
    from metaflow_stack.confidential import gramine, step_image
    from metaflow_stack.confidential.launcher import Settings

    need("gramine", _real_gramine(), "signing an enclave needs Gramine's gramine-sgx-sign (the gramine job)")
    code = tmp_path / "code"
    code.mkdir()
    (code / "flow.py").write_text("print('scored')\n")
    chosen = Settings("sgx", "1G", 8, "policies/prod.toml", None, None, 1, 2)
    state = tmp_path / "state"
    built = step_image.build(code, str(tmp_path / "datastore"), chosen, state, {}, "ab" * 33, gramine_image)
    key = gramine.signing_key(state)
    assert built.mr_enclave is not None and len(built.mr_enclave) == 64
    view = docker_engine.run(built.reference, ["gramine-sgx-sigstruct-view", "--output-format", "json",
                                               f"/opt/enclave/{built.stem}.sig"], remove=True)  # fmt: skip
    signed = json.loads(view)
    assert (signed["mr_signer"], signed["mr_enclave"]) == (gramine.mr_signer(key), built.mr_enclave)
    saved = subprocess.run(["docker", "save", built.reference], capture_output=True, check=True).stdout
    secret = key.read_bytes().splitlines()[1]  # a line of the key's base64 body
    layers = _layers(saved)
    assert len(layers) > 3 and not any(secret in layer for layer in layers)  # in no layer, compressed or not


def _wheel(requirement: str, folder: Path) -> Path:
    """``requirement``'s wheel for a step's image (x86-64 Linux, Python 3.11, as this machine) downloaded into
    ``folder``, as Metaflow's pip solver downloads each package of a run's environment."""
    folder.mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest",
         str(folder), requirement],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (found,) = folder.glob(f"{requirement.split('==')[0]}-*.whl")
    return found


def _step_image(tmp_path: Path, gramine_image: str, environment):
    from metaflow_stack.confidential import step_image
    from metaflow_stack.confidential.launcher import Settings

    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "flow.py").write_text("import tabulate\n")
    chosen = Settings("direct", "1G", 8, None, None, None)
    return step_image.build(code, str(tmp_path / "datastore"), chosen, tmp_path / "state", {}, "ab" * 33,
                            gramine_image, environment)  # fmt: skip


def test_a_steps_solved_wheels_are_installed_in_its_image_and_trusted_by_its_enclave(
    tmp_path: Path, docker_engine, gramine_image: str
) -> None:
    from metaflow_stack.solved_environment import SolvedEnvironment

    wheel = _wheel("tabulate==0.9.0", tmp_path / "wheels")
    built = _step_image(tmp_path, gramine_image, SolvedEnvironment("3.11", (wheel,)))
    manifest = tomllib.loads(docker_engine.run(built.reference, ["cat", "/opt/enclave/task.manifest"], remove=True))
    path = manifest["loader"]["env"]["PYTHONPATH"].split(":")
    assert path == ["/opt/enclave/code/.mf_code", "/opt/enclave/code", "/opt/enclave/env"]  # after the code
    trusted = [entry["uri"].removeprefix("file:") for entry in manifest["sgx"]["trusted_files"]]
    assert any(uri.startswith("/opt/enclave/env") for uri in trusted)
    version = docker_engine.run(built.reference, ["python", "-c", "import tabulate; print(tabulate.__version__)"],
                                envs={"PYTHONPATH": "/opt/enclave/env"}, remove=True)  # fmt: skip
    assert version.strip() == "0.9.0"
    # The next task of the step finds the image by its inputs; without the environment it is another image.
    assert _step_image(tmp_path, gramine_image, SolvedEnvironment("3.11", (wheel,))).reference == built.reference
    assert _step_image(tmp_path, gramine_image, None).reference != built.reference


@pytest.mark.parametrize(
    ("python", "requirement", "says", "fixes"),
    [
        ("3.12", "tabulate==0.9.0", "solved for Python 3.12, and its image's Python is 3.11",
         ['@pypi(python="3.11") (or @pypi_base), or METAFLOW_STACK_GRAMINE_IMAGE with Python 3.12']),
        ("3.11", "pydantic==1.10.19", "the step's packages break the runtime its enclave runs: ImportError: cannot",
         ["pin versions of those packages the runtime works with (see its requirements)"]),
    ],
)  # fmt: skip
def test_an_environment_the_image_cannot_run_stops_the_build_in_one_line(
    tmp_path: Path, docker_engine, gramine_image: str, python: str, requirement: str, says: str, fixes: list[str]
) -> None:
    from metaflow_stack.errors import StackError
    from metaflow_stack.solved_environment import SolvedEnvironment

    with pytest.raises(StackError) as raised:
        _step_image(tmp_path, gramine_image, SolvedEnvironment(python, (_wheel(requirement, tmp_path / "wheels"),)))
    assert "\n" not in raised.value.message and says in raised.value.message  # what the build said, in one line
    assert raised.value.fix in fixes


PYPI_FLOW = """from metaflow import FlowSpec, confidential, pypi, step


class PypiImageFlow(FlowSpec):
    @confidential(container=True)
    @pypi(python="3.11", packages={"tabulate": "0.9.0"})
    @step
    def start(self):
        import tabulate

        print(f"tabulate {tabulate.__version__} from {tabulate.__file__}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PypiImageFlow()
"""


@pytest.mark.timeout(1800)  # (its run may take 1500 s: an environment solved, and its image built)
def test_a_pypi_step_runs_in_its_image_with_the_environment_metaflow_solved(
    tmp_path: Path, docker_engine, gramine_image: str
) -> None:
    need("micromamba", shutil.which("micromamba") is not None, "Metaflow's @pypi solves environments with micromamba")
    root = tmp_path / "flow"
    (root / ".metaflow").mkdir(parents=True)
    (root / "pypi_image_flow.py").write_text(PYPI_FLOW)
    env = _env(root, gramine_image)
    done = subprocess.run([sys.executable, "pypi_image_flow.py", "--environment", "pypi", "run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = client_json(root, 'print(json.dumps(Flow("PypiImageFlow").latest_run["start"].task.stdout))', env)
    assert "tabulate 0.9.0 from /opt/enclave/env/tabulate/__init__.py" in found
