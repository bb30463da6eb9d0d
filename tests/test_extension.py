"""The distribution plugs into Metaflow through its own extension mechanism."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import run_cli


def _python(code: str, **env: str) -> str:
    import os

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return result.stdout.strip()


def test_metaflow_version_string_names_the_extension() -> None:
    """The version Metaflow reports (banner, run tags) carries ``+stack(<version>)``."""
    version = _python("import metaflow.metaflow_version as v; print(v.get_version())")
    assert "+stack(" in version


def test_metaflow_stack_help_lists_its_commands() -> None:
    result = run_cli("stack", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("doctor", "images", "registry", "up", "down"):
        assert command in result.stdout


def test_stack_settings_appear_in_metaflow_config() -> None:
    value = _python(
        "from metaflow import metaflow_config; print(metaflow_config.STACK_REGISTRY)",
        METAFLOW_STACK_REGISTRY="127.0.0.1:5999",
    )
    assert value == "127.0.0.1:5999"


def test_runtime_travels_in_the_flow_code_package(tmp_path: Path) -> None:
    """Task-side hooks can import the runtime in any image: it is in the code package."""
    from metaflow_stack.demo import FLOW_FILE

    flow = tmp_path / FLOW_FILE.name
    flow.write_text(FLOW_FILE.read_text())
    result = subprocess.run(
        [sys.executable, str(flow), "package", "list"], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    packaged = result.stdout + result.stderr  # Metaflow echoes to stderr
    assert "metaflow_stack/settings.py" in packaged
    assert "metaflow_extensions/stack/toplevel/stack_toplevel.py" in packaged
