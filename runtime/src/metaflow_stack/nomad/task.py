"""One Metaflow task attempt run as a Nomad job, from the ``nomad step`` trampoline: the job's command
(Metaflow's own: its log capture, the code package from the datastore, the environment's bootstrap, the
step), registered, followed to its end and purged.

The job's output is passed on line by line, so the run's console shows it as it is written; inside the
job, Metaflow's log capture saves it to the datastore as ``@kubernetes`` does. Ctrl-C or SIGTERM of the
trampoline purges the job; a job still there when a trampoline died outright is purged by the next
run's start (``sweep``: its ``Meta`` names the trampoline's host and pid).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metaflow_stack.errors import StackError
from metaflow_stack.ids import is_number
from metaflow_stack.nomad.client import NomadClient
from metaflow_stack.nomad.jobspec import Placement, task_job
from metaflow_stack.nomad.watch import Ending, follow
from metaflow_stack.trampolines import stopped_by_signals

#: Set in every job: Metaflow's plugins know the task runs in a Nomad job.
WORKLOAD_VARIABLE = "METAFLOW_NOMAD_WORKLOAD"
#: ``Meta`` key naming the trampoline waiting for the job (``host:pid``).
OWNER = "metaflow-stack.owner"
#: Where the job works (Nomad's task folder; ``/tmp`` elsewhere).
WORKDIR = "${NOMAD_TASK_DIR:-/tmp}/metaflow-task"


def job_command(
    environment: Any, datastore: tuple[str, str], ids: dict[str, Any], package: tuple[str, str], step_cli: str
) -> list[str]:
    """The job's command, as Metaflow's ``@kubernetes`` builds it: capture logs, fetch and unpack the code
    package (``package``: its metadata and URL), bootstrap the step's environment, run the step, save the
    logs, exit with the step's code; one ``bash -c`` line, quoted as Metaflow's commands expect (they are
    written to go through ``shlex`` inside double quotes)."""
    from metaflow.mflog import BASH_SAVE_LOGS, bash_capture_logs, export_mflog_env_vars

    datastore_type, datastore_root = datastore  # (the root: where the logs are saved, as the run's CLI named it)
    logs = "${NOMAD_TASK_DIR:-/tmp}/metaflow-logs"  # the task's own folder: raw_exec tasks share the client's /tmp
    mflog = export_mflog_env_vars(
        flow_name=ids["flow"],
        run_id=ids["run_id"],
        step_name=ids["step"],
        task_id=ids["task_id"],
        retry_count=ids["attempt"],
        datastore_type=datastore_type,
        datastore_root=datastore_root,
        stdout_path=f"{logs}/stdout.log",
        stderr_path=f"{logs}/stderr.log",
    )
    metadata, url = package
    init = " && ".join(environment.get_package_commands(url, datastore_type, metadata))
    step = bash_capture_logs(" && ".join([*environment.bootstrap_commands(ids["step"], datastore_type), step_cli]))
    script = (
        f"mkdir -p {logs} {WORKDIR} && cd {WORKDIR} && {mflog} && {init} && {step}; c=$?; {BASH_SAVE_LOGS}; exit $c"
    )
    return shlex.split(f'bash -c "{script}"')


def machine() -> str:
    """This machine, as a job's ``Meta`` names it: its host name and, where the kernel tells, its boot (host
    names repeat across containers and laptops; a pid is only this boot's)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def owner() -> str:
    return f"{machine()}:{os.getpid()}"


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM held off (in the main thread) while a job is purged: a second one must not leave it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run(
    client: NomadClient, job: str, command: str, env: dict[str, str], placement: Placement, meta: dict[str, str]
) -> Ending:
    """Register the job, pass its output on, purge it however this ends; how it ended."""

    def relay(kind: str, line: str) -> None:
        print(line, file=sys.stderr if kind == "stderr" else sys.stdout, flush=True)

    body = task_job(job, command, env, placement, {**meta, OWNER: owner()})
    with stopped_by_signals():
        try:
            eval_id = client.register(body)
            return follow(client, job, eval_id, relay)
        finally:
            with uninterrupted():
                try:
                    client.deregister(job)
                except StackError as exc:  # the task's ending is what matters; the next run's sweep retries
                    relay("stderr", f"could not purge Nomad job {job} ({exc.message}): nomad job stop -purge {job}")


def sweep(client: NomadClient, prefix: str = "mf-") -> int:
    """Purge the jobs whose trampoline on this host is gone (killed outright, it could not); how many."""
    import psutil

    here, gone = machine(), 0
    try:
        jobs = client.jobs(prefix)
    except StackError:
        return 0  # the first task reports an agent that does not answer
    for job in jobs:
        host, _, pid = ((job.get("Meta") or {}).get(OWNER) or "").rpartition(":")
        if host == here and is_number(pid) and not psutil.pid_exists(int(pid)):
            client.deregister(job["ID"])
            gone += 1
    return gone
