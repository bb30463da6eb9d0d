"""Metaflow's artifact-serializer hook, used to read every artifact in a ``@confidential`` enclave through
``metaflow_stack.confidential.inputs`` (plain data, sealed values, trusted packages; never an arbitrary
pickle). It claims pickled artifacts only inside an enclave, ahead of Metaflow's own pickle reader, and
writes nothing: outside an enclave, and for every artifact a step saves, Metaflow's serializers do as
always."""

from __future__ import annotations

import os
from typing import Any

from metaflow.datastore.artifacts.serializer import ArtifactSerializer, SerializationFormat

from metaflow_stack.confidential import KEEPER_KEY

#: The encodings Metaflow's pickle serializer writes (and reads).
PICKLED = frozenset({"pickle-v2", "pickle-v4", "gzip+pickle-v2", "gzip+pickle-v4"})


def in_enclave() -> bool:
    """Whether this process is a confidential task's enclave: its keeper's key is in its environment, which
    only the enclave's manifest sets (measured, not a value the host chooses)."""
    return bool(os.environ.get(KEEPER_KEY))


def check_guarding() -> None:
    """Refuse to run a task in an enclave where the guard is not the first serializer Metaflow tries (it did
    not load, or was disabled): its inputs would then be unpickled unguarded."""
    from metaflow.datastore.artifacts.serializer import SerializerStore

    from metaflow_stack.confidential.seal import SealedError

    if SerializerStore.get_ordered_serializers()[:1] != [InputGuard]:
        raise SealedError("the enclave's input guard is not active: its inputs would be unpickled unguarded")


class InputGuard(ArtifactSerializer):
    TYPE = "confidential_inputs"
    PRIORITY = 1  # before Metaflow's pickle reader (9999), which it stands in for in an enclave

    @classmethod
    def can_serialize(cls, obj: Any) -> bool:
        return False

    @classmethod
    def can_deserialize(cls, metadata: Any) -> bool:
        return metadata.encoding in PICKLED and in_enclave()

    @classmethod
    def serialize(cls, obj: Any, format: SerializationFormat = SerializationFormat.STORAGE) -> Any:
        raise NotImplementedError("the input guard only reads")

    @classmethod
    def deserialize(
        cls, data: Any, metadata: Any = None, format: SerializationFormat = SerializationFormat.STORAGE
    ) -> Any:
        from metaflow_stack.confidential.inputs import guarded_loads

        if format == SerializationFormat.WIRE:
            raise NotImplementedError("the input guard reads stored artifacts only")
        return guarded_loads(data[0])
