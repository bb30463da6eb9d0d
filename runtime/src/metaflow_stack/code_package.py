"""The code package, unpacked and compiled to bytecode once per machine, for every compute decorator that
runs tasks here (mounted read-only into ``@devcontainer``'s containers, measured into ``@confidential``'s
enclaves, on the path of a ``@worker_pool`` fork server in a step's own environment): a task then starts
no unpacking and imports Metaflow from bytecode, where unpacking per task and compiling Metaflow's sources
afresh cost about a second a task.

Folders are named by the package's content hash and made whole before they appear (unpacked and
compiled under a temporary name, then renamed), so tasks starting together never see half a
package. The bytecode is the host Python's; an image with another Python version reads the
sources instead (the mount is read-only, so no task writes into what others share).
"""

from __future__ import annotations

import compileall
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

#: Unpacked packages kept per machine; the least recently used beyond this are removed.
KEEP = 16


def package_bytes(flow_datastore, url: str, sha: str) -> bytes:
    """The code package's archive, from the local datastore's file or fetched from the datastore."""
    if flow_datastore.TYPE == "local":
        return Path(url).read_bytes()
    [(_, blob)] = list(flow_datastore.load_data([sha]))
    return blob


def unpacked(sha: str, archive: Callable[[], bytes], cache: Path) -> Path:
    """The folder holding the package ``sha``, unpacked and compiled (``archive`` gives its bytes, asked only
    when it is not unpacked here yet)."""
    target = cache / sha
    if target.is_dir():
        os.utime(target)  # used now: kept by the pruning below
        return target
    cache.mkdir(parents=True, exist_ok=True)
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


def _prune(cache: Path) -> None:
    folders = sorted((p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")), key=os.path.getmtime)
    for old in folders[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
