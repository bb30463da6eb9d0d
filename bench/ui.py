"""How fast the UI answers on a big local datastore: ``metaflow ui`` against metaflow-local-service.

Builds a datastore from a real run of a small foreach flow: that run cloned
into ``--runs`` runs (each file rewritten with its new run id and start
time), and one run whose foreach is cloned out to ``--tasks`` tasks (each
with its own task id and foreach item). Then, on the same datastore:

- the runs list: ours (``/api/runs``, a page of 50 with statuses) against
  metaflow-local-service 0.2.0's UI API (``/api/flows/{flow}/runs``: every
  run, unpaged), the standalone server the Metaflow UI runs on without
  PostgreSQL;
- the run page's data: ours (``/api/runs/{flow}/{run}``: summary, graph,
  every task) against the peer's three requests for the same page (run,
  tasks, dag);
- the pages in Chromium (ours only: the peer's front end is a Docker image):
  from navigation to the runs table drawn, and to the 1000-task DAG drawn;
- live updates: with the 1000-task run page open, a task folder appears in
  the datastore (as when Metaflow launches a task) and the clock runs until
  the DAG shows one more item cell, without a reload.

Request times are medians after one warm-up request; the first (cold)
request's time is shown beside them.

    python bench/ui.py [--runs 1000] [--tasks 1000] [--repeat 5] [--no-peer] [--no-browser]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

# The throwaway servers the tests use (tests/devservers.py): not shipped in the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from devservers import free_port

console = Console(stderr=True)
CHROMIUM = Path(os.environ.get("STACK_TEST_CHROMIUM", "/usr/bin/chromium"))
FLOW_NAME = "UiBenchFlow"
ITEM = re.compile(r'"items=\d+"')
FLOW = """
from metaflow import FlowSpec, step


class UiBenchFlow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(3))
        self.next(self.work, foreach="items")

    @step
    def work(self):
        self.value = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    UiBenchFlow()
