"""Metaflow's artifact-serializer hook, used to read every artifact in a ``@confidential`` enclave through
``metaflow_stack.confidential.inputs`` (plain data, sealed values, trusted packages; never an arbitrary
pickle). It claims pickled artifacts only inside an enclave, ahead of Metaflow's own pickle reader, and
writes nothing: outside an enclave, and for every artifact a step saves, Metaflow's serializers do as
always."""

from __future__ import annotations

import os
from typing import Any

from metaflow.datastore.artifacts.serializer import ArtifactSerializer, SerializationFormat

#: The encodings Metaflow's pickle serializer writes (and reads).
PICKLED = frozenset({"pickle-v2", "pickle-v4", "gzip+pickle-v2", "gzip+pickle-v4"})


def _in_enclave() -> bool:
    from metaflow_stack.confidential.inside import EXCHANGE

    return bool(os.environ.get(EXCHANGE))


class InputGuard(ArtifactSerializer):
    TYPE = "confidential_inputs"
    PRIORITY = 1  # before Metaflow's pickle reader (9999), which it stands in for in an enclave

    @classmethod
    def can_serialize(cls, obj: Any) -> bool:
        return False

    @classmethod
    def can_deserialize(cls, metadata: Any) -> bool:
        return metadata.encoding in PICKLED and _in_enclave()

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
