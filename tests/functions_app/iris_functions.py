"""Functions bound to IrisTrainFlow's train task in the tests (written as a user would)."""

from metaflow import FunctionParameters, json_function
from typing_extensions import TypedDict  # pydantic needs this one on Python 3.11


@json_function
def predict(data: dict, params: FunctionParameters) -> dict:
    """Run inference using the bound model."""
    features = [data[f] for f in params.feature_names]
    prediction = params.model.predict([features])[0]
    return {"prediction": int(prediction)}


class Flower(TypedDict):
    sepal_length: float
    sepal_width: float
    petal_length: float
    petal_width: float


@json_function
def predict_typed(data: Flower, params: FunctionParameters) -> dict:
    """Same model, with a typed input the schema checks before the call."""
    features = [data["sepal_length"], data["sepal_width"], data["petal_length"], data["petal_width"]]
    return {"prediction": int(params.model.predict([features])[0])}


@json_function
def echo(data: dict, params: FunctionParameters) -> dict:
    return data


@json_function
def fail(data: dict, params: FunctionParameters) -> dict:
    raise ValueError(f"refusing {data.get('why', 'this input')}")


@json_function
def crash(data: dict, params: FunctionParameters) -> dict:
    import os

    os._exit(9)


@json_function
def missing_artifact(data: dict, params: FunctionParameters) -> dict:
    return {"value": params.no_such_artifact}


@json_function
def where(data: dict, params: FunctionParameters) -> dict:
    """Report the interpreter and a pinned package's version: proves where it ran."""
    import importlib.metadata
    import os
    import sys

    package = data.get("package", "packaging")
    return {"python": sys.executable, "pid": os.getpid(), "version": importlib.metadata.version(package)}


@json_function
def slow_echo(data: dict, params: FunctionParameters) -> dict:
    """Echo after a pause (so concurrent requests queue up); raise when asked to."""
    import time

    time.sleep(0.02)
    if data.get("fail"):
        raise ValueError("asked to fail")
    return data


@json_function
def which_thread(data: dict, params: FunctionParameters) -> dict:
    """The name of the thread the call ran in, after ``sleep_ms`` of work: shows where a server calls it."""
    import threading
    import time

    time.sleep(data.get("sleep_ms", 0) / 1000)
    return {"thread": threading.current_thread().name}


@json_function
def unanswerable(data: dict, params: FunctionParameters) -> dict:
    """An answer no codec can encode (a set): a bug in a function, which its server must still answer as JSON."""
    return {"values": {1, 2}}


@json_function
def misbehave(data: dict, params: FunctionParameters) -> dict:
    """Its process id, after starting a child that outlives it (``child_pid_file`` says its pid), exiting at
    once (``exit``) or taking ``sleep_ms``: the ways a function holds or loses its worker."""
    import os
    import subprocess
    import time

    if data.get("child_pid_file"):
        child = subprocess.Popen(["sleep", "600"])
        with open(data["child_pid_file"], "w") as out:
            out.write(str(child.pid))
    if data.get("exit"):
        os._exit(3)
    time.sleep(data.get("sleep_ms", 0) / 1000)
    return {"pid": os.getpid()}
