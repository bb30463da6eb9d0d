"""``metaflow stack ci report``: real pytest JUnit files from two backends in, one table and a check run out.

The JUnit files come from real pytest runs of a small test module that
records what the flow-test plugin records. The check run is posted to a
double of GitHub's check-runs API (``tests/github_double``) that validates
every request against githubkit's models of GitHub's OpenAPI description.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from devservers import github_double

from metaflow_stack.ci import check_runs, results
from metaflow_stack.ci.results import Outcome
from metaflow_stack.errors import InvalidInput

_SHA = "a" * 40
_TESTS = """
import os

import pytest

BACKEND = os.environ["FLOW_BACKEND"]


@pytest.fixture(autouse=True)
def _backend(record_property):
    record_property("metaflow_backend", BACKEND)


def test_passes(record_property):
    record_property("metaflow_test", "test_passes")


@pytest.mark.parametrize("n", range(int(os.environ.get("FLOW_FAILURES", "1"))))
def test_branches_join(n, record_property):
    record_property("metaflow_test", f"test_branches_join[{n}]")
    record_property("metaflow_run", f"BranchFlow/{100 + n}")
    record_property("metaflow_flow_file", "examples/branch_flow.py")
    record_property("metaflow_flow_line", "12")
    assert BACKEND != "devcontainer", "the join saw the wrong branch"


def test_needs_a_cluster():
    pytest.skip("kind is not installed")
