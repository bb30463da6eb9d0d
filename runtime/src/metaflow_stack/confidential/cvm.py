"""The launcher's side of a confidential task on Phala Cloud (``backend="phala"``): the task as a dstack app
in an Intel TDX confidential VM, its evidence judged before its code runs, its end read, the VM deleted.

**The step's app.** Every task of a step with the same code and settings
gets the same compose (``app_for``), so its digest is what a policy's
``[tdx] docker_compose`` pins, as MRENCLAVE is for an SGX enclave: the
keeper reads it from the app compose Phala builds around it, whose hash
the CVM's event log records in RTMR3 (or the policy pins that whole app
compose's hash, ``compose_hash``). The compose fixes the image (by digest),
the command (Metaflow's own: log capture, the code package fetched from the
datastore and checked against the digest the compose fixes before anything
of it is unpacked, the step's bootstrap, then the TEE's entry ``inside``),
the step, its ``@environment``, the keeper's public key, the mode and
policy, the trust list and the code package's digest. What differs per
task, and the run's secrets, reach the CVM as variables encrypted to it
(``phala``): the order (whose digest the quote binds) and the attempt, and
Metaflow's settings with the datastore's credentials as one variable, which
the CVM exports first, refusing any name but Metaflow's and AWS's
(``inside.settings_exports``). So the compose names the same variables
whatever this machine's environment holds.

**One attempt** (``run``): the keeper's nonce, provision and commit (the
variable key checked against the pinned KMS first), then, until the task
says it ended: its evidence is judged as soon as it is in the exchange
(the run's datastore: a CVM shares nothing else with this machine), the
CVM's state is watched, and a CVM that never gives evidence is given up
after ``BOOT_S``. The CVM is deleted however the attempt ends, Ctrl-C
included; one whose launcher was killed outright is deleted by the next
run's start (``ledger``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any

from metaflow_stack.confidential import KEEPER_KEY
from metaflow_stack.confidential.cvm_variables import ATTEMPT, END_KEY, ORDER, SETTINGS
from metaflow_stack.confidential.exchange import ENDED, Exchange
from metaflow_stack.confidential.inputs import TRUST
from metaflow_stack.confidential.inside import CREDENTIALS, MODE, POLICY, STEP, TaskOrder, end_mac, is_setting
from metaflow_stack.confidential.keyring import policy_name
from metaflow_stack.confidential.ledger import Ledger
from metaflow_stack.confidential.phala import APP_PREFIX, PhalaCloud, PhalaError, compose_for
from metaflow_stack.elsewhere import Launcher, task_command
from metaflow_stack.errors import StackError
from metaflow_stack.trampolines import stopped_by_signals, undone_if_killed, uninterrupted

#: Where the CVM's task works and keeps its logs.
WORKDIR, LOGS = "/tmp/metaflow-task", "/tmp/metaflow-logs"
#: What the CVM runs of the image, isolated (``-I``: never a module of the working folder, which holds the
#: fetched package, or of a path a variable names): its settings exported first, the TEE's entry, and after
#: the task ($c: its exit code) its end said.
SETTINGS_FIRST = 'settings="$(python -I -m metaflow_stack.confidential.inside --settings)" && eval "$settings"'
ENTRY = "python -I -u -m metaflow_stack.confidential.inside"
AFTER = "python -I -m metaflow_stack.confidential.inside --ended $c"
#: Run on the fetched package before it is unpacked: its SHA-1 (Metaflow's digest of a package) must be the
#: one the compose fixes, else nothing of it runs (the task's chain stops, and the CVM says it ended).
CHECK_PACKAGE = (
    'echo \\"$METAFLOW_CODE_SHA  job.tar\\" | sha1sum --check --status - '
    "|| { mflog 'The fetched code package is not the one the compose fixes: it is not unpacked.'; false; }"
)
#: Seconds a CVM has to boot, pull its image and give its evidence.
BOOT_S = 1800
#: Seconds between looks at the CVM's state, and at the exchange.
STATE_EVERY_S, EXCHANGE_EVERY_S = 10.0, 1.0
#: Looks at a CVM's state that may fail in a row before the attempt is given up.
STATE_TRIES = 6
#: CVM statuses that mean it stopped.
STOPPED = frozenset({"stopped", "exited", "error", "failed", "terminated", "deleted"})


@dataclass(frozen=True)
class App:
    """A task's dstack app: the step's compose and the variables encrypted to the task's CVM."""

    name: str
    compose: str
    encrypted: dict[str, str]

    @property
    def docker_compose(self) -> str:
        """The compose's SHA-256: what a policy's ``docker_compose`` pins, as the CVM's app compose holds it."""
        return hashlib.sha256(self.compose.encode()).hexdigest()


