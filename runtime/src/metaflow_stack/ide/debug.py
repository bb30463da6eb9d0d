"""The debug configuration behind the editor's "Debug step" and "Debug flow": no hand-written ``launch.json``.

A step is debugged with Metaflow's ``spin``: the step runs again, with the
code as it is now, against the inputs one of its tasks had in an earlier
run (the full task pathspec, so spin looks nothing up). The task is the
first completed one of that step in the newest recent run that has one, or
in the run the user chose. Without any, the whole flow runs instead. A flow is
debugged with ``run``. Either way spin and run start the step's code in a
child process, so the configuration asks debugpy to follow subprocesses
(``subProcess``), which is what lets breakpoints in a step body stop.

The configuration is the Python Debugger extension's (``type: debugpy``);
the editor starts it as it is, or saves it into ``launch.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from metaflow_stack.agent.queries import Queries
from metaflow_stack.agent.source import AgentError

#: Recent runs searched for a task of the step to spin on.
RUNS_SEARCHED = 20


def task_to_spin(queries: Queries, flow: str, step: str, run: str | None = None) -> str | None:
    """The first completed task of ``step`` in ``run`` (``Flow/123``), or in the newest of the flow's recent
    runs that has one; None when there is none to spin on."""
    if run is not None:
        runs = [run]
    else:
        try:
            runs = [found.pathspec for found in queries.list_runs(flow, limit=RUNS_SEARCHED).runs]
        except AgentError as exc:
            if exc.code == "not_found":  # the flow never ran here
                return None
            raise
    for pathspec in runs:
        tasks = queries.run_tasks(pathspec, step=step, status="completed", limit=1).tasks
        if tasks:
            return tasks[0].pathspec
    return None


def configuration(
    path: str, flow: str, step: str | None, task: str | None, python: str | None = None
) -> dict[str, Any]:
    """The debugpy launch configuration: spin ``step`` on ``task`` (``Flow/run/step/task``) when both are
    given, else run the whole flow; ``python``: the interpreter to debug with (default: the editor's)."""
    program = str(Path(path).resolve())
    if step is not None and task is not None:
        name, args = f"Debug step {step} (spin on {task})", ["spin", task]
    else:
        name, args = f"Debug flow {flow}", ["run"]
    config: dict[str, Any] = {
        "name": name,
        "type": "debugpy",
        "request": "launch",
        "program": program,
        "args": args,
        "cwd": os.getcwd(),  # where the flow's runs were made: spin finds the same datastore
        "console": "integratedTerminal",
        "subProcess": True,
        "justMyCode": True,
    }
    if python:
        config["python"] = python
    return config
