"""Published images round-trip through a real Distribution registry on 127.0.0.1."""

from __future__ import annotations

import pytest
from conftest import json_stdout, run_cli

from metaflow_stack import images, registry

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_push_delete_pull_run_round_trip(docker_engine, base_image: str, local_registry: str) -> None:
    repository, tag = base_image.rsplit(":", 1)

    pushed = images.push_image("base")
    assert pushed == f"{local_registry}/{base_image}"
    assert tag in registry.tags(local_registry, repository)

    # The tag alone (force: a stopped container of another test may still name the image; its layers stay
    # either way, under the pushed tag).
    docker_engine.image.remove(base_image, force=True)
    assert not docker_engine.image.exists(base_image)

    assert images.resolve("base") == base_image  # pulled, not rebuilt
    assert docker_engine.image.exists(base_image)
    output = docker_engine.run(base_image, ["python", "-c", "import metaflow_stack; print('ok')"], remove=True)
    assert output.strip() == "ok"


def test_registry_answers_on_loopback_only(local_registry: str) -> None:
    host, _ = local_registry.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert registry.ping(local_registry)


def test_doctor_reports_the_configured_registry(local_registry: str) -> None:
    result = run_cli("stack", "doctor", "--json")
    checks = {c["name"]: c for c in json_stdout(result)}
    assert checks["Image registry"]["ok"] is True
    assert local_registry in checks["Image registry"]["detail"]


def test_pulling_an_unpublished_image_names_the_fix(local_registry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAFLOW_STACK_IMAGE_NAMESPACE", "never-published")
    result = run_cli("stack", "images", "pull", "base")
    assert result.returncode == 1
    assert "is not published" in result.stderr
    assert "fix: build it with `metaflow stack images build base --push`" in result.stderr
