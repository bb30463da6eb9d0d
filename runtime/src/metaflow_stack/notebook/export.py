"""A notebook's flow as a standalone flow file: the same file ``%mf_run`` runs, formatted.

``from_notebook`` reads an ``.ipynb`` (nbformat) and declares every cell as
the magics would, from its magic line or its tags; cells that declare
nothing (exploration, plots) are left out. ``write`` formats the file with
ruff when it is installed and writes it whole. ``nbconvert_exporter`` offers
the same file to JupyterLab's and Notebook 7's export menu.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from metaflow_stack.deploy import require, write_atomically
from metaflow_stack.errors import InvalidInput
from metaflow_stack.notebook import cells
from metaflow_stack.notebook.assembler import Assembled, NotebookFlow, assemble


def from_notebook(path: Path) -> Assembled:
    """The flow ``path``'s cells declare."""
    nbformat = require("nbformat", extra="notebook")
    try:
        notebook = nbformat.read(str(path), as_version=4)
    # (AttributeError: a JSON list; ValidationError: what nbformat cannot read as version 4, a cell with no metadata)
    except (OSError, ValueError, AttributeError, TypeError, nbformat.ValidationError) as exc:
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(str(path), f"is not a notebook: {said}", fix="name an .ipynb file") from None
    # nbformat reads past what its schema refuses (and so does Jupyter): only what the export reads must hold.
    cells = notebook.get("cells")
    if not isinstance(cells, list) or not all(isinstance(cell, dict) and "cell_type" in cell for cell in cells):
        raise InvalidInput(str(path), "is not a notebook: its cells are not a list of cells", fix="name an .ipynb file")
    return from_cells(notebook)


def from_cells(notebook: Any) -> Assembled:
    """The flow a notebook's (nbformat's) cells declare."""
    flow = NotebookFlow()
    for index, cell in enumerate(notebook.cells, start=1):
        if cell.get("cell_type") != "code":
            continue
        label = f"cell {index}"
        source = _source(cell, label)
        found = cells.from_source(source, cells.Cell(label, source), _tags(cell, label))
        if found is not None:
            flow.declare(found)
    return assemble(flow)


def _source(cell: dict[str, Any], label: str) -> str:
    """A code cell's text: nbformat stores it as one string or as a list of lines."""
    source = cell.get("source")
    if isinstance(source, list) and all(isinstance(line, str) for line in source):
        return "".join(source)
    if not isinstance(source, str):
        what = "is missing" if source is None else f"is {type(source).__name__}, not text"
        raise InvalidInput(f"{label} source", what, fix="save the notebook again from Jupyter")
    return source


def _tags(cell: dict[str, Any], label: str) -> list[str]:
    """A code cell's tags: a list of text (none when the cell has no metadata or no tags)."""
    metadata = cell.get("metadata") or {}
    tags = metadata.get("tags", []) if isinstance(metadata, dict) else None
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise InvalidInput(f"{label} tags", "are not a list of text", fix='write them as ["step:train", "next:end"]')
    return tags


def formatted(source: str) -> str:
    """``source`` as ruff formats it (as it is, when ruff is not installed)."""
    # On PATH, or beside this Python (a kernel or Jupyter server started from a virtualenv without activating it)
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        return source
    try:
        done = subprocess.run([ruff, "format", "-"], input=source, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # formatting is a courtesy: the file as written still runs
        return source
    return done.stdout if done.returncode == 0 else source


def write(assembled: Assembled, target: Path) -> Path:
    """Write the flow file, formatted, whole or not at all."""
    return write_atomically(target, formatted(assembled.source))
