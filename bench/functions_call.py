"""Call overhead, throughput and cold start of bound functions, per backend.

Trains IrisTrainFlow (tests/functions_app) on a temporary local datastore,
binds ``echo`` and ``predict`` to its train task, then measures, for the
``inprocess``, ``local`` and ``ray`` backends: latency p50/p99, calls/s and the
caller's CPU time per call, for a small dict and for 1k, 10k and 1M floats,
from 1 and 4 threads; local throughput with 1 and 2 worker processes; and
cold start (load + first call) with the environment recreated from scratch
and with it cached. The peer, metaflow-functions 0.2.12, cannot run beside
Metaflow Stack (installing it disables Metaflow's other plugins), so its
figures measured on the same kind of machine are printed as the baseline.

    python bench/functions_call.py [--quick] [--no-ray]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

APP = Path(__file__).resolve().parents[1] / "tests" / "functions_app"
FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}

#: metaflow-functions 0.2.12 on a 2-core machine like ours (p50 ms; see docs/benchmarks.md).
PEER = {
    ("inprocess", "small dict"): 0.005,
    ("local", "small dict"): 1.21,
    ("local", "1k floats"): 12.6,
    ("local", "10k floats"): 110.0,
    ("ray", "small dict"): 1.36,
}


def trained_task(prefix: str) -> tuple[Path, Any]:
    """A fresh state and datastore in a temporary folder, IrisTrainFlow run there, and its train task."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["METAFLOW_STACK_STATE_DIR"] = str(work / "state")
    if os.environ.get("USER", "root") == "root":
        os.environ["USER"] = "bench"  # Metaflow refuses to run without a user name, and as root
    sys.path.insert(0, str(APP))
    shutil.copy(APP / "train_flow.py", work)
    subprocess.run(
        [sys.executable, "train_flow.py", "--datastore-root", str(work / ".metaflow"), "run", "--run-id-file", "id"],
        cwd=work,
        check=True,
        capture_output=True,
    )
    from metaflow import Run, metadata, namespace

    metadata(f"local@{work}")
    namespace(None)
    return work, Run(f"IrisTrainFlow/{(work / 'id').read_text().strip()}")["train"].task


def measure(call: Callable[[Any], Any], payload: Any, calls: int, threads: int) -> dict[str, float]:
    """Latency percentiles (ms), calls/s and caller CPU per call (ms)."""
    for _ in range(min(20, calls)):
        call(payload)  # warm

    def timed(_: int) -> float:
        started = time.perf_counter()
        call(payload)
        return time.perf_counter() - started

    cpu, wall = time.process_time(), time.perf_counter()
    if threads == 1:
        latencies = [timed(i) for i in range(calls)]
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            latencies = list(pool.map(timed, range(calls)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    latencies.sort()
    return {
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "rate": calls / wall,
        "cpu": cpu / calls * 1000,
        "wall": wall / calls * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    args = parser.parse_args()
    console = Console()
    scale = 0.1 if args.quick else 1.0

    work, task = trained_task("bench-functions-")

    import iris_functions
    from metaflow import JsonFunction, function_from_json

    from metaflow_stack.functions import environment

    echo_ref = JsonFunction(iris_functions.echo, task=task).reference
    predict_ref = JsonFunction(iris_functions.predict, task=task).reference

    payloads = {
        "small dict": ({"x": 1, "y": "two", "z": [3.0]}, 4000),
        "1k floats": ({"values": [i / 3 for i in range(1_000)]}, 1000),
        "10k floats": ({"values": [i / 3 for i in range(10_000)]}, 300),
        "1M floats": ({"values": [i / 3 for i in range(1_000_000)]}, 5),
    }
    rows = []

    params = None

    def plain(payload: Any) -> Any:
        return iris_functions.echo(payload, params)

    for name in ("small dict", "10k floats"):
        payload, calls = payloads[name]
        rows.append(("plain call (no backend)", name, 1, measure(plain, payload, int(calls * scale) or 1, 1)))

    backends = ["inprocess", "local"] + ([] if args.no_ray else ["ray"])
    for backend in backends:
        options = {"local": {"workers": 2}, "ray": {"workers": 2, "num_cpus": 0.5}}.get(backend, {})
        with function_from_json(echo_ref, backend=backend, **options) as fn:
            for name, (payload, calls) in payloads.items():
                for threads in (1, 4):
                    if name == "1M floats" and threads == 4:
                        continue
                    rows.append((backend, name, threads, measure(fn, payload, max(int(calls * scale), 5), threads)))

    table = Table(title="bound function calls (echo): latency, throughput, caller CPU")
    for column in ("backend", "payload", "threads", "p50 µs", "p99 µs", "calls/s", "caller CPU µs/call", "peer p50 µs"):
        table.add_column(column, justify="left" if column in ("backend", "payload") else "right")
    for backend, name, threads, m in rows:
        peer = PEER.get((backend, name)) if threads == 1 else None
        table.add_row(
            backend,
            name,
            str(threads),
            f"{m['p50'] * 1000:.1f}",
            f"{m['p99'] * 1000:.1f}",
            f"{m['rate']:.0f}",
            f"{m['cpu'] * 1000:.1f}",
            f"{peer * 1000:g}" if peer else "",
        )
    console.print(table)

    scaling = Table(title="local backend throughput, sklearn predict, 4 caller threads")
    for column in ("workers", "calls/s", "p50 ms"):
        scaling.add_column(column, justify="right")
    for workers in (1, 2):
        with function_from_json(predict_ref, backend="local", workers=workers) as fn:
            m = measure(fn, FLOWER, int(3000 * scale) or 100, 4)
            scaling.add_row(str(workers), f"{m['rate']:.0f}", f"{m['p50']:.3f}")
    console.print(scaling)

    cold = Table(title="cold start: load + first call (local backend, in the function's own environment)")
    for column in ("case", "echo s", "predict s"):
        cold.add_column(column, justify="left" if column == "case" else "right")
    environment.matches_current = lambda env: False  # force the isolated path, as for a foreign environment
    for case in ("environment recreated (uv cache warm)", "environment cached"):
        seconds = []
        for ref, payload in ((echo_ref, {}), (predict_ref, FLOWER)):
            started = time.perf_counter()
            with function_from_json(ref, backend="local") as fn:
                fn(payload)
            seconds.append(f"{time.perf_counter() - started:.2f}")
        cold.add_row(case, *seconds)
    python = environment.interpreter(JsonFunction(iris_functions.echo, task=task).bound.environment).python
    started = time.perf_counter()
    subprocess.run([str(python), "-c", "import sklearn.linear_model"], check=True)
    cold.add_row("floor: a new Python importing sklearn.linear_model", "", f"{time.perf_counter() - started:.2f}")
    cold.add_row("peer: metaflow-functions memory backend (baseline)", "", "2.4-6.9")
    console.print(cold)
    if not args.no_ray:
        import ray

        ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
