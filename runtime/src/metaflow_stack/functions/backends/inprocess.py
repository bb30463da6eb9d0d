"""Run the function in the caller's process and environment: the fastest path."""

from __future__ import annotations

import traceback
from typing import Any

from metaflow_stack.functions import codecs, loader
from metaflow_stack.functions.errors import RemoteFunctionError
from metaflow_stack.functions.reference import FunctionReference


class InProcessBackend:
    """Calls the function directly; results pass through the codec like every backend's."""

    name = "inprocess"
    in_process = True

    def __init__(self, reference: FunctionReference, base: str | None, codec: str, preload: bool = False) -> None:
        self._fn, self._params = loader.load(reference, base, preload)
        # Results round-trip through the codec so every backend returns the same values.
        self._out = codecs.create(codec, reference.output_schema)

    def _invoke(self, value: Any) -> Any:
        try:
            return self._fn(value, self._params)
        except Exception as exc:
            raise RemoteFunctionError(type(exc).__name__, str(exc), traceback.format_exc()) from exc

    def call(self, value: Any) -> Any:
        return self._out.decode(self._out.encode(self._invoke(value)))

    def call_batch(self, values: list[Any]) -> list[Any]:
        return self._out.decode_batch(self._out.encode_batch([self._invoke(v) for v in values]))

    def close(self) -> None:
        """Nothing to release: the function lives in this process."""
