"""The Ray backend's executor in the dispatcher: each task to an idle actor of the pool's own.

The dispatcher joins the Ray cluster at ``RAY_ADDRESS`` or, with none,
starts a Ray on this machine whose files live in the pool's folder and end
with it. It creates ``size`` actors (``ray_actor.PoolActor``) with the
step's ``@resources`` as their Ray resources; each warms up once and then
takes one task at a time from the dispatcher, which gives each task to
whichever actor is idle (a faster actor takes more). An actor lost
mid-task fails that attempt with ``POOL_LOST`` (``@retry`` runs it again),
and Ray starts the actor again for the tasks after. Stopping the pool
kills its actors and, if it started Ray, stops Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from metaflow_stack import ray_start
from metaflow_stack.elsewhere import metaflow_settings
from metaflow_stack.errors import StackError
from metaflow_stack.pool import trampoline
from metaflow_stack.pool.child import Task
from metaflow_stack.pool.dispatcher import Output
from metaflow_stack.pool.local import Interpreter, python_of
from metaflow_stack.pool.ray_actor import PoolActor

#: How long Ray may take to start and the actors to be placed and import the flow (below the runtime's
#: own wait for the dispatcher).
START_TIMEOUT_S = 100.0
#: The object store of a Ray this pool starts: it carries only the tasks' output, in small pieces.
OBJECT_STORE_BYTES = 100 << 20
#: How long the actors have to stop their fork servers before they are killed.
STOP_TIMEOUT_S = 15.0
#: How often a lost actor is asked whether Ray has started it again.
RESTART_POLL_S = 0.5


class RayExecutor:
    def __init__(self, actors: list[Any], python: str) -> None:
        self.python = python
        self.idle: asyncio.Queue = asyncio.Queue()  # an actor, or None once none is left
        for actor in actors:
            self.idle.put_nowait(actor)
        self.actors = actors
        self.waiting = 0
        self.restarting: set[asyncio.Task] = set()  # (held: the loop keeps only weak references)

    async def run(self, task: Task, output: Output, abandoned: asyncio.Future) -> int | None:
        self.waiting += 1
        try:
            actor = await self.idle.get() if self.actors else None
        finally:
            self.waiting -= 1
        if actor is None:
            self.idle.put_nowait(None)  # (for the next waiter)
            await output(2, b"worker pool: every Ray worker of this pool is gone\n")
            return trampoline.POOL_LOST
        if abandoned.done():  # its trampoline went away while it waited
            self.idle.put_nowait(actor)
            return None
        token, returned, ended = uuid.uuid4().hex, True, False
        cancelling = asyncio.ensure_future(self._cancel_when(abandoned, actor, token))
        try:
            async for ref in actor.run.remote(task, token):
                pieces, status = await ref
                for fd, data in pieces:
                    await output(fd, data)
                if status is not None:
                    ended = True
                    return status
            ended = True
            return None  # cancelled: its trampoline went away
        except RayActorError as exc:
            ended, returned = True, False
            self._restart(actor)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            await output(2, f"worker pool: the Ray worker running this task was lost: {reason}\n".encode())
            return trampoline.POOL_LOST
        finally:
            cancelling.cancel()
            if not ended:  # the pool is stopping: kill the task now, not when its actor goes
                actor.cancel.remote(token)
            if returned:
                self.idle.put_nowait(actor)

    async def _cancel_when(self, abandoned: asyncio.Future, actor: Any, token: str) -> None:
        with contextlib.suppress(Exception):
            await abandoned
        await actor.cancel.remote(token)

    def _restart(self, actor: Any) -> None:
        """An actor that failed a call: Ray may only have lost sight of it, its task still running (which must
        not go on beside the retry), so it is killed and started again, then given tasks once warm."""
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=False)
        restart = asyncio.ensure_future(self._return_when_restarted(actor))
        self.restarting.add(restart)
        restart.add_done_callback(self.restarting.discard)

    async def _return_when_restarted(self, actor: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while loop.time() < deadline:
            try:
                reason = await asyncio.wait_for(actor.ready.remote(), max(deadline - loop.time(), 0.1))
                if reason is None:
                    self.idle.put_nowait(actor)
                    return
                break  # it started again and cannot import the flow any more
            except TimeoutError:
                break
            except Exception:  # (still restarting, or not placed yet)
                await asyncio.sleep(RESTART_POLL_S)
        self.actors.remove(actor)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)  # it holds its resources until killed
        print("worker pool: a Ray worker did not come back", file=sys.stderr, flush=True)
        if not self.actors:
            self.idle.put_nowait(None)  # wake whoever waits: none will come

    async def queued(self) -> int:
        return self.waiting

    async def close(self) -> None:
        for restart in list(self.restarting):
            restart.cancel()
        stopping = asyncio.gather(*(actor.stop.remote() for actor in self.actors), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping, STOP_TIMEOUT_S)
        discard(self.actors)


def discard(actors: list[Any]) -> None:
    """Kill ``actors`` outright and leave Ray (stopping it, if this pool started it)."""
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    ray.shutdown()


async def open_executor(folder: Path, args: list[str]) -> RayExecutor:
    """``args``: the flow's file, the number of actors, the pool's name, each actor's Ray resources (JSON:
    ``num_cpus``, ``num_gpus``, ``memory``) and the step's own environment's ``Interpreter`` (JSON; empty:
    none, the tasks run under the runtime's interpreter), which only a Ray of the pool's own can run."""
    started = time.monotonic()
    flow_file, size, name, resources = args[0], int(args[1]), args[2], json.loads(args[3])
    interpreter = Interpreter(**json.loads(args[4])) if args[4] else None
    resources = {"num_cpus": 1, **resources}  # (Ray's own default for an actor is none held)
    address = os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address and address.startswith("ray://"):
        raise StackError(
            f"RAY_ADDRESS={address} is a Ray Client address, and Ray Client cannot stream a task's output",
            fix="run the flow on a node of the cluster with RAY_ADDRESS=auto (or the head's host:port)",
        )
    if not address:  # a Ray of this pool's own, sized for its actors (memory is not enforced here)
        resources.pop("memory", None)
        options |= {
            "num_cpus": size * resources["num_cpus"],
            "num_gpus": size * resources.get("num_gpus", 0),
            "object_store_memory": OBJECT_STORE_BYTES,
            "_temp_dir": str(folder / "ray"),
        }
    try:
        ray_start.init(**options)  # (in the main thread: Ray ties the processes it starts to it)
    except (OSError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a Ray on this machine"
        raise StackError(f"could not reach {where}: {exc}") from None
    actor_class = ray.remote(PoolActor).options(max_restarts=-1, max_concurrency=2, **resources)
    parent = None if address else str(folder)  # (a cluster's nodes have folders of their own)
    settings = metaflow_settings() if address else None  # (a Ray of the pool's own: the runtime's environment)
    actors = [actor_class.remote(flow_file, f"{name}/{slot}", parent, interpreter, settings) for slot in range(size)]
    remaining = max(START_TIMEOUT_S - (time.monotonic() - started), 1)
    try:
        reasons = await asyncio.wait_for(asyncio.gather(*(a.ready.remote() for a in actors)), remaining)
    except TimeoutError:
        discard(actors)
        raise StackError(
            f"Ray placed none or only some of {size} workers of {resources} in {START_TIMEOUT_S:.0f}s",
            fix="give the cluster room for them, or ask for fewer (size=, @resources)",
        ) from None
    except RayActorError as exc:
        discard(actors)
        raise StackError(f"a Ray worker could not start: {str(exc).splitlines()[0]}") from None
    problems = [reason for reason in reasons if reason]
    if problems:
        discard(actors)
        raise StackError(problems[0], fix="run the flow without @worker_pool to see the full error")
    return RayExecutor(actors, python_of(interpreter))
