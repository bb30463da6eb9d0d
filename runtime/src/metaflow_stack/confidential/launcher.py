"""The launcher's side of a confidential task (``confidential step``, outside the TEE): the step's enclave
prepared once, the task ordered into it, and its evidence taken to the key keeper, whose answer releases
the run's data key or refuses it.

The enclave is the same for every task of a step with the same code and
settings, so it is prepared (rendered, checked, hashed, signed) once and
kept by its inputs' digest: every task and every run with that code reuses
it, and its MRENCLAVE stays what the policy pinned. Each task then gets an
exchange folder in the enclave's evidence folder: its order in, its
evidence out, its key envelope in.

The keeper (``keyring``) is the key-release service when
``STACK_KEY_RELEASE_URL`` names one, else this process with this machine's
master secret. Either way the evidence is judged as soon as it appears,
before the step's code runs:
- ``mode="sgx"``: the quote is verified against collateral, the policy and
  this attempt's binding; only then is the data key released to the
  enclave's key. A refusal stops the task before its code runs, so nothing
  it would produce is ever recorded.
- ``mode="direct"``: there is no quote. The task is recorded as
  unattested, and its data key released without attestation (development
  only, and never by a service that was not told ``--allow-direct``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from metaflow_stack import __version__
from metaflow_stack.confidential import KEEPER_KEY, gramine
from metaflow_stack.confidential.attest import AttestationRefused, TaskIdentity
from metaflow_stack.confidential.exchange import ENVELOPE, EVIDENCE, REFUSED, Exchange, Folder
from metaflow_stack.confidential.inputs import TRUST
from metaflow_stack.confidential.inside import EVIDENCE_ROOT, EXCHANGE, MODE, POLICY, TaskOrder
from metaflow_stack.confidential.keyring import (
    Keeper,
    KeeperUnavailable,
    ReleaseRequest,
    RemoteKeeper,
    local_keeper,
    policy_name,
    service_key,
)
from metaflow_stack.confidential.manifest import ManifestInputs, code_files, template_path
from metaflow_stack.confidential.policy import load_policy
from metaflow_stack.trampolines import die_with_parent, say, stopped_by_signals

#: What the enclave's fixed command runs.
ENTRY = "metaflow_stack.confidential.inside"
#: The host's variables a task's enclave starts with (fixed in its manifest, so in its measurement).
FORWARDED = ("USER", "USERNAME", "METAFLOW_USER", "LANG", "TZ")


@dataclass(frozen=True)
class Settings:
    """A confidential step's settings, from the decorator."""

    mode: str
    enclave_size: str
    threads: int
    #: The policy file an SGX enclave is held to (a key-release service holds it by the file's name).
    policy: str | None
    collateral: str | None
    pccs_url: str | None
    #: The enclave's product and version (SGX ISVPRODID, ISVSVN): what a policy's isv_prod_id and
    #: min_isv_svn hold it to.
    isv_prod_id: int = 0
    isv_svn: int = 0
    #: The packages the enclave may unpickle from inputs made outside a TEE (``inputs``).
    trust: tuple[str, ...] = ()


