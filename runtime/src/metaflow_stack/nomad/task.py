"""One Metaflow task attempt run as a Nomad job, from the ``nomad step`` trampoline: the job's command
(Metaflow's own: its log capture, the code package from the datastore, the environment's bootstrap, the
step), registered, followed to its end and purged.

The job's output is passed on line by line, so the run's console shows it as it is written; inside the
job, Metaflow's log capture saves it to the datastore as ``@kubernetes`` does. Ctrl-C or SIGTERM of the
trampoline purges the job; so does a child of the trampoline when the trampoline is killed outright (the
runtime does that to the tasks still running when another fails the run: ``trampolines.undone_if_killed``).
A job still there when both died is purged by the next run's start (``engines.nomad.orphans.sweep``: its
``Meta`` names the trampoline, ``elsewhere.Launcher``).

The run's credentials among its Metaflow settings (the metadata service's key and headers) are kept out of
the job's spec, which whoever may read the job sees (and, in a deployed flow, out of each step's job, where
its own job keeps them out of its spec too): in the job's own Nomad Variable, which the job reads first
with its workload identity (``job_secrets.FIRST``), removed with the job.
"""

from __future__ import annotations

import sys

from metaflow_stack.elsewhere import Launcher
from metaflow_stack.engines.nomad.client import NomadClient, Refused, Settings
from metaflow_stack.engines.nomad.job_variable import NotKept, forget, keep, variable_path
from metaflow_stack.engines.nomad.jobspec import Placement, task_job
from metaflow_stack.engines.nomad.orphans import OWNER
from metaflow_stack.engines.nomad.watch import Ending, follow
from metaflow_stack.errors import StackError
from metaflow_stack.trampolines import stopped_by_signals, undone_if_killed, uninterrupted

#: Set in every job: Metaflow's plugins know the task runs in a Nomad job.
WORKLOAD_VARIABLE = "METAFLOW_NOMAD_WORKLOAD"
#: Where the job works and keeps its logs (Nomad's task folder; ``/tmp`` elsewhere): raw_exec tasks share the
#: client's ``/tmp``.
WORKDIR = "${NOMAD_TASK_DIR:-/tmp}/metaflow-task"
LOGS = "${NOMAD_TASK_DIR:-/tmp}/metaflow-logs"


def run(
    client: NomadClient,
    job: str,
    command: list[str],
    env: dict[str, str],
    placement: Placement,
    meta: dict[str, str],
    secrets: dict[str, str] | None = None,
) -> Ending:
    """Register the job (``secrets`` in its variable first: its command reads them first: ``job_secrets.FIRST``), pass
    its output on, purge it and its variable however this ends; how it ended."""

    def relay(kind: str, line: str) -> None:
        print(line, file=sys.stderr if kind == "stderr" else sys.stdout, flush=True)

    body = task_job(job, command, env, placement, {**meta, OWNER: Launcher.this().label})
    if secrets:
        body["TaskGroups"][0]["Tasks"][0]["Identity"] = {"Env": True}  # (what reads its variable)
    # The purge on a kill is in place before the job is registered and while the trampoline purges it itself
    # (forked before follow starts its threads; a job that was never registered is purged as no error).
    refused = False  # (the token may not register jobs: then none was, and its purge is refused the same way)
    kept = False  # (whether its variable may have been written: a refused write left none to remove)
    with stopped_by_signals(), undone_if_killed(lambda: _purge(client.settings, job)):
        try:
            try:
                if secrets:
                    kept = True  # (a write that failed midway may have landed)
                    try:
                        keep(client, job, secrets, "the task's job finds the run's credentials")
                    except NotKept:
                        kept = False
                        raise
                eval_id = client.register(body)
            except Refused:
                refused = True
                raise
            return follow(client, job, eval_id, relay)
        finally:
            with uninterrupted():
                try:
                    client.deregister(job)  # (also when registering failed: Nomad may have taken it nonetheless)
                except StackError as exc:  # the task's ending is what matters; the next run's sweep retries
                    if not (refused and isinstance(exc, Refused)):  # (that refusal is said once, by the register)
                        fix = f"nomad job stop {client.settings.cli_options()}-purge {job}"
                        relay("stderr", f"could not purge Nomad job {job} ({exc.message}): {fix}")
                finally:
                    if kept and (left := forget(client, job)):
                        relay("stderr", left)


def _purge(settings: Settings, job: str) -> None:
    """Purge ``job`` and its variable for a trampoline killed outright (``undone_if_killed``), on a
    connection of its own."""
    with NomadClient(settings) as client:
        try:
            client.deregister(job)
        finally:
            client.delete_variable(variable_path(job))
