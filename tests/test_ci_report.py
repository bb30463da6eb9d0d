"""``metaflow stack ci report``: real pytest JUnit files from two backends in, one table and a check run out.

The JUnit files come from real pytest runs of a small test module that
records what the flow-test plugin records. The check run is posted to a
double of GitHub's check-runs API (``tests/github_double``) that validates
every request against githubkit's models of GitHub's OpenAPI description.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import run_cli
from devservers import github_double
from markdown_it import MarkdownIt

from metaflow_stack.ci import check_runs, report, results
from metaflow_stack.ci.results import Outcome
from metaflow_stack.errors import InvalidInput, StackError

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
    assert len(run.create["output"]["summary"].encode()) <= check_runs.MAX_TEXT
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


def _cases_file(folder: Path, name: str, cases: str) -> Path:
    """A JUnit file of ``cases`` (testcase elements), as another test runner may write one."""
    path = folder / name
    path.write_text(
        f'<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="s">{cases}</testsuite></testsuites>'
    )
    return path


def test_a_junit_file_declaring_a_doctype_is_refused_before_its_entities_are_read(tmp_path: Path) -> None:
    """Python's XML parser expands the entities a DOCTYPE declares: a few MB of references would be GBs."""
    declared = tmp_path / "declared.xml"
    declared.write_text(
        '<?xml version="1.0"?>\n<!-- written by a tool -->\n'
        f'<!DOCTYPE testsuite [<!ENTITY big "{"A" * 1000}">]>\n'
        '<testsuite name="s"><testcase classname="t" name="test_a">'
        '<failure message="&big;&big;"/></testcase></testsuite>'
    )
    result = run_cli("stack", "ci", "report", str(declared))
    assert result.returncode == 1, result.stdout
    assert "declared.xml: declares a document type (<!DOCTYPE>), which JUnit XML never has" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_case_without_a_class_name_is_reported_by_its_name(tmp_path: Path) -> None:
    failing = '<failure message="boom">trace</failure>'
    cases = _cases_file(
        tmp_path,
        "cases.xml",
        f'<testcase name="test_a">{failing}</testcase><testcase classname="." name="test_b">{failing}</testcase>'
        f'<testcase classname="/" name="test_c">{failing}</testcase>',
    )
    result = run_cli("stack", "ci", "report", str(cases), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("test_a", "test_b", "/.test_c"):
        assert f"| {name} | ❌ |" in result.stdout
        assert f"### ❌ `{name}` on cases\n" in result.stdout
    assert "None" not in result.stdout


def _markdown_outline(text: str) -> tuple[list[str], list[str], list[list[str]]]:
    """What a CommonMark reader with GitHub's tables shows of ``text``: its headings' text, its code blocks,
    its table rows' cells; it fails on any raw HTML (a comment hides what follows it)."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    assert not [t for t in tokens if t.type in ("html_block", "html_inline")], text
    for token in tokens:
        assert not [c for c in token.children or [] if c.type == "html_inline"], token.content
    headings = [tokens[i + 1] for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h3"]
    shown = [html.unescape("".join(c.content for c in h.children)) for h in headings]
    blocks = [t.content for t in tokens if t.type == "fence"]
    rows, row = [], None
    for token in tokens:
        if token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append(token.content)
        elif token.type == "tr_close":
            rows.append(row)
            row = None
    return shown, blocks, rows


def test_names_and_errors_from_junit_show_as_they_are_and_hide_no_failure() -> None:
    nasty = [
        Outcome("x`\n<!--", "local", "failed", message="m"),
        Outcome("test_f[<lambda>]", "a|b\r<!--", "failed", message="closes?\n   ```  \n<!--", path="t`.py", line=3),
        Outcome("test_g", "local", "failed", message="````` five\n~~~\n<script>", run="F/1"),
        Outcome("test_h", "local", "failed", message="the last one"),
    ]
    text = report.markdown(nasty, ui_url="http://ui/")
    headings, blocks, rows = _markdown_outline(text)
    assert headings == [
        "❌ x` <!-- on local",
        "❌ test_f[<lambda>] on a|b <!-- (t`.py:3)",
        "❌ test_g on local",
        "❌ test_h on local",
    ]
    assert blocks == [
        "m\n",
        "closes?\n   ```  \n<!--\n",
        "````` five\n~~~\n<script>\n",
        "the last one\n",
    ]
    assert len(rows) == 5 and all(len(cells) == 3 for cells in rows)  # the header and a row per test, 3 columns
    assert [html.unescape(cells[0]) for cells in rows[1:3]] == ["x` <!--", "test_f[<lambda>]"]
    assert "- `metaflow agent failures F/1`" in text


def test_a_name_or_a_title_shows_as_text_never_as_a_link_or_markup() -> None:
    """A test's name, a backend's and the report's ``--title`` come from whoever wrote the tests or the workflow:
    a ``[text](url)`` in one showed as a link to where its author chose, and a title could open an HTML
    comment that hid the whole report."""
    named = [Outcome("test_x[[docs](https://example.invalid/a)]", "local", "failed", message="m")]
    text = report.markdown(named, title="Flow tests <!-- [here](https://example.invalid/b)")
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    inline = [c for t in tokens for c in t.children or []]
    assert not [c for c in inline if c.type in ("link_open", "html_inline")], text
    assert not [t for t in tokens if t.type == "html_block"], text
    heading = next(tokens[i + 1] for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h2")
    assert html.unescape(heading.content).startswith("Flow tests <!-- [here](https://example.invalid/b): ")
    _, _, rows = _markdown_outline(text)
    assert html.unescape(rows[1][0]) == "test_x[[docs](https://example.invalid/a)]"


def test_a_report_stays_within_githubs_summary_limit_keeping_the_table(tmp_path: Path) -> None:
    """GitHub drops a step summary over 1 MiB whole: failures past the limit are counted, not shown."""
    line = "assert {'a': " + "x" * 2_000 + "} == {}"  # each failure: 6 such lines, 12 kB
    traceback = "&#10;".join([line] * 6)
    failing = "".join(
        f'<testcase classname="tests.test_x" name="test_{n}"><failure message="m">{traceback}</failure></testcase>'
        for n in range(600)
    )
    junit = _cases_file(tmp_path, "local.xml", failing)
    summary = tmp_path / "summary.md"
    result = run_cli("stack", "ci", "report", str(junit), env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.returncode == 0, result.stderr
    text = summary.read_text()
    assert len(text.encode()) <= report.MAX_REPORT_BYTES
    assert all(f"| tests.test_x.test_{n} | ❌ |" in text for n in range(600))
    shown = text.count("### ❌")
    assert 0 < shown < 600
    assert f"{600 - shown} more failure(s) left out: the report is cut at 1000000 bytes" in text
    assert max(len(line) for line in text.splitlines()) < report.MAX_LINE + 50


@pytest.fixture
def github(tmp_path: Path) -> Iterator[str]:
    """The GitHub double's address; it records requests to ``requests.jsonl`` in the test's folder."""
    with github_double("ghs_test", tmp_path / "requests.jsonl") as api:
        yield api


def _statuses(tmp_path: Path) -> list[int]:
    """The statuses the double answered to creates and updates, in order."""
    sent = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    return [r["status"] for r in sent if r["method"] != "GET"]


def _answers(api: str, *answers: dict) -> None:
    """Have the double give ``answers`` to the next requests, in order, before answering as GitHub does."""
    httpx.post(f"{api}/_double/answers", json=list(answers)).raise_for_status()


def _post(api: str, waits: list[float]) -> int:
    """Post a one-test check run to ``api``; each wait before a retry is recorded in ``waits``, not slept."""
    run = check_runs.check_run([Outcome("test_a", "local", "passed")], name="flow tests", head_sha=_SHA)
    return check_runs.post(run, repository="example/repo", token="ghs_test", api_url=api, wait=waits.append)


_SECONDARY = {"message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."}


def test_texts_are_cut_to_githubs_limit_in_bytes_not_characters(github: str) -> None:
    wide = [Outcome(f"тест_{n}_" + "ж" * 200, "local", "failed", message="ошибка " * 100) for n in range(400)]
    run = check_runs.check_run(wide, name="flow tests", head_sha=_SHA)
    output = run.create["output"]
    assert len(output["summary"].encode()) <= check_runs.MAX_TEXT
    assert len(output["text"].encode()) <= check_runs.MAX_TEXT
    assert check_runs.post(run, repository="example/repo", token="ghs_test", api_url=github) == 1


def test_githubs_reasons_for_a_refusal_are_shown_and_only_a_sha_error_blames_the_sha(github: str) -> None:
    too_big = {"field": "summary", "code": "custom", "message": "summary exceeds a maximum bytesize of 65535"}
    _answers(github, {"status": 422, "body": json.dumps({"message": "Validation Failed", "errors": [too_big]})})
    with pytest.raises(StackError) as refused:
        _post(github, [])
    assert "GitHub answered 422 Validation Failed: summary exceeds a maximum bytesize of 65535" in refused.value.message
    assert "--sha" not in str(refused.value.fix)
    _answers(github, {"status": 422, "body": json.dumps({"message": f"No commit found for SHA: {_SHA}"})})
    with pytest.raises(StackError) as no_commit:
        _post(github, [])
    assert str(no_commit.value.fix).startswith("check --sha")


def test_a_5xx_or_a_rate_limit_is_sent_again_after_the_wait_github_asks_for(tmp_path: Path, github: str) -> None:
    _answers(
        github,
        {"status": 502, "body": "<html>Bad gateway</html>", "headers": {"content-type": "text/html"}},
        {"status": 503, "body": ""},
        {"status": 403, "body": json.dumps(_SECONDARY), "headers": {"retry-after": "7"}},
    )
    waits: list[float] = []
    assert _post(github, waits) == 1
    assert waits == [1.0, 2.0, 7.0]
    assert _statuses(tmp_path) == [502, 503, 403, 201]


def test_a_create_github_did_behind_a_5xx_is_found_not_made_again(tmp_path: Path, github: str) -> None:
    """A proxy's 502 after GitHub made the check run: the client finds the run by the report's ``external_id``
    before sending the create again (sent again, the commit showed the check run twice)."""
    _answers(github, {"status": 502, "body": "<html>Bad gateway</html>", "done": True})
    waits: list[float] = []
    assert _post(github, waits) == 1 and waits == [1.0]
    sent = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [(r["method"], r["status"]) for r in sent] == [("POST", 502), ("GET", 200)]
    listed = httpx.get(
        f"{github}/repos/example/repo/commits/{_SHA}/check-runs",
        params={"check_name": "flow tests", "filter": "all"},
        headers={"Authorization": "Bearer ghs_test"},
    ).json()
    assert listed["total_count"] == 1


def test_an_update_github_did_behind_a_5xx_is_not_sent_again(tmp_path: Path, github: str) -> None:
    """An update appends its annotations: sent again after GitHub did it behind a 502, they showed twice. The
    client sends it again only if the run's annotation count says it was not done."""
    _answers(github, {"method": "PATCH", "status": 502, "body": "", "done": True})
    failures = [Outcome(f"test_{n}", "local", "failed", message="m", path="f.py", line=1) for n in range(120)]
    run = check_runs.check_run(failures, name="flow tests", head_sha=_SHA)
    waits: list[float] = []
    check_id = check_runs.post(run, repository="example/repo", token="ghs_test", api_url=github, wait=waits.append)
    assert _statuses(tmp_path) == [201, 502, 200] and waits == [1.0]
    shown = httpx.get(
        f"{github}/repos/example/repo/check-runs/{check_id}", headers={"Authorization": "Bearer ghs_test"}
    )
    assert shown.json()["output"]["annotations_count"] == 120


def test_a_rate_limit_that_outlasts_the_retries_says_to_wait_and_rerun(github: str) -> None:
    _answers(github, *[{"status": 403, "body": json.dumps(_SECONDARY)}] * (check_runs.RETRIES + 1))
    waits: list[float] = []
    with pytest.raises(StackError) as secondary:
        _post(github, waits)
    assert waits == [60.0] * check_runs.RETRIES
    assert "wait until it resets" in str(secondary.value.fix) and "checks: write" not in str(secondary.value.fix)

    in_an_hour = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(time.time()) + 3600)}
    _answers(github, {"status": 403, "body": '{"message": "API rate limit exceeded"}', "headers": in_an_hour})
    waits.clear()
    with pytest.raises(StackError) as primary:
        _post(github, waits)
    assert waits == [] and "then rerun the job" in str(primary.value.fix)


def test_an_answer_that_is_not_githubs_is_one_line_naming_github_api_url(tmp_path: Path, github: str) -> None:
    junit = _junit(tmp_path, "local")
    env = {
        "GITHUB_TOKEN": "ghs_test",
        "GITHUB_REPOSITORY": "example/repo",
        "GITHUB_SHA": _SHA,
        "GITHUB_API_URL": github,
    }
    page = {"status": 200, "body": "<html>sign in</html>", "headers": {"content-type": "text/html"}}
    no_id = {"status": 201, "body": '{"ok": true}', "headers": {"content-type": "application/json"}}
    for answer, expected in ((page, "with text/html, not GitHub's JSON"), (no_id, "answered without the run's id")):
        _answers(github, answer)
        result = run_cli("stack", "ci", "report", str(junit), "--check-run", "flow tests", env=env)
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr and "fix: check GITHUB_API_URL" in result.stderr
        assert "Traceback" not in result.stderr
