"""A pool's own processes (a fork server, a dispatcher, local workers), as the run's runtime keeps them.

Each is a child of the runtime in a session of its own (Ctrl-C reaches the
runtime, which stops the pool in order), reads its standard input from the
runtime (closed when the runtime ends, however it ends: the process then
stops), says ``READY`` on its standard output once it has imported what it
needs, and writes its errors to a log in the pool's folder.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metaflow_stack.errors import StackError
from metaflow_stack.pool.counts import Counts

#: What a pool's process prints, on a line of its own, once it is ready: words the flow's file, which runs
#: first and may print anything at import, would not print by chance (a bare "ready" once let a pool look
#: ready before its socket was there).
READY = b"\nmetaflow-stack pool: ready\n"
#: Seconds a pool's process may take to import the flow and what a task needs before the step fails.
START_TIMEOUT_S = 120.0
#: The kernel's flag for a process that has begun to exit (``include/linux/sched.h``), in ``/proc/PID/stat``.
PF_EXITING = 0x4


def say_ready() -> None:
    """Say ``READY`` on standard output, on a line of its own even where the flow's file, run at import, left
    a line unended (``print(..., end="")``): it would otherwise end that line, and never be read. Written to
    the descriptor itself, after what Python holds: the flow's file may have replaced ``sys.stdout``."""
    if sys.stdout:
        sys.stdout.flush()
    os.write(1, READY)


class PoolProcess:
    """One of a pool's processes: ``python -u -c CODE ARGS...`` (``-c``: ``__main__`` is a bare module, as
    in ``python flow.py``), with ``env`` added to the runtime's environment (where a secret goes: a
    command line is readable by every user of the machine); ``python``: the runtime's own unless given."""

    def __init__(
        self, code: str, args: list[str], log: Path, env: dict[str, str] | None = None, python: str | None = None
    ) -> None:
        self.log = log
        with log.open("wb") as errors:
            self.process = subprocess.Popen(
                [python or sys.executable, "-u", "-c", code, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                env={**os.environ, **env} if env else None,
                start_new_session=True,
            )
        self.ready = False

    def wait_ready(self, what: str) -> None:
        """Block until it says ``READY``; ``StackError`` with the last line of its log if it does not."""
        if self.ready:
            return
        # The flow file runs first and may print at import: lines before ``ready`` are passed over. Read
        # from the descriptor itself: a buffered reader could hold the line select() no longer sees.
        fd, seen, deadline = self.process.stdout.fileno(), b"\n", time.monotonic() + START_TIMEOUT_S
        while READY not in seen and time.monotonic() < deadline:
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
                break  # the time is up
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # it ended
            seen = seen[-64:] + chunk
        if READY not in seen:
            self.process.kill()
            self.process.wait()
            reason = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
            raise StackError(
                f"{what}: " + (reason[-1] if reason else f"not ready after {START_TIMEOUT_S:.0f}s"),
                fix="run the flow without @worker_pool to see the full error",
            )
        self.ready = True

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None and not exiting(self.process.pid)

    def stop(self, timeout_s: float = 30) -> None:
        """Close its input (it stops), wait for it, kill it if it does not end in ``timeout_s``."""
        stop_all([self], timeout_s)


def exiting(pid: int) -> bool:
    """Whether process ``pid``, a child not yet reaped, is on its way out (Linux's ``PF_EXITING``).

    A process killed outright closes its descriptors (its tasks' trampolines
    see their connections end, fail, and the runtime starts their retries)
    before its parent can reap it: in that moment ``poll()`` still finds it
    running, and a retry handed to it would be lost too. The kernel marks
    it exiting before it closes anything. Where ``/proc`` does not show it
    (not Linux, another PID namespace): ``False``, and the exit status decides.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:  # no /proc, or another PID namespace's: the exit status alone decides
        return False
    return bool(int(stat.rsplit(b")", 1)[1].split()[6]) & PF_EXITING)


def stop_all(processes: list[PoolProcess], timeout_s: float = 30) -> None:
    """Stop several at once: every input closed first, so they wind down together, then each waited for."""
    running = [p.process for p in processes if p.process.poll() is None]
    for process in running:
        process.stdin.close()
    for process in running:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


#: How a pool's folder is named, under its parent.
FOLDER_PREFIX = "mf-pool-"
#: The file in a pool's folder its runtime holds locked while the pool lives (the kernel lets go of the lock
#: when the runtime ends, however it ends).
OWNER_LOCK = "owner.lock"


class PoolFolder:
    """A pool's folder: its socket (a short path: sockets take at most 107 bytes), counts and logs, in a
    folder only this user can enter (under ``parent``, or the system's temporary folder).

    A runtime killed outright together with its pool (a container or a
    cgroup killed) leaves the folder, with its logs and, for a Ray pool,
    Ray's session. So the runtime holds ``OWNER_LOCK`` while the pool lives,
    and each new pool first removes the folders beside its own whose lock
    nobody holds (``sweep``).
    """

    def __init__(self, parent: str | None = None) -> None:
        sweep(Path(parent or tempfile.gettempdir()))
        self.path = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=parent))
        try:
            self._owner = _hold(self.path)
        except OSError:  # (a file system with no flock: the folder is never swept, as before)
            self._owner = -1
        self.last = Counts()  # (what a read that finds none shows: a record caught mid-write, say)

    @property
    def address(self) -> Path:
        return self.path / "pool.sock"

    def counts(self) -> Counts:
        """The pool's counts, or the last ones read where none can be read now."""
        self.last = Counts.read(self.address.with_suffix(".counts")) or self.last
        return self.last

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._owner >= 0:
            os.close(self._owner)
            self._owner = -1


def _hold(folder: Path) -> int:
    """A descriptor holding ``folder``'s ``OWNER_LOCK`` locked: the lock taken on a file of another name, then
    the file renamed (a sweep never finds the lock there and not yet held)."""
    taking = folder / f".{OWNER_LOCK}"
    fd = os.open(taking, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(taking, folder / OWNER_LOCK)
    except OSError:
        os.close(fd)
        raise
    return fd


def sweep(parent: Path) -> None:
    """Remove this user's pool folders under ``parent`` whose runtime is gone (their lock free). A folder
    with no lock (being made, or an older release's) is left."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.name.startswith(FOLDER_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
            fd = os.open(Path(entry.path) / OWNER_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:  # its runtime lives (or, on NFS, flock is emulated per process: nothing is judged)
            pass
        finally:
            os.close(fd)
