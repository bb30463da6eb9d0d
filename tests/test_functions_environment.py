"""A function runs in the environment it was bound in, not the caller's.

The binding happens in a second virtualenv that pins ``packaging==23.2``
(the caller has another version); the local backend recreates that
environment with uv and the function reports the version it sees there.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from conftest import BINDING_ENV_PACKAGING as PINNED
from conftest import bind_in


@pytest.mark.slow
def test_function_runs_in_its_captured_environment(binding_env: Path, iris_run: Path, train_task) -> None:
    from metaflow import function_from_json

    from metaflow_stack import settings

    assert importlib.metadata.version("packaging") != PINNED, "the caller must differ from the pin"
    reference = bind_in(binding_env, iris_run, "where", train_task.pathspec)
    assert f'"packaging=={PINNED}"' in reference

    with function_from_json(reference, backend="local") as fn:
        seen = fn({"package": "packaging"})
    assert seen["version"] == PINNED
    assert Path(seen["python"]).is_relative_to(settings.load().state_dir / "envs")
    assert seen["python"] != sys.executable

    with function_from_json(reference, backend="local") as again:  # the environment is cached now
        assert again({"package": "packaging"})["version"] == PINNED
