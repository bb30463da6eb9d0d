"""engines/docker runs jobs as containers: exit codes, logs, limits, kill and cleanup."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from conftest import TEST_LABELS

from metaflow_stack.demo import FLOW_FILE
from metaflow_stack.engines import JOB_LABEL, OWNER_LABEL, JobSpec, Mount, get_engine
from metaflow_stack.engines.docker import DockerEngine
from metaflow_stack.errors import StackError

pytestmark = pytest.mark.docker


def _spec(image: str, script: str, labels: dict[str, str] | None = None, **kwargs) -> JobSpec:
    labels = {**TEST_LABELS, **(labels or {})}
    return JobSpec(image=image, command=["sh", "-c", script], labels=labels, **kwargs)


@pytest.fixture
def engine(docker_engine):
    return get_engine("docker")


def test_job_returns_its_exit_code_and_logs(engine, base_image: str) -> None:
    job = engine.launch(_spec(base_image, "echo to-stdout; echo to-stderr >&2; exit 7"))
    try:
        assert job.wait(timeout=60) == 7
        assert job.exit_code == 7
        lines = list(job.logs())
        assert "to-stdout" in lines
        assert "to-stderr" in lines
    finally:
        job.kill()


def test_logs_follow_a_running_job(engine, base_image: str) -> None:
    job = engine.launch(_spec(base_image, "for i in 1 2 3; do echo line-$i; sleep 0.2; done"))
    try:
        assert list(job.logs(follow=True)) == ["line-1", "line-2", "line-3"]
        assert job.wait() == 0
    finally:
        job.kill()


def test_wait_with_timeout_raises_while_the_job_runs(engine, base_image: str) -> None:
    job = engine.launch(_spec(base_image, "sleep 30"))
    try:
        with pytest.raises(TimeoutError):
            job.wait(timeout=0.5)
        assert job.exit_code is None
    finally:
        job.kill()


def test_kill_stops_and_removes_the_container(engine, docker_engine, base_image: str) -> None:
    job = engine.launch(_spec(base_image, "sleep 30"))
    job.kill()
    assert not docker_engine.container.exists(job.id)


def test_limits_labels_and_dropped_privileges_reach_the_container(engine, docker_engine, base_image: str) -> None:
    job = engine.launch(_spec(base_image, "true", cpu=0.5, memory="256m", labels={"purpose": "limits"}))
    try:
        job.wait(timeout=60)
        host = docker_engine.container.inspect(job.id).host_config
        assert host.nano_cpus == 500_000_000
        assert host.memory == 256 * 1024 * 1024
        assert host.cap_drop == ["ALL"]
        assert "no-new-privileges" in host.security_opt
        labels = docker_engine.container.inspect(job.id).config.labels
        assert labels["purpose"] == "limits"
        assert labels["io.metaflow-stack.job"] == "true"
    finally:
        job.kill()


def test_cleanup_removes_only_jobs_with_the_given_labels(engine, docker_engine, base_image: str) -> None:
    keep = engine.launch(_spec(base_image, "sleep 30"))
    doomed = [
        engine.launch(JobSpec(base_image, ["sleep", "30"], labels={**TEST_LABELS, "batch": "doomed"})) for _ in range(2)
    ]
    try:
        assert engine.cleanup({"batch": "doomed"}) == 2
        assert not any(docker_engine.container.exists(j.id) for j in doomed)
        assert docker_engine.container.exists(keep.id)
    finally:
        keep.kill()


def _flow_job(image: str, flow: Path, datastore: Path, *flow_args: str) -> JobSpec:
    return JobSpec(
        image=image,
        command=["python", f"/flows/{flow.name}", "--datastore-root", str(datastore), *flow_args],
        env={"USER": "tester", "HOME": "/tmp"},
        mounts=[Mount(str(flow.parent), "/flows"), Mount(str(datastore), str(datastore), read_only=False)],
        user=f"{os.getuid()}:{os.getgid()}",
        labels=TEST_LABELS,
    )


def test_flow_launched_through_the_engine_returns_exit_code_and_logs(engine, base_image: str, tmp_path: Path) -> None:
    datastore = tmp_path / ".metaflow"
    datastore.mkdir()
    job = engine.launch(_flow_job(base_image, FLOW_FILE, datastore, "run"))
    try:
        output = "\n".join(job.logs(follow=True))
        assert job.wait() == 0
    finally:
        job.kill()
    assert "hello from" in output
    assert "Done!" in output
    assert (datastore / "HelloFlow" / "latest_run").is_file()


def test_failing_flow_step_returns_a_non_zero_exit_code(engine, base_image: str, tmp_path: Path) -> None:
    flow = tmp_path / "flows" / "fail_flow.py"
    flow.parent.mkdir()
    flow.write_text(
        "from metaflow import FlowSpec, step\n"
        "class FailFlow(FlowSpec):\n"
        "    @step\n"
        "    def start(self):\n"
        "        raise RuntimeError('boom in start')\n"
        "        self.next(self.end)\n"
        "    @step\n"
        "    def end(self):\n"
        "        pass\n"
        "if __name__ == '__main__':\n"
        "    FailFlow()\n"
    )
    datastore = tmp_path / ".metaflow"
    datastore.mkdir()
    started = time.monotonic()
    job = engine.launch(_flow_job(base_image, flow, datastore, "run"))
    try:
        code = job.wait(timeout=120)
        output = "\n".join(job.logs())
    finally:
        job.kill()
    assert code != 0
    assert "boom in start" in output
    assert time.monotonic() - started < 120


def test_the_host_address_is_the_bridge_gateway_however_docker_reports_it(docker_engine, base_image: str) -> None:
    from metaflow_stack.engines.docker import gateway_of, host_address

    # Both shapes engines report for the bridge's IPAM config: with its gateway, and with the subnet only.
    assert gateway_of([{"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}]) == "172.17.0.1"
    assert gateway_of([{"Subnet": "fd00::/64"}, {"Subnet": "10.99.0.0/24"}]) == "10.99.0.1"
    # What this engine's host-gateway stands for, as a container sees it.
    seen = docker_engine.run(
        base_image,
        ["getent", "hosts", "host.docker.internal"],
        add_hosts=[("host.docker.internal", "host-gateway")],
        remove=True,
    )
    assert seen.split()[0] == host_address(docker_engine)


def test_the_engine_refuses_a_multi_line_variable_rather_than_put_it_on_the_command_line(
    docker_engine, base_image: str
) -> None:
    mark = {**TEST_LABELS, "sandbox-test": uuid.uuid4().hex}
    with pytest.raises(StackError, match="variable PEM: its value spans lines"):
        DockerEngine().launch(JobSpec(image=base_image, command=["true"], env={"PEM": "a\nb"}, labels=mark))
    assert docker_engine.container.list(all=True, filters=[("label", f"sandbox-test={mark['sandbox-test']}")]) == []


def test_a_jobs_labels_cannot_replace_the_engines_own(docker_engine, base_image: str) -> None:
    labels = {**TEST_LABELS, JOB_LABEL: "false", OWNER_LABEL: "stack-up", "team": "ml"}
    job = DockerEngine().launch(JobSpec(image=base_image, command=["true"], labels=labels, owner="devcontainer"))
    try:
        given = docker_engine.container.inspect(job.id).config.labels
    finally:
        job.remove()
    assert (given[JOB_LABEL], given[OWNER_LABEL], given["team"]) == ("true", "devcontainer", "ml")


def test_a_port_another_process_holds_is_named_in_the_fix(engine, base_image: str) -> None:
    """``docker run`` cannot publish a port something else listens on: the fix names the port, not the image
    (a local stack's service on a port another program took said to check the image's name)."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(StackError) as refused:
            engine.launch(_spec(base_image, "sleep 30", ports={8080: port}))
    assert f"another process holds port {port}: choose another" in str(refused.value.fix)
