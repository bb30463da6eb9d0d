"""Wire codecs for function inputs and outputs, pluggable through entry points.

A codec turns values of a known JSON Schema into bytes and back. Built in:
``json`` (orjson, the default), ``msgpack``, ``avro`` (fastavro, with an Avro
schema derived from the function's JSON Schema, or a generic JSON-value schema
when the type is open) and ``arrow`` (Arrow IPC, for batches of records).
Other packages add codecs under the entry point group ``metaflow_stack.codecs``:
each entry point names a callable taking the JSON Schema and returning a codec.

Every codec encodes single values and lists of values (batches); a codec
with ``batch_only`` set carries single values as batches of one.
"""

from __future__ import annotations

import importlib.metadata
import io
from collections.abc import Callable
from typing import Any, Protocol

from metaflow_stack.functions.errors import FunctionError

ENTRY_POINT_GROUP = "metaflow_stack.codecs"


class Codec(Protocol):
    """Bytes for values of one schema."""

    name: str
    content_type: str
    batch_only: bool

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...

    def encode_batch(self, values: list[Any]) -> bytes: ...

    def decode_batch(self, data: bytes) -> list[Any]: ...


class JsonCodec:
    name = "json"
    content_type = "application/json"
    batch_only = False

    def __init__(self, schema: dict[str, Any]) -> None:
        import orjson

        self._dumps = orjson.dumps
        self._loads = orjson.loads
        self._options = orjson.OPT_SERIALIZE_NUMPY

    def encode(self, value: Any) -> bytes:
        return self._dumps(value, option=self._options)

    def decode(self, data: bytes) -> Any:
        return self._loads(data)

    encode_batch = encode
    decode_batch = decode


class MsgpackCodec:
    name = "msgpack"
    content_type = "application/msgpack"
    batch_only = False

    def __init__(self, schema: dict[str, Any]) -> None:
        import msgpack

        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb

    def encode(self, value: Any) -> bytes:
        return self._packb(value, use_bin_type=True)

    def decode(self, data: bytes) -> Any:
        return self._unpackb(data, raw=False, strict_map_key=False)

    encode_batch = encode
    decode_batch = decode


_GENERIC = "MetaflowStackJsonValue"
_GENERIC_SCHEMA = {
    "type": "record",
    "name": _GENERIC,
    "fields": [
        {
            "name": "v",
            "type": [
                "null",
                "boolean",
                "long",
                "double",
                "string",
                {"type": "array", "items": _GENERIC},
                {"type": "map", "values": _GENERIC},
            ],
        }
    ],
}
_AVRO_PRIMITIVES = {"string": "string", "integer": "long", "number": "double", "boolean": "boolean", "null": "null"}


