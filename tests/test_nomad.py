"""``@nomad`` on real runs: a foreach whose items run as Nomad jobs (a retried item), a job no node can
take, Ctrl-C purging the run's jobs, and deployed flows (a task failing as a Nomad job, and its run's
resume, are the flow suite's Nomad leg: ``tests/test_flow_suite.py``). Against the Nomad API double here
(its docker tasks on the local engine, the datastore a real S3 server on the Docker bridge), against a
real agent in the GitHub workflow's ``clusters`` job (``NOMAD_ADDR`` set)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest import VENV_BIN, need
from nomad_jobs import jobs_left

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FLOWS = Path(__file__).resolve().parent / "nomad_flows"

#: Read in a subprocess: Metaflow's client keeps one datastore root per process.
FACTS = """
import json, sys
from metaflow import Flow, metadata, namespace
metadata("local@" + sys.argv[1])
namespace(None)
run = Flow(sys.argv[2]).latest_run
items = [
    {"index": t.index, "successful": t.successful, "attempt": t.current_attempt, "stdout": t.stdout,
     "stderr": t.stderr, "hostname": t.data.hostname if t.successful else None,
     "in_job": t.data.in_job if t.successful else None, "job": t.metadata_dict.get("nomad-job-id"),
     "auth_key": t.data.auth_key if t.successful else None}
    for t in run["each"]
] if "each" in run else []
values = run["join"].task.data.values if run.successful else None
print(json.dumps({"successful": run.successful, "values": values, "items": items}))
"""


def flow_run(
    root: Path, flow: str, agent, s3: str, *args: str, top: tuple[str, ...] = (), **popen
) -> subprocess.Popen | subprocess.CompletedProcess:
    shutil.copy(FLOWS / flow, root)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_S3_ENDPOINT_URL": s3,
        "NOMAD_ADDR": agent.address,
        **({"NOMAD_TOKEN": agent.token} if agent.token else {}),
    }
    root_s3 = f"s3://sandbox/nomad-{uuid.uuid4().hex[:8]}"
    line = [sys.executable, flow, "--datastore", "s3", "--datastore-root", root_s3, *top, "run", *args]
    if popen:
        return subprocess.Popen(line, cwd=root, env=env, **popen)
    return subprocess.run(line, cwd=root, env=env, capture_output=True, text=True, timeout=900)


def facts(root: Path, flow: str, s3: str) -> dict:
    env = {**os.environ, "METAFLOW_S3_ENDPOINT_URL": s3}
    done = subprocess.run([sys.executable, "-c", FACTS, str(root), flow], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def running(root: Path, agent, s3: str, sleep: float, **popen) -> tuple[subprocess.Popen, list[str]]:
    """A ``nomad_flow.py`` run whose items each sleep ``sleep`` seconds (its process: ``popen``), once its
    three items' jobs are all registered; and those jobs."""
    flow = flow_run(root, "nomad_flow.py", agent, s3, "--sleep", str(sleep), **popen)
    deadline = time.monotonic() + 300
    while len(jobs := jobs_left(agent, "mf-nomadflow-")) < 3:
        if flow.poll() is not None or time.monotonic() > deadline:
            flow.kill()
            raise AssertionError("the jobs never started")
        time.sleep(0.5)
    return flow, jobs


def work_task(root: Path, flow: str, read: str, s3: str) -> dict:
    """What ``read`` (a Python dict expression of ``t``, the latest run's ``work`` task) says, with the Nomad
    job its last attempt ran in (``job``), from the Client API in a process of its own."""
    code = (
        "import json, sys; from metaflow import Flow, metadata, namespace; metadata('local@' + sys.argv[1]); "
        f"namespace(None); t = Flow({flow!r}).latest_run['work'].task; "
        f"print(json.dumps({{**{read}, 'job': t.metadata_dict.get('nomad-job-id')}}))"
    )
    env = {**os.environ, "METAFLOW_S3_ENDPOINT_URL": s3}
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_items_run_as_nomad_jobs_and_a_failed_attempt_is_retried(
    tmp_path: Path, nomad_agent, bridge_s3: str, base_image: str
) -> None:
    done = flow_run(tmp_path, "nomad_flow.py", nomad_agent, bridge_s3)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    run = facts(tmp_path, "NomadFlow", bridge_s3)
    assert run["successful"] and run["values"] == [10, 20, 30]
    for item in run["items"]:
        assert item["in_job"] and item["hostname"] != os.uname().nodename
        assert item["job"] and item["job"].startswith("mf-nomadflow-")
        assert f"in {item['hostname']}" in item["stdout"]
    retried = next(item for item in run["items"] if item["index"] == 1)  # item 2
    assert retried["attempt"] == 1 and retried["job"].endswith("-1")
    assert "item 2 in" in done.stdout + done.stderr  # the jobs' output reached the console as it ran
    assert "upload_failure" not in done.stdout + done.stderr  # the logs saved as the tasks ran
    assert jobs_left(nomad_agent, "mf-nomadflow-") == []


