"""What a notebook user waits for: the first sign that a run's first step is running, and a big value shown.

Both sides run in real kernels (jupyter_client), the same flow, the same
machine, one kernel per case so peak memory is the case's own:

* **run**: from sending the cell to the first message the front end gets
  saying the ``start`` step runs: the widget's state update under
  ``%mf_run`` (from the flow across cells), against Metaflow's NBRunner
  (the flow in one cell), whose first sign is the runtime's "Task is
  starting" line streamed into the cell. Then to the cell's end.
* **show**: a 1,000,000-row DataFrame artifact: ``%mf_show PATHSPEC frame``
  against the Client API's ``Task(...)["frame"].data`` displayed as pandas
  displays it; the cell's time, the bytes sent to the front end, and the
  kernel's peak RSS growth over the DataFrame's own size.

    python bench/notebook.py [--repeat 3] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.manager import start_new_kernel
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)

STEPS = """%%step start --next each --foreach items
self.items = list(range(4))

%%step each --next join
self.value = self.input * 2

%%step join --join --next end
self.total = sum(i.value for i in inputs)

%%step end
pass"""

PEER_FLOW = """from metaflow import FlowSpec, NBRunner, step


class NotebookBenchFlow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(4))
        self.next(self.each, foreach="items")

    @step
    def each(self):
        self.value = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


run = NBRunner(NotebookBenchFlow).nbrun()"""

FRAME_FLOW = """from metaflow import FlowSpec, Parameter, step


class FrameFlow(FlowSpec):
    rows = Parameter("rows", default=1_000_000, type=int)

    @step
    def start(self):
        import numpy as np
        import pandas as pd

        ids = np.arange(self.rows)
        scores = np.random.default_rng(0).random(self.rows)
        self.frame = pd.DataFrame({"id": ids, "score": scores, "label": np.where(ids % 2 == 0, "even", "odd")})
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FrameFlow()
"""

MAXRSS = "import resource\nresource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024"


class Kernel:
    """A real IPython kernel in ``folder``; ``run`` executes a cell and times what comes back."""

    def __init__(self, folder: Path) -> None:
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(folder))

    def run(self, code: str, first: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The cell's wall time, the time to the first message ``first`` accepts, the bytes of its outputs, and
        its result's text."""
        start = time.perf_counter()
        msg_id = self.client.execute(code)
        seen, size, result, error = None, 0, "", None
        while True:
            msg = self.client.get_iopub_msg(timeout=600)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if seen is None and first is not None and first(msg):
                seen = time.perf_counter() - start
            if kind in ("display_data", "execute_result", "stream", "comm_msg", "update_display_data"):
                size += len(json.dumps(content))
            if kind == "execute_result":
                result = content["data"].get("text/plain", "")
            if kind == "error":
                error = f"{content['ename']}: {content['evalue']}"
            if kind == "status" and content["execution_state"] == "idle":
                break
        if error:
            raise RuntimeError(f"{code.splitlines()[0]!r} failed: {error}")
        return {"seconds": time.perf_counter() - start, "first": seen, "bytes": size, "result": result}

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def _widget_running(msg: dict[str, Any]) -> bool:
    state = msg["content"].get("data", {}).get("state", {}) if msg["msg_type"] == "comm_msg" else {}
    return any(t.get("step_name") == "start" and t.get("status") == "running" for t in state.get("tasks", []))


def _line_running(msg: dict[str, Any]) -> bool:
    text = msg["content"].get("text", "") if msg["msg_type"] == "stream" else ""
    return "/start/" in text and "Task is starting" in text


def time_runs(folder: Path, repeat: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
    ours = Kernel(folder)
    try:
        ours.run("%load_ext metaflow_stack.notebook\n")
        ours.run("%flow NotebookBenchFlow")
        for cell in STEPS.split("\n\n"):
            ours.run(cell)
        for _ in range(repeat):
            results["ours"].append(ours.run("run = %mf_run\nrun.successful", _widget_running))
    finally:
        ours.close()
    peer = Kernel(folder)
    try:
        for _ in range(repeat):
            results["peer"].append(peer.run(PEER_FLOW + "\nrun.successful", _line_running))
    finally:
        peer.close()
    return results


def time_show(folder: Path, rows: int) -> dict[str, dict[str, Any]]:
    (folder / "frame_flow.py").write_text(FRAME_FLOW)
    done = subprocess.run(
        [sys.executable, "frame_flow.py", "run", "--rows", str(rows)], cwd=folder, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    pathspec = "FrameFlow/" + (folder / ".metaflow" / "FrameFlow" / "latest_run").read_text().strip() + "/start/1"
    cases = {
        "ours": f"%mf_show {pathspec} frame",
        "peer": f"from metaflow import Task\nTask({pathspec!r}, _namespace_check=False)['frame'].data",
    }
    measured = {}
    for name, code in [*cases.items(), *cases.items()]:  # the second round is kept: both with warm file caches
        kernel = Kernel(folder)
        try:
            kernel.run("import pandas, metaflow\n%load_ext metaflow_stack.notebook")  # imports: not the value's cost
            before = int(kernel.run(MAXRSS)["result"])
            shown = kernel.run(code)
            after = int(kernel.run(MAXRSS)["result"])
            frame = f"Task({pathspec!r}, _namespace_check=False)['frame'].data.memory_usage(deep=True).sum()"
            size = int(kernel.run(f"from metaflow import Task\nint({frame})")["result"])
            measured[name] = {**shown, "rss": after - before, "frame": size}
        finally:
            kernel.close()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    os.environ.setdefault("USER", "bench")
    with tempfile.TemporaryDirectory(prefix="bench-notebook-") as tmp:
        folder = Path(tmp)
        console.print(f"running the flow {args.repeat} times in each kernel ...")
        runs = time_runs(folder, args.repeat)
        console.print(f"showing a {args.rows:,}-row DataFrame ...")
        shows = time_show(folder, args.rows)

    table = Table(title=f"From %mf_run to the first step shown running (median of {args.repeat})")
    for column in ("path", "first step shown running s", "whole run s"):
        table.add_column(column, justify="right" if column != "path" else "left")
    labels = {"ours": "%mf_run, widget update (flow across 5 cells)", "peer": "NBRunner.nbrun(), streamed line (peer)"}
    for name, label in labels.items():
        first = statistics.median(r["first"] for r in runs[name] if r["first"] is not None)
        whole = statistics.median(r["seconds"] for r in runs[name])
        table.add_row(label, f"{first:.2f}", f"{whole:.2f}")
    Console().print(table)

    table = Table(title=f"Showing a {args.rows:,}-row DataFrame artifact")
    for column in ("path", "cell s", "bytes to the front end", "peak RSS growth MiB", "the frame in memory MiB"):
        table.add_column(column, justify="right" if column != "path" else "left")
    labels = {"ours": "%mf_show PATHSPEC frame", "peer": "Task(...)['frame'].data, pandas' display (peer)"}
    for name, label in labels.items():
        shown = shows[name]
        table.add_row(
            label,
            f"{shown['seconds']:.2f}",
            f"{shown['bytes']:,}",
            f"{shown['rss'] / 2**20:,.0f}",
            f"{shown['frame'] / 2**20:,.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