"""


def _junit(folder: Path, backend: str, failures: int = 1) -> Path:
    """A JUnit file from a real pytest run of ``_TESTS`` as ``backend``."""
    module = folder / "test_flows.py"
    module.write_text(_TESTS)
    out = folder / f"{backend}.xml"
    env = {"FLOW_BACKEND": backend, "FLOW_FAILURES": str(failures), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module), f"--junit-xml={out}"]
    subprocess.run(command, cwd=folder, env=env, capture_output=True, timeout=120)
    assert out.is_file()
    return out


def test_two_backends_make_one_table_with_each_failure_and_its_run(tmp_path: Path) -> None:
    local, devcontainer = _junit(tmp_path, "local"), _junit(tmp_path, "devcontainer")
    summary, merged, requests = tmp_path / "summary.md", tmp_path / "all.xml", tmp_path / "requests.json"
    result = run_cli(
        *("stack", "ci", "report", str(local), str(devcontainer), "--ui-url", "http://127.0.0.1:8080/"),
        *("--junit-out", str(merged), "--requests-out", str(requests)),
        env={"GITHUB_STEP_SUMMARY": str(summary), "GITHUB_SHA": _SHA},
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout[result.stdout.index("## Flow tests") :]
    assert report.startswith("## Flow tests: 1 failed, 3 passed, 2 skipped on 2 backend(s)\n")
    for row in (
        "| test | local | devcontainer |",
        "| test_passes | ✅ | ✅ |",
        "| test_branches_join[0] | ✅ | ❌ |",
        "| test_flows.test_needs_a_cluster | ⏭️ | ⏭️ |",
        "**local**: 2 passed, 1 skipped · **devcontainer**: 1 failed, 1 passed, 1 skipped",
        "### ❌ `test_branches_join[0]` on devcontainer (`examples/branch_flow.py:12`)",
        "AssertionError: the join saw the wrong branch",
        "- http://127.0.0.1:8080/BranchFlow/100",
        "- `metaflow agent failures BranchFlow/100`",
    ):
        assert row in report
    assert summary.read_text() == report

    every = results.read([merged])
    assert len(every) == 6 and {o.backend for o in every} == {"local", "devcontainer"}

    sent = json.loads(requests.read_text())
    assert sent["updates"] == []
    create = sent["create"]
    assert (create["head_sha"], create["status"], create["conclusion"]) == (_SHA, "completed", "failure")
    (note,) = create["output"]["annotations"]
    assert note["path"] == "examples/branch_flow.py" and note["start_line"] == note["end_line"] == 12
    assert note["title"] == "test_branches_join[0] on devcontainer"
    assert "http://127.0.0.1:8080/BranchFlow/100" in note["message"]
    assert "metaflow agent failures BranchFlow/100" in note["message"]


def test_a_check_run_of_many_failures_is_posted_fifty_annotations_a_request(tmp_path: Path) -> None:
    junit = _junit(tmp_path, "devcontainer", failures=120)
    record = tmp_path / "requests.jsonl"
    with github_double("ghs_test", record) as api:
        env = {
            "GITHUB_TOKEN": "ghs_test",
            "GITHUB_REPOSITORY": "example/metaflow-stack",
            "GITHUB_SHA": _SHA,
            "GITHUB_API_URL": api,
        }
        result = run_cli("stack", "ci", "report", str(junit), "--check-run", "flow tests", env=env)
        refused = run_cli(
            "stack", "ci", "report", str(junit), "--check-run", "flow tests", env={**env, "GITHUB_TOKEN": "ghs_other"}
        )
    assert result.returncode == 0, result.stderr
    assert "check run 1 posted with 3 request(s)" in result.stderr
    sent = [json.loads(line) for line in record.read_text().splitlines()]
    accepted = [r for r in sent if r["status"] in (200, 201)]
    assert [(r["method"], r["path"]) for r in accepted] == [
        ("POST", "/repos/example/metaflow-stack/check-runs"),
        ("PATCH", "/repos/example/metaflow-stack/check-runs/1"),
        ("PATCH", "/repos/example/metaflow-stack/check-runs/1"),
    ]
    assert [len(r["body"]["output"]["annotations"]) for r in accepted] == [50, 50, 20]
    assert accepted[0]["body"]["name"] == "flow tests"
    titles = [a["title"] for r in accepted for a in r["body"]["output"]["annotations"]]
    assert titles == [f"test_branches_join[{n}] on devcontainer" for n in range(120)]

    assert refused.returncode == 1
    assert "error: creating the check run failed: GitHub answered 401 Bad credentials" in refused.stderr
    assert "fix: the token is not valid" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_requests_follow_githubs_description_and_limits() -> None:
    many = [Outcome(test=f"t{n}" * 400, backend="local", status="passed") for n in range(300)]
    run = check_runs.check_run(many, name="flow tests", head_sha=_SHA)
    assert len(run.create["output"]["summary"]) <= check_runs.MAX_TEXT
    assert run.create["output"]["summary"].endswith("the whole report is in the workflow run's summary)")
    assert run.create["conclusion"] == "success"

    bad_level = json.loads(json.dumps(run.create))
    bad_level["output"]["annotations"] = [
        {"path": "f.py", "start_line": 1, "end_line": 1, "annotation_level": "fatal", "message": "m"}
    ]
    with pytest.raises(InvalidInput, match=r"output\.annotations\.0\.annotation_level"):
        check_runs.validate(bad_level, update=False)
    unknown = {"output": {"title": "t", "summary": "s", "colour": "red"}}
    with pytest.raises(InvalidInput, match=r"output\.colour: is not a field"):
        check_runs.validate(unknown, update=True)
    check_runs.validate({"output": {"title": "t", "summary": "s"}}, update=True)


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    not_xml = tmp_path / "notes.xml"
    not_xml.write_text("{not xml")
    junit = _junit(tmp_path, "local")
    for args, env, expected in (
        ((str(tmp_path / "missing.xml"),), {}, "missing.xml: cannot be read"),
        ((str(not_xml),), {}, "notes.xml: is not JUnit XML"),
        ((str(junit), "--check-run", "x"), {"GITHUB_SHA": ""}, "error: posting a check run needs GITHUB_SHA"),
    ):
        result = run_cli("stack", "ci", "report", *args, env=env)
        assert result.returncode == 1, result.stdout
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
