"""``FunctionParameters``: the bound task's artifacts, as attributes, loaded once on first use."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Mapping
from typing import Any

from metaflow_stack.functions.errors import ArtifactNotFoundError, FunctionError

_PICKLE_ENCODINGS = ("pickle-v2", "pickle-v4", "gzip+pickle-v2", "gzip+pickle-v4")


class FunctionParameters:
    """Access to the artifacts of the task a function is bound to.

    ``params.model`` loads the ``model`` artifact from the datastore (or the
    exported bundle) the first time it is read and keeps it, so a model is
    deserialized once per process however many calls use it. Attribute access
    is thread-safe.
    """

    def __init__(self, task: str, artifacts: Mapping[str, Any], load: Callable[[list[str]], dict[str, bytes]]) -> None:
        object.__setattr__(self, "_task", task)
        object.__setattr__(self, "_artifacts", dict(artifacts))
        object.__setattr__(self, "_load", load)
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_lock", threading.Lock())

    @property
    def task(self) -> str:
        """Pathspec of the bound task."""
        return self._task

    def __dir__(self) -> list[str]:
        return sorted(self._artifacts)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        values = self._values
        if name in values:
            return values[name]
        if name not in self._artifacts:
            raise ArtifactNotFoundError(self._task, name, list(self._artifacts))
        with self._lock:
            if name not in values:
                ref = self._artifacts[name]
                if ref.encoding not in _PICKLE_ENCODINGS:
                    raise FunctionError(f"artifact {name!r} of {self._task} has unsupported encoding {ref.encoding}")
                values[name] = pickle.loads(self._load([ref.key])[ref.key])
        return values[name]

    def preload(self) -> None:
        """Load every artifact now, in one read: a server is ready only once its first call costs no
        more than its second (unpickling a model imports its library, seconds on a busy machine)."""
        with self._lock:
            wanted = {name: ref for name, ref in self._artifacts.items() if name not in self._values}
            for name, ref in wanted.items():
                if ref.encoding not in _PICKLE_ENCODINGS:
                    raise FunctionError(f"artifact {name!r} of {self._task} has unsupported encoding {ref.encoding}")
            blobs = self._load([ref.key for ref in wanted.values()]) if wanted else {}
            for name, ref in wanted.items():
                self._values[name] = pickle.loads(blobs[ref.key])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("function parameters are read-only")
