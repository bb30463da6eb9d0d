"""The VS Code extension (``vscode/``, built by ``just vscode``): its pure logic and its helper process under
node's own test runner, its webview page in Chromium with the page's real content security policy (the DAG
of a graph the runtime answered, a broken buffer keeping the last good graph under its error, a click asking
to reveal the step's line), and the packaged ``.vsix``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROJECT, SCREENSHOTS, need
from playwright.sync_api import expect
from test_ide import BRANCHING
from webview_page import HOST, served_webview

from metaflow_stack.ide.graph import flow_graph

VSCODE = PROJECT / "vscode"
DIST = VSCODE / "dist"


@pytest.fixture(scope="module")
def built() -> Path:
    need("npm", bool(subprocess.run(["which", "npm"], capture_output=True).returncode == 0), "install Node 20 with npm")
    assert (DIST / "webview.js").is_file(), "the extension is not built (run ./just vscode)"
    return DIST


def test_the_extensions_logic_and_helper_pass_nodes_test_runner(built: Path) -> None:
    done = subprocess.run(
        ["npm", "test", "--prefix", str(VSCODE)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "METAFLOW_STACK_PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout and "# pass 8" in done.stdout, done.stdout[-2000:]


@pytest.fixture(scope="module")
def served(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The webview's page as the extension makes it, and its script, from 127.0.0.1."""
    with served_webview(tmp_path_factory.mktemp("webview")) as origin:
        yield origin


def test_the_webview_draws_the_dag_keeps_it_through_a_broken_buffer_and_reveals_a_step(served: str, chromium) -> None:
    page = chromium.new_page(viewport={"width": 900, "height": 1000})
    violations: list[str] = []
    page.on(
        "console",
        lambda message: violations.append(message.text) if "Content Security Policy" in message.text else None,
    )
    page.add_init_script(HOST)
    page.goto(f"{served}/index.html")
    graph = flow_graph(BRANCHING, "shape_flow.py")
    page.evaluate("(m) => window.postMessage(m, '*')", {"type": "graph", "graph": graph, "file": "shape_flow.py"})
    dag = page.locator(".mf-dag")
    expect(dag.locator("svg.dag [data-step]")).to_have_count(7)
    expect(dag.locator("svg.dag [data-edge]")).to_have_count(7)
    expect(dag.locator("[data-step='b'] .step-meta")).to_have_text("foreach · @retry")
    expect(dag.locator("[data-step='a'] .step-meta")).to_have_text("linear · @card")
    expect(dag.locator("[data-parameter='alpha']")).to_have_text("alpha = 0.5 — the rate")
    expect(dag.locator(".title")).to_have_text("ShapeFlow · shape_flow.py")
    SCREENSHOTS.joinpath("vscode").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "vscode" / "webview-dag.png", full_page=True)

    page.evaluate("(m) => window.postMessage(m, '*')", {"type": "error", "message": "line 9: '(' was never closed"})
    expect(dag.locator(".error")).to_have_text("line 9: '(' was never closed")
    expect(dag.locator("svg.dag [data-step]")).to_have_count(7)  # the last good graph stays

    dag.locator("[data-step='join']").click()
    posted = page.evaluate("window.posted")
    assert posted == [{"type": "reveal", "line": graph["steps"]["join"]["line"]}]
    page.close()
    assert violations == []  # the page's own script ran under its policy, nothing else was asked for


def test_the_packaged_extension_holds_its_bundles_and_manifest(built: Path) -> None:
    with zipfile.ZipFile(built / "metaflow-stack.vsix") as vsix:
        names = set(vsix.namelist())
        manifest = json.loads(vsix.read("extension/package.json"))
    assert {"extension/dist/extension.js", "extension/dist/webview.js", "extension/package.json"} <= names
    assert not any("node_modules" in name or name.endswith(".ts") for name in names)  # bundles only
    assert manifest["main"] == "./dist/extension.js"
    assert "metaflowStack.showDag" in {command["command"] for command in manifest["contributes"]["commands"]}
