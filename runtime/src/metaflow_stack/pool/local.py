"""The ``local`` backend: a fork server on this machine (``forkserver``), started by the run's runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from metaflow_stack.pool import trampoline
from metaflow_stack.pool.counts import Counts
from metaflow_stack.pool.processes import PoolFolder, PoolProcess

SERVER = "from metaflow_stack.pool.forkserver import main; main()"


class Server(Protocol):
    """The fork server as the pool holds it: a child process here, or a container (``contained``); ``pid``
    as this machine sees it, once it is ready."""

    pid: int

    def wait_ready(self, what: str) -> None: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


class LocalPool:
    """``size`` tasks at once in children of one warm process, which lives as long as the run's runtime."""

    def __init__(self, flow_file: str, size: int, name: str, parent: str | None = None) -> None:
        self.flow_file, self.size, self.name, self.parent = flow_file, size, name, parent
        self.server: Server | None = None
        self.folder: PoolFolder | None = None

    def start(self) -> None:
        self.folder = PoolFolder(self.parent)
        args = [str(self.folder.address), self.flow_file, str(self.size), self.name]
        self.server = PoolProcess(SERVER, args, self.folder.path / "pool.log")

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
    return [entrypoint[0], "-I", "-S", trampoline.__file__, str(address), str(peer), *entrypoint]
