"""The published Metaflow Functions API works verbatim on a real scikit-learn run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from metaflow import FunctionParameters, json_function  # snippet 1, verbatim

from metaflow_stack.functions import reference as references
from metaflow_stack.functions.errors import BindError


@json_function
def predict(data: dict, params: FunctionParameters) -> dict:
    """Run inference using the bound model."""
    features = [data[f] for f in params.feature_names]
    prediction = params.model.predict([features])[0]
    return {"prediction": int(prediction)}


FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "function-reference.schema.json"


@pytest.mark.parametrize("backend", ["inprocess", "local", pytest.param("ray", marks=pytest.mark.slow)])
def test_the_three_snippets_work_verbatim(train_task, backend: str) -> None:
    from metaflow import JsonFunction, Task  # snippet 2

    task = Task(train_task.pathspec)
    inference_fn = JsonFunction(predict, task=task)
    reference = inference_fn.reference

    from metaflow import function_from_json  # snippet 3

    fn = function_from_json(reference, backend=backend)
    batch_data = [FLOWER, {**FLOWER, "petal_length": 5.0, "petal_width": 1.8}]
    results = [fn(record) for record in batch_data]
    assert results == [{"prediction": 0}, {"prediction": 2}]
    fn.close()
    if backend == "ray":
        import ray

        ray.shutdown()


def test_results_match_the_model_called_directly(train_task) -> None:
    from iris_functions import predict
    from metaflow import JsonFunction, function_from_json

    model = train_task.data.model
    flowers = [[5.1, 3.5, 1.4, 0.2], [6.0, 2.7, 4.5, 1.4], [6.9, 3.1, 5.4, 2.1]]
    expected = [int(p) for p in model.predict(flowers)]
    fn = function_from_json(JsonFunction(predict, task=train_task).reference, backend="inprocess")
    names = train_task.data.feature_names
    assert [fn(dict(zip(names, f, strict=True)))["prediction"] for f in flowers] == expected


def test_reference_is_small_readable_versioned_json(train_task) -> None:
    from iris_functions import predict
    from metaflow import JsonFunction

    text = JsonFunction(predict, task=train_task).reference
    document = json.loads(text)
    assert len(text) < 16_000
    assert "\n  " in text  # indented for people
    assert document["format"] == "metaflow-stack.function-reference"
    assert document["version"] == references.VERSION
    assert document["task"]["pathspec"] == train_task.pathspec
    assert set(document["task"]["artifacts"]) >= {"model", "feature_names"}
    assert document["function"] == {**document["function"], "module": "iris_functions", "qualname": "predict"}
    assert any(p.startswith("scikit-learn==") for p in document["environment"]["packages"])


def test_published_schema_matches_the_model_and_validates_a_reference(train_task) -> None:
    import fastjsonschema
    from iris_functions import predict
    from metaflow import JsonFunction

    published = json.loads(SCHEMA_DOC.read_text())
    assert published == references.json_schema(), "regenerate docs/function-reference.schema.json"
    fastjsonschema.compile(published)(json.loads(JsonFunction(predict, task=train_task).reference))


def test_binding_does_not_unpickle_artifacts(train_task, monkeypatch: pytest.MonkeyPatch) -> None:
    # Imported here: this module is itself a function's code, loaded where the tests' conftest is not.
    from conftest import refuse_unpickling
    from iris_functions import predict
    from metaflow import JsonFunction

    refuse_unpickling(monkeypatch, "binding")
    assert JsonFunction(predict, task=train_task).bound.task.artifacts["model"].size > 0


def test_a_function_without_data_and_params_is_refused_at_definition() -> None:
    with pytest.raises(BindError, match="takes 1 arguments"):

        @json_function
        def lonely(data: dict) -> dict:
            return data


def test_the_same_binding_gives_the_same_digest(train_task) -> None:
    from iris_functions import predict
    from metaflow import JsonFunction

    first = JsonFunction(predict, task=train_task).bound
    second = JsonFunction(predict, task=train_task).bound
    assert first.digest == second.digest


def test_a_function_defined_inside_another_is_refused(train_task) -> None:
    from metaflow import JsonFunction

    @json_function
    def nested(data: dict, params: FunctionParameters) -> dict:
        return data

    with pytest.raises(BindError, match="define it at the top level of a module"):
        _ = JsonFunction(nested, task=train_task).reference
