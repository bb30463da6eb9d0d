"""Which Python base every image builds on, and how to make one with no registry.

With a registry the public Python base is used. When none answers, the same
Dockerfiles build on a local base: Debian bookworm made with debootstrap from
Debian's own package mirror, imported as ``local/debian:bookworm``, with
Python added by ``images/python-base``. Debian bookworm's Python is 3.11, the
same minor version as the public base.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException
from rich.console import Console

from metaflow_stack import builders, catalog, settings
from metaflow_stack.errors import RegistryError, StackError, ToolMissingError

LOCAL_DEBIAN = "local/debian:bookworm"
LOCAL_PYTHON = "local/python:3.11-bookworm"


def choose(docker: DockerClient, *, probe_registry: bool = True) -> str:
    """The base image to build on.

    The configured ``STACK_BASE_IMAGE`` wins; then the public Python base when
    it is here or can be pulled; then the local bootstrap base. With
    ``probe_registry=False`` nothing is pulled (for listings).
    """
    configured = settings.load().base_image
    if configured:
        return configured
    if docker.image.exists(settings.PUBLIC_BASE_IMAGE):
        return settings.PUBLIC_BASE_IMAGE
    if not probe_registry:
        return LOCAL_PYTHON if docker.image.exists(LOCAL_PYTHON) else settings.PUBLIC_BASE_IMAGE
    try:
        docker.image.pull(settings.PUBLIC_BASE_IMAGE, quiet=True)
        return settings.PUBLIC_BASE_IMAGE
    except DockerException:
        return LOCAL_PYTHON


def ensure(base: str, docker: DockerClient, console: Console) -> None:
    """Make ``base`` present locally: pull it, or bootstrap the local one."""
    if docker.image.exists(base):
        return
    if base == LOCAL_PYTHON:
        bootstrap(docker, console)
        return
    console.print(f"pulling base image {base}")
    try:
        docker.image.pull(base, quiet=True)
    except DockerException as exc:
        raise RegistryError(
            f"cannot pull base image {base}: {(exc.stderr or '').strip()}",
            fix="check the registry, or unset METAFLOW_STACK_BASE_IMAGE to build on a local Debian base",
        ) from exc


def bootstrap(docker: DockerClient, console: Console) -> None:
    """Build ``local/debian:bookworm`` (debootstrap) and ``local/python`` on it."""
    if not docker.image.exists(LOCAL_DEBIAN):
        _import_debian(docker, console)
    console.print(f"building {LOCAL_PYTHON} from {LOCAL_DEBIAN}")
    request = builders.BuildRequest(
        context=catalog.images_root() / "python-base",
        tag=LOCAL_PYTHON,
        build_args={"BASE_IMAGE": LOCAL_DEBIAN},
    )
    builders.build(request, console)


def _import_debian(docker: DockerClient, console: Console) -> None:
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ToolMissingError(
            "no registry answers and debootstrap is not installed to build a local base image",
            fix="install debootstrap (`sudo apt-get install debootstrap`) or configure a registry",
        )
    with tempfile.TemporaryDirectory(prefix="stack-debootstrap-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        console.print(f"creating {LOCAL_DEBIAN} with debootstrap (about a minute)")
        _run([debootstrap, "--variant=minbase", "bookworm", str(rootfs)], "debootstrap")
        archive = Path(tmp) / "rootfs.tar"
        _run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], "tar")
        docker.image.import_(archive, tag=LOCAL_DEBIAN)


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise StackError(
            f"{what} failed with exit code {result.returncode}:\n{tail}",
            fix="run it as root on a Debian or Ubuntu machine that reaches Debian's mirror",
        )
