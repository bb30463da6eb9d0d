"""Build, push, publish, pull and resolve the catalog's images.

``resolve`` is what decorators and commands call: it returns a local image
reference for a capability. An image released with this runtime (the image
lock, ``image_lock``) is pulled by its digest; otherwise the configured
registry's image of the same tag is pulled when it has one, and the image is
built here when it has not.

``publish`` is what a release runs: every image built and pushed in one go
(through buildx: for every platform, with SBOM and provenance), its digest
taken from that push, and the lock written from those digests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException, NoSuchImage
from rich.console import Console

from metaflow_stack import __version__, base_images, builders, catalog, image_lock, settings
from metaflow_stack.engines.docker import machine, require_engine
from metaflow_stack.errors import RegistryError, StackError

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
        return entry, base, _local_ref(entry, context, base)


def _local_ref(entry: catalog.ImageEntry, context: Path, base: str) -> str:
    """The local reference of ``entry`` built from the staged ``context`` on ``base``."""
    return f"{catalog.repository(entry, registry='')}:{catalog.tag_for(context, base)}"


#: An engine's architecture (``engines.docker.machine``) as a build platform.
_PLATFORMS = {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}


def platforms_for(entry: catalog.ImageEntry, wanted: Iterable[str]) -> tuple[str, ...]:
    """The platforms of ``wanted`` that ``entry`` builds for (all of them when it names none)."""
    return tuple(p for p in wanted if not entry.platforms or p in entry.platforms)


def builds_here(name: str, docker: DockerClient | None = None) -> bool:
    """Whether the image ``name`` builds on this engine's platform (asked only of images that name theirs)."""
    entry = catalog.get(name)
    if not entry.platforms:
        return True
    here = _PLATFORMS.get(machine(docker or require_engine()), "")
    return bool(platforms_for(entry, [here]))


def build(name: str, *, push: bool = False, force: bool = False, console: Console | None = None) -> str:
    """Build the image for ``name`` (skipped when its tag is already here); return its reference."""
    console = console or _stderr
    docker = require_engine()
    entry, base, ref = _plan(name, docker)
    if force or not docker.image.exists(ref):
        if not builds_here(name, docker):
            raise StackError(
                f"the {entry.name} image builds for {', '.join(entry.platforms)} only, not this machine's platform",
                fix=f"build it on a {' or '.join(entry.platforms)} machine",
            )
        if entry.base is None:
            base_images.ensure(base, docker, console)
        else:
            base = resolve(entry.base, console=console)  # the stack base: here, published or built first
        with _staged_request(entry, base) as (ref, request), console.status(f"building {ref}"):
            builders.build(request, console)
        console.print(f"built {ref}")
    else:
        console.print(f"{ref} is up to date")
    if push:
        push_reference(ref, console=console)
    return ref


@contextmanager
def _staged_request(
    entry: catalog.ImageEntry, base: str, *, registry: str = "", from_image: str | None = None, **options: Any
) -> Iterator[tuple[str, builders.BuildRequest]]:
    """The build of ``entry`` on ``base`` (pulled as ``from_image`` when that names it elsewhere), and its local
    reference; tagged under ``registry`` when one is named.

    The sources are staged once, and the tag hashes that staging: sources
    edited while the build waits (for its base, minutes) build under their own
    tag, never under the tag of what was there before.
    """
    with catalog.staged_context(entry) as context:
        ref = _local_ref(entry, context, base)
        yield (
            ref,
            builders.BuildRequest(
                context=context,
                tag=f"{registry}/{ref}" if registry else ref,
                build_args={"BASE_IMAGE": from_image or base},
                labels={"org.opencontainers.image.version": __version__, "org.opencontainers.image.base.name": base},
                **options,
            ),
        )


