"""Adaptive request batching: concurrent ``/invoke`` calls share one trip to the function.

No timer, so an idle server adds no latency: each dispatcher takes the first
waiting request and everything queued behind it (up to ``max_batch_size``)
and sends them as one batch. Batches grow only while every dispatcher is busy,
which is exactly when per-call overhead (a thread hop, a pipe round trip, an
actor call) is what limits throughput. One dispatcher per function worker
keeps every worker fed.

A batch that raises is retried item by item, so one bad input fails only its
own request. A batch that outlasts its bound (``call_timeout`` per input)
fails all its requests (504): retried input by input, a hung one would hold
the rest for as long again.

A function that runs in this process and takes well under a millisecond is
called on the event loop itself: for such a call the hop to a thread and the
handover of the GIL between the loop and that thread cost more than the call
(a scikit-learn ``predict`` served at 59% of a handler calling it on the loop).
Each call's time per input is measured, and once the quickest of the latest
calls passes ``INLINE_S``, calls go to threads again, so a slow function never
holds the loop for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from metaflow_stack.functions.backends import Function
from metaflow_stack.functions.errors import RemoteFunctionError

#: A call the batcher makes on the event loop must usually take less than this per input (a batch of
#: them holds the loop as long as a handler calling the function on the loop for each would).
INLINE_S = 0.001
#: How many of the latest calls decide: the quickest of them per input. A call's wall time only grows
#: when the machine is busy (descheduled, or waiting for the GIL in a thread), so the quickest is the
#: function's own cost; a mean taken in threads under load stayed over the limit for good.
_RECENT = 16


@dataclass
class _Pending:
    value: Any
    done: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AdaptiveBatcher:
    """Queues validated inputs and answers each with its own result or exception."""

    def __init__(
        self,
        function: Function,
        dispatchers: int,
        max_batch_size: int,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._function = function
        self._max = max_batch_size
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        #: Seconds per input of the latest calls; none yet, so the first calls measure it in threads. Only
        #: in-process functions may run on the loop: the others wait on I/O.
        self._inline = function.backend.in_process
        self._recent: deque[float] = deque(maxlen=_RECENT)
        self._tasks = [asyncio.create_task(self._dispatch()) for _ in range(max(1, dispatchers))]

    async def call(self, value: Any) -> Any:
        """The function's result for ``value`` (already validated against its schema)."""
        pending = _Pending(value)
        await self._queue.put(pending)
        return await pending.done

    async def _dispatch(self) -> None:
        backend = self._function.backend
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._on_batch(len(batch))
            if len(batch) == 1:
                await _settle(batch[0], self._run(backend.call, batch[0].value))
                continue
            try:
                results = await self._run(backend.call_batch, [p.value for p in batch], len(batch))
            except RemoteFunctionError:
                for pending in batch:  # find which input raised; the others still get their answer
                    await _settle(pending, self._run(backend.call, pending.value))
                continue
            except Exception as exc:  # the backend itself failed: every request in the batch learns why
                for pending in batch:
                    _resolve(pending, exception=exc)
                continue
            for pending, result in zip(batch, results, strict=True):
                _resolve(pending, result=result)

    async def _run(self, call: Callable[[Any], Any], value: Any, inputs: int = 1) -> Any:
        """``call(value)`` (on ``inputs`` inputs) on the loop while an input takes little time, in a thread
        otherwise; timed either way."""
        if self._inline and self._recent and min(self._recent) < INLINE_S:
            return self._timed(call, value, inputs)
        return await asyncio.to_thread(self._timed, call, value, inputs)

    def _timed(self, call: Callable[[Any], Any], value: Any, inputs: int) -> Any:
        started = time.perf_counter()
        try:
            return call(value)
        finally:
            self._recent.append((time.perf_counter() - started) / inputs)

    async def close(self) -> None:
        """Stop the dispatchers; requests still queued get a cancellation."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            self._queue.get_nowait().done.cancel()


def _resolve(pending: _Pending, result: Any = None, exception: BaseException | None = None) -> None:
    if pending.done.done():  # the client went away and its request was cancelled
        return
    if exception is not None:
        pending.done.set_exception(exception)
    else:
        pending.done.set_result(result)


async def _settle(pending: _Pending, call: Awaitable[Any]) -> None:
    try:
        result = await call
    except Exception as exc:
        _resolve(pending, exception=exc)
    else:
        _resolve(pending, result=result)
