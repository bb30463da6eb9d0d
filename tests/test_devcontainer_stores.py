"""``@devcontainer`` steps on an S3 datastore (moto's S3 server), with local metadata and with the
metadata service, and the one-line refusals when a sandboxed step could not reach them. The servers
listen on the Docker bridge's address, the one a container on the default network reaches the
host by (test servers only: the stack's own bind 127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import VENV_BIN
from service_servers import KEYED, start_service

S3_FLOW = """
import os

from metaflow import FlowSpec, devcontainer, step


class S3SandboxFlow(FlowSpec):
    @devcontainer(network="bridge")
    @step
    def start(self):
        self.in_container = os.path.exists("/.dockerenv")
        self.numbers = list(range(5))
        self.next(self.end)

    @step
    def end(self):
        self.total = sum(self.numbers)


if __name__ == "__main__":
    S3SandboxFlow()
"""

#: Read in a subprocess, with the run's own settings (Metaflow's client keeps one root per process).
READ = """
import json, sys
from metaflow import Flow, namespace
namespace(None)
run = Flow("S3SandboxFlow").latest_run
print(json.dumps({"successful": run.successful, "in_container": run["start"].task.data.in_container,
                  "total": run["end"].task.data.total, "stdout": run["start"].task.stdout}))
"""


def run_s3_flow(root: Path, env: dict[str, str], *top: str, flow: str = S3_FLOW) -> subprocess.CompletedProcess:
    (root / "s3_flow.py").write_text(flow)
    command = [sys.executable, "s3_flow.py", *top, "run"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "METAFLOW_S3_ENDPOINT_URL": endpoint,
        "METAFLOW_DATASTORE_SYSROOT_S3": "s3://sandbox/metaflow",
        "METAFLOW_DEFAULT_METADATA": "local",
        **extra,
    }


def read_s3_run(root: Path, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", READ], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.docker
@pytest.mark.slow
def test_a_sandboxed_step_reads_and_writes_an_s3_datastore(docker_engine, bridge_s3: str, tmp_path: Path) -> None:
    env = s3_env(bridge_s3)
    done = run_s3_flow(tmp_path, env, "--datastore", "s3")
    assert done.returncode == 0, done.stderr[-4000:]
    run = read_s3_run(tmp_path, {**env, "METAFLOW_DEFAULT_DATASTORE": "s3"})
    assert run["successful"] and run["in_container"] and run["total"] == 10
    # the container's local metadata landed in the host's .metaflow, beside the runtime's
    assert list((tmp_path / ".metaflow" / "S3SandboxFlow").glob("*/start/*/_meta/*attempt*"))


@pytest.mark.docker
@pytest.mark.slow
def test_a_sandboxed_step_records_in_the_metadata_service(
    docker_engine, bridge_s3: str, bridge_address: str, tmp_path: Path
) -> None:
    # Beyond loopback, so with a key: the sandbox must carry it to the service.
    service = start_service(str(tmp_path / "metadata.db"), tmp_path / "service.log", host=bridge_address, env=KEYED)
    try:
        env = s3_env(
            bridge_s3,
            METAFLOW_SERVICE_URL=service.url,
            METAFLOW_DEFAULT_METADATA="service",
            METAFLOW_SERVICE_AUTH_KEY=KEYED["METAFLOW_STACK_SERVICE_AUTH_KEY"],
        )
        done = run_s3_flow(tmp_path, env, "--datastore", "s3", "--metadata", "service")
        assert done.returncode == 0, done.stderr[-4000:]
        run = read_s3_run(tmp_path, {**env, "METAFLOW_DEFAULT_DATASTORE": "s3"})
        assert run["successful"] and run["in_container"] and run["total"] == 10
        keyed = {"x-api-key": KEYED["METAFLOW_STACK_SERVICE_AUTH_KEY"]}
        runs = httpx.get(f"{service.url}/flows/S3SandboxFlow/runs", timeout=10, headers=keyed).json()
        run_id = runs[0]["run_number"]
        tasks = httpx.get(
            f"{service.url}/flows/S3SandboxFlow/runs/{run_id}/steps/start/tasks", timeout=10, headers=keyed
        ).json()
        assert len(tasks) == 1
    finally:
        service.stop()


@pytest.mark.parametrize(
    ("top", "env", "said"),
    [
        (("--datastore", "s3"), {}, "an s3 datastore is reached over the network, and this step has none"),
        (
            ("--metadata", "service"),
            {"METAFLOW_SERVICE_URL": "http://127.0.0.1:9"},
            "is on this machine's loopback, which a container cannot reach",
        ),
    ],
)
def test_a_store_the_sandbox_cannot_reach_is_refused_in_one_line(
    tmp_path: Path, top: tuple[str, ...], env: dict[str, str], said: str
) -> None:
    flow = S3_FLOW if "service" in top else S3_FLOW.replace('network="bridge"', 'network="none"')
    (tmp_path / "s3_flow.py").write_text(flow)
    command = [sys.executable, "s3_flow.py", *top, "run"]
    full_env = s3_env("http://127.0.0.1:9", **env)
    done = subprocess.run(command, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert said in done.stdout + done.stderr
