"""A foreach on ``@worker_pool`` against a plain foreach, every item a real Metaflow task in both.

One flow (start, a foreach over N items, a join, end), run on the local
datastore and metadata with 2 workers: plain (``--max-workers 2``, a new
interpreter per item, what Metaflow users have) and pooled (``--with
worker_pool:size=2``, the runtime allowed 4 tasks in flight so the next item
is already waiting in the pool), with the local backend and, when
``redis-server`` is installed, the Redis backend (a throwaway server), and
the Ray backend (a Ray of the pool's own) when Ray is installed. With both
kinds of item, also: a Redis worker killed while it runs an item, and how
long until that item's retry starts elsewhere and the run ends. Two kinds of item: trivial (``out = input *
2``) and 50 ms of CPU work each. For each: the run's wall time; the span of
the foreach (first item created to last item finished, from the Client
API) and its cost per item; the CPU the run used (this process's children,
all those waited for: not Ray's workers, whose raylet ignores SIGCHLD, so
that no process is ever charged with their CPU). For the CPU-bound items,
the span against the ideal (N x 50 ms / 2 workers) plus the trivial items'
cost per item.

    python bench/worker_pool.py [--sizes 100,1000] [--only trivial|cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

# The throwaway servers the tests use (tests/devservers.py): not shipped in the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from devservers import redis_server

FLOW = """
import time
from metaflow import FlowSpec, Parameter, current, retry, step


class PoolBenchFlow(FlowSpec):
    n = Parameter("n", default=100, type=int)
    work = Parameter("work", default=0.0, type=float)
    hold = Parameter("hold", default=0.0, type=float)  # item 0's first attempt waits this long

    @step
    def start(self):
        self.items = list(range(self.n))
        self.next(self.each, foreach="items")

    @retry(times=1)
    @step
    def each(self):
        if self.input == 0 and current.retry_count == 0:
            time.sleep(self.hold)
        started = time.process_time()
        while time.process_time() - started < self.work:
            pass
        self.out = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.out for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PoolBenchFlow()
