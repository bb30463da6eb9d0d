"""Inputs authenticated: the records a confidential task reads its inputs from, as its launcher found them
when it ordered the task, bound into the order (so into the quote), and held to that inside the TEE.

A task's inputs are its parents' records in the run's datastore: each names
its artifacts' blobs by their SHA-1 (``data.json``), each blob is the
pickle of that digest, and an ``IncludeFile`` uploaded with the run is
stored under the SHA-1 of its contents. Whoever may write the datastore (a
shared bucket's other writers; whoever answers Phala's API, which can obtain
a CVM's datastore credentials) could swap any of them. The launcher takes
one digest over its inputs' records (``snapshot``: a fixed size, however
wide a join, since a CVM's order travels in one variable). In the TEE,
every blob and included file Metaflow loads is held to its SHA-1
(``install``, before anything is read), and the records Metaflow opened to
the order's digest (``hold``, before the step's code runs), so a swap stops
the task. What the launcher's own operator writes is not covered: it chooses
the digests. Nor is a record changed before the launcher read it, or an
``IncludeFile`` of an external URL.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from metaflow_stack.confidential.seal import SealedError


def record_digest(attempt: int | None, objects: dict[str, str], info: dict[str, Any]) -> str:
    """The digest of a task's record: its attempt, its artifacts' blob digests and their descriptions."""
    return _digest({"attempt": attempt, "objects": objects, "info": info})


def snapshot(flow_datastore: Any, input_paths: Iterable[str]) -> str:
    """The digest of the records of ``input_paths``' tasks (``run/step/task[/attempt]``), read from
    ``flow_datastore`` now: what the order carries."""
    records = {}
    for path in input_paths:
        parts = path.split("/")
        if len(parts) not in (3, 4):
            raise SealedError(f"{path!r} is not an input path (run/step/task)")
        attempt = int(parts[3]) if len(parts) == 4 else None
        store = flow_datastore.get_task_datastore(*parts[:3], attempt=attempt, mode="r")
        records[_path(store)] = record_digest(store._attempt, store._objects, store._info)
    return _digest(records)


def hold(inputs: list[Any], expected: str) -> None:
    """In the TEE, once Metaflow has opened the task's input records (``inputs``, its datastores) and before
    the step's code runs: their digest must be the order's."""
    records = {_path(store): record_digest(store._attempt, store._objects, store._info) for store in inputs}
    if _digest(records) != expected:
        raise SealedError(
            f"the records of this task's {len(records)} input(s) in the datastore are not the ones it was "
            f"ordered with: {', '.join(sorted(records)[:3])}{', ...' if len(records) > 3 else ''}"
        )


def install() -> None:
    """In the TEE, before the task reads anything: every blob Metaflow loads must be the pickle of its digest,
    and every ``IncludeFile`` uploaded with the run the contents of its; ``SealedError`` names the artifact.
    Once per process (every confidential step's decorator asks)."""
    from metaflow.datastore.content_addressed_store import ContentAddressedStore
    from metaflow.datastore.task_datastore import TaskDataStore
    from metaflow.includefile import IncludedFile

    if getattr(ContentAddressedStore.load_blobs, _CHECKED, False):
        return
    loaded, named = ContentAddressedStore.load_blobs, TaskDataStore.load_artifacts

    @functools.wraps(loaded)
    def checked_blobs(self: Any, keys: Any, force_raw: bool = False, is_transfer: bool = False) -> Iterator[Any]:
        for item in loaded(self, keys, force_raw=force_raw, is_transfer=is_transfer):
            if not is_transfer and hashlib.sha1(item[1]).hexdigest() != item[0]:  # (Metaflow's digest of a blob)
                raise AlteredError(f"the blob {item[0]} in the datastore was altered", key=item[0])
            yield item

    @functools.wraps(named)
    def checked_artifacts(self: Any, names: Any) -> Iterator[Any]:
        try:
            yield from named(self, names)
        except AlteredError as exc:
            name = next((n for n, k in self._objects.items() if k == exc.key), exc.key)
            raise AlteredError(f"{_path(self)}/{name}: its blob in the datastore was altered") from None

    decoded = IncludedFile.decode

    @functools.wraps(decoded)
    def checked_include(self: Any, name: str, var_type: str = "Artifact") -> Any:
        descriptor = self.descriptor
        if descriptor.get("type") == "uploader-v1" or descriptor.get("sub-type") == "uploaded":
            return _uploaded(descriptor, name, var_type)
        return decoded(self, name, var_type)  # an external URL's file: nothing names its contents

    setattr(checked_blobs, _CHECKED, True)
    ContentAddressedStore.load_blobs = checked_blobs
    TaskDataStore.load_artifacts = checked_artifacts
    IncludedFile.decode = checked_include


class AlteredError(SealedError):
    """A blob or included file whose contents are not the digest that names them (``key``, a blob's)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def _uploaded(descriptor: dict[str, Any], name: str, var_type: str) -> Any:
    """An ``IncludeFile`` uploaded with the run: its contents, read once, held to the SHA-1 its URL ends with
    (Metaflow stores it under that digest), then decoded as Metaflow decodes them."""
    from metaflow.includefile import UPLOADERS

    url = descriptor["url"]
    with UPLOADERS[descriptor["type"]]._get_handler(url)() as client:
        found = client.get(url, return_missing=True)
        if not found.exists:
            raise FileNotFoundError(f"File at '{url}' does not exist")
        with gzip.GzipFile(filename=found.path, mode="rb") as stream:
            contents = stream.read()
    if hashlib.sha1(contents).hexdigest() != url.rstrip("/").rsplit("/", 1)[-1]:
        raise AlteredError(f"{var_type} '{name}' (IncludeFile): its contents in the datastore were altered")
    if descriptor.get("is_text"):
        return io.TextIOWrapper(io.BytesIO(contents), encoding=descriptor.get("encoding")).read()
    return contents


def _path(store: Any) -> str:
    return f"{store._run_id}/{store._step_name}/{store._task_id}"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


#: Marks Metaflow's blob loader once it checks blobs.
_CHECKED = "_metaflow_stack_checks_blobs"