def _bases_first(names: Iterable[str]) -> list[str]:
    """``names`` with every image they build on, each after its base."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        entry = catalog.get(name)
        if entry.base is not None:
            visit(entry.base)
        if entry.name not in ordered:
            ordered.append(entry.name)

    for name in names:
        visit(name)
    return ordered


def publish(
    names: Iterable[str],
    registry: str,
    lock_path: Path,
    *,
    platforms: Iterable[str] = (),
    signer: image_lock.Signer | None = None,
    console: Console | None = None,
) -> image_lock.ImageLock:
    """Build and push ``names`` (their bases first) to ``registry``, then write the lock of what was pushed.

    Each image is pushed by the build that made it, and its digest comes from
    that push, never from reading a tag back: the lock names exactly what was
    built. An image above the stack base builds from the base just published.
    """
    console = console or _stderr
    registry = settings.checked_registry(registry, "--registry (or METAFLOW_STACK_REGISTRY)")
    docker = require_engine()
    released: dict[str, image_lock.LockedImage] = {}
    wanted = tuple(platforms)
    skipped: set[str] = set()
    for name in _bases_first(names):
        entry, base, _ = _plan(name, docker)
        chosen = platforms_for(entry, wanted)
        if (wanted and not chosen) or (not wanted and not builds_here(name, docker)) or entry.base in skipped:
            console.print(f"skipped {entry.name}: it or its base builds for other platforms only")
            skipped.add(entry.name)
            continue
        if entry.base is None:
            base_images.ensure(base, docker, console)
        # An image above the base builds from the base just pushed, by its digest: a tag could move between.
        below = released.get(entry.base) if entry.base is not None else None
        if below is not None:
            base, from_image = below.ref, f"{registry}/{below.repository}@{below.digest}"
        else:
            from_image = base
        staged = _staged_request(entry, base, registry=registry, from_image=from_image, push=True, platforms=chosen)
        with staged as (ref, request), console.status(f"publishing {request.tag}"):
            digest = builders.build(request, console)
        remote = f"{registry}/{ref}"
        if digest is None:
            raise RegistryError(f"{remote} was built without being pushed", fix="publish it again")
        released[entry.name] = image_lock.LockedImage(ref=ref, digest=digest)
        console.print(f"published {remote}@{digest}", soft_wrap=True)
    lock = image_lock.ImageLock(registry=registry, images=released, signer=signer)
    image_lock.write(lock, lock_path)
    return lock


def _released(name: str, docker: DockerClient) -> tuple[image_lock.ImageLock, image_lock.LockedImage] | None:
    """The released image for ``name`` when the lock applies to it.

    It applies when no sources are here (an installed runtime), or when the
    sources here hash to its reference: a changed tree builds its own.
    """
    lock = image_lock.load()
    entry = lock.images.get(catalog.get(name).name) if lock else None
    if lock is None or entry is None:
        return None
    if catalog.has_sources() and entry.ref != _plan(name, docker)[2]:
        return None
    return lock, entry


def _pull_released(lock: image_lock.ImageLock, entry: image_lock.LockedImage, console: Console | None) -> str:
    """Pull a released image by its digest (its signature checked where cosign is installed); its local reference.

    A failure is never answered by pulling the tag instead: a tag that no
    longer holds the released digest is what a tampered registry looks like.
    """
    console = console or _stderr
    remote = lock.remote(entry)
    verified = image_lock.verify_signature(lock, entry)
    _pull_as(
        remote,
        entry.ref,
        console,
        f"the released image {remote} cannot be pulled",
        fix="check that the registry answers (and `docker login` to it when it is private); or, in a checkout, "
        "build the images from their sources: `metaflow stack images build base`, then the others",
    )
    if lock.signer is None:
        checked = "the lock names no signer"
    else:
        checked = "signature verified" if verified else "signature not checked: cosign is not installed"
    console.print(f"pulled {entry.ref} by digest {entry.digest} ({checked})", soft_wrap=True)
    return entry.ref


@contextmanager
def _refused_as(failure: str, fix: str) -> Iterator[None]:
    """The engine's refusal of what runs within (a push, a pull, a name given or taken off: another process may
    have removed the image meanwhile) as a ``RegistryError`` in its words, never a traceback."""
    try:
        yield
    except DockerException as exc:
        raise RegistryError(f"{failure}: {(exc.stderr or '').strip()}", fix=fix) from exc


def _transfer(console: Console, doing: str, call: Callable[[], object], failure: str, fix: str) -> None:
    """One push or pull under a status line; the engine's refusal becomes a ``RegistryError`` in its words."""
    with _refused_as(failure, fix), console.status(doing):
        call()


def _pull_as(remote: str, ref: str, console: Console, failure: str, fix: str) -> None:
    """Pull ``remote`` and keep it under the local name ``ref`` alone (a digest reference goes too)."""
    docker = require_engine()
    _transfer(console, f"pulling {remote}", lambda: docker.image.pull(remote, quiet=True), failure, fix)
    _retag(docker, remote, ref)
    _untag(docker, remote)


