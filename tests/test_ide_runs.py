"""What the editor's sidebar, overlay, debugger and launcher ask of the runtime, on real runs in a workspace:
the runs tree's listings and previews through the helper (nothing unpickled), a task's cards, the debug
configuration the extension starts, run under debugpy's own adapter until a breakpoint in the step body
stops (what VS Code's Python Debugger does with it), and a run launched from the form's text values."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT, refuse_unpickling, run_cli
from dap_client import Debugger

from metaflow_stack.ide.browse import Browser
from metaflow_stack.ide.serve import answer

FLOWS = PROJECT / "tests" / "flow_suite" / "flows"
ENV = {"USER": "ide-tester", "METAFLOW_DEFAULT_METADATA": "local"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with its own datastore: CardFlow and ForeachFlow run once each, ParametersFlow not yet."""
    root = tmp_path_factory.mktemp("ide-workspace")
    (root / ".metaflow").mkdir()
    for name in ("card_flow", "foreach_flow", "parameters_flow"):
        shutil.copy(FLOWS / f"{name}.py", root)
    for name in ("card_flow", "foreach_flow"):
        done = subprocess.run(
            [sys.executable, f"{name}.py", "run"], cwd=root, env={**os.environ, **ENV}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture
def ask(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    """The helper's answers, in this process (where unpickling anything fails the test), from the workspace."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("METAFLOW_SERVICE_URL", raising=False)
    monkeypatch.chdir(workspace)
    browser = Browser()
    refuse_unpickling(monkeypatch, "the editor's helper")

    def asked(method: str, **params: object) -> dict:
        return answer(json.dumps({"id": 1, "method": method, "params": params}), browser)

    yield asked
    browser.forget()


def _result(found: dict) -> object:
    assert "result" in found, found
    return found["result"]


def test_the_tree_lists_flows_runs_steps_tasks_and_artifacts(ask, workspace: Path) -> None:
    profile = _result(ask("profile"))
    assert profile["metadata"] == "local" and profile["where"] == str(workspace / ".metaflow")
    assert profile["user"] == "ide-tester"
    flows = _result(ask("flows"))["flows"]
    assert [f["name"] for f in flows] == ["ForeachFlow", "CardFlow"]  # newest first
    (run,) = _result(ask("runs", flow="ForeachFlow"))["runs"]
    assert run["status"] == "completed" and run["user"] == "ide-tester"
    assert _result(ask("runs", flow="ForeachFlow", user="someone-else"))["runs"] == []
    assert _result(ask("runs", flow="ForeachFlow", status="failed"))["runs"] == []
    steps = {s["step_name"]: s["total"] for s in _result(ask("summary", run=run["pathspec"]))["steps"]}
    assert steps == {"start": 1, "square": 4, "join": 1, "end": 1}
    page = _result(ask("tasks", run=run["pathspec"], step="square", limit=3))
    assert [t["foreach"] for t in page["tasks"]] == [["items=0"], ["items=1"], ["items=2"]] and page["truncated"]
    rest = _result(ask("tasks", run=run["pathspec"], step="square", limit=3, cursor=page["next_cursor"]))
    assert [t["foreach"] for t in rest["tasks"]] == [["items=3"]]
    artifacts = {a["name"]: a for a in _result(ask("artifacts", task=rest["tasks"][0]["pathspec"]))["artifacts"]}
    assert artifacts["value"]["python_type"] == "int"


def test_a_preview_is_bounded_plain_data_and_the_whole_value_opens_on_demand(ask) -> None:
    (run,) = _result(ask("runs", flow="ForeachFlow"))["runs"]
    (start,) = _result(ask("tasks", run=run["pathspec"], step="start"))["tasks"]
    (join,) = _result(ask("tasks", run=run["pathspec"], step="join"))["tasks"]
    assert _result(ask("preview", task=join["pathspec"], name="values"))["preview"] == "[0, 1, 4, 9]"
    assert _result(ask("preview", task=start["pathspec"], name="items", full=True))["preview"] == "[0, 1, 2, 3]"
    missing = ask("preview", task=join["pathspec"], name="nothing")
    assert missing["error"]["code"] == "not_found" and "nothing" in missing["error"]["message"]


def test_a_tasks_cards_are_listed_and_read_without_the_card_server(ask) -> None:
    (run,) = _result(ask("runs", flow="CardFlow"))["runs"]
    (report,) = _result(ask("tasks", run=run["pathspec"], step="report"))["tasks"]
    (card,) = _result(ask("cards", task=report["pathspec"]))
    assert (card["type"], card["id"]) == ("blank", "report")
    html = _result(ask("card", task=report["pathspec"], file=card["file"]))
    data = re.search(r'__MF_DATA__\["[^"]+"\] = "([^"]+)"', html)  # the card's content, as Metaflow embeds it
    assert html.startswith("<!DOCTYPE html>") and data and "Score 0.93" in base64.b64decode(data[1]).decode()
    refused = ask("card", task=report["pathspec"], file="../../secrets.html")
    assert refused["error"]["code"] == "bad_parameter"


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("runs", {"flow": "ForeachFlow", "limit": 0}, "params.limit"),
        ("runs", {"flow": "ForeachFlow", "surprise": 1}, "params.surprise"),
        ("summary", {"run": "ForeachFlow/../../etc"}, "run"),
        ("preview", {"task": "ForeachFlow/1", "name": "x"}, "task"),
        ("debug", {"path": "foreach_flow.py", "source": "class", "step": "square"}, "line 1"),
        ("format_disk", {}, "method"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(ask, method: str, params: dict, field: str) -> None:
    refused = ask(method, **params)["error"]
    assert refused["code"] == "bad_parameter" and field in refused["message"], refused


def test_debug_step_stops_at_a_breakpoint_in_the_step_body_spun_on_an_earlier_task(ask, workspace: Path) -> None:
    source = (workspace / "foreach_flow.py").read_text()
    found = _result(ask("debug", path="foreach_flow.py", source=source, step="square", python=sys.executable))
    config, task = found["configuration"], found["task"]
    assert task.startswith("ForeachFlow/") and "/square/" in task
    assert config["args"] == ["spin", task] and config["subProcess"] and config["type"] == "debugpy"
    body = source.splitlines().index("        self.value = self.input * self.input") + 1
    debugger = Debugger(config, ENV)
    try:
        session, frame = debugger.stop_at(str(workspace / "foreach_flow.py"), body)
        assert (frame["name"], frame["line"]) == ("square", body)
        first_item = _result(ask("tasks", run="/".join(task.split("/")[:2]), step="square", limit=1))["tasks"][0]
        assert debugger.evaluate(session, frame, "self.input") == first_item["foreach"][0].split("=")[1]
    finally:
        debugger.close()
    whole = _result(ask("debug", path="parameters_flow.py", source=(workspace / "parameters_flow.py").read_text()))
    assert whole["configuration"]["args"] == ["run"] and whole["task"] is None
    never_ran = _result(ask("debug", path="parameters_flow.py", source=(workspace / "parameters_flow.py").read_text(),
                            step="start"))  # fmt: skip
    assert never_ran["task"] is None and never_ran["configuration"]["args"] == ["run"]
    elsewhere = ask("debug", path="foreach_flow.py", source=source, step="square", task=task.replace("square", "start"))
    assert elsewhere["error"]["message"].startswith("params.task: ")
    unknown = ask("debug", path="foreach_flow.py", source=source, step="nope")["error"]
    assert unknown["message"].startswith("params.step: 'nope' is not a step of ForeachFlow")


def test_the_form_types_each_parameter_as_its_value_will_be_converted(ask) -> None:
    source = """from metaflow import FlowSpec, IncludeFile, JSONType, Parameter, step


class FormFlow(FlowSpec):
    alpha = Parameter("alpha", default=0.5, type=float, help="the rate")
    count = Parameter("count", default=4)
    big = Parameter("big", default=1_000)
    loud = Parameter("loud", default=False)
    who = Parameter("who", default="world")
    config = Parameter("config", default="{}", type=JSONType)
    must = Parameter("must", required=True)
    data = IncludeFile("data")

    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass
"""
    form = _result(ask("form", path="form_flow.py", source=source))
    assert form["flow"] == "FormFlow"
    assert [(f["name"], f["type"], f["required"]) for f in form["fields"]] == [
        ("alpha", "float", False), ("count", "int", False), ("big", "int", False), ("loud", "bool", False),
        ("who", "str", False), ("config", "JSONType", False), ("must", "str", True),
    ]  # fmt: skip
    assert (form["fields"][0]["placeholder"], form["fields"][0]["help"]) == ("0.5", "the rate")


def test_the_launcher_offers_backends_with_their_fixes(ask) -> None:
    backends = {b["name"]: b for b in _result(ask("backends"))}
    assert list(backends) == ["local", "worker_pool", "devcontainer", "nomad", "kubernetes"]
    assert backends["local"]["usable"] and backends["local"]["decorator"] is None
    for backend in backends.values():
        assert backend["usable"] or backend["fix"], backend  # not usable here: then it says how to fix it


def test_a_run_launched_from_the_forms_text_values(ask, workspace: Path) -> None:
    done = run_cli_module(workspace, "parameters_flow.py", "--param", "alpha=0.7", "--param", "loud=true",
                          "--param", 'config={"layers": [3]}', "--param", "who=", env=ENV)  # fmt: skip
    events = [json.loads(line) for line in done.stdout.splitlines()]  # every line an event
    assert done.returncode == 0, done.stderr[-2000:]
    assert events[0]["event"] == "started" and events[-1] == {
        "event": "finished",
        "status": "successful",
        "returncode": 0,
    }
    assert any(e["event"] == "output" and "Done!" in e["line"] for e in events)
    (start,) = _result(ask("tasks", run=events[0]["run"], step="start"))["tasks"]
    values = [
        _result(ask("preview", task=start["pathspec"], name=name))["preview"]
        for name in ("scaled", "greeting", "layers")
    ]
    assert values == ["7.0", "'HELLO WORLD'", "[3]"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--param", "alpha=fast"), "parameters.alpha: 'fast' is not a float"),
        (("--param", "loud=perhaps"), "parameters.loud: 'perhaps' is not true or false"),
        (("--param", "nope=1"), "parameters.nope: is not a parameter of the flow"),
        (("--param", "alpha"), "--param: 'alpha' is not NAME=VALUE"),
        (("--backend", "moon"), "backend: 'moon' is not one of local"),
        (("--param", "config=" + "[" * 100_000), "parameters.config: '[[[["),
    ],
)
def test_a_launch_the_flow_cannot_take_is_one_line_before_anything_runs(workspace: Path, args, says: str) -> None:
    done = run_cli_module(workspace, "parameters_flow.py", *args, env=ENV)
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout
    assert says in done.stdout + done.stderr


def run_cli_module(workspace: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m metaflow_stack.ide launch ...`` as the extension starts it, from the workspace."""
    return subprocess.run(
        [sys.executable, "-m", "metaflow_stack.ide", "launch", *args],
        cwd=workspace,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_cli_lists_flows_for_scripts(workspace: Path) -> None:
    listed = run_cli("agent", "flows", "--json", cwd=workspace, env=ENV)
    assert listed.returncode == 0, listed.stderr
    assert [f["name"] for f in json.loads(listed.stdout.splitlines()[-1])["flows"]][-1] == "CardFlow"


def test_a_whole_value_opened_on_demand_stops_at_its_budget() -> None:
    from metaflow_stack.datastore.previews import MAX_FULL_CHARS, render

    shared = [[list(range(1000))] * 1000] * 50  # a few KB pickled, 50 million numbers shown whole
    started = time.monotonic()
    shown = render(shared, full=True)
    assert time.monotonic() - started < 5 and len(shown) < MAX_FULL_CHARS
    assert shown.startswith("# too large to show whole") and "[[[0, 1, 2" in shown
    assert render({"a": list(range(30))}, full=True) == repr({"a": list(range(30))})


def test_damaged_files_are_answered_and_the_helper_serves_on(ask, workspace: Path) -> None:
    """Last in this module: it damages the workspace's datastore."""
    half = workspace / ".metaflow" / "HalfFlow" / "_meta"
    half.mkdir(parents=True)
    (half / "_self.json").write_text('{"flow_id": ')  # a first run still writing it
    assert "HalfFlow" not in [f["name"] for f in _result(ask("flows"))["flows"]]
    (run,) = _result(ask("runs", flow="ForeachFlow"))["runs"]
    (join,) = _result(ask("tasks", run=run["pathspec"], step="join"))["tasks"]
    (values,) = [a for a in _result(ask("artifacts", task=join["pathspec"]))["artifacts"] if a["name"] == "values"]
    blob = workspace / ".metaflow" / "ForeachFlow" / "data" / values["sha"][:2] / values["sha"]
    blob.write_bytes(b"not gzip at all")
    shown = _result(ask("preview", task=join["pathspec"], name="values"))["preview"]
    assert shown.startswith("(not readable: the value") and "cannot be read" in shown
    assert _result(ask("flows"))["flows"]  # still answering
