"""A function runs in the environment it was bound in, not the caller's.

The binding happens in a second virtualenv that pins ``packaging==23.2``
(the caller has another version); the local backend recreates that
environment with uv and the function reports the version it sees there.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FUNCTIONS_APP, PROJECT

PINNED = "23.2"

BIND_SCRIPT = """
import sys
from metaflow import JsonFunction, Task, metadata, namespace
sys.path.insert(0, sys.argv[2])
import iris_functions
metadata("local@" + sys.argv[1])
namespace(None)
print(JsonFunction(iris_functions.where, task=Task(sys.argv[3])).reference)
"""


@pytest.fixture(scope="module")
def binding_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second virtualenv: the runtime, scikit-learn, and an older ``packaging``."""
    from uv import find_uv_bin

    assert importlib.metadata.version("packaging") != PINNED, "the caller must differ from the pin"
    env = tmp_path_factory.mktemp("binding-env") / "venv"
    uv = find_uv_bin()
    subprocess.run([uv, "venv", "--quiet", "--python", "3.11", str(env)], check=True)
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(env / "bin" / "python"),
            "-c",
            str(PROJECT / "runtime" / "requirements.lock"),
            "-e",
            str(PROJECT / "runtime"),
            "scikit-learn",
            f"packaging=={PINNED}",
        ],
        check=True,
        timeout=600,
    )
    return env / "bin" / "python"


@pytest.mark.slow
def test_function_runs_in_its_captured_environment(binding_env: Path, iris_run: Path, train_task) -> None:
    from metaflow import function_from_json

    from metaflow_stack import settings

    bound = subprocess.run(
        [str(binding_env), "-c", BIND_SCRIPT, str(iris_run), str(FUNCTIONS_APP), train_task.pathspec],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    reference = bound.stdout
    assert f'"packaging=={PINNED}"' in reference

    with function_from_json(reference, backend="local") as fn:
        seen = fn({"package": "packaging"})
    assert seen["version"] == PINNED
    assert Path(seen["python"]).is_relative_to(settings.load().state_dir / "envs")
    assert seen["python"] != sys.executable

    with function_from_json(reference, backend="local") as again:  # the environment is cached now
        assert again({"package": "packaging"})["version"] == PINNED
