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
    tmp_path: Path, backends: str, *args: str, env: dict[str, str] | None = None, reported: bool = False
) -> tuple[int, str, Path]:
    """Run the flow suite on ``backends``; its exit code, its output and its JUnit file: where CI keeps
    results (``STACK_FLOW_SUITE_RESULTS``) for a run it should report (``reported``: not the runs made to
    fail or skip on purpose), else in ``tmp_path``."""
    kept = os.environ.get(RESULTS_VARIABLE) if reported else None
    junit = Path(kept or tmp_path) / f"{backends.replace(',', '-')}.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", "-c", str(SUITE / "pytest.ini"), str(SUITE), "-p", "no:cacheprovider"]
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
