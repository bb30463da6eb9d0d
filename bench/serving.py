"""Online and batch serving of a bound scikit-learn model, against the limit and its peers.

Online: requests/s and p50/p99 latency at concurrency 1, 8 and 64 (one
server worker each, closed-loop aiohttp clients on the same machine, after a
warm-up; the servers measured side by side in rounds, medians) for
``metaflow function serve`` (in-process backend, as in the image; with and
without adaptive batching), a plain FastAPI app calling the same model
in-process with a sync handler, a hand-written ``async def`` handler
returning orjson without access logging (the limit a FastAPI user compares
with), and the peers: BentoML (a ``@bentoml.service`` with one worker) and
MLflow ``models serve`` (one uvicorn worker), each installed in a throwaway
environment of its own with this environment's scikit-learn, and Ray Serve
with a FastAPI ingress and one replica.
Batch: records/s of ``metaflow function batch`` against plain Ray Data
``map_batches`` running the same model over the same records with the same
actor pool.

Cold start: seconds from launch to ``/ready`` and the first two calls after it.

    python bench/serving.py [--seconds 3] [--rounds 5] [--records 50000] [--only cold|online|batch]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import throwaway
from functions_call import trained_task
from rich.console import Console
from rich.table import Table

# The throwaway servers the tests use (tests/devservers.py): not shipped in the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from devservers import free_port

FLOWER = {"sepal_length": 6.9, "sepal_width": 3.1, "petal_length": 5.4, "petal_width": 2.1}

#: What both plain FastAPI apps share: the model, loaded once, and the feature order.
APP_PREAMBLE = """
import pickle
import orjson
from fastapi import FastAPI, Request, Response
app = FastAPI()
with open({model!r}, "rb") as f:
    model = pickle.load(f)
NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
"""

#: A sync handler: FastAPI hops to its thread pool for each request.
PLAIN_APP = (
    APP_PREAMBLE
    + """
@app.post("/invoke")
def invoke(data: dict) -> dict:
    return {{"prediction": int(model.predict([[data[n] for n in NAMES]])[0])}}
"""
)

#: The limit a FastAPI user would compare with: on the loop, orjson, no validation.
ASYNC_APP = (
    APP_PREAMBLE
    + """
@app.post("/invoke")
async def invoke(request: Request) -> Response:
    data = orjson.loads(await request.body())
    prediction = int(model.predict([[data[n] for n in NAMES]])[0])
    return Response(orjson.dumps({{"prediction": prediction}}), media_type="application/json")
"""
)

RAY_SERVE_APP = """
import pickle, sys, time
from fastapi import FastAPI
from ray import serve
api = FastAPI()
NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]

@serve.deployment(num_replicas=1)
@serve.ingress(api)
class Predict:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.model = pickle.load(f)

    @api.post("/invoke")
    def invoke(self, data: dict) -> dict:
        return {{"prediction": int(self.model.predict([[data[n] for n in NAMES]])[0])}}

serve.start(http_options={{"host": "127.0.0.1", "port": {port}}})
serve.run(Predict.bind({model!r}), route_prefix="/")
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


BENTOML_SERVICE = """
import pickle
import bentoml
NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]

@bentoml.service(workers=1)
class Predict:
    def __init__(self) -> None:
        with open({model!r}, "rb") as f:
            self.model = pickle.load(f)

    @bentoml.api
    def invoke(self, sepal_length: float, sepal_width: float, petal_length: float, petal_width: float) -> dict:
        row = [sepal_length, sepal_width, petal_length, petal_width]
        return {{"prediction": int(self.model.predict([row])[0])}}
"""

#: MLflow's model format, written by MLflow itself in its own environment.
MLFLOW_SAVE = """
import pickle, sys
import mlflow.sklearn
with open(sys.argv[1], "rb") as f:
    mlflow.sklearn.save_model(pickle.load(f), sys.argv[2])
"""


@dataclass
class Server:
    """How to start one server on a port, and what one prediction request to it is."""

    command: Callable[[int], list[str]]
    path: str = "/invoke"
    body: dict = field(default_factory=lambda: FLOWER)
    env: dict[str, str] = field(default_factory=dict)


