"""Local runs have no heartbeats: a run whose process is SIGKILLed must read
``killed``, not ``running`` forever, while a live run whose task sits quietly
in user code stays ``running``. Real runs of the UI's gated flow, killed for
real; read through the agent's queries and the UI's API."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LOOPBACK, VENV_BIN
from fastapi.testclient import TestClient
from service_servers import FLOWS

from metaflow_stack.agent.liveness import Liveness
from metaflow_stack.agent.queries import Queries
from metaflow_stack.ui.app import create_app
from metaflow_stack.ui.local_runs import LocalRuns

pytestmark = pytest.mark.slow

FLOW = "branch_foreach_flow.py"
#: Short enough for a test, long enough to outlast a task's start-up writes.
STALE_AFTER_S = 3.0


def wait_for(check, what: str, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return found


def test_a_killed_local_run_reads_killed_and_a_quiet_live_one_running(tmp_path: Path) -> None:
    shutil.copy(FLOWS / FLOW, tmp_path)
    gate = tmp_path / "gate"
    gate.touch()
    root = tmp_path / ".metaflow"
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "METAFLOW_DEFAULT_METADATA": "local",
        "UI_GATE": str(gate),
    }
    flow = subprocess.Popen(
        [sys.executable, FLOW, "--datastore-root", str(root), "run", "--run-id-file", "run-id"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the runtime and its task processes, killed together below
    )
    source = LocalRuns(root, Liveness(stale_after_s=STALE_AFTER_S))
    queries = Queries(source)
    try:
        id_file = tmp_path / "run-id"
        run = f"BranchForeachFlow/{wait_for(lambda: id_file.is_file() and id_file.read_text(), 'the run id')}"

        def waiting_leaves() -> list:
            tasks = queries.run_tasks(run, step="leaf").tasks
            started = all((root / t.pathspec / "0.task_begin").exists() for t in tasks)
            return tasks if tasks and started else []

        wait_for(waiting_leaves, "leaf tasks waiting at the gate")
        time.sleep(STALE_AFTER_S + 1)  # the files are quiet now: only the processes say the run is alive
        assert queries.run_summary(run).status == "running"
        assert {t.status for t in queries.run_tasks(run, step="leaf").tasks} == {"running"}
    finally:
        os.killpg(flow.pid, signal.SIGKILL)
        flow.wait(timeout=30)

    time.sleep(STALE_AFTER_S + 1)
    summary = queries.run_summary(run)
    assert summary.status == "killed" and summary.finished_at is not None
    leaf = next(step for step in summary.steps if step.step_name == "leaf")
    assert leaf.killed == leaf.total > 0 and leaf.running == 0
    assert {t.status for t in queries.run_tasks(run, step="leaf").tasks} == {"killed"}
    assert [r.pathspec for r in queries.list_runs("BranchForeachFlow", status="killed").runs] == [run]
    assert queries.list_runs("BranchForeachFlow", status="running").runs == []

    with TestClient(create_app(source, live=False), base_url=LOOPBACK) as client:
        listed = client.get("/api/runs", params={"status": "killed"}).json()["runs"]
        page = client.get(f"/api/runs/{run}").json()
    assert [r["pathspec"] for r in listed] == [run]
    assert page["summary"]["status"] == "killed"
    assert {t["status"] for t in page["tasks"] if t["step_name"] == "leaf"} == {"killed"}
