"""Per-step overhead of ``@nomad`` (submit to exit code seen) against ``@devcontainer``'s launch on the same engine.

The same trivial task (``true`` in the stack's ``base`` image), run in one
run on one machine through the two paths a step's trampoline takes:

- ``@devcontainer``'s: ``engines/docker`` launch, wait for the exit code,
  remove (the peer);
- ``@nomad``'s: the job registered, its evaluation and allocation followed
  with blocking queries, both logs streamed, the exit code read from the
  task's ``Terminated`` event, the job purged (``nomad.task``'s path without
  Metaflow's job script, which both paths pay alike).

Against the agent at ``NOMAD_ADDR`` (``NOMAD_TOKEN``, ``NOMAD_NAMESPACE``)
when set, which must run docker tasks on this machine's engine (a dev
agent: ``just nomad-up``); otherwise against the Nomad API double of the
tests, which runs each task on the same engine and says so in the table's
title: then the figure is the client's and the double's, not Nomad's.

    python bench/nomad.py [--runs 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from metaflow_stack import images
from metaflow_stack.engines import get_engine
from metaflow_stack.engines.nomad.client import NomadClient, Settings
from metaflow_stack.engines.nomad.jobspec import Placement, task_job
from metaflow_stack.engines.nomad.watch import follow

# The Nomad API double the tests use (tests/nomad_double): not shipped in the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from devservers import nomad_double
from docker_launch import engine_round_trip, timed  # (beside this script: the engine's figure is its peer)


@contextlib.contextmanager
def _agent() -> Iterator[tuple[Settings, str]]:
    """The agent to measure, and what it is."""
    if os.environ.get("METAFLOW_NOMAD_ADDR") or os.environ.get("NOMAD_ADDR"):
        settings = Settings.from_env()
        yield settings, f"the Nomad agent at {settings.address}"
        return
    token = uuid.uuid4().hex
    with nomad_double("--token", token) as address:
        yield Settings(address=address, token=token), "the tests' Nomad API double (no NOMAD_ADDR)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    console = Console()
    image = images.resolve("base", console=Console(stderr=True, quiet=True))
    engine = get_engine("docker")

    def devcontainer_path() -> None:
        engine_round_trip(engine, image)

    with _agent() as (settings, agent), NomadClient(settings) as client:
        placement = Placement(image=image, cpu=0.5, memory=128, namespace=settings.namespace)

        def nomad_path() -> None:
            name = f"mf-bench-{uuid.uuid4().hex[:8]}"
            eval_id = client.register(task_job(name, ["true"], {}, placement, {"bench": "1"}))
            try:
                ending = follow(client, name, eval_id, lambda kind, line: None)
            finally:
                client.deregister(name)
            assert ending.code == 0, ending

        devcontainer_path()  # warm the engine's caches for both
        nomad_path()
        rows = [
            ("@devcontainer: engines/docker launch + wait + remove (peer)", timed(devcontainer_path, args.runs)),
            ("@nomad: register, follow (evaluation, allocation, logs), exit code, purge", timed(nomad_path, args.runs)),
        ]
    peer = statistics.median(rows[0][1])
    table = Table(title=f"per-step overhead, {args.runs} runs each, image {image}, on {agent}")
    for column in ("path", "p50 s", "p90 s", "over the peer (p50)"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, samples in rows:
        p50, p90 = statistics.median(samples), statistics.quantiles(samples, n=10)[-1]
        table.add_row(name, f"{p50:.2f}", f"{p90:.2f}", "" if p50 == peer else f"{p50 - peer:+.2f} s")
    console.print(table)


if __name__ == "__main__":
    main()
