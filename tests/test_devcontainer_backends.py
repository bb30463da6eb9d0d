"""``@devcontainer(backend="devpod"|"daytona")``: a step in a DevPod workspace (DevPod's Docker
provider, an S3 datastore and the metadata service, both on the Docker bridge's address), a step in
a Daytona sandbox, and the one-line refusals. DevPod and Daytona are not on these machines: the
workspace test skips naming DevPod here and runs in the GitHub workflow's ``devpod`` job; the
sandbox test needs a Daytona account and stores its cloud reaches, named by variables, and skips
naming what is missing wherever they are not set."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import VENV_BIN, need
from service_servers import KEYED, start_service
from test_devcontainer_stores import S3_FLOW, read_s3_run, run_s3_flow, s3_env

DEVPOD_FLOW = S3_FLOW.replace('@devcontainer(network="bridge")', "@devcontainer({args})")


def devpod_installed() -> None:
    from metaflow_stack.devcontainer.devpod import INSTALL_FIX

    need("devpod", shutil.which("devpod") is not None, f"the DevPod CLI is not on PATH ({INSTALL_FIX})")


@pytest.mark.docker
@pytest.mark.slow
def test_a_step_runs_in_a_devpod_workspace_that_is_deleted_after(
    docker_engine, base_image: str, bridge_s3: str, bridge_address: str, tmp_path: Path
) -> None:
    devpod_installed()
    (tmp_path / ".devcontainer").mkdir()
    # DevPod's ssh sessions take remoteEnv; the base image's Python environment comes first on PATH
    config = {"image": base_image, "remoteEnv": {"PATH": "/opt/stack/bin:${containerEnv:PATH}"}}
    (tmp_path / ".devcontainer" / "devcontainer.json").write_text(json.dumps(config))
    flow = DEVPOD_FLOW.format(args='backend="devpod", provider="docker", config=".devcontainer/devcontainer.json"')
    # Beyond loopback, so with a key: the sandbox must carry it to the service.
    service = start_service(str(tmp_path / "metadata.db"), tmp_path / "service.log", host=bridge_address, env=KEYED)
    try:
        env = s3_env(
            bridge_s3,
            METAFLOW_SERVICE_URL=service.url,
            METAFLOW_DEFAULT_METADATA="service",
            METAFLOW_SERVICE_AUTH_KEY=KEYED["METAFLOW_STACK_SERVICE_AUTH_KEY"],
        )
        done = run_s3_flow(tmp_path, env, "--datastore", "s3", "--metadata", "service", flow=flow)
        assert done.returncode == 0, done.stderr[-4000:]
        run = read_s3_run(tmp_path, {**env, "METAFLOW_DEFAULT_DATASTORE": "s3"})
        assert run["successful"] and run["in_container"] and run["total"] == 10
    finally:
        service.stop()
    listed = subprocess.run(["devpod", "list", "--output", "json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, f"devpod list failed, so nothing shows the workspaces were deleted: {listed.stderr}"
    assert not [w for w in json.loads(listed.stdout) if w.get("id", "").startswith("mf-")]


@pytest.mark.parametrize(
    ("args", "top", "said"),
    [
        ('backend="kubernetes"', (), "backend='kubernetes' is not one of docker, devpod, daytona"),
        ('backend="devpod", image="x"', (), "the DevPod CLI"),
        ('backend="daytona", image="x"', (), "Daytona's SDK"),
        ("", ("--environment", "pypi"), "its pypi environment would not be in the container"),
    ],
)
def test_a_wrong_backend_is_refused_in_one_line(tmp_path: Path, args: str, top: tuple[str, ...], said: str) -> None:
    (tmp_path / "s3_flow.py").write_text(DEVPOD_FLOW.format(args=args))
    env = {**os.environ, "PATH": f"{VENV_BIN}:/usr/bin:/bin", "METAFLOW_DEFAULT_METADATA": "local"}
    env.pop("METAFLOW_STACK_DEVPOD_CLI", None)
    command = [sys.executable, "s3_flow.py", *top, "run"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert said in done.stdout + done.stderr


def test_a_remote_step_needs_stores_another_machine_reaches() -> None:
    from metaflow_stack.devcontainer import daytona_sandbox, devpod, stores
    from metaflow_stack.errors import StackError

    stores.check_remote("devpod", "s3", "service")  # the combination that works anywhere
    for datastore, metadata in (("local", "service"), ("s3", "local")):
        with pytest.raises(StackError, match="--datastore s3 --metadata service"):
            stores.check_remote("daytona", datastore, metadata)
    assert [daytona_sandbox._gigabytes(m) for m in ("512m", "2g", "3000m", None)] == [1, 2, 3, None]
    ident = devpod.workspace_id("F/1/s/2", 0)
    assert ident != devpod.workspace_id("F/1/s/2", 1) and len(ident) <= 48 and ident == ident.lower()


#: DevPod's CLI as the trampoline calls it (``up``, ``ssh``, ``delete``: each logged as a JSON line of its
#: pid and arguments; ``ssh`` runs a step that takes two minutes), for the kill below: DevPod is not here.
DEVPOD_DOUBLE = """#!{python}
import json, os, sys, time
with open(os.environ["DEVPOD_DOUBLE_LOG"], "a") as log:
    log.write(json.dumps([os.getpid(), *sys.argv[1:]]) + "\\n")
