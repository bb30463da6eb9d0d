"""A background process of the local stack (the metadata service on SQLite, the registry, the pools' Redis,
the key-release service, the dev Nomad agent), kept by a pid file.

A process counts as ours only while the pid file's record holds for it: the PID, its start time (a PID the
system gave to another process since, after a crash or a reboot, started later) and this user. A pid file
without that record (an older release's) names nothing we may signal. So ``down`` never signals a stranger,
and ``up`` never takes a program answering on the port for ours: it refuses the port, and nothing of the
stack's (a key, a password) is sent to find out. ``up`` checks, spawns and records under an exclusive lock of
its own (``NAME.lock``): a second ``up`` waits, then finds the first one's process. The process runs in a
session of its own (it outlives the command that started it, off its terminal), under umask 077, its log,
configuration and pid file its owner's alone (mode 0600).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil

from metaflow_stack.errors import StackError
from metaflow_stack.local_secrets import keep

#: Seconds a recorded start time may differ from the one read now: the system derives it from the wall clock's
#: boot time, which clock adjustments move a little; a reused PID starts far later than that.
_START_SLACK_S = 1.0
#: Seconds a process has to end once killed (SIGKILL cannot be caught: it ends as soon as the system runs it).
_KILLED_S = 10.0


def port_taken(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``; it is sent nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (made, mode 0600, in a folder made 0700) until the block ends: one
    ``up`` of a thing at a time."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (which releases the lock)


def _recorded(pidfile: Path) -> tuple[psutil.Process, str] | None:
    """The process ``pidfile`` records and the digest of what it runs, while that very process runs as this
    user; None for a file that is missing, damaged, an older release's, or names a PID reused since."""
    try:
        record = json.loads(pidfile.read_text())
        pid, started, run = int(record["pid"]), float(record["started"]), str(record["run"])
        if pid <= 1:  # (0 or -1 would have a signal reach a whole group, or every process)
            return None
        process = psutil.Process(pid)
        if abs(process.create_time() - started) > _START_SLACK_S or process.uids().real != os.getuid():
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
    except (OSError, ValueError, TypeError, KeyError, psutil.Error):
        return None
    return process, run


def running_pid(pidfile: Path) -> int | None:
    """The PID ``pidfile`` records, while that process (not one given its PID since) runs as this user."""
    recorded = _recorded(pidfile)
    return recorded[0].pid if recorded else None


class Daemon:
    """The process ``name`` of the folder ``home`` (``home/NAME.pid``, ``.log`` and ``.lock``)."""

    def __init__(self, home: Path, name: str) -> None:
        self.home, self.name = home, name
        self.pidfile, self.log, self.lock = (home / f"{name}.{kind}" for kind in ("pid", "log", "lock"))

    def pid(self) -> int | None:
        """Its PID, when it runs."""
        return running_pid(self.pidfile)

    def start(
        self,
        command: list[str],
        answers: Callable[[], bool],
        timeout_s: float,
        *,
        ports: Sequence[int],
        port_fix: str,
        stop_fix: str,
        env: dict[str, str] | None = None,
        config: tuple[Path, str] | None = None,
        umask: int = 0o077,
    ) -> bool:
        """Start ``command`` unless ours runs it already, and wait until ``answers()``; False (and what was
        started stopped again) if it ended first or did not answer in ``timeout_s``.

        ``config`` is a file the command reads (path, text), written whole before the start; ``env`` is
        added to this process's variables (a key never on a command line). Refused in one line when ours
        runs with another command or configuration (``stop_fix`` says how to stop it), or when something
        else accepts connections on one of ``ports`` (``port_fix`` names the setting that moves them).
        """
        run = hashlib.sha256(json.dumps([command, config[1] if config else None]).encode()).hexdigest()
        with locked(self.lock):
            recorded = _recorded(self.pidfile)
            if recorded is not None:
                process, ran = recorded
                if ran != run:
                    raise StackError(f"the {self.name} of {self.home} runs already, with other settings", stop_fix)
                return _answered(answers, process.is_running, timeout_s)
            for port in ports:
                if port_taken(port):
                    raise StackError(f"port {port} is in use by something else", fix=port_fix)
            if config is not None:
                keep(*config)
            log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            try:
                child = subprocess.Popen(
                    command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                    env={**os.environ, **(env or {})}, umask=umask,
                )  # fmt: skip
            finally:
                os.close(log)
            started = psutil.Process(child.pid).create_time()  # (a child not yet reaped keeps its record)
            keep(self.pidfile, json.dumps({"pid": child.pid, "started": started, "run": run}))
            if _answered(answers, lambda: child.poll() is None, timeout_s):
                return True
            self._stop(grace_s=5.0)
            return False

    def stop(self, grace_s: float = 5.0) -> bool:
        """Stop it (SIGTERM; SIGKILL after ``grace_s`` seconds) and wait until it is gone; whether it was
        running. Nothing is signalled that the pid file does not record as ours."""
        if not self.pidfile.exists():
            return False
        with locked(self.lock):
            return self._stop(grace_s)

    def _stop(self, grace_s: float) -> bool:
        recorded = _recorded(self.pidfile)
        self.pidfile.unlink(missing_ok=True)
        if recorded is None:
            return False
        process = recorded[0]
        with contextlib.suppress(psutil.NoSuchProcess):  # (ended meanwhile)
            process.terminate()
            if not _ended(process, grace_s):
                process.kill()
                _ended(process, _KILLED_S)
        return True


def _ended(process: psutil.Process, timeout_s: float) -> bool:
    """Whether ``process`` ended within ``timeout_s``: gone, or a zombie (its exit status is its parent's to
    collect, which is this process only when this process started it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(process.pid, os.WNOHANG)
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _answered(answers: Callable[[], bool], alive: Callable[[], bool], timeout_s: float) -> bool:
    """Whether ``answers()`` within ``timeout_s`` while ``alive()``: an answer after our process ended came
    from something else."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        if answers() and alive():
            return True
        time.sleep(0.1)
    return False
