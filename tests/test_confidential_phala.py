"""``@confidential(backend="phala")``'s client of Phala Cloud: a task's dstack app provisioned, committed with
its variables encrypted to the CVM's key (as dstack decrypts them inside) only once the pinned KMS has
freshly signed that key for the app, watched, attested and deleted,
against a double of Phala Cloud's API that checks each request as the service would (``tests/phala_double``,
written from Phala's SDK); mistakes and refusals in one line naming the fix. Against Phala Cloud itself
only where its API key is configured (the GitHub workflow's ``phala`` job)."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ended_launcher, need
from devservers import phala_double

from metaflow_stack.confidential import phala as phala_module
from metaflow_stack.confidential.phala import PhalaCloud, PhalaError, compose_for, encrypt_env
from metaflow_stack.errors import InvalidInput, StackError

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def phala() -> Iterator[tuple[str, str]]:
    """The double's API prefix and its key, served from 127.0.0.1 while the module runs (its KMS honest)."""
    with phala_double() as served:
        yield served


def _double(base: str) -> str:
    return base.removesuffix("/api/v1") + "/_double"


def _pinned(base: str) -> str:
    """The double's KMS signing key, as a user pins it after checking it."""
    return httpx.get(f"{_double(base)}/kms").json()["k256_pubkey"]


@pytest.fixture()
def kms_attack(phala: tuple[str, str]) -> Iterator[Callable[[str], None]]:
    """Turns the double's KMS answers into an attack for one test; honest again after it."""

    def attack(kind: str) -> None:
        httpx.post(f"{_double(phala[0])}/kms", json={"attack": kind}).raise_for_status()

    yield attack
    attack("honest")


def test_a_task_is_deployed_watched_attested_and_deleted(phala: tuple[str, str]) -> None:
    base, key = phala
    cloud = PhalaCloud(api_key=key, base_url=base, signer=_pinned(base))
    env = {"METAFLOW_CODE_URL": "s3://bucket/ScoreFlow/data/ab/abc", "AWS_SECRET_ACCESS_KEY": "never in the clear"}
    compose = compose_for("metaflow-stack-base:1", ["python", "-u", "score_flow.py", "step", "score"], list(env))
    provisioned = cloud.provision("scoreflow-12-score-3", compose, list(env))
    cvm = cloud.commit(provisioned, env)
    seen = httpx.get(f"{_double(base)}/cvms/{cvm}").json()
    assert seen["env"] == env  # what the CVM decrypts at boot: exactly the variables, encrypted to its key
    assert '"/var/run/dstack.sock:/var/run/dstack.sock"' in seen["compose"]  # the task can ask for its quote
    assert cloud.commit(provisioned, env) == cvm  # committing again is the same CVM
    assert cloud.wait(cvm, {"running"}, timeout_s=10, every_s=0.01) == "running"
    assert cloud.attestation(cvm)["tcb_info"]["mrtd"].startswith("91eb2b44")
    cloud.delete(cvm)
    with pytest.raises(PhalaError, match=r"GET /cvms/.*/state: 404 CVM not found"):
        cloud.state(cvm)
    other = dataclasses.replace(provisioned, compose_hash="0" * 64)
    with pytest.raises(PhalaError, match="409 compose hash differs"):
        cloud.commit(other, env)
    cloud.close()


@pytest.mark.parametrize(
    ("attack", "says"),
    [
        ("foreign", r"is signed by 0x0[23][0-9a-f]{64}, not the pinned KMS"),
        ("stale", "carries no valid, fresh KMS signature"),
        ("swapped", "is not the one the KMS signed"),
    ],
)
def test_nothing_is_encrypted_to_a_key_the_pinned_kms_did_not_freshly_sign(
    phala: tuple[str, str], kms_attack: Callable[[str], None], attack: str, says: str
) -> None:
    base, key = phala
    kms_attack(attack)
    cloud = PhalaCloud(api_key=key, base_url=base, signer=_pinned(base))
    provisioned = cloud.provision("scoreflow-13-score-4", compose_for("metaflow-stack-base:1", ["true"], ["S"]), ["S"])
    before = httpx.get(f"{_double(base)}/cvms").json()
    with pytest.raises(PhalaError, match=says):
        cloud.commit(provisioned, {"S": "never sent"})
    assert httpx.get(f"{_double(base)}/cvms").json() == before  # refused before anything was committed


