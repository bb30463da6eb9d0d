"""Render and submit the infrastructure under ``infra/``: Helm charts and Nomad jobs.

Everything is rendered and validated offline before anything is written or
submitted, so a bad value is an error naming it and never a half-applied
release. Needs the ``deploy`` extra (``pip install 'metaflow-stack[deploy]'``).
"""

from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path
from types import ModuleType

from metaflow_stack import catalog
from metaflow_stack.errors import ToolMissingError


def infra_root() -> Path:
    """The ``infra/`` folder of the checkout that holds ``images/``."""
    return catalog.project_root() / "infra"


def require(module: str, extra: str = "deploy") -> ModuleType:
    """Import one of an extra's libraries (the deploy extra's unless named), or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ToolMissingError(f"{module} is not installed", fix=f"pip install 'metaflow-stack[{extra}]'") from None


def write_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all, on disk before it replaces what was there.

    The file gets the mode any new file of this process gets (0666 less the
    umask), as ``open`` would give it: a ``tempfile`` is 0600, which would keep
    a lock or a manifest meant to be shared from everyone else. No caller
    writes a secret here (deployments name Kubernetes Secrets and Nomad
    Variables, never their values).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    try:
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
