"""A bound function served over HTTP: schemas in OpenAPI, 4xx JSON for bad input, metrics."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
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


def test_msgpack_avro_and_accept_lists_are_negotiated(client, train_task) -> None:
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
    import iris_functions
    from metaflow import JsonFunction

    from metaflow_stack.functions import codecs
    from metaflow_stack.functions.bundle import resolve_reference

    ref, _ = resolve_reference(JsonFunction(iris_functions.predict_typed, task=train_task).reference)
    avro_in, avro_out = codecs.create("avro", ref.input_schema), codecs.create("avro", ref.output_schema)
    answer = client.post("/invoke", content=avro_in.encode(FLOWER), headers={"content-type": "application/avro"})
    assert answer.headers["content-type"] == "application/avro", answer.text
    assert avro_out.decode(answer.content) == {"prediction": 2}
    # Accept as browsers and HTTP libraries send it: a list, with */* last.
    listed = client.post("/invoke", json=FLOWER, headers={"accept": "text/html, application/json;q=0.9, */*;q=0.8"})
    assert listed.json() == {"prediction": 2}
    refused = _is_error(
        client.post("/invoke", json=FLOWER, headers={"accept": "text/html"}), 415, "unsupported_media_type"
    )
    assert refused["details"]["field"] == "accept"


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


@pytest.fixture(scope="module")
def open_client(train_task):
    """A function whose input is any JSON object (an open type), on the default backend (worker processes)."""
    import iris_functions
    from fastapi.testclient import TestClient
    from metaflow import JsonFunction

    from metaflow_stack.serving.app import create_app

    with TestClient(create_app(JsonFunction(iris_functions.echo, task=train_task).reference), base_url=LOOPBACK) as c:
        yield c


def test_an_open_input_takes_json_values_only_and_no_avro(open_client) -> None:
    """Avro of an open type nests without end, and fastavro's compiled reader recursed into a crash of the
    whole server at 5,000 levels (15 KB): refused, naming the header. msgpack carries bytes and keys that are
    not strings, which no JSON Schema input holds (and which failed every request batched with them): 422."""
    deep = b"\x02" + b"\x0a\x02" * 5000 + b"\x00" * 5001
    refused = _is_error(
        open_client.post("/invoke", content=deep, headers={"content-type": "application/avro"}),
        415,
        "unsupported_media_type",
    )
    assert refused["details"]["field"] == "content-type" and "application/msgpack" in refused["message"]
    assert open_client.get("/health").json() == {"status": "ok"}
    for value in ({"a": b"x"}, {1: "x"}, {"a": [{"b": b""}]}):
        sent = open_client.post(
            "/invoke", content=msgpack.packb(value, use_bin_type=True), headers={"content-type": "application/msgpack"}
        )
        assert _is_error(sent, 422, "invalid_input")["details"]["field"] == "input"
    fine = open_client.post(
        "/invoke", content=msgpack.packb({"a": [1, "x"]}), headers={"content-type": "application/msgpack"}
    )
    assert msgpack.unpackb(fine.content) == {"a": [1, "x"]}


def _fed(app, content_type: bytes) -> tuple[int, dict, int, str]:
    """POST /invoke to ``app`` as its server runs it, fed a chunked body of 64 MiB one MiB per ``receive`` (an
    HTTP client would send it all before reading the answer): the status, the JSON answer, how many MiB the
    app read, and its /metrics after."""
    import asyncio

    headers = [(b"host", b"127.0.0.1"), (b"content-type", content_type), (b"transfer-encoding", b"chunked")]
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/invoke"}
    scope |= {"raw_path": b"/invoke", "query_string": b"", "root_path": "", "headers": headers}
    scope |= {"server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000)}
    received, sent, metrics = 0, [], []

    async def receive() -> dict:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b" " * (1 << 20), "more_body": received < 64}

    async def no_body() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def post() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, lambda message: asyncio.sleep(0, sent.append(message)))
            read = {**scope, "method": "GET", "path": "/metrics", "raw_path": b"/metrics", "headers": headers[:1]}
            await app(read, no_body, lambda message: asyncio.sleep(0, metrics.append(message)))

    asyncio.run(post())
    answer = json.loads(b"".join(message.get("body", b"") for message in sent[1:]))
    return sent[0]["status"], answer, received, b"".join(m.get("body", b"") for m in metrics[1:]).decode()


def test_a_streamed_body_over_the_limit_is_refused_before_it_is_read_whole(train_task) -> None:
    """A chunked body declares no length: the server stops reading it at the limit (1 MiB here), so a
    client cannot make it hold more, and answers 413 as JSON."""
    import iris_functions
    from metaflow import JsonFunction

    from metaflow_stack.serving.app import ServeOptions, create_app

    app = create_app(JsonFunction(iris_functions.echo, task=train_task).reference, ServeOptions(max_body_bytes=1 << 20))
    status, answer, received, counted = _fed(app, b"application/json")
    assert status == 413 and received <= 2, (status, received)
    assert answer["code"] == "payload_too_large" and answer["details"] == {"parameter": "body"}
    assert 'function_requests_total{route="/invoke",status="413"} 1.0' in counted, counted  # (not as a 500)


def test_an_avro_body_a_function_cannot_take_is_refused_before_it_is_read(train_task) -> None:
    import iris_functions
    from metaflow import JsonFunction

    from metaflow_stack.serving.app import create_app

    status, answer, received, _ = _fed(
        create_app(JsonFunction(iris_functions.echo, task=train_task).reference), b"application/avro"
    )
    assert status == 415 and answer["details"]["field"] == "content-type" and received == 0, (status, received)


def test_past_twice_max_concurrency_a_request_is_answered_503_before_its_body_is_read(train_task) -> None:
    """``max_concurrency`` calls run, as many again wait; one more is turned away at once (as JSON), so the
    bodies a server holds stay bounded however many clients pile on."""
    import concurrent.futures

    import iris_functions
    from fastapi.testclient import TestClient
    from metaflow import JsonFunction

    from metaflow_stack.serving.app import ServeOptions, create_app

    reference = JsonFunction(iris_functions.which_thread, task=train_task).reference
    options = ServeOptions(backend="inprocess", max_concurrency=1, max_batch_size=1)
    with TestClient(create_app(reference, options), base_url=LOOPBACK) as client:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(client.post, "/invoke", json={"sleep_ms": 3000}) for _ in range(2)]
            time.sleep(1.0)  # (both in: one in the slot, one waiting for it)
            busy = client.post("/invoke", json={"sleep_ms": 0})
            answers = [future.result() for future in slow]
        assert [answer.status_code for answer in answers] == [200, 200]
        assert "busy" in _is_error(busy, 503, "service_unavailable")["message"]
        assert client.post("/invoke", json={"sleep_ms": 0}).status_code == 200  # and free again after


def test_a_bug_is_a_json_500_with_no_traceback(train_task) -> None:
    """What no handler expects (here: an answer no codec can encode) is still answered as JSON."""
    import iris_functions
    from fastapi.testclient import TestClient
    from metaflow import JsonFunction

    from metaflow_stack.serving.app import ServeOptions, create_app

    app = create_app(JsonFunction(iris_functions.unanswerable, task=train_task).reference, ServeOptions("inprocess"))
    with TestClient(app, base_url=LOOPBACK, raise_server_exceptions=False) as client:
        answer = client.post("/invoke", json={})
    body = _is_error(answer, 500, "internal_error")
    assert body["message"] == "the function server failed; see its log" and "Traceback" not in answer.text


def test_a_call_past_the_call_timeout_is_a_504_and_the_server_answers_the_next(train_task) -> None:
    """A hung function must not hold a slot for good: past ``call_timeout`` its worker is stopped, the
    request is answered 504, and the next request runs in a new worker."""
    import iris_functions
    from fastapi.testclient import TestClient
    from metaflow import JsonFunction

    from metaflow_stack.serving.app import ServeOptions, create_app

    reference = JsonFunction(iris_functions.misbehave, task=train_task).reference
    with TestClient(create_app(reference, ServeOptions(call_timeout=1.5)), base_url=LOOPBACK) as client:
        first = client.post("/invoke", json={}).json()["pid"]
        body = _is_error(client.post("/invoke", json={"sleep_ms": 60_000}), 504, "call_timeout")
        assert body["message"] == "the function did not answer within 1.5s; its worker process was stopped"
        assert client.post("/invoke/batch", json=[{}, {}]).json()[0]["pid"] != first
        assert 'function_requests_total{route="/invoke",status="504"} 1.0' in client.get("/metrics").text
        assert "504" in client.get("/openapi.json").json()["paths"]["/invoke"]["post"]["responses"]


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
def _served(reference: str, tmp_path: Path, *options: str) -> Iterator[tuple[str, Path]]:
    """``metaflow function serve`` with ``options`` on a free 127.0.0.1 port; yields its URL and log file."""
    reference_file = tmp_path / "predict.json"
    reference_file.write_text(reference)
    port = free_port()
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [str(VENV_BIN / "metaflow"), "function", "serve", str(reference_file), "--port", str(port), *options],
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

    # (no call bound: the others serve with the default one)
    served = _served(JsonFunction(iris_functions.predict, task=train_task).reference, tmp_path, "--call-timeout", "0")
    with served as (url, log):
        assert httpx.post(f"{url}/invoke", json=FLOWER, timeout=FIRST_CALL_S).json() == {"prediction": 2}
        assert f"function server on {url}/" in log.read_text()  # (uvicorn says no address for a socket given)
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
