"""The code package, unpacked and compiled to bytecode once per machine, for every compute decorator that
runs tasks here (mounted read-only into ``@devcontainer``'s containers, measured into ``@confidential``'s
enclaves, on the path of a ``@worker_pool`` fork server in a step's own environment): a task then starts
no unpacking and imports Metaflow from bytecode, where unpacking per task and compiling Metaflow's sources
afresh cost about a second a task.

Folders are named by the package's content hash and made whole before they appear (unpacked and
compiled under a temporary name, then renamed), so tasks starting together never see half a
package. The bytecode is the host Python's; an image with another Python version reads the
sources instead (the mount is read-only, so no task writes into what others share).

Beyond ``KEEP`` packages the least recently used are removed, but never one that a live process
asked for: each process that asks holds a shared lock on the package's lock file beside it until
it ends (a run's runtime, whose pool imports from the folder all run long; a task's trampoline,
whose container mounts it), and the kernel lets go of the lock however the process ends.
"""

from __future__ import annotations

import compileall
import contextlib
import fcntl
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from metaflow_stack.errors import StackError

#: Unpacked packages kept per machine; the least recently used beyond this, that no process holds, are removed.
KEEP = 16

#: This process's holds, by lock file: the open lock files (closed only as the process ends).
_held: dict[Path, int] = {}


def package_bytes(flow_datastore, url: str, sha: str) -> bytes:
    """The code package's archive, from the local datastore's file or fetched from the datastore, once its
    content is the one the run saved (``sha``: the datastore names it by its content's SHA-1). Metaflow
    neither rewrites a blob that exists nor checks one it loads, and a datastore is written by the tasks of
    every flow that shares it: an archive changed since would be unpacked, and run, as the run's code."""
    if flow_datastore.TYPE == "local":
        blob = Path(url).read_bytes()
    else:
        [(_, blob)] = list(flow_datastore.load_data([sha]))
    if hashlib.sha1(blob).hexdigest() != sha:
        raise StackError(
            f"the code package {url} is not the one the run saved: its content changed since",
            fix="run the flow again (and find what writes into the datastore's data folders)",
        )
    return blob


def unpacked(sha: str, archive: Callable[[], bytes], cache: Path) -> Path:
    """The folder holding the package ``sha``, unpacked and compiled (``archive`` gives its bytes, asked only
    when it is not unpacked here yet)."""
    target = cache / sha
    cache.mkdir(parents=True, exist_ok=True)
    _hold(cache, sha)  # before looking: a pruning elsewhere cannot remove it between the look and the hold
    if target.is_dir():
        os.utime(target)  # used now: kept by the pruning below
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=cache))
    try:
        tgz = staging / "package.tgz"
        tgz.write_bytes(archive())
        with tarfile.open(tgz) as tar:
            tar.extractall(staging / "code", filter="data")
        tgz.unlink()
        compileall.compile_dir(staging / "code", quiet=2, workers=0)
        try:
            (staging / "code").rename(target)
        except OSError:
            if not target.is_dir():  # another task made it first: theirs is the same
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune(cache)
    return target


def unpacked_here(flow_datastore, url: str, sha: str) -> Path:
    """The package ``sha`` (at ``url`` in ``flow_datastore``), unpacked in this machine's cache (the stack's
    state folder)."""
    return unpacked(sha, lambda: package_bytes(flow_datastore, url, sha), _cache())


def run_package_here(package) -> Path:
    """The run's own package (Metaflow's, before any datastore holds it), unpacked in this machine's cache,
    named by the hash Metaflow's datastore gives it, so a decorator that saves it finds the same folder."""
    blob = bytes(package.blob)
    return unpacked(hashlib.sha1(blob).hexdigest(), lambda: blob, _cache())


def _cache() -> Path:
    from metaflow_stack import settings

    return settings.load().state_dir / "code"


def _hold(cache: Path, sha: str) -> None:
    """Keep the package ``sha`` from being pruned while this process lives: a shared lock on its lock file
    (taken again if a pruning removed the file between its opening and its locking). A cache this process
    cannot make a lock file in (read-only) is one it does not prune either: no hold is needed."""
    path = cache / f"{sha}.lock"
    while path not in _held:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        fcntl.flock(fd, fcntl.LOCK_SH)
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                _held[path] = fd
                continue
        os.close(fd)


def _prune(cache: Path) -> None:
    """Remove the least recently used packages beyond ``KEEP`` that no process holds, and the lock files
    of packages that are gone."""
    folders = sorted((p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")), key=os.path.getmtime)
    stale = [lock.with_suffix("") for lock in cache.glob("*.lock") if not lock.with_suffix("").is_dir()]
    for old in [*folders[:-KEEP], *stale]:
        lock = old.with_name(f"{old.name}.lock")
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(old, ignore_errors=True)
            lock.unlink(missing_ok=True)
        except OSError:  # a live process holds it (or the lock cannot be had): kept
            continue
        finally:
            os.close(fd)
