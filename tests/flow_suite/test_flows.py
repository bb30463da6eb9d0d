"""The flow suite: each test runs its flow on every backend named with ``--backend`` (pytest-metaflow-stack).

The intent of a slice of Metaflow's QA tests (foreach, branch and join,
retries, catch, resume, parameters, artifacts, cards, a scheduled flow),
written for this project: every result is read back through the Client API,
as a user would. Run it on one or more backends:

    pytest tests/flow_suite --backend local,devcontainer
"""

from __future__ import annotations

import base64
import json
import re
import subprocess

import pytest


def test_foreach_items_meet_in_the_join(flow_runner) -> None:
    run = flow_runner.run("flows/foreach_flow.py", count=5)
    assert run.successful, flow_runner.output
    assert len(list(run["square"])) == 5
    assert run["join"].task.data.values == [0, 1, 4, 9, 16]
    assert run.data.total == 30


def test_branches_join_and_merge_their_artifacts(flow_runner) -> None:
    run = flow_runner.run("flows/branch_flow.py")
    assert run.successful, flow_runner.output
    assert run.data.summary == "from start: ['left', 'right'] 3"


def test_a_retried_step_succeeds_and_a_caught_one_is_recorded(flow_runner) -> None:
    run = flow_runner.run("flows/retry_catch_flow.py")
    assert run.successful, flow_runner.output
    flaky = run["flaky"].task
    assert flaky.current_attempt == 1 and flaky.data.attempts == 2
    assert run.data.caught.endswith("ValueError")


@pytest.mark.skip_backend("argo", reason="a deployed flow is not resumed: resume runs where the user is")
def test_a_failed_run_resumes_from_its_failed_step(flow_runner) -> None:
    failed = flow_runner.run("flows/resume_flow.py")
    assert not failed.successful
    assert "the original run fails here" in failed["middle"].task.stderr
    resumed = flow_runner.resume("flows/resume_flow.py", origin_run_id=failed.id)
    assert resumed.successful, flow_runner.output
    assert resumed.data.result == f"made once, resumed from {failed.id}"
    assert resumed["start"].task.metadata_dict.get("origin-run-id") == failed.id  # cloned, not run again


def test_parameters_keep_their_types(flow_runner) -> None:
    run = flow_runner.run("flows/parameters_flow.py", alpha=0.25, who="stack", loud=True, config={"layers": [3]})
    assert run.successful, flow_runner.output
    start = run["start"].task.data
    assert (start.greeting, start.scaled, start.layers) == ("HELLO STACK", 2.5, [3])
    defaults = flow_runner.run("flows/parameters_flow.py")
    assert defaults["start"].task.data.greeting == "hello world"


def test_artifacts_round_trip_between_steps(flow_runner) -> None:
    run = flow_runner.run("flows/artifacts_flow.py")
    assert run.successful, flow_runner.output
    data = run.data
    assert data.mapping == {"a": 2, "nested": {"b": [1, 2, 3]}}
    assert data.blob_size == 1024 * 1024 and data.blob[:3] == bytes([0, 1, 2])
    assert data.checksum == sum(range(10_000)) and data.nothing is None
    assert run["start"].task.data.mapping["a"] == 1  # each step's own version


def _card_data(html: str) -> list:
    """What a card shows: the JSON its page carries (base64, in ``window.__MF_DATA__``)."""
    blobs = re.findall(r'window\.__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"', html)
    return [json.loads(base64.b64decode(blob)) for blob in blobs]


def test_cards_are_made_and_read_back(flow_runner) -> None:
    from metaflow.cards import get_cards

    run = flow_runner.run("flows/card_flow.py")
    assert run.successful, flow_runner.output
    (default,) = get_cards(run["start"].task)
    assert '"score"' in json.dumps(_card_data(default.get()))  # the default card lists the step's artifacts
    (report,) = get_cards(run["report"].task, id="report")
    assert "# Score 0.93" in json.dumps(_card_data(report.get()))


@pytest.mark.backends("argo")
def test_a_scheduled_flow_deploys_with_its_cron_and_runs_when_triggered(flow_runner) -> None:
    run = flow_runner.run("flows/scheduled_flow.py")
    assert run.successful, flow_runner.output
    assert run.data.started is True
    # The schedule is on the cluster: Argo's CronWorkflow for the deployed flow, with the flow's cron.
    from metaflow.metaflow_config import KUBERNETES_NAMESPACE  # (the profile's, as the deployer read it)

    (deployed,) = flow_runner.deployed
    cron = ["kubectl", "-n", KUBERNETES_NAMESPACE, "get", "cronworkflows.argoproj.io", deployed.name, "-o", "json"]
    found = subprocess.run(cron, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert "0 3 * * *" in json.dumps(json.loads(found.stdout)["spec"])