def app_for(
    image: str,
    environment: Any,
    datastore: tuple[str, str],
    package: tuple[str, str, str],
    variables: dict[str, str],
    step_environment: dict[str, str],
    task: TaskOrder,
    measured: dict[str, str],
) -> App:
    """The app of ``task`` (see the module's docstring): ``measured`` (the keeper's key, the mode, the policy,
    the trust list), the step, its ``step_environment`` and the code package (``package``: metadata, sha,
    URL) fixed in the compose with the step's command; ``variables``' Metaflow settings with this machine's
    datastore credentials, the attempt and the order encrypted."""
    if "@sha256:" not in image:
        raise StackError(f"image {image} is not named by its digest", fix="image='registry/name@sha256:...'")
    metadata, sha, url = package
    identity = task.identity
    ids = {"flow": identity.flow, "step": identity.step} | {key: f"${{{name}}}" for key, name in ATTEMPT.items()}
    command = task_command(
        environment, datastore, ids, (metadata, url), ENTRY, workdir=WORKDIR, logs=LOGS, after=AFTER,
        before_extracting=CHECK_PACKAGE,
    )  # fmt: skip
    command[-1] = f"{SETTINGS_FIRST} && {command[-1]}"  # (``bash -c SCRIPT``: the settings before all of it)
    fixed = (
        step_environment
        | measured
        | {
            STEP: identity.step,
            "METAFLOW_CODE_METADATA": metadata,
            "METAFLOW_CODE_SHA": sha,
            "METAFLOW_CODE_URL": url,
            "METAFLOW_CODE_DS": datastore[0],
            "METAFLOW_SKIP_INSTALL_DEPENDENCIES": "1",  # the image has what fetching the package needs
        }
    )
    settings = {key: value for key, value in variables.items() if is_setting(key) and key not in fixed}
    settings |= {name: os.environ[name] for name in CREDENTIALS if os.environ.get(name)}
    encrypted = {SETTINGS: json.dumps(settings, sort_keys=True), ORDER: task.model_dump_json()}
    encrypted |= {ATTEMPT["run_id"]: identity.run, ATTEMPT["task_id"]: identity.task}
    encrypted[ATTEMPT["attempt"]] = str(identity.attempt)
    encrypted[END_KEY] = secrets.token_hex(32)
    return App(app_name(identity.flow, identity.step), compose_for(image, command, sorted(encrypted), fixed), encrypted)


def stack_image() -> str:
    """The stack's ``confidential`` image where Phala Cloud's hosts pull it: pushed to the configured registry
    (``METAFLOW_STACK_REGISTRY``) and named by its digest, so the compose (and the hash a policy pins) names
    its content, which a later push to the tag cannot change; without a registry, refused naming the fix."""
    from metaflow_stack import images, settings
    from metaflow_stack.errors import StackError

    if not settings.load().registry:
        raise StackError(
            "a Phala CVM pulls its image from a registry, and none is configured",
            fix="export METAFLOW_STACK_REGISTRY=<a registry Phala Cloud reaches>, or give image=",
        )
    return images.push_reference(images.resolve("confidential"), by_digest=True)


def measured_variables(keeper_key: str, policy: str, trust: tuple[str, ...]) -> dict[str, str]:
    """What a CVM's compose fixes of the TEE's trust, as an enclave's manifest does: the keeper whose envelopes
    it opens, its mode and policy (the only scope of key it takes), and what it may unpickle."""
    return {KEEPER_KEY: keeper_key, MODE: "tdx", POLICY: policy_name(policy), TRUST: " ".join(trust)}