def test_an_old_kms_signature_without_a_timestamp_is_taken_with_a_warning(
    phala: tuple[str, str], kms_attack: Callable[[str], None]
) -> None:
    base, key = phala
    kms_attack("legacy")
    cloud = PhalaCloud(api_key=key, base_url=base, signer=_pinned(base).upper().removeprefix("0X"))
    provisioned = cloud.provision("scoreflow-14-score-5", compose_for("metaflow-stack-base:1", ["true"], ["S"]), ["S"])
    with pytest.warns(UserWarning, match="signs without a timestamp"):
        assert cloud.checked_env_key(provisioned) == provisioned.env_public_key


def test_without_a_pinned_kms_the_fix_names_the_key_phala_reports(
    phala: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, key = phala
    monkeypatch.delenv("METAFLOW_STACK_PHALA_KMS_SIGNER", raising=False)
    cloud = PhalaCloud(api_key=key, base_url=base)
    provisioned = cloud.provision("scoreflow-15-score-6", compose_for("metaflow-stack-base:1", ["true"], []), [])
    with pytest.raises(PhalaError) as unpinned:
        cloud.commit(provisioned, {})
    assert f"Phala Cloud names {_pinned(base)} for KMS kms_double" in unpinned.value.message
    assert "export METAFLOW_STACK_PHALA_KMS_SIGNER=" in unpinned.value.fix
    with pytest.raises(InvalidInput, match=r"^STACK_PHALA_KMS_SIGNER: '0x04ab' is not a compressed secp256k1 key"):
        PhalaCloud(api_key=key, base_url=base, signer="0x04ab").checked_env_key(provisioned)


def test_keys_and_variables_are_refused_naming_the_fix(phala: tuple[str, str], monkeypatch) -> None:
    base, _ = phala
    monkeypatch.delenv("PHALA_CLOUD_API_KEY", raising=False)
    with pytest.raises(PhalaError) as missing:
        PhalaCloud(base_url=base)
    assert (
        missing.value.message == "PHALA_CLOUD_API_KEY is not set" and "export PHALA_CLOUD_API_KEY" in missing.value.fix
    )
    with pytest.raises(PhalaError, match="Phala Cloud refused the API key"):
        PhalaCloud(api_key="wrong", base_url=base).provision("scoreflow-1", "{}", [])
    with pytest.raises(PhalaError, match="Phala Cloud is unreachable"):
        PhalaCloud(api_key="k", base_url="http://127.0.0.1:9/api/v1").state("1")
    with pytest.raises(InvalidInput, match=r"^env\.1BAD: is not a variable name dstack accepts"):
        encrypt_env({"1BAD": "x"}, "00" * 32)
    with pytest.raises(PhalaError, match="not an X25519 public key"):
        encrypt_env({"GOOD": "x"}, "zz")


def test_an_attempt_ends_on_its_cvms_own_word_only_or_at_its_deadline(
    phala: tuple[str, str], tmp_path: Path, capsys
) -> None:
    """A CVM says how its task ended in the run's datastore, which others may write: its end is authenticated
    with the attempt's key, encrypted to the CVM alone. An end it did not write is ignored (said once), and
    the watch goes on until the CVM's own, or until the CVM's boot and the step's time limit have passed."""
    from confidential_samples import IDENTITY
    from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY

    from metaflow_stack.confidential import cvm
    from metaflow_stack.confidential.exchange import ENDED, Folder, InDatastore, prefix_of, storage_for
    from metaflow_stack.confidential.inside import END_KEY, ORDER, TaskOrder
    from metaflow_stack.confidential.launcher import Judge

    base, key = phala
    cloud = PhalaCloud(api_key=key, base_url=base, signer=_pinned(base))
    compose = compose_for("metaflow-stack-base:1", ["true"], [])
    root, end_key = tmp_path / "datastore", secrets.token_hex(32)
    order = TaskOrder(identity=IDENTITY, nonce="ab" * 32, command=f"flow.py --datastore-root {root} step score", env={})
    identity = IDENTITY
    exchange = InDatastore(
        storage_for("local", str(root)),
        prefix_of(identity.flow, identity.run, identity.step, identity.task, identity.attempt, order.nonce),
    )
    judge = Judge(exchange, order, None, None, print)  # (no evidence comes: nothing is judged, nothing asked)
    running = cloud.commit(cloud.provision("endflow-1-score-2-0", compose, []), {})
    try:
        watch = cvm._Watch(cloud, running, exchange, judge, end_key, deadline_s=3600)
        forgeries = [{"code": 0}, {"code": 0, "mac": "00" * 32}, {"code": 0, "mac": "é" * 64}]
        for forged in forgeries:
            exchange.put(ENDED, json.dumps(forged).encode())
            assert watch() and watch()  # still watching
        assert capsys.readouterr().err.count("that the CVM did not write is ignored") == len(forgeries)  # once each

        cvm_env = {"PATH": os.environ["PATH"], ORDER: order.model_dump_json(), END_KEY: end_key}
        cvm_env |= {"METAFLOW_CODE_DS": "local", "METAFLOW_CODE_SHA": identity.code_digest}
        said = [sys.executable, "-I", "-m", "metaflow_stack.confidential.inside", "--ended", "3"]
        subprocess.run(said, env=cvm_env, cwd=tmp_path, check=True, capture_output=True, timeout=120)
        assert cvm.end_code(exchange.get(ENDED), end_key) == 3
        assert cvm.end_code(exchange.get(ENDED), secrets.token_hex(32)) is None
        assert not watch() and watch.code == METAFLOW_EXIT_DISALLOW_RETRY  # its own end, without evidence: final
        late = cvm._Watch(cloud, running, Folder(tmp_path / "quiet"), judge, end_key, deadline_s=0)
        assert not late() and late.code == 1  # past its time (the step's limit and its boot): it may be retried
        assert f"error: CVM {running} ran past its 0 s" in capsys.readouterr().err
    finally:
        cloud.delete(running)
        cloud.close()


#: A launcher (``cvm.run``, as the ``confidential step`` trampoline calls it) whose CVM never gives evidence.
LAUNCHER = """import sys
from pathlib import Path

from metaflow_stack.confidential import cvm, launcher
from metaflow_stack.confidential.attest import TaskIdentity
from metaflow_stack.confidential.cvm_variables import END_KEY
from metaflow_stack.confidential.exchange import Folder
from metaflow_stack.confidential.inside import TaskOrder
from metaflow_stack.confidential.ledger import Ledger
from metaflow_stack.confidential.phala import PhalaCloud, compose_for

base, key, signer, state = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
identity = TaskIdentity(flow="LeakFlow", run="7", step="score", task="2", attempt=0, code_digest="sha256:abc")
order = TaskOrder(identity=identity, nonce="ab" * 32, command="leak_flow.py step score", env={})
settings = launcher.Settings("tdx", "", 1, None, None, None)
exchange = Folder(state / "exchange")
judge = launcher.Judge(exchange, order, settings, launcher.keeper(state, settings, ""), print)
# (with an end key, as every CVM's app has: without one, the watch would fail and delete the CVM at once)
app = cvm.App("mf-leakflow-score", compose_for("metaflow-stack-base:1", ["true"], ["S", END_KEY]),
              {"S": "x", END_KEY: "ab" * 32})
cloud = PhalaCloud(api_key=key, base_url=base, signer=signer)
cvm.run(cloud, "leakflow-7-score-2-0", "tdx.small", app, exchange, judge, print, Ledger(state), 600)
"""


def _killed_launcher(base: str, key: str, tmp_path: Path, with_its_child: bool) -> str:
    """A ``LAUNCHER`` killed outright (SIGKILL) once its CVM runs (``with_its_child``: with the child that
    watches it, as a reboot would): the CVM's id."""
    state = tmp_path / "state"
    (tmp_path / "launch.py").write_text(LAUNCHER)
    command = [sys.executable, str(tmp_path / "launch.py"), base, key, _pinned(base), str(state)]
    launched = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    said, started = "", None
    try:
        while started is None and (line := launched.stderr.readline()):  # until its CVM runs; it then waits
            said += line
            started = re.search(r"CVM (\S+) started on Phala Cloud", line)
    finally:
        if with_its_child:
            os.killpg(launched.pid, signal.SIGKILL)
        else:
            launched.kill()
        launched.wait(timeout=30)
    assert started, said + launched.stderr.read()
    return started[1]


def test_a_launcher_killed_outright_has_its_cvm_deleted_at_once(phala: tuple[str, str], tmp_path: Path) -> None:
    """SIGKILL to the launcher alone (Metaflow's runtime does it to the tasks still running when another fails
    the run): the child it forked before the CVM was made deletes the CVM then, and its note goes."""
    from metaflow_stack.confidential.ledger import Ledger

    base, key = phala
    killed = _killed_launcher(base, key, tmp_path, with_its_child=False)
    notes = Ledger(tmp_path / "state").folder

    def left() -> tuple[bool, list[Path]]:  # (the double drops the CVM before the child reads its answer)
        return httpx.get(f"{_double(base)}/cvms/{killed}").json() is not None, list(notes.glob("*.json"))

    deadline = time.monotonic() + 30
    while left() != (False, []) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == (False, [])


def test_a_cvm_whose_launcher_was_killed_outright_is_deleted_at_the_next_runs_start(
    phala: tuple[str, str], tmp_path: Path
) -> None:
    """A launcher killed outright with the child that watches it (a reboot) leaves its CVM billing: its note
    in the state folder lets the next run's start delete it, and only it: a live launcher's CVM and another
    API's stay."""
    from metaflow_stack.confidential.ledger import Ledger

    base, key = phala
    state = tmp_path / "state"
    killed = _killed_launcher(base, key, tmp_path, with_its_child=True)
    assert httpx.get(f"{_double(base)}/cvms/{killed}").json() is not None  # still there, billing

    cloud = PhalaCloud(api_key=key, base_url=base, signer=_pinned(base))
    compose = compose_for("metaflow-stack-base:1", ["true"], ["S"])
    live = cloud.commit(cloud.provision("leakflow-7-score-3-0", compose, ["S"]), {"S": "x"})
    ledger = Ledger(state)
    ledger.launched(base, "app-live", live, "leakflow-7-score-3-0")  # this process keeps it: alive
    ledger.launched(base + "/elsewhere", "app-elsewhere", killed, "on-another-api")
    (ledger.folder / "torn.json").write_text("{")
    # Launchers killed while their commits were on the way: their notes name the CVMs by their apps, one
    # committed (deleted), one never (nothing to delete: the note goes).
    sent, unsent = (cloud.provision(f"leakflow-7-score-{n}-0", compose, ["S"]) for n in (4, 5))
    in_flight = cloud.commit(sent, {"S": "x"})
    for n, provisioned in ((4, sent), (5, unsent)):
        note = {"cvm": cloud.by_app(provisioned.app_id), "name": f"leakflow-7-score-{n}-0", "api": base}
        (ledger.folder / f"in-flight-{n}.json").write_text(json.dumps(note | {"launcher": ended_launcher()}))

    # An API that does not take the app's name in a DELETE (404): never taken for a CVM already gone.
    httpx.post(f"{_double(base)}/app-deletes", json={"app_deletes": "refused"}).raise_for_status()
    deleted, left = ledger.sweep(cloud)
    assert sorted(deleted) == ["leakflow-7-score-2-0"] and left == ["leakflow-7-score-4-0"]
    assert httpx.get(f"{_double(base)}/cvms/{in_flight}").json() is not None  # still there, still noted
    httpx.post(f"{_double(base)}/app-deletes", json={"app_deletes": "taken"}).raise_for_status()
    # Taken: the one committed is deleted; the one whose commit never made a CVM goes without a word.
    assert ledger.sweep(cloud) == (["leakflow-7-score-4-0"], [])
    assert httpx.get(f"{_double(base)}/cvms/{killed}").json() is None
    assert httpx.get(f"{_double(base)}/cvms/{in_flight}").json() is None
    assert httpx.get(f"{_double(base)}/cvms/{live}").json() is not None
    assert len(list(ledger.folder.glob("*.json"))) == 2  # the live one's note and the other API's; the torn gone
    assert ledger.sweep(cloud) == ([], [])
    cloud.delete(live)
    ledger.deleted(base, "app-live")
    assert len(list(ledger.folder.glob("*.json"))) == 1
    cloud.close()


def test_a_cvm_is_noted_by_its_app_before_its_commit_is_sent(phala: tuple[str, str], tmp_path: Path) -> None:
    """A launcher killed while its commit is on the way leaves a CVM billing: the note is there before."""
    from metaflow_stack.confidential import cvm
    from metaflow_stack.confidential.ledger import Ledger

    base, key = phala
    ledger, noted = Ledger(tmp_path / "state"), []

    class CutOff(PhalaCloud):
        def commit(self, provisioned, env, key=None) -> str:
            noted.extend(json.loads(path.read_text())["cvm"] for path in ledger.folder.glob("*.json"))
            noted.append(self.by_app(provisioned.app_id))
            raise PhalaError("the commit was cut off")

    cloud = CutOff(api_key=key, base_url=base, signer=_pinned(base))
    app = cvm.App("mf-leakflow-score", compose_for("metaflow-stack-base:1", ["true"], ["S"]), {"S": "x"})
    with pytest.raises(PhalaError, match="the commit was cut off"):
        cvm.run(cloud, "leakflow-8-score-1-0", "tdx.small", app, None, None, print, ledger, 600)
    assert len(noted) == 2 and noted[0] == noted[1]  # noted by its app, before the commit
    # A commit that did not answer may still be making the CVM: the note stays for the next run's start,
    # which finds no CVM of the app (its launcher gone) and drops the note without a word.
    (note,) = ledger.folder.glob("*.json")
    assert json.loads(note.read_text())["cvm"] == noted[0]
    note.write_text(json.dumps(json.loads(note.read_text()) | {"launcher": ended_launcher()}))
    assert ledger.sweep(cloud) == ([], []) and list(ledger.folder.glob("*.json")) == []
    cloud.close()


def _still_on(cloud: PhalaCloud, cvm: str) -> bool:
    """Whether ``cvm`` is known and not stopped (its state 404: gone)."""
    from metaflow_stack.confidential.cvm import STOPPED

    try:
        return cloud.state(cvm) not in STOPPED
    except PhalaError as exc:
        if " 404 " not in exc.message:
            raise
        return False


def test_on_phala_cloud_itself() -> None:
    """A tiny dstack app on a real CVM: provisioned, committed, running, attested, deleted by its app's id."""
    need("phala-cloud", bool(os.environ.get("PHALA_CLOUD_API_KEY")), "set PHALA_CLOUD_API_KEY (the phala job's secret)")
    need("phala-cloud", bool(os.environ.get("METAFLOW_STACK_PHALA_KMS_SIGNER")), "pin the KMS (the job's variable)")
    cloud = PhalaCloud()
    compose = compose_for("busybox:1.36", ["sh", "-c", "echo confidential; sleep 60"], ["GREETING"])
    provisioned = cloud.provision(f"mfstack-test-{secrets.token_hex(3)}", compose, ["GREETING"])
    cvm = cloud.commit(provisioned, {"GREETING": "hi"})
    try:
        assert cloud.wait(cvm, {"running"}, timeout_s=900, every_s=10) == "running"
        assert cloud.attestation(cvm)["is_online"] is True
    finally:
        try:  # by its app, as a run's start deletes a CVM noted before its commit answered
            cloud.delete(cloud.by_app(provisioned.app_id))
            deadline = time.monotonic() + 300
            while _still_on(cloud, cvm) and time.monotonic() < deadline:
                time.sleep(10)
            assert not _still_on(cloud, cvm), "deleted by its app's id, and still on"
        finally:
            cloud.delete(cvm, missing_ok=True)


def test_every_task_of_a_step_is_one_app_whose_compose_fixes_what_a_policy_pins() -> None:
    """The compose (so its hash, which a CVM's event log records) is the same for every task of a step:
    what differs per task, and every secret, is encrypted to the task's CVM."""
    from confidential_samples import IDENTITY
    from metaflow.metaflow_environment import MetaflowEnvironment

    from metaflow_stack.confidential import cvm
    from metaflow_stack.confidential.cvm_variables import ENCRYPTED
    from metaflow_stack.confidential.inside import TaskOrder

    def app(task: str, attempt: int) -> cvm.App:
        identity = IDENTITY.model_copy(update={"task": task, "attempt": attempt})
        order = TaskOrder(identity=identity, nonce="ab" * 32, command=f"flow.py step score --task-id {task}", env={})
        return cvm.app_for(
            f"registry.test/metaflow-stack/confidential@sha256:{'e' * 64}", MetaflowEnvironment(None),
            ("s3", "s3://bucket/root"), ("{}", "abc", "s3://bucket/root/ScoreFlow/data/ab/abc"),
            {"METAFLOW_S3_ENDPOINT_URL": "http://s3.test", "PYTHONPATH": "/evil"}, {"MODEL_SIZE": "small"},
            order, cvm.measured_variables("cd" * 32, "policies/prod.toml", ("sklearn.Model",)),
        )  # fmt: skip

    first, second = app("3", 0), app("4", 1)
    assert first.compose == second.compose and first.encrypted != second.encrypted
    assert set(first.encrypted) == ENCRYPTED  # the only names its app compose may allow (dstack_app)
    service = json.loads(first.compose)["services"]["task"]
    fixed = service["environment"]
    assert (fixed["METAFLOW_STACK_CONFIDENTIAL_POLICY"], fixed["METAFLOW_CODE_SHA"]) == ("prod", "abc")
    assert (fixed["METAFLOW_STACK_CONFIDENTIAL_STEP"], fixed["MODEL_SIZE"]) == ("score", "small")  # measured
    assert fixed["METAFLOW_STACK_CONFIDENTIAL_TRUST"] == "sklearn.Model" and fixed["MF_TASK_ID"] == "${MF_TASK_ID}"
    # Settings and credentials: one encrypted variable, whatever this machine has; a loader variable never goes.
    assert "AWS_SECRET_ACCESS_KEY" not in fixed and "PYTHONPATH" not in fixed
    settings = json.loads(second.encrypted["METAFLOW_STACK_CONFIDENTIAL_SETTINGS"])
    assert settings["METAFLOW_S3_ENDPOINT_URL"] == "http://s3.test" and settings["AWS_SECRET_ACCESS_KEY"]
    assert "PYTHONPATH" not in settings and second.encrypted["MF_TASK_ID"] == "4"
    # Compose would interpolate the command: its own $ are written $$, so bash gets them as written; the
    # package is checked before it is unpacked, and the image's modules run isolated from the working folder.
    script = service["command"][-1]
    assert "$${MF_TASK_RUN}" in script and "$$c" in script and script.startswith('settings="$$(python -I -m')
    assert script.index("sha1sum --check") < script.index("tar ") and "python -I -u -m metaflow_stack" in script
    with pytest.raises(StackError, match="is not named by its digest"):
        cvm.app_for("registry.test/confidential:1", None, ("s3", ""), ("{}", "", ""), {}, {}, order_of(), {})
    long = cvm.cvm_name("F" * 80, "1796300945116323", "s" * 80, "3", 0)
    assert len(long) <= 63 and long.endswith("-3-0") and long != cvm.cvm_name("F" * 80, "17", "s" * 80, "3", 0)
    assert cvm.app_name("ScoreFlow", "score") == "mf-scoreflow-score"


def order_of() -> object:
    from confidential_samples import IDENTITY

    from metaflow_stack.confidential.inside import TaskOrder

    return TaskOrder(identity=IDENTITY, nonce="ab" * 32, command="flow.py step score", env={})


def test_a_cvm_exports_only_metaflows_settings_and_refuses_a_package_that_is_not_its_own(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the CVM's measured command does first: export the encrypted settings (only Metaflow's and AWS's
    names), and check the fetched package's SHA-1 before unpacking it."""
    import hashlib
    import shlex
    import subprocess

    from metaflow_stack.confidential import cvm
    from metaflow_stack.confidential.inside import SETTINGS, settings_exports
    from metaflow_stack.confidential.seal import SealedError

    for name in ("METAFLOW_S3_ENDPOINT_URL", "AWS_REGION"):  # not in a CVM's environment until exported
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(SETTINGS, json.dumps({"METAFLOW_S3_ENDPOINT_URL": "http://s3.test/a b", "AWS_REGION": "x"}))
    assert settings_exports() == "export METAFLOW_S3_ENDPOINT_URL='http://s3.test/a b'\nexport AWS_REGION=x"
    monkeypatch.setenv("METAFLOW_STACK_CONFIDENTIAL_STEP", "score")  # as the compose fixes it
    for name in ("LD_PRELOAD", "AWS_CONFIG_FILE", "METAFLOW_CODE_SHA", "METAFLOW_STACK_CONFIDENTIAL_TRUST",
                 "METAFLOW_STACK_CONFIDENTIAL_STEP", "METAFLOW_EXTENSIONS_SEARCH", "METAFLOW_X\n"):  # fmt: skip
        monkeypatch.setenv(SETTINGS, json.dumps({name: "theirs"}))
        with pytest.raises(SealedError, match="only Metaflow's settings and AWS's credentials may be set"):
            settings_exports()
    (tmp_path / "job.tar").write_bytes(b"the package")
    check = shlex.split(f'bash -c "mflog() {{ echo \\"$@\\"; }}; {cvm.CHECK_PACKAGE} && echo extracting"')
    for sha, unpacked in ((hashlib.sha1(b"the package").hexdigest(), True), ("0" * 40, False)):
        done = subprocess.run(check, cwd=tmp_path, env={"PATH": os.environ["PATH"], "METAFLOW_CODE_SHA": sha},
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert ("extracting" in done.stdout) is unpacked and (done.returncode == 0) is unpacked, done.stdout
    assert "is not the one the compose fixes" in done.stdout


class _Awkward(http.server.BaseHTTPRequestHandler):
    """Answers Phala Cloud's API as a broken proxy or server might: a page, a list, a trickle, a flood."""

    def do_GET(self) -> None:
        kind = self.path.split("/")[-2]
        body = {"page": b"<html>down for maintenance</html>", "list": b"[1]", "flood": b"x" * 4096}.get(kind, b"{}")
        self.send_response(200)
        self.send_header("Content-Length", str(100 if kind == "trickle" else len(body)))
        self.end_headers()
        if kind != "trickle":
            self.wfile.write(body)
            return
        with contextlib.suppress(OSError):
            for _ in range(100):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.2)

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.parametrize(
    ("kind", "says"),
    [("page", "not JSON"), ("list", "the answer has no status"), ("trickle", "not whole in time"), ("flood", "over")],
)
def test_an_answer_phala_cloud_would_not_give_is_one_failed_call(
    kind: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy's HTML page, an answer of another shape, one sent a byte at a time (the client's timeout is per
    read) or one without end: each a ``PhalaError`` (what a watch counts as one failed look), not a traceback
    or a wait without end."""
    monkeypatch.setattr(phala_module, "ANSWER_S", 1.0)
    monkeypatch.setattr(phala_module, "MAX_ANSWER", 1024)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Awkward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cloud = PhalaCloud(api_key="k", base_url=f"http://127.0.0.1:{server.server_port}/api/v1")
    started = time.monotonic()
    try:
        with pytest.raises(PhalaError, match=says):
            cloud.state(kind)
        assert time.monotonic() - started < 5
    finally:
        cloud.close()
        server.shutdown()
        server.server_close()