def peers(work: Path, model: Path) -> dict[str, Server]:
    """BentoML and MLflow, each in a throwaway environment with the scikit-learn that pickled the model."""
    import sklearn

    sklearn_pin = f"scikit-learn=={sklearn.__version__}"
    bentoml_bin = throwaway.venv(work, "bentoml-venv", ["bentoml", sklearn_pin])
    (work / "bento_service.py").write_text(BENTOML_SERVICE.format(model=str(model)))
    mlflow_bin = throwaway.venv(work, "mlflow-venv", ["mlflow", sklearn_pin])
    subprocess.run(
        [mlflow_bin / "python", "-c", MLFLOW_SAVE, model, work / "mlflow-model"], check=True, capture_output=True
    )
    # Each starts helpers (uvicorn, a supervisor) by name: their environment's bin comes first on PATH.
    return {
        "BentoML, @bentoml.service, 1 worker (peer)": Server(
            lambda port: [
                str(bentoml_bin / "bentoml"),
                "serve",
                "bento_service:Predict",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env={"PATH": f"{bentoml_bin}:{os.environ['PATH']}", "BENTOML_DO_NOT_TRACK": "true"},
        ),
        "MLflow models serve, 1 worker (peer)": Server(
            lambda port: [
                str(mlflow_bin / "mlflow"),
                "models",
                "serve",
                "-m",
                str(work / "mlflow-model"),
                "--env-manager",
                "local",
                "-w",
                "1",
                "-p",
                str(port),
            ],
            path="/invocations",
            body={"dataframe_records": [FLOWER]},
            env={"PATH": f"{mlflow_bin}:{os.environ['PATH']}"},
        ),
    }


def wait_ready(url: str, server: Server, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.post(url + server.path, json=server.body, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} never answered")


async def load(url: str, server: Server, concurrency: int, seconds: float) -> dict[str, float]:
    """Closed-loop load from ``concurrency`` clients; aiohttp, because httpx's pool is what saturates first at 64."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                async with session.post(url + server.path, json=server.body) as response:
                    await response.read()
                    response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def online(console: Console, work: Path, reference: Path, model: Path, seconds: float, rounds: int) -> None:
    (work / "plain_app.py").write_text(PLAIN_APP.format(model=str(model)))
    (work / "async_app.py").write_text(ASYNC_APP.format(model=str(model)))

    def ours(*options: str) -> Server:
        metaflow = str(Path(sys.executable).parent / "metaflow")
        return Server(
            lambda port: [
                metaflow,
                "function",
                "serve",
                str(reference),
                "--backend",
                "inprocess",
                "--port",
                str(port),
                *options,
            ]
        )

    def uvicorn(app: str, *options: str) -> Server:
        return Server(
            lambda port: [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning", *options]
        )

    servers = {
        "metaflow function serve (ours, adaptive batching)": ours(),
        "metaflow function serve (ours, --max-batch-size 1)": ours("--max-batch-size", "1"),
        "plain FastAPI, sync handler, model in-process": uvicorn("plain_app:app"),
        "hand-written async FastAPI, orjson, no access log (the limit a user compares with)": uvicorn(
            "async_app:app", "--no-access-log"
        ),
        **peers(work, model),
        "Ray Serve, FastAPI ingress, 1 replica (peer)": Server(
            lambda port: [sys.executable, "-c", RAY_SERVE_APP.format(port=port, model=str(model))]
        ),
    }
    limit = "hand-written async FastAPI, orjson, no access log (the limit a user compares with)"
    alone = "Ray Serve, FastAPI ingress, 1 replica (peer)"
    # Ours, the plain apps, BentoML and MLflow are up together and measured in rounds, cell by cell side by side: their
    # ratios are the medians of each round's own. Ray Serve's background processes would load the
    # machine while the others run, so it runs alone afterwards.
    cells: dict[tuple[str, int], list[dict[str, float]]] = {}
    for group in ([name for name in servers if name != alone], [alone]):
        processes, urls = [], {}
        try:
            for name in group:
                port = free_port()
                processes.append(
                    subprocess.Popen(
                        servers[name].command(port),
                        cwd=work,
                        env={**os.environ, **servers[name].env},
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
                urls[name] = f"http://127.0.0.1:{port}"
                wait_ready(urls[name], servers[name])
                asyncio.run(load(urls[name], servers[name], 8, 2))  # warm-up: imports, first predictions, connections
            for concurrency in (1, 8, 64):
                for _ in range(rounds):
                    for name, url in urls.items():
                        cell = asyncio.run(load(url, servers[name], concurrency, seconds))
                        cells.setdefault((name, concurrency), []).append(cell)
        finally:
            for process in processes:
                os.killpg(process.pid, 15)
                process.wait(timeout=60)
    table = Table(title=f"online: POST /invoke, sklearn predict, medians of {rounds} rounds of {seconds:.0f} s")
    for column in ("server", "concurrency", "requests/s", "p50 ms", "p99 ms", "vs the limit"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for name in servers:
        for concurrency in (1, 8, 64):
            runs, limits = cells[(name, concurrency)], cells[(limit, concurrency)]
            if name == alone:  # not side by side: against the limit's median
                ratio = statistics.median(m["rps"] for m in runs) / statistics.median(m["rps"] for m in limits)
            else:
                ratio = statistics.median(m["rps"] / n["rps"] for m, n in zip(runs, limits, strict=True))
            table.add_row(
                name,
                str(concurrency),
                *(
                    f"{statistics.median(m[key] for m in runs):.{0 if key == 'rps' else 1}f}"
                    for key in ("rps", "p50", "p99")
                ),
                f"{ratio:.0%}",
            )
    console.print(table)


def cold_start(console: Console, work: Path, reference: Path) -> None:
    """Seconds from launch until ``/ready``, then the first and second call: ready means warm."""
    metaflow = str(Path(sys.executable).parent / "metaflow")
    table = Table(title="cold start: metaflow function serve (in-process backend), sklearn model")
    for column in ("run", "launch to /ready s", "first call ms", "second call ms"):
        table.add_column(column, justify="right")
    for run in range(1, 4):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [metaflow, "function", "serve", str(reference), "--backend", "inprocess", "--port", str(port)]
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            while True:
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            ready = time.perf_counter() - started
            calls = []
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(2):
                    began = time.perf_counter()
                    client.post("/invoke", json=FLOWER).raise_for_status()
                    calls.append((time.perf_counter() - began) * 1000)
            table.add_row(str(run), f"{ready:.2f}", f"{calls[0]:.1f}", f"{calls[1]:.1f}")
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=60)
    console.print(table)


def batch(console: Console, work: Path, reference: Path, model: Path, records: int) -> None:
    import ray
    from flowers import random_flowers

    from metaflow_stack import ray_start
    from metaflow_stack.serving.batch import BatchOptions, run_batch

    flowers = random_flowers(records, seed=3)
    data = work / "flowers.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in flowers))
    ray_start.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    class PlainPredict:
        def __init__(self) -> None:
            import pickle

            self.model = pickle.loads(model.read_bytes())

        def __call__(self, rows: dict) -> dict:
            import numpy

            names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
            out = [int(self.model.predict([[row[n] for n in names]])[0]) for row in rows["record"]]
            return {"prediction": numpy.array(out)}

    options = BatchOptions(batch_size=1024, concurrency=2, num_cpus=1, shard_size=10_000)
    started = time.perf_counter()
    ray.data.from_items([{"record": f} for f in flowers]).map_batches(
        PlainPredict,
        batch_size=options.batch_size,
        concurrency=options.concurrency,
        num_cpus=options.num_cpus,
        batch_format="numpy",
    ).materialize()
    plain = records / (time.perf_counter() - started)
    started = time.perf_counter()
    run_batch(str(reference), data, work / "out", options)
    ours = records / (time.perf_counter() - started)
    ray.shutdown()

    table = Table(title=f"batch: {records} records, 2 actors, batch size 1024")
    for column in ("runner", "records/s", "vs plain"):
        table.add_column(column, justify="left" if column == "runner" else "right")
    table.add_row("plain Ray Data map_batches (limit)", f"{plain:.0f}", "100%")
    table.add_row("metaflow function batch (ours, reading JSONL, writing parts)", f"{ours:.0f}", f"{ours / plain:.0%}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3, help="length of one online cell")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of online cells")
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--only", choices=("cold", "online", "batch"), help="Run one table.")
    args = parser.parse_args()
    console = Console()

    work, task = trained_task("bench-serving-")

    import pickle

    import iris_functions
    from metaflow import JsonFunction

    reference = work / "predict.json"
    reference.write_text(JsonFunction(iris_functions.predict, task=task).reference)
    model = work / "model.pkl"
    model.write_bytes(pickle.dumps(task.data.model))

    if args.only in (None, "cold"):
        cold_start(console, work, reference)
    if args.only in (None, "online"):
        online(console, work, reference, model, args.seconds, args.rounds)
    if args.only in (None, "batch"):
        batch(console, work, reference, model, args.records)


if __name__ == "__main__":
    main()