def app_name(flow: str, step: str) -> str:
    """A step's app name (the same for all its tasks: it is in the app's compose, so in its hash)."""
    return _phala_name(f"mf-{flow}-{step}")[:63].rstrip("-")


def cvm_name(flow: str, run: str, step: str, task: str, attempt: int) -> str:
    """A CVM's name for the attempt (Phala's: 5 to 63 lowercase letters, digits and hyphens, a letter first):
    the step's, then the run's digest, the task and the attempt, which a long flow or step name never cuts."""
    tail = _phala_name(f"-{hashlib.sha256(run.encode()).hexdigest()[:8]}-{task}-{attempt}")[-40:]
    return app_name(flow, step)[: 63 - len(tail)].rstrip("-") + tail


def _phala_name(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower())


def run(
    cloud: PhalaCloud,
    name: str,
    instance_type: str,
    app: App,
    exchange: Exchange,
    judge: Any,
    record: Any,
    ledger: Ledger,
    run_time_limit_s: int,
    logs: tuple[Any, Any] | None = None,
) -> int:
    """Provision and commit ``app`` as the CVM ``name`` (of Phala's ``instance_type``), have its evidence
    judged (``judge``, a ``launcher.Judge``), and wait until its task says it ended, its output shown as it
    is saved (``logs``: Metaflow's tailers of the attempt's stdout and stderr in the datastore): the task's
    exit code; Metaflow's "do not retry" when refused or when it ended without evidence; 1 when it stopped,
    gave no evidence in ``BOOT_S`` (nothing was judged: it may be retried), or ran on past ``BOOT_S`` and
    the step's ``run_time_limit_s`` (``@timeout``'s, as a pod's deadline). ``record`` is told the app
    and CVM. The CVM is deleted however this ends; while it runs, ``ledger`` notes it, so that the next
    run's start deletes it if this process is killed outright, unless the child this process forks first
    (``trampolines.undone_if_killed``) has deleted it then."""
    from metaflow.mflog import tail_logs

    cvm = app_id = ""
    me = Launcher.this().label
    # The child is in place from before the CVM is made until after this process's own delete: a SIGTERM while
    # it runs is a Ctrl-C (the CVM deleted below), a SIGKILL, even during that delete, leaves it to the child.
    with stopped_by_signals(), undone_if_killed(lambda: _delete_left(cloud, ledger, me)):
        try:
            provisioned = cloud.provision(name, app.compose, sorted(app.encrypted), instance_type, app.name)
            key, app_id = cloud.checked_env_key(provisioned), provisioned.app_id
            cvm = cloud.by_app(app_id)  # noted before the commit: a launcher may die while it is sent
            ledger.launched(cloud.base, app_id, cvm, name)
            cvm = cloud.commit(provisioned, app.encrypted, key)
            ledger.launched(cloud.base, app_id, cvm, name)
            _say(f"{name}: CVM {cvm} started on Phala Cloud: app {app_id}, docker compose "
                 f"{app.docker_compose} (what a policy's docker_compose pins), compose hash "
                 f"{provisioned.compose_hash} (as Phala reports it); {BOOT_S} s to boot, {run_time_limit_s} s to "
                 "run")  # fmt: skip
            record({"app_id": app_id, "compose_hash": provisioned.compose_hash, "cvm": cvm})
            watch = _Watch(cloud, cvm, exchange, judge, app.encrypted[END_KEY], BOOT_S + run_time_limit_s)
            if logs is None:
                while watch():
                    time.sleep(EXCHANGE_EVERY_S)
            else:
                tail_logs(prefix=f"[{name}] ".encode(), stdout_tail=logs[0], stderr_tail=logs[1], echo=_echo,
                          has_log_updates=watch)  # fmt: skip
            return watch.code
        finally:
            if cvm:
                with uninterrupted():
                    try:
                        found = cloud.delete(cvm, missing_ok=True)
                    except PhalaError as exc:  # the attempt's end is what matters; the note stays for the next run
                        _say(f"could not delete CVM {cvm} ({exc.message}): the next run's start tries again, or delete "
                             "it in Phala Cloud's dashboard")  # fmt: skip
                    else:
                        # A commit that did not answer may still be making the CVM its app has none of yet: its note
                        # stays for the next run's start, which looks again.
                        if found or not cvm.startswith(APP_PREFIX):
                            ledger.deleted(cloud.base, app_id)


