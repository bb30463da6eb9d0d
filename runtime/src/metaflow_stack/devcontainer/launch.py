"""One task's step command in a container: the code package (unpacked once per machine) mounted
read-only, the local datastore bind-mounted at the same path (so metadata and artifacts land where
Metaflow reads them, with no copy back), output relayed line by line, the exit code returned.

The container is removed whatever happens: when the step ends, when it fails to start (``docker
run`` made it and could not start it), and when the task is stopped (Ctrl-C, or Metaflow's runtime
terminating it), even while ``docker run`` is making it. A trampoline killed outright
(SIGKILL: what Metaflow's runtime does to the tasks still running when another fails the run) cannot
clean up: a child it forked first removes its container then (``trampolines.undone_if_killed``), and
should that child be gone too, the container names the trampoline (``elsewhere.Launcher``), and the
next ``@devcontainer`` run started on this machine removes containers whose trampoline is gone."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any

from python_on_whales.exceptions import DockerException

from metaflow_stack.devcontainer.policy import SandboxPolicy
from metaflow_stack.devcontainer.stores import WORKDIR
from metaflow_stack.devcontainer.task_container import TaskContainer
from metaflow_stack.elsewhere import Launcher, orphans
from metaflow_stack.engines import JobSpec, Mount, get_engine, host_user
from metaflow_stack.engines.docker import DockerEngine, DockerJob
from metaflow_stack.trampolines import stopped_by_signals, undone_if_killed, uninterrupted

#: Where the unpacked code package is mounted (read-only); the task works in ``stores.WORKDIR``.
CODE = "/mf/code"
#: Labels every step container carries: its task, and the trampoline waiting on it (``elsewhere.Launcher``).
LABEL = "io.metaflow-stack.devcontainer"
OWNER = "io.metaflow-stack.devcontainer.owner"
#: On a ``@worker_pool``'s container: the pool's folder on this machine, mounted into it (its runtime removes
#: it; after a runtime killed outright, the sweep that removes the container).
POOL_FOLDER = "io.metaflow-stack.devcontainer.pool-folder"


def _script(step_cli: str, container: TaskContainer) -> str:
    """The container's shell: set the configuration's remoteEnv and run its lifecycle commands in the
    code package (the step's workspace, read-only), put the package's Metaflow first on the path,
    run the step from a writable working folder."""
    return (
        f"export HOME=/tmp && mkdir -p {WORKDIR} && cd {CODE}{container.prelude()} && cd {WORKDIR}"
        f" && export PYTHONPATH={CODE}/.mf_code METAFLOW_EXTRACTED_ROOT={CODE}"
        f" && exec $(command -v python3 || command -v python) -u {step_cli}"
    )


def job_spec(
    image: str,
    step_cli: str,
    code: Path,
    stores: list[Mount],
    env: dict[str, str],
    policy: SandboxPolicy,
    pathspec: str,
    container: TaskContainer | None = None,
    labels: dict[str, str] | None = None,
) -> JobSpec:
    """A container of ``image`` running ``step_cli`` (the interpreter's arguments: the flow file under
    ``CODE``, ...) under ``policy``, with the run's datastore and metadata reachable (``stores``: what to
    mount) and what a devcontainer.json adds (``container``): a step's task, or a ``@worker_pool``'s
    fork server (``labels``: its ``POOL_FOLDER``).

    The decorator's own limits win over the file's ``runArgs``: its ``cpu`` and ``memory`` when given, its
    ``pids`` (always given) as a ceiling the file may only lower. The step's Metaflow variables win over
    the file's environment, and the stack's labels over the file's (which cannot be in the stack's
    namespace: ``task_container``)."""
    container = container or TaskContainer()
    return JobSpec(
        image=image,
        command=["sh", "-c", _script(step_cli, container)],
        env={**container.env, **env},
        mounts=[
            *container.mounts,
            *stores,
            Mount(str(code), CODE),
        ],
        workdir="/tmp",
        user=container.user or host_user(),
        cpu=policy.cpu or container.cpu,
        memory=policy.memory or container.memory,
        labels={**container.labels, **(labels or {}), LABEL: pathspec, OWNER: Launcher.this().label},
        owner="devcontainer",
        network=policy.network,
        read_only=policy.read_only,
        tmpfs=("/tmp",),
        pids_limit=min(policy.pids, container.pids or policy.pids),
        shm_size=container.shm_size,
        hostname=container.hostname,
        init=container.init,
        ulimits=container.ulimits,
    )


def launched(engine: DockerEngine, spec: JobSpec) -> DockerJob:
    """Start ``spec``'s container (``job_spec``); should that fail or be interrupted, remove what the engine
    made of it first, found by its labels: ``docker run`` leaves a container it could not start (a user the
    image lacks) in place, and one stopped by Ctrl-C may be making it still, so only then is it looked for
    twice (a launch that failed has its answer: waiting for a second look only delays the task's one line).
    (An engine that does not answer made nothing: its launch's own error is the one to tell.)"""
    try:
        return engine.launch(spec)
    except BaseException as exc:
        with uninterrupted(), contextlib.suppress(DockerException):
            _remove_left(engine, _own_labels(spec), again=not isinstance(exc, Exception))
        raise


def _own_labels(spec: JobSpec) -> dict[str, str]:
    """The labels that tell ``spec``'s container from every other: its task (a pool's: its folder) and the
    process that launched it."""
    return {name: spec.labels[name] for name in (LABEL, OWNER, POOL_FOLDER) if name in spec.labels}


def run_step(spec: JobSpec) -> int:
    """Run a task's container (``job_spec``), relaying its output; its exit code."""
    engine = get_engine("docker", probe=False)  # the run's start probed it (and swept orphans)
    mine = _own_labels(spec)
    with stopped_by_signals(), undone_if_killed(lambda: _remove_left(engine, mine)):
        job = launched(engine, spec)
        try:
            for stream, line in job.streams(follow=True):
                print(line, file=sys.stderr if stream == "stderr" else sys.stdout, flush=True)
            return job.wait()
        finally:
            job.remove()


#: Seconds between the two looks for a container left behind.
_LOOK_AGAIN_S = 3.0


def _remove_left(engine: DockerEngine, labels: dict[str, str], again: bool = True) -> None:
    """Remove what a trampoline killed outright (``undone_if_killed``) or a launch that failed (``launched``)
    left: its container, looked for ``again`` after a while where the ``docker run`` it was waiting on may
    still be making it."""
    engine.remove(engine.containers(labels))
    if again:
        time.sleep(_LOOK_AGAIN_S)
        engine.remove(engine.containers(labels))


def remove_orphans(engine: DockerEngine) -> int:
    """Remove step containers whose trampoline (a pool's: whose runtime) on this host no longer runs, and
    the folders of the pools among them; how many containers."""
    found = orphans(engine, LABEL, OWNER)
    for container in found:
        folder = pool_folder(container.config.labels.get(POOL_FOLDER), container.mounts)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return engine.remove(found)


def pool_folder(label: str | None, mounts: list[Any]) -> str | None:
    """The pool's folder a container's ``POOL_FOLDER`` label names, if it is one: an absolute, normal path
    the container has mounted at the same path, and this user's own ``mf-pool-`` folder, not a link (what
    else a label could name, its maker wrote)."""
    if not label or not os.path.isabs(label) or os.path.normpath(label) != label:
        return None
    if not os.path.basename(label).startswith("mf-pool-"):
        return None
    if not any(mount.source == label and str(mount.destination) == label for mount in mounts):
        return None
    try:
        info = os.lstat(label)
    except OSError:
        return None
    return label if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() else None
