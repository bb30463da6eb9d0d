"""A task that ran in its own @pypi environment gives the function that environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FUNCTIONS_APP, need

from metaflow_stack.functions import environment

PYPI_FLOW = """
from metaflow import FlowSpec, pypi, step


class PinnedFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.pinned)

    @pypi(python="3.11", packages={"packaging": "23.2"})
    @step
    def pinned(self):
        import packaging

        self.seen = packaging.__version__
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PinnedFlow()
"""


@pytest.mark.parametrize(
    ("url", "pin"),
    [
        ("https://files.example/packages/ab/packaging-23.2-py3-none-any.whl", ("packaging", "23.2")),
        ("https://files.example/scikit_learn-1.5.0-cp311-cp311-manylinux_2_17_x86_64.whl", ("scikit-learn", "1.5.0")),
        ("https://files.example/source/Foo_Bar-0.1.tar.gz", ("foo-bar", "0.1")),
        ("https://conda.example/conda-forge/linux-64/python-3.11.9-hb806964_0_cpython.conda", ("python", "3.11.9")),
        ("https://conda.example/conda-forge/linux-64/libzlib-1.3.1-h4ab18f5_1.tar.bz2", ("libzlib", "1.3.1")),
        ("git+https://example/repo@abc123", None),
    ],
)
def test_pins_come_from_the_package_urls_metaflow_records(url: str, pin) -> None:
    assert environment._pin_from_url(url) == pin


def test_a_task_without_its_own_environment_uses_the_binding_environment(train_task) -> None:
    from iris_functions import echo
    from metaflow import JsonFunction

    assert environment.from_task(train_task) is None
    assert JsonFunction(echo, task=train_task).bound.environment.source == "binding-environment"


def test_worker_requirements_are_pinned_with_their_dependencies() -> None:
    pins = environment.closure(environment.WORKER_REQUIREMENTS)
    assert {"metaflow", "pydantic", "orjson", "requests", "boto3"} <= set(pins)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # (its run may take 1200 s: an environment solved with micromamba)
def test_function_runs_in_the_tasks_pypi_environment(tmp_path: Path) -> None:
    need("micromamba", shutil.which("micromamba") is not None, "Metaflow's @pypi builds environments with micromamba")
    from metaflow import JsonFunction, Run, function_from_json, get_metadata, metadata

    (tmp_path / "pinned_flow.py").write_text(PYPI_FLOW)
    env = {**os.environ, "METAFLOW_FEAT_ALWAYS_UPLOAD_CODE_PACKAGE": "true"}
    subprocess.run(
        [
            sys.executable,
            "pinned_flow.py",
            "--environment",
            "pypi",
            "--datastore-root",
            str(tmp_path / ".metaflow"),
            "run",
            "--run-id-file",
            "id",
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=1200,
    )
    previous = get_metadata()
    metadata(f"local@{tmp_path}")
    try:
        task = Run(f"PinnedFlow/{(tmp_path / 'id').read_text().strip()}")["pinned"].task
        assert task.data.seen == "23.2"
        sys.path.insert(0, str(FUNCTIONS_APP))
        from iris_functions import where

        bound = JsonFunction(where, task=task).bound
        assert bound.environment.source == "task-environment"
        assert "packaging==23.2" in bound.environment.packages
        with function_from_json(bound, backend="local") as fn:
            assert fn({"package": "packaging"})["version"] == "23.2"
    finally:
        metadata(previous)
