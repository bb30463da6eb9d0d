"""What runs inside a confidential task's TEE: the enclave's fixed entry point, its evidence, its data key.

The manifest's command is the same for every task of a step (so is the
enclave's measurement, which a policy can then pin):
``python -m metaflow_stack.confidential.inside``. The task it runs is read
from ``task.json`` in the task's exchange folder (``EXCHANGE`` names it,
the one value the host chooses), or in a Phala CVM from the variable
``ORDER`` (encrypted to the CVM); the quote binds what it says: a host that
lies there gets a quote its own verifier refuses. A CVM's app (its compose,
which its quote's event log names) fixes the step and the code package's
digest; the CVM's command checks the package it fetched against that digest
before unpacking anything of it (``cvm``).

In the task, the decorator's ``task_pre_step`` calls ``receive``:
the enclave's key pair is made, the binding of this attempt and that key
becomes the quote's ``report_data`` (read from Gramine's
``/dev/attestation``, or in a TDX VM from dstack with its event log;
``gramine-direct`` has none, and says so), the evidence is put in the
task's exchange (``exchange``: a folder, or the datastore for a CVM) for the
launcher, and the launcher's envelope is awaited and opened: the run's data
key, in enclave memory only.
After the step, its artifacts are ``sealed`` with it; a later confidential
step reads an upstream one with ``unsealed``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from metaflow_stack.confidential import KEEPER_KEY
from metaflow_stack.confidential.attest import TaskIdentity, binding
from metaflow_stack.confidential.cvm_variables import END_KEY, ORDER, SETTINGS
from metaflow_stack.confidential.exchange import (
    ENDED,
    ENVELOPE,
    EVIDENCE,
    REFUSED,
    Exchange,
    Folder,
    InDatastore,
    prefix_of,
    storage_for,
)
from metaflow_stack.confidential.keyrelease import EnclaveKey
from metaflow_stack.confidential.seal import Sealed, SealedError, seal

#: The variable naming the task's exchange folder (under the enclave's evidence folder).
EXCHANGE = "METAFLOW_STACK_CONFIDENTIAL_TASK"
#: Where the manifest's evidence folder is, fixed in the manifest.
EVIDENCE_ROOT = "METAFLOW_STACK_CONFIDENTIAL_EVIDENCE"
#: The enclave's mode and policy name, fixed in the manifest: the only scope of key it takes.
MODE = "METAFLOW_STACK_CONFIDENTIAL_MODE"
POLICY = "METAFLOW_STACK_CONFIDENTIAL_POLICY"
#: Gramine's attestation pseudo-files (gramine-sgx only).
REPORT_DATA = Path("/dev/attestation/user_report_data")
QUOTE = Path("/dev/attestation/quote")
#: Seconds the enclave waits for its data key before the task fails.
KEY_WAIT_S = 120
#: A CVM's step, fixed in its compose: it runs a task of that step only.
STEP = "METAFLOW_STACK_CONFIDENTIAL_STEP"
#: The names a CVM's settings (``cvm_variables.SETTINGS``) may have: Metaflow's settings and AWS's credentials,
#: never a variable that changes what code runs or what the compose fixes (``settings_exports``).
SETTING_NAME = re.compile(r"METAFLOW_[A-Z0-9_]{1,200}")
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")
#: Metaflow's settings a CVM never takes from the launcher: the stack's own (what the compose fixes), the code
#: package's, and those that choose which code or configuration Metaflow loads.
_NEVER_SET = re.compile(
    r"METAFLOW_(STACK_|CODE_|EXTENSIONS|DEBUG_EXTENSION|HOME$|PROFILE$|SKIP_INSTALL_DEPENDENCIES$|DEFAULT_ENVIRONMENT$)"
)


def is_setting(name: str) -> bool:
    """Whether ``name`` may come to a CVM in its encrypted settings (``SETTINGS``)."""
    return name in CREDENTIALS or (SETTING_NAME.fullmatch(name) is not None and not _NEVER_SET.match(name))


_INPUT_PATHS = re.compile(r"\$\{(METAFLOW_INPUT_PATHS_\d+)\}")


#: The only variables an order may set: the input paths too long for a command line (``trampolines``).
_ORDER_ENV = re.compile(r"^METAFLOW_INPUT_PATHS_\d+$")


class TaskOrder(BaseModel):
    """What the launcher asks the enclave to run (``task.json``); its ``work`` digest is in the quote."""

    identity: TaskIdentity
    nonce: str = Field(pattern=r"^[0-9a-f]{64}$")
    command: str = Field(max_length=1_000_000)
    env: dict[str, str]
    #: The digest of the task's input records as the launcher found them (``input_records.snapshot``).
    inputs: str = Field("", pattern=r"^([0-9a-f]{64})?$")

    def work(self) -> str:
        """The digest of what the task runs: its command, variables and inputs' records, canonically."""
        work = {"command": self.command, "env": self.env, "inputs": self.inputs}
        return hashlib.sha256(json.dumps(work, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def input_paths(self) -> list[str]:
        """The input paths the task's command names (its long ones from the order's variables)."""
        from metaflow.util import decompress_list

        words = [_INPUT_PATHS.sub(lambda m: self.env.get(m[1], ""), word) for word in shlex.split(self.command)]
        paths = words[words.index("--input-paths") + 1] if "--input-paths" in words else ""
        return decompress_list(paths) if paths else []


def exchange_folder() -> Path:
    """The task's exchange folder: one path segment under the manifest's evidence folder."""
    name = os.environ.get(EXCHANGE, "")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", name) or name in (".", ".."):
        raise SealedError(f"{EXCHANGE}={name!r} is not a task's exchange folder")
    return Path(os.environ[EVIDENCE_ROOT]) / name


def read_order() -> TaskOrder:
    """The order (a Gramine enclave's in its exchange folder, a CVM's in ``ORDER``), checked: only input-path
    variables, and the code the TEE was measured with (its manifest or compose fixes ``METAFLOW_CODE_SHA``);
    anything else is refused before it runs."""
    if os.environ.get(EXCHANGE):
        text = (exchange_folder() / "task.json").read_text()
    elif os.environ.get(ORDER):
        text = os.environ[ORDER]
    else:
        raise SealedError(f"no order: neither {EXCHANGE} nor {ORDER} is set")
    task = TaskOrder.model_validate_json(text)
    unexpected = sorted(name for name in task.env if not _ORDER_ENV.match(name))
    if unexpected:
        raise SealedError(f"the order sets {unexpected[0]}: an order may set only input paths")
    if task.identity.code_digest != os.environ.get("METAFLOW_CODE_SHA"):
        raise SealedError("the order names other code than the enclave was measured with")
    if os.environ.get(STEP) and task.identity.step != os.environ[STEP]:
        raise SealedError(f"the order names step {task.identity.step}, and this CVM runs {os.environ[STEP]}")
    return task


def order() -> TaskOrder:
    """The order this task was started with (read once by the entry point, handed over in memory)."""
    return TaskOrder.model_validate_json(os.environ[ORDER])


#: The options a task's command may carry: Metaflow's top-level ones and ``step``'s (``CLIArgs``).
_OPTIONS = frozenset(
    {"--quiet", "--metadata", "--environment", "--datastore", "--datastore-root", "--event-logger", "--monitor",
     "--with", "--package-suffixes", "--pylint", "--no-pylint", "--config-value", "--run-id", "--task-id",
     "--input-paths", "--split-index", "--retry-count", "--max-user-code-retries", "--tag", "--namespace",
     "--clone-path", "--clone-run-id", "--ubf-context"}
)  # fmt: skip


def argv(task: TaskOrder) -> list[str]:
    """The step's command as the launcher built it (for a shell), split, with its long input paths put back,
    and held to what a task of this step is: the flow file of the measured code, Metaflow's own options,
    ``step`` this step, and the run, task and attempt the quote names. Anything else (``-c``, ``-m``, another
    file or step) is refused: the enclave runs a step of its code, never what the host wrote."""
    words = [_INPUT_PATHS.sub(lambda m: task.env.get(m[1], ""), word) for word in shlex.split(task.command)]
    identity = task.identity
    flow_file = words[0] if words else ""
    if "/" in flow_file or not flow_file.endswith(".py") or not Path(flow_file).is_file():
        raise SealedError(f"the order runs {flow_file!r}, not the flow file of the enclave's code")
    if "step" not in words or words[words.index("step") + 1 : words.index("step") + 2] != [identity.step]:
        raise SealedError(f"the order runs another step than {identity.step}")
    values = {}
    for index, word in enumerate(words[1:], start=1):
        if word.startswith("-"):
            if word.split("=")[0] not in _OPTIONS:
                raise SealedError(f"the order passes {word.split('=')[0]}, which a task's command does not take")
            values[word] = words[index + 1] if index + 1 < len(words) else ""
    wanted = {"--run-id": identity.run, "--task-id": identity.task, "--retry-count": str(identity.attempt)}
    for option, value in wanted.items():
        if values.get(option) != value:
            raise SealedError(f"the order's {option} is not the {value} its quote names")
    return words


def evidence_for(report_data: bytes) -> dict[str, str | None]:
    """The TEE's quote over ``report_data`` (hex), from Gramine's ``/dev/attestation`` in an SGX enclave or from
    dstack in a TDX VM (with its event log, which names the app by its compose's hash, and the app compose
    that hash is of, which the guest agent's ``Info`` gives); none where there is no attestation
    (``gramine-direct``)."""
    if QUOTE.exists():
        REPORT_DATA.write_bytes(report_data)
        return {"quote": QUOTE.read_bytes().hex(), "event_log": None}
    if os.environ.get(MODE) != "tdx":
        return {"quote": None, "event_log": None}
    from dstack_sdk import DstackClient

    agent = DstackClient()
    try:
        answer = agent.get_quote(report_data)
    except Exception as exc:  # the guest agent's socket is missing, or it refused: there is no evidence
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SealedError(f"dstack gave no quote: {why}") from None
    try:
        app_compose = agent.info().tcb_info.app_compose
    except Exception:  # an older guest agent: only a policy that pins docker_compose needs it, and says so
        app_compose = None
    return {"quote": answer.quote, "event_log": answer.event_log, "app_compose": app_compose}


def exchange(task: TaskOrder) -> Exchange:
    """Where this task meets its launcher: a Gramine enclave's exchange folder, or a CVM's prefix in the run's
    datastore (the root its order's command names)."""
    if os.environ.get(EXCHANGE):
        return Folder(exchange_folder())
    words = shlex.split(task.command)  # (not ``argv``: a CVM may say it ended before its code is unpacked)
    kind = os.environ.get("METAFLOW_CODE_DS", "s3")
    root = words[words.index("--datastore-root") + 1] if "--datastore-root" in words else None
    identity = task.identity
    where = prefix_of(identity.flow, identity.run, identity.step, identity.task, identity.attempt, task.nonce)
    return InDatastore(storage_for(kind, root), where)


#: The run's data key, once received: in this (enclave) process's memory only.
_data_key: bytes | None = None


def receive() -> None:
    """Write this attempt's evidence for the launcher, then wait for and keep the run's data key."""
    global _data_key
    _data_key = _attest_and_receive()


def sealed(value: bytes, where: str) -> Sealed:
    """``value`` (a pickle) sealed with the run's data key, at ``where``."""
    if _data_key is None:
        raise SealedError(f"{where}: no data key was received, so nothing can be sealed")
    return Sealed(seal(value, _data_key, where), where)


def unsealed(flow: Any, name: str) -> Any:
    """The artifact ``name`` of ``flow`` (a step's ``self``, or one of a join's ``inputs``), sealed by an
    upstream confidential step of this run, opened with the run's data key; ``SealedError`` when it is not
    sealed (a value the host could have written), was sealed for another run or artifact, or by another task
    of the step it is read from (a sibling's value moved there). In a resumed run, a value sealed by an
    earlier run of its chain (cloned by ``resume``) opens too, under the chain's key (``lineage``); a value
    of any other run does not open under it."""
    from metaflow import current

    value = getattr(flow, name)
    if not isinstance(value, Sealed):
        raise SealedError(f"{name} is not sealed: a confidential step reads only values sealed in its run")
    parts = value.where.split("/")
    resumed = order().identity.lineage is not None  # a value cloned from an earlier run of its chain is its own
    if len(parts) != 5 or (parts[0], parts[4]) != (current.flow_name, name):
        raise SealedError(f"{name} was sealed as {value.where}, not as this run's {name}")
    if parts[1] != str(current.run_id) and not resumed:
        raise SealedError(f"{name} was sealed in run {parts[1]}, not in this run {current.run_id}")
    sources = _sources(flow) if parts[1] == str(current.run_id) else set()
    if parts[2] in {step for step, _ in sources} and (parts[2], parts[3]) not in sources:
        read_from = ", ".join(f"{step}/{task}" for step, task in sorted(sources))
        raise SealedError(f"{name} was sealed by {parts[2]}/{parts[3]}, and is read from {read_from}")
    return pickle.loads(value.open(_data_key))


def _sources(flow: Any) -> set[tuple[str, str]]:
    """The tasks (step, task id) a value of ``flow`` is read from: a join's input is its own task; a step's
    ``self`` reads its parents, the input paths its order names. A value sealed further upstream (passed
    through a step in between) is checked for its run and name only."""
    from metaflow import current

    store = getattr(flow, "_datastore", None)
    if store is not None and (store.step_name, str(store.task_id)) != (current.step_name, str(current.task_id)):
        return {(store.step_name, str(store.task_id))}
    return {tuple(path.split("/")[1:3]) for path in order().input_paths()}


def _attest_and_receive() -> bytes:
    """This attempt's evidence written for the launcher, and the data key it releases once it accepts it
    (the key that seals this step's values and opens its inputs')."""
    from metaflow import current

    task = order()
    if current.flow_name != task.identity.flow:  # a policy may admit several flows' enclaves: keys are per flow
        raise SealedError(f"the order names flow {task.identity.flow}, and this task is of {current.flow_name}")
    if (task.identity.lineage is None) != (current.origin_run_id is None):  # a resume's key only for a resume
        lineage, origin = task.identity.lineage, current.origin_run_id
        raise SealedError(f"the order names lineage {lineage}, and this task resumes {origin}")
    meeting = exchange(task)
    key = EnclaveKey()
    bound = binding(task.identity, task.nonce, key.public, task.work())
    meeting.put(EVIDENCE, json.dumps({"enclave_key": key.public, **evidence_for(bound)}).encode())
    deadline, every = time.monotonic() + KEY_WAIT_S, 0.05 if isinstance(meeting, Folder) else 1.0
    while (envelope := meeting.get(ENVELOPE)) is None:
        refused = meeting.get(REFUSED)
        if refused is not None:
            raise SealedError(f"no data key: {refused.decode(errors='replace').strip()}")
        if time.monotonic() > deadline:
            raise SealedError(f"no data key after {KEY_WAIT_S} s: the launcher did not answer the evidence")
        time.sleep(every)
    return key.open(envelope, bound, os.environ[KEEPER_KEY], accepts_scope)


def accepts_scope(scope: str) -> bool:
    """Whether this enclave takes a key of ``scope``: ``direct`` in direct mode; in SGX mode, only a key of
    the policy it was measured with (``sgx:<policy>@<digest>``), never the direct one."""
    mode = os.environ.get(MODE)
    if mode == "direct":
        return scope == "direct"
    return mode in ("sgx", "tdx") and bool(os.environ.get(POLICY)) and scope.startswith(f"{mode}:{os.environ[POLICY]}@")


def ended(code: int) -> None:
    """In a CVM, after its task: how it ended, put in the exchange for the launcher (a CVM runs on after its
    container ends, so its launcher learns the end from the datastore), authenticated with ``END_KEY``."""
    task = read_order()
    exchange(task).put(ENDED, json.dumps({"code": code, "mac": end_mac(os.environ[END_KEY], code)}).encode())


def end_mac(key: str, code: int) -> str:
    """What authenticates a CVM's end ``code`` under the attempt's ``END_KEY`` (hex)."""
    return hmac.new(bytes.fromhex(key), f"ended {code}".encode(), hashlib.sha256).hexdigest()


def settings_exports() -> str:
    """In a CVM, before anything else: its Metaflow settings and datastore credentials (``SETTINGS``) as bash
    ``export`` lines, each quoted; only names ``is_setting`` allows and the compose does not fix (a
    ``PYTHONPATH``, a ``METAFLOW_CODE_SHA`` or an ``AWS_CONFIG_FILE`` from the launcher is refused, and the
    task does not start)."""
    found = json.loads(os.environ.get(SETTINGS) or "{}")
    if not isinstance(found, dict):
        raise SealedError(f"{SETTINGS} is not an object of variables")
    refused = sorted(k for k, v in found.items() if not (is_setting(k) and isinstance(v, str)) or k in os.environ)
    if refused:  # (a name the compose fixes is in this environment already: the launcher never overrides it)
        raise SealedError(f"{SETTINGS} sets {refused[0]}: only Metaflow's settings and AWS's credentials may be set")
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in found.items())


def main() -> None:
    """The TEE's entry point: run the task the order names, with its input paths, handing the order as read
    to the task (which binds it into its quote), never reading the host's file again. In a CVM, ``--settings``
    first prints its settings as exports, and ``--ended CODE`` after the task says how it ended."""
    if sys.argv[1:2] == ["--settings"]:
        print(settings_exports())
        return
    if sys.argv[1:2] == ["--ended"]:
        ended(int(sys.argv[2]))
        return
    task = read_order()
    os.environ.update(task.env)
    os.environ.pop(END_KEY, None)  # (a CVM's: not handed down; the step decides its own exit code anyway)
    os.environ[ORDER] = task.model_dump_json()
    command = argv(task)
    os.execv(sys.executable, [sys.executable, "-u", *command])


if __name__ == "__main__":
    main()
