"""The ``local`` backend: a fork server on this machine (``forkserver``), started by the run's runtime."""

from __future__ import annotations

import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from metaflow_stack.errors import StackError
from metaflow_stack.pool import trampoline
from metaflow_stack.pool.counts import Counts

#: The fork server's command (``-c``, so that ``__main__`` is a bare module as in ``python flow.py``).
SERVER = "from metaflow_stack.pool.forkserver import main; main()"
#: Seconds the pool may take to import the flow and what a task needs before the step fails.
START_TIMEOUT_S = 120.0


class LocalPool:
    """``size`` tasks at once in children of one warm process, which lives as long as the run's runtime."""

    def __init__(self, flow_file: str, size: int, name: str) -> None:
        self.flow_file, self.size, self.name = flow_file, size, name
        self.process: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.ready = False

    @property
    def address(self) -> Path:
        assert self.folder is not None
        return self.folder / "pool.sock"

    def start(self) -> None:
        # A short path (sockets take at most 107 bytes) in a folder only this user can enter.
        self.folder = Path(tempfile.mkdtemp(prefix="mf-pool-"))
        log = self.folder / "pool.log"
        with log.open("wb") as errors:
            self.process = subprocess.Popen(
                [sys.executable, "-u", "-c", SERVER, str(self.address), self.flow_file, str(self.size), self.name],
                stdin=subprocess.PIPE,  # closed when this process ends, however it ends: the pool then stops
                stdout=subprocess.PIPE,
                stderr=errors,
                start_new_session=True,  # Ctrl-C reaches the runtime, which stops the pool in order
            )

    def _wait_ready(self) -> None:
        """Block until the pool has imported everything (it started while the run's first steps ran)."""
        if self.ready:
            return
        assert self.process is not None and self.folder is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.process.kill()
            self.process.wait()
            reason = (self.folder / "pool.log").read_text(errors="replace").strip().splitlines()
            self.stop()
            raise StackError(
                f"the local worker pool could not import {self.flow_file}: "
                + (reason[-1] if reason else f"not ready after {START_TIMEOUT_S:.0f}s"),
                fix="run the flow without @worker_pool to see the full error",
            )
        self.ready = True

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self, entrypoint: list[str]) -> list[str]:
        self._wait_ready()
        # The trampoline runs under the task's interpreter (a decorator before this one may have set it;
        # one after it replaces this first element): it tells the pool which one the task asked for.
        return [entrypoint[0], "-I", "-S", trampoline.__file__, str(self.address), *entrypoint]

    def counts(self) -> Counts:
        return Counts.read(self.address.with_suffix(".counts")) if self.folder else Counts()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.ready = False
