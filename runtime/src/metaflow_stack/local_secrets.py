"""Secrets the local stack makes once and keeps in its state folder, readable by their owner alone.

The stack's key (``auth-key``) is the one ``metaflow stack up`` gives the
metadata service and the demo: one key for this machine's stack, shown
once when it is made, then read from the file (mode 0600), never logged. A
function server gets a key of its own (``serving.deploy.function_key``).
Secrets a server hands out (the dev Nomad cluster's tokens) are kept the
same way, and so are ``@confidential``'s keys (the enclave signing key, a
run's data key): ``made_once`` for bytes made here.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from metaflow_stack import settings


def made_once(path: Path, make: Callable[[], bytes]) -> tuple[bytes, bool]:
    """The bytes kept at ``path``, made with ``make`` now if there are none; and whether they were made now.
    Whole or not at all, and once: processes racing to make it all read the one that landed first."""
    if path.exists():
        return path.read_bytes(), False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = _written(path, make())
    try:
        os.link(partial, path)  # fails if another process's landed first
        return path.read_bytes(), True
    except FileExistsError:
        return path.read_bytes(), False
    finally:
        partial.unlink(missing_ok=True)


def secret(path: Path) -> tuple[str, bool]:
    """The secret kept at ``path``, made now if there is none; and whether it was made now."""
    value, made = made_once(path, lambda: secrets.token_urlsafe(32).encode())
    return value.decode().strip(), made


def keep(path: Path, value: str | bytes) -> None:
    """Keep ``value`` at ``path`` (mode 0600), whole or not at all: a secret handed out by a server."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _written(path, value.encode() if isinstance(value, str) else value)
    try:
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _written(path: Path, data: bytes) -> Path:
    """``data`` in a new file of its own beside ``path`` (mode 0600, never through a link)."""
    partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return partial


def state_dir() -> Path:
    """The state folder (``settings``), readable by its owner alone: made 0700, or tightened to 0700 when it
    was there before (made by hand, or by an older release, with the usual 0755), since what the stack keeps
    under it (databases, logs, a registry's images) is made with modes of their own programs' choosing."""
    path = settings.load().state_dir
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)
    return path


def stack_key_path() -> Path:
    return state_dir() / "auth-key"


def stack_key() -> tuple[str, bool]:
    """The stack's key, and whether it was made now (then, and only then, show it)."""
    return secret(stack_key_path())