"""

#: Read in a process of its own: the span of the foreach, from the Client API.
SPAN = """
import json, sys
from metaflow import Flow, metadata, namespace
metadata("local@" + sys.argv[1])
namespace(None)
run = Flow("PoolBenchFlow").latest_run
tasks = list(run["each"])
first = min(t.created_at for t in tasks)
last = max(t.finished_at for t in tasks)
print(json.dumps({"ok": run.successful and len(tasks) == int(sys.argv[2]), "span": (last - first).total_seconds()}))
"""

#: When item 0's retry started, from its attempt metadata (seconds since the epoch).
RETRY_STARTED = """
import json, sys
from metaflow import Flow, metadata, namespace
metadata("local@" + sys.argv[1])
namespace(None)
task = next(t for t in Flow("PoolBenchFlow").latest_run["each"] if t.index == 0)
stamps = [m.created_at for m in task.metadata if m.name == "attempt" and m.value == "1"]
print(json.dumps({"attempts": task.current_attempt + 1, "retry_started_ms": min(stamps) if stamps else None}))
"""

WORK_S = 0.05
#: Item 0's first attempt in the re-delivery measurement: long enough to be killed mid-item.
HOLD_S = 30.0


def run(root: Path, n: int, work: float, backend: str | None, redis_url: str | None = None) -> dict[str, float]:
    """One run in a fresh folder (``backend``: the pool's, None for a plain foreach): wall time, foreach
    span and the CPU of every process it started."""
    folder = Path(tempfile.mkdtemp(dir=root))
    (folder / "pool_bench_flow.py").write_text(FLOW)
    line = [sys.executable, "pool_bench_flow.py", "--datastore-root", str(folder / ".metaflow"), "run"]
    line += ["--n", str(n), "--work", str(work), "--max-num-splits", str(n + 1)]
    if backend is None:
        line += ["--max-workers", "2"]
    else:
        line += ["--with", f"worker_pool:size=2,backend={backend}", "--max-workers", "4"]
    env = {**os.environ, "METAFLOW_DEFAULT_METADATA": "local", "USER": os.environ.get("USER") or "bench"}
    if redis_url:
        env["METAFLOW_STACK_POOL_REDIS_URL"] = redis_url
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(line, cwd=folder, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    read = subprocess.run([sys.executable, "-c", SPAN, str(folder), str(n)], capture_output=True, text=True, check=True)
    facts = json.loads(read.stdout)
    if not facts["ok"]:
        raise RuntimeError(f"the run of {n} items did not end with {n} successful items")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "span": facts["span"], "cpu": cpu}


def _command(process: psutil.Process) -> str:
    """A process's command line; empty once it is gone (or a zombie)."""
    with contextlib.suppress(psutil.Error):
        return " ".join(process.cmdline())
    return ""


def redelivery(root: Path, n: int, redis_url: str) -> dict[str, float]:
    """A Redis pool's worker killed while it runs item 0 (the rest done): seconds from the kill to the
    item's next attempt starting on another worker, and to the run's end."""
    folder = Path(tempfile.mkdtemp(dir=root))
    (folder / "pool_bench_flow.py").write_text(FLOW)
    line = [sys.executable, "pool_bench_flow.py", "--datastore-root", str(folder / ".metaflow"), "run"]
    line += ["--n", str(n), "--hold", str(HOLD_S), "--with", "worker_pool:size=2,backend=redis", "--max-workers", "4"]
    env = {**os.environ, "METAFLOW_DEFAULT_METADATA": "local", "USER": os.environ.get("USER") or "bench"}
    env["METAFLOW_STACK_POOL_REDIS_URL"] = redis_url
    runtime = subprocess.Popen(line, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    busy: list = []
    while time.monotonic() < deadline:
        workers = [p for p in psutil.Process(runtime.pid).children() if "redis_worker" in _command(p)]
        busy = [w for w in workers if w.children()]
        if len(workers) == 2 and len(busy) == 1 and (folder / ".metaflow").exists():
            time.sleep(1.0)  # the other items done; item 0 held
            if len([w for w in workers if w.children()]) == 1:
                break
        time.sleep(0.1)
    else:
        runtime.kill()
        raise RuntimeError("item 0 never ran alone on one worker")
    killed = time.time()
    busy[0].kill()
    if runtime.wait(timeout=600) != 0:
        raise RuntimeError("the run with a killed worker failed")
    ended = time.time()
    read = subprocess.run(
        [sys.executable, "-c", RETRY_STARTED, str(folder)], capture_output=True, text=True, check=True
    )
    facts = json.loads(read.stdout)
    if facts["attempts"] != 2 or facts["retry_started_ms"] is None:
        raise RuntimeError(f"item 0 was not re-run once: {facts}")
    return {"retry": facts["retry_started_ms"] / 1000 - killed, "end": ended - killed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="numbers of items, comma-separated")
    parser.add_argument("--only", choices=("trivial", "cpu"))
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    console = Console(stderr=True)
    root = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    table = Table(title="foreach, 2 workers, local datastore and metadata; every item a Metaflow task")
    for column in ("items", "runner", "wall s", "foreach span s", "per item ms", "CPU s (all processes)", "vs plain"):
        table.add_column(column, justify="left" if column in ("items", "runner") else "right")
    runners = {"plain foreach": None, "@worker_pool, local": "local"}
    redis_url = None
    with contextlib.ExitStack() as stack:
        if shutil.which("redis-server"):
            redis_url = stack.enter_context(redis_server(root / "redis"))
            runners["@worker_pool, redis"] = "redis"
        if importlib.util.find_spec("ray"):
            runners["@worker_pool, ray"] = "ray"
        trivial_cost: dict[tuple[int, str], float] = {}
        for kind in [k for k in ("trivial", "cpu") if args.only in (None, k)]:
            work = WORK_S if kind == "cpu" else 0.0
            for n in sizes:
                results = {}
                for name, backend in runners.items():
                    with console.status(f"{kind}: {n} items, {name}"):
                        results[name] = run(root, n, work, backend, redis_url)
                for name, r in results.items():
                    per_item = (r["span"] - (n * work / 2)) / n * 1000
                    if kind == "trivial":
                        trivial_cost[(n, name)] = per_item
                    speedup = results["plain foreach"]["span"] / r["span"]
                    label = f"{n} x {'trivial' if kind == 'trivial' else '50 ms CPU'}"
                    cpu = f"{r['cpu']:.1f}" + ("*" if runners[name] == "ray" else "")
                    cells = [f"{r['wall']:.1f}", f"{r['span']:.1f}", f"{per_item:.1f}", cpu]
                    versus = f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"
                    table.add_row(label, name, *cells, "1.0x" if runners[name] is None else versus)
                    if kind == "cpu" and (n, name) in trivial_cost:
                        ideal = n * work / 2
                        bound = ideal + n * trivial_cost[(n, name)] / 1000
                        note = f"  ideal {ideal:.1f} s; ideal + trivial cost {bound:.1f} s"
                        table.add_row("", note, "", f"{r['span'] / bound:.0%} of that", "", "", "")
        out = Console(width=160)  # (on standard output, wide enough when it is not a terminal)
        out.print(table)
        if "ray" in runners.values():
            print("* without Ray's workers: its raylet ignores SIGCHLD, so the kernel counts their CPU to no one")
        if redis_url and not args.only:
            with console.status("redis: a worker killed mid-item"):
                lost = redelivery(root, 20, redis_url)
            from metaflow_stack.pool.redis_queue import LEASE_S

            again = Table(title="redis backend: the worker running an item killed (20 items, 2 workers, @retry)")
            for column in ("lease s", "kill to the item's retry starting s", "kill to the run's end s"):
                again.add_column(column, justify="right")
            again.add_row(str(LEASE_S), f"{lost['retry']:.1f}", f"{lost['end']:.1f}")
            out.print(again)
    print(f"(cpus: {os.cpu_count()})", file=sys.stderr)


if __name__ == "__main__":
    main()
