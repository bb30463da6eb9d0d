"""The VS Code extension (``vscode/``, built by ``just vscode``): its pure logic and its helper process under
node's own test runner, its webview pages in Chromium with each page's real content security policy (the DAG
of a graph the runtime answered, a broken buffer keeping the last good graph under its error, a click asking
to reveal the step's line, a run's statuses over it; the launcher's form; a real card framed sandboxed,
reaching neither the network nor the editor), and the packaged ``.vsix``."""

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
from webview_page import HOST, PAGES, served_webview

from metaflow_stack.ide.graph import flow_graph

VSCODE = PROJECT / "vscode"
DIST = VSCODE / "dist"
#: What each page posts first, once it listens: the extension posts what it shows then.
READY = {"type": "ready"}


@pytest.fixture(scope="module")
def built() -> Path:
    need("npm", bool(subprocess.run(["which", "npm"], capture_output=True).returncode == 0), "install Node 20 with npm")
    assert all((DIST / f"{page}.js").is_file() for page in PAGES), "the extension is not built (run ./just vscode)"
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
    assert "# fail 0" in done.stdout and "# pass 17" in done.stdout, done.stdout[-2000:]


@pytest.fixture(scope="module")
def served(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The webview pages as the extension makes them, and their scripts, from 127.0.0.1."""
    with served_webview(tmp_path_factory.mktemp("webview")) as origin:
        yield origin


def test_the_webview_draws_the_dag_keeps_it_through_a_broken_buffer_and_reveals_a_step(served: str, chromium) -> None:
    page, violations = _opened(chromium, served, "dag")
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
    assert posted == [READY, {"type": "reveal", "line": graph["steps"]["join"]["line"]}]  # ready: once it listens
    page.close()
    assert violations == []  # the page's own script ran under its policy, nothing else was asked for


def test_the_packaged_extension_holds_its_bundles_and_manifest(built: Path) -> None:
    with zipfile.ZipFile(built / "metaflow-stack.vsix") as vsix:
        names = set(vsix.namelist())
        manifest = json.loads(vsix.read("extension/package.json"))
    bundles = {f"extension/dist/{name}.js" for name in ("extension", *PAGES)}
    assert bundles | {"extension/package.json", "extension/media/runs.svg"} <= names
    assert not any("node_modules" in name or name.endswith(".ts") for name in names)  # bundles only
    assert manifest["main"] == "./dist/extension.js"
    commands = {command["command"] for command in manifest["contributes"]["commands"]}
    assert {
        "metaflowStack.showDag",
        "metaflowStack.runFlow",
        "metaflowStack.debugStep",
        "metaflowStack.showCards",
    } <= commands
    assert manifest["contributes"]["views"]["metaflowStack"][0]["id"] == "metaflowStack.runs"
    assert manifest["extensionKind"] == ["workspace"]  # beside the files, in a remote or devcontainer window


def _post(page, message: dict) -> None:
    page.evaluate("(m) => window.postMessage(m, '*')", message)


def _opened(chromium, served: str, name: str) -> tuple[object, list[str]]:
    page = chromium.new_page(viewport={"width": 900, "height": 900})
    violations: list[str] = []
    page.on(
        "console",
        lambda message: violations.append(message.text) if "Content Security Policy" in message.text else None,
    )
    page.add_init_script(HOST)
    page.goto(f"{served}/{name}.html")
    return page, violations


def test_a_runs_statuses_are_overlaid_on_the_dag_and_cleared(served: str, chromium) -> None:
    page, violations = _opened(chromium, served, "dag")
    _post(page, {"type": "graph", "graph": flow_graph(BRANCHING, "shape_flow.py"), "file": "shape_flow.py"})
    task = {"attempt": 0, "started_at": 1, "finished_at": 2, "foreach": []}
    tasks = [
        {**task, "pathspec": "ShapeFlow/7/start/1", "step_name": "start", "status": "completed"},
        {**task, "pathspec": "ShapeFlow/7/a/2", "step_name": "a", "status": "failed"},
        {**task, "pathspec": "ShapeFlow/7/b/3", "step_name": "b", "status": "running", "finished_at": None},
        {**task, "pathspec": "ShapeFlow/7/gone/4", "step_name": "gone", "status": "completed"},  # renamed since
    ]
    _post(page, {"type": "run", "run": "ShapeFlow/7", "status": "running", "tasks": tasks})
    dag = page.locator(".mf-dag")
    expect(dag.locator(".run")).to_have_text("run ShapeFlow/7: running")
    expect(dag.locator("[data-step='start']")).to_have_attribute("data-status", "completed")
    expect(dag.locator("[data-step='a']")).to_have_attribute("data-status", "failed")
    expect(dag.locator("[data-step='b']")).to_have_attribute("data-status", "running")
    expect(dag.locator("[data-step='join']")).to_have_attribute("data-status", "pending")
    page.screenshot(path=SCREENSHOTS / "vscode" / "webview-run.png", full_page=True)
    _post(page, {"type": "run", "run": None, "status": None, "tasks": []})
    expect(dag.locator("[data-step='a']")).to_have_attribute("data-status", "pending")
    page.close()
    assert violations == []


def test_the_launcher_form_posts_the_values_and_backend_and_shows_the_run(served: str, chromium) -> None:
    page, violations = _opened(chromium, served, "launcher")
    fields = [
        {"name": "alpha", "type": "float", "placeholder": "0.5", "help": "the rate", "required": False},
        {"name": "who", "type": "str", "placeholder": '"world"', "help": "", "required": False},
    ]
    backends = [
        {"name": "local", "decorator": None, "detail": "every step on this machine", "usable": True, "fix": None},
        {"name": "nomad", "decorator": "nomad", "detail": "every step as a Nomad job", "usable": False,
         "fix": "not found: install Nomad"},
    ]  # fmt: skip
    _post(page, {"type": "form", "flow": "ShapeFlow", "file": "shape_flow.py", "fields": fields, "backends": backends})
    form = page.locator(".mf-launcher")
    expect(form.locator("h2")).to_have_text("Run ShapeFlow")
    expect(form.locator("#param-alpha")).to_have_attribute("placeholder", "0.5")
    expect(form.locator("#backend-nomad")).to_be_disabled()
    expect(form.locator(".fix")).to_have_text("not usable here: not found: install Nomad")
    form.locator("#param-alpha").fill(" 0.7 ")
    page.screenshot(path=SCREENSHOTS / "vscode" / "webview-launcher.png", full_page=True)
    form.locator("#run").click()
    expect(form.locator("#run")).to_be_disabled()  # one run at a time from a form
    assert page.evaluate("window.posted") == [
        READY,
        {"type": "launch", "values": {"alpha": "0.7", "who": ""}, "backend": "local"},
    ]
    _post(page, {"type": "launched", "run": "ShapeFlow/12"})
    expect(form.locator("#state")).to_have_text("running: ShapeFlow/12")
    _post(page, {"type": "finished", "status": "successful", "returncode": 0})
    expect(form.locator("#state")).to_have_text("ShapeFlow/12 successful (exit 0)")
    expect(form.locator("#run")).to_be_enabled()
    _post(page, {"type": "error", "message": "parameters.alpha: 'fast' is not a float (fix: give a float)"})
    expect(form.locator("#state.error")).to_have_text("parameters.alpha: 'fast' is not a float (fix: give a float)")
    page.close()
    assert violations == []


@pytest.fixture(scope="module")
def card_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The HTML of CardFlow's report card, as ``@card`` wrote it in a real run."""
    root = tmp_path_factory.mktemp("cards")
    (root / ".metaflow").mkdir()
    flow = root / "card_flow.py"
    flow.write_text((PROJECT / "tests" / "flow_suite" / "flows" / "card_flow.py").read_text())
    env = {**os.environ, "USER": "tester", "METAFLOW_DEFAULT_METADATA": "local"}
    done = subprocess.run([sys.executable, str(flow), "run"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = (root / ".metaflow" / "mf.cards").rglob("blank-report-*.html")
    return found.read_text()


def test_a_card_renders_sandboxed_without_network_or_the_editors_api(served: str, chromium, card_html: str) -> None:
    page, _ = _opened(chromium, served, "cards")
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    cards = [{"file": "blank-report-1.html", "type": "blank", "id": "report", "hash": "1"},
             {"file": "spy-2.html", "type": "spy", "id": None, "hash": "2"}]  # fmt: skip
    _post(page, {"type": "cards", "task": "CardFlow/1/report/2", "cards": cards})
    expect(page.locator("#card option")).to_have_text(["blank · report", "spy"])
    page.wait_for_function("window.posted.length === 2")
    assert page.evaluate("window.posted") == [READY, {"type": "open", "file": "blank-report-1.html"}]
    _post(page, {"type": "card", "file": "blank-report-1.html", "html": card_html})
    frame = page.frame_locator("iframe[data-file='blank-report-1.html']")
    expect(frame.locator("h1")).to_have_text("Score 0.93")  # Metaflow's own card script ran, in the frame
    page.screenshot(path=SCREENSHOTS / "vscode" / "webview-card.png", full_page=True)

    spy = """<!DOCTYPE html><html><body><p id="out">waiting</p><script>
      const out = document.getElementById("out"); const seen = [];
      try { window.parent.posted.push("reached"); seen.push("parent"); } catch (e) { seen.push("no parent"); }
      try { localStorage.setItem("k", "v"); seen.push("storage"); } catch (e) { seen.push("no storage"); }
      fetch("http://127.0.0.1:9/leak").then(() => seen.push("network"), () => seen.push("no network"))
        .finally(() => { out.textContent = seen.join(", "); });
    </script></body></html>"""
    page.locator("#card").select_option("spy-2.html")
    page.wait_for_function("window.posted.length === 3")
    _post(page, {"type": "card", "file": "spy-2.html", "html": spy})
    expect(page.frame_locator("iframe[data-file='spy-2.html']").locator("#out")).to_have_text(
        "no parent, no storage, no network"
    )
    assert not any("/leak" in url for url in requests)
    assert page.evaluate("window.posted")[2] == {"type": "open", "file": "spy-2.html"}
    page.close()
