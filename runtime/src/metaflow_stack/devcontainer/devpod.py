"""One task's step in a DevPod workspace: ``devpod up`` on a folder holding the step's
devcontainer.json and its code, ``devpod ssh --command`` to run the step (its output is the
task's, its exit status the task's), ``devpod delete`` whatever happens: also when the trampoline
is killed outright (SIGKILL, what Metaflow's runtime does to the tasks still running when another
fails the run), by a child it forked first (``trampolines.undone_if_killed``), the DevPod commands
it was waiting on stopped with it.

DevPod's provider decides where the workspace runs (this machine's Docker, a Kubernetes cluster, a
cloud VM), so the step reaches its datastore and metadata over the network: an S3 datastore and the
metadata service. The provider also makes the container, so the sandbox policy of the local
backend does not apply there. Each task gets its own workspace, so attempts never share state;
``devpod up`` costs seconds to minutes, which suits long steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from metaflow_stack.errors import StackError, ToolMissingError
from metaflow_stack.trampolines import die_with_parent, stopped_by_signals, undone_if_killed, uninterrupted

INSTALL_FIX = "install the DevPod CLI (https://devpod.sh/docs/getting-started/install) and add a provider"
#: The longest workspace id DevPod accepts.
_MAX_ID = 48


def binary() -> str:
    """The DevPod CLI: the ``STACK_DEVPOD_CLI`` setting, else ``devpod`` on PATH."""
    from metaflow.metaflow_config_funcs import from_conf

    found = from_conf("STACK_DEVPOD_CLI", "") or shutil.which("devpod")
    if not found:
        raise ToolMissingError("@devcontainer(backend='devpod') needs the DevPod CLI (not on PATH)", INSTALL_FIX)
    return found


def workspace_id(pathspec: str, attempt: int) -> str:
    """A DevPod workspace id for one attempt of one task: short, lowercase, unique."""
    digest = hashlib.sha256(f"{pathspec}/{attempt}".encode()).hexdigest()[:16]
    return f"mf-{digest}"[:_MAX_ID]


def stage(code: Path, config_dir: Path | None, image: str | None, into: Path) -> Path:
    """The workspace's source folder: the code package's files and ``.devcontainer/`` (the step's
    configuration folder, or one naming ``image``)."""
    shutil.copytree(code, into, symlinks=True)
    target = into / ".devcontainer"
    if config_dir is not None:
        shutil.copytree(config_dir, target, dirs_exist_ok=True)
    else:
        target.mkdir(exist_ok=True)
        (target / "devcontainer.json").write_text(json.dumps({"image": image}))
    return into


def run_step(
    step_cli: str,
    code: Path,
    env: dict[str, str],
    pathspec: str,
    attempt: int,
    *,
    config: Path | None,
    image: str | None,
    provider: str | None,
) -> int:
    """Run ``step_cli`` (the interpreter's arguments, relative to the code's folder) in a new DevPod
    workspace; its exit status. The workspace is deleted on exit, failure, SIGTERM/SIGINT and SIGKILL."""
    devpod = binary()
    ident = workspace_id(pathspec, attempt)
    global_flags = ["--provider", provider] if provider else []
    with (
        tempfile.TemporaryDirectory(prefix="devpod-") as scratch,
        stopped_by_signals(),
        undone_if_killed(lambda: _delete_after_kill(devpod, ident, scratch)),
    ):
        source = stage(code, config.parent if config else None, image, Path(scratch) / "workspace")
        config_path = f".devcontainer/{config.name}" if config else ".devcontainer/devcontainer.json"
        up = [devpod, "up", str(source), "--id", ident, "--ide", "none", "--devcontainer-path", config_path]
        try:
            # its progress (building, pulling, starting) goes to the task's log as it happens
            done = subprocess.run(up + global_flags, stdout=sys.stderr, stderr=sys.stderr, preexec_fn=_stops_with_us)
            if done.returncode != 0:
                raise StackError(f"devpod up failed for {pathspec} (its log is above)", fix="correct what the log says")
            script = (
                "export PYTHONPATH=$PWD/.mf_code METAFLOW_EXTRACTED_ROOT=$PWD"
                f" && exec $(command -v python3 || command -v python) -u {step_cli}"
            )
            ssh = [devpod, "ssh", ident, "--silent", "--start-services=false", "--agent-forwarding=false"]
            ssh += [flag for name in env for flag in ("--send-env", name)] + ["--command", script]
            # the values travel in this process's environment (--send-env), never on a command line
            return subprocess.run(ssh, env={**os.environ, **env}, preexec_fn=_stops_with_us).returncode
        finally:
            with uninterrupted():  # (a second Ctrl-C must not leave the workspace)
                _delete(devpod, ident, "--force")


def _stops_with_us() -> None:
    """In a DevPod command's process, before it runs: SIGTERM when the trampoline dies, so a trampoline killed
    outright leaves no ``devpod up`` making a workspace (or ``devpod ssh`` running the step) behind."""
    die_with_parent(signal.SIGTERM)


#: Seconds a delete may take (DevPod itself waits up to five minutes for a workspace's lock).
_DELETE_S = 360


def _delete(devpod: str, ident: str, *flags: str) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):  # (a provider that hangs: the forced delete follows)
        command = [devpod, "delete", ident, *flags, "--ignore-not-found"]
        subprocess.run(command, capture_output=True, text=True, timeout=_DELETE_S)


def _delete_after_kill(devpod: str, ident: str, scratch: str) -> None:
    """Delete the workspace of a trampoline killed outright, and the copy of the code it was made from. First
    as DevPod deletes by default, which waits for the workspace's lock: a ``devpod up`` stopped as the
    trampoline died holds it while it winds down, and may still make the workspace meanwhile (``--force``
    skips the lock, and would forget the workspace before that); then with ``--force``, should the first
    have failed (a provider that cannot answer)."""
    _delete(devpod, ident)
    _delete(devpod, ident, "--force")
    shutil.rmtree(scratch, ignore_errors=True)
