"""``%mf_show`` in a real kernel (nbclient), on the values of a real run: each kind of value rendered the way
its front end draws it and bounded, by name after ``%mf_run``, by pathspec, from an agent query's answer;
a task's cards in a sandboxed frame; a value over the load limit left unloaded unless asked."""

from __future__ import annotations

import base64

import nbformat
import pytest
from conftest import need
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

STEP = """%%step start --next end
import io
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import polars as pl
from PIL import Image
from sklearn.linear_model import LogisticRegression

self.frame = pd.DataFrame({"n": range(1_000), "square": [i * i for i in range(1_000)]})
self.polar = pl.DataFrame({"n": range(120), "label": [f"<b>{i}</b>" for i in range(120)]})
self.matrix = np.arange(1_000_000, dtype="float32").reshape(1000, 1000)
figure, axes = plt.subplots()
axes.plot([1, 3, 2])
self.figure = figure
self.chart = go.Figure(go.Scatter(y=[1, 3, 2]))
self.picture = Image.new("RGB", (4000, 100), "red")
png = io.BytesIO()
Image.new("RGB", (8, 8), "blue").save(png, format="PNG")
self.png = png.getvalue()
self.model = LogisticRegression(C=0.5).fit([[0], [1], [2], [3]], [0, 0, 1, 1])
self.nested = {"scores": list(range(500)), "params": {"alpha": 0.5, "name": "<script>x</script>"}}
self.text = "x" * 50_000"""

CELLS = [
    "%load_ext metaflow_stack.notebook",
    "%flow ShowFlow",
    '%%step start --next end --decorator "card"\n' + STEP.split("\n", 1)[1],
    "%%step end\npass",
    "run = %mf_run\nrun.successful",
    "%mf_show frame",  # 5
    "%mf_show self.frame --page 3",
    "%mf_show polar",
    "%mf_show matrix",
    "%mf_show figure",
    "%mf_show chart",  # 10
    "%mf_show picture",
    "%mf_show png",
    "%mf_show model",
    "%mf_show nested",
    "%mf_show text",  # 15
    "task = run['start'].task.pathspec\n%mf_show $task frame",
    "%mf_show {task}",
    "from metaflow_stack.agent.queries import connect\n"
    "with connect() as queries:\n"
    "    runs = queries.list_runs('ShowFlow')\n"
    "    found = queries.search_artifacts('ShowFlow', name='nested').artifacts[0]",
    "%mf_show runs",
    "%mf_show found",  # 20
    "import metaflow_stack.notebook.show as show\nshow.MAX_LOAD_BYTES = 1_000\n%mf_show frame",
    "%mf_show frame --full",
    "%mf_show frame --page 0",
    "import glob\nfrom metaflow_stack.datastore.cards import MAX_CARD_BYTES\n"  # every card past the UI's bound
    "for card in glob.glob(f'.metaflow/mf.cards/ShowFlow/runs/{run.id}/steps/start/tasks/*/cards/*.html'):\n"
    "    with open(card, 'ab') as grown:\n"
    "        grown.write(b' ' * MAX_CARD_BYTES)",
    "%mf_show {task}",  # 25
]


def _data(cell: nbformat.NotebookNode) -> dict:
    """The MIME bundle of the cell's displayed value (the last one it shows)."""
    shown = [o for o in cell.outputs if o.output_type in ("execute_result", "display_data")]
    assert shown, cell.outputs
    return shown[-1]["data"]


