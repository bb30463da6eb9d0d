"""Real flows recorded by the metadata service (SQLite and PostgreSQL) read
back through Metaflow's Client API exactly as with local metadata: a
60-item foreach (more than the service's default page of 50) with a retried
task, a run whose task fails, and its resume. Stock Metaflow, without this
project's extension, writes and reads the same. Wider runs are measured in
``bench/agent.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_servers import FLOWS, PostgresServer, run_flow

pytestmark = pytest.mark.slow

WIDTH = 60


def _runs(root: Path, service_url: str | None, env: dict[str, str] | None = None) -> list[str]:
    """The three runs (foreach with a retry, a failure, its resume) in ``root``; returns their ids."""
    root.mkdir(parents=True, exist_ok=True)

    done = run_flow(
        root,
        "run",
        "--width",
        str(WIDTH),
        "--max-num-splits",
        "300",
        "--run-id-file",
        "a",
        service_url=service_url,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failing = run_flow(
        root,
        "run",
        "--width",
        "4",
        "--run-id-file",
        "b",
        service_url=service_url,
        env={**(env or {}), "FAN_FAIL_AT": "2"},
    )
    assert failing.returncode != 0 and "item 2 is bad" in failing.stdout + failing.stderr
    resumed = run_flow(
        root,
        "resume",
        "--origin-run-id",
        (root / "b").read_text(),
        "--run-id-file",
        "c",
        service_url=service_url,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return [(root / name).read_text() for name in "abc"]


def _view(root: Path, service_url: str | None, env: dict[str, str] | None = None) -> dict:
    import os

    from conftest import VENV_BIN

    metadata = (
        {"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": service_url}
        if service_url
        else {"METAFLOW_DEFAULT_METADATA": "local"}
    )
    result = subprocess.run(
        [sys.executable, str(FLOWS / "client_view.py")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root),
            **metadata,
            **(env or {}),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def local_view(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("local-runs")
    _runs(root, None)
    return _view(root, None)


def _check_service_runs(root: Path, url: str, local_view: dict) -> list[str]:
    ids = _runs(root, url)
    view = _view(root, url)
    assert view == local_view
    work = view["runs"][0]["steps"]["work"]
    assert len(work) == WIDTH and work[1]["attempt"] == 1  # the retried item
    summary = httpx.get(f"{url}/flows/FanFlow/runs/{ids[0]}/summary").json()
    assert summary["status"] == "completed"
    assert {s["step_name"]: s["completed"] for s in summary["steps"]}["work"] == WIDTH
    failures = httpx.get(f"{url}/flows/FanFlow/runs/{ids[1]}/failures").json()
    assert [(f["step_name"], f["attempt"], f["exception"]["type"], f["exception"]["message"]) for f in failures] == [
        ("work", 1, "ValueError", "item 2 is bad")
    ]
    assert failures[0]["exception"]["traceback"][-1] == "ValueError: item 2 is bad"
    assert httpx.get(f"{url}/flows/FanFlow/runs/{ids[1]}").json()["run_number"] == int(ids[1])
    statuses = httpx.get(f"{url}/flows/FanFlow/runs", params={"_limit": 10}).json()
    assert [r["status"] for r in statuses] == ["completed", "failed", "completed"]  # newest first
    return ids


def test_flows_on_sqlite_read_back_as_with_local_metadata(tmp_path: Path, service_factory, local_view: dict) -> None:
    service = service_factory(str(tmp_path / "metadata.db"))
    _check_service_runs(tmp_path / "runs", service.url, local_view)

    # Stock Metaflow (the extension not loaded) records and reads the same way.
    stock = {"METAFLOW_EXTENSIONS_SEARCH_DIRS": str(tmp_path / "no-extensions")}
    (tmp_path / "no-extensions").mkdir()
    assert _view(tmp_path / "runs", service.url, stock) == local_view
    old_root = tmp_path / "stock-runs"
    old_root.mkdir()
    failing = run_flow(
        old_root,
        "run",
        "--width",
        "4",
        "--run-id-file",
        "b",
        service_url=service.url,
        env={**stock, "FAN_FAIL_AT": "2"},
    )
    assert failing.returncode != 0
    resumed = run_flow(
        old_root, "resume", "--origin-run-id", (old_root / "b").read_text(), service_url=service.url, env=stock
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    old_view = _view(old_root, service.url, stock)
    assert old_view["runs"][-2:] == local_view["runs"][1:]


def test_flows_on_postgresql_read_back_as_with_local_metadata(
    tmp_path: Path, service_factory, postgres: PostgresServer, local_view: dict
) -> None:
    service = service_factory(postgres.create_database())
    _check_service_runs(tmp_path / "runs", service.url, local_view)
