"""One golden suite: every backend returns the same results for the same inputs.

Each backend is loaded once per module from the same reference and asked the
same questions; the in-process results are the golden answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os

import pytest

BACKENDS = ["inprocess", "local", pytest.param("ray", marks=pytest.mark.slow)]
CODECS = ["json", "msgpack", "avro", "arrow"]
FLOWERS = [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"sepal_length": 6.0, "sepal_width": 2.7, "petal_length": 4.5, "petal_width": 1.4},
    {"sepal_length": 6.9, "sepal_width": 3.1, "petal_length": 5.4, "petal_width": 2.1},
]
ECHOES = [
    {},
    {"text": "héllo ✓", "n": 3, "x": 0.1, "flag": True, "none": None},
    {"nested": {"list": [1, 2.5, "three", [4]], "map": {"a": {"b": []}}}},
    {"floats": [i / 7 for i in range(1000)]},
]


@pytest.fixture(scope="module")
def references(train_task) -> dict[str, str]:
    import iris_functions
    from metaflow import JsonFunction

    return {
        name: JsonFunction(getattr(iris_functions, name), task=train_task).reference
        for name in ("predict", "predict_typed", "echo", "where")
    }


@pytest.fixture(scope="module")
def ray_session():
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()


@pytest.fixture(scope="module", params=BACKENDS)
def loaded(request, references, ray_session):
    """Each reference loaded on one backend (two workers/replicas where that means something)."""
    from metaflow import function_from_json

    options = {"inprocess": {}, "local": {"workers": 2}, "ray": {"workers": 2, "num_cpus": 0.25}}[request.param]
    functions = {name: function_from_json(ref, backend=request.param, **options) for name, ref in references.items()}
    yield request.param, functions
    for fn in functions.values():
        fn.close()


@pytest.fixture(scope="module")
def golden(references):
    from metaflow import function_from_json

    functions = {name: function_from_json(ref, backend="inprocess") for name, ref in references.items()}
    return {
        "predict": [functions["predict"](f) for f in FLOWERS],
        "echo": [functions["echo"](e) for e in ECHOES],
    }


def test_single_calls_match_the_golden_answers(loaded, golden) -> None:
    _, fns = loaded
    assert [fns["predict"](f) for f in FLOWERS] == golden["predict"]
    assert [fns["echo"](e) for e in ECHOES] == golden["echo"]
    assert [r["prediction"] for r in golden["predict"]] == [0, 1, 2]


def test_batches_as_lists_match_single_calls(loaded, golden) -> None:
    _, fns = loaded
    assert fns["predict"].batch(FLOWERS) == golden["predict"]
    assert fns["echo"].batch(ECHOES) == golden["echo"]


def test_batches_as_arrow_tables_return_tables(loaded, golden) -> None:
    import pyarrow as pa

    _, fns = loaded
    result = fns["predict"].batch(pa.Table.from_pylist(FLOWERS))
    assert isinstance(result, pa.Table)
    assert result.to_pylist() == golden["predict"]


def test_calls_from_many_threads_all_succeed(loaded, golden) -> None:
    _, fns = loaded
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(fns["predict"], FLOWERS * 40))
    assert results == golden["predict"] * 40


def test_async_form_returns_the_same(loaded, golden) -> None:
    _, fns = loaded

    async def many():
        return await asyncio.gather(*(fns["predict"].acall(f) for f in FLOWERS))

    assert asyncio.run(many()) == golden["predict"]


def test_where_the_function_runs(loaded) -> None:
    backend, fns = loaded
    pids = {fns["where"]({})["pid"] for _ in range(20)}
    if backend == "inprocess":
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_returns_the_golden_answers(references, golden, codec: str) -> None:
    from metaflow import function_from_json

    with function_from_json(references["predict_typed"], backend="local", codec=codec) as typed:
        assert [typed(f) for f in FLOWERS] == golden["predict"]
        assert typed.batch(FLOWERS) == golden["predict"]
    with function_from_json(references["echo"], backend="inprocess", codec=codec) as echo:
        open_values = ECHOES if codec != "arrow" else ECHOES[1:2]  # Arrow needs one schema per batch
        assert [echo(e) for e in open_values] == [golden["echo"][ECHOES.index(e)] for e in open_values]
