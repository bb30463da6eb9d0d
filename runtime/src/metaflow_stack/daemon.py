"""A background process of the local stack (the metadata service on SQLite, the registry, the pools' Redis,
the key-release service, the dev Nomad agent), kept by a pid file.

A process counts as ours only while the pid file's record holds for it: the PID, its start (a PID the system
gave to another process since, after a crash or a reboot, started later) and this user. On Linux the start is
the boot's id and the clock ticks since that boot, compared exactly: the wall clock may step (a laptop or a VM
resumed, ``date`` set by hand) without making our process a stranger. Elsewhere it is the wall-clock start,
within a second. An older release's pid file (a bare PID) cannot say which process it was: a live process of
this user it names is neither signalled nor forgotten (the file stays), but named with its PID for the user to
stop. So ``down`` never signals a stranger, and ``up`` never takes a program answering on the port for ours:
an answer counts only while our process (or one of its children) listens on every port of the daemon's, and
anything else there is refused, sent nothing of the stack's (a key, a password) to find out. ``up`` checks,
spawns and records under an exclusive lock of its own (``NAME.lock``): a second ``up`` waits, then finds the
first one's process. The process runs in a session of its own (it outlives the command that started it, off
its terminal), under umask 077 unless its caller says otherwise, its log, configuration and pid file its
owner's alone (mode 0600).
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

#: Where the system has it (Linux), the id of this boot: a process's start in ticks counts from it.
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: Seconds a wall-clock start time may differ from the one read now, where there is no boot id: the system
#: derives it from the wall clock's boot time, which clock adjustments move a little; a reused PID starts far
#: later than that.
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


def _start(process: psutil.Process) -> dict[str, str | int | float]:
    """What tells ``process`` from every other process given its PID, before or after it: on Linux the boot's
    id and its start in clock ticks since that boot (field 22 of ``/proc/PID/stat``, read after the last ``)``:
    the command's name before it may hold spaces and parentheses); elsewhere its wall-clock start."""
    if not _BOOT_ID.exists():
        return {"started": process.create_time()}
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"boot": _BOOT_ID.read_text().strip(), "ticks": int(fields[19])}


def _same_start(recorded: dict[str, str | int | float], now: dict[str, str | int | float]) -> bool:
    if "started" in now:
        return abs(float(recorded["started"]) - float(now["started"])) <= _START_SLACK_S
    return recorded == now


def _live(pid: int) -> psutil.Process | None:
    """The process ``pid`` while it runs as this user (not a zombie); None for 0 or -1 (a signal to either
    would reach a whole group, or every process)."""
    if pid <= 1:
        return None
    try:
        process = psutil.Process(pid)
        if process.uids().real != os.getuid() or process.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return process


def _recorded(pidfile: Path) -> tuple[psutil.Process, str] | None:
    """The process ``pidfile`` records and the digest of what it runs, while that very process runs as this
    user; None for a file that is missing, damaged, an older release's, or names a PID reused since."""
    try:
        record = json.loads(pidfile.read_text())
        process = _live(int(record["pid"]))
        if process is None or not _same_start(record["start"], _start(process)):
            return None
        return process, str(record["run"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, psutil.Error):
        return None


def _older_release(pidfile: Path) -> psutil.Process | None:
    """The live process of this user that ``pidfile`` names when it is an older release's (a bare PID):
    perhaps the daemon that release started, perhaps a process given its PID since; a bare PID cannot tell."""
    try:
        return _live(int(pidfile.read_text()))
    except (OSError, ValueError):
        return None


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

    def listens_on(self, port: int) -> bool:
        """Whether it runs and listens on ``port`` (it or a child): where what only it may have can go, never
        to whatever else answers there."""
        pid = self.pid()
        try:
            return pid is not None and port in _listening(psutil.Process(pid))
        except psutil.Error:  # (ended meanwhile)
            return False

    def refuse_an_older_release(self, then: str) -> None:
        """Refuse in one line, naming its PID, while a process an older release's pid file names runs: that
        may be this daemon as the release started it, holding its ports (and files), so it is not forgotten;
        nor is it signalled, being unverified. ``then`` follows the fix (what to do once it is stopped)."""
        process = _older_release(self.pidfile)
        if process is None:
            return
        try:
            program = f", {process.name()}"  # (helps tell the daemon from a process given its PID since)
        except psutil.Error:
            program = ""
        raise StackError(
            f"the {self.name} of {self.home} may run: perhaps the {self.name} an older release started "
            f"(pid {process.pid}{program})",
            fix=f"stop it (kill {process.pid}){then}; if pid {process.pid} is something else, delete {self.pidfile}",
        )

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
        runs with another command, configuration or environment (``stop_fix`` says how to stop it), or when something
        else accepts connections on one of ``ports`` (``port_fix`` names the setting that moves them).
        """
        # What it runs with: its command, its configuration and its environment (a key: one the service does not
        # hold would be refused by it), hashed (the pid file keeps no secret).
        settings = [command, config[1] if config else None] + ([sorted(env.items())] if env else [])
        run = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
        with locked(self.lock):
            recorded = _recorded(self.pidfile)
            if recorded is not None:
                process, ran = recorded
                if ran != run:
                    raise StackError(f"the {self.name} of {self.home} runs already, with other settings", stop_fix)
                return _answered(answers, process, ports, port_fix, timeout_s)
            self.refuse_an_older_release(then=", then run up again")
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
            process = psutil.Process(child.pid)  # (a child not yet reaped keeps its record)
            keep(self.pidfile, json.dumps({"pid": child.pid, "start": _start(process), "run": run}))
            try:
                if _answered(answers, process, ports, port_fix, timeout_s):
                    return True
            except StackError:
                self._stop(grace_s=5.0)
                raise
            self._stop(grace_s=5.0)
            return False

    def stop(self, grace_s: float = 5.0) -> bool:
        """Stop it (SIGTERM; SIGKILL after ``grace_s`` seconds) and wait until it is gone; whether it was
        running. Nothing is signalled that the pid file does not record as ours; what an older release's
        names, running, is refused in one line naming its PID (``refuse_an_older_release``)."""
        if not self.pidfile.exists():
            return False
        with locked(self.lock):
            self.refuse_an_older_release(then="")
            return self._stop(grace_s)

    def _stop(self, grace_s: float) -> bool:
        recorded = _recorded(self.pidfile)
        self.pidfile.unlink(missing_ok=True)  # (ours, ended, or a PID given to another process since)
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


def _listening(process: psutil.Process) -> set[int]:
    """The ports ``process`` or one of its children (a server's workers) listens on."""
    ports: set[int] = set()
    for member in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):  # (a child ended meanwhile)
            connections = member.net_connections(kind="inet")
            ports |= {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return ports


def _answered(
    answers: Callable[[], bool], process: psutil.Process, ports: Sequence[int], port_fix: str, timeout_s: float
) -> bool:
    """Whether ``answers()`` within ``timeout_s``, asked only while ``process`` (ours) listens on each of
    ``ports``: until it does, whatever accepts there (bound in the moment between the port check and our
    process's bind) is something else, refused in one line and sent nothing. False once ``process`` ends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                return False
            ours = _listening(process)
            # (a port ours binds between the two looks is ours: once it listens, no one else may)
            strangers = [p for p in ports if p not in ours and port_taken(p) and p not in _listening(process)]
            if strangers:
                raise StackError(f"port {strangers[0]} is in use by something else", fix=port_fix)
            if ours.issuperset(ports) and answers() and _listening(process).issuperset(ports):
                return True
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.1)
    return False
