"""Per-job overhead of the runtime's Docker engine against the plain docker CLI.

Every compute decorator launches through ``engines/docker``; this measures
what that layer costs over ``docker run --rm`` for the same trivial job in the
same image, in one run on one machine, plus the cost of ``images.resolve`` when
the image is already built (what every launch pays first).

    python bench/docker_launch.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from metaflow_stack import images
from metaflow_stack.engines import JobSpec, get_engine
from metaflow_stack.engines.docker import client


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Seconds each of ``runs`` calls of ``fn`` took."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def engine_round_trip(engine: Any, image: str) -> None:
    """``true`` in ``image`` through the runtime's engine: launched, waited for, removed (what every compute
    decorator's launch costs; ``bench/nomad.py`` measures ``@nomad`` against it)."""
    job = engine.launch(JobSpec(image=image, command=["true"]))
    try:
        assert job.wait() == 0
    finally:
        job.remove()


def _ms(fn: Callable[[], object], runs: int) -> list[float]:
    return [seconds * 1000 for seconds in timed(fn, runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    console = Console()

    image = images.resolve("base", console=Console(stderr=True, quiet=True))
    binary = client().client_config.client_call[0]
    engine = get_engine("docker")

    def plain_cli() -> None:
        subprocess.run([binary, "run", "--rm", image, "true"], check=True, capture_output=True)

    plain_cli()  # warm the engine's caches for both
    rows = [
        ("docker run --rm (peer)", _ms(plain_cli, args.runs)),
        ("engines/docker launch+wait+remove", _ms(lambda: engine_round_trip(engine, image), args.runs)),
        ("images.resolve (image up to date)", _ms(lambda: images.resolve("base"), args.runs)),
    ]
    table = Table(title=f"job launch overhead, {args.runs} runs each, image {image}")
    for column in ("path", "p50 ms", "p90 ms", "mean ms"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for name, samples in rows:
        p90 = statistics.quantiles(samples, n=10)[-1]
        table.add_row(name, f"{statistics.median(samples):.0f}", f"{p90:.0f}", f"{statistics.mean(samples):.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
