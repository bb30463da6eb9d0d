"""Self-contained bundles: a reference with its code, lock and artifacts, in a folder or on S3.

Layout (the same on a local path and under an ``s3://`` prefix)::

    reference.json       the reference, its stores pointing into this bundle
    requirements.lock    the environment's pins, for people and image builds
    blobs/               Metaflow's content-addressed store: code, code package, artifacts

A bundle exported without artifacts keeps pointing at the task's datastore for them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from metaflow_stack.functions import reference as references
from metaflow_stack.functions.errors import FunctionError
from metaflow_stack.functions.reference import BlobStoreRef, FunctionReference
from metaflow_stack.functions.store import BlobStore, storage_for

REFERENCE_FILE = "reference.json"
LOCK_FILE = "requirements.lock"
BLOBS = "blobs"


def _read(location: str, name: str) -> bytes:
    storage = storage_for(location)
    with storage.load_bytes([name]) as loaded:
        for _, path, _ in loaded:
            if path is None:
                raise FunctionError(f"no {name} at {location}", fix="pass a bundle written by JsonFunction.export")
            return Path(path).read_bytes()
    raise FunctionError(f"no {name} at {location}")


def _write(location: str, files: dict[str, bytes]) -> None:
    storage_for(location).save_bytes(((name, io.BytesIO(data)) for name, data in files.items()), overwrite=True)


def resolve_reference(source: str | dict[str, Any] | FunctionReference) -> tuple[FunctionReference, str | None]:
    """The reference and, for a bundle, its location (where its blobs are).

    ``source`` is a reference (model, dict or JSON text), a file holding one,
    or a bundle: its folder, its ``reference.json``, or an ``s3://`` URL.
    """
    if isinstance(source, FunctionReference):
        return source, None
    if not isinstance(source, str) or source.lstrip().startswith("{"):
        return references.parse(source), None
    path = Path(source)
    if source.startswith("s3://") or path.is_dir() or path.name == REFERENCE_FILE:
        location = source.rstrip("/").removesuffix(REFERENCE_FILE).rstrip("/")
        if not location.startswith("s3://"):
            location = str(Path(location).resolve())
        return references.parse(_read(location, REFERENCE_FILE)), location
    if path.is_file():
        return references.parse(path.read_bytes()), None  # (parse says what is wrong, text or not)
    raise FunctionError(
        f"no reference file or bundle at {source}",
        fix="pass the JSON from JsonFunction(...).reference, a file holding it, or a bundle folder or s3:// URL",
    )


def export(ref: FunctionReference, destination: str, *, include_artifacts: bool = True, base: str | None = None) -> str:
    """Write ``ref`` as a bundle at ``destination``; return the location."""
    if not destination.startswith("s3://"):
        destination = str(Path(destination).resolve())
        Path(destination).mkdir(parents=True, exist_ok=True)
    target = BlobStore(destination, BLOBS)
    bundle_store = BlobStoreRef(type="bundle", prefix=BLOBS)

    code_keys = [ref.function.archive]
    task_keys = [ref.task.code_package.key] if ref.task.code_package else []
    if include_artifacts:
        task_keys += [a.key for a in ref.task.artifacts.values()]
    # Blobs are re-saved through the store, so their keys (content hashes) stay the same.
    for store_ref, keys in ((ref.store, code_keys), (ref.task.store, task_keys)):
        if keys:
            blobs = BlobStore.of(store_ref, base).load(keys)
            saved = target.save([blobs[k] for k in keys])
            if saved != keys:
                raise FunctionError(f"exported blobs changed keys: {keys} -> {saved}")

    task = ref.task.model_copy(update={"store": bundle_store}) if include_artifacts else ref.task
    if not include_artifacts and ref.task.store.type == "bundle":
        raise FunctionError("re-exporting a bundle without its artifacts would lose them", fix="include the artifacts")
    bundled = ref.model_copy(update={"store": bundle_store, "task": task})
    _write(
        destination,
        {
            REFERENCE_FILE: bundled.to_json().encode(),
            LOCK_FILE: ("\n".join(ref.environment.packages) + "\n").encode(),
        },
    )
    return destination
