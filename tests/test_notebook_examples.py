"""The example notebooks (``examples/notebooks``) run top to bottom in a real kernel (nbclient), in a copy of
their folder, and show what their text says: the best model of a foreach, a step fixed with spin and the
run resumed."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "notebooks"


def _executed(name: str, folder: Path) -> list[str]:
    """Each code cell's text output, after running the notebook in ``folder``."""
    shutil.copy(EXAMPLES / name, folder / name)
    notebook = nbformat.read(folder / name, as_version=4)
    resources = {"metadata": {"path": str(folder)}}
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources=resources).execute()
    return [
        "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))
        for cell in notebook.cells
        if cell.cell_type == "code"
    ]


def test_training_across_cells_finds_the_best_model_and_exports_it(tmp_path: Path) -> None:
    out = _executed("train_across_cells.ipynb", tmp_path)
    assert "(True, 1.0, 0.973)" in out[-3], out[-3]  # lbfgs is deterministic: the same scores every run
    assert '"0.01": 0.873' in out[-2] and '"10.0": 0.973' in out[-2]  # the scores, as a tree
    assert (tmp_path / "train_flow.py").is_file()


def test_a_step_is_fixed_with_spin_and_the_run_resumed(tmp_path: Path) -> None:
    out = _executed("one_step_at_a_time.ipynb", tmp_path)
    assert out[5].rstrip().endswith("False"), out[5]  # the None row breaks clean
    assert "failed at In [" in out[5]
    assert "['a', 'b', 'c']" in out[7], out[7]
    assert "(True, 3)" in out[8], out[8]