"""


def real_run(root: Path) -> str:
    (root / "ui_bench_flow.py").write_text(FLOW)
    env = {**os.environ, "METAFLOW_DEFAULT_METADATA": "local", "USER": os.environ.get("USER") or "bench"}
    command = [sys.executable, "ui_bench_flow.py", "--datastore-root", str(root / ".metaflow"), "run"]
    done = subprocess.run([*command, "--run-id-file", "run-id"], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return (root / "run-id").read_text()


def _rewrite(folder: Path, replace: Callable[[str], str]) -> None:
    for path in folder.rglob("*.json"):
        path.write_text(replace(path.read_text()))


def clone_runs(flow: Path, run: str, count: int) -> None:
    """``count - 1`` copies of ``run``, ids and start times shifted, so the flow has ``count`` runs."""
    started = json.loads((flow / run / "_meta" / "_self.json").read_text())["ts_epoch"]
    for n in range(1, count):
        new = str(int(run) - n)
        shutil.copytree(flow / run, flow / new)
        _rewrite(flow / new, lambda text, new=new: text.replace(run, new))
        meta = flow / new / "_meta" / "_self.json"
        row = json.loads(meta.read_text())
        row["ts_epoch"] = started - n * 60_000
        meta.write_text(json.dumps(row))


def widen(flow: Path, run: str, width: int) -> str:
    """A copy of ``run`` whose ``work`` step has ``width`` tasks, item ``i`` of the foreach each."""
    wide = str(int(run) + 1)
    shutil.copytree(flow / run, flow / wide)
    _rewrite(flow / wide, lambda text: text.replace(run, wide))
    work = flow / wide / "work"
    template = min((p for p in work.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    first = 1_000_000
    for i in range(width):
        task = work / str(first + i)
        shutil.copytree(template, task)
        _rewrite(
            task,
            lambda text, i=i, task=task: ITEM.sub(f'"items={i}"', text).replace(
                f'"task_id": "{template.name}"', f'"task_id": "{task.name}"'
            ),
        )
    for old in work.iterdir():
        if old.name.isdigit() and int(old.name) < first:
            shutil.rmtree(old)
    return wide


def wait_for(url: str, process: subprocess.Popen) -> None:
    for _ in range(600):
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"{process.args[0]} did not answer at {url}")


def serve(command: list[str], ready: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(ready, process)
    except SystemExit:
        process.terminate()
        raise
    return process


def timed(urls: list[str], repeat: int) -> tuple[float, float, int]:
    """Median milliseconds to fetch every URL in turn (after one warm-up), the warm-up's (cold) milliseconds,
    and the bytes received."""
    times, size = [], 0
    with httpx.Client(timeout=600) as http:
        for _ in range(repeat + 1):
            started = time.perf_counter()
            size = sum(len(http.get(url).raise_for_status().content) for url in urls)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[1:]), times[0], size


def live_ms(url: str, step: Path, repeat: int) -> float:
    """Median milliseconds from a new task folder under ``step`` to its cell on the open run page."""
    from playwright.sync_api import sync_playwright

    template = next(p for p in step.iterdir() if p.name.isdigit())
    count = sum(1 for p in step.iterdir() if p.name.isdigit())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector(f"[data-step='{step.name}'] [data-items='{count}']", timeout=60_000)
        times = []
        for n in range(repeat):
            staged = step.parents[3] / f"staged-{n}"  # beside the datastore, on the same file system
            shutil.copytree(template, staged)  # then one rename: the task appears at once, as Metaflow's does
            started = time.perf_counter()
            staged.rename(step / str(2_000_000 + n))
            count += 1
            page.wait_for_selector(f"[data-step='{step.name}'] [data-items='{count}']", timeout=60_000)
            times.append((time.perf_counter() - started) * 1000)
        browser.close()
    return statistics.median(times)


def browser_ms(url: str, selector: str, repeat: int) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        times = []
        for round_ in range(repeat + 1):
            started = time.perf_counter()
            page.goto(url)
            page.wait_for_selector(selector, timeout=60_000)
            if round_:
                times.append((time.perf_counter() - started) * 1000)
        browser.close()
    return statistics.median(times)


def peer_path(root: Path) -> Path:
    """metaflow-local-service 0.2.0 installed alone (its dependencies are this environment's)."""
    target = root / "peer"
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    command = [uv, "pip", "install", "--quiet", "--no-deps", "--target", str(target), "metaflow-local-service==0.2.0"]
    subprocess.run(command, check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs in the flow")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks in the wide run's foreach")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per measurement (median)")
    parser.add_argument("--no-peer", action="store_true", help="skip metaflow-local-service")
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium timings")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    processes: list[subprocess.Popen] = []
    try:
        with console.status(f"building a datastore: {args.runs} runs and a {args.tasks}-task run"):
            run = real_run(root)
            flow = root / ".metaflow" / FLOW_NAME
            wide = widen(flow, run, args.tasks)
            clone_runs(flow, run, args.runs - 1)
        ours_port = free_port()
        metaflow = str(Path(sys.executable).with_name("metaflow"))
        ours = f"http://127.0.0.1:{ours_port}"
        command = [
            metaflow,
            "ui",
            "--port",
            str(ours_port),
            "--no-browser",
            "--datastore-root",
            str(root / ".metaflow"),
        ]
        processes.append(serve(command, f"{ours}/api/source"))
        table = Table(
            title=f"UI on a local datastore: {args.runs} runs, a {args.tasks}-task run (median of {args.repeat})"
        )
        for column in (
            "what",
            "metaflow ui: requests",
            "ms",
            "KB",
            "metaflow-local-service 0.2.0: requests",
            "ms",
            "KB",
        ):
            table.add_column(column)
        peer = None
        if not args.no_peer:
            with console.status("installing metaflow-local-service 0.2.0"):
                target = peer_path(root)
            peer_port = free_port()
            peer = f"http://127.0.0.1:{peer_port}"
            daemon = [sys.executable, "-m", "metaflow_local_service.daemon", "--port", str(peer_port)]
            daemon += ["--metaflow-root", str(root), "--idle-timeout", "3600"]
            processes.append(serve(daemon, f"{peer}/ping", {**os.environ, "PYTHONPATH": str(target)}))
        rows = [
            (
                "runs list",
                "GET /api/runs (a page of 50)",
                [f"{ours}/api/runs?flow={FLOW_NAME}&limit=50"],
                "GET .../runs (all of them)",
                [f"{peer}/api/flows/{FLOW_NAME}/runs"],
            ),
            (
                f"{args.tasks}-task run page data",
                "GET /api/runs/{flow}/{run}",
                [f"{ours}/api/runs/{FLOW_NAME}/{wide}"],
                "GET run + tasks + dag",
                [f"{peer}/api/flows/{FLOW_NAME}/runs/{wide}{suffix}" for suffix in ("", "/tasks", "/dag")],
            ),
        ]
        for label, mine_label, mine, theirs_label, theirs in rows:
            with console.status(label):
                ms, first, size = timed(mine, args.repeat)
                cells = [label, mine_label, f"{ms:,.0f} (first {first:,.0f})", f"{size / 1024:,.0f}"]
                if peer is not None:
                    peer_ms, peer_first, peer_size = timed(theirs, args.repeat)
                    cells += [theirs_label, f"{peer_ms:,.0f} (first {peer_first:,.0f})", f"{peer_size / 1024:,.0f}"]
                else:
                    cells += ["(skipped)", "", ""]
                table.add_row(*cells)
        if not args.no_browser and CHROMIUM.exists():
            for label, path, selector in (
                ("runs list drawn in Chromium", f"/?flow={FLOW_NAME}", "[data-run]"),
                (f"{args.tasks}-task run page drawn in Chromium", f"/{FLOW_NAME}/{wide}", "svg.dag [data-step='end']"),
            ):
                with console.status(label):
                    ms = browser_ms(f"{ours}{path}", selector, args.repeat)
                table.add_row(label, f"open {path}", f"{ms:,.0f}", "", "(its front end is a Docker image)", "", "")
            with console.status("live update"):
                ms = live_ms(f"{ours}/{FLOW_NAME}/{wide}", flow / wide / "work", args.repeat)
            row = ("a new task drawn on the open run page", "file event, SSE, refetch", f"{ms:,.0f}")
            table.add_row(*row, "", "", "", "")
        Console(width=180).print(table)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
