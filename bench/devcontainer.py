"""Per-step overhead of ``@devcontainer`` against the same step run as a plain local task.

The same linear flow of 7 trivial steps, run with the local datastore, as
plain local tasks and with ``--with devcontainer`` (every step in its own
container, the default sandbox), on one machine in one run. The overhead per
step is the difference of the run's wall times divided by the steps. Warm:
the ``base`` image is already built. ``--cold`` first removes that image, so
the first sandboxed run also builds it (one sample).

    python bench/devcontainer.py [--repeat 3] [--cold]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

STEPS = 7
FLOW = """
from metaflow import FlowSpec, step


class OverheadFlow(FlowSpec):
    @step
    def start(self):
        self.value = 0
        self.next(self.a)

    @step
    def a(self):
        self.value += 1
        self.next(self.b)

    @step
    def b(self):
        self.value += 1
        self.next(self.c)

    @step
    def c(self):
        self.value += 1
        self.next(self.d)

    @step
    def d(self):
        self.value += 1
        self.next(self.e)

    @step
    def e(self):
        self.value += 1
        self.next(self.end)

    @step
    def end(self):
        assert self.value == 5


if __name__ == "__main__":
    OverheadFlow()
"""

console = Console(stderr=True)


def run_seconds(root: Path, *extra: str) -> float:
    env = {**os.environ, "METAFLOW_DEFAULT_METADATA": "local", "USER": os.environ.get("USER") or "bench"}
    command = [sys.executable, "overhead_flow.py", "--datastore-root", str(root / ".metaflow"), "run", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind (median)")
    parser.add_argument("--cold", action="store_true", help="remove the base image first (the first run builds it)")
    args = parser.parse_args()
    from metaflow_stack import images
    from metaflow_stack.engines.docker import require_engine

    root = Path(tempfile.mkdtemp(prefix="bench-devcontainer-"))
    (root / "overhead_flow.py").write_text(FLOW)
    table = Table(title=f"@devcontainer overhead: a linear flow of {STEPS} trivial steps (median of {args.repeat})")
    for column in ("run", "wall s", "per step s", "overhead per step s"):
        table.add_column(column)
    cold = None
    if args.cold:
        docker = require_engine()
        reference = images.resolve("base")
        docker.image.remove(reference, force=True)
        with console.status("first sandboxed run, building the base image"):
            cold = run_seconds(root, "--with", "devcontainer")
    with console.status("plain local runs"):
        plain = statistics.median(run_seconds(root) for _ in range(args.repeat))
    with console.status("sandboxed runs, image built"):
        warm = statistics.median(run_seconds(root, "--with", "devcontainer") for _ in range(args.repeat))
    table.add_row("plain local tasks (peer)", f"{plain:.2f}", f"{plain / STEPS:.2f}", "")
    table.add_row("@devcontainer, warm", f"{warm:.2f}", f"{warm / STEPS:.2f}", f"{(warm - plain) / STEPS:.2f}")
    if cold is not None:
        table.add_row("@devcontainer, cold (builds the image)", f"{cold:.2f}", "", f"{(cold - plain) / STEPS:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
