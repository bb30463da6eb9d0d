"""Where a confidential task and its launcher meet: the task's evidence goes out, the keeper's envelope (or
its refusal) comes in, and a task in a CVM says how it ended.

A Gramine enclave shares this machine: its exchange is a folder under the
enclave's evidence folder (``Folder``). A Phala CVM shares nothing with the
launcher but the run's datastore: its exchange is a prefix there, beside the
task's own files (``InDatastore``), under Metaflow's storage of that
datastore, so S3 (or any store Metaflow has) carries it. Nothing exchanged
is secret: the evidence is public, and the envelope opens only with the
enclave's own key.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from metaflow_stack.local_secrets import keep

#: The exchange's files: the TEE's evidence, the keeper's envelope or refusal, and (a CVM's) the task's end.
EVIDENCE, ENVELOPE, REFUSED, ENDED = "evidence.json", "key.envelope", "refused.txt", "ended.json"


class Exchange(Protocol):
    def put(self, name: str, data: bytes) -> None: ...

    def get(self, name: str) -> bytes | None: ...


@dataclass(frozen=True)
class Folder:
    """An exchange folder on this machine, each file written whole or not at all."""

    folder: Path

    def put(self, name: str, data: bytes) -> None:
        keep(self.folder / name, data)

    def get(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None


@dataclass(frozen=True)
class InDatastore:
    """An exchange under ``prefix`` of a datastore, through Metaflow's storage of it (``DataStoreStorage``):
    an object is put whole, so a reader sees all of it or none."""

    storage: Any
    prefix: str

    def put(self, name: str, data: bytes) -> None:
        self.storage.save_bytes(iter([(f"{self.prefix}/{name}", io.BytesIO(data))]), overwrite=True)

    def get(self, name: str) -> bytes | None:
        with self.storage.load_bytes([f"{self.prefix}/{name}"]) as loaded:
            for _, path, _ in loaded:
                return Path(path).read_bytes() if path else None
        return None


def prefix_of(flow: str, run: str, step: str, task: str, attempt: int, nonce: str) -> str:
    """Where a task attempt's exchange is in its datastore: beside the task's own files, one per launch (the
    keeper's nonce is new each time, so nothing a former launch left is read)."""
    return f"{flow}/{run}/{step}/{task}/confidential/{attempt}-{nonce[:16]}"


def storage_for(datastore_type: str, root: str | None) -> Any:
    """Metaflow's storage of the datastore of ``datastore_type`` (``s3``, ``local``...) at ``root`` (else
    where Metaflow's configuration puts it)."""
    from metaflow.plugins import DATASTORES

    implementation = next(d for d in DATASTORES if datastore_type == d.TYPE)
    return implementation(root or implementation.get_datastore_root_from_config(lambda *_: None))
