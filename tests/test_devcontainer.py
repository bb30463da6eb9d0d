"""``@devcontainer`` on real runs in Docker: a foreach whose items run in sandboxed containers (a
retried item, a failing one), the sandbox's limits seen from inside, and no container left behind,
also when the run is stopped while its items run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import VENV_BIN
from service_servers import FLOWS

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FLOW = "devcontainer_flow.py"
LABEL = "io.metaflow-stack.devcontainer"


def flow_command(root: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    shutil.copy(FLOWS / FLOW, root)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "METAFLOW_DEFAULT_METADATA": "local"}
    env["STACK_TEST_HOST_SECRET"] = "not for the sandbox"
    return [sys.executable, FLOW, "--datastore-root", str(root / ".metaflow"), "run", *args], env


def step_containers(docker_engine) -> list:
    return docker_engine.container.list(all=True, filters=[("label", LABEL)])


#: Read in a subprocess: Metaflow's client keeps one datastore root per process, which the suite's own
#: in-process reads (the iris run) must keep.
FACTS = """
import json, sys
from metaflow import Flow, metadata, namespace
metadata("local@" + sys.argv[1])
namespace(None)
run = Flow("DevcontainerFlow").latest_run
names = ("in_container", "hostname", "uid", "memory_limit", "network", "root_writable", "host_variable_seen",
         "folder_writable", "step_setting", "stores_written")
items = [
    {"index": t.index, "successful": t.successful, "attempt": t.current_attempt, "stdout": t.stdout,
     "stderr": t.stderr, **({n: getattr(t.data, n) for n in names} if t.successful else {})}
    for t in run["each"]
]
values = run["join"].task.data.values if run.successful else None
print(json.dumps({"successful": run.successful, "values": values, "items": items}))
"""


def run_of(root: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", FACTS, str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_items_run_sandboxed_in_containers_and_a_failed_attempt_is_retried(docker_engine, tmp_path: Path) -> None:
    command, env = flow_command(tmp_path, "--max-workers", "3")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    run = run_of(tmp_path)
    assert run["successful"] and run["values"] == [10, 20, 30]
    items = run["items"]
    assert len(items) == 3
    for task in items:
        assert task["in_container"] and task["hostname"] != os.uname().nodename
        assert task["uid"] == os.getuid()
        assert task["memory_limit"] == str(512 * 1024 * 1024)
        assert task["network"] == "none" and task["root_writable"] is False
        assert task["host_variable_seen"] is False and task["folder_writable"] is True
        assert task["step_setting"] == "set by @environment"  # (the step's @environment reaches its container)
        assert task["stores_written"] == {"own": True, "other": False}  # (its flow's folder only: flow_mounts)
    assert not (tmp_path / ".metaflow" / "OtherFlow").exists()
    retried = next(t for t in items if t["index"] == 1)  # item 2
    assert retried["attempt"] == 1 and "item 2 in" in retried["stdout"]
    assert step_containers(docker_engine) == []


def test_a_pooled_step_runs_its_items_in_one_sandboxed_container(docker_engine, tmp_path: Path) -> None:
    """``--with worker_pool`` over ``@devcontainer``: the pool's workers are the processes of one container
    of the step's image and sandbox; every item (the retried one too) is a task of its own, run in it."""
    command, env = flow_command(tmp_path, "--with", "worker_pool:size=2")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "worker pool each: 3/3 done" in done.stdout + done.stderr
    run = run_of(tmp_path)
    assert run["successful"] and run["values"] == [10, 20, 30]
    items = run["items"]
    assert len({task["hostname"] for task in items}) == 1  # one container
    for task in items:
        assert task["in_container"] and task["hostname"] != os.uname().nodename and task["uid"] == os.getuid()
        assert task["memory_limit"] == str(512 * 1024 * 1024)
        assert task["network"] == "none" and task["root_writable"] is False
        assert task["host_variable_seen"] is False and task["folder_writable"] is True
        assert task["step_setting"] == "set by @environment"
    retried = next(t for t in items if t["index"] == 1)  # item 2
    assert retried["attempt"] == 1 and "item 2 in" in retried["stdout"]
    assert step_containers(docker_engine) == []


