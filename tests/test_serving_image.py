"""The serving image: built from a reference, reproducible, and answering over HTTP from Docker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import TEST_LABEL, bind_in, free_port, last_line, run_cli, wait_ready

from metaflow_stack.engines import JobSpec, get_engine

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FLOWER = {"sepal_length": 6.9, "sepal_width": 3.1, "petal_length": 5.4, "petal_width": 2.1}


@pytest.fixture(scope="module")
def reference_file(binding_env: Path, iris_run: Path, train_task, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("served") / "predict_typed.json"
    path.write_text(bind_in(binding_env, iris_run, "predict_typed", train_task.pathspec))
    return path


@pytest.fixture(scope="module")
def image(docker_engine, reference_file: Path) -> str:
    result = run_cli("function", "build-image", str(reference_file))
    assert result.returncode == 0, result.stderr[-3000:]
    return last_line(result)


def test_the_same_reference_gives_the_same_tag(image: str, reference_file: Path) -> None:
    again = run_cli("function", "build-image", str(reference_file))
    assert last_line(again) == image
    assert "is up to date" in again.stderr


def test_the_image_holds_the_function_environment_in_its_own_layer(docker_engine, image: str) -> None:
    config = docker_engine.image.inspect(image)
    assert config.config.user == "1000:1000"
    history = subprocess.run(
        ["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    lock_step = next(i for i, step in enumerate(history) if "requirements.lock" in step and "uv pip install" in step)
    bundle_step = next(i for i, step in enumerate(history) if "/opt/function/bundle/" in step and "COPY" in step)
    assert bundle_step < lock_step  # history is newest first: the bundle sits above the environment


def test_the_container_serves_the_function(image: str) -> None:
    port = free_port()
    job = get_engine("docker").launch(JobSpec(image=image, command=[], ports={8000: port}, labels={TEST_LABEL: "true"}))
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_ready(url):
            pytest.fail("the container never became ready:\n" + "\n".join(job.logs()))
        assert httpx.post(f"{url}/invoke", json=FLOWER).json() == {"prediction": 2}
        invalid = httpx.post(f"{url}/invoke", json={"sepal_length": 1})
        assert invalid.status_code == 422 and invalid.json()["details"]["field"] == "input.sepal_width"
        paths = httpx.get(f"{url}/openapi.json").json()["paths"]
        assert {"/invoke", "/invoke/batch", "/health", "/ready", "/metrics"} <= set(paths)
    finally:
        job.kill()
