"""Load a referenced function into this process: code on the path, parameters ready.

Used by the in-process backend and by worker processes. The code archive (and
the flow's code package, when the task has one) is extracted once per
reference into the state directory; artifacts load on first use, or all at
once with ``preload`` (a server that says it is ready).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metaflow_stack import settings
from metaflow_stack.functions.errors import BindError
from metaflow_stack.functions.params import FunctionParameters
from metaflow_stack.functions.reference import FunctionReference
from metaflow_stack.functions.store import BlobStore, unpack

#: Entries of a Metaflow code package that are Metaflow's, not the user's.
_METAFLOW_ENTRIES = (".mf_code", ".mf_meta", ".mf_install", "INFO", "CONFIG_PARAMETERS")


def _extract(reference: FunctionReference, base: str | None) -> Path:
    """The folder holding the function's code (``code/``) and flow files (``flow/``)."""
    target = settings.load().state_dir / "functions" / reference.digest[:20]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    code_store = BlobStore.of(reference.store, base)
    unpack(code_store.load([reference.function.archive])[reference.function.archive], staging / "code")
    package = reference.task.code_package
    if package is not None:
        blob = BlobStore.of(reference.task.store, base).load([package.key])[package.key]
        unpack(blob, staging / "flow", skip_prefixes=_METAFLOW_ENTRIES)
    try:
        os.rename(staging, target)  # atomic: a concurrent loader either wins or finds it done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load(
    reference: FunctionReference, base: str | None, preload: bool = False
) -> tuple[Callable[..., Any], FunctionParameters]:
    """The function object and its parameters (every artifact loaded already with ``preload``)."""
    root = _extract(reference, base)
    for folder in (root / "flow", root / "code"):  # code first on the path
        if folder.is_dir() and str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    try:
        target: Any = importlib.import_module(reference.function.module)
        for part in reference.function.qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise BindError(
            f"cannot import {reference.function.module}.{reference.function.qualname}: {exc}",
            fix="the function's environment lacks a module it imports; re-bind in an environment that has it",
        ) from exc
    artifact_store = BlobStore.of(reference.task.store, base)
    params = FunctionParameters(reference.task.pathspec, reference.task.artifacts, artifact_store.load)
    if preload:
        params.preload()
    return target, params
