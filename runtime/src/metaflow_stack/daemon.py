"""A background process of the local stack (the registry, the pools' Redis), kept by a pid file.

It runs in a session of its own (it outlives the command that started it,
off its terminal), writes to a log beside its pid file, counts as started
once it answers, and is stopped by whoever reads the pid file later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def running_pid(pidfile: Path) -> int | None:
    """The PID ``pidfile`` holds, if that process runs; None for a file that is missing, damaged or names no
    single process (0 or a negative number would have ``os.kill`` signal a whole group, or every process)."""
    try:
        pid = int(pidfile.read_text())
        if pid <= 1:
            return None
        os.kill(pid, 0)
    except (OSError, ValueError):  # (gone, not ours, or not a file one can read)
        return None
    return pid


class Daemon:
    """The process ``name`` of the folder ``home`` (``home/NAME.pid``, ``home/NAME.log``)."""

    def __init__(self, home: Path, name: str) -> None:
        self.pidfile, self.log = home / f"{name}.pid", home / f"{name}.log"

    def pid(self) -> int | None:
        """Its PID, when it runs."""
        return running_pid(self.pidfile)

    def start(
        self, command: list[str], answers: Callable[[], bool], timeout_s: float, env: dict[str, str] | None = None
    ) -> bool:
        """Start ``command`` (with ``env`` added to this process's variables: a key never on a command line)
        and wait until ``answers()``; False (and stopped again) if it ended first or did not answer in
        ``timeout_s``."""
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        self.pidfile.write_text(str(process.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if answers():
                return True
            if process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        return False

    def stop(self, grace_s: float = 5.0) -> bool:
        """Stop it (SIGTERM; SIGKILL after ``grace_s`` seconds) and wait until it is gone; whether it was running."""
        pid = self.pid()
        self.pidfile.unlink(missing_ok=True)
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline, killed = time.monotonic() + grace_s, False
        while True:
            with contextlib.suppress(ChildProcessError):  # reap it when this process started it
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            if not killed and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.1)