if sys.argv[1] == "ssh":
    time.sleep(120)
"""


def test_a_devpod_workspace_is_deleted_when_its_trampoline_is_killed_outright(tmp_path: Path) -> None:
    """SIGKILL to a DevPod step's trampoline (what Metaflow's runtime does to the tasks still running when
    another fails the run): its watchdog child deletes the workspace (first waiting for the lock of a
    ``devpod up`` that may still be making it, then forced), and the code's copy it staged; the ``devpod
    ssh`` running the step is stopped. DevPod's
    CLI is a double here (``DEVPOD_DOUBLE``); the GitHub ``devpod`` job runs the workspace test with DevPod."""
    from metaflow_stack.devcontainer.devpod import workspace_id

    double, log, code = tmp_path / "devpod", tmp_path / "devpod.log", tmp_path / "code"
    double.write_text(DEVPOD_DOUBLE.format(python=sys.executable))
    double.chmod(0o755)
    code.mkdir()
    launch = (
        "from pathlib import Path; from metaflow_stack.devcontainer import devpod; "
        f"devpod.run_step('flow.py step s', Path({str(code)!r}), {{}}, 'F/1/s/2', 0, config=None, image='i', "
        "provider=None)"
    )
    env = {**os.environ, "METAFLOW_STACK_DEVPOD_CLI": str(double), "DEVPOD_DOUBLE_LOG": str(log)}
    trampoline = subprocess.Popen([sys.executable, "-c", launch], env=env)

    def calls() -> list[list]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def until(done: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            time.sleep(0.1)

    until(lambda: len(calls()) == 2, 60)  # up, then ssh: the step runs
    (ssh,) = [pid for pid, command, *_ in calls() if command == "ssh"]
    trampoline.kill()
    trampoline.wait()
    until(lambda: len(calls()) == 4, 30)
    ident = workspace_id("F/1/s/2", 0)
    assert [command for _, command, *_ in calls()] == ["up", "ssh", "delete", "delete"], calls()
    deletes = [args for _, *args in calls()[2:]]
    assert deletes == [["delete", ident, "--ignore-not-found"], ["delete", ident, "--force", "--ignore-not-found"]]
    staged = Path(calls()[0][2])  # (the code's copy the workspace was made from)
    until(lambda: not staged.parent.exists(), 10)
    assert not staged.parent.exists(), staged

    def ssh_stopped() -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(ssh).status() == psutil.STATUS_ZOMBIE  # (gone, its new parent yet to reap it)
        return True

    until(ssh_stopped, 10)
    assert ssh_stopped(), "the trampoline's devpod ssh outlived it"


#: Where a Daytona sandbox's step keeps its data: stores Daytona's cloud reaches, named by variables.
DAYTONA_NEEDS = (
    "DAYTONA_API_KEY",
    "STACK_TEST_DAYTONA_S3_ROOT",
    "STACK_TEST_DAYTONA_SERVICE_URL",
    "STACK_TEST_DAYTONA_IMAGE",
)


@pytest.mark.slow
def test_a_step_runs_in_a_daytona_sandbox(tmp_path: Path) -> None:
    import importlib.util

    need("daytona", importlib.util.find_spec("daytona") is not None, "pip install 'metaflow-stack[daytona]'")
    missing = [name for name in DAYTONA_NEEDS if not os.environ.get(name)]
    need("daytona", not missing, f"set {', '.join(missing)} (an account, and stores its cloud reaches)")
    flow = DEVPOD_FLOW.format(
        args=f'backend="daytona", network="bridge", image="{os.environ["STACK_TEST_DAYTONA_IMAGE"]}"'
    )
    # Not the session's own S3 server (conftest's endpoint, on this machine): the account's, with its keys.
    here = {name: value for name, value in os.environ.items() if name != "METAFLOW_S3_ENDPOINT_URL"}
    env = {
        **here,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "METAFLOW_DATASTORE_SYSROOT_S3": os.environ["STACK_TEST_DAYTONA_S3_ROOT"],
        "METAFLOW_SERVICE_URL": os.environ["STACK_TEST_DAYTONA_SERVICE_URL"],
        "METAFLOW_DEFAULT_METADATA": "service",
    }
    done = run_s3_flow(tmp_path, env, "--datastore", "s3", "--metadata", "service", flow=flow)
    assert done.returncode == 0, done.stderr[-4000:]
    run = read_s3_run(tmp_path, {**env, "METAFLOW_DEFAULT_DATASTORE": "s3"})
    assert run["successful"] and run["total"] == 10
