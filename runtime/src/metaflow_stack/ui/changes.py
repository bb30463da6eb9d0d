"""Which runs changed, as they change: the UI's live feed on a local datastore.

Metaflow's local runtime writes every fact of a run as a file under
``<root>/<flow>/<run>/``, so watching the root (inotify through
``watchfiles``, polling where the kernel's watches run out) names each run
that moved within a fraction of a second. Subscribers get run pathspecs,
deduplicated per batch; a slow subscriber loses batches, never blocks others,
and refetches what it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import watchfiles
from rich.console import Console

#: Milliseconds watchfiles gathers changes before it reports them as one batch.
DEBOUNCE_MS = 200


class Changes:
    """Fans out changed run pathspecs to every subscriber."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[list[str]]] = set()

    def publish(self, runs: Iterable[str]) -> None:
        batch = sorted(set(runs))
        for queue in self._queues:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(batch)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[list[str]]]:
        queue: asyncio.Queue[list[str]] = asyncio.Queue(maxsize=64)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)


def run_of(root: Path, changed: str) -> str | None:
    """``Flow/run`` for a path under ``<root>/<Flow>/<run>/``; None for anything else (blobs, flow files)."""
    try:
        parts = Path(changed).relative_to(root).parts
    except ValueError:
        return None
    if len(parts) < 2 or parts[1] == "data" or parts[0].startswith("."):
        return None
    return f"{parts[0]}/{parts[1]}"


async def watch(root: Path, changes: Changes, stop: asyncio.Event) -> None:
    """Publish the runs changing under ``root`` until ``stop`` is set."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        await _watch(root, changes, stop, force_polling=False)
    except OSError as exc:  # inotify watches exhausted on a very large datastore
        Console(stderr=True).print(f"[yellow]watching {root} by polling ({exc})[/]")
        await _watch(root, changes, stop, force_polling=True)


async def _watch(root: Path, changes: Changes, stop: asyncio.Event, force_polling: bool) -> None:
    async for batch in watchfiles.awatch(
        root, stop_event=stop, debounce=DEBOUNCE_MS, step=50, force_polling=force_polling, recursive=True
    ):
        runs = {run for _, path in batch if (run := run_of(root, path))}
        if runs:
            changes.publish(runs)
