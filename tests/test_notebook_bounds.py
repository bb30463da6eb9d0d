"""Hostile values and hostile output, no kernel: ``%mf_show``'s renderers stay bounded in time and size on
values built to blow them up; the live DAG reads only the runtime's own task messages, never a task's
prints, never breaks the stream it reads, and sends a foreach of thousands as a bounded sample with true
counts."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import sys
import time
import types

import numpy as np
import pandas as pd
import pytest

from metaflow_stack.notebook import show
from metaflow_stack.notebook.progress import SHOWN_PER_STEP, Changed, Progress
from metaflow_stack.notebook.widget import DagWidget


def _nested() -> list:
    """One list referenced 50 times a level, 7 levels: 50^7 leaves in a few KiB."""
    nested: list = [0] * 50
    for _ in range(6):
        nested = [nested] * 50
    return nested


def _shared_tuples() -> tuple:
    """One tuple referenced 100 times a level, 4 levels: 10^8 leaves in an 857-byte pickle."""
    shared: tuple = (0,) * 100
    for _ in range(3):
        shared = (shared,) * 100
    return shared


@dataclasses.dataclass(frozen=True)
class Held:
    value: object


def _object_array() -> np.ndarray:
    held = np.empty(3, dtype=object)
    held[:] = [_shared_tuples(), types.SimpleNamespace(value=_shared_tuples()), "text"]
    return held


#: (name, how to build it): each cheap to build or to hold, each able to stall a naive renderer (built in the
#: test, so none outlives it).
HOSTILE = [
    ("shared", _nested),
    ("deep array", lambda: np.zeros((8,) * 8)),  # numpy prints every item of short axes: 16M numbers
    ("wide frame", lambda: pd.DataFrame(np.zeros((60, 20_000)))),
    ("big bytes", lambda: b"x" * 200_000_000),
    ("big set", lambda: set(range(2_000_000))),
    ("deque", lambda: collections.deque(range(2_000_000))),
    ("keys", lambda: dict.fromkeys(range(2_000_000)).keys()),
    ("huge int", lambda: 7**200_000),
    ("a class", lambda: type("Model", (), {"fit": lambda self: None, "get_params": lambda self: {}})),
    ("namespace", lambda: types.SimpleNamespace(value=_shared_tuples())),
    ("dataclass", lambda: Held(_shared_tuples())),
    ("set of shared", lambda: {_shared_tuples(), 1}),
    ("object array", _object_array),
    ("long key", lambda: {"k" * 5_000_000: 1}),
    ("long column", lambda: pd.DataFrame({"c" * 5_000_000: [1], (_shared_tuples(),): [2]})),
]


@pytest.mark.parametrize(("name", "build"), HOSTILE, ids=[name for name, _ in HOSTILE])
def test_a_hostile_value_is_shown_quickly_and_small(name: str, build: object) -> None:
    data = build()
    started = time.perf_counter()
    shown = show.value(data, name)
    elapsed = time.perf_counter() - started
    size = sum(len(part) if isinstance(part, str) else len(str(part)) for part in shown.bundle.values())
    assert size < 400_000, (name, size)
    assert elapsed < 5, (name, elapsed)  # a bound, not a benchmark: the naive renderers take minutes or never end
    assert shown.bundle["text/plain"]


def test_a_wide_frame_says_which_columns_it_shows_and_the_next_page_keeps_the_pathspec() -> None:
    shown = show.value(pd.DataFrame(np.zeros((60, 200))), "wide", how="Flow/1/start/2 wide")
    assert "the first 49 of 200 columns" in shown.bundle["text/plain"]
    assert "next: %mf_show Flow/1/start/2 wide --page 2" in shown.bundle["text/plain"]
    assert shown.bundle["text/html"].count("<th>") == 50


GRAPH = {
    "steps": {
        "start": {"type": "split-foreach", "next": ["each"], "inside_foreach": False},
        "each": {"type": "linear", "next": ["end"], "inside_foreach": True},
        "end": {"type": "end", "next": [], "inside_foreach": False},
    }
}


def test_only_the_runtimes_own_messages_move_a_task() -> None:
    told: list[list[dict]] = []
    progress = Progress("LiveFlow", GRAPH, lambda tasks, counts: told.append(tasks))
    lines = [
        "2026-12-03 01:00:00.000 [7/start/1 (pid 10)] Task is starting.",
        "2026-12-03 01:00:00.100 [7/start/1 (pid 10)] Task failed to fetch the data, retrying",  # a print
        "2026-12-03 01:00:00.200 [7/start/1 (pid 10)] Task finished successfully.",
        "2026-12-03 01:00:00.300 [7/each/2 (pid 11)] Task is starting.",
        "2026-12-03 01:00:00.400 [7/each/2 (pid 11)] Task failed.",
        "2026-12-03 01:00:00.500 [7/each/2 (pid 12)] Task is starting (retry).",
        "2026-12-03 01:00:00.600 [7/each/2 (pid 12)] Task finished successfully.",
        "2026-12-03 01:00:00.700 [7/each/3 (pid 13)] Task is starting.",
        "2026-12-03 01:00:00.800 [7/each/3 (pid 13)] [KILLED BY ORCHESTRATOR]",
        "2026-12-03 01:00:00.900 [7/end/4] Cloning previously run task LiveFlow/6/end/4",
        "2026-12-03 01:00:01.000 [7/nosuchstep/5 (pid 14)] Task is starting.",
    ]
    for line in lines:
        progress.feed(line)
    tasks = {t["pathspec"]: (t["status"], t["attempt"], t["foreach"]) for t in progress.tasks()}
    assert tasks == {
        "LiveFlow/7/start/1": ("completed", 0, []),
        "LiveFlow/7/each/2": ("completed", 1, ["item 0"]),
        "LiveFlow/7/each/3": ("killed", 0, ["item 1"]),
        "LiveFlow/7/end/4": ("completed", 0, []),
    }
    assert progress.run_id == "7"
    assert told == []  # feeding never tells: the flusher does, so the run's output never waits on the front end
    progress.flush()
    assert [t["status"] for t in told[-1]] == ["completed", "completed", "killed", "completed"]


def test_following_a_run_never_breaks_its_output() -> None:
    def broken(tasks: list[dict], counts: dict) -> None:
        raise RuntimeError("the front end went away")

    progress = Progress("LiveFlow", GRAPH, broken)
    shown, real = io.StringIO(), sys.stdout
    sys.stdout = shown
    try:
        with progress.watching():
            print("[7/start/1 (pid 10)] Task is starting.")
            print("[7/start/1 (pid 10)] Task finished successfully.")
            print("plain output")
    finally:
        sys.stdout = real
    assert shown.getvalue().count("\n") == 3  # every line still reached the cell
    assert [t["status"] for t in progress.tasks()] == ["completed"]


def _big_foreach(changed: Changed) -> Progress:
    """A foreach of 5,000 items as the runtime announces it: 4,990 done (12 on a second attempt), then 7 failed
    and 3 still running, all past the first 400."""
    progress = Progress("BigFlow", GRAPH, changed)
    progress.feed("[7/start/1 (pid 10)] Task is starting.")
    progress.feed("[7/start/1 (pid 10)] Task finished successfully.")
    for i in range(2, 5002):
        progress.feed(f"[7/each/{i} (pid {i})] Task is starting.")
    for i in range(2, 14):
        progress.feed(f"[7/each/{i} (pid {i})] Task is starting (retry).")
    for i in range(2, 4992):
        progress.feed(f"[7/each/{i} (pid {i})] Task finished successfully.")
    for i in range(4992, 4999):
        progress.feed(f"[7/each/{i} (pid {i})] Task failed.")
    progress.flush()
    return progress


def test_a_foreach_of_thousands_reaches_the_front_end_as_a_bounded_sample_with_true_counts() -> None:
    told: list[tuple[list[dict], dict]] = []
    _big_foreach(lambda tasks, counts: told.append((tasks, counts)))
    ((tasks, counts),) = told
    assert len(json.dumps([tasks, counts])) < 200_000  # the whole list is over 800 KB, sent on every update
    assert counts["each"] == {"total": 5000, "running": 3, "completed": 4990, "failed": 7, "killed": 0, "retried": 12}
    assert counts["start"] == {"total": 1, "running": 0, "completed": 1, "failed": 0, "killed": 0, "retried": 0}
    each = [task for task in tasks if task["step_name"] == "each"]
    assert len(each) == SHOWN_PER_STEP
    # every failure (to click) and every running task is drawn, the rest from the first done; in their order
    assert collections.Counter(task["status"] for task in each) == {"completed": 390, "failed": 7, "running": 3}
    ids = [int(task["pathspec"].rsplit("/", 1)[1]) for task in each]
    assert ids == sorted(ids) and ids[:390] == list(range(2, 392))


def test_a_saved_notebook_counts_every_task_of_a_foreach_of_thousands() -> None:
    dag = DagWidget(GRAPH)
    _big_foreach(dag.show)
    assert len(dag.tasks) == 1 + SHOWN_PER_STEP
    static = dag.static_html()
    assert '<tr data-step="each" data-status="running">' in static
    assert "<td>4990/5000 done, 7 failed, 12 retried</td>" in static
