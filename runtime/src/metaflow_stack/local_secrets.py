"""Secrets the local stack makes once and keeps in its state folder, readable by their owner alone.

The stack's key (``auth-key``) is the one ``metaflow stack up`` gives the
metadata service and the demo, and ``metaflow function deploy --target
docker`` gives a function server: one key for this machine's stack, shown
once when it is made, then read from the file (mode 0600), never logged.
Secrets a server hands out (the dev Nomad cluster's tokens) are kept the
same way.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from metaflow_stack import settings


def secret(path: Path) -> tuple[str, bool]:
    """The secret kept at ``path``, made now if there is none; and whether it was made now."""
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: theirs is the secret
        return path.read_text().strip(), False
    value = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(value)
    return value, True


def keep(path: Path, value: str) -> None:
    """Keep ``value`` at ``path`` (mode 0600), whole or not at all: a secret handed out by a server."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(value)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def stack_key_path() -> Path:
    return settings.load().state_dir / "auth-key"


def stack_key() -> tuple[str, bool]:
    """The stack's key, and whether it was made now (then, and only then, show it)."""
    return secret(stack_key_path())
