"""Bad input, missing artifacts, raising and crashing functions: clear, typed errors on every backend."""

from __future__ import annotations

import json

import pytest
from conftest import gone

from metaflow_stack.functions.errors import (
    CallTimeoutError,
    FunctionError,
    InvalidInputError,
    RemoteFunctionError,
    UnsupportedReferenceError,
    WorkerCrashedError,
)

BACKENDS = ["inprocess", "local"]
FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


def _load(train_task, name: str, backend: str):
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    return function_from_json(JsonFunction(getattr(iris_functions, name), task=train_task).reference, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_field_names_the_field(train_task, backend: str) -> None:
    with _load(train_task, "predict_typed", backend) as fn:
        incomplete = {k: v for k, v in FLOWER.items() if k != "petal_width"}
        with pytest.raises(InvalidInputError) as error:
            fn(incomplete)
        assert error.value.field == "input.petal_width"
        assert "petal_width" in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_type_names_the_field(train_task, backend: str) -> None:
    with _load(train_task, "predict_typed", backend) as fn:
        with pytest.raises(InvalidInputError) as error:
            fn({**FLOWER, "sepal_length": "long"})
        assert error.value.field == "input.sepal_length"
        with pytest.raises(InvalidInputError) as error:
            fn.batch([FLOWER, [1, 2, 3]])
        assert error.value.field == "input[1]"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_list_sent_to_a_dict_function_is_refused_before_the_call(train_task, backend: str) -> None:
    with _load(train_task, "predict", backend) as fn, pytest.raises(InvalidInputError, match="must be object"):
        fn([5.1, 3.5, 1.4, 0.2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_artifact_names_the_task_and_artifact(train_task, backend: str) -> None:
    with _load(train_task, "missing_artifact", backend) as fn, pytest.raises(RemoteFunctionError) as error:
        fn({})
    assert error.value.exc_type == "ArtifactNotFoundError"
    assert train_task.pathspec in error.value.remote_message
    assert "'no_such_artifact'" in error.value.remote_message
    assert "model" in error.value.remote_message  # what the task does have


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_exception_comes_back_with_its_remote_traceback(train_task, backend: str) -> None:
    with _load(train_task, "fail", backend) as fn:
        with pytest.raises(RemoteFunctionError) as error:
            fn({"why": "bad flowers"})
        assert error.value.exc_type == "ValueError"
        assert error.value.remote_message == "refusing bad flowers"
        assert "iris_functions.py" in error.value.remote_traceback
        assert 'raise ValueError(f"refusing' in error.value.remote_traceback
        with pytest.raises(RemoteFunctionError):  # the worker survives its function's exceptions
            fn({})


def test_crashed_worker_gives_a_clear_error_and_the_next_call_restarts_it(train_task) -> None:
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    with function_from_json(JsonFunction(iris_functions.crash, task=train_task).reference, backend="local") as fn:
        first_pid = fn.backend.worker_pids[0]
        with pytest.raises(WorkerCrashedError, match="exited with code 9"):
            fn({})
        with pytest.raises(WorkerCrashedError):  # crashes again, in a new worker
            fn({})
    with function_from_json(JsonFunction(iris_functions.where, task=train_task).reference, backend="local") as where:
        pid = where({})["pid"]
        where.backend._workers[0]._process.kill()  # a worker killed from outside
        where.backend._workers[0]._process.wait()
        assert where({})["pid"] not in (pid, first_pid)  # restarted, not an error


def test_a_call_past_its_timeout_stops_its_worker_and_what_it_started(train_task, tmp_path) -> None:
    """A hung call must not hold a worker for good: past ``call_timeout`` the worker is killed with the
    process it started (the call's sleep is a minute, the child's ten) and the next call runs in a new one.
    A batch of n inputs has n times the bound."""
    import time

    import iris_functions
    from metaflow import JsonFunction, function_from_json

    reference = JsonFunction(iris_functions.misbehave, task=train_task).reference
    child = tmp_path / "child.pid"
    with function_from_json(reference, backend="local", call_timeout=1.5) as fn:
        hung = fn({})["pid"]
        started = time.monotonic()
        with pytest.raises(CallTimeoutError, match=r"^the function did not answer within 1.5s; its worker process"):
            fn({"sleep_ms": 60_000, "child_pid_file": str(child)})
        assert time.monotonic() - started < 10
        assert gone(hung) and gone(int(child.read_text()))
        answers = fn.batch([{"sleep_ms": 800}] * 3)  # 2.4 s in all: within 3 x 1.5, not within 1.5
        assert len({a["pid"] for a in answers} - {hung}) == 1
        assert fn.batch([]) == []  # (an empty batch has one input's time, not none)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), 7 * 24 * 3600 + 1])
def test_a_call_timeout_out_of_range_is_refused(train_task, timeout: float) -> None:
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    reference = JsonFunction(iris_functions.echo, task=train_task).reference
    with pytest.raises(FunctionError, match=r"^call_timeout is .*; it is seconds above 0 and at most 604,800"):
        function_from_json(reference, backend="local", call_timeout=timeout)


def test_a_batchs_bound_stops_at_the_longest_the_kernel_waits() -> None:
    from metaflow_stack.functions import MAX_CALL_TIMEOUT
    from metaflow_stack.functions.backends import call_bound

    assert call_bound(2.5, 4) == 10 and call_bound(2.5, 0) == 2.5 and call_bound(None, 9) is None
    assert call_bound(MAX_CALL_TIMEOUT, 32) == MAX_CALL_TIMEOUT  # (poll refused 32 weeks: the call ran on)


def test_the_inprocess_backend_takes_no_call_timeout(train_task) -> None:
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    reference = JsonFunction(iris_functions.echo, task=train_task).reference
    with pytest.raises(FunctionError, match="no call can be stopped") as refused:
        function_from_json(reference, backend="inprocess", call_timeout=5)
    assert refused.value.fix == "use the local backend for a call_timeout"


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_unknown_reference_version_is_refused_with_the_supported_ones(train_task, version) -> None:
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    document = json.loads(JsonFunction(iris_functions.echo, task=train_task).reference)
    document["version"] = version
    with pytest.raises(UnsupportedReferenceError, match="supported versions: 1"):
        function_from_json(json.dumps(document), backend="inprocess")


def test_something_that_is_not_a_reference_is_refused() -> None:
    from metaflow import function_from_json

    with pytest.raises(UnsupportedReferenceError, match="not a Metaflow Stack function reference"):
        function_from_json('{"hello": "world"}')


def test_unknown_backend_and_codec_list_the_known_ones(train_task) -> None:
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    from metaflow_stack.functions.errors import FunctionError

    reference = JsonFunction(iris_functions.echo, task=train_task).reference
    with pytest.raises(FunctionError, match="backends: inprocess, local, ray"):
        function_from_json(reference, backend="lambda")
    with pytest.raises(FunctionError, match="codecs: arrow, avro, json, msgpack"):
        function_from_json(reference, backend="inprocess", codec="xml")


def test_a_bundle_on_s3_without_aws_credentials_is_one_line_at_once(tmp_path) -> None:
    """Metaflow's S3 client retried the missing credentials for minutes, saying nothing (found trying
    ``metaflow function serve s3://...`` on a machine with no AWS set up): now one line, at once."""
    import os
    import subprocess
    import time

    from conftest import VENV_BIN

    nowhere = str(tmp_path / "none")
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "METAFLOW_S3"))}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere, "AWS_EC2_METADATA_DISABLED": "true"}
    started = time.monotonic()
    done = subprocess.run(
        [str(VENV_BIN / "metaflow"), "function", "serve", "s3://bucket/bundle"],
        capture_output=True,
        text=True,
        env=env | {"HOME": str(tmp_path)},
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 1 and time.monotonic() - started < 60, done.stderr[-2000:]
    assert "no AWS credentials to read s3://bucket/bundle" in done.stderr and "Traceback" not in done.stderr
