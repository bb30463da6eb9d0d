"""Which runs changed, as they change: the UI's live feed on a local datastore.

Metaflow's local runtime writes every fact of a run as a file under
``<root>/<flow>/<run>/``, so watching the root (inotify through
``watchfiles``, polling where the kernel's watches run out) names each run
that moved within a fraction of a second. Each subscriber holds the runs
changed since it last read, merged: a burst is one message, a slow subscriber
never blocks the others and never loses a change (past ``PENDING_RUNS`` runs
it is told "every run", ``EVERY_RUN``, and refetches all it shows).
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
#: Seconds between tries of a root that could not be made, of a watch that failed even by polling, and of a
#: service's event stream that dropped.
RETRY_S = 2.0
#: The run named when a subscriber must refetch everything it shows.
EVERY_RUN = "*"
#: Runs a subscriber's unread changes name before they become ``EVERY_RUN``: memory stays bounded.
PENDING_RUNS = 256


class Feed:
    """One subscriber's unread changes."""

    def __init__(self) -> None:
        self._runs: set[str] = set()
        self._arrived = asyncio.Event()

    def add(self, runs: Iterable[str]) -> None:
        """Note ``runs`` as changed (all of them, once ``EVERY_RUN`` is among them or too many are held)."""
        if EVERY_RUN not in self._runs:
            self._runs.update(runs)
            if EVERY_RUN in self._runs or len(self._runs) > PENDING_RUNS:
                self._runs = {EVERY_RUN}
        if self._runs:
            self._arrived.set()

    async def next(self) -> list[str]:
        """The runs changed since the last call (sorted; ``[EVERY_RUN]`` when too many), once there is one."""
        while not self._runs:
            self._arrived.clear()
            await self._arrived.wait()
        runs, self._runs = self._runs, set()
        return sorted(runs)


class Changes:
    """Fans out changed run pathspecs to every subscriber."""

    def __init__(self) -> None:
        self._feeds: set[Feed] = set()

    def publish(self, runs: Iterable[str]) -> None:
        runs = set(runs)
        for feed in self._feeds:
            feed.add(runs)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Feed]:
        feed = Feed()
        self._feeds.add(feed)
        try:
            yield feed
        finally:
            self._feeds.discard(feed)


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
    """Publish the runs changing under ``root`` until ``stop`` is set. A root removed or moved away (a
    user's ``rm -rf .metaflow``) is made again and watched anew: a watch on the removed folder would see
    nothing more, and the UI would never update again. A root that cannot be made yet is tried again every
    ``RETRY_S``; a watch that fails (inotify's watches run out on a very large datastore, a folder cannot be
    read, watchfiles' own errors) goes on by polling, and one that fails even so is tried again every
    ``RETRY_S``. Each failure is said once, and the feed never ends before ``stop``. Whenever a watch starts
    after none, every run is published (the new watch is in place before anything awaits, so a page
    refetching on that news misses nothing)."""
    root = root.resolve()  # (watchfiles names what changed by absolute paths)
    polling, down, said = False, False, set()
    while not stop.is_set():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # (its parent a file, or not writable: perhaps not for long)
            say_once(said, "made", f"cannot make {root} ({exc}): trying again every {RETRY_S:.0f} s")
            down = True
            await pause(stop)
            continue
        if down:
            changes.publish([EVERY_RUN])  # (what changed while there was no watch)
        down = True  # (however the watch ends, unless ``stop`` ends it)
        try:
            if not await _watch(root, changes, stop, force_polling=polling):
                return
        except Exception as exc:  # (an OSError, or watchfiles' errors as anyio groups them: ExceptionGroup)
            if polling:
                again = f"trying again every {RETRY_S:.0f} s"
                say_once(said, "polled", f"watching {root} by polling failed ({_why(exc)}): {again}")
                await pause(stop)
            else:
                say_once(said, "watched", f"watching {root} by polling ({_why(exc)})")
                polling = True


def _why(exc: BaseException) -> str:
    """What failed, in words: for an error anyio grouped, the errors in the group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_why(inner) for inner in exc.exceptions)
    return str(exc) or type(exc).__name__


def say_once(said: set[str], what: str, line: str) -> None:
    """Print ``line`` on stderr unless ``what`` failed before (a failure met again every few seconds): the live
    feed's followers say each kind of failure once and go on."""
    if what not in said:
        said.add(what)
        Console(stderr=True, soft_wrap=True).print(f"[yellow]{line}[/]")


async def pause(stop: asyncio.Event) -> None:
    """``RETRY_S``, or less once ``stop`` is set: a follower's wait before it tries again."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), RETRY_S)


async def _watch(root: Path, changes: Changes, stop: asyncio.Event, force_polling: bool) -> bool:
    """Publish until ``stop`` (False) or until ``root`` itself is removed (True; its watcher closed now)."""
    batches = watchfiles.awatch(
        root, stop_event=stop, debounce=DEBOUNCE_MS, step=50, force_polling=force_polling, recursive=True
    )
    async with contextlib.aclosing(batches):
        async for batch in batches:
            runs = {run for _, path in batch if (run := run_of(root, path))}
            if runs:
                changes.publish(runs)
            if any(change == watchfiles.Change.deleted and Path(path) == root for change, path in batch):
                return True
    return False
