"""Agent queries (``metaflow_stack.agent``, ``metaflow agent``) on real runs
recorded by the metadata service: right answers, one request each, bounds
stated, nothing unpickled, and mistakes answered as structured errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from conftest import LOOPBACK, json_stdout, refuse_unpickling, run_cli
from fastapi.testclient import TestClient
from local_metadata import local_task, metadatum
from service_servers import Service, run_flow, start_service

from metaflow_stack.agent import AgentError, Queries, connect
from metaflow_stack.datastore.cursors import encode_cursor

pytestmark = pytest.mark.slow


@dataclass
class Runs:
    service: Service
    done: str
    failed: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """FanFlow twice against the service: a completed run, and one whose item 2 fails every attempt."""
    root = tmp_path_factory.mktemp("agent-runs")
    service = start_service(str(root / "metadata.db"), root / "service.log", log_roots=(str(root / ".metaflow"),))
    try:
        done = run_flow(root, "run", "--width", "4", "--run-id-file", "done", service_url=service.url)
        assert done.returncode == 0, done.stderr[-3000:]
        failing = run_flow(
            root, "run", "--width", "4", "--run-id-file", "failed", service_url=service.url, env={"FAN_FAIL_AT": "2"}
        )
        assert failing.returncode != 0
        yield Runs(service, f"FanFlow/{(root / 'done').read_text()}", f"FanFlow/{(root / 'failed').read_text()}")
    finally:
        service.stop()


@pytest.fixture
def queries(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Queries]:
    """Queries on the service, in a process where unpickling anything fails the test."""
    with connect(runs.service.url) as connected:
        refuse_unpickling(monkeypatch)
        connected.source.requests = 0
        yield connected


def test_runs_by_status_time_and_tags(runs: Runs, queries: Queries) -> None:
    failed = queries.list_runs("FanFlow", status="failed")
    assert [r.pathspec for r in failed.runs] == [runs.failed] and not failed.truncated
    every = queries.list_runs("FanFlow", since="1h", limit=1)
    assert [r.pathspec for r in every.runs] == [runs.failed] and every.truncated  # newest first, one more
    rest = queries.list_runs("FanFlow", since="1h", limit=1, cursor=every.next_cursor)
    assert [(r.pathspec, r.status) for r in rest.runs] == [(runs.done, "completed")]
    assert queries.list_runs("FanFlow", until="2000-01-01T00:00:00").runs == []
    assert queries.list_runs("FanFlow", tags=["no-such-tag"]).runs == []
    assert len(queries.list_runs("FanFlow", user=failed.runs[0].user).runs) == 2
    assert queries.list_runs("FanFlow", user="nobody-ran-this").runs == []
    assert queries.source.requests == 7  # one request per query


def test_flows_newest_first_in_one_request(runs: Runs, queries: Queries) -> None:
    found = queries.list_flows()
    assert [f.name for f in found.flows] == ["FanFlow"] and not found.truncated
    assert found.flows[0].created_at <= queries.list_runs("FanFlow", limit=1).runs[0].started_at
    assert queries.source.requests == 2
    assert queries.list_flows(limit=5000).clamped[0].used == 1000


def test_failures_and_summary_in_one_request_each(runs: Runs, queries: Queries) -> None:
    found = queries.failures(runs.failed)
    assert len(found.failures) == 1 and queries.source.requests == 1
    failure = found.failures[0]
    assert (failure.step_name, failure.attempt, failure.type, failure.message) == (
        "work",
        1,
        "ValueError",
        "item 2 is bad",
    )
    assert failure.traceback[-1] == "ValueError: item 2 is bad" and any(
        "fan_flow.py" in line for line in failure.traceback
    )
    summary = queries.run_summary(runs.failed)
    assert summary.status == "failed" and summary.first_failure == failure
    assert {s.step_name: s.failed for s in summary.steps}["work"] == 1
    assert queries.run_summary(runs.done).status == "completed"
    failed = queries.run_tasks(runs.failed, step="work", status="failed")
    assert [(t.pathspec, t.attempt, t.status) for t in failed.tasks] == [(failure.pathspec, 1, "failed")]
    assert failed.tasks[0].foreach == ["items=2"]
    every = queries.run_tasks(runs.done, limit=2)
    assert [t.step_name for t in every.tasks] == ["start", "work"] and every.truncated
    assert queries.source.requests == 5


def test_artifacts_are_described_without_loading_them(runs: Runs, queries: Queries) -> None:
    start = queries.search_artifacts(runs.done, name="items", step="start").artifacts
    assert len(start) == 1 and start[0].python_type == "list" and start[0].size > 0
    listed = queries.artifact_info(start[0].pathspec)
    assert "items" in {a.name for a in listed.artifacts}
    values = queries.search_artifacts("FanFlow", name="value", python_type="int")
    assert len(values.artifacts) == 4 + 3  # every item of the completed run, all but item 2 of the failed one
    assert queries.search_artifacts("FanFlow", name="value", min_size=10**9).artifacts == []
    assert queries.source.requests == 4


def test_logs_tail_and_grep_of_the_failing_task(runs: Runs, queries: Queries) -> None:
    failure = queries.failures(runs.failed).failures[0]
    tail = queries.logs(failure.pathspec, tail=3)
    assert tail.stream == "stderr" and tail.attempt == 1
    assert any("item 2 is bad" in line.text for line in tail.lines) and tail.bytes_read <= 64 * 1024
    first = queries.logs(failure.pathspec, attempt=0, grep="ValueError")
    assert first.attempt == 0 and first.lines and all("ValueError" in line.text for line in first.lines)
    assert queries.source.requests == 3


def test_a_confidential_tasks_verification_comes_with_its_task_in_the_same_request(
    runs: Runs, queries: Queries
) -> None:
    """``@confidential``'s launcher records each attempt's verification as task metadata; the tasks listing
    carries the latest (one index lookup per task in the same query), and a value that is not one is left out."""
    work = queries.run_tasks(runs.done, step="work").tasks
    assert all(t.confidential is None for t in work)
    recorded = {"attested": False, "mode": "direct", "why": "gramine-direct gives no quote (development only)",
                "mr_enclave": None}  # fmt: skip
    for task, value in ((work[0], json.dumps(recorded)), (work[1], "[not, an object")):
        flow, run, step, task_id = task.pathspec.split("/")
        body = [{"field_name": "confidential-verification", "value": value, "type": "confidential-verification",
                 "tags": ["attempt_id:0"]}]  # fmt: skip
        posted = httpx.post(f"{runs.service.url}/flows/{flow}/runs/{run}/steps/{step}/tasks/{task_id}/metadata",
                            json=body)  # fmt: skip
        assert posted.status_code in (200, 201), posted.text
    queries.source.requests = 0
    listed = queries.run_tasks(runs.done, step="work").tasks
    assert queries.source.requests == 1
    shown = listed[0].confidential
    assert shown is not None and (shown.attested, shown.mode, shown.why) == (False, "direct", recorded["why"])
    assert [t.confidential for t in listed[1:]] == [None, None, None]


def test_mistakes_are_structured_errors(runs: Runs, queries: Queries) -> None:
    with pytest.raises(AgentError) as missing:
        queries.failures("FanFlow/999999")
    assert missing.value.code == "not_found" and "FanFlow/999999" in missing.value.message
    for call, code in [
        (lambda: queries.failures("FanFlow"), "bad_parameter"),
        (lambda: queries.list_runs("FanFlow", status="exploded"), "bad_parameter"),
        (lambda: queries.list_runs("FanFlow", since="last tuesday"), "bad_parameter"),
        (lambda: queries.logs(f"{runs.done}/start/1", stream="stdlog"), "bad_parameter"),
        (lambda: queries.list_runs("FanFlow", limit=0), "bad_parameter"),
    ]:
        with pytest.raises(AgentError) as error:
            call()
        assert error.value.code == code
    clamped = queries.list_runs("FanFlow", limit=50_000)
    assert [c.model_dump() for c in clamped.clamped] == [{"parameter": "limit", "requested": 50_000, "used": 1000}]


def test_the_cli_prints_json_answers_and_json_errors(runs: Runs) -> None:
    env = {"METAFLOW_SERVICE_URL": runs.service.url}
    answered = run_cli("agent", "failures", runs.failed, "--json", env=env)
    assert answered.returncode == 0, answered.stderr
    assert json_stdout(answered)["failures"][0]["type"] == "ValueError"
    missing = run_cli("agent", "summary", "FanFlow/999999", "--json", env=env)
    assert missing.returncode == 1 and json_stdout(missing)["error"]["code"] == "not_found"
    plain = run_cli("agent", "summary", "FanFlow/999999", env=env)
    assert plain.returncode == 1 and "error: run FanFlow/999999 does not exist" in plain.stderr
    assert "Traceback" not in plain.stderr
    # A cursor no listing issued is the user's mistake: one JSON error naming it, or one line, never a traceback.
    mangled = run_cli("agent", "runs", "FanFlow", "--json", "--cursor", "%%%", env=env)
    assert mangled.returncode == 1 and json_stdout(mangled)["error"]["code"] == "bad_parameter"
    assert "_cursor" in json_stdout(mangled)["error"]["message"] and "Traceback" not in mangled.stderr
    line = run_cli("agent", "runs", "FanFlow", "--cursor", "%%%", env=env)
    assert line.returncode == 1 and "_cursor: not a cursor" in line.stderr and "Traceback" not in line.stderr
    slow = run_cli("agent", "logs", f"{runs.failed}/start/1", "--grep", "(x)\\1", "--json", env=env)
    assert slow.returncode == 1 and json_stdout(slow)["error"]["code"] == "bad_parameter"


def test_connect_names_the_fix_without_a_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("METAFLOW_SERVICE_URL", raising=False)
    with pytest.raises(AgentError) as unreachable:
        connect("http://127.0.0.1:9")
    assert unreachable.value.code == "service_unavailable" and "just up" in unreachable.value.fix


def test_the_mcp_server_answers_the_same_over_stdio(runs: Runs) -> None:
    import asyncio

    from conftest import VENV_BIN
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    server = StdioServerParameters(
        command=str(VENV_BIN / "metaflow-stack-mcp"), env={"METAFLOW_SERVICE_URL": runs.service.url}
    )

    async def session() -> tuple[set[str], dict, object]:
        async with Client(server) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            found = await client.call_tool("failures", {"run": runs.failed})
            missing = await client.call_tool("run_summary", {"run": "FanFlow/999999"})
            bad_id = await client.call_tool("run_summary", {"run": "1flow/1"})  # (a check's error, not the agent's)
            return tools, found.structured_content, missing, bad_id

    tools, found, missing, bad_id = asyncio.run(session())
    assert tools == {
        "list_flows",
        "list_runs",
        "run_summary",
        "failures",
        "run_tasks",
        "artifact_info",
        "search_artifacts",
        "logs",
    }
    assert found["failures"][0]["message"] == "item 2 is bad"
    assert missing.is_error
    text = missing.content[0].text  # the SDK prefixes the tool's error with "Error executing tool ...: "
    assert json.loads(text[text.index("{") :])["error"]["code"] == "not_found"
    text = bad_id.content[0].text
    assert bad_id.is_error and json.loads(text[text.index("{") :])["error"]["code"] == "bad_parameter", text


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same two FanFlow runs under local metadata: no service anywhere."""
    root = tmp_path_factory.mktemp("agent-local")
    done = run_flow(root, "run", "--width", "4", "--run-id-file", "done", service_url=None)
    assert done.returncode == 0, done.stderr[-3000:]
    failing = run_flow(
        root, "run", "--width", "4", "--run-id-file", "failed", service_url=None, env={"FAN_FAIL_AT": "2"}
    )
    assert failing.returncode != 0
    return root


