"""Throwaway Python environments for the peers a benchmark measures beside this project.

Peers often pin what this project also uses (mcp, FastAPI, scikit-learn): each gets
a virtual environment of its own under the benchmark's temporary folder, made by uv
(whose cache makes a second run take seconds).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def venv(root: Path, name: str, packages: list[str]) -> Path:
    """A new environment at ``root/name`` with ``packages`` installed; returns its ``bin`` folder."""
    uv = str(Path(sys.executable).with_name("uv"))
    path = root / name
    subprocess.run([uv, "venv", "-q", str(path), "--python", sys.executable], check=True)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(path / "bin" / "python"), *packages], check=True)
    return path / "bin"
