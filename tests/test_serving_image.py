"""The serving image: built from a reference, reproducible, and answering over HTTP from Docker."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest
from conftest import FIRST_CALL_S, TEST_LABELS, bind_in, free_port, last_line, registry_manifest, run_cli, wait_ready

from metaflow_stack.engines import JobSpec, Mount, get_engine
from metaflow_stack.local_secrets import stack_key_path
from metaflow_stack.serving.deploy import function_key_path

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


def test_the_lock_names_every_file_by_url_and_hash_for_the_engines_architecture(reference_file: Path) -> None:
    from metaflow_stack.functions.bundle import resolve_reference
    from metaflow_stack.functions.errors import EnvironmentBuildError
    from metaflow_stack.serving.image import requirements

    ref, _ = resolve_reference(str(reference_file))
    lock = tomllib.loads(requirements(ref, "fastapi", "aarch64"))
    packages = {package["name"]: package for package in lock["packages"]}
    assert {"fastapi", "uvicorn", "prometheus-client", "scikit-learn"} <= set(packages)
    assert packages["packaging"]["version"] == "23.2"  # the function's own pin, kept
    for package in lock["packages"]:  # the build downloads these files, checks them, and asks no index
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        assert files and all(f["url"].startswith("https://") and len(f["hashes"]["sha256"]) == 64 for f in files)
    compiled = [wheel["url"].rsplit("/", 1)[-1] for wheel in packages["scikit-learn"]["wheels"]]
    assert compiled and all("aarch64" in name and "cp311" in name for name in compiled)
    with pytest.raises(EnvironmentBuildError, match="'s390x'") as refused:
        requirements(ref, "fastapi", "s390x")
    assert "aarch64" in refused.value.fix


def test_the_image_holds_the_function_environment_in_its_own_layer(docker_engine, image: str) -> None:
    config = docker_engine.image.inspect(image)
    assert config.config.user == "1000:1000"
    history = subprocess.run(
        ["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    lock_step = next(i for i, step in enumerate(history) if "pylock.toml" in step and "uv pip install" in step)
    bundle_step = next(i for i, step in enumerate(history) if "/opt/function/bundle/" in step and "COPY" in step)
    assert bundle_step < lock_step  # history is newest first: the bundle sits above the environment


def test_the_container_serves_the_function_to_key_holders(image: str) -> None:
    engine, port = get_engine("docker"), free_port()
    # The image listens beyond its loopback: without a key (or an explicit --insecure-no-auth) it will not start.
    keyless = engine.launch(JobSpec(image=image, command=[], labels=TEST_LABELS))
    assert keyless.wait(timeout=120) == 1
    assert "METAFLOW_STACK_AUTH_KEY" in "\n".join(keyless.logs())
    keyless.kill()
    spec = JobSpec(image, [], env={"METAFLOW_STACK_AUTH_KEY": "t3st"}, ports={8000: port}, labels=TEST_LABELS)
    job = engine.launch(spec)
    try:
        url, keyed = f"http://127.0.0.1:{port}", {"x-api-key": "t3st"}
        if not wait_ready(url):  # /ready is open, for orchestrators' probes
            pytest.fail("the container never became ready:\n" + "\n".join(job.logs()))
        assert httpx.post(f"{url}/invoke", json=FLOWER).status_code == 401
        assert httpx.post(f"{url}/invoke", json=FLOWER, headers=keyed, timeout=FIRST_CALL_S).json() == {"prediction": 2}
        invalid = httpx.post(f"{url}/invoke", json={"sepal_length": 1}, headers=keyed)
        assert invalid.status_code == 422 and invalid.json()["details"]["field"] == "input.sepal_width"
        paths = httpx.get(f"{url}/openapi.json", headers=keyed).json()["paths"]
        assert {"/invoke", "/invoke/batch", "/health", "/ready", "/metrics"} <= set(paths)
    finally:
        job.kill()


def test_push_publishes_the_image_under_the_same_name(local_registry: str, image: str, reference_file: Path) -> None:
    """Under the same name and tag, and named by the digest the push stored: what a cluster given it runs,
    which a later push to the tag does not change."""
    result = run_cli("function", "build-image", str(reference_file), "--push")
    assert result.returncode == 0, result.stderr[-3000:]
    name, tag = image.rsplit(":", 1)
    pushed, _, digest = last_line(result).partition("@")
    assert pushed == f"{local_registry}/{name}"
    assert registry_manifest(local_registry, name, tag).headers["Docker-Content-Digest"] == digest  # (what it pushed)


def test_the_ray_image_runs_a_batch_in_the_functions_environment(
    docker_engine, reference_file: Path, train_task, tmp_path: Path
) -> None:
    import iris_functions
    from metaflow import JsonFunction

    built = run_cli("function", "build-image", str(reference_file), "--kind", "ray")
    assert built.returncode == 0, built.stderr[-3000:]
    ray_image = last_line(built)
    assert "/function-ray-predict-typed:" in ray_image
    assert last_line(run_cli("function", "build-image", str(reference_file), "--kind", "ray")) == ray_image

    flowers = [{**FLOWER, "petal_length": 1.0 + i / 10} for i in range(60)]
    data = tmp_path / "data"
    data.mkdir(mode=0o777)
    data.chmod(0o777)  # the image's uid 1000 writes the results here
    (data / "flowers.jsonl").write_text("".join(json.dumps(f) + "\n" for f in flowers))
    job = get_engine("docker").launch(
        JobSpec(
            image=ray_image,
            command=["--input", "/data/flowers.jsonl", "--output", "/data/out", "--shard-size", "25"],
            mounts=[Mount(str(data), "/data", read_only=False)],
            labels=TEST_LABELS,
        )
    )
    try:
        assert job.wait(timeout=300) == 0, "\n".join(job.logs())
    finally:
        job.kill()
    from metaflow_stack.functions.backends import function_from_json
    from metaflow_stack.serving.batch import read_results

    with function_from_json(JsonFunction(iris_functions.predict_typed, task=train_task).reference, "inprocess") as fn:
        assert read_results(data / "out") == [fn(f) for f in flowers]


def test_deploy_to_docker_runs_the_server_here_and_a_redeploy_replaces_it(
    docker_engine, image: str, reference_file: Path
) -> None:
    port, name = free_port(), "function-deploy-test"
    try:
        for _ in range(2):
            result = run_cli("function", "deploy", str(reference_file), "--port", str(port), "--name", name)
            assert result.returncode == 0, result.stderr[-3000:]
            url = last_line(result)
            assert url == f"http://127.0.0.1:{port}"
            keyed = {"x-api-key": function_key_path(name).read_text()}  # its own: never the stack's
            assert httpx.post(f"{url}/invoke", json=FLOWER, timeout=FIRST_CALL_S, headers=keyed).json() == {
                "prediction": 2
            }
        (container,) = docker_engine.container.list(filters=[("name", name)])
        assert container.config.image == image
        assert container.host_config.cap_drop == ["ALL"]
        env = dict(variable.split("=", 1) for variable in container.config.env)
        assert env["METAFLOW_STACK_AUTH_KEY"] == keyed["x-api-key"]  # (the function's code reads it)
        assert not stack_key_path().exists() or stack_key_path().read_text() not in env.values()
    finally:
        docker_engine.container.remove(name, force=True)
