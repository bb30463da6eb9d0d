"""`metaflow stack up` runs the hello flow, in the base image or on the embedded defaults."""

from __future__ import annotations

import pytest
from conftest import DEAD_ENGINE_ENV, last_line, run_cli


def test_up_without_docker_runs_the_demo_locally(state_dir) -> None:
    result = run_cli("stack", "up", env=DEAD_ENGINE_ENV)
    assert result.returncode == 0, result.stderr
    assert "no Docker engine answers" in result.stderr
    line = last_line(result)
    assert line.startswith("ok HelloFlow/")
    assert "a local process" in line


@pytest.mark.docker
@pytest.mark.slow
def test_up_runs_the_demo_in_the_base_image(base_image: str, state_dir) -> None:
    result = run_cli("stack", "up")
    assert result.returncode == 0, result.stderr
    line = " ".join(result.stdout.split())
    assert f"ran in image {base_image}" in line
    assert "hello from" in line
