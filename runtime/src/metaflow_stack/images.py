"""Build, push, pull and resolve the catalog's images.

``resolve`` is what decorators and commands call: it returns a local image
reference for a capability, taking the published image from the registry when
one is configured and has it, and building locally otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException
from rich.console import Console

from metaflow_stack import __version__, base_images, builders, catalog, settings
from metaflow_stack.engines.docker import require_engine
from metaflow_stack.errors import RegistryError

_stderr = Console(stderr=True)


@dataclass(frozen=True)
class ImageInfo:
    """Where an image of the catalog stands on this machine."""

    name: str
    description: str
    ref: str
    base: str
    present: bool


def _plan(name: str, docker: DockerClient, *, probe_registry: bool = True) -> tuple[catalog.ImageEntry, str, str]:
    """The entry, base image and local reference ``name`` builds to.

    An image on the stack base gets that base's reference, tag included, as
    its base, so a change to the base gives it a new tag too.
    """
    entry = catalog.get(name)
    if entry.base is None:
        base = base_images.choose(docker, probe_registry=probe_registry)
    else:
        base = _plan(entry.base, docker, probe_registry=probe_registry)[2]
    with catalog.staged_context(entry) as context:
        tag = catalog.tag_for(context, base)
    return entry, base, f"{catalog.repository(entry, registry='')}:{tag}"


def build(name: str, *, push: bool = False, force: bool = False, console: Console | None = None) -> str:
    """Build the image for ``name`` (skipped when its tag is already here); return its reference."""
    console = console or _stderr
    docker = require_engine()
    entry, base, ref = _plan(name, docker)
    if force or not docker.image.exists(ref):
        if entry.base is None:
            base_images.ensure(base, docker, console)
        else:
            resolve(entry.base, console=console)  # the stack base: here, published or built first
        with catalog.staged_context(entry) as context:
            request = builders.BuildRequest(
                context=context,
                tag=ref,
                build_args={"BASE_IMAGE": base},
                labels={
                    "org.opencontainers.image.version": __version__,
                    "org.opencontainers.image.base.name": base,
                },
            )
            with console.status(f"building {ref}"):
                builders.build(request, console)
        console.print(f"built {ref}")
    else:
        console.print(f"{ref} is up to date")
    if push:
        push_image(name, console=console)
    return ref


def _registry_ref(local_ref: str) -> str:
    registry = settings.load().registry
    if not registry:
        raise RegistryError(
            "no image registry is configured",
            fix="set METAFLOW_STACK_REGISTRY (for example 127.0.0.1:5000 after `just registry`)",
        )
    return f"{registry}/{local_ref}"


def push_image(name: str, *, console: Console | None = None) -> str:
    """Push the local image for ``name`` to the configured registry; return the remote reference."""
    docker = require_engine()
    _, _, ref = _plan(name, docker, probe_registry=False)
    if not docker.image.exists(ref):
        raise RegistryError(f"{ref} is not built here", fix=f"run `metaflow stack images build {name}` first")
    return push_reference(ref, console=console)


def push_reference(ref: str, *, console: Console | None = None) -> str:
    """Push the local image ``ref`` to the configured registry under the same name; return the remote reference."""
    console = console or _stderr
    docker = require_engine()
    remote = _registry_ref(ref)
    docker.image.tag(ref, remote)
    try:
        with console.status(f"pushing {remote}"):
            docker.image.push(remote, quiet=True)
    except DockerException as exc:
        raise RegistryError(
            f"pushing {remote} failed: {(exc.stderr or '').strip()}",
            fix="check that the registry answers (`metaflow stack doctor`)",
        ) from exc
    finally:
        docker.image.remove(remote)  # keep only the local name; the layers stay
    console.print(f"pushed {remote}")
    return remote


def pull_image(name: str, *, console: Console | None = None) -> str:
    """Pull the published image for ``name`` and give it its local reference."""
    console = console or _stderr
    docker = require_engine()
    _, _, ref = _plan(name, docker, probe_registry=False)
    remote = _registry_ref(ref)
    try:
        with console.status(f"pulling {remote}"):
            docker.image.pull(remote, quiet=True)
    except DockerException as exc:
        raise RegistryError(
            f"{remote} is not published: {(exc.stderr or '').strip()}",
            fix=f"build it with `metaflow stack images build {name} --push`",
        ) from exc
    docker.image.tag(remote, ref)
    docker.image.remove(remote)
    return ref


def resolve(name: str, *, console: Console | None = None) -> str:
    """A local reference for ``name``: here already, else published, else built now (its base first)."""
    docker = require_engine()
    _, _, ref = _plan(name, docker)
    if docker.image.exists(ref):
        return ref
    if settings.load().registry:
        try:
            return pull_image(name, console=console)
        except RegistryError:
            pass  # not published: build it
    return build(name, console=console)


def listing() -> list[ImageInfo]:
    """Every catalog image with its current reference and whether it is built here."""
    docker = require_engine()
    infos = []
    for name in catalog.names():
        entry, base, ref = _plan(name, docker, probe_registry=False)
        infos.append(ImageInfo(name, entry.description, ref, base, docker.image.exists(ref)))
    return infos