def _wrap(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"v": {str(k): _wrap(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"v": [_wrap(v) for v in value]}
    return {"v": value}


def _unwrap(value: dict[str, Any]) -> Any:
    inner = value["v"]
    if isinstance(inner, dict):
        return {k: _unwrap(v) for k, v in inner.items()}
    if isinstance(inner, list):
        return [_unwrap(v) for v in inner]
    return inner


class _AvroSchemaBuilder:
    """Derives an Avro schema from a JSON Schema; open types fall back to the generic value."""

    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root
        self._names = 0
        self.uses_generic = False

    def build(self, schema: dict[str, Any]) -> Any:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return self.build(self._root.get("$defs", {})[name])
        kind = schema.get("type")
        if kind in _AVRO_PRIMITIVES:
            return _AVRO_PRIMITIVES[kind]
        if kind == "array" and "items" in schema:
            return {"type": "array", "items": self.build(schema["items"])}
        if kind == "object" and schema.get("properties"):
            required = set(schema.get("required", []))
            fields = []
            for name, prop in schema["properties"].items():
                avro = self.build(prop)
                if name in required:
                    fields.append({"name": name, "type": avro})
                else:
                    fields.append({"name": name, "type": ["null", avro], "default": None})
            self._names += 1
            return {"type": "record", "name": f"Record{self._names}", "fields": fields}
        self.uses_generic = True
        return _GENERIC


class AvroCodec:
    name = "avro"
    content_type = "application/avro"
    batch_only = False

    def __init__(self, schema: dict[str, Any]) -> None:
        import fastavro

        self._fastavro = fastavro
        builder = _AvroSchemaBuilder(schema)
        item = builder.build(schema)
        self._generic = item == _GENERIC
        named = [_GENERIC_SCHEMA] if builder.uses_generic else []
        # The generic record is defined first so later schemas can name it.
        single = {"type": "record", "name": "Value", "fields": [{"name": "value", "type": item}]}
        batch = {"type": "array", "items": item}
        self._single = fastavro.parse_schema([*named, single])
        self._batch = fastavro.parse_schema([*named, batch])
        self.avro_schema = item
        #: Whether values may nest without end (the generic JSON value, anywhere in the schema): fastavro's
        #: compiled reader recurses once per level on the C stack, so bytes from a stranger can crash it.
        self.open_schema = builder.uses_generic

    def _in(self, value: Any) -> Any:
        return _wrap(value) if self._generic else value

    def _out(self, value: Any) -> Any:
        return _unwrap(value) if self._generic else value

    def encode(self, value: Any) -> bytes:
        buffer = io.BytesIO()
        self._fastavro.schemaless_writer(buffer, self._single, {"value": self._in(value)})
        return buffer.getvalue()

    def decode(self, data: bytes) -> Any:
        return self._out(self._fastavro.schemaless_reader(io.BytesIO(data), self._single, None)["value"])

    def encode_batch(self, values: list[Any]) -> bytes:
        buffer = io.BytesIO()
        self._fastavro.schemaless_writer(buffer, self._batch, [self._in(v) for v in values])
        return buffer.getvalue()

    def decode_batch(self, data: bytes) -> list[Any]:
        return [self._out(v) for v in self._fastavro.schemaless_reader(io.BytesIO(data), self._batch, None)]


class ArrowCodec:
    """Batches of records as one Arrow IPC stream; non-record values go in a ``value`` column."""

    name = "arrow"
    content_type = "application/vnd.apache.arrow.stream"
    batch_only = True
    _WRAPPED = b"metaflow_stack.wrapped"

    def __init__(self, schema: dict[str, Any]) -> None:
        import pyarrow

        self._pa = pyarrow

    def encode_batch(self, values: list[Any]) -> bytes:
        pa = self._pa
        if values and all(isinstance(v, dict) for v in values):
            table = pa.Table.from_pylist(values)
        else:
            table = pa.Table.from_pydict({"value": values}).replace_schema_metadata({self._WRAPPED: b"1"})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    def decode_batch(self, data: bytes) -> list[Any]:
        table = self._pa.ipc.open_stream(data).read_all()
        if (table.schema.metadata or {}).get(self._WRAPPED):
            return table.column("value").to_pylist()
        return table.to_pylist()

    def encode(self, value: Any) -> bytes:
        return self.encode_batch([value])

    def decode(self, data: bytes) -> Any:
        return self.decode_batch(data)[0]


BUILTIN: dict[str, Callable[[dict[str, Any]], Codec]] = {
    "json": JsonCodec,
    "msgpack": MsgpackCodec,
    "avro": AvroCodec,
    "arrow": ArrowCodec,
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    """Every codec name: built in, plus those other packages register as entry points."""
    return sorted(set(BUILTIN) | set(_entry_points()))


def create(name: str, schema: dict[str, Any]) -> Codec:
    """The codec called ``name`` for values of ``schema``."""
    if name in BUILTIN:
        factory = BUILTIN[name]
    else:
        entry = _entry_points().get(name)
        if entry is None:
            raise FunctionError(
                f"unknown codec {name!r}; codecs: {', '.join(names())}",
                fix=f"pick one of those, or register one under the entry point group {ENTRY_POINT_GROUP!r}",
            )
        factory = entry.load()
    try:
        return factory(schema)
    except ImportError as exc:
        raise FunctionError(
            f"the {name} codec needs {exc.name}, which is not installed",
            fix="pip install 'metaflow-stack[arrow]'" if name == "arrow" else f"pip install {exc.name}",
        ) from exc