def enclave_env(code: str, settings: Settings, code_env: dict[str, str], keeper_key: str) -> dict[str, str]:
    """The environment fixed in a task's enclave (so in its measurement), its unpacked code at ``code``:
    the host's few ``FORWARDED`` names, the code package's variables, and whom the enclave trusts."""
    env = {name: os.environ[name] for name in FORWARDED if name in os.environ}
    env |= code_env | {"PYTHONPATH": f"{code}/.mf_code:{code}", "HOME": code, "PYTHONDONTWRITEBYTECODE": "1"}
    env["METAFLOW_INCLUDE_FOREACH_STACK"] = "0"  # foreach items are not copied into the task's metadata
    # Under --environment pypi|conda, Metaflow's environment decorators look for a local datastore from the
    # working folder (the code's, read-only) up, and make one there when none is found: the task's datastore
    # is named on its command line, so the enclave's /tmp will do.
    env["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = "/tmp"
    env[KEEPER_KEY] = keeper_key
    env[MODE], env[POLICY] = settings.mode, policy_name(settings.policy) if settings.policy else ""
    env[TRUST] = " ".join(settings.trust)
    return env


def interpreter_paths(skipped: tuple[str, ...]) -> list[str]:
    """What this interpreter reads (its ``sys.path`` folders but those under ``skipped``, its binary, a
    virtual environment's ``pyvenv.cfg``), for an enclave running this interpreter as it is installed."""
    python = sys.executable  # as run: a virtual environment's python finds its packages by this path
    paths = [p for p in sys.path if p and os.path.isdir(p) and not p.startswith(skipped)]
    return paths + [os.path.realpath(python)] + ([f"{sys.prefix}/pyvenv.cfg"] if sys.prefix != sys.base_prefix else [])


def enclave_inputs(
    code: Path, env: dict[str, str], evidence: str, datastore: str, settings: Settings, sys_path: list[str]
) -> ManifestInputs:
    """The manifest of a task's enclave running this interpreter on the unpacked ``code``: the task's
    fixed command, ``env``, the folders it exchanges evidence through and writes values to."""
    python = sys.executable
    return ManifestInputs(
        python=python,
        argv=[python, "-u", "-m", ENTRY],
        env=env | {EVIDENCE_ROOT: evidence},
        workdir=str(code),
        evidence=evidence,
        datastore=datastore,
        runtimedir=gramine.runtimedir(),
        sys_path=sys_path,
        trusted_dirs=[f"{p}/" if os.path.isdir(p) else p for p in sys_path],
        code=code_files(code),
        enclave_size=settings.enclave_size,
        isv_prod_id=settings.isv_prod_id,
        isv_svn=settings.isv_svn,
        max_threads=settings.threads,
        remote_attestation="dcap" if settings.mode == "sgx" else "none",
    )


def enclave(
    code: Path, datastore: str, settings: Settings, state_dir: Path, code_env: dict[str, str], keeper_key: str
) -> gramine.Prepared:
    """The step's enclave for the unpacked ``code``, prepared once per set of inputs and kept; it trusts
    envelopes signed by the keeper whose public key is ``keeper_key`` (fixed in its manifest, so measured)."""
    flow_dir = os.path.dirname(os.path.abspath(sys.argv[0]))  # the flow's own folder: its code is in ``code``
    sys_path = [p for p in interpreter_paths((str(code), datastore)) if p != flow_dir]
    env = enclave_env(str(code), settings, code_env, keeper_key)
    described = {"code": str(code), "python": sys.executable, "sys_path": sys_path, "env": env,
                 "datastore": datastore, "mode": settings.mode, "size": settings.enclave_size,
                 "threads": settings.threads, "template": template_path().read_text(), "runtime": __version__,
                 "isv": [settings.isv_prod_id, settings.isv_svn]}  # fmt: skip
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]
    folder = state_dir / "confidential" / "enclaves" / digest
    if (folder / "ready.json").is_file():
        found = json.loads((folder / "ready.json").read_text())
        return gramine.Prepared(folder, found["stem"], found["mr_enclave"])
    staging = folder.with_name(f".{digest}-{secrets.token_hex(4)}")
    staging.mkdir(parents=True)
    try:
        inputs = enclave_inputs(code, env, str(folder / "evidence"), datastore, settings, sys_path)
        key = gramine.signing_key(state_dir) if settings.mode == "sgx" else None
        prepared = gramine.prepare(inputs, staging, settings.mode, key)
        (staging / "ready.json").write_text(json.dumps({"stem": prepared.stem, "mr_enclave": prepared.mr_enclave}))
        try:
            staging.rename(folder)  # whole, or not there: tasks starting together see one enclave
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (folder / "evidence").mkdir(exist_ok=True)
    found = json.loads((folder / "ready.json").read_text())
    return gramine.Prepared(folder, found["stem"], found["mr_enclave"])


def keeper(state_dir: Path, settings: Settings, service_url: str) -> Keeper:
    """Who judges evidence and holds the keys: the key-release service at ``service_url``, else this process."""
    if service_url:
        return RemoteKeeper(service_url, service_key(service_url))
    policy = load_policy(settings.policy) if settings.policy else None
    return local_keeper(state_dir, policy, settings.policy, settings.collateral, settings.pccs_url)


class Judge:
    """The launcher's one decision on a task's evidence, taken as soon as the evidence is in the task's
    ``exchange``: ``keeper`` releases the data key (``record`` is told the verification, the envelope goes
    in) or refuses (the refusal goes in, and the task's exit code comes out)."""

    def __init__(self, exchange: Exchange, task: TaskOrder, settings: Settings, keeper: Keeper, record: Any) -> None:
        self.exchange, self.task, self.settings, self.keeper, self.record = exchange, task, settings, keeper, record
        self.judged = False

    def __call__(self) -> int | None:
        """None while there is no evidence yet, and once the key is released; the exit code when refused
        (Metaflow's "do not retry": a refusal is final), or 1 when the keeper did not answer (judged nothing)."""
        from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY

        if self.judged:
            return None
        found = self.exchange.get(EVIDENCE)
        if found is None:
            return None
        self.judged = True
        try:
            released = self.keeper.release(_request(self.task, _evidence(found), self.settings))
        except (AttestationRefused, KeeperUnavailable) as exc:
            self.exchange.put(REFUSED, str(exc).encode())
            say(exc, otherwise="see docs/confidential.md")
            return 1 if isinstance(exc, KeeperUnavailable) else METAFLOW_EXIT_DISALLOW_RETRY
        self.record(released.verification)
        self.exchange.put(ENVELOPE, bytes.fromhex(released.envelope))
        return None


