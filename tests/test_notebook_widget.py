"""The live DAG under ``%mf_run``, in a real JupyterLab and a real Notebook 7 driven by Chromium: a foreach's
items drawn running while a held step waits, then completed with the retried item counted, a click on an
item showing that task's artifacts and log; a foreach of thousands drawn from a sample with its true totals;
and, headless (nbclient), the static table a saved notebook keeps and the states the metadata recorded."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nbformat
import pytest
from conftest import LOOPBACK, SCREENSHOTS, run_cli
from devservers import free_port
from nbclient import NotebookClient
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect

from metaflow_stack.notebook import widget

pytestmark = pytest.mark.slow

#: A flow whose foreach items wait until the test creates the file ``release`` (so the browser sees them
#: running), the second item failing its first attempt.
CELLS = [
    "%load_ext metaflow_stack.notebook",
    "%%flow LiveFlow\nimport os\nimport time",
    "%%step start --next each --foreach items\nself.items = [1, 2, 3]",
    '%%step each --next join --decorator "retry(times=1)"\n'
    "from metaflow import current\n"
    'while not os.path.exists("release"):\n'
    "    time.sleep(0.2)\n"
    "if self.input == 2 and current.retry_count == 0:\n"
    '    raise RuntimeError("the first attempt of item 2 fails")\n'
    'print("scored item", self.input)\n'
    "self.value = self.input * 10",
    "%%step join --join --next end\nself.total = sum(i.value for i in inputs)",
    "%%step end\npass",
    "run = %mf_run",
]


#: A widget told of a foreach of 5,000 items as the runtime announces them (no flow runs): 4,990 done (12 on a
#: second attempt), then 7 failed and 3 still running.
BIG_FOREACH = [
    "from metaflow_stack.notebook.progress import Progress\n"
    "from metaflow_stack.notebook.widget import DagWidget\n"
    "graph = {'steps': {'start': {'type': 'split-foreach', 'next': ['each'], 'inside_foreach': False},\n"
    "                   'each': {'type': 'linear', 'next': ['end'], 'inside_foreach': True},\n"
    "                   'end': {'type': 'end', 'next': [], 'inside_foreach': False}}}\n"
    "dag = DagWidget(graph, run='BigFlow/7', state='running')\n"
    "progress = Progress('BigFlow', graph, dag.show)\n"
    "for i in range(2, 5002):\n"
    "    progress.feed(f'[7/each/{i}] Task is starting.')\n"
    "for i in range(2, 14):\n"
    "    progress.feed(f'[7/each/{i}] Task is starting (retry).')\n"
    "for i in range(2, 4992):\n"
    "    progress.feed(f'[7/each/{i}] Task finished successfully.')\n"
    "for i in range(4992, 4999):\n"
    "    progress.feed(f'[7/each/{i}] Task failed.')\n"
    "progress.flush()\n"
    "dag",
]


def _write(folder: Path, name: str, cells: list[str] = CELLS) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / name
    nbformat.write(notebook, path)
    return path


@dataclass
class Jupyter:
    url: str
    token: str
    root: Path


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupyter]:
    """JupyterLab (and Notebook 7, on the same server) on 127.0.0.1 with a token, over a folder of its own."""
    assert widget.available(), "the widget's front end is not built (run ./just ui)"
    root, port, token = tmp_path_factory.mktemp("jupyter"), free_port(), "widget-test-token"
    # Its runtime files and settings in the test's folders, never the user's; as root only when run as root.
    private = {"JUPYTER_RUNTIME_DIR": str(root.parent / "runtime"), "JUPYTER_CONFIG_DIR": str(root.parent / "config")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env={**os.environ, **private},
        stdout=subprocess.DEVNULL,
        stderr=open(root.parent / "jupyter.log", "w"),  # noqa: SIM115 - the server's log, kept for a failure
    )  # fmt: skip
    url = f"{LOOPBACK}:{port}"
    try:
        assert _answers(f"{url}/api/status", token, server), (root.parent / "jupyter.log").read_text()[-3000:]
        yield Jupyter(url, token, root)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(url: str, token: str, server: subprocess.Popen, seconds: float = 120) -> bool:
    """Whether the server answered ``url`` (with its token) before ``seconds``, or before it exited."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers={"Authorization": f"token {token}"}, timeout=2).status_code == 200:
                return True
        time.sleep(0.3)
    return False


