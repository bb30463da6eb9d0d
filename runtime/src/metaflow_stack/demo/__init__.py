"""The demo ``just up`` runs: the hello flow, in the base image when Docker answers.

Without a Docker engine the same flow runs as a local process on the embedded
defaults (local datastore), so the first command works on any machine with
Python. The run is recorded by the local metadata service when one is given
(``just up`` starts it first), else in local metadata; either way it is read
back through Metaflow's Client API, which proves it was recorded, not just
printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from metaflow_stack import images, settings
from metaflow_stack.engines import STACK_UP, JobSpec, Mount, get_engine, host_user
from metaflow_stack.errors import DockerUnavailableError, StackError
from metaflow_stack.service.local import FOLDER_LABEL, LocalService

FLOW_FILE = Path(__file__).with_name("hello_flow.py")
_IN_IMAGE_DIR = "/opt/stack-demo"


@dataclass(frozen=True)
class DemoResult:
    """Where the hello flow ran and what it recorded."""

    where: str
    pathspec: str
    message: str


def demo_root() -> Path:
    """The folder holding the demo's ``.metaflow`` datastore."""
    return settings.load().state_dir / "demo"


def demo_datastore() -> Path:
    """The demo's local datastore root: where its artifacts and logs are."""
    return demo_root() / ".metaflow"


def _username() -> str:
    from metaflow.util import get_username

    return get_username() or "stack"


def _flow_args(datastore: Path, service_url: str | None) -> list[str]:
    metadata = "service" if service_url else "local"
    return ["--datastore", "local", "--metadata", metadata, "--datastore-root", str(datastore), "run"]


def _metadata_env(service_url: str | None, auth_key: str | None) -> dict[str, str]:
    if not service_url:
        return {}
    return {"METAFLOW_SERVICE_URL": service_url, **({"METAFLOW_SERVICE_AUTH_KEY": auth_key} if auth_key else {})}


def _run_in_image(datastore: Path, service_url: str | None, auth_key: str | None, console: Console) -> tuple[int, str]:
    engine = get_engine("docker")
    ref = images.resolve("flow", console=console)
    job = engine.launch(
        JobSpec(
            image=ref,
            command=["python", f"{_IN_IMAGE_DIR}/{FLOW_FILE.name}", *_flow_args(datastore, service_url)],
            env={"USER": _username(), "HOME": "/tmp", **_metadata_env(service_url, auth_key)},
            mounts=[
                Mount(str(FLOW_FILE.parent), _IN_IMAGE_DIR),
                Mount(str(datastore), str(datastore), read_only=False),
            ],
            # The host user's ids keep the datastore's files theirs; the job
            # holds no capabilities either way (JobSpec's defaults).
            user=host_user(),
            # (this state folder's: an interrupted demo's container is what its `down` sweeps, no other's)
            labels={"io.metaflow-stack.demo": "hello", FOLDER_LABEL: LocalService().folder},
            owner=STACK_UP,
            # The service answers on the host's loopback only.
            network="host" if service_url else None,
        )
    )
    try:
        for line in job.logs(follow=True):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return job.wait(), f"image {ref}"
    finally:
        job.remove()


def _run_locally(datastore: Path, service_url: str | None, auth_key: str | None, console: Console) -> tuple[int, str]:
    env = {**os.environ, "USER": _username(), **_metadata_env(service_url, auth_key)}
    command = [sys.executable, str(FLOW_FILE), *_flow_args(datastore, service_url)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            console.print(line.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
    return process.returncode, "a local process (embedded defaults: no Docker engine answered)"


def run(
    console: Console, *, use_docker: bool = True, service_url: str | None = None, auth_key: str | None = None
) -> DemoResult:
    """Run the hello flow (recorded by the service at ``service_url``, with its ``auth_key``, if given) and
    read it back."""
    root = demo_root()
    datastore = demo_datastore()
    datastore.mkdir(parents=True, exist_ok=True)
    exit_code, where = None, ""
    if use_docker:
        try:
            exit_code, where = _run_in_image(datastore, service_url, auth_key, console)
        except DockerUnavailableError as exc:
            console.print(f"[yellow]{exc.message}[/]: running the demo as a local process instead")
    if exit_code is None:
        exit_code, where = _run_locally(datastore, service_url, auth_key, console)
    if exit_code != 0:
        raise StackError(f"the hello flow failed with exit code {exit_code}", fix="see its output above")

    from metaflow import Flow, metadata, namespace
    from metaflow.metaflow_config import SERVICE_HEADERS

    if auth_key:  # the headers Metaflow's provider sends, read at each request
        SERVICE_HEADERS["x-api-key"] = auth_key
    metadata(f"service@{service_url}" if service_url else f"local@{root}")
    namespace(None)
    latest = Flow("HelloFlow").latest_run
    return DemoResult(where=where, pathspec=latest.pathspec, message=latest["hello"].task.data.message)
