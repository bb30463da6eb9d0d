"""The local backend in a container (``@worker_pool`` over ``@devcontainer``): the fork server runs in
one sandboxed container of the step's image; the run's trampolines reach it through the pool's folder,
mounted into the container at its own path, and hand over their stdout and stderr as they do to a local
pool (a Unix socket and ``SCM_RIGHTS`` cross the container's boundary: one kernel).

The container is no child of the runtime, so the runtime's lifeline is a connection on the server's
``LIFELINE`` socket, made as the container starts: the server says ``ready`` on it once it has
imported the flow, and stops (killing its tasks) when it closes, however the runtime ends; the
container then exits. The runtime removes it and the pool's folder; after a runtime killed outright, the
next ``@devcontainer`` run's sweep does (``devcontainer.launch.remove_orphans``: the container carries
the folder's path). The kernel tells the runtime the server's pid on that
connection, and the trampolines hand their tasks to no other process (a task can write the pool's
folder, so it could put a socket of its own in the pool's place). Each task gets only the variables
Metaflow and the step's decorators set for it (``PASSED_VARIABLE`` names them), none of the host's,
and a folder of its own in the container's ``/tmp``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

from metaflow_stack.engines import Job
from metaflow_stack.errors import StackError
from metaflow_stack.pool.forkserver import LIFELINE, PASSED_VARIABLE
from metaflow_stack.pool.local import SERVER, LocalPool
from metaflow_stack.pool.processes import START_TIMEOUT_S, PoolFolder
from metaflow_stack.pool.trampoline import peer_pid

__all__ = ["PASSED_VARIABLE", "ContainedPool", "Launcher"]

#: Starts the pool's container: the interpreter's arguments (after ``python -u``) and the pool's folder,
#: which the container must see at its own path.
Launcher = Callable[[list[str], Path], Job]


class ContainedServer:
    """The fork server in its container, held by its lifeline from the moment it listens (before its
    warm-up), so that the container ends with the runtime however the runtime ends."""

    def __init__(self, container: Job, lifeline: Path) -> None:
        self.container, self.lifeline_path = container, lifeline
        self.lifeline: socket.socket | None = None
        self.pid = 0
        self.ready = False
        self._deadline = time.monotonic() + START_TIMEOUT_S

    def connect(self) -> None:
        """Connect to the lifeline as soon as the server listens (the container is starting), and learn the
        server's pid as this machine sees it (the trampolines hand their tasks to no other process)."""
        looked = 0.0
        while self.lifeline is None and time.monotonic() < self._deadline:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(str(self.lifeline_path))
            except (FileNotFoundError, ConnectionRefusedError):
                connection.close()
                if time.monotonic() - looked > 1:  # a container that ended will never listen
                    looked = time.monotonic()
                    if self.container.exit_code is not None:
                        return
                time.sleep(0.05)
                continue
            self.lifeline = connection
            self.pid = peer_pid(connection) or 0

    def wait_ready(self, what: str) -> None:
        """Wait for ``ready`` on the lifeline; ``StackError`` with the container's last line if it ends first
        or takes more than ``START_TIMEOUT_S`` from its start."""
        if self.ready:
            return
        self.connect()
        said = b""
        while self.lifeline is not None and b"\n" not in said and time.monotonic() < self._deadline:
            if select.select([self.lifeline], [], [], max(self._deadline - time.monotonic(), 0))[0]:
                chunk = self.lifeline.recv(64)
                if not chunk:
                    break
                said += chunk
        if said != b"ready\n":
            lines = [line for line in self.container.logs() if line.strip()]
            self.stop()
            reason = lines[-1].strip() if lines else f"not ready after {START_TIMEOUT_S:.0f}s"
            raise StackError(f"{what}: {reason}", fix="run the flow without @worker_pool to see the full error")
        self.ready = True

    def alive(self) -> bool:
        """Whether the lifeline still holds (the server never writes on it after ``ready``: anything to
        read is its end)."""
        if not self.ready:
            return True  # starting: ``wait_ready`` tells whether it comes up
        return self.lifeline is not None and not select.select([self.lifeline], [], [], 0)[0]

    def stop(self, timeout_s: float = 30) -> None:
        """Cut the lifeline (the server stops its tasks and ends) and wait for the container, then remove it
        (``kill``: whether it ended or not; at once if no lifeline was ever held)."""
        if self.lifeline is not None:
            self.lifeline.close()
            self.lifeline = None
            with contextlib.suppress(Exception):
                self.container.wait(timeout=timeout_s)
        with contextlib.suppress(Exception):
            self.container.kill()


class ContainedPool(LocalPool):
    """A local pool whose fork server runs in the container ``launch`` starts, on ``flow_file`` as the
    container sees it."""

    def __init__(self, flow_file: str, size: int, name: str, launch: Launcher) -> None:
        super().__init__(flow_file, size, name)
        self.launch = launch

    def start(self) -> None:
        self.folder = PoolFolder(self.parent)
        args = ["-c", SERVER, str(self.folder.address), self.flow_file, str(self.size), self.name, "--contained"]
        try:
            container = self.launch(args, self.folder.path)
        except Exception:  # (an image that cannot run, say): no container, so no folder either
            self.folder.remove()
            self.folder = None
            raise
        self.server = ContainedServer(container, self.folder.path / LIFELINE)
        self.server.connect()
