"""Render and submit the infrastructure under ``infra/``: Helm charts and Nomad jobs.

Everything is rendered and validated offline before anything is written or
submitted, so a bad value is an error naming it and never a half-applied
release. Needs the ``deploy`` extra (``pip install 'metaflow-stack[deploy]'``).
"""

from __future__ import annotations

import importlib
import os
import tempfile
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
    """Write ``text`` to ``path`` whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as out:
        out.write(text)
    os.replace(out.name, path)
    return path
