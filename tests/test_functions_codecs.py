"""Codecs: the Avro schema comes from the function's types, and packages add codecs through entry points."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from metaflow_stack.functions import codecs

FLOWER_SCHEMA = {
    "type": "object",
    "properties": {"sepal_length": {"type": "number"}, "name": {"type": "string"}},
    "required": ["sepal_length"],
}


def test_avro_schema_is_derived_from_a_typed_input() -> None:
    codec = codecs.create("avro", FLOWER_SCHEMA)
    assert codec.avro_schema["type"] == "record"
    fields = {f["name"]: f["type"] for f in codec.avro_schema["fields"]}
    assert fields == {"sepal_length": "double", "name": ["null", "string"]}
    value = {"sepal_length": 5.1, "name": None}
    assert codec.decode(codec.encode(value)) == value


def test_avro_rejects_values_outside_its_schema() -> None:
    codec = codecs.create("avro", FLOWER_SCHEMA)
    with pytest.raises(ValueError):
        codec.encode({"sepal_length": "long"})


@pytest.mark.parametrize("name", ["json", "msgpack", "avro", "arrow"])
def test_open_values_round_trip(name: str) -> None:
    codec = codecs.create(name, {})
    values = [{"a": 1, "b": [1.5, "x", None], "c": {"d": True}}, {"a": 2, "b": [], "c": {}}]
    if name == "arrow":
        values = [{"a": 1, "b": 1.5}, {"a": 2, "b": 2.5}]
    assert codec.decode_batch(codec.encode_batch(values)) == values
    assert codec.decode(codec.encode(values[0])) == values[0]


@pytest.fixture
def custom_codec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An installed distribution (a dist-info on the path) registering the codec ``shouty-json``."""
    (tmp_path / "shouty_codec.py").write_text(
        textwrap.dedent(
            """
            import json

            class ShoutyJson:
                name = "shouty-json"
                content_type = "application/x-shouty-json"
                batch_only = False

                def __init__(self, schema):
                    self.schema = schema

                def encode(self, value):
                    return b"!" + json.dumps(value).encode()

                def decode(self, data):
                    assert data[:1] == b"!", "not shouty"
                    return json.loads(data[1:])

                encode_batch = encode
                decode_batch = decode
            """
        )
    )
    dist = tmp_path / "shouty_codec-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shouty-codec\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{codecs.ENTRY_POINT_GROUP}]\nshouty-json = shouty_codec:ShoutyJson\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # for worker processes
    return "shouty-json"


def test_entry_point_codec_is_listed_and_created(custom_codec: str) -> None:
    assert custom_codec in codecs.names()
    codec = codecs.create(custom_codec, {})
    assert codec.encode({"a": 1}) == b'!{"a": 1}'


@pytest.mark.parametrize("backend", ["inprocess", "local"])
def test_a_bound_function_is_callable_through_an_entry_point_codec(custom_codec, train_task, backend) -> None:
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    reference = JsonFunction(iris_functions.echo, task=train_task).reference
    with function_from_json(reference, backend=backend, codec=custom_codec) as fn:
        assert fn({"hello": ["world", 1]}) == {"hello": ["world", 1]}
    sys.modules.pop("shouty_codec", None)