@pytest.fixture(scope="module")
def shown(tmp_path_factory: pytest.TempPathFactory) -> list[nbformat.NotebookNode]:
    folder = tmp_path_factory.mktemp("show")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    resources = {"metadata": {"path": str(folder)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True, resources=resources).execute()
    assert "True" in _data(notebook.cells[4])["text/plain"], notebook.cells[4].outputs
    return notebook.cells


def test_a_dataframe_is_one_page_of_rows_with_its_shape(shown) -> None:
    first, third = _data(shown[5]), _data(shown[6])
    caption = "DataFrame, 1,000 x 2 (rows 1-50 of 1,000, page 1 of 20; next: %mf_show frame --page 2)"
    assert caption in first["text/plain"]
    assert first["text/html"].count("<tr>") == 51  # a header and 50 rows
    assert (
        "rows 101-150 of 1,000, page 3 of 20" in third["text/html"]
        and "<td>100</td><td>10000</td>" in third["text/html"]
    )
    polar = _data(shown[7])
    assert "polars DataFrame, 120 x 2" in polar["text/plain"] and "page 1 of 3" in polar["text/plain"]
    assert "&lt;b&gt;0&lt;/b&gt;" in polar["text/html"] and "<b>0</b>" not in polar["text/html"]


def test_arrays_figures_and_images_are_bounded_pictures_and_summaries(shown) -> None:
    matrix = _data(shown[8])["text/plain"]
    assert "ndarray float32 (1000, 1000), 3.8 MiB" in matrix and "..." in matrix and len(matrix) < 2_000
    figure = _data(shown[9])
    assert base64.b64decode(figure["image/png"]).startswith(b"\x89PNG") and "matplotlib figure" in figure["text/plain"]
    chart = _data(shown[10])
    assert chart["application/vnd.plotly.v1+json"]["data"][0]["y"] == [1, 3, 2]
    picture = _data(shown[11])
    assert "image 4000 x 100 (RGB)" in picture["text/plain"]
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(base64.b64decode(picture["image/png"]))).size == (1600, 40)  # at most 1600 a side
    assert "PNG file" in _data(shown[12])["text/plain"] and "image/png" in _data(shown[12])


def test_models_trees_and_long_text_show_what_matters_bounded(shown) -> None:
    model = _data(shown[13])
    assert "sklearn LogisticRegression (fitted: classes_, coef_" in model["text/plain"]
    assert "<td><code>C</code></td><td><code>0.5</code></td>" in model["text/html"]
    tree = _data(shown[14])
    assert len(tree["application/json"]["scores"]) == 51 and tree["application/json"]["scores"][-1] == "... 450 more"
    assert "&lt;script&gt;" in tree["text/html"] and "<script>" not in tree["text/html"]
    text = _data(shown[15])["text/plain"]
    assert text.endswith("(50,000 characters in all)") and len(text) < 10_100


def test_by_pathspec_its_cards_and_an_agent_querys_answers(shown) -> None:
    assert "DataFrame, 1,000 x 2" in _data(shown[16])["text/plain"]
    cards = _data(shown[17])["text/html"]
    assert '<iframe sandbox="allow-scripts"' in cards and "default card" in cards and "srcdoc=" in cards
    # the UI's policy inside the frame: the card's own inline scripts, no network
    assert "Content-Security-Policy&quot; content=&quot;default-src &#x27;none&#x27;; script-src" in cards
    runs = _data(shown[19])["application/json"]
    assert runs["runs"][0]["pathspec"].startswith("ShowFlow/") and runs["runs"][0]["status"] == "completed"
    assert _data(shown[20])["application/json"]["params"]["alpha"] == 0.5  # the artifact the answer names


def test_a_value_over_the_limit_loads_only_when_asked_and_bad_options_are_one_line(shown) -> None:
    held = _data(shown[21])["text/plain"]
    assert "stored, not loaded (fix: %mf_show frame --full loads it)" in held
    assert "DataFrame, 1,000 x 2" in _data(shown[22])["text/plain"]
    (error,) = [o for o in shown[23].outputs if o.output_type in ("error", "stream")]
    assert "--page takes a page number from 1, not '0'" in (error.get("text") or error.get("evalue"))
    assert "Traceback" not in (error.get("text") or "")


def test_a_torch_module_shows_its_structure_parameter_count_and_shapes() -> None:
    """Without a kernel: torch is large (its CUDA libraries gigabytes), so a GitHub job installs it."""
    import importlib.util

    need("torch", importlib.util.find_spec("torch") is not None, "pip install torch")
    import torch

    from metaflow_stack.notebook import show

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    shown = show.value(model, "model")
    assert "model: torch Sequential, 11 parameters" in shown.bundle["text/plain"]  # 3*2+2 + 2*1+1
    assert (
        "<td><code>0.weight</code></td><td><code>(2, 3)</code></td><td><code>float32</code></td>"
        in (shown.bundle["text/html"])
    )
    assert "(1): ReLU()" in shown.bundle["text/plain"]


def test_a_card_past_the_uis_bound_is_named_not_embedded(shown) -> None:
    cards = _data(shown[25])["text/html"]
    assert "not shown: card default-" in cards and "is larger than 32 MiB" in cards and "srcdoc=" not in cards