def _delete_left(cloud: PhalaCloud, ledger: Ledger, launcher: str) -> None:
    """In the child of a launcher killed outright: its committed CVM deleted, on a client of the child's own."""
    own = cloud.again()
    try:
        ledger.left_by(own, launcher)
    finally:
        own.close()


class _Watch:
    """One look at a running CVM (called until it says False, then ``code`` is the attempt's): its evidence
    judged, its end read from the exchange, its state asked of Phala every ``STATE_EVERY_S``, a boot without
    evidence given up after ``BOOT_S``, and the CVM after ``deadline_s`` whatever it does."""

    def __init__(
        self, cloud: PhalaCloud, cvm: str, exchange: Exchange, judge: Any, end_key: str, deadline_s: float
    ) -> None:
        self.cloud, self.cvm, self.exchange, self.judge, self.end_key = cloud, cvm, exchange, judge, end_key
        self.forged: bytes | None = None
        now = time.monotonic()
        self.boot_deadline, self.deadline_s, self.deadline = now + BOOT_S, deadline_s, now + deadline_s
        self.next_look, self.code, self.unanswered = 0.0, 1, 0

    def __call__(self) -> bool:
        from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY

        refused = self.judge()
        if refused is not None:
            self.code = refused
            return False
        ended = self.exchange.get(ENDED)
        code = None if ended is None else end_code(ended, self.end_key)
        if ended is not None and code is None and ended != self.forged:  # (the CVM's own end overwrites it)
            _say(f"warning: an end of CVM {self.cvm}'s task that the CVM did not write is ignored (its MAC fails)")
            self.forged = ended
        if code is not None:
            if self.judge.judged:
                self.code = code
            else:
                _say("error: the task ended without giving its evidence")
                self.code = METAFLOW_EXIT_DISALLOW_RETRY
            return False
        if time.monotonic() > self.deadline:
            _say(f"error: CVM {self.cvm} ran past its {self.deadline_s:.0f} s (its boot and the step's time limit)")
            return False
        if not self.judge.judged and time.monotonic() > self.boot_deadline:
            _say(f"error: CVM {self.cvm} gave no evidence in {BOOT_S} s (see its logs in Phala Cloud's dashboard)")
            return False
        if time.monotonic() >= self.next_look:
            self.next_look = time.monotonic() + STATE_EVERY_S
            try:
                status, self.unanswered = self.cloud.state(self.cvm), 0
            except PhalaError as exc:  # one failed look is not the CVM's end; a minute of them is
                self.unanswered += 1
                if self.unanswered < STATE_TRIES:
                    return True
                _say(f"error: Phala Cloud did not say how CVM {self.cvm} is, {STATE_TRIES} times: {exc.message}")
                return False
            if status in STOPPED:
                _say(f"error: CVM {self.cvm} is {status} before its task said it ended")
                return False
        return True


def end_code(ended: bytes, end_key: str) -> int | None:
    """The task's exit code as its CVM said it (``inside.ended``); None for an end the CVM did not write (one
    that does not read, or whose MAC under the attempt's ``end_key`` fails)."""
    try:
        said = json.loads(ended)
        code, mac = said["code"], said["mac"]
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= 255):
        return None
    if not (isinstance(mac, str) and re.fullmatch(r"[0-9a-f]{64}", mac)):
        return None
    return code if hmac.compare_digest(end_mac(end_key, code), mac) else None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _echo(line: str, stream: str, **_: Any) -> None:
    print(line, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)