def _accept_kernel(page: object) -> None:
    """A fresh JupyterLab may ask which kernel to start for a notebook (a modal dialog over the menus): take
    the one it offers, as a user would."""
    dialog = page.locator(".jp-Dialog")
    try:
        dialog.wait_for(state="visible", timeout=5_000)
    except PlaywrightTimeoutError:
        return
    dialog.get_by_role("button", name="Select", exact=True).click()
    expect(dialog).to_have_count(0)


def _run_all(page: object) -> None:
    """Run > Run All Cells, as a user would (the same menu in JupyterLab and Notebook 7)."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def _open_and_run_all(jupyter: Jupyter, chromium, front_end: str, folder: Path, cells: list[str]) -> object:
    """A page of ``front_end`` ("lab/tree" or "notebooks") on a notebook of ``cells`` in ``folder``, every cell
    run as a user would; ``?reset``: a fresh workspace, so no tab an earlier test left open comes back."""
    folder.mkdir()
    notebook = _write(folder, f"{folder.name}.ipynb", cells)
    page = chromium.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{jupyter.url}/{front_end}/{folder.name}/{notebook.name}?reset&token={jupyter.token}")
    expect(page.locator(".jp-Notebook")).to_be_visible(timeout=60_000)
    expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(1, timeout=60_000)
    _accept_kernel(page)
    _run_all(page)
    return page


@pytest.mark.parametrize("front_end", ["lab/tree", "notebooks"])
def test_the_dag_follows_a_run_live_and_shows_a_clicked_tasks_artifacts_and_log(
    jupyter: Jupyter, chromium, front_end: str
) -> None:
    folder = jupyter.root / front_end.replace("/", "-")
    page = _open_and_run_all(jupyter, chromium, front_end, folder, CELLS)

    dag = page.locator(".mf-dag")
    # While the items wait for the release file: started, drawn running, three items in the foreach.
    expect(dag.locator(".title[data-state='running']")).to_be_visible(timeout=120_000)
    expect(dag.locator("[data-step='start'][data-status='completed']")).to_be_visible(timeout=60_000)
    expect(dag.locator("[data-step='each'][data-status='running']")).to_be_visible(timeout=60_000)
    expect(dag.locator("[data-step='each'] [data-items='3']")).to_be_visible()
    expect(dag.locator("[data-step='end'][data-status='pending']")).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "notebook" / f"{folder.name}-running.png", full_page=True)

    (folder / "release").touch()
    expect(dag.locator(".title[data-state='completed']")).to_be_visible(timeout=120_000)
    for step in ("start", "each", "join", "end"):
        expect(dag.locator(f"[data-step='{step}'][data-status='completed']")).to_be_visible()
    expect(dag.locator("[data-step='each'] .step-meta")).to_contain_text("3/3 done · 1 retried")
    expect(dag.locator("[data-step='each'] rect.item.status-completed")).to_have_count(3)

    dag.locator("[data-step='each'] rect.item").nth(1).click()
    expect(dag.locator(".detail [data-artifact='value']")).to_be_visible(timeout=30_000)
    expect(dag.locator(".detail pre[data-stream='stdout']")).to_contain_text("scored item")
    dag.locator("[data-step='join']").click()
    expect(dag.locator(".detail [data-artifact='total']")).to_be_visible(timeout=30_000)
    page.screenshot(path=SCREENSHOTS / "notebook" / f"{folder.name}-done.png", full_page=True)
    # The run the widget followed is the one the notebook's folder holds (its .metaflow beside the notebook).
    run_id = dag.locator(".title").inner_text().split(":")[0].removeprefix("LiveFlow/")
    page.close()
    assert (folder / ".metaflow" / "LiveFlow" / run_id / "end").is_dir()


def test_a_foreach_of_thousands_is_drawn_from_a_sample_with_its_true_totals(jupyter: Jupyter, chromium) -> None:
    """The kernel sends 400 of the step's 5,000 tasks (failed and running first) and its counts of all of
    them: the front end draws the 400 and says the totals."""
    page = _open_and_run_all(jupyter, chromium, "lab/tree", jupyter.root / "big", BIG_FOREACH)

    each = page.locator(".mf-dag [data-step='each']")
    expect(each).to_have_attribute("data-status", "running", timeout=60_000)
    expect(each.locator(".step-meta[data-counts]")).to_have_text(
        "linear · 4990/5000 done · 7 failed · 3 running · 12 retried"
    )
    expect(each.locator("[data-items='5000']")).to_be_visible()
    expect(each.locator("rect.item")).to_have_count(400)
    expect(each.locator("rect.item.status-failed")).to_have_count(7)
    expect(each.locator("rect.item.status-running")).to_have_count(3)
    page.screenshot(path=SCREENSHOTS / "notebook" / "big-foreach.png", full_page=True)
    page.close()


def test_a_saved_notebook_keeps_the_runs_final_states(tmp_path: Path) -> None:
    """Headless: the widget's state as the metadata recorded it (attempts, foreach items), and the static
    table nbconvert shows, brought up to date when the run ended."""
    notebook = nbformat.read(_write(tmp_path, "saved.ipynb"), as_version=4)
    (tmp_path / "release").touch()
    where = {"metadata": {"path": str(tmp_path)}}
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources=where)
    client.execute()
    shown = [o for o in notebook.cells[-1].outputs if o.output_type == "display_data"]
    assert len(shown) == 1 and "application/vnd.jupyter.widget-view+json" in shown[0].data
    static = shown[0].data["text/html"]
    assert ": completed</b>" in static
    for step in ("start", "each", "join", "end"):
        assert f'data-step="{step}" data-status="completed"' in static, static
    assert "3/3 done, 1 retried" in static

    states = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    (dag,) = [model["state"] for model in states.values() if "tasks" in model["state"]]
    each = sorted((t["foreach"], t["attempt"], t["status"]) for t in dag["tasks"] if t["step_name"] == "each")
    assert each == [(["items=1"], 0, "completed"), (["items=2"], 1, "completed"), (["items=3"], 0, "completed")]
    assert dag["state"] == "completed" and dag["run"].startswith("LiveFlow/")


def test_jupyterlab_exports_the_notebooks_flow_from_its_file_menu(jupyter: Jupyter, chromium) -> None:
    """File > Save and Export Notebook As > Metaflow: the nbconvert exporter the package registers, so
    no front-end extension is needed; the file is the one ``metaflow notebook export`` writes."""
    folder = jupyter.root / "export"
    folder.mkdir()
    notebook = _write(folder, "export.ipynb")
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    # ?reset: a fresh workspace, so the tabs an earlier test left open stay closed (the export is the active tab)
    page.goto(f"{jupyter.url}/lab/tree/{folder.name}/{notebook.name}?reset&token={jupyter.token}")
    expect(page.locator(".jp-Notebook")).to_be_visible(timeout=60_000)
    _accept_kernel(page)
    page.get_by_role("menuitem", name="File", exact=True).click()
    page.locator(".lm-Menu-itemLabel", has_text="Save and Export Notebook As").hover()  # Lumino opens on hover
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("menuitem", name="Metaflow", exact=True).click()
    saved = folder / "downloaded.py"
    download.value.save_as(saved)
    page.close()
    assert download.value.suggested_filename == "export.py"
    written = folder / "written.py"
    assert run_cli("notebook", "export", str(notebook), "-o", str(written)).returncode == 0
    assert saved.read_text() == written.read_text() and "class LiveFlow(FlowSpec):" in saved.read_text()
