"""Inputs authenticated: the records a confidential task reads its inputs from, as its launcher found them
when it ordered the task, bound into the order (so into the quote), and held to that inside the TEE.

A task's inputs are its parents' records in the run's datastore: each names
its artifacts' blobs by their SHA-1 (``data.json``), and each blob is the
pickle of that digest. Whoever may write the datastore (a shared bucket's
other writers; whoever answers Phala's API, which can obtain a CVM's
datastore credentials) could swap either. The launcher takes a digest of
each parent's record (``snapshot``); in the TEE, ``install`` holds every
input record Metaflow opens to it and every blob it loads to its digest,
so a swap stops the task, naming the input. What the launcher's own
operator writes is not covered: it chooses the digests. Nor is a record
changed before the launcher read it (local metadata lives in the same
datastore).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from metaflow_stack.confidential.seal import SealedError


def record_digest(attempt: int | None, objects: dict[str, str], info: dict[str, Any]) -> str:
    """The digest of a task's record: its attempt, its artifacts' blob digests and their descriptions."""
    record = {"attempt": attempt, "objects": objects, "info": info}
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _task(path: str) -> tuple[str, str, str, int | None]:
    """``run/step/task[/attempt]``, as Metaflow writes an input path."""
    parts = path.split("/")
    if len(parts) not in (3, 4):
        raise SealedError(f"{path!r} is not an input path (run/step/task)")
    return parts[0], parts[1], parts[2], int(parts[3]) if len(parts) == 4 else None


def snapshot(flow_datastore: Any, input_paths: Iterable[str]) -> dict[str, str]:
    """``{run/step/task: record digest}`` of each input path's task, read from ``flow_datastore`` now."""
    found = {}
    for path in input_paths:
        run, step, task, attempt = _task(path)
        store = flow_datastore.get_task_datastore(run, step, task, attempt=attempt, mode="r")
        found[f"{run}/{step}/{task}"] = record_digest(store._attempt, store._objects, store._info)
    return found


def install(expected: dict[str, str], input_paths: Iterable[str]) -> None:
    """In the TEE, before the task reads anything: every input record Metaflow opens must have the digest
    ``expected`` names, and every blob it loads must be the pickle of its digest; ``SealedError`` names the
    input otherwise. An input path the order has no digest for is refused at once."""
    from metaflow.datastore.content_addressed_store import ContentAddressedStore
    from metaflow.datastore.task_datastore import TaskDataStore

    missing = sorted({"/".join(_task(path)[:3]) for path in input_paths} - set(expected))
    if missing:
        raise SealedError(f"the order has no digest for the input {missing[0]}: it cannot be authenticated")
    if getattr(TaskDataStore.__init__, _CHECKED, False):  # (every confidential step's decorator asks)
        return
    opened, loaded, named = TaskDataStore.__init__, ContentAddressedStore.load_blobs, TaskDataStore.load_artifacts

    @functools.wraps(opened)
    def checked_record(self: Any, *args: Any, **kwargs: Any) -> None:
        opened(self, *args, **kwargs)
        path = f"{self._run_id}/{self._step_name}/{self._task_id}"
        digest = record_digest(self._attempt, self._objects, self._info) if self._mode == "r" else None
        if path in expected and digest is not None and digest != expected[path]:
            raise SealedError(f"{path}: its record in the datastore is not the one the task was ordered with")

    @functools.wraps(loaded)
    def checked_blobs(self: Any, keys: Any, force_raw: bool = False, is_transfer: bool = False) -> Iterator[Any]:
        for item in loaded(self, keys, force_raw=force_raw, is_transfer=is_transfer):
            if not is_transfer and hashlib.sha1(item[1]).hexdigest() != item[0]:  # (Metaflow's digest of a blob)
                raise _Altered(item[0])
            yield item

    @functools.wraps(named)
    def checked_artifacts(self: Any, names: Any) -> Iterator[Any]:
        try:
            yield from named(self, names)
        except _Altered as exc:
            name = next((n for n, key in self._objects.items() if key == exc.key), exc.key)
            path = f"{self._run_id}/{self._step_name}/{self._task_id}"
            raise SealedError(f"{path}/{name}: its blob in the datastore was altered") from None

    setattr(checked_record, _CHECKED, True)
    TaskDataStore.__init__ = checked_record
    ContentAddressedStore.load_blobs = checked_blobs
    TaskDataStore.load_artifacts = checked_artifacts


#: Marks Metaflow's record reader once it checks records.
_CHECKED = "_metaflow_stack_checks_records"


class _Altered(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key