def test_a_failing_item_fails_the_run_with_its_exception(docker_engine, tmp_path: Path) -> None:
    command, env = flow_command(tmp_path, "--fail-item", "3")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode != 0 and "item 3 always fails" in done.stdout + done.stderr
    run = run_of(tmp_path)
    failed = [t for t in run["items"] if not t["successful"]]
    assert len(failed) == 1 and "item 3 always fails" in failed[0]["stderr"]
    assert step_containers(docker_engine) == []


def test_a_run_another_item_failed_leaves_no_container_of_the_items_it_stopped(docker_engine, tmp_path: Path) -> None:
    """One item fails for good while the others sleep: Metaflow's runtime ends the run and kills the other
    items' trampolines outright (SIGKILL), which no handler sees; each trampoline's watchdog child removes
    its container then, so none sleeps on until the next run's sweep."""
    command, env = flow_command(tmp_path, "--fail-item", "3", "--sleep", "240", "--max-workers", "3")
    started = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode != 0 and "item 3 always fails" in done.stdout + done.stderr
    assert time.monotonic() - started < 200, (done.stdout + done.stderr)[-4000:]
    deadline = time.monotonic() + 60
    while step_containers(docker_engine) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert step_containers(docker_engine) == []


@pytest.mark.parametrize("pooled", [False, True], ids=["container-per-task", "pooled"])
def test_stopping_a_run_removes_its_containers(docker_engine, tmp_path: Path, pooled: bool) -> None:
    """Ctrl-C while the items run: no container is left, be it one per task or a pool's."""
    command, env = flow_command(tmp_path, "--sleep", "300", *(["--with", "worker_pool:size=3"] if pooled else []))
    flow = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        started = 0
        for line in flow.stdout:  # the items' tasks start (each prints once it has slept: not before)
            started += b"/each/" in line and b"Task is starting" in line
            if started == 3:
                break
        deadline = time.monotonic() + 600
        while len(step_containers(docker_engine)) < (1 if pooled else 3):
            assert flow.poll() is None and time.monotonic() < deadline, "the items never started"
            time.sleep(0.5)
        time.sleep(2)  # (the items reach their sleep)
        os.killpg(flow.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the runtime and every task
        assert flow.wait(timeout=120) != 0
    finally:
        if flow.poll() is None:
            flow.kill()
    deadline = time.monotonic() + 30
    while step_containers(docker_engine) and time.monotonic() < deadline:
        time.sleep(0.5)
    # A task Metaflow's runtime SIGKILLed before it cleaned up (a busy machine) leaves an orphan, which the
    # next run on this machine removes: what is left after that must be nothing.
    from metaflow_stack.devcontainer.launch import remove_orphans
    from metaflow_stack.engines.docker import DockerEngine

    remove_orphans(DockerEngine())
    assert step_containers(docker_engine) == []


def test_a_pools_container_ends_when_its_runtime_is_killed_outright(docker_engine, tmp_path: Path) -> None:
    """SIGKILL to the run's runtime alone (no cleanup runs): the pool's server sees its lifeline close,
    kills its tasks and ends, so its container stops; the next run's sweep removes it."""
    command, env = flow_command(tmp_path, "--sleep", "300", "--with", "worker_pool:size=3")
    # The pool's folder in a temporary folder of this test's own: any pool another test starts on this machine
    # removes the folders of ended runtimes in its own temporary folder (``PoolFolder``'s sweep), which would
    # take this one's before this test looks. (Short: the pool's socket path must fit in 107 bytes.)
    env["TMPDIR"] = private = tempfile.mkdtemp(prefix="mf-test-")
    flow = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        started = 0
        for line in flow.stdout:
            started += b"/each/" in line and b"Task is starting" in line
            if started == 3:
                break
        flow.kill()  # the runtime only: its trampolines, in its session, are killed below
        flow.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flow.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while any(c.state.running for c in step_containers(docker_engine)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(c.state.running for c in step_containers(docker_engine))
    from metaflow_stack.devcontainer.launch import POOL_FOLDER, remove_orphans
    from metaflow_stack.engines.docker import DockerEngine

    try:
        folders = [Path(f) for c in step_containers(docker_engine) if (f := c.config.labels.get(POOL_FOLDER))]
        assert len(folders) == 1 and folders[0].is_dir()  # (the runtime that would have removed it is gone)
        remove_orphans(DockerEngine())
        assert step_containers(docker_engine) == []
        assert not folders[0].exists()
    finally:
        shutil.rmtree(private)


def test_containers_of_a_killed_trampoline_are_removed_by_the_next_run(docker_engine, base_image: str) -> None:
    from conftest import ended_launcher

    from metaflow_stack.devcontainer.launch import LABEL as STEP
    from metaflow_stack.devcontainer.launch import OWNER, remove_orphans
    from metaflow_stack.elsewhere import Launcher
    from metaflow_stack.engines import JobSpec
    from metaflow_stack.engines.docker import DockerEngine

    engine = DockerEngine()
    remove_orphans(engine)  # a clean slate: earlier tests' orphans are not this test's
    owners = {"orphan": ended_launcher(), "alive": Launcher.this().label, "another tool's": "host:1"}
    jobs = {
        name: engine.launch(JobSpec(image=base_image, command=["sleep", "60"], labels={STEP: name, OWNER: owner}))
        for name, owner in owners.items()
    }
    try:
        assert remove_orphans(engine) == 1
        assert sorted(c.config.labels[STEP] for c in step_containers(docker_engine)) == ["alive", "another tool's"]
    finally:
        for job in jobs.values():
            job.remove()


def test_a_container_that_cannot_start_is_removed(
    docker_engine, base_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``docker run`` makes the container, then cannot start it (a user the image lacks): nothing is left of
    it, so the task's one line does not hide a container left behind."""
    from metaflow_stack.devcontainer import launch
    from metaflow_stack.devcontainer.launch import job_spec, run_step
    from metaflow_stack.devcontainer.policy import SandboxPolicy
    from metaflow_stack.devcontainer.task_container import TaskContainer
    from metaflow_stack.errors import StackError

    container = TaskContainer(user="no-such-user")
    spec = job_spec(base_image, "-c pass", tmp_path, [], {}, SandboxPolicy(), "F/1/start/7", container)
    monkeypatch.setattr(launch, "_LOOK_AGAIN_S", 60.0)
    started = time.monotonic()
    with pytest.raises(StackError, match="unable to find user no-such-user"):
        run_step(spec)
    assert docker_engine.container.list(all=True, filters=[("label", f"{LABEL}=F/1/start/7")]) == []
    # (docker run had answered: no second look, whose wait only held the task's one line back)
    assert time.monotonic() - started < 30


def test_a_task_stopped_as_its_container_is_made_leaves_none(
    docker_engine, base_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C that ends ``docker run`` once the engine has made the container: the trampoline then says its
    container was removed, which must be so."""
    from metaflow_stack.devcontainer.launch import job_spec, run_step
    from metaflow_stack.devcontainer.policy import SandboxPolicy
    from metaflow_stack.engines.docker import DockerEngine

    made = DockerEngine.launch

    def interrupted(engine: DockerEngine, spec: object) -> None:
        made(engine, spec)
        raise KeyboardInterrupt

    monkeypatch.setattr(DockerEngine, "launch", interrupted)
    spec = job_spec(base_image, "-c 'import time; time.sleep(300)'", tmp_path, [], {}, SandboxPolicy(), "F/1/start/8")
    with pytest.raises(KeyboardInterrupt):
        run_step(spec)
    assert docker_engine.container.list(all=True, filters=[("label", f"{LABEL}=F/1/start/8")]) == []


def test_the_sandbox_limits_are_in_docker_inspect(docker_engine, base_image: str, tmp_path: Path) -> None:
    import threading

    from metaflow_stack.devcontainer.launch import job_spec, run_step
    from metaflow_stack.devcontainer.policy import SandboxPolicy
    from metaflow_stack.engines import Mount

    code = tmp_path / "code"
    code.mkdir()  # an empty code package: the step below needs none
    datastore = tmp_path / ".metaflow"
    datastore.mkdir()
    stores = [Mount(str(datastore), str(datastore), read_only=False)]
    policy = SandboxPolicy(network="none", cpu=1.5, memory="256m", pids=64)
    codes: list[int] = []
    # The step runs until the test has looked at its container: no race with a step that ends first.
    release = datastore / "release"
    wait = f"-c 'import os, time; [time.sleep(0.1) for _ in iter(lambda: os.path.exists(\"{release}\"), True)]'"
    worker = threading.Thread(
        target=lambda: codes.append(run_step(job_spec(base_image, wait, code, stores, {}, policy, "F/1/s/1")))
    )
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not (found := step_containers(docker_engine)):
            assert time.monotonic() < deadline, "the container never started"
            time.sleep(0.2)
        host = found[0].host_config
        assert (host.nano_cpus, host.memory, host.pids_limit) == (1_500_000_000, 256 * 1024 * 1024, 64)
        assert host.readonly_rootfs and host.network_mode == "none" and host.cap_drop == ["ALL"]
        assert "no-new-privileges" in host.security_opt
        assert found[0].config.user == f"{os.getuid()}:{os.getgid()}"
    finally:
        release.touch()
        worker.join(timeout=60)
    assert codes == [0] and step_containers(docker_engine) == []


#: One sandboxed step and an end; ``{args}`` are the decorator's arguments.
ONE_STEP_FLOW = """
from metaflow import FlowSpec, devcontainer, step


class OneStepFlow(FlowSpec):
    @devcontainer({args})
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    OneStepFlow()
"""


def test_a_wrong_setting_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    (tmp_path / "bad_flow.py").write_text(ONE_STEP_FLOW.format(args='network="wifi"'))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "METAFLOW_DEFAULT_METADATA": "local"}
    command = [sys.executable, "bad_flow.py", "--datastore-root", str(tmp_path / ".metaflow"), "run"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "network='wifi' is not one of none, bridge" in done.stderr and 'network="none"' in done.stderr
    assert not (tmp_path / ".metaflow" / "OneStepFlow").exists()  # refused before anything ran


CATCH_FLOW = """
import os
import socket
import time

from metaflow import FlowSpec, catch, current, devcontainer, step, timeout


class CaughtSandboxFlow(FlowSpec):
    @catch(var="too_slow")
    @timeout(seconds=5)
    @devcontainer
    @step
    def start(self):
        self.first_attempt_in_container = os.path.exists("/.dockerenv")
        time.sleep(120)
        self.next(self.offline)

    @catch(var="no_network")
    @devcontainer
    @step
    def offline(self):
        socket.create_connection(("192.0.2.1", 80), timeout=5).close()  # no route in the sandbox
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CaughtSandboxFlow()
"""

CAUGHT = """
import json, sys
from metaflow import Flow, metadata, namespace
metadata("local@" + sys.argv[1])
namespace(None)
run = Flow("CaughtSandboxFlow").latest_run
start, offline = run["start"].task, run["offline"].task
caught = {name: [getattr(task.data, name).type, str(getattr(task.data, name))] for name, task in
          (("too_slow", start), ("no_network", offline))}
print(json.dumps({"successful": run.successful, **caught}))
"""


def test_timeout_and_catch_work_in_the_sandbox_and_a_socket_cannot_leave_it(docker_engine, tmp_path: Path) -> None:
    (tmp_path / "caught_flow.py").write_text(CATCH_FLOW)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "METAFLOW_DEFAULT_METADATA": "local"}
    command = [sys.executable, "caught_flow.py", "--datastore-root", str(tmp_path / ".metaflow"), "run"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    read = subprocess.run([sys.executable, "-c", CAUGHT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    run = json.loads(read.stdout.strip().splitlines()[-1])
    assert run["successful"]
    kind, trace = run["too_slow"]  # @timeout fired in the container, @catch kept its exception
    assert kind == "metaflow.plugins.timeout_decorator.TimeoutException" and "/mf/code/caught_flow.py" in trace
    kind, trace = run["no_network"]  # network="none": the connection could not leave
    assert kind == "builtins.OSError" and "Network is unreachable" in trace
    assert step_containers(docker_engine) == []
