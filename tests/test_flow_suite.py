"""The flow suite (``tests/flow_suite``) run the way CI runs it: its own pytest per set of backends.

Each run is a real pytest of the suite with pytest-metaflow-stack's
``--backend``, its flows real Metaflow runs: here locally, in
``@devcontainer`` containers, and as Nomad jobs on the Nomad API double
(the same path at a smaller width: its resume test, which is also where
a task failing as a Nomad job fails its run; foreach items and retries run
as Nomad jobs in ``tests/test_nomad.py``); on Kubernetes and
Argo Workflows in the GitHub workflow's cluster job. What each run's JUnit
file records is read back with ``metaflow_stack.ci.results`` and reported
with ``metaflow stack ci report``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import VENV_BIN, run_cli

from metaflow_stack.ci import results

SUITE = Path(__file__).resolve().parent / "flow_suite"
#: The suite's tests that take every backend (its scheduled flow is for Argo only).
EVERY_BACKEND = 7


#: Where CI keeps the JUnit files of the suite's own runs, for its report's table of tests by backend (the
#: outer test is one row; the suite's cases, each naming its backend, are the columns).
RESULTS_VARIABLE = "STACK_FLOW_SUITE_RESULTS"


def suite(
    tmp_path: Path,
    backends: str,
    *args: str,
    env: dict[str, str] | None = None,
    reported: bool = False,
    folder: Path = SUITE,
) -> tuple[int, str, Path]:
    """Run the flow suite (or another suite's ``folder``, with its ``pytest.ini``) on ``backends``; its exit
    code, its output and its JUnit file: where CI keeps results (``STACK_FLOW_SUITE_RESULTS``) for a run it
    should report (``reported``: not the runs made to fail or skip on purpose), else in ``tmp_path``."""
    kept = os.environ.get(RESULTS_VARIABLE) if reported else None
    junit = Path(kept or tmp_path) / f"{backends.replace(',', '-')}.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", "-c", str(folder / "pytest.ini"), str(folder), "-p", "no:cacheprovider"]
    command += [f"--backend={backends}", f"--junit-xml={junit}", f"--basetemp={tmp_path / 'runs'}", "-q", *args]
    environment = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **(env or {})}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=1500)
    return done.returncode, done.stdout + done.stderr, junit


@pytest.mark.docker
@pytest.mark.slow
def test_the_suite_passes_locally_and_in_devcontainers(tmp_path: Path, base_image: str) -> None:
    code, output, junit = suite(tmp_path, "local,devcontainer", reported=True)
    assert code == 0, output[-6000:]
    outcomes = results.read([junit])
    ran = [o for o in outcomes if o.status == "passed"]
    assert len(ran) == 2 * EVERY_BACKEND, output[-3000:]
    assert {o.backend for o in ran} == {"local", "devcontainer"}
    assert all(o.run and o.path == "tests/flow_suite/flows/" + Path(o.path).name for o in ran)
    (argo_only,) = [o for o in outcomes if o.status == "skipped"]
    assert "runs on argo only; --backend names local, devcontainer" in argo_only.message

    report = run_cli("stack", "ci", "report", str(junit))
    assert report.returncode == 0, report.stderr
    row = "| test_flows.py::test_a_failed_run_resumes_from_its_failed_step | ✅ | ✅ |"
    assert row in report.stdout


@pytest.mark.docker
@pytest.mark.slow
def test_the_suite_runs_its_steps_as_nomad_jobs(tmp_path: Path, nomad_agent, bridge_s3: str, base_image: str) -> None:
    env = {
        "NOMAD_ADDR": nomad_agent.address,
        **({"NOMAD_TOKEN": nomad_agent.token} if nomad_agent.token else {}),
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://sandbox/flow-suite-{uuid.uuid4().hex[:8]}",
        "METAFLOW_S3_ENDPOINT_URL": bridge_s3,
        "METAFLOW_DEFAULT_METADATA": "local",
    }
    # The double's workers, like Nomad's, have no credentials of the test's S3: they get them as a user gives
    # any backend's workers theirs, through Metaflow's @environment.
    credentials = json.dumps({k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    only = ("-k", "resumes")
    with_credentials = f"--flow-with=environment:vars={credentials}"
    code, output, junit = suite(tmp_path, "nomad", *only, with_credentials, env=env, reported=True)
    assert code == 0, output[-6000:]
    passed = [o for o in results.read([junit]) if o.status == "passed"]
    assert [o.test.split("::")[-1] for o in passed] == ["test_a_failed_run_resumes_from_its_failed_step"]
    assert {o.backend for o in passed} == {"nomad"}


def test_a_backend_without_its_infrastructure_skips_naming_it_unless_required(tmp_path: Path) -> None:
    no_cluster = {"KUBECONFIG": str(tmp_path / "no-kubeconfig"), "STACK_TEST_REQUIRE": ""}
    code, output, junit = suite(tmp_path, "kubernetes", "-k", "foreach", env=no_cluster)
    assert code == 0, output[-3000:]
    (skipped,) = results.read([junit])
    assert skipped.status == "skipped" and skipped.backend == "kubernetes"
    assert "kubernetes unavailable: the kubernetes backend:" in skipped.message

    required = {**no_cluster, "STACK_TEST_REQUIRE": "kubernetes"}
    code, output, junit = suite(tmp_path, "kubernetes", "-k", "foreach", env=required)
    assert code == 1
    (failed,) = results.read([junit])
    assert failed.status == "failed" and "(STACK_TEST_REQUIRE lists kubernetes)" in failed.message


def test_a_backend_a_test_leaves_out_by_its_marker_is_skipped_with_its_reason(tmp_path: Path) -> None:
    """``skip_backend("argo", reason=...)``: the case skips with the marker's reason before anything of the
    backend is looked at, even where the backend is required (which would make a missing Argo a failure)."""
    code, output, junit = suite(tmp_path, "argo", "-k", "resumes", env={"STACK_TEST_REQUIRE": "argo"})
    assert code == 0, output[-3000:]
    (skipped,) = results.read([junit])
    assert skipped.status == "skipped" and skipped.backend == "argo"
    assert "a deployed flow is not resumed" in skipped.message


def test_an_unknown_backend_is_one_line_naming_the_choices(tmp_path: Path) -> None:
    code, output, _ = suite(tmp_path, "local,lambda")
    assert code == 4
    assert "--backend lambda: choose from local, devcontainer, nomad, kubernetes, argo" in output
    assert "Traceback" not in output


_TRAIN_FLOW = """
from metaflow import FlowSpec, step


class TrainFlow(FlowSpec):
    @step
    def start(self):
        self.version = {version!r}
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TrainFlow()
"""

_IMPORTING_FLOW = """
from metaflow import FlowSpec, step

from helper import GREETING


class ImportingFlow(FlowSpec):
    @step
    def start(self):
        self.greeting = GREETING
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ImportingFlow()
"""

_STUCK_FLOW = """
import os
import time

from metaflow import FlowSpec, step


class StuckFlow(FlowSpec):
    @step
    def start(self):
        with open(os.environ["STUCK_PID_FILE"], "w") as out:
            out.write(str(os.getpid()))
        time.sleep(300)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    StuckFlow()
"""

_STAGED_TESTS = """
def test_flows_of_one_name_in_two_folders_each_run_their_own(flow_runner):
    assert flow_runner.run("v1/train.py").data.version == "v1"
    assert flow_runner.run("v2/train.py").data.version == "v2"


def test_a_flow_imports_a_module_beside_it(flow_runner):
    run = flow_runner.run("importing/importing_flow.py")
    assert run.successful, flow_runner.output
    assert run.data.greeting == "hello from beside the flow"


def test_a_stuck_run_is_stopped(flow_runner):
    flow_runner.run("stuck/stuck_flow.py")
"""


def _flows_suite(folder: Path) -> Path:
    """A suite of its own for the plugin's staging and its timeout: flows in folders, one name twice."""
    files = {
        "pytest.ini": "[pytest]\naddopts = -ra\n",
        "test_staged.py": _STAGED_TESTS,
        "v1/train.py": _TRAIN_FLOW.format(version="v1"),
        "v2/train.py": _TRAIN_FLOW.format(version="v2"),
        "importing/importing_flow.py": _IMPORTING_FLOW,
        "importing/helper.py": 'GREETING = "hello from beside the flow"\n',
        "stuck/stuck_flow.py": _STUCK_FLOW,
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_each_flow_runs_from_its_own_folder_with_the_modules_beside_it(tmp_path: Path) -> None:
    folder = _flows_suite(tmp_path / "suite")
    code, output, junit = suite(tmp_path, "local", "-k", "not stuck", folder=folder)
    assert code == 0, output[-4000:]
    outcomes = results.read([junit])
    assert [o.status for o in outcomes] == ["passed", "passed"], output[-4000:]
    assert {o.path for o in outcomes} == {str(folder / "v2/train.py"), str(folder / "importing/importing_flow.py")}


def test_a_run_past_the_flow_timeout_is_stopped_and_its_test_fails_naming_it(tmp_path: Path) -> None:
    folder, pid_file = _flows_suite(tmp_path / "suite"), tmp_path / "step.pid"
    started = time.monotonic()
    code, output, junit = suite(
        tmp_path, "local", "-k", "stuck", "--flow-timeout=20", folder=folder, env={"STUCK_PID_FILE": str(pid_file)}
    )
    assert time.monotonic() - started < 150, output[-3000:]
    assert code == 1, output[-3000:]
    (failed,) = results.read([junit])
    assert failed.status == "failed"
    assert "stuck/stuck_flow.py: the run did not finish within 20 s (--flow-timeout): stopped" in failed.message
    step = Path(f"/proc/{pid_file.read_text()}/status")  # the step that slept is gone (or a zombie left to reap)
    assert not step.exists() or "State:\tZ" in step.read_text()
