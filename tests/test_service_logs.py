"""Bounded task logs (``.../tasks/{task}/logs/{stream}``): windows of real
flows' logs equal to what Metaflow's Client API reads, on the local datastore
and on S3 (moto's server), read in ranges (``bytes_read``), and refused outside
the roots the service was allowed to read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from metaflow.mflog import mflog
from service_servers import FLOWS, Service, run_flow, start_service

from metaflow_stack.datastore.log_files import LogFiles, ReadMeter
from metaflow_stack.datastore.log_windows import LogQuery, read_window

LINES = 3000


@dataclass
class LogRun:
    url: str
    run_id: str
    env: dict[str, str]
    database: str

    def task(self, step: str) -> str:
        """``step/task_id`` of the step's one task (the service numbers tasks)."""
        tasks = httpx.get(f"{self.url}/flows/LogFlow/runs/{self.run_id}/steps/{step}/tasks").json()
        return f"{step}/{tasks[0]['task_id']}"

    def logs(self, step: str, stream: str = "stdout", **params) -> httpx.Response:
        step_name, task_id = self.task(step).split("/")
        path = f"{self.url}/flows/LogFlow/runs/{self.run_id}/steps/{step_name}/tasks/{task_id}/logs/{stream}"
        return httpx.get(path, params=params)

    def client_lines(self, step: str, stream: str = "stdout", attempt: int | None = None) -> list[str]:
        """The task's lines as Metaflow's Client API reads them (a process of its own)."""
        args = [f"LogFlow/{self.run_id}/{self.task(step)}", stream, *([str(attempt)] if attempt is not None else [])]
        result = subprocess.run(
            [sys.executable, str(FLOWS / "log_lines.py"), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": self.url, **self.env},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])


def _texts(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [line["text"] for line in response.json()["lines"]]


def _log_run(root: Path, service: Service, env: dict[str, str], datastore: tuple[str, ...] | None = None) -> LogRun:
    done = run_flow(
        root,
        "run",
        "--lines",
        str(LINES),
        "--run-id-file",
        "run-id",
        service_url=service.url,
        env=env,
        flow="log_flow.py",
        datastore=datastore,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return LogRun(service.url, (root / "run-id").read_text(), env, service.database)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogRun]:
    """LogFlow on the local datastore, recorded by a service allowed to read its logs."""
    root = tmp_path_factory.mktemp("log-runs")
    service = start_service(str(root / "metadata.db"), root / "service.log", log_roots=(str(root / ".metaflow"),))
    try:
        yield _log_run(root, service, {})
    finally:
        service.stop()


@pytest.mark.slow
def test_windows_equal_the_client_api(local_run: LogRun) -> None:
    everything = local_run.client_lines("start")
    assert len(everything) == LINES and everything[0].startswith("out 00000")

    first = local_run.logs("start")
    assert _texts(first) == everything[:1000]
    assert first.json()["attempt"] == 0 and first.json()["truncated"] is False

    walked, cursor, pages = [], None, 0
    while True:
        page = local_run.logs("start", head=700, **({"_cursor": cursor} if cursor else {}))
        walked += _texts(page)
        pages += 1
        cursor = page.headers.get("x-next-cursor")
        if cursor is None:
            break
    assert walked == everything and pages == 5

    tail = local_run.logs("start", tail=50)
    assert _texts(tail) == everything[-50:]
    body = tail.json()
    assert body["bytes_read"] <= 64 * 1024 < body["size"]  # one range from the end, not the file
    # Following from the tail's cursor: nothing new in a finished task, and no next page.
    after = local_run.logs("start", _cursor=body["cursor"])
    assert _texts(after) == [] and "x-next-cursor" not in after.headers


@pytest.mark.slow
def test_grep_head_and_tail(local_run: LogRun) -> None:
    assert _texts(local_run.logs("start", grep="^out 0(0042|2999) ")) == [
        "out 00042 " + "x" * 42,
        "out 02999 " + "x" * 49,
    ]
    errors = local_run.client_lines("start", "stderr")
    assert len(errors) == LINES // 100
    assert _texts(local_run.logs("start", "stderr", tail=3, grep="^err")) == errors[-3:]
    assert _texts(local_run.logs("start", "stderr", grep="no such text")) == []


@pytest.mark.slow
def test_attempts_and_byte_limits(local_run: LogRun) -> None:
    assert _texts(local_run.logs("flaky")) == ["attempt 1 says hello"]
    assert _texts(local_run.logs("flaky", attempt=0)) == ["attempt 0 says hello"]
    failure = _texts(local_run.logs("flaky", "stderr", attempt=0, grep="fails"))
    assert failure and "the first attempt fails" in failure[-1]
    assert failure == [t for t in local_run.client_lines("flaky", "stderr", attempt=0) if "fails" in t]

    small = local_run.logs("start", max_bytes=100)
    body = small.json()
    assert body["truncated"] is True and sum(len(line["text"]) for line in body["lines"]) <= 100
    rest = local_run.logs("start", _cursor=small.headers["x-next-cursor"], head=1)
    assert _texts(rest) == [local_run.client_lines("start")[len(body["lines"])]]


@pytest.mark.slow
def test_bad_requests_are_400s_naming_the_parameter(local_run: LogRun) -> None:
    for stream, params, parameter in [
        ("stdlog", {}, "stream"),
        ("stdout", {"head": 1, "tail": 1}, "tail"),
        ("stdout", {"tail": 0}, "tail"),
        ("stdout", {"head": "many"}, "head"),
        ("stdout", {"grep": "("}, "grep"),
        ("stdout", {"max_bytes": 10**9}, "max_bytes"),
        ("stdout", {"lines": 5}, "lines"),
        ("stdout", {"_cursor": "bm90LWEtY3Vyc29y"}, "_cursor"),
        ("stdout", {"tail": 5, "_cursor": "WzAsMCwwXQ"}, "_cursor"),
        ("stdout", {"attempt": 1, "_cursor": "WzAsMCwwXQ"}, "_cursor"),
    ]:
        response = local_run.logs("start", stream, **params)
        assert response.status_code == 400, (params, response.text)
        assert response.json()["details"] == {"parameter": parameter}
    missing = httpx.get(f"{local_run.url}/flows/LogFlow/runs/{local_run.run_id}/steps/start/tasks/999/logs/stdout")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


@pytest.mark.slow
def test_a_catastrophic_grep_does_not_stall_the_service(local_run: LogRun) -> None:
    # ``(x+)+y`` on "out 00049 xxx...x" (49 x's, no y) backtracks for hours in Python's re, holding the GIL;
    # RE2 matches it in linear time, so the scan ends and the service answers everything else meanwhile.
    pings: list[float] = []
    with ThreadPoolExecutor(1) as pool:
        grepped = pool.submit(local_run.logs, "start", grep="(x+)+y")
        while not grepped.done():
            started = time.monotonic()
            assert httpx.get(f"{local_run.url}/ping", timeout=5).status_code == 200
            pings.append(time.monotonic() - started)
        assert _texts(grepped.result(timeout=30)) == []
    assert max(pings) < 1.0, pings
    found = _texts(local_run.logs("start", grep="(x+)+$", head=2))
    assert found == ["out 00001 x", "out 00002 xx"]


@pytest.mark.slow
def test_patterns_that_need_backtracking_are_refused_naming_the_field(local_run: LogRun) -> None:
    refused = local_run.logs("start", grep=r"(x)\1")
    assert refused.status_code == 400 and refused.json()["details"] == {"parameter": "grep"}
    assert "RE2" in refused.json()["fix"]
    step = f"{local_run.url}/flows/LogFlow/runs/{local_run.run_id}/steps/start"
    lookahead = httpx.get(f"{step}/filtered_tasks", params={"metadata_field_name": "attempt", "pattern": "(?=0)"})
    assert lookahead.status_code == 400 and lookahead.json()["details"] == {"parameter": "pattern"}
    matched = httpx.get(f"{step}/filtered_tasks", params={"metadata_field_name": "attempt", "pattern": "^0$"})
    assert matched.status_code == 200 and matched.json() == [f"LogFlow/{local_run.run_id}/{local_run.task('start')}"]


@pytest.mark.slow
def test_logs_outside_the_allowed_roots_are_refused(local_run: LogRun, tmp_path: Path) -> None:
    # The same records, served by a service allowed to read no datastore.
    service = start_service(local_run.database, tmp_path / "service.log")
    try:
        refused = httpx.get(
            f"{service.url}/flows/LogFlow/runs/{local_run.run_id}/steps/start/tasks/{local_run.task('start').split('/')[1]}/logs/stdout"
        )
    finally:
        service.stop()
    assert refused.status_code == 403
    assert refused.json()["code"] == "log_root_not_allowed" and "--log-root" in refused.json()["fix"]


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogRun]:
    """LogFlow on an S3 datastore (moto's server on loopback), recorded by a service allowed that prefix."""
    import boto3
    from moto.server import ThreadedMotoServer

    root = tmp_path_factory.mktemp("s3-log-runs")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "METAFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "METAFLOW_DATASTORE_SYSROOT_S3": "s3://flows/metaflow",
    }
    boto3.client(
        "s3",
        endpoint_url=env["METAFLOW_S3_ENDPOINT_URL"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    ).create_bucket(Bucket="flows")
    service = start_service(
        str(root / "metadata.db"), root / "service.log", log_roots=("s3://flows/metaflow",), env=env
    )
    try:
        yield _log_run(root, service, env, datastore=("--datastore", "s3"))
    finally:
        service.stop()
        server.stop()


@pytest.mark.slow
def test_logs_in_s3_are_read_in_ranges(s3_run: LogRun, tmp_path: Path) -> None:
    everything = s3_run.client_lines("start")
    assert len(everything) == LINES
    tail = s3_run.logs("start", tail=20)
    assert _texts(tail) == everything[-20:]
    assert tail.json()["bytes_read"] <= 64 * 1024 < tail.json()["size"]
    assert _texts(s3_run.logs("start", head=10_000)) == everything
    assert _texts(s3_run.logs("flaky", attempt=0)) == ["attempt 0 says hello"]

    # A service allowed another prefix of the same bucket does not read this one.
    other = start_service(s3_run.database, tmp_path / "service.log", log_roots=("s3://flows/other",), env=s3_run.env)
    try:
        step_name, task_id = s3_run.task("start").split("/")
        refused = httpx.get(
            f"{other.url}/flows/LogFlow/runs/{s3_run.run_id}/steps/{step_name}/tasks/{task_id}/logs/stdout"
        )
    finally:
        other.stop()
    assert refused.status_code == 403 and refused.json()["details"] == {"allowed": ["s3://flows/other/"]}


def _mflog_file(path: Path, source: str, entries: list[tuple[int, str]], start: datetime) -> bytes:
    blob = b"".join(
        mflog.decorate(source, text.encode(), now=start + timedelta(milliseconds=ms)) + b"\n" for ms, text in entries
    )
    path.write_bytes(blob)
    return blob


def test_two_sources_merge_as_metaflow_merges_them(tmp_path: Path) -> None:
    """Windows over a runtime and a task log, interleaved in time, with lines longer than a read range."""
    folder = tmp_path / "F" / "1" / "s" / "2"
    folder.mkdir(parents=True)
    start = datetime(2026, 11, 23, 1, 0, 0)
    runtime = [(ms, f"runtime {ms}") for ms in range(0, 3000, 3)]
    task = [(ms, f"task {ms} " + ("y" * 100_000 if ms % 500 == 1 else "")) for ms in range(1, 3000, 2)]
    blobs = [
        _mflog_file(folder / "0.runtime_stdout.log", "runtime", runtime, start),
        _mflog_file(folder / "0.task_stdout.log", "task", task, start),
    ]
    expected = [line.msg.decode() for line in mflog.merge_logs(blobs)]
    files = LogFiles((str(tmp_path),))

    def window(**kwargs):
        return read_window(
            files.open("local", str(tmp_path), ("F", "1", "s", "2"), 0, "stdout", ReadMeter()), LogQuery(**kwargs)
        )

    walked, cursor = [], None
    while True:
        page = window(lines=97, cursor=cursor, max_bytes=16 * 1024 * 1024)
        walked += [line.text.decode() for line in page.lines]
        if not page.more:
            break
        cursor = [0, *page.offsets]
    assert walked == expected
    assert [
        line.text.decode() for line in window(lines=120, from_end=True, max_bytes=16 * 1024 * 1024).lines
    ] == expected[-120:]


def test_a_line_longer_than_the_budget_is_cut_not_endless(tmp_path: Path) -> None:
    folder = tmp_path / "F" / "1" / "s" / "2"
    folder.mkdir(parents=True)
    start = datetime(2026, 11, 23, 1, 0, 0)
    _mflog_file(folder / "0.runtime_stdout.log", "runtime", [(0, "a"), (1, "z" * 300_000), (2, "b")], start)
    files = LogFiles((str(tmp_path),))
    texts, cursor, truncated = [], None, []
    for _ in range(20):
        page = read_window(
            files.open("local", str(tmp_path), ("F", "1", "s", "2"), 0, "stdout", ReadMeter()),
            LogQuery(cursor=cursor, max_bytes=1000),
        )
        texts += [line.text.decode() for line in page.lines]
        truncated.append(page.truncated)
        if not page.more:
            break
        cursor = [0, *page.offsets]
    assert texts[0] == "a" and texts[-1] == "b" and all(len(t) <= 1000 for t in texts)
    assert truncated[0] and not page.more
    tail = read_window(
        files.open("local", str(tmp_path), ("F", "1", "s", "2"), 0, "stdout", ReadMeter()),
        LogQuery(lines=2, from_end=True, max_bytes=1000),
    )
    assert [line.text.decode() for line in tail.lines] == ["b"] and tail.truncated


def test_a_header_that_does_not_close_and_a_line_without_end_cost_their_length_once(tmp_path: Path) -> None:
    """A header of ``Z|`` that never closes made Metaflow's mflog regex backtrack (a 3 KB line held the service
    10 s), and a log with no newline was held and copied whole at each range read (64 MiB: 13 s, 320 MB)."""
    import time

    from metaflow.mflog.mflog import LINE_PARSER, decorate

    from metaflow_stack.datastore.log_windows import MAX_LINE, mflog_line

    for raw in (decorate(b"task", b"a [x] | Z| b"), b"[!" + decorate(b"runtime", b""), b"[MFLOG|0|2021Z||s|i]t", b"x"):
        parsed = LINE_PARSER.match(raw)
        assert mflog_line(raw) == ((parsed.group(3), parsed.group(6)) if parsed else (None, raw))
    folder = tmp_path / "F" / "1" / "s" / "2"
    folder.mkdir(parents=True)
    broken = b"[MFLOG|0|" + b"Z|" * 1500
    (folder / "0.runtime_stderr.log").write_bytes(broken + b"\n" + b"n" * (3 * MAX_LINE + 5))
    files = LogFiles((str(tmp_path),))

    def window(**kwargs):
        opened = files.open("local", str(tmp_path), ("F", "1", "s", "2"), 0, "stderr", ReadMeter())
        return read_window(opened, LogQuery(max_bytes=16 * 1024 * 1024, **kwargs))

    started = time.perf_counter()
    head = [line.text for line in window(lines=10).lines]
    tail = [line.text for line in window(lines=10, from_end=True).lines]
    assert time.perf_counter() - started < 5  # (the regex alone took 10 s on the first line)
    assert head[0] == broken and b"".join(head[1:]) == b"n" * (3 * MAX_LINE + 5) == b"".join(tail[-4:])
    assert all(len(text) <= MAX_LINE + 64 * 1024 for text in head[1:] + tail)
