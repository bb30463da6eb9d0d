"""The extension in VS Code itself, through ``@vscode/test-electron``: VS Code downloaded, the Python Debugger
extension installed from the marketplace, and ``vscode/test-electron/suite.ts`` run inside it, under xvfb.
What it proves beyond code-server (``test_vscode_editor.py``): "Debug step" stops at a breakpoint in the step
body, in the real Python Debugger, spun on an earlier run's inputs. These machines reach neither VS Code's
download server nor its marketplace: it skips naming them, and the GitHub workflow's ``vscode-electron``
job runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import PROJECT, need

pytestmark = pytest.mark.slow

VSCODE = PROJECT / "vscode"
DOWNLOADS = "https://update.code.visualstudio.com/api/releases/stable"


def _reachable(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_debug_step_stops_at_a_breakpoint_in_vscode_itself(tmp_path: Path) -> None:
    need("xvfb-run", shutil.which("xvfb-run") is not None, "sudo apt-get install xvfb (VS Code needs a display)")
    need("vscode-download", _reachable(DOWNLOADS), "VS Code's download server is unreachable from here")
    workspace = tmp_path / "workspace"
    (workspace / ".vscode").mkdir(parents=True)
    (workspace / ".metaflow").mkdir()
    shutil.copy(PROJECT / "tests" / "flow_suite" / "flows" / "foreach_flow.py", workspace)
    env = {**os.environ, "USER": os.environ.get("USER") or "tester", "METAFLOW_DEFAULT_METADATA": "local"}
    ran = subprocess.run([sys.executable, "foreach_flow.py", "run"], cwd=workspace, env=env, capture_output=True)
    assert ran.returncode == 0, ran.stderr[-2000:]  # the earlier run "Debug step" spins on
    settings = {"metaflowStack.python": sys.executable, "python.defaultInterpreterPath": sys.executable}
    (workspace / ".vscode" / "settings.json").write_text(json.dumps(settings))
    subprocess.run(["node", "esbuild.mjs", "--electron"], cwd=VSCODE, check=True, timeout=120)
    done = subprocess.run(
        ["xvfb-run", "-a", "node", "dist-electron/runTests.js", str(workspace)],
        cwd=VSCODE,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "ok debugStepStopsInItsBody" in done.stdout and "ok theDagOpensBesideTheFlow" in done.stdout
