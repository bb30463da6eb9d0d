"""A Redis backend worker: warm once, then claim a task, run it in a forked child, relay, repeat.

The child runs the task exactly as the local fork server's children do
(``child.run_task``), its stdout and stderr pipes to this process, which
sends what they carry to the task's output stream, renews the task's lease
every second and kills the task when its dispatcher cancels it. One task at
a time: a worker that is busy claims nothing.

    METAFLOW_STACK_POOL_REDIS_URL=URL \
    python -c "from metaflow_stack.pool.redis_worker import main; main()" PREFIX FLOW_FILE NAME

With ``--interpreter=JSON`` (a step with an environment of its own,
``@pypi``/``@conda``: its ``Interpreter``) it imports nothing of the flow
itself and hands each task to a fork server of one slot under that
interpreter (``slot``), relaying in the same way; the fork server's folder
is in ``--folder=PATH`` (the pool's), so it goes with the pool's however
they end.

It stops, killing the task it runs, when its standard input closes
(started by the run's runtime: the run is over, however it ended). With
``--detached`` (a pod of the
``kubernetes`` backend, started by the cluster) it ignores its standard
input and stops on SIGTERM instead (the runtime deletes the pods when the
run ends), says it is ready in ``READY_FILE`` too (the pod's readiness
probe), and runs each task on its own machine's terms: this interpreter,
this machine's environment with the task's variables over it (those that
name the runtime's machine left out), the flow's folder when the task's
folder is not here. With ``--job-variable`` (a Nomad job's worker) it first
reads what its job keeps out of its spec (the queue's URL, the metadata
service's credentials) from the job's own Nomad Variable, with its workload
identity, into its environment, before Metaflow reads its settings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import select
import signal
import sys
import tempfile
import time
from pathlib import Path

import redis

from metaflow_stack.errors import StackError
from metaflow_stack.pool.child import DRAIN_S, Task, fork_task, on_this_machine, warm, with_group
from metaflow_stack.pool.local import Interpreter
from metaflow_stack.pool.processes import say_ready
from metaflow_stack.pool.redis_queue import RENEW_S, URL_VARIABLE, RedisQueue, connect
from metaflow_stack.pool.slot import Slot
from metaflow_stack.pool.trampoline import POOL_LOST

#: After a cancelled task is sent SIGTERM: how long before SIGKILL.
KILL_GRACE_S = 5.0
#: Where a detached worker says it is ready, in its temporary folder (the chart's readiness probe tests
#: ``/tmp/`` and this name).
READY_FILE = "mf-pool-worker-ready"


class Lifeline:
    """Whether the worker is to stop: its standard input closed (started by the runtime) or, detached,
    SIGTERM received."""

    def __init__(self, detached: bool) -> None:
        self.detached, self.terminated = detached, False
        if detached:
            signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, *_: object) -> None:
        self.terminated = True

    def ended(self) -> bool:
        if self.detached:
            return self.terminated
        if not os.isatty(0) and select.select([0], [], [], 0)[0]:
            return not os.read(0, 4096)
        return False


class Relay:
    """A claimed task's line to the queue: its output, and its lease. A Redis that stops answering ends the
    line for good, and with it the task: its lease lapses, and the dispatcher fails the attempt as lost
    (``@retry``'s to run again), where the error ended the whole worker."""

    def __init__(self, queue: RedisQueue, task_id: str, name: str, lifeline: Lifeline) -> None:
        self.queue, self.task_id, self.name, self.lifeline = queue, task_id, name, lifeline
        self.away = False

    def output(self, fd: int, data: bytes) -> None:
        if not self.away:
            try:
                self.queue.output(self.task_id, fd, data)
            except redis.RedisError:
                self.away = True

    def ended(self) -> bool:
        """Whether the task is to stop (the worker stops, it was cancelled, or Redis is away); renews its lease."""
        if self.lifeline.ended() or self.away:
            return True
        try:
            return self.queue.renew(self.task_id, self.name)
        except redis.RedisError:
            self.away = True
            return True


def run_one(queue: RedisQueue, task_id: str, task: Task, name: str, lifeline: Lifeline) -> int:
    """Run one claimed task in a forked child, relaying its output; returns its exit status (``POOL_LOST`` if
    Redis went away meanwhile)."""
    relay = Relay(queue, task_id, name, lifeline)
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = fork_task(task, (out_write, err_write), name)
    os.close(out_write)
    os.close(err_write)
    open_fds = {out_read: 1, err_read: 2}
    renewed, killed_at, status, drained_by = time.monotonic(), None, None, 0.0
    while open_fds or status is None:
        ready, _, _ = select.select(list(open_fds), [], [], RENEW_S) if open_fds else ([], [], [])
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                relay.output(open_fds[fd], data)
            else:
                os.close(fd)
                del open_fds[fd]
        if status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status, drained_by = os.waitstatus_to_exitcode(raw), time.monotonic() + DRAIN_S
            elif not open_fds:
                time.sleep(0.01)  # its pipes closed before it exited
        elif time.monotonic() > drained_by:  # something it left running holds its output open
            for fd in open_fds:
                os.close(fd)
            open_fds.clear()
        now = time.monotonic()
        if now - renewed >= RENEW_S:
            renewed = now
            if relay.ended() and killed_at is None:
                killed_at = now
                with_group(pid, signal.SIGTERM)
        if killed_at is not None and now - killed_at > KILL_GRACE_S:
            with_group(pid, signal.SIGKILL)
    return POOL_LOST if relay.away else status


def run_in_slot(queue: RedisQueue, task_id: str, task: Task, name: str, lifeline: Lifeline, slot: Slot) -> int:
    """Run one claimed task on the worker's fork server of one slot, relaying its output; returns its exit
    status (``POOL_LOST`` if the fork server died under it, the task was cancelled or Redis went away)."""
    relay = Relay(queue, task_id, name, lifeline)
    try:
        running = slot.submit(task, task.env)
    except OSError as exc:  # (it died since the claim)
        queue.output(task_id, 2, f"worker pool: this worker's fork server took no task: {exc}\n".encode())
        return POOL_LOST
    renewed, cancelled = time.monotonic(), False
    try:
        while not running.ended:
            for fd, data in running.read(RENEW_S):
                relay.output(fd, data)
            now = time.monotonic()
            if now - renewed >= RENEW_S:
                renewed = now
                if not cancelled and relay.ended():
                    cancelled = True
                    running.cancel()  # the fork server kills it (SIGTERM, SIGKILL after its grace)
    finally:
        running.close()
    if running.status is None and not cancelled:  # (killed outright, out of memory say)
        relay.output(2, b"worker pool: this worker's fork server ended before the task did\n")
    return POOL_LOST if running.status is None or relay.away else running.status


def revive(slot: Slot, queue: RedisQueue, name: str) -> str | None:
    """``slot.revive()``, saying every second meanwhile that this worker lives: a fork server slow to import
    the flow would otherwise read as a queue no worker serves, and fail what waits in it. (A thread: this
    worker forks nothing itself when it has a slot.)"""
    if slot.alive():
        return None
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        reviving = thread.submit(slot.revive)
        while True:
            queue.live(name)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                return reviving.result(timeout=RENEW_S)


def options(argv: list[str]) -> argparse.Namespace:
    """The worker's command line (see the module's docstring); only the pool and its charts write it."""
    parser = argparse.ArgumentParser(prog="redis_worker")
    for name in ("prefix", "flow_file", "name"):
        parser.add_argument(name)
    parser.add_argument("--detached", action="store_true")
    parser.add_argument("--interpreter", help="the step's own environment's Interpreter, as JSON")
    parser.add_argument("--folder", help="where that environment's fork server keeps its folder")
    parser.add_argument("--job-variable", action="store_true", help="read the Nomad job's variable first")
    return parser.parse_args(argv)


def read_job_variable() -> None:
    """The Nomad job's own variable (``job_variable``) into this worker's environment; exits with one line
    (the last its job's allocation shows, which the runtime reports) where it cannot be read."""
    from metaflow_stack.engines.nomad.job_variable import VariableGone, VariableRefused, read_own, variable_path

    job = os.environ.get("NOMAD_JOB_ID", "")
    try:
        os.environ.update(read_own(job))
        return
    except VariableGone:
        said = "it is gone: the run that started this pool has ended"
    except VariableRefused:
        said = (
            "this worker's identity may not read it (fix: check the ACL policies bound to the job: a job's "
            "workload reads its own variables unless a policy says otherwise)"
        )
    except StackError as exc:  # (the Task API not answering says its fix)
        said = str(exc)
    sys.exit(f"worker pool: the queue's URL in the Nomad variable {variable_path(job)} could not be read: {said}")


def main() -> None:
    args = options(sys.argv[1:])
    flow_file, name = args.flow_file, args.name
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runtime, which stops the pool
    if args.job_variable:
        read_job_variable()
    # Out of the environment its tasks (on a cluster: this machine's, with theirs over it), its fork servers
    # and their logs see: the queue's URL and the workload identity it was read with (``redis_user`` says
    # why a task that finds them anyway reaches only its own pool's keys).
    url = os.environ.pop(URL_VARIABLE, "")
    if not url:
        sys.exit(f"worker pool: no queue to serve: {URL_VARIABLE} is not set (only the pool starts its workers)")
    if args.job_variable:
        os.environ.pop("NOMAD_TOKEN", None)
    lifeline = Lifeline(detached=args.detached)
    if lifeline.detached:
        Path(tempfile.gettempdir(), READY_FILE).unlink(missing_ok=True)  # (a pod's /tmp outlives a restarted worker)
    own = args.interpreter
    slot = Slot(flow_file, name, args.folder, Interpreter(**json.loads(own))) if own else None
    if slot is None:
        warm(flow_file)
    elif error := slot.start():
        sys.exit(error)  # (the last line of its log, which the runtime shows)
    try:
        serve(url, args.prefix, flow_file, name, lifeline, slot)
    finally:  # (its fork server would see this process end too)
        if slot is not None:
            slot.stop()


def serve(url: str, prefix: str, flow_file: str, name: str, lifeline: Lifeline, slot: Slot | None) -> None:
    """Claim and run tasks from the queue at ``url`` until the worker is to stop."""
    ready_file = Path(tempfile.gettempdir(), READY_FILE)
    queue = RedisQueue(connect(url), prefix)
    queue.client.ping()  # ready means reaching the queue too
    say_ready()
    if lifeline.detached:
        ready_file.touch()
    away = False  # (Redis stopped answering: said once while it lasts)
    while not lifeline.ended():
        try:
            serve_one(queue, flow_file, name, lifeline, slot)
        except redis.RedisError as exc:
            if not away:
                print(f"worker pool: Redis does not answer ({exc}); trying every second", file=sys.stderr, flush=True)
            away = True
            time.sleep(RENEW_S)
            continue
        if away:
            print("worker pool: Redis answers again", file=sys.stderr, flush=True)
        away = False


def serve_one(queue: RedisQueue, flow_file: str, name: str, lifeline: Lifeline, slot: Slot | None) -> None:
    """Claim a task (waiting a moment for one) and run it; ``redis.RedisError`` when Redis does not answer,
    which the worker outlives."""
    if slot is not None and (error := revive(slot, queue, name)):  # (before a claim: a slow start holds no lease)
        sys.exit(f"worker pool: this worker's fork server could not start again: {error}")
    queue.live(name)
    claimed = queue.claim(name, timeout_s=0.25)  # between claims: whether to stop
    if claimed is not None:
        task_id, task = claimed
        if lifeline.detached:
            task = on_this_machine(task, flow_file)
        if slot is not None:
            code = run_in_slot(queue, task_id, task, name, lifeline, slot)
        else:
            code = run_one(queue, task_id, task, name, lifeline)
        if lifeline.ended():  # killed because this worker stops (a pod deleted): the worker was lost
            code = POOL_LOST
        queue.finish(task_id, name, code)  # (a purged pool's stream is not made again)
