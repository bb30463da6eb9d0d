"""``function_from_json``: load a reference and call it through a backend.

Every backend sits behind ``Function``, which validates input against the
reference's schema before anything runs (so every backend rejects the same
inputs with the same error), accepts single records, lists and Arrow tables,
and offers ``await fn.acall(x)`` alongside ``fn(x)``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from metaflow_stack.functions import MAX_CALL_TIMEOUT
from metaflow_stack.functions.errors import FunctionError
from metaflow_stack.functions.reference import FunctionReference
from metaflow_stack.functions.schema import Validator

BACKENDS = ("inprocess", "local", "ray")


def call_bound(call_timeout: float | None, inputs: int) -> float | None:
    """The seconds a call on ``inputs`` inputs may take: ``call_timeout`` for each (one for an empty batch),
    ``MAX_CALL_TIMEOUT`` at most (past 24 days the kernel's wait overflows)."""
    return None if call_timeout is None else min(call_timeout * max(inputs, 1), MAX_CALL_TIMEOUT)


class Backend(Protocol):
    name: str
    #: Whether ``call`` runs the function in this thread (no I/O to wait on), so a server may call it
    #: on its event loop when it is quick.
    in_process: bool

    def call(self, value: Any) -> Any: ...

    def call_batch(self, values: list[Any]) -> list[Any]: ...

    def close(self) -> None: ...


class Function:
    """A loaded function; call it like the original, from any thread or coroutine."""

    def __init__(self, reference: FunctionReference, backend: Backend) -> None:
        self.reference = reference
        self.backend = backend
        #: Raises ``InvalidInputError`` naming the field when a value does not match the input schema.
        self.validate = Validator(reference.input_schema)

    def __call__(self, data: Any) -> Any:
        self.validate(data)
        return self.backend.call(data)

    def batch(self, records: Any) -> Any:
        """Call on many records in one go: a list (returns a list) or an Arrow table (returns a table)."""
        table = None
        if hasattr(records, "to_pylist") and hasattr(records, "schema"):
            table, records = records, records.to_pylist()
        if not isinstance(records, list):
            raise FunctionError(f"a batch is a list or an Arrow table, not {type(records).__name__}")
        for index, record in enumerate(records):
            self.validate(record, where=f"input[{index}]")
        results = self.backend.call_batch(records)
        if table is None:
            return results
        import pyarrow

        if all(isinstance(r, dict) for r in results):
            return pyarrow.Table.from_pylist(results)
        return pyarrow.table({"value": results})

    async def acall(self, data: Any) -> Any:
        """``await fn.acall(x)``: the call runs off the event loop."""
        self.validate(data)
        return await asyncio.to_thread(self.backend.call, data)

    async def abatch(self, records: Any) -> Any:
        return await asyncio.to_thread(self.batch, records)

    def close(self) -> None:
        """Release the backend's workers or actors."""
        self.backend.close()

    def __enter__(self) -> Function:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def function_from_json(
    reference: str | dict[str, Any] | FunctionReference,
    backend: str = "local",
    *,
    codec: str | None = None,
    workers: int = 1,
    preload: bool = False,
    call_timeout: float | None = None,
    **options: Any,
) -> Function:
    """Load a function from its reference (JSON, a bundle directory or ``s3://`` URL) and a backend.

    ``inprocess`` runs it in this process; ``local`` (the default) in worker
    processes of its own environment; ``ray`` in Ray actors of that
    environment (``num_cpus``, ``num_gpus``, ``memory`` and ``replicas`` options).
    ``preload`` loads every artifact before returning, so the first call is as
    fast as the next (servers use it); otherwise each loads on first use.
    ``call_timeout`` bounds a call in seconds per input (a batch of n has n
    times it), counted once a worker has the call: past it the worker or actor
    running the call is stopped and the call raises ``CallTimeoutError``.
    ``inprocess`` cannot stop a call, so it takes none.
    """
    from metaflow_stack.functions.bundle import resolve_reference

    if call_timeout is not None and not 0 < call_timeout <= MAX_CALL_TIMEOUT:
        raise FunctionError(
            f"call_timeout is {call_timeout!r}; it is seconds above 0 and at most {MAX_CALL_TIMEOUT:,}, or None"
        )

    ref, base = resolve_reference(reference)
    codec = codec or ref.codec
    if backend == "inprocess":
        if call_timeout is not None:
            raise FunctionError(
                "the inprocess backend runs the function in this thread, where no call can be stopped",
                fix="use the local backend for a call_timeout",
            )
        from metaflow_stack.functions.backends.inprocess import InProcessBackend

        return Function(ref, InProcessBackend(ref, base, codec, preload))
    if backend == "local":
        from metaflow_stack.functions.backends.local import LocalBackend

        return Function(
            ref, LocalBackend(ref, base, codec, workers=workers, preload=preload, call_timeout=call_timeout)
        )
    if backend == "ray":
        from metaflow_stack.functions.backends.ray import RayBackend

        replicas = options.pop("replicas", workers)
        return Function(
            ref, RayBackend(ref, base, codec, replicas=replicas, preload=preload, call_timeout=call_timeout, **options)
        )
    raise FunctionError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
