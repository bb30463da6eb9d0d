"""What this machine has for each capability, and the exact fix for what it lacks."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from metaflow_stack import builders, settings
from metaflow_stack.devcontainer.image import CLI_FIX
from metaflow_stack.engines import docker as docker_engine
from metaflow_stack.errors import StackError
from metaflow_stack.registry import ping


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    name: str
    ok: bool
    detail: str
    needed_for: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _version_of(command: list[str]) -> str | None:
    """The first line a tool prints for its version, or ``None`` when it is absent."""
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "installed"


def _named(name: str) -> Callable[[Callable[[], Check]], Callable[[], Check]]:
    """Mark a check with the name its row has, so callers can run only the rows they need."""

    def mark(check: Callable[[], Check]) -> Callable[[], Check]:
        check.check_name = name  # type: ignore[attr-defined]
        return check

    return mark


def _tool(name: str, command: list[str], needed_for: str, fix: str) -> Callable[[], Check]:
    @_named(name)
    def check() -> Check:
        version = _version_of(command)
        return Check(name, version is not None, version or "not found", needed_for, "" if version else fix)

    return check


@_named("Python")
def _python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info >= (3, 11)
    return Check("Python", ok, version, "everything", "" if ok else "use Python 3.11 or newer")


@_named("Metaflow")
def _metaflow() -> Check:
    try:
        import metaflow

        return Check("Metaflow", True, metaflow.__version__, "everything")
    except ImportError:
        return Check("Metaflow", False, "not importable", "everything", "pip install metaflow-stack")


@_named("Docker engine")
def _docker_engine() -> Check:
    try:
        version = docker_engine.engine_version()
    except StackError as exc:
        return Check("Docker engine", False, exc.message, "images, @devcontainer, local stack", exc.fix or "")
    return Check("Docker engine", True, f"server {version}", "images, @devcontainer, local stack")


@_named("BuildKit")
def _buildkit() -> Check:
    try:
        route = builders.route()
    except StackError as exc:
        return Check("BuildKit", False, exc.message, "image builds", exc.fix or "")
    return Check("BuildKit", True, route.replace("classic:", "engine BuildKit via "), "image builds")


@_named("Image registry")
def _registry() -> Check:
    registry = settings.load().registry
    fix = "run `just registry` and export METAFLOW_STACK_REGISTRY=127.0.0.1:5000 (or name your registry)"
    if not registry:
        return Check("Image registry", False, "not configured (images are built locally)", "publishing images", fix)
    try:
        settings.checked_registry(registry, "METAFLOW_STACK_REGISTRY")
    except StackError as exc:  # (malformed: no address to ask)
        return Check("Image registry", False, exc.message, "publishing images", exc.fix or fix)
    if ping(registry):
        return Check("Image registry", True, f"{registry} answers", "publishing images")
    return Check("Image registry", False, f"{registry} does not answer", "publishing images", fix)


@_named("Ray")
def _ray() -> Check:
    try:
        version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return Check("Ray", False, "not installed", "Ray serving and batch", "pip install 'metaflow-stack[ray]'")
    return Check("Ray", True, version, "Ray serving and batch")


@_named("Nomad")
def _nomad() -> Check:
    from metaflow_stack.nomad.dev_cluster import INSTALL_FIX

    version = _version_of(["nomad", "version"])
    address = os.environ.get("METAFLOW_NOMAD_ADDR") or os.environ.get("NOMAD_ADDR")
    if version is None:
        return Check("Nomad", False, "not found", "@nomad", INSTALL_FIX)
    if not address:
        fix = "run `just nomad-up` and export the line it prints (or set NOMAD_ADDR to your cluster)"
        return Check("Nomad", False, f"{version}; NOMAD_ADDR not set", "@nomad", fix)
    return Check("Nomad", True, f"{version}; NOMAD_ADDR={address}", "@nomad")


@_named("Chromium")
def _chromium() -> Check:
    for binary in ("chromium", "chromium-browser", "google-chrome"):
        if version := _version_of([binary, "--version"]):
            return Check("Chromium", True, version, "UI browser tests")
    return Check("Chromium", False, "not found", "UI browser tests", "sudo apt-get install chromium")


CHECKS: tuple[Callable[[], Check], ...] = (
    _python,
    _metaflow,
    _tool(
        "Docker client",
        ["docker", "--version"],
        "images, @devcontainer",
        "install Docker (https://docs.docker.com/engine/install/; Debian: sudo apt-get install docker.io)",
    ),
    _docker_engine,
    _buildkit,
    _registry,
    _tool(
        "debootstrap",
        ["debootstrap", "--version"],
        "a local base image when no registry answers",
        "sudo apt-get install debootstrap",
    ),
    _tool("uv", ["uv", "--version"], "function environments", "pip install uv"),
    _ray,
    _nomad,
    _tool(
        "kind",
        ["kind", "version"],
        "Kubernetes integration tests",
        "install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)",
    ),
    _tool(
        "kubectl",
        ["kubectl", "version", "--client"],
        "Kubernetes deploys",
        "install kubectl (https://kubernetes.io/docs/tasks/tools/)",
    ),
    _tool(
        "helm", ["helm", "version", "--short"], "Helm releases", "install Helm (https://helm.sh/docs/intro/install/)"
    ),
    _tool(
        "Pulumi CLI",
        ["pulumi", "version"],
        "`pulumi up`",
        "install Pulumi (https://www.pulumi.com/docs/iac/download-install/)",
    ),
    _tool(
        "Gramine",
        ["gramine-direct", "--version"],
        "@confidential",
        "install Gramine (https://gramine.readthedocs.io/en/stable/installation.html)",
    ),
    _tool(
        "Dev Containers CLI",
        ["devcontainer", "--version"],
        "@devcontainer with features",
        CLI_FIX,
    ),
    _chromium,
)


def run_checks(names: set[str] | None = None) -> list[Check]:
    """Every check (or those ``names`` names), in table order."""
    return [check() for check in CHECKS if names is None or check.check_name in names]  # type: ignore[attr-defined]