def test_the_runs_credentials_reach_each_job_through_its_variable_not_its_spec(
    tmp_path: Path, nomad_agent, bridge_s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may read a job sees its spec: the metadata service's key goes into each task's job's own
    variable, which the job reads first with its workload identity, and goes with the job."""
    from metaflow_stack.engines.nomad.client import NomadClient, NotFound
    from metaflow_stack.engines.nomad.job_variable import variable_path

    key = f"k-{uuid.uuid4().hex}"
    monkeypatch.setenv("METAFLOW_SERVICE_AUTH_KEY", key)
    flow, jobs = running(tmp_path, nomad_agent, bridge_s3, 8, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with NomadClient(nomad_agent) as client:
            for job in jobs:
                (task,) = client.job(job)["TaskGroups"][0]["Tasks"]
                assert task["Identity"] == {"Env": True} and key not in json.dumps(task)
                assert client.variable(variable_path(job)) == {"METAFLOW_SERVICE_AUTH_KEY": key}
        said = flow.communicate(timeout=600)[0]
        assert flow.returncode == 0, said[-6000:]
    finally:
        if flow.poll() is None:
            flow.kill()
    run = facts(tmp_path, "NomadFlow", bridge_s3)
    assert run["successful"] and all(item["auth_key"] == key for item in run["items"] if item["successful"])
    with NomadClient(nomad_agent) as client:
        for job in jobs:
            with pytest.raises(NotFound):
                client.variable(variable_path(job))


def test_an_item_that_always_fails_fails_the_run_after_its_retry_with_its_traceback(
    tmp_path: Path, nomad_agent, bridge_s3: str, base_image: str
) -> None:
    """The job's real exit code fails the attempt, ``@retry`` runs it once more as a job of its own, and then
    the run fails; the item's traceback is in its saved stderr and reached the console, and no job is left."""
    done = flow_run(tmp_path, "nomad_flow.py", nomad_agent, bridge_s3, "--fail-item", "3")
    said = done.stdout + done.stderr
    assert done.returncode != 0, said[-6000:]
    run = facts(tmp_path, "NomadFlow", bridge_s3)
    assert not run["successful"]
    failed = next(item for item in run["items"] if item["index"] == 2)  # item 3
    assert not failed["successful"] and failed["attempt"] == 1 and failed["job"].endswith("-1")
    assert "RuntimeError: item 3 always fails" in failed["stderr"]
    assert "RuntimeError: item 3 always fails" in said and "Traceback (most recent call last)" in said
    assert jobs_left(nomad_agent, "mf-nomadflow-") == []


def test_a_lost_node_fails_the_attempt_and_retry_runs_it_again(
    tmp_path: Path, nomad_agent, bridge_s3: str, base_image: str
) -> None:
    """Nomad marks the allocations of a node that stopped answering ``lost``, with no ``Terminated`` event
    and, as the job asks for no rescheduling, nothing in their place: the attempt ends as lost and ``@retry``
    runs the item again as a job of its own. (The double loses a node when told to; a real agent's node is
    this runner, so the GitHub job skips this.)"""
    from metaflow_stack.engines.nomad.client import NomadClient
    from metaflow_stack.engines.nomad.watch import allocation_of

    if os.environ.get("NOMAD_ADDR"):
        pytest.skip("a real agent's only node is the machine running the tests")
    flow, jobs = running(
        tmp_path, nomad_agent, bridge_s3, 8, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lost = sorted(jobs)[0]
        with NomadClient(nomad_agent) as client:
            alloc = allocation_of(client, lost)
        headers = {"X-Nomad-Token": nomad_agent.token} if nomad_agent.token else {}
        answer = httpx.post(f"{nomad_agent.address}/_double/allocation/{alloc}/lose", headers=headers, timeout=30)
        assert answer.json() == {"lost": True}
        said, _ = flow.communicate(timeout=600)
    finally:
        if flow.poll() is None:
            flow.kill()
    assert flow.returncode == 0, said[-6000:]
    assert f"Nomad job {lost} lost: the node running it was lost" in said
    run = facts(tmp_path, "NomadFlow", bridge_s3)
    assert run["successful"] and run["values"] == [10, 20, 30]
    (again,) = [item for item in run["items"] if item["job"] == lost.removesuffix("-0") + "-1"]
    assert again["attempt"] == 1


def test_a_job_no_node_can_take_fails_at_once_with_nomads_reason(tmp_path: Path, nomad_agent, bridge_s3: str) -> None:
    started = time.monotonic()
    done = flow_run(tmp_path, "gpu_flow.py", nomad_agent, bridge_s3)
    assert done.returncode != 0 and time.monotonic() - started < 120
    said = done.stdout + done.stderr
    assert "Nomad cannot place the job" in said and "devices" in said and "fix:" in said
    assert "Traceback" not in said


@pytest.mark.parametrize(
    ("number", "to_group"), [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm-of-the-run"]
)
def test_stopping_the_run_purges_its_jobs(
    tmp_path: Path, nomad_agent, bridge_s3: str, docker_engine, number: int, to_group: bool
) -> None:
    """Ctrl-C (the terminal signals the runtime and every trampoline), or SIGTERM to the run's own process
    alone (a supervisor stopping it): either way no job is left on Nomad."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    flow, _ = running(tmp_path, nomad_agent, bridge_s3, 300, **popen)
    try:
        time.sleep(2)
        (os.killpg if to_group else os.kill)(flow.pid, number)
        assert flow.wait(timeout=120) != 0
    finally:
        if flow.poll() is None:
            flow.kill()
    deadline = time.monotonic() + 60
    while jobs_left(nomad_agent, "mf-nomadflow-") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs_left(nomad_agent, "mf-nomadflow-") == []


def test_a_step_runs_on_the_raw_exec_driver_as_a_process_of_the_client(
    tmp_path: Path, nomad_agent, bridge_s3: str
) -> None:
    done = flow_run(tmp_path, "raw_exec_flow.py", nomad_agent, bridge_s3)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    read = "{**{k: t[k].data for k in ('in_job', 'task_dir', 'cwd', 'limits', 'from_secret')}, 'stdout': t.stdout}"
    work = work_task(tmp_path, "RawExecFlow", read, bridge_s3)
    assert work["in_job"] and work["job"].startswith("mf-rawexecflow-")
    assert work["limits"] == ["500", "384"]  # @resources' CPU and memory, where @nomad names none
    assert work["from_secret"] == "kept"  # (@secrets' variables, set in the job)
    assert Path(work["cwd"]).is_relative_to(work["task_dir"])  # the task's own folder (raw_exec shares /tmp)
    assert f"raw_exec in {work['cwd']}" in work["stdout"] and "raw_exec in" in done.stdout + done.stderr
    assert "upload_failure" not in done.stdout + done.stderr


def test_a_run_another_item_failed_leaves_no_job_of_the_items_it_stopped(
    tmp_path: Path, nomad_agent, bridge_s3: str
) -> None:
    """One item fails for good while the others sleep: Metaflow's runtime ends the run and kills the other
    items' trampolines outright (SIGKILL), which no handler sees; each trampoline's watchdog child purges its
    job then, so none runs on until the next run's sweep."""
    started = time.monotonic()
    done = flow_run(tmp_path, "nomad_flow.py", nomad_agent, bridge_s3, "--fail-item", "3", "--sleep", "240")
    assert done.returncode != 0 and time.monotonic() - started < 200, (done.stdout + done.stderr)[-6000:]
    deadline = time.monotonic() + 60
    while jobs_left(nomad_agent, "mf-nomadflow-") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs_left(nomad_agent, "mf-nomadflow-") == []


def test_a_catch_fallback_attempt_runs_here_not_as_another_job(tmp_path: Path, nomad_agent, bridge_s3: str) -> None:
    """A job whose process dies: ``@catch``'s fallback attempt only records the failure, and the trampoline
    lets it run here, as ``@kubernetes`` does, and the run goes on."""
    done = flow_run(tmp_path, "catch_flow.py", nomad_agent, bridge_s3)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    work = work_task(
        tmp_path, "CatchFlow", "{'attempt': t.current_attempt, 'failure': str(t['failure'].data)}", bridge_s3
    )
    assert work["attempt"] == 1 and "Something in the execution environment caused" in work["failure"]
    assert work["job"] is None  # (the fallback attempt ran here: a job's attempt records its job)
    assert jobs_left(nomad_agent, "mf-catchflow-") == []


def test_a_timeout_stops_the_step_in_its_job(tmp_path: Path, nomad_agent, bridge_s3: str) -> None:
    """``@timeout`` runs in the task, in the job: the step is stopped there after its seconds, not after the
    two minutes it would sleep, and no job is left."""
    started = time.monotonic()
    done = flow_run(tmp_path, "timeout_flow.py", nomad_agent, bridge_s3)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and time.monotonic() - started < 100, said[-6000:]
    assert "Step work timed out after 0 hours, 0 minutes, 3 seconds" in said
    assert jobs_left(nomad_agent, "mf-timeoutflow-") == []


def test_a_pypi_step_runs_in_its_own_environment_made_in_the_job(tmp_path: Path, nomad_agent, bridge_s3: str) -> None:
    """``--environment pypi``: the step's packages are solved here for linux-64, kept in the datastore, and the
    job makes the environment from them (Metaflow's own bootstrap, in the job's script) before the step runs
    in its interpreter. Metaflow solves with micromamba and the job fetches it from conda-forge: the GitHub
    clusters job runs this against a real agent; these machines reach neither."""
    need("micromamba", shutil.which("micromamba") is not None, "Metaflow's @pypi solves environments with micromamba")
    done = flow_run(tmp_path, "pypi_flow.py", nomad_agent, bridge_s3, top=("--environment", "pypi"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    said = [line.split() for line in (done.stdout + done.stderr).splitlines() if "six 1.16.0 in prefix " in line]
    assert said, (done.stdout + done.stderr)[-3000:]
    prefix, six_file = said[-1][-3], said[-1][-1]
    # The step ran in the environment's interpreter (the image's is /usr/local), whose own packages hold six.
    assert prefix != "/usr/local" and six_file.startswith(prefix + "/"), said[-1]


#: Run in a subprocess with the service's settings: deploy FLOW, trigger it once for each of the PARAMETERS
#: given as JSON (the last time through DeployedFlow.from_nomad), wait for each run, report the runs' tags and
#: artifacts.
DEPLOY = """
import json, sys, time
from metaflow import Deployer
from metaflow_stack.engines.nomad.client import NomadClient

flow, root, name, runs, top = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
deployer = Deployer(flow, show_output=False, datastore="s3", datastore_root=root, metadata="service", **top)
deployed = deployer.nomad(name=name).create(
    cpu=0.5, memory=1024, env_var=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"]
)
triggered, found = [], []
for index, given in enumerate(runs):  # each triggered at once: they run side by side, as dispatches do
    if index == len(runs) - 1:  # the last through the deployment as another process finds it: by its name alone
        import os, warnings
        from metaflow.runner.deployer import DeployedFlow

        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            listed = [d.deployer.name for d in DeployedFlow.list_nomad(deployed.flow_name)]
        assert listed == [name], listed  # (a forged job of the same flow's name is skipped, and said so)
        forged = os.environ.get("FORGED_JOB")
        assert not forged or any(f"the Nomad job {forged}: its metaflow.parameters" in str(w.message) for w in seen)
        deployed = DeployedFlow.from_nomad(name)
    triggered.append(deployed.trigger(**given))
for each in triggered:
    run = each.wait_for_run(check_interval=1, timeout=300)
    job = next(tag.split(":", 1)[1] for tag in run.tags if tag.startswith("nomad-job:"))
    deadline = time.monotonic() + 600
    with NomadClient() as nomad:  # (a failed run never finishes: its job's end says it is over)
        while not run.finished and time.monotonic() < deadline:
            allocs, _ = nomad.allocations(job)
            if allocs and all(a["ClientStatus"] in ("complete", "failed", "lost") for a in allocs):
                break
            time.sleep(2)
    pooled = run["each"] if any(s.id == "each" for s in run) else []
    found.append({"pathspec": run.pathspec, "successful": run.successful, "tags": sorted(run.tags),
                  "artifacts": {a.id: a.data for a in run.end_task} if run.successful else None,
                  "workers": sorted({t.metadata_dict.get("worker-pool", "") for t in pooled})})
print(json.dumps(found))
"""


def _deploy(
    tmp_path: Path, flow: str, runs: list[dict], nomad_agent, s3: str, service, name: str | None = None,
    forged: str | None = None, **top: str,
) -> tuple[str, list[dict]]:  # fmt: skip
    tmp_path.mkdir(exist_ok=True)
    shutil.copy(FLOWS / flow, tmp_path)
    name = name or f"metaflow-test-{uuid.uuid4().hex[:8]}"
    root = f"s3://sandbox/deployed-{uuid.uuid4().hex[:8]}"
    line = [sys.executable, "-c", DEPLOY, flow, root, name, json.dumps(runs), json.dumps(top)]
    env = _deploying(nomad_agent, s3, service) | ({"FORGED_JOB": forged} if forged else {})
    done = subprocess.run(line, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return name, json.loads(done.stdout.strip().splitlines()[-1])


def _deploying(nomad_agent, s3: str, service) -> dict[str, str]:
    """The environment a deployment is made in: the S3 double, the metadata service, the Nomad agent."""
    from service_servers import KEYED

    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "METAFLOW_S3_ENDPOINT_URL": s3,
        "METAFLOW_DEFAULT_METADATA": "service",  # (where TriggeredRun.run looks)
        "METAFLOW_SERVICE_URL": service.url,
        "METAFLOW_SERVICE_AUTH_KEY": KEYED["METAFLOW_STACK_SERVICE_AUTH_KEY"],
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NOMAD_ADDR": nomad_agent.address,
        "METAFLOW_NOMAD_ADDR": nomad_agent.address,  # (this machine's: the job reaches its own agent instead)
        **({"NOMAD_TOKEN": nomad_agent.token} if nomad_agent.token else {}),
    }


def test_a_job_nomad_refuses_leaves_the_deployment_it_would_replace(
    tmp_path: Path, nomad_agent, bridge_s3: str, bridge_address: str
) -> None:
    """Nomad turns no job periodic, so a create that makes a dispatched deployment scheduled removes the old job
    first: when Nomad then refused the new one (here a size under its minimum) no deployment was left. The
    job is now validated before anything changes."""
    from service_servers import KEYED, start_service

    from metaflow_stack.engines.nomad.client import NomadClient

    service = start_service(str(tmp_path / "metadata.db"), tmp_path / "service.log", host=bridge_address, env=KEYED)
    env, name = _deploying(nomad_agent, bridge_s3, service), f"metaflow-test-{uuid.uuid4().hex[:8]}"
    try:
        for flow in ("deployed_flow.py", "scheduled_flow.py"):
            shutil.copy(FLOWS / flow, tmp_path)
        top = ["--datastore", "s3", "--datastore-root", f"s3://sandbox/refused-{name}", "--metadata", "service"]
        spec = 'environment:vars={"NOTE": "it\'s \\"quoted\\""}'
        for flow, memory, code in (("deployed_flow.py", "1024", 0), ("scheduled_flow.py", "5", 1)):
            line = [sys.executable, flow, *top, "--with", spec, "nomad", "--name", name, "create", "--cpu", "0.5"]
            done = subprocess.run([*line, "--memory", memory], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)  # fmt: skip
            assert done.returncode == code, (done.stdout + done.stderr)[-3000:]
        assert f"Nomad refuses the job {name}:" in done.stderr and "(the deployment is unchanged)" in done.stderr
        assert "Traceback" not in done.stderr
        with NomadClient(nomad_agent) as client:
            job = client.job(name)
        assert job["ParameterizedJob"] and not job.get("Periodic")  # the dispatched deployment, as it was
        # Its runs get the decorator it was created --with as it was given (once quoted for the shell, not twice).
        script = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"][-1]
        words = shlex.split(script.rsplit(" && exec ", 1)[1])
        assert words[words.index("--with") + 1].startswith("environment:vars="), words
    finally:
        _remove_deployments(nomad_agent)
        service.stop()


def _forged_deployment(nomad_agent, flow: str) -> str:
    """A job that says it is a deployment of ``flow`` but whose ``Meta`` ``create`` would not write (a parameter
    type that is Python code), registered as parameterized so that nothing runs; its ID."""
    from metaflow_stack.engines.nomad.client import NomadClient
    from metaflow_stack.engines.nomad.jobspec import Placement, task_job
    from metaflow_stack.nomad.deployment import DEPLOYED

    name = f"metaflow-test-forged-{uuid.uuid4().hex[:8]}"
    parameters = {"a": {"python_var_name": "a", "name": "a", "type": "__import__('os')", "is_required": False}}
    meta = {DEPLOYED: "true", "metaflow.flow": flow, "metaflow.parameters": json.dumps(parameters)}
    job = task_job(name, ["true"], {}, Placement(cpu=0.1, memory=64, image="busybox"), meta)
    job["ParameterizedJob"] = {}
    with NomadClient(nomad_agent) as client:
        client.register(job)
    return name


def _remove_deployments(nomad_agent) -> None:
    """The tests' deployed jobs purged, with the variables their credentials were kept in."""
    from metaflow_stack.engines.nomad.client import NomadClient

    with NomadClient(nomad_agent) as client:
        for job in client.jobs("metaflow-test-"):
            client.deregister(job["ID"])
            if not job.get("ParentID"):
                client.delete_variable(f"nomad/jobs/{job['ID']}")


def test_a_deployed_flow_runs_once_per_trigger_with_its_parameters(
    tmp_path: Path, nomad_agent, bridge_s3: str, bridge_address: str
) -> None:
    """Dispatched (parameters given, then their defaults), on the @project branch it was deployed from, its
    foreach on a worker pool inside the job, and a scheduled flow's periodic job run now."""
    from service_servers import KEYED, start_service

    from metaflow_stack.engines.nomad.client import NomadClient

    service = start_service(str(tmp_path / "metadata.db"), tmp_path / "service.log", host=bridge_address, env=KEYED)
    try:
        forged = _forged_deployment(nomad_agent, "DeployedFlow")  # anyone who may submit a job can write its Meta
        runs = [{"alpha": 21, "greeting_word": "hi"}, {}]
        with ThreadPoolExecutor(2) as both:  # the two deployments side by side, each in its own folder
            dispatched = both.submit(_deploy, tmp_path / "dispatched", "deployed_flow.py", runs, nomad_agent,
                                     bridge_s3, service, forged=forged, branch="ci")  # fmt: skip
            periodic = both.submit(_deploy, tmp_path / "periodic", "scheduled_flow.py", [{}], nomad_agent, bridge_s3,
                                   service)  # fmt: skip
            (name, (given, defaults)), (_, (scheduled,)) = dispatched.result(), periodic.result()
        assert given["successful"] and given["artifacts"]["total"] == 63 and given["artifacts"]["said"] == "hi"
        assert defaults["successful"] and defaults["artifacts"]["total"] == 3
        assert defaults["artifacts"]["said"] == "hello" and given["pathspec"] != defaults["pathspec"]
        assert given["workers"] and all(w.startswith("each@") for w in given["workers"])  # (a pool in the job)
        assert any(tag.startswith(f"nomad-job:{name}/dispatch-") for tag in given["tags"])
        assert "project_branch:test.ci" in given["tags"]  # the branch deployed from, not the job's user
        assert scheduled["successful"] and scheduled["artifacts"]["squared"] == 16
        assert any("/periodic-" in tag for tag in scheduled["tags"])
        with NomadClient(nomad_agent) as client:
            assert client.job(name)["ParameterizedJob"]["MetaOptional"] == ["alpha", "greeting-word"]
    finally:
        _remove_deployments(nomad_agent)
        service.stop()


def test_a_deployed_flows_nomad_step_runs_as_a_job_its_job_starts_as_its_workload(
    tmp_path: Path, nomad_agent, bridge_s3: str, bridge_address: str
) -> None:
    """The deployed flow's job starts its @nomad step's job through its agent's Task API, with its own
    workload identity (no token of the deployer's in the job); where ACLs are on (the double here), the
    policy ``nomad create`` bound to the job is what lets it."""
    from service_servers import KEYED, start_service

    from metaflow_stack.engines.nomad.client import NomadClient
    from metaflow_stack.engines.nomad.watch import follow
    from metaflow_stack.nomad.deployment import steps_policy

    service = start_service(str(tmp_path / "metadata.db"), tmp_path / "service.log", host=bridge_address, env=KEYED)
    try:
        name, (done,) = _deploy(tmp_path, "deployed_steps_flow.py", [{"alpha": 3}], nomad_agent, bridge_s3, service)
        policy = f"{nomad_agent.address}/v1/acl/policy/{steps_policy(name, 'default', ['default'])[0]}"
        management = {"X-Nomad-Token": nomad_agent.token or ""}
        assert done["successful"], done
        artifacts = done["artifacts"]
        assert artifacts["total"] == 63 and artifacts["runner_job"].startswith(f"{name}/dispatch-")
        assert artifacts["step_job"].startswith("mf-deployedstepsflow-")  # a job of its own, then purged
        assert jobs_left(nomad_agent, "mf-deployedstepsflow-") == []
        with NomadClient(nomad_agent) as client:
            task = client.job(name)["TaskGroups"][0]["Tasks"][0]
            assert task["Identity"]["Env"] is True
            assert "NOMAD_TOKEN" not in task["Env"] and "METAFLOW_NOMAD_ADDR" not in task["Env"]
            # The credentials are in the job's own variable, which its runs read, not in its spec.
            kept = client.variable(f"nomad/jobs/{name}")
            for secret in ("METAFLOW_SERVICE_AUTH_KEY", "AWS_SECRET_ACCESS_KEY"):
                assert secret in kept and secret not in task["Env"]
            acls = client.acls_enabled()
        if acls:  # deployed again without @nomad steps: the policy that let them start jobs goes
            assert httpx.get(policy, headers=management).status_code == 200
            _deploy(tmp_path / "again", "deployed_flow.py", [], nomad_agent, bridge_s3, service, name=name)
            assert httpx.get(policy, headers=management).status_code == 404
        with NomadClient(nomad_agent) as client:  # a run whose credentials are gone ends at once, saying so
            client.delete_variable(f"nomad/jobs/{name}")
            child, eval_id = client.dispatch(name, {})
            lines: list[tuple[str, str]] = []
            ending = follow(client, child, eval_id, lambda kind, line: lines.append((kind, line)))
        said = [line for kind, line in lines if kind == "stderr"]
        assert ending.code == 1 and any(f"Nomad Variable nomad/jobs/{name} could not be read" in s for s in said)
        assert not any("job.tar" in line for line in said), said  # (nothing ran after it)
    finally:
        _remove_deployments(nomad_agent)
        service.stop()


def test_a_token_that_cannot_bind_the_steps_policy_or_keep_the_secrets_is_told_how(nomad_agent) -> None:
    """Nor write the job's variable for its credentials: one line naming the rule."""
    from metaflow_stack.engines.nomad.client import NomadClient
    from metaflow_stack.errors import StackError
    from metaflow_stack.nomad.deployment import grant_steps, keep_secrets

    with NomadClient(nomad_agent) as client:
        if not client.acls_enabled():
            pytest.skip("the agent has no ACLs (the GitHub job's dev agent): there is no policy to bind")
        client.put_policy("elsewhere", 'namespace "elsewhere" { capabilities = ["list-jobs"] }', "A token's")
        weak = client.create_token("elsewhere-only", ["elsewhere"])["SecretID"]
    with NomadClient(replace(nomad_agent, token=weak)) as client:
        command = grant_steps(client, "metaflow-some-flow", ["default", "batch"], granted_before=False)
        revoke = grant_steps(client, "metaflow-some-flow", [], granted_before=True)
        with pytest.raises(StackError) as refused:
            keep_secrets(client, "metaflow-some-flow", {"AWS_SECRET_ACCESS_KEY": "x"}, kept_before=False)
        purge = keep_secrets(client, "metaflow-some-flow", {}, kept_before=True)
    assert command is not None and "nomad acl policy apply -namespace default -job metaflow-some-flow" in command
    assert 'namespace "batch"' in command and '"submit-job"' in command
    assert revoke is not None and revoke.startswith("nomad acl policy delete metaflow-some-flow-")
    assert "nomad/jobs/metaflow-some-flow" in refused.value.message
    assert 'variables { path "nomad/jobs/*"' in refused.value.fix
    assert purge == "nomad var purge -namespace default nomad/jobs/metaflow-some-flow"
    with NomadClient(nomad_agent) as client:  # a token that may: the variable an earlier create wrote goes
        client.put_variable("nomad/jobs/metaflow-some-flow", {"KEY": "kept"})
        assert keep_secrets(client, "metaflow-some-flow", {}, kept_before=True) is None
        with pytest.raises(StackError):
            client.variable("nomad/jobs/metaflow-some-flow")


def test_a_task_whose_token_cannot_keep_its_credentials_is_told_once_and_leaves_nothing(
    nomad_agent, capsys: pytest.CaptureFixture
) -> None:
    """A token that may submit jobs but not write their variables: the task stops before its job is
    registered, in one line naming the rule, with no word of a variable to remove (none was written)."""
    from metaflow_stack.engines.nomad.client import NomadClient
    from metaflow_stack.engines.nomad.jobspec import Placement
    from metaflow_stack.nomad import task

    with NomadClient(nomad_agent) as client:
        if not client.acls_enabled():
            pytest.skip("the agent has no ACLs (the GitHub job's dev agent): every token may write variables")
        rules = 'namespace "default" { capabilities = ["submit-job", "read-job", "list-jobs", "read-logs"] }'
        client.put_policy("jobs-only", rules, "A token's")
        weak = client.create_token("jobs-only", ["jobs-only"])["SecretID"]
    job = f"mf-unkept-{uuid.uuid4().hex[:8]}"
    with NomadClient(replace(nomad_agent, token=weak)) as client, pytest.raises(task.NotKept) as refused:
        secrets = {"METAFLOW_SERVICE_AUTH_KEY": "k"}
        task.run(client, job, ["true"], {}, Placement(driver="raw_exec", cpu=0.1, memory=32), {}, secrets)
    assert f"may not write the variable nomad/jobs/{job}" in refused.value.message
    assert "variable" not in capsys.readouterr().err  # (nothing said of one to remove)
    assert jobs_left(nomad_agent, job) == []


def test_a_variable_the_token_cannot_remove_is_named_with_the_command_for_its_namespace(nomad_agent) -> None:
    """The Nomad pool, a task's job and its trampoline's kill all remove a job's variable one way: where
    the token may not, one line says what may be left and the command, in the job's namespace and region
    (an operator's ``nomad var purge`` without them looks in ``default``)."""
    from metaflow_stack.engines.nomad.client import NomadClient
    from metaflow_stack.engines.nomad.job_variable import forget, variable_path

    job, namespace = f"mf-kept-{uuid.uuid4().hex[:8]}", f"mf-ns-{uuid.uuid4().hex[:8]}"
    with NomadClient(nomad_agent) as client:
        if not client.acls_enabled():
            pytest.skip("the agent has no ACLs (the GitHub job's dev agent): every token may remove variables")
        client.put_namespace(namespace, "a pool's own")
        client.put_policy("reads-only", f'namespace "{namespace}" {{ capabilities = ["read-job"] }}', "A token's")
        weak = client.create_token("reads-only", ["reads-only"])["SecretID"]
    there = nomad_agent.at(namespace, None)
    with NomadClient(there) as client:
        client.put_variable(variable_path(job), {"METAFLOW_SERVICE_AUTH_KEY": "k"})
        try:
            with NomadClient(replace(there, token=weak)) as weakly:
                left = forget(weakly, job)
            assert client.variable(variable_path(job))  # (still there: said so)
            assert forget(client, job) is None and forget(client, job) is None  # (gone, and gone again)
        finally:
            client.delete_variable(variable_path(job))
    assert left is not None and left.startswith(f"the Nomad variable nomad/jobs/{job} may be left")
    assert left.endswith(f": nomad var purge -namespace {namespace} nomad/jobs/{job}")


def test_a_local_datastore_is_refused_in_one_line(tmp_path: Path) -> None:
    """A Nomad job runs on another machine: the run's datastore must be one it reaches."""
    shutil.copy(FLOWS / "nomad_flow.py", tmp_path)
    env = {**os.environ, "METAFLOW_DEFAULT_METADATA": "local"}
    line = [sys.executable, "nomad_flow.py", "--datastore-root", str(tmp_path / ".metaflow"), "run"]
    done = subprocess.run(line, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--datastore s3" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("flow", "edit", "words"),
    [
        ("deployed_flow.py", {}, "--metadata service"),
        (
            "nomad_flow.py",
            {"@nomad(cpu=0.5, memory=512)": "@kubernetes(cpu=0.5, memory=512)", ", nomad,": ", kubernetes,"},
            "step each: a deployed flow runs its steps inside its Nomad job, so @kubernetes cannot apply",
        ),
        (
            "deployed_flow.py",
            {"@worker_pool(size=2)": '@worker_pool(size=2, backend="nomad")'},
            "step each: a deployed flow runs its steps inside its Nomad job, which cannot start a worker pool's nomad",
        ),
    ],
    ids=["local-metadata", "compute-decorator", "cluster-pool"],
)
def test_what_a_deployed_flow_cannot_honour_is_refused_in_one_line(
    tmp_path: Path, flow: str, edit: dict[str, str], words: str
) -> None:
    text = (FLOWS / flow).read_text()
    for old, new in edit.items():
        text = text.replace(old, new)
    (tmp_path / flow).write_text(text)
    env = {**os.environ, "METAFLOW_DEFAULT_METADATA": "local"}
    line = [sys.executable, flow, "--datastore", "s3", "--datastore-root", "s3://sandbox/x", "nomad", "create"]
    done = subprocess.run(line, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and words in done.stderr and "Traceback" not in done.stderr
