"""The ``nomad`` backend: the Redis backend's queue and dispatcher, its workers the allocations of one
Nomad job.

When the run starts, once the dispatcher has reached Redis, the runtime
registers one service job for the step (``engines.nomad.jobspec.workers_job``):
``size`` allocations of the pool's Redis worker, placed as the step's
``@nomad`` says (else with its ``@resources``, in the stack's base image). The
first item waits until every worker says it is ready (warm), and fails the
step at once, in Nomad's own words, for a job no node can take, or with its
last line for a worker that ended before it was ready. Nomad keeps the
workers running: one that dies is restarted, as a Deployment's pod is for
the ``kubernetes`` backend. The dispatcher purges the job, which stops the
workers (SIGTERM: a worker kills the item it runs, whose attempt is then
lost and retried), when it stops, which it does however the run ends. The
workers must see the flow's file at the run's path (in their image, or on
the client for ``exec`` and ``raw_exec``), reach Redis at the workers' URL
and a datastore both sides share. What the workers need that is a credential
(the queue's URL, with its password; the metadata service's key and headers)
is kept out of the job's spec, which whoever may read the job sees: in the
job's own Nomad Variable, which the workers read as they start with their
workload identity, and which goes with the job.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any

from metaflow_stack.elsewhere import Launcher, metaflow_settings
from metaflow_stack.engines.nomad.client import NomadClient, Settings, Unavailable
from metaflow_stack.engines.nomad.job_variable import SECRET_SETTINGS, forget, keep
from metaflow_stack.engines.nomad.jobspec import KILL_TIMEOUT_NS, TASK, Placement, workers_job
from metaflow_stack.engines.nomad.orphans import OWNER, sweep
from metaflow_stack.engines.nomad.watch import ENDED, NOT_STARTED, ending, last_lines, wait_placed
from metaflow_stack.errors import StackError
from metaflow_stack.pool.cluster_pool import POLL_S, READY_TIMEOUT_S, ClusterPool
from metaflow_stack.pool.processes import READY
from metaflow_stack.pool.redis_pool import WORKER, WORKERS_PREFIX
from metaflow_stack.pool.redis_queue import URL_VARIABLE

#: Where the workers find Redis, when not where the runtime does (the Nomad clients' view of the server).
WORKERS_URL_VARIABLE = "METAFLOW_STACK_POOL_NOMAD_REDIS_URL"
#: How long stopping waits for the workers to end: their kill timeout, and some.
STOP_S = KILL_TIMEOUT_NS / 1e9 + 15
#: How to give the workers this run's metaflow-stack, where their image holds an older one.
OLDER_FIX = "build the image= it runs on the stack's current base image, or leave image= out"
#: What a worker's output says, on a line of its own, once it is warm (``redis_worker``).
READY_LINE = READY.decode().strip()


class NomadPool(ClusterPool):
    """A dispatcher here and a Nomad job of ``size`` workers, sharing one Redis queue."""

    backend = "nomad"
    workers_kind = "Nomad workers"
    stop_timeout_s = STOP_S + 30  # the dispatcher waits for the workers to stop

    def __init__(
        self, flow_file: str, size: int, name: str, url: str, prefix: str, placement: Placement, agent: Settings
    ) -> None:
        super().__init__(flow_file, size, name, url, prefix)
        self.placement, self.agent = placement, agent.at(placement.namespace, placement.region)
        # The dispatcher's: which job to purge, where.
        self.args += [self.workers_name, self.agent.namespace or "", self.agent.region or ""]
        self.eval_id: str | None = None
        self.secrets: dict[str, str] = {}  # (the job's variable: ``render`` fills it, ``place`` writes it)

    def render(self) -> dict[str, Any]:
        """The workers' job: the Redis worker, detached (it stops on SIGTERM, not when a pipe closes), named
        for its allocation; the run's Metaflow settings in its environment, but for the credentials among
        them and the queue's URL (``secrets``: the job's variable, which ``place`` writes)."""
        # Named for its allocation by the shell, from the variables Nomad gives every task.
        named = 'exec python -u -c "$0" "$@" "$NOMAD_JOB_ID/$NOMAD_ALLOC_INDEX" --detached --job-variable'
        command = ["sh", "-c", named, WORKER, self.prefix, self.flow_file]
        env = metaflow_settings()
        self.secrets = {name: env.pop(name) for name in SECRET_SETTINGS if name in env}
        self.secrets[URL_VARIABLE] = self.workers_url(WORKERS_URL_VARIABLE)
        if self.placement.driver == "docker":
            env["HOME"] = "/tmp"  # (the image's user may have none; exec and raw_exec keep the client's)
        meta = {"metaflow-stack.pool": self.prefix, OWNER: Launcher.this().label}  # (a killed run's: swept)
        return workers_job(self.workers_name, command, env, self.placement, meta, self.size)

    def place(self, rendered: dict[str, Any]) -> None:
        with NomadClient(self.agent) as client:
            sweep(client, WORKERS_PREFIX, variables=True)  # the pools of runs killed outright, with their URLs
            keep(client, self.workers_name, self.secrets, "the pool's workers find the queue's URL")
            self.eval_id = client.register(rendered)

    def wait_workers(self) -> None:
        assert self.eval_id is not None
        with NomadClient(self.agent) as client:
            wait_for_workers(client, self.eval_id, self.workers_name, self.size)

    def remove(self) -> None:
        purge(self.agent, self.workers_name)

    def advice(self) -> str:
        # (the job is purged by then: what to check, not a command on it)
        return (
            f"the workers need the flow at {self.flow_file} (on the clients, or in the image), Redis "
            f"({WORKERS_URL_VARIABLE} where the clients reach it at another address) and the datastore; run "
            "the step without @worker_pool to see its whole error"
        )


def purge(agent: Settings, job: str) -> None:
    """Stop and forget the workers' job and its variable, and wait (``STOP_S`` at most) until its
    allocations have stopped (Nomad stops them after it answers); say what may be left, and how to remove
    it, if Nomad cannot or they outlast the wait (stopping goes on)."""
    deadline, index, running = time.monotonic() + STOP_S, 0, []
    try:
        with NomadClient(agent) as client:
            try:
                client.deregister(job)
            finally:  # (the queue's URL goes whatever became of the job)
                if left := forget(client, job):
                    print(f"worker pool: {left}", file=sys.stderr, flush=True)
            while time.monotonic() < deadline:
                allocations, index = client.allocations(job, index, wait_s=POLL_S, outage_s=0)
                running = [a["ID"] for a in allocations if a.get("ClientStatus") not in ENDED]
                if not running:
                    return
        said = f"the Nomad job {job} is purged, and {len(running)} of its workers still ran after {STOP_S:.0f}s"
        fix = "nomad alloc stop " + " ".join(running)
    except StackError as exc:
        said = f"the Nomad job {job} may be left: {exc.message}"
        fix = f"nomad job stop {agent.cli_options()}-purge {job}"
    print(f"worker pool: {said} (fix: {fix})", file=sys.stderr, flush=True)


def wait_for_workers(client: NomadClient, eval_id: str, job: str, size: int) -> None:
    """Until ``size`` workers of ``job`` said they are ready. ``StackError`` at once for a job no node can
    take (Nomad's reasons), or a worker that ended or could not start (its last line, else Nomad's word for
    it), or after ``READY_TIMEOUT_S`` (naming a worker that said only ``ready``, the word of an older
    metaflow-stack: not before, since a flow's file may print it at import); a job waiting for room is said
    to be queued, once."""
    wait_placed(client, eval_id, lambda said: print(f"worker pool: {said}", file=sys.stderr, flush=True))
    deadline, index, ready = time.monotonic() + READY_TIMEOUT_S, 0, set()
    older: dict[str, str] = {}  # the workers not ready that said only "ready", by allocation
    while time.monotonic() < deadline:
        allocations, index = client.allocations(job, index, wait_s=POLL_S)
        for allocation in allocations:
            if allocation["ID"] in ready or allocation.get("DesiredStatus", "run") != "run":
                continue
            state = (allocation.get("TaskStates") or {}).get(TASK) or {}
            failed = [e for e in state.get("Events") or [] if e.get("Type") in ("Terminated", *NOT_STARTED)]
            if failed or allocation.get("ClientStatus") in ENDED:
                said = [line for line in _read(client, allocation["ID"], "stderr") if line.strip()]
                why = said[-1] if said else _why(allocation, failed)
                name = allocation.get("Name", allocation["ID"])
                if "unrecognized arguments: --job-variable" in why:  # (an image= of an older metaflow-stack)
                    raise StackError(f"worker {name} runs an older metaflow-stack than this run", fix=OLDER_FIX)
                raise StackError(f"worker {name} ended: {why}")
            said = _read(client, allocation["ID"], "stdout") if state.get("State") == "running" else []
            if READY_LINE in said:
                ready.add(allocation["ID"])
                older.pop(allocation["ID"], None)  # (its flow's file printed "ready" as it was imported)
            elif "ready" in said:
                older[allocation["ID"]] = allocation.get("Name", allocation["ID"])
        if len(ready) >= size:
            return
    waited = f"{len(ready)} of {size} ready after {READY_TIMEOUT_S}s"
    if older:
        raise StackError(
            f"{waited}: worker {next(iter(older.values()))} said 'ready', not '{READY_LINE}': it runs an older "
            "metaflow-stack than this run",
            fix=OLDER_FIX,
        )
    raise StackError(waited)


def _why(allocation: dict[str, Any], failed: list[dict[str, Any]]) -> str:
    """Nomad's word for how a worker ended: the event that ended it (not a later "Restarting"), else the
    allocation's."""
    if not failed:
        return ending(allocation).reason or allocation.get("ClientStatus", "ended")
    event = failed[-1]
    said = event.get("DisplayMessage") or event.get("DriverError") or event.get("ValidationError")
    return said or (f"exit code {event['ExitCode']}" if "ExitCode" in event else event["Type"])


def _read(client: NomadClient, alloc_id: str, kind: str) -> list[str]:
    """A worker's log as it is now; nothing when Nomad cannot say now (asked again on the next look)."""
    try:
        return last_lines(client, alloc_id, kind)
    except Unavailable:
        return []


def open_nomad_pool(
    flow_file: str,
    size: int,
    name: str,
    url: str,
    prefix: str,
    resources: dict[str, Any],
    image: str | None,
    placement: Placement | None,
) -> NomadPool:
    """The pool as the decorators describe it: ``placement``, an absorbed ``@nomad``'s, else the step's
    ``@resources``; in ``image``, else the placement's, else the stack's base image (for the docker driver)."""
    from metaflow_stack.engines.nomad.image import stack_image

    agent = Settings.from_env()
    if placement is None:
        placement = Placement(
            cpu=float(resources.get("cpu") or 1),
            memory=int(float(resources.get("memory") or 4096)),
            gpu=int(float(resources.get("gpu") or 0)),
        )
    image = image or placement.image
    if placement.driver == "docker" and image is None:
        image = stack_image(agent, "@worker_pool(image=...)")
    return NomadPool(flow_file, size, name, url, prefix, replace(placement, image=image), agent)
