"""The UI's live feed in-process: what each subscriber of ``Changes`` reads, however fast it reads."""

from __future__ import annotations

import asyncio

from metaflow_stack.ui.changes import EVERY_RUN, PENDING_RUNS, Changes


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

    asyncio.run(scenario())
