"""A run's values in a notebook: found by name, shown bounded.

A value is loaded only when asked for, and what is displayed is bounded: a
DataFrame shows its first rows with its shape, anything else its ``repr``
cut at ``MAX_REPR`` characters with its full length said.
"""

from __future__ import annotations

import html
from typing import Any

from IPython.core.error import UsageError
from IPython.display import HTML

MAX_REPR = 10_000
DATAFRAME_ROWS = 50


def find(run: Any, name: str) -> Any:
    """``name``'s value in ``run``: from the last step that has it (end first, then back)."""
    for step in run:
        for task in step:
            if name in task:
                return task[name].data
    raise UsageError(f"no step of {run.pathspec} has an artifact {name!r}")


def task_value(pathspec: str, name: str) -> Any:
    """``name``'s value in the task ``pathspec`` (Flow/run/step/task), whatever the kernel's namespace."""
    from metaflow import Task
    from metaflow.exception import MetaflowInvalidPathspec, MetaflowNotFound

    try:
        task = Task(pathspec, _namespace_check=False)
    except (MetaflowNotFound, MetaflowInvalidPathspec):
        raise UsageError(f"no task {pathspec} (a task is Flow/run/step/task)") from None
    if name not in task:
        raise UsageError(f"{pathspec} has no artifact {name!r}")
    return task[name].data


class _Cut:
    """A ``repr`` cut short, displayed as its text (not as a quoted string)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def value(data: Any, name: str) -> Any:
    """What to display for ``data``: bounded."""
    head = getattr(data, "head", None)
    if callable(head) and hasattr(data, "shape") and hasattr(data, "to_html"):
        shape = " x ".join(str(n) for n in data.shape)
        title = f"<p><b>{html.escape(name)}</b>: {html.escape(type(data).__name__)}, {shape}</p>"
        return HTML(title + head(DATAFRAME_ROWS).to_html())
    text = repr(data)
    if len(text) > MAX_REPR:
        return _Cut(f"{text[:MAX_REPR]}\n... ({len(text)} characters in all)")
    return data
