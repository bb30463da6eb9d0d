"""The UI's live feed in-process: what each subscriber of ``Changes`` reads, however fast it reads, and
what it is told of a service's events, however malformed, and of a local datastore, even one removed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

from metaflow_stack.ui.changes import EVERY_RUN, PENDING_RUNS, Changes, Feed, watch
from metaflow_stack.ui.service_runs import ServiceRuns


def test_a_burst_reaches_a_reader_as_one_message_and_a_slow_reader_loses_nothing() -> None:
    async def scenario() -> None:
        changes = Changes()
        async with changes.subscribe() as slow, changes.subscribe() as quick:
            for number in range(1000):  # far more publishes than any buffer: the slow reader reads none of them yet
                changes.publish([f"Flow/{number % 3}"])
                if number == 10:
                    assert await quick.next() == ["Flow/0", "Flow/1", "Flow/2"]
            changes.publish(["Other/7", "Flow/1"])
            assert await slow.next() == ["Flow/0", "Flow/1", "Flow/2", "Other/7"]
            assert await quick.next() == ["Flow/0", "Flow/1", "Flow/2", "Other/7"]
            waiting = asyncio.ensure_future(slow.next())
            await asyncio.sleep(0.05)
            assert not waiting.done()  # nothing new: a reader waits, it is not answered empty
            changes.publish(["Flow/9"])
            assert await asyncio.wait_for(waiting, 5) == ["Flow/9"]

    asyncio.run(scenario())


def test_more_unread_runs_than_a_reader_holds_become_every_run() -> None:
    async def scenario() -> None:
        changes = Changes()
        async with changes.subscribe() as reader:
            changes.publish(f"Flow/{number}" for number in range(PENDING_RUNS + 1))
            changes.publish(["Flow/late"])  # still every run: nothing is held past the bound
            assert await reader.next() == [EVERY_RUN]
            changes.publish(["Flow/after"])
            assert await reader.next() == ["Flow/after"]
            changes.publish(["Flow/before", EVERY_RUN, "Flow/beside"])  # every run already says them
            assert await reader.next() == [EVERY_RUN]

    asyncio.run(scenario())


def test_malformed_events_from_the_service_are_skipped_and_the_feed_goes_on(tmp_path: Path) -> None:
    """A peer answering ``/events`` with events of every wrong shape, then closing: the feed publishes the
    well-formed ones, resumes after the last event, not before a bad one (for ever), and tells its readers
    to refetch every run (what the service's log no longer holds is not replayed)."""
    first = [
        (1, "[1, 2]"),
        (2, "not json"),
        (3, '{"flow_id": "Flow", "run_number": 5}'),
        (4, '{"flow_id": 7, "run_number": {}}'),
        (5, '{"flow_id": "Flow", "run_number": true}'),
    ]
    requests: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0].decode())
        head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        writer.write(head.encode())
        if len(requests) == 1:
            writer.write("".join(f"id: {seq}\ndata: {data}\n\n" for seq, data in first).encode())
            await writer.drain()
            writer.close()  # the stream ends: the feed resumes
            return
        await writer.drain()
        await asyncio.sleep(0.5)  # (the feed's "every run" for the drop is read first)
        writer.write(b'id: 6\ndata: {"flow_id": "Other", "run_number": "named-run"}\n\n')
        await writer.drain()
        await asyncio.sleep(30)  # the second stream stays open

    async def scenario() -> list[list[str]]:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        source = ServiceRuns(f"http://127.0.0.1:{port}", (str(tmp_path),))
        changes, stop = Changes(), asyncio.Event()
        async with changes.subscribe() as feed:
            following = asyncio.ensure_future(source.follow(changes, stop))
            read = [await asyncio.wait_for(feed.next(), 15) for _ in range(3)]
            stop.set()
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
        server.close()
        return read

    assert asyncio.run(scenario()) == [["Flow/5"], [EVERY_RUN], ["Other/named-run"]]
    assert requests == ["GET /events HTTP/1.1", "GET /events?since=5 HTTP/1.1"]


async def written_and_seen(root: Path, feed: Feed, run: str) -> list[str]:
    """Write into ``run``'s folder under ``root`` until ``feed`` names something (a watch takes a moment to
    start)."""
    for attempt in range(100):
        (root / run).mkdir(parents=True, exist_ok=True)
        (root / run / f"file-{attempt}").write_text("x")
        try:
            return await asyncio.wait_for(feed.next(), 0.5)
        except TimeoutError:
            continue
    raise AssertionError(f"the watch never named {run}")


def test_a_local_datastore_removed_and_made_again_is_still_watched(tmp_path: Path) -> None:
    """``rm -rf .metaflow`` under a running UI, then a new run: the watch on the removed folder would see
    nothing more; the feed says every run changed, then names the new run."""
    root = tmp_path / ".metaflow"

    async def scenario() -> list[list[str]]:
        changes, stop = Changes(), asyncio.Event()
        async with changes.subscribe() as feed:
            watching = asyncio.ensure_future(watch(root, changes, stop))
            read = [await written_and_seen(root, feed, "Flow/1")]
            shutil.rmtree(root)
            while (more := await asyncio.wait_for(feed.next(), 15)) != [EVERY_RUN]:
                assert more == ["Flow/1"], more  # (its files' removal, in a batch before the root's)
            read.append(more)
            while (more := await written_and_seen(root, feed, "Flow/2")) != ["Flow/2"]:
                assert more in (["Flow/1"], [EVERY_RUN]), more  # (the removal's own events, late)
            read.append(more)
            stop.set()
            await asyncio.wait_for(watching, 15)
        return read

    assert asyncio.run(scenario()) == [["Flow/1"], [EVERY_RUN], ["Flow/2"]]


def test_a_root_that_cannot_be_made_yet_is_watched_once_it_can_be(tmp_path: Path, capsys) -> None:
    """A root whose parent is a file (a path mistyped, a volume not yet mounted): the watch is not given up,
    it says why once and tries again; a run written before it is back is told as every run, and the runs
    written after are named."""
    blocker = tmp_path / "mounted"
    blocker.write_text("not a folder yet")
    root = blocker / ".metaflow"

    async def scenario() -> list[list[str]]:
        changes, stop = Changes(), asyncio.Event()
        async with changes.subscribe() as feed:
            watching = asyncio.ensure_future(watch(root, changes, stop))
            await asyncio.sleep(2.5)  # (more than one try)
            assert not watching.done()
            blocker.unlink()
            (root / "Flow" / "1").mkdir(parents=True)  # (before the watch's next try: no watch sees it)
            (root / "Flow" / "1" / "file").write_text("x")
            read = [await asyncio.wait_for(feed.next(), 15)]
            while (seen := await written_and_seen(root, feed, "Flow/2")) != ["Flow/2"]:
                assert seen in (["Flow/1"], [EVERY_RUN]), seen
            read.append(seen)
            stop.set()
            await asyncio.wait_for(watching, 15)
        return read

    assert asyncio.run(scenario()) == [[EVERY_RUN], ["Flow/2"]]
    said = capsys.readouterr().err
    assert said.count("cannot make") == 1 and "trying again every 2 s" in said, said
