"""The backends a flow test can run on, and what each needs before it can.

A backend is how a flow's steps run: here (``local``), in containers
(``devcontainer``), as Nomad jobs (``nomad``), as Kubernetes pods
(``kubernetes``), or a whole flow deployed to Argo Workflows (``argo``). The
first four run a flow with Metaflow's ``Runner`` and a ``--with`` decorator;
``argo`` deploys it with ``Deployer(...).argo_workflows()`` and triggers it.

``missing`` says what a backend lacks on this machine, in one line naming
the tool or setting, so a test skips with that reason (or fails, where
``STACK_TEST_REQUIRE`` names the backend's tool). Each backend's settings
are Metaflow's and the tools' own: ``NOMAD_ADDR``, a kube context, an S3
datastore in Metaflow's configuration (its environment or profile); nothing
here invents another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass


def _s3_datastore() -> str | None:
    """Whether Metaflow's configuration, as this process resolved it (environment, profile, config file),
    puts runs on S3."""
    from metaflow import metaflow_config

    if metaflow_config.DEFAULT_DATASTORE != "s3" or not metaflow_config.DATASTORE_SYSROOT_S3:
        return (
            "needs an S3 datastore: set METAFLOW_DEFAULT_DATASTORE=s3 and METAFLOW_DATASTORE_SYSROOT_S3 (or a "
            "profile that does, METAFLOW_PROFILE)"
        )
    return None


def _docker() -> str | None:
    from metaflow_stack.engines.docker import require_engine
    from metaflow_stack.errors import DockerUnavailableError

    try:
        require_engine()
    except DockerUnavailableError as exc:
        return exc.message
    return None


def _nomad() -> str | None:
    if not os.environ.get("NOMAD_ADDR"):
        return "no Nomad agent: set NOMAD_ADDR (and NOMAD_TOKEN), or start one with `just nomad-up`"
    return _s3_datastore()


def _kubectl(*args: str) -> str | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "kubectl is not installed"
    try:
        done = subprocess.run([kubectl, *args], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"`kubectl {' '.join(args)}` did not answer in 30 s"
    if done.returncode != 0:
        return f"`kubectl {' '.join(args)}` failed: {(done.stderr.strip().splitlines() or ['no reason'])[-1]}"
    return None


def _kubernetes() -> str | None:
    return _kubectl("get", "--raw", "/readyz") or _s3_datastore()


def _argo() -> str | None:
    return _kubernetes() or _kubectl("get", "crd", "workflowtemplates.argoproj.io")


@dataclass(frozen=True)
class Backend:
    """One backend: its name, the tool it needs, and how a flow runs on it."""

    name: str
    #: The tool it needs; ``STACK_TEST_REQUIRE`` naming it (or the backend) makes its absence a failure.
    tool: str
    #: What it lacks here, in one line (``None``: nothing).
    missing: Callable[[], str | None]
    #: Decorators every step runs with (``--with``).
    decospecs: tuple[str, ...] = ()
    #: Deployed to a scheduler and triggered, instead of run by ``Runner``.
    scheduler: str | None = None


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("local", "local", lambda: None),
        Backend("devcontainer", "docker", _docker, decospecs=("devcontainer",)),
        Backend("nomad", "nomad", _nomad, decospecs=("nomad",)),
        Backend("kubernetes", "kubernetes", _kubernetes, decospecs=("kubernetes",)),
        Backend("argo", "argo", _argo, scheduler="argo-workflows"),
    )
}
