"""A bound function served over HTTP: schemas in OpenAPI, 4xx JSON for bad input, metrics."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
from conftest import FIRST_CALL_S, LOOPBACK, VENV_BIN, free_port, fuzz_finds_nothing, wait_ready

FLOWER = {"sepal_length": 6.9, "sepal_width": 3.1, "petal_length": 5.4, "petal_width": 2.1}


@pytest.fixture(scope="module")
def client(train_task):
    import iris_functions
    from fastapi.testclient import TestClient
    from metaflow import JsonFunction

    from metaflow_stack.serving.app import create_app

    reference = JsonFunction(iris_functions.predict_typed, task=train_task).reference
    with TestClient(create_app(reference), base_url=LOOPBACK) as test_client:
        yield test_client


def _is_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["message"]
    return body


def test_invoke_and_batch_return_the_predictions(client) -> None:
    assert client.post("/invoke", json=FLOWER).json() == {"prediction": 2}
    assert client.post("/invoke/batch", json=[FLOWER, FLOWER]).json() == [{"prediction": 2}] * 2


def test_msgpack_and_avro_are_negotiated(client) -> None:
    response = client.post(
        "/invoke",
        content=msgpack.packb(FLOWER),
        headers={"content-type": "application/msgpack", "accept": "application/msgpack"},
    )
    assert response.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(response.content) == {"prediction": 2}
    json_answer = client.post(
        "/invoke",
        content=msgpack.packb(FLOWER),
        headers={"content-type": "application/msgpack", "accept": "application/json"},
    )
    assert json_answer.json() == {"prediction": 2}


def test_openapi_carries_the_functions_schemas(client) -> None:
    document = client.get("/openapi.json").json()
    request = document["paths"]["/invoke"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(request["required"]) == {"sepal_length", "sepal_width", "petal_length", "petal_width"}
    assert request["properties"]["petal_width"]["type"] == "number"
    assert "422" in document["paths"]["/invoke"]["post"]["responses"]
    assert client.get("/docs").status_code == 200


def test_invalid_input_is_a_422_naming_the_field(client) -> None:
    body = _is_error(client.post("/invoke", json={**FLOWER, "petal_width": "wide"}), 422, "invalid_input")
    assert body["details"]["field"] == "input.petal_width"
    missing = {k: v for k, v in FLOWER.items() if k != "sepal_length"}
    assert _is_error(client.post("/invoke", json=missing), 422, "invalid_input")["details"]["field"] == (
        "input.sepal_length"
    )
    _is_error(client.post("/invoke/batch", json=FLOWER), 422, "invalid_input")


def test_malformed_unknown_and_oversize_bodies_are_4xx_json(client) -> None:
    _is_error(
        client.post("/invoke", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "malformed_body",
    )
    _is_error(
        client.post("/invoke", content=b"a,b", headers={"content-type": "text/csv"}), 415, "unsupported_media_type"
    )
    _is_error(
        client.post("/invoke", content=b"[" + b"1," * 6_000_000 + b"1]", headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )


def test_health_ready_and_metrics(client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    client.post("/invoke", json=FLOWER)
    metrics = client.get("/metrics").text
    assert 'function_requests_total{route="/invoke",status="200"}' in metrics
    assert 'function_requests_total{route="/invoke",status="422"}' in metrics


def test_function_exception_is_a_500_with_an_error_id_and_no_traceback(train_task) -> None:
    import iris_functions
    from fastapi.testclient import TestClient
    from metaflow import JsonFunction

    from metaflow_stack.serving.app import create_app

    reference = JsonFunction(iris_functions.fail, task=train_task).reference
    with TestClient(create_app(reference), base_url=LOOPBACK) as failing:
        body = _is_error(failing.post("/invoke", json={"why": "bad"}), 500, "function_raised")
    assert len(body["details"]["error_id"]) == 16
    assert "Traceback" not in str(body)


def test_user_written_fastapi_form_works_verbatim(train_task) -> None:
    import iris_functions
    from fastapi.testclient import TestClient
    from metaflow import JsonFunction

    reference = JsonFunction(iris_functions.predict, task=train_task).reference

    from fastapi import FastAPI
    from metaflow import function_from_json

    app = FastAPI()
    fn = function_from_json(reference)

    @app.post("/predict")
    def predict(payload: dict):
        return fn(payload)

    with TestClient(app) as user_client:
        assert user_client.post("/predict", json=FLOWER).json() == {"prediction": 2}
    fn.close()


@contextlib.contextmanager
def _served(reference: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``metaflow function serve`` on a free 127.0.0.1 port; yields its URL and log file."""
    reference_file = tmp_path / "predict.json"
    reference_file.write_text(reference)
    port = free_port()
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [str(VENV_BIN / "metaflow"), "function", "serve", str(reference_file), "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_ready(url, 60), log.read_text()[-3000:]
        yield url, log
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_metaflow_function_serve_answers_over_http(train_task, tmp_path: Path) -> None:
    import iris_functions
    from metaflow import JsonFunction

    with _served(JsonFunction(iris_functions.predict, task=train_task).reference, tmp_path) as (url, log):
        assert httpx.post(f"{url}/invoke", json=FLOWER, timeout=FIRST_CALL_S).json() == {"prediction": 2}
    # uvicorn drains requests and runs the shutdown hook (closing the workers) before it exits
    assert "Application shutdown complete." in log.read_text()


@pytest.mark.slow
def test_ready_means_the_artifacts_are_loaded(train_task, tmp_path: Path) -> None:
    import time

    import iris_functions
    import psutil
    from metaflow import JsonFunction

    with _served(JsonFunction(iris_functions.predict, task=train_task).reference, tmp_path) as (url, _):
        server = psutil.Process(_server_pid(url))
        workers = [p for p in server.children(recursive=True) if "metaflow_stack.functions.worker" in p.cmdline()]
        assert len(workers) == 1
        # The model was unpickled before /ready said so: scikit-learn's compiled code is in the worker already.
        assert any("sklearn" in m.path for m in workers[0].memory_maps()), "the model loads on the first call"
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            assert httpx.post(f"{url}/invoke", json=FLOWER).json() == {"prediction": 2}
            timings.append(time.perf_counter() - started)
    # Loose on purpose (a busy machine): loading lazily made the first call 6-7 s against milliseconds.
    assert timings[0] < 1.0 + 5 * timings[1], timings


def _server_pid(url: str) -> int:
    """The pid of the process listening on ``url``'s port."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    return next(c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN")


@pytest.mark.slow
def test_concurrent_calls_are_batched_and_a_failing_input_fails_alone(train_task, tmp_path: Path) -> None:
    import asyncio

    import iris_functions
    from metaflow import JsonFunction

    inputs = [{"i": i, "fail": i % 8 == 3} for i in range(48)]

    async def call_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return await asyncio.gather(*(http.post("/invoke", json=value) for value in inputs))

    with _served(JsonFunction(iris_functions.slow_echo, task=train_task).reference, tmp_path) as (url, _):
        responses = asyncio.run(call_all(url))
        metrics = httpx.get(f"{url}/metrics").text
    for value, response in zip(inputs, responses, strict=True):
        if value["fail"]:
            assert _is_error(response, 500, "function_raised")["details"]["error_id"]
        else:
            assert response.json() == value
    calls = float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("function_batch_size_count"))
    )
    assert calls < len(inputs), metrics  # requests that arrived together shared calls


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(train_task, tmp_path: Path) -> None:
    import iris_functions
    from metaflow import JsonFunction

    with _served(JsonFunction(iris_functions.predict_typed, task=train_task).reference, tmp_path) as (url, _):
        report = fuzz_finds_nothing(url, tmp_path, examples=40)
    assert "Tested: 5" in report  # every operation, each with generated cases


@pytest.mark.parametrize(("sleep_ms", "in_a_thread"), [(0, False), (5, True)])
def test_a_quick_in_process_function_runs_on_the_loop_and_a_slow_one_in_threads(
    train_task, sleep_ms: int, in_a_thread: bool
) -> None:
    import iris_functions
    from fastapi.testclient import TestClient
    from metaflow import JsonFunction

    from metaflow_stack.serving.app import ServeOptions, create_app

    reference = JsonFunction(iris_functions.which_thread, task=train_task).reference
    with TestClient(create_app(reference, ServeOptions(backend="inprocess")), base_url=LOOPBACK) as client:
        # The first calls measure the function in threads (asyncio's are named asyncio_N); then it settles.
        threads = [client.post("/invoke", json={"sleep_ms": sleep_ms}).json()["thread"] for _ in range(40)]
    assert threads[0].startswith("asyncio_")
    assert all(name.startswith("asyncio_") == in_a_thread for name in threads[-10:]), threads


def test_what_the_server_loaded_is_kept_out_of_the_collectors_way(client) -> None:
    import gc

    # The model and its libraries, frozen once loaded: a full collection no longer walks them mid-request.
    assert gc.get_freeze_count() > 10_000
    assert client.get("/ready").status_code == 200
