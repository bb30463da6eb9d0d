"""A foreach on ``@worker_pool`` against a plain foreach, every item a real Metaflow task in both.

One flow (start, a foreach over N items, a join, end), run on the local
datastore and metadata with 2 workers: plain (``--max-workers 2``, a new
interpreter per item, what Metaflow users have) and pooled (``--with
worker_pool:size=2``, the runtime allowed 4 tasks in flight so the next item
is already waiting in the pool). Two kinds of item: trivial (``out = input *
2``) and 50 ms of CPU work each. For each: the run's wall time; the span of
the foreach (first item created to last item finished, from the Client
API) and its cost per item; the CPU the run used (this process's children,
all of them). For the CPU-bound items, the span against the ideal (N x 50
ms / 2 workers) plus the trivial items' cost per item.

    python bench/worker_pool.py [--sizes 100,1000] [--only trivial|cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

FLOW = """
import time
from metaflow import FlowSpec, Parameter, step


class PoolBenchFlow(FlowSpec):
    n = Parameter("n", default=100, type=int)
    work = Parameter("work", default=0.0, type=float)

    @step
    def start(self):
        self.items = list(range(self.n))
        self.next(self.each, foreach="items")

    @step
    def each(self):
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

WORK_S = 0.05


def run(root: Path, n: int, work: float, pooled: bool) -> dict[str, float]:
    """One run in a fresh folder: wall time, foreach span and the CPU of every process it started."""
    folder = Path(tempfile.mkdtemp(dir=root))
    (folder / "pool_bench_flow.py").write_text(FLOW)
    line = [sys.executable, "pool_bench_flow.py", "--datastore-root", str(folder / ".metaflow"), "run"]
    line += ["--n", str(n), "--work", str(work), "--max-num-splits", str(n + 1)]
    line += ["--with", "worker_pool:size=2", "--max-workers", "4"] if pooled else ["--max-workers", "2"]
    env = {**os.environ, "METAFLOW_DEFAULT_METADATA": "local", "USER": os.environ.get("USER") or "bench"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(line, cwd=folder, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    read = subprocess.run([sys.executable, "-c", SPAN, str(folder), str(n)], capture_output=True, text=True, check=True)
    facts = json.loads(read.stdout)
    if not facts["ok"]:
        raise RuntimeError(f"the run of {n} items did not end with {n} successful items")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "span": facts["span"], "cpu": cpu}


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
    trivial_cost: dict[int, float] = {}
    kinds = [k for k in ("trivial", "cpu") if args.only in (None, k)]
    for kind in kinds:
        work = WORK_S if kind == "cpu" else 0.0
        for n in sizes:
            results = {}
            for pooled in (False, True):
                name = "@worker_pool local (size=2)" if pooled else "plain foreach (--max-workers 2)"
                with console.status(f"{kind}: {n} items, {name}"):
                    results[pooled] = run(root, n, work, pooled)
            for pooled, name in ((False, "plain foreach"), (True, "@worker_pool, local")):
                r = results[pooled]
                per_item = (r["span"] - (n * work / 2)) / n * 1000
                if kind == "trivial":
                    trivial_cost[(n, pooled)] = per_item
                ratio = results[False]["span"] / r["span"]
                label = f"{n} x {'trivial' if kind == 'trivial' else '50 ms CPU'}"
                table.add_row(
                    label,
                    name,
                    f"{r['wall']:.1f}",
                    f"{r['span']:.1f}",
                    f"{per_item:.1f}",
                    f"{r['cpu']:.1f}",
                    "1.0x" if not pooled else f"{ratio:.1f}x faster",
                )
                if kind == "cpu" and (n, pooled) in trivial_cost:
                    ideal = n * work / 2
                    bound = ideal + n * trivial_cost[(n, pooled)] / 1000
                    table.add_row(
                        "",
                        f"  ideal {ideal:.1f} s; ideal + trivial cost {bound:.1f} s",
                        "",
                        f"{r['span'] / bound:.0%} of that",
                        "",
                        "",
                        "",
                    )
    console.print(table)
    print(f"(cpus: {os.cpu_count()})", file=sys.stderr)


if __name__ == "__main__":
    main()
