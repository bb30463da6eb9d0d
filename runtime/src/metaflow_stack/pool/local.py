"""The ``local`` backend: a fork server on this machine (``forkserver``), started by the run's runtime."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from metaflow_stack.pool import trampoline
from metaflow_stack.pool.counts import Counts
from metaflow_stack.pool.processes import PoolFolder, PoolProcess

SERVER = "from metaflow_stack.pool.forkserver import main; main()"
#: The trampoline, imported from its folder (``-S`` leaves this package off the path) rather than run as a
#: script, whose compiled form Python would not cache: 1.5 ms of every task.
RUN_TRAMPOLINE = "import sys; sys.path[:0] = sys.argv[1:2]; import trampoline; sys.exit(trampoline.main(sys.argv[2:]))"
#: The folder ``RUN_TRAMPOLINE`` imports it from.
TRAMPOLINE_FOLDER = str(Path(trampoline.__file__).parent)


class Server(Protocol):
    """The fork server as the pool holds it: a child process here, or a container (``contained``); ``pid``
    as this machine sees it, once it is ready."""

    pid: int

    def wait_ready(self, what: str) -> None: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Interpreter:
    """The Python a step's tasks run under when it is not the runtime's (the step's own ``@pypi`` or
    ``@conda`` environment), and what it needs to import Metaflow, this runtime and the flow's code there
    (``env``: the run's code package on its ``PYTHONPATH``, as Metaflow's own tasks in that environment)."""

    python: str
    env: dict[str, str]


def python_of(interpreter: Interpreter | None) -> str:
    """The Python a pool's workers run: the step's own environment's, else this one."""
    return interpreter.python if interpreter else sys.executable


class LocalPool:
    """``size`` tasks at once in children of one warm process, which lives as long as the run's runtime;
    the process runs ``interpreter`` where the step's tasks ask for one of their own."""

    def __init__(
        self, flow_file: str, size: int, name: str, parent: str | None = None, interpreter: Interpreter | None = None
    ) -> None:
        self.flow_file, self.size, self.name, self.parent = flow_file, size, name, parent
        self.interpreter = interpreter
        self.server: Server | None = None
        self.folder: PoolFolder | None = None

    def start(self) -> None:
        self.folder = PoolFolder(self.parent)
        args = [str(self.folder.address), self.flow_file, str(self.size), self.name]
        own = self.interpreter
        log = self.folder.path / "pool.log"
        self.server = PoolProcess(SERVER, args, log, own and own.env, own and own.python)

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    def address(self) -> Path:
        """The fork server's socket, once it is ready (``StackError`` naming the fix if it cannot start)."""
        assert self.server is not None and self.folder is not None
        try:
            self.server.wait_ready(f"the local worker pool could not import {self.flow_file}")
        except Exception:
            self.stop()
            raise
        return self.folder.address

    def command(self, entrypoint: list[str]) -> list[str]:
        address = self.address()
        assert self.server is not None
        return trampoline_command(address, self.server.pid, entrypoint)

    def counts(self) -> Counts:
        return self.folder.counts() if self.folder else Counts()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.folder is not None:
            self.folder.remove()
            self.folder = None


def trampoline_command(address: Path, peer: int, entrypoint: list[str]) -> list[str]:
    """The task's command through a pool's socket, on which process ``peer`` must answer. The trampoline
    runs under the task's interpreter (a decorator before this one may have set it; one after it replaces
    this first element), so it can tell the pool which one the task asked for."""
    return [entrypoint[0], "-I", "-S", "-c", RUN_TRAMPOLINE, TRAMPOLINE_FOLDER, str(address), str(peer), *entrypoint]