def new_order(
    identity: TaskIdentity, command: str, env: dict[str, str], inputs: str, keeper: Keeper
) -> TaskOrder | None:
    """This attempt's order (``inputs``: its input records' digest, ``input_records.snapshot``), with the
    keeper's fresh nonce; None (said on stderr) when the keeper did not answer: nothing was judged, so the
    attempt may be retried (exit 1)."""
    try:
        nonce = keeper.nonce()
    except KeeperUnavailable as exc:
        say(exc)
        return None
    return TaskOrder(identity=identity, nonce=nonce, command=command, env=env, inputs=inputs)


class Started(Protocol):
    """A task's enclave once started, wherever it runs (``on_this_machine``, ``step_image.in_container``)."""

    def poll(self) -> int | None:
        """Its exit code once it ended; None while it runs."""
        ...

    def stop(self) -> None:
        """Stop it and all it started, if it still runs, and wait for that."""
        ...


class _Process:
    """The enclave as a process on this machine, in a session of its own, so it and all it starts stop
    with the launcher; the kernel kills it if the launcher is killed outright (SIGKILL: no way out runs)."""

    def __init__(self, args: list[str], folder: Path, exchange: str) -> None:
        self.process = subprocess.Popen(
            args, cwd=folder, env={**os.environ, EXCHANGE: exchange}, start_new_session=True,
            preexec_fn=die_with_parent,
        )  # fmt: skip

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # whatever the enclave left running in its session
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def on_this_machine(prepared: gramine.Prepared, mode: str) -> Callable[[str], Started]:
    """How a task is started in the prepared enclave with this machine's Gramine, given its exchange's name."""
    args = gramine.command(prepared, mode)
    return lambda exchange: _Process(args, prepared.folder, exchange)


def run_task(
    evidence: Path,
    start: Callable[[str], Started],
    identity: TaskIdentity,
    command: str,
    env: dict[str, str],
    inputs: str,
    settings: Settings,
    keeper: Keeper,
    record: Any,
) -> int:
    """Order ``command`` (reading ``inputs``, its input records' digest) into the enclave through a new
    exchange folder under ``evidence`` (the enclave's evidence folder), ``start`` the enclave, have its
    evidence judged (``Judge``), and wait: the task's exit code (Metaflow's "do not retry" when refused,
    or when it gave no evidence)."""
    from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY

    task = new_order(identity, command, env, inputs, keeper)
    if task is None:
        return 1
    name = f"{identity.run}-{identity.step}-{identity.task}-{identity.attempt}-{secrets.token_hex(4)}"
    folder = evidence / name
    folder.mkdir(mode=0o700)
    (folder / "task.json").write_text(task.model_dump_json())
    judge = Judge(Folder(folder), task, settings, keeper, record)
    running: Started | None = None
    try:
        with stopped_by_signals():  # before the start: a signal while it starts still stops what started
            running = start(name)
            while (code := running.poll()) is None:
                refused = judge()
                if refused is not None:
                    return refused
                time.sleep(0.05)
            if not judge.judged:  # it ended without evidence: nothing it did was attested
                print("error: the task ended without giving its evidence", file=sys.stderr, flush=True)
                return METAFLOW_EXIT_DISALLOW_RETRY
            return code
    finally:
        if running is not None:
            running.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _request(task: TaskOrder, evidence: dict[str, Any], settings: Settings) -> ReleaseRequest:
    """The release request for the enclave's ``evidence`` of ``task``: refused naming ``evidence`` when the
    enclave wrote something no enclave of ours would."""
    try:
        return ReleaseRequest(
            identity=task.identity, nonce=task.nonce, work=task.work(), mode=settings.mode,
            enclave_key=evidence.get("enclave_key"), quote=evidence.get("quote"), event_log=evidence.get("event_log"),
            app_compose=evidence.get("app_compose"), policy=policy_name(settings.policy) if settings.policy else None,
        )  # fmt: skip
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise AttestationRefused("evidence", f"{where} is not what an enclave gives") from None


def _evidence(data: bytes) -> dict[str, Any]:
    """The TEE's evidence, or why it cannot be read (the TEE wrote it: it is judged, not trusted)."""
    try:
        found = json.loads(data)
    except ValueError:
        raise AttestationRefused("evidence", "is not the JSON an enclave writes") from None
    if not isinstance(found, dict):
        raise AttestationRefused("evidence", "is not the JSON an enclave writes")
    return found
