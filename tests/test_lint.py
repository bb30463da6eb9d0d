"""Workflows and Dockerfiles pass their linters (actionlint, hadolint) as part of the suite."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import PROJECT, VENV_BIN, need

#: The catalog's, a Gramine step's (``gramine/``) and the Gramine double's.
DOCKERFILES = sorted([*PROJECT.glob("images/*/Dockerfile"), PROJECT / "gramine" / "Dockerfile",
                      PROJECT / "tests" / "gramine_double" / "Dockerfile"])  # fmt: skip
WORKFLOWS = sorted(PROJECT.glob(".github/workflows/*.yml"))


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    need(name, path is not None, f"install the dev extra: pip install 'metaflow-stack[dev]' ({name} not on PATH)")
    return str(path)


def test_there_is_something_to_lint() -> None:
    assert DOCKERFILES and WORKFLOWS


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_actionlint(workflow) -> None:
    result = subprocess.run([_tool("actionlint"), "-no-color", str(workflow)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.parent.relative_to(PROJECT)))
def test_dockerfile_passes_hadolint(dockerfile) -> None:
    result = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