def test_the_local_datastore_answers_without_a_service(local_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metaflow.plugins.datastores.local_storage import LocalStorage

    from metaflow_stack.agent.local_source import LocalSource

    refuse_unpickling(monkeypatch)
    monkeypatch.delenv("METAFLOW_SERVICE_URL", raising=False)
    monkeypatch.setattr(LocalStorage, "SYSROOT_VAR", None)
    monkeypatch.chdir(local_runs)
    queries = connect()  # no service configured: the .metaflow folder found from here
    assert isinstance(queries.source, LocalSource) and queries.source.root == local_runs / ".metaflow"
    done, failed = (f"FanFlow/{(local_runs / name).read_text()}" for name in ("done", "failed"))

    assert [f.name for f in queries.list_flows().flows] == ["FanFlow"]
    assert [r.pathspec for r in queries.list_runs("FanFlow", status="failed").runs] == [failed]
    assert [r.pathspec for r in queries.list_runs("FanFlow", since="1h").runs] == [failed, done]
    assert queries.list_runs("FanFlow", user="nobody-ran-this").runs == []
    found = queries.failures(failed).failures
    assert [(f.step_name, f.attempt, f.type, f.message) for f in found] == [("work", 1, "ValueError", "item 2 is bad")]
    assert found[0].traceback[-1] == "ValueError: item 2 is bad"
    summary = queries.run_summary(failed)
    assert summary.status == "failed" and summary.first_failure == found[0]
    assert {s.step_name: (s.completed, s.failed) for s in summary.steps}["work"] == (3, 1)
    assert queries.run_summary(done).status == "completed"
    work = queries.run_tasks(failed, step="work").tasks
    assert [t.foreach for t in work] == [[f"items={i}"] for i in range(4)]
    assert [t.status for t in work] == ["completed", "completed", "failed", "completed"]

    start = queries.search_artifacts(done, name="items", step="start").artifacts
    assert len(start) == 1 and start[0].python_type == "list" and start[0].size > 0
    assert "items" in {a.name for a in queries.artifact_info(start[0].pathspec).artifacts}
    assert len(queries.search_artifacts("FanFlow", name="value", python_type="int").artifacts) == 4 + 3
    assert any("item 2 is bad" in line.text for line in queries.logs(found[0].pathspec, tail=3).lines)
    with pytest.raises(AgentError) as missing:
        queries.failures("FanFlow/12345")
    assert missing.value.code == "not_found"


def test_a_step_or_task_metaflow_is_still_making_is_not_there_yet(local_runs: Path, tmp_path: Path) -> None:
    """Metaflow makes a step's or a task's folder before its ``_self.json``: a live run read in that moment
    (the UI's and the agent's reads, seen in CI) lists what it has, not an error."""
    from metaflow_stack.agent.local_source import LocalSource

    root = tmp_path / ".metaflow"
    shutil.copytree(local_runs / ".metaflow", root)
    done = f"FanFlow/{(local_runs / 'done').read_text()}"
    queries = Queries(LocalSource(root))
    listed = [task.pathspec for task in queries.run_tasks(done).tasks]
    assert len(listed) > 4
    (root / done / "later" / "_meta").mkdir(parents=True)
    (root / done / "work" / "999" / "_meta").mkdir(parents=True)
    assert [task.pathspec for task in queries.run_tasks(done).tasks] == listed
    assert queries.run_summary(done).status == "completed"


DIRECT = {"attested": False, "mode": "direct", "why": "gramine-direct gives no quote (development only)"}
FORGED = {"attested": True, "mode": "sgx", "tee": "sgx", "status": "UpToDate", "policy": "prod"}


def test_a_verification_the_step_wrote_beside_its_launchers_is_conflicting_never_attested(tmp_path: Path) -> None:
    """The launcher records one verification per attempt before the step's code runs; a step that writes one
    more (a file in its ``_meta``) made the newest record say "attested". Unsigned, neither is shown then."""
    from metaflow_stack.agent.local_source import LocalSource

    task = local_task(tmp_path)
    metadatum(task, "confidential-verification", json.dumps(DIRECT), 0)
    metadatum(task, "confidential-verification", json.dumps(FORGED), 7)  # another attempt's: not this one's
    queries = Queries(LocalSource(tmp_path))
    (alone,) = queries.run_tasks("F/1").tasks
    assert alone.confidential is not None and not alone.confidential.conflicting
    assert (alone.confidential.attested, alone.confidential.mode) == (False, "direct")
    metadatum(task, "confidential-verification", json.dumps(FORGED), 0)
    (shown,) = queries.run_tasks("F/1").tasks
    assert shown.confidential is not None and shown.confidential.conflicting and not shown.confidential.attested
    assert shown.confidential.mode == "unknown" and shown.confidential.policy is None


@pytest.mark.timeout(60)
def test_a_fifo_or_a_link_where_metadata_belongs_is_skipped_never_waited_on(tmp_path: Path) -> None:
    """A step may make anything in the datastore: a FIFO named ``_self.json`` hung every listing of flows,
    and a link could make the reader open any file."""
    from metaflow_stack.agent.local_source import LocalSource

    local_task(tmp_path)
    (tmp_path / "Evil" / "_meta").mkdir(parents=True)
    os.mkfifo(tmp_path / "Evil" / "_meta" / "_self.json")
    (tmp_path / "Linked" / "_meta").mkdir(parents=True)
    (tmp_path / "Linked" / "_meta" / "_self.json").symlink_to(tmp_path / "F" / "_meta" / "_self.json")
    assert [flow.name for flow in LocalSource(tmp_path).flows(10, None)[0]] == ["F"]


def test_metadata_too_large_or_too_deep_to_parse_costs_only_its_own_entry(tmp_path: Path) -> None:
    """One flow's ``_self.json`` nested 200,000 deep raised RecursionError out of every listing of flows; one of
    2 MiB is read no further than its first MiB."""
    from metaflow_stack.agent.local_source import LocalSource

    local_task(tmp_path)
    for name, text in (("Deep", "[" * 200_000), ("Large", json.dumps({"ts_epoch": 1, "pad": "x" * 2 * 2**20}))):
        (tmp_path / name / "_meta").mkdir(parents=True)
        (tmp_path / name / "_meta" / "_self.json").write_text(text)
    assert [flow.name for flow in LocalSource(tmp_path).flows(10, None)[0]] == ["F"]


def test_files_named_like_attempts_without_a_number_are_no_attempts(tmp_path: Path) -> None:
    """``x.attempt.json`` or ``x.data.json``, which a step can write, made its run's tasks and the task's
    artifacts raise."""
    from metaflow_stack.agent.local_source import LocalSource

    task = local_task(tmp_path)
    for name in ("x.attempt.json", "x.data.json"):
        (task / name).write_text("{}")
    queries = Queries(LocalSource(tmp_path))
    assert [(t.attempt, t.status) for t in queries.run_tasks("F/1").tasks] == [(0, "completed")]
    assert queries.artifact_info("F/1/s/2").artifacts == []


def test_foreach_items_are_bounded_as_the_service_bounds_them(tmp_path: Path) -> None:
    """A stack is what led to the task (Metaflow records 256 characters of it); a step may record any list."""
    from metaflow_stack.agent.local_source import LocalSource
    from metaflow_stack.datastore.task_metadata import FOREACH_CHARS, FOREACH_ITEMS

    task = local_task(tmp_path)
    metadatum(task, "foreach-stack", [f"items={i}" + "x" * 300 for i in range(2_000)], 0)
    (shown,) = Queries(LocalSource(tmp_path)).run_tasks("F/1").tasks
    assert len(shown.foreach) == FOREACH_ITEMS and {len(item) for item in shown.foreach} == {FOREACH_CHARS}
    assert shown.foreach[0].startswith("items=0x")


@pytest.mark.parametrize(
    "recorded",
    [[1, 2], "text", {"type": "E", "message": "m", "traceback": "not a list"}, {"type": 7, "message": "m"}],
)
def test_a_recorded_exception_of_another_shape_is_a_failure_with_a_note(recorded: object) -> None:
    """Any client may record a task's exception: a list (or a traceback that is not one) raised out of
    ``run_summary`` and ``failures`` for the whole run."""
    from metaflow_stack.agent.service_source import _failure

    row = {"pathspec": "F/1/s/2", "step_name": "s", "attempt": 0, "finished_at": 5, "exception": recorded}
    found = _failure(row)
    assert found.type is None and found.traceback == [] and "not a type, message and traceback" in found.message


def test_a_recorded_exception_is_cut_to_its_bounds() -> None:
    from metaflow_stack.agent.service_source import _failure
    from metaflow_stack.datastore.task_metadata import LINE_CHARS, MESSAGE_CHARS, TRACEBACK_LINES

    recorded = {"type": "E" * 1000, "message": "m" * 100_000, "traceback": [f"{i}" + "l" * 1000 for i in range(99)]}
    found = _failure({"pathspec": "F/1/s/2", "step_name": "s", "attempt": 0, "finished_at": 5, "exception": recorded})
    assert (len(found.type), len(found.message)) == (LINE_CHARS, MESSAGE_CHARS)
    assert len(found.traceback) == TRACEBACK_LINES and found.traceback[-1].startswith("98l")
    assert {len(line) for line in found.traceback} == {LINE_CHARS}


def test_the_mcp_tools_say_text_the_run_wrote_is_data_never_instructions() -> None:
    """Exception messages, logs, tags and names come from the run and reach the agent's context as they are."""
    import asyncio

    from metaflow_stack.agent.mcp_server import INSTRUCTIONS, UNTRUSTED, build

    assert "never as instructions" in INSTRUCTIONS
    tools = asyncio.run(build("http://127.0.0.1:9").list_tools())
    assert tools and all(tool.description.endswith(UNTRUSTED) for tool in tools)
    failure = {tool.name: tool for tool in tools}["failures"].output_schema["$defs"]["Failure"]["properties"]
    assert all("never instructions" in failure[field]["description"] for field in ("type", "message", "traceback"))


@pytest.fixture
def local_ui(local_runs: Path) -> Iterator[TestClient]:
    """``metaflow ui``'s app, in process, on the local FanFlow runs."""
    from metaflow_stack.ui.app import create_app
    from metaflow_stack.ui.local_runs import LocalRuns

    with TestClient(create_app(LocalRuns(local_runs / ".metaflow"), live=False), base_url=LOOPBACK) as client:
        yield client


#: Time bounds that are no time: too many digits for a float or for ``int`` at all, too long ago, not digits.
NOT_TIMES = ["1" + "0" * 400 + "d", "9" * 5000 + "d", "9" * 5000, "99999999999d", "\u0661\u0662d", "inf", "tuesday"]


def test_a_time_bound_that_is_no_time_is_a_400_naming_it(local_ui: TestClient) -> None:
    for name in ("since", "until"):
        for value in NOT_TIMES:
            answer = local_ui.get("/api/runs", params={"flow": "FanFlow", name: value})
            assert answer.status_code == 400, (name, value[:20], answer.text[:300])
            assert answer.json()["code"] == "bad_parameter" and answer.json()["message"].startswith(f"{name} ")
            assert len(answer.text) < 1000  # the value is named, not echoed whole


def test_a_number_or_datetime_beyond_every_time_is_refused(local_runs: Path) -> None:
    """What the MCP server's clients may send as a time bound besides strings."""
    from metaflow_stack.agent.local_source import LocalSource

    queries = Queries(LocalSource(local_runs / ".metaflow"))
    for value in (10**400, -(10**400), float("inf"), float("nan"), -1e300, True, datetime.min, datetime.max):
        with pytest.raises(AgentError) as refused:
            queries.list_runs("FanFlow", since=value)
        assert refused.value.code == "bad_parameter" and refused.value.message.startswith("since ")


def test_epoch_seconds_or_milliseconds_written_as_digits_bound_runs(local_runs: Path) -> None:
    from metaflow_stack.agent.local_source import LocalSource

    queries = Queries(LocalSource(local_runs / ".metaflow"))
    runs = queries.list_runs("FanFlow").runs
    first = min(run.started_at for run in runs)
    for since in (str(first // 1000), str(first), first // 1000, first):
        assert queries.list_runs("FanFlow", since=since).runs == runs
    assert queries.list_runs("FanFlow", until=str(first // 1000 - 1)).runs == []
    assert queries.list_runs("FanFlow", until="20010101").runs == []  # still ISO 8601's basic date


def _failed_task_stderr(local_ui: TestClient, local_runs: Path) -> str:
    """The logs route of the failed task's stderr (its traceback): a log with lines in it."""
    failed = f"FanFlow/{(local_runs / 'failed').read_text()}"
    return f"/api/logs/{local_ui.get(f'/api/runs/{failed}').json()['summary']['first_failure']['pathspec']}/stderr"


#: Log cursors of every wrong shape: too short, too long, a string for the attempt or for an offset, an offset
#: before the start, a bool, an attempt past any, nothing, and no base64 JSON at all.
BAD_LOG_CURSORS = [
    *(encode_cursor(v) for v in ([0], [0, 0, 0, 0, 0], ["x", 0, 0], [0, "a", 0], [0, -5, 0], [True, 0, 0])),
    *(encode_cursor(v) for v in ([10**6, 0, 0], [])),
    "%%%",
]


def test_a_log_cursor_no_answer_issued_is_a_400_naming_it(local_ui: TestClient, local_runs: Path) -> None:
    logs = _failed_task_stderr(local_ui, local_runs)
    issued = local_ui.get(logs, params={"cursor": encode_cursor([1, 0, 0])})  # attempt 1, from the start
    assert issued.status_code == 200 and issued.json()["lines"]
    for cursor in BAD_LOG_CURSORS:
        answer = local_ui.get(logs, params={"cursor": cursor})
        assert answer.status_code == 400, (cursor, answer.text[:300])
        assert answer.json()["code"] == "bad_parameter" and answer.json()["details"] == {"parameter": "_cursor"}
        assert str(local_runs) not in answer.text  # the server's paths stay its own


def test_a_negative_page_cursor_or_attempt_is_refused_naming_it(local_ui: TestClient, local_runs: Path) -> None:
    for flows in ({"flow": "FanFlow"}, {}):  # one flow's listing, and every flow's merged
        for cursor in ([-1], [], [True], ["x"], [0, 0]):
            page = local_ui.get("/api/runs", params={**flows, "cursor": encode_cursor(cursor)})
            assert page.status_code == 400 and page.json()["details"] == {"parameter": "_cursor"}, (cursor, page.text)
    logs = _failed_task_stderr(local_ui, local_runs)
    for attempt in (-1, 1001):
        answer = local_ui.get(logs, params={"attempt": attempt})
        assert answer.status_code == 400 and answer.json()["message"].startswith(f"attempt {attempt} "), answer.text
    other = local_ui.get(logs, params={"attempt": 0, "cursor": encode_cursor([1, 0, 0])})
    assert other.status_code == 400 and other.json()["details"] == {"parameter": "_cursor"}


#: Wide enough that a per-task request would show (the answers must cost the same as on 4 tasks); the
#: 1,000-task version of this run is ``bench/agent.py``'s, where its scale belongs.
WIDE = 200
WIDE_FAILING = (197, 198, 199)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str, Path]]:
    """A 200-task foreach whose items 197-199 fail every attempt (and item 1 its first), on the service."""
    root = tmp_path_factory.mktemp("agent-wide")
    (root / "barrier").mkdir()
    service = start_service(str(root / "metadata.db"), root / "service.log", log_roots=(str(root / ".metaflow"),))
    try:
        failing = ",".join(map(str, WIDE_FAILING))
        ran = run_flow(
            root,
            *("run", "--width", str(WIDE), "--max-num-splits", str(WIDE + 1), "--run-id-file", "run-id"),
            service_url=service.url,
            env={"FAN_FAIL_AT": failing, "FAN_BARRIER": str(root / "barrier")},
            timeout=2400,
        )
        assert ran.returncode != 0 and f"item {WIDE - 1} is bad" in ran.stdout + ran.stderr, ran.stderr[-3000:]
        yield service, f"FanFlow/{(root / 'run-id').read_text()}", root / ".metaflow"
    finally:
        service.stop()


def stock_failures(url: str, run: str, datastore: Path) -> dict[str, str]:
    """The referee: the failed tasks and their exceptions as Metaflow's Client API finds them (its own process)."""
    from conftest import VENV_BIN

    script = (
        "import json, sys\nfrom metaflow import Run, namespace\nnamespace(None)\n"
        "print(json.dumps({t.pathspec: str(t.exception) for t in Run(sys.argv[1])['work'] if not t.successful}))"
    )
    found = subprocess.run(
        [sys.executable, "-c", script, run],
        capture_output=True,
        text=True,
        timeout=900,
        env={
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "METAFLOW_DEFAULT_METADATA": "service",
            "METAFLOW_SERVICE_URL": url,
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(datastore.parent),
        },
    )
    assert found.returncode == 0, found.stderr[-3000:]
    return json.loads(found.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(1800)
def test_a_200_task_foreach_with_3_failures(
    wide_run: tuple[Service, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every answer about the wide run is right and costs one request, however many tasks the run has."""
    service, run, datastore = wide_run
    expected = stock_failures(service.url, run, datastore)
    assert len(expected) == len(WIDE_FAILING)

    refuse_unpickling(monkeypatch)
    with connect(service.url) as queries:
        found = queries.failures(run)
        assert {f.pathspec for f in found.failures} == set(expected) and not found.truncated
        assert {f.message for f in found.failures} == {f"item {item} is bad" for item in WIDE_FAILING}
        assert all(f.message in expected[f.pathspec] for f in found.failures)
        assert all(f.type == "ValueError" and f.attempt == 1 for f in found.failures)
        assert all(f.traceback[-1] == f"ValueError: {f.message}" for f in found.failures)

        summary = queries.run_summary(run)
        work = {s.step_name: s for s in summary.steps}["work"]
        assert summary.status == "failed" and summary.first_failure in found.failures
        assert (work.total, work.completed, work.failed, work.running) == (WIDE, WIDE - 3, 3, 0)
        assert [r.pathspec for r in queries.list_runs("FanFlow", status="failed").runs] == [run]

        values = queries.search_artifacts(run, name="value", limit=1000)
        assert len(values.artifacts) == WIDE - 3 and not values.truncated
        assert {a.python_type for a in values.artifacts} == {"int"}
        assert "value" in {a.name for a in queries.artifact_info(values.artifacts[0].pathspec).artifacts}

        tail = queries.logs(found.failures[0].pathspec, tail=20)
        assert any(found.failures[0].message in line.text for line in tail.lines) and tail.bytes_read <= 64 * 1024
        assert queries.source.requests == 7  # one per question, on a run of 200 tasks