def _retag(docker: DockerClient, image: str, name: str) -> None:
    """Give ``image`` the name ``name`` too."""
    with _refused_as(f"naming {image} {name} failed", fix="run the command again"):
        docker.image.tag(image, name)


def _untag(docker: DockerClient, name: str) -> None:
    """Take the name ``name`` off its image (the layers stay). Gone already is done: another process pushing
    or pulling the same image takes it off too, and that must not replace this one's outcome."""
    with (
        _refused_as(f"removing the name {name} failed", fix=f"docker image rm {name}"),
        contextlib.suppress(NoSuchImage),
    ):
        docker.image.remove(name)


def _registry_ref(local_ref: str) -> str:
    registry = settings.load().registry
    if not registry:
        raise RegistryError(
            "no image registry is configured",
            fix="set METAFLOW_STACK_REGISTRY (for example 127.0.0.1:5000 after `just registry`)",
        )
    return f"{settings.checked_registry(registry, 'METAFLOW_STACK_REGISTRY')}/{local_ref}"


def push_image(name: str, *, console: Console | None = None) -> str:
    """Push the local image for ``name`` to the configured registry; return the remote reference."""
    docker = require_engine()
    _, _, ref = _plan(name, docker, probe_registry=False)
    if not docker.image.exists(ref):
        raise RegistryError(f"{ref} is not built here", fix=f"run `metaflow stack images build {name}` first")
    return push_reference(ref, console=console)


def _same_repository(digest: str, repository: str) -> bool:
    """Whether ``digest`` (an engine's ``repository@sha256:...``) is of ``repository``: Docker records Docker
    Hub's in their short form (no ``docker.io/``, no ``library/``), where the push named them in full."""

    def short(name: str) -> str:
        for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
            name = name.removeprefix(prefix)
        return name.removeprefix("library/")

    return short(digest.partition("@")[0]) == short(repository)


def push_reference(ref: str, *, console: Console | None = None, by_digest: bool = False) -> str:
    """Push the local image ``ref`` to the configured registry under the same name; return the remote reference:
    by its tag, or ``by_digest`` (``registry/repository@sha256:...``: what the push stored, which no later push
    to the tag can change; for a reference something else measures, as a TEE's compose)."""
    console = console or _stderr
    docker = require_engine()
    remote = _registry_ref(ref)
    _retag(docker, ref, remote)
    try:
        _transfer(
            console,
            f"pushing {remote}",
            lambda: docker.image.push(remote, quiet=True),
            f"pushing {remote} failed",
            fix="check that the registry answers (`metaflow stack doctor`)",
        )
        # Read before the name goes (the engine forgets the digest with its repository's last name); read by
        # the local name, which no other push of the same image takes off.
        repository = remote.rsplit(":", 1)[0]
        with _refused_as(f"reading the digest of {ref} failed", fix="push it again"):
            digests = docker.image.inspect(ref).repo_digests
        pinned = next((f"{repository}@{d.partition('@')[2]}" for d in digests if _same_repository(d, repository)), None)
    finally:
        _untag(docker, remote)  # keep only the local name; the layers stay
    console.print(f"pushed {remote}")
    if by_digest:
        if pinned is None:
            raise RegistryError(f"the engine did not record the digest {remote} was pushed as", fix="push it again")
        return pinned
    return remote


def pull_image(name: str, *, console: Console | None = None) -> str:
    """Pull the published image for ``name`` (by digest when released with this runtime); its local reference."""
    console = console or _stderr
    docker = require_engine()
    if released := _released(name, docker):
        return _pull_released(*released, console)
    _, _, ref = _plan(name, docker, probe_registry=False)
    remote = _registry_ref(ref)
    fix = f"build it with `metaflow stack images build {name} --push`"
    _pull_as(remote, ref, console, f"{remote} is not published", fix=fix)
    return ref


def resolve(name: str, *, console: Console | None = None) -> str:
    """A local reference for ``name``: here already, else released or published, else built now (its base first)."""
    docker = require_engine()
    if released := _released(name, docker):
        lock, entry = released
        return entry.ref if docker.image.exists(entry.ref) else _pull_released(lock, entry, console)
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
