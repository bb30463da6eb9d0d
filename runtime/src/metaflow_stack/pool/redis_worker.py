"""A Redis backend worker: warm once, then claim a task, run it in a forked child, relay, repeat.

The child runs the task exactly as the local fork server's children do
(``child.run_task``), its stdout and stderr pipes to this process, which
sends what they carry to the task's output stream, renews the task's lease
every second and kills the task when its dispatcher cancels it. One task at
a time: a worker that is busy claims nothing.

    METAFLOW_STACK_POOL_REDIS_URL=URL \
    python -c "from metaflow_stack.pool.redis_worker import main; main()" PREFIX FLOW_FILE NAME

It stops, killing the task it runs, when its standard input closes
(started by the run's runtime: the run is over, however it ended) or when
the pool's ``stop`` key appears (started elsewhere, e.g. a pod).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

import redis

from metaflow_stack.pool.child import Task, fork_task, warm, with_group
from metaflow_stack.pool.redis_queue import RENEW_S, URL_VARIABLE, RedisQueue

#: After a cancelled task is sent SIGTERM: how long before SIGKILL.
KILL_GRACE_S = 5.0


def _stdin_closed() -> bool:
    if not os.isatty(0) and select.select([0], [], [], 0)[0]:
        return not os.read(0, 4096)
    return False


def run_one(queue: RedisQueue, task_id: str, task: Task, name: str) -> int:
    """Run one claimed task in a forked child, relaying its output; returns its exit status."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = fork_task(task, (out_write, err_write), name)
    os.close(out_write)
    os.close(err_write)
    open_fds = {out_read: 1, err_read: 2}
    renewed, killed_at, status = time.monotonic(), None, None
    while open_fds or status is None:
        ready, _, _ = select.select(list(open_fds), [], [], RENEW_S) if open_fds else ([], [], [])
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                queue.output(task_id, open_fds[fd], data)
            else:
                os.close(fd)
                del open_fds[fd]
        if status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif not open_fds:
                time.sleep(0.01)  # its pipes closed before it exited
        now = time.monotonic()
        if now - renewed >= RENEW_S:
            renewed = now
            if (_stdin_closed() or queue.renew(task_id, name)) and killed_at is None:
                killed_at = now
                with_group(pid, signal.SIGTERM)
        if killed_at is not None and now - killed_at > KILL_GRACE_S:
            with_group(pid, signal.SIGKILL)
    return status


def main() -> None:
    prefix, flow_file, name = sys.argv[1:4]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runtime, which stops the pool
    warm(flow_file)
    queue = RedisQueue(redis.Redis.from_url(os.environ[URL_VARIABLE]), prefix)
    print("ready", flush=True)
    while not _stdin_closed() and not queue.stopping():
        claimed = queue.claim(name, timeout_s=0.25)  # between claims: whether to stop
        if claimed is not None:
            task_id, task = claimed
            code = run_one(queue, task_id, task, name)
            if not queue.stopping():  # a stopped pool's keys are gone: write none again
                queue.finish(task_id, name, code)
