"""The UI front end's own checks: its unit tests (vitest) and a strict type check."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import PROJECT, need

UI = PROJECT / "ui"


@pytest.fixture(scope="module")
def npm() -> str:
    found = shutil.which("npm")
    need("npm", found is not None, "install Node 20 with npm")
    if not (UI / "node_modules").is_dir():
        command = [found, "install", "--no-audit", "--no-fund"]
        installed = subprocess.run(command, cwd=UI, capture_output=True, text=True, timeout=600)
        assert installed.returncode == 0, installed.stderr[-3000:]
    return found


@pytest.mark.parametrize("script", ["test", "typecheck"])
def test_the_front_end_passes(npm: str, script: str) -> None:
    ran = subprocess.run([npm, "run", script], cwd=UI, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-4000:]
