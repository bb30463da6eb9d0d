"""What the editor asks of the runtime: a flow's graph from its source, never running it, the same graph
Metaflow itself records when it runs the file (``output-raw``), for every flow of the flow suite; a
half-written buffer refused in one line naming its line; the helper process answering JSON lines, bad ones
included, and nothing else on its stdout."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT, json_stdout, run_cli

from metaflow_stack.errors import InvalidInput
from metaflow_stack.ide import serve as serve_module
from metaflow_stack.ide.graph import flow_graph

FLOWS = sorted((PROJECT / "tests" / "flow_suite" / "flows").glob("*_flow.py"))
BRANCHING = """from metaflow import FlowSpec, Parameter, card, retry, step


class ShapeFlow(FlowSpec):
    \"\"\"Every shape.\"\"\"

    alpha = Parameter("alpha", default=0.5, type=float, help="the rate")

    @step
    def start(self):
        self.next(self.a, self.b)

    @card
    @step
    def a(self):
        self.next(self.join)

    @retry(times=2)
    @step
    def b(self):
        self.items = [1, 2]
        self.next(self.each, foreach="items")

    @step
    def each(self):
        self.next(self.gather)

    @step
    def gather(self, inputs):
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    raise SystemExit("never run by the graph")
"""


def _recorded(path: Path) -> dict:
    """Metaflow's own graph of the file, from running ``python FILE output-raw --json`` (which imports it)."""
    done = subprocess.run(
        [sys.executable, str(path), "--quiet", "output-raw", "--json"], capture_output=True, text=True, cwd=path.parent
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["graph"]


@pytest.mark.parametrize("path", FLOWS, ids=[p.stem for p in FLOWS])
def test_the_graph_from_source_is_the_one_metaflow_records(path: Path) -> None:
    ours = flow_graph(path.read_text(), str(path))
    theirs = _recorded(path)
    assert list(ours["steps"]) == list(theirs)  # the same steps, in the order they run
    for name, step in theirs.items():
        drawn = ours["steps"][name]
        assert (drawn["type"], drawn["next"], drawn["line"]) == (step["type"], step["next"], step["line"]), name
        assert drawn["matching_join"] == step.get("matching_join") and drawn["doc"] == (step["doc"] or None)
        assert drawn["foreach_artifact"] == step.get("foreach_artifact")
        assert sorted(drawn["decorators"]) == sorted(d["name"] for d in step["decorators"]), name


def test_every_shape_its_badges_and_parameters_without_running_the_file() -> None:
    graph = flow_graph(BRANCHING, "shape_flow.py")
    steps = graph["steps"]
    assert list(steps) == ["start", "a", "b", "each", "gather", "join", "end"]
    assert steps["start"]["type"] == "split-static" and steps["start"]["matching_join"] == "join"
    assert steps["b"]["type"] == "split-foreach" and steps["b"]["foreach_artifact"] == "items"
    assert [name for name, step in steps.items() if step["inside_foreach"]] == ["each"]
    assert steps["a"]["decorators"] == ["card"] and steps["b"]["decorators"] == ["retry"]
    (alpha,) = graph["parameters"]
    assert (alpha["name"], alpha["default"], alpha["type"], alpha["help"]) == ("alpha", "0.5", "float", "the rate")
    assert graph["doc"] == "Every shape."


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("from metaflow import FlowSpec\nclass F(FlowSpec):\n    def start(self", "line 3: '(' was never closed"),
        ("x = 1\n", "defines no FlowSpec class"),
    ],
)
def test_a_half_written_buffer_is_one_line_naming_where(source: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says.replace("(", r"\(")):
        flow_graph(source, "buffer.py")


def diamonds(count: int) -> str:
    """A flow of ``count`` branch-and-join pairs in a row: each doubles the paths from ``start``."""
    steps = ["    @step\n    def start(self):\n        self.next(self.a0, self.b0)\n"]
    for n in range(count):
        after = f"self.a{n + 1}, self.b{n + 1}" if n + 1 < count else "self.end"
        steps.append(f"    @step\n    def a{n}(self):\n        self.next(self.j{n})\n")
        steps.append(f"    @step\n    def b{n}(self):\n        self.next(self.j{n})\n")
        steps.append(f"    @step\n    def j{n}(self, inputs):\n        self.next({after})\n")
    steps.append("    @step\n    def end(self):\n        pass\n")
    return "from metaflow import FlowSpec, step\nclass D(FlowSpec):\n" + "".join(steps)


def test_a_flow_whose_paths_double_with_each_branch_is_refused_not_walked_for_hours() -> None:
    """Metaflow's graph walks every path from ``start``: 20 branch-and-join pairs in 5 KB of source took 11 s,
    40 would take days. Past ``MAX_VISITS`` the editor is told so at once; a flow of a few is drawn."""
    assert flow_graph(diamonds(5), "d.py")["steps"]["j4"]["type"] == "join"
    started = time.monotonic()
    with pytest.raises(InvalidInput, match="paths through its steps"):
        flow_graph(diamonds(40), "d.py")
    assert time.monotonic() - started < 5


def test_a_step_with_nowhere_to_go_is_drawn_and_marked() -> None:
    source = BRANCHING.replace("        self.next(self.gather)\n", "        pass\n")
    steps = flow_graph(source, "shape_flow.py")["steps"]
    assert steps["each"]["invalid_next"] and not steps["gather"]["reachable"]


def test_the_cli_prints_the_graph_and_errors_as_json(tmp_path: Path) -> None:
    path = tmp_path / "shape_flow.py"
    path.write_text(BRANCHING)
    assert json_stdout(run_cli("ide", "graph", str(path), "--json"))["flow"] == "ShapeFlow"
    path.write_text("class")
    refused = run_cli("ide", "graph", str(path), "--json")
    assert refused.returncode == 1 and json_stdout(refused)["error"]["code"] == "bad_parameter"


def test_the_helper_process_answers_json_lines_and_nothing_else(tmp_path: Path) -> None:
    requests = [
        {"id": 1, "method": "graph", "params": {"path": "shape_flow.py", "source": BRANCHING}},
        "not json",
        {"id": 2, "method": "delete_everything", "params": {}},
        {"id": 3, "method": "graph", "params": {"path": "x.py", "source": "class"}},
        {"id": 4, "method": "graph", "params": {"path": "x.py", "source": "x" * (9 * 1024 * 1024)}},
        {"id": 5, "method": "graph", "params": {"path": "shape_flow.py", "source": BRANCHING}},
        '{"id": 6, "method": "graph", "params": {"x": ' + "[" * 5000 + "]" * 5000 + "}}",  # (ended the helper)
        {"id": 7, "method": "graph", "params": {"path": "x.py", "source": "x = [" + "0," * 300_000 + "]"}},
        {"id": 8, "method": "graph", "params": {"path": "shape_flow.py", "source": BRANCHING}},
    ]
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests)
    done = subprocess.run(
        [sys.executable, "-m", "metaflow_stack.ide", "serve"], input=lines, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.splitlines()]  # every line JSON: no banner
    assert [a["id"] for a in answers] == [1, None, 2, 3, None, 5, None, 7, 8]
    assert answers[0]["result"]["flow"] == "ShapeFlow" and answers[5]["result"] == answers[0]["result"]
    assert "nested too deeply" in answers[6]["error"]["message"] and answers[8]["result"] == answers[0]["result"]
    assert answers[7]["error"]["message"].startswith("params.source: ")  # (over 512 KiB: never parsed)
    assert "is not JSON" in answers[1]["error"]["message"]
    assert answers[2]["error"]["message"].startswith("method: ")
    assert answers[3]["error"]["code"] == "bad_parameter" and "line 1" in answers[3]["error"]["message"]
    assert "longer than" in answers[4]["error"]["message"]


def _foreach(value: str) -> str:
    return BRANCHING.replace('foreach="items"', f"foreach={value}")


@pytest.mark.parametrize("written", ['b"items"', "...", "1e999", "1j", "1"])
def test_a_foreach_that_is_not_a_name_draws_no_artifact(written: str) -> None:
    """Metaflow's parser keeps whatever constant ``foreach=`` was given; only a name is drawn (and is JSON)."""
    drawn = flow_graph(_foreach(written), "shape_flow.py")["steps"]["b"]
    assert drawn["type"] == "split-foreach" and drawn["foreach_artifact"] is None
    assert json.loads(json.dumps(drawn, allow_nan=False)) == drawn


def test_the_helper_serves_on_past_odd_constants_and_numbers_too_long_to_read() -> None:
    requests = [
        json.dumps({"id": 1, "method": "graph", "params": {"path": "f.py", "source": _foreach('b"x"')}}),
        json.dumps({"id": 2, "method": "graph", "params": {"path": "f.py", "source": _foreach("...")}}),
        json.dumps({"id": 3, "method": "graph", "params": {"path": "f.py", "source": _foreach("1e999")}}),
        '{"id": 4, "method": "graph", "params": {"limit": ' + "9" * 5000 + "}}",  # (ended the helper)
        json.dumps({"id": 5, "method": "graph", "params": {"path": "shape_flow.py", "source": BRANCHING}}),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "metaflow_stack.ide", "serve"],
        input="".join(line + "\n" for line in requests),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    strict = {"NaN": None, "Infinity": None, "-Infinity": None}
    answers = [json.loads(line, parse_constant=lambda word: strict[word]) for line in done.stdout.splitlines()]
    assert [a["id"] for a in answers] == [1, 2, 3, None, 5]
    assert [a["result"]["steps"]["b"]["foreach_artifact"] for a in answers[:3]] == [None, None, None]
    assert "number too long" in answers[3]["error"]["message"]
    assert answers[4]["result"]["steps"]["b"]["foreach_artifact"] == "items"


def test_an_answer_that_is_not_json_is_an_internal_error_and_the_helper_serves_on(monkeypatch) -> None:
    """Whatever a method returns, each answer is one line of strict JSON: never ``NaN``, never a crash."""
    monkeypatch.setitem(serve_module.METHODS, "backends", (serve_module.Nothing, lambda _, __: {"x": math.nan}))
    requests = io.BytesIO(b'{"id": 1, "method": "backends"}\n{"id": 2, "method": "backends"}\n')
    answers = io.StringIO()
    serve_module.serve(requests, answers)
    replies = [
        json.loads(line, parse_constant=lambda word: pytest.fail(word)) for line in answers.getvalue().splitlines()
    ]
    assert [(r["id"], r["error"]["code"]) for r in replies] == [(1, "internal_error"), (2, "internal_error")]
