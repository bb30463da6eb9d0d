"""Which image serves which capability, and what goes into building it.

Every image builds FROM the stack's ``base`` (Python, uv, the locked core
dependencies, the runtime, the non-root user), so that install preamble is
written once and its layers are shared; only ``base`` itself builds on the
Python base (``base_images``).

An image's tag is a hash of everything that determines its content: the files
of its staged build context (its folder under ``images/`` plus the project
sources it copies in, the lock file among them) and the base image it builds
from, whose reference carries the base's own tag. The same sources on any
machine give the same tag, so a published image can be found by computing the
tag locally, and a change to the base gives every image above it a new tag.

Staging keeps what Docker would send of the same tree: a symbolic link stays
a link (its target, in or out of the tree, is never read or copied), and a
file's mode is 0755 when it is executable, else 0644, so the tag, which
hashes links by their target's name and files by their bytes and executable
bit, covers everything the image gets from them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from metaflow_stack import settings
from metaflow_stack.errors import StackError, UnknownImageError

#: Files under an included source tree that never belong in a build context.
_IGNORED_PARTS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", "node_modules"}
#: Files of the runtime's tree that are not part of its images: the image lock names the images, so it
#: cannot be in them (a release writes it after building them, and every tag would move with it).
_IGNORED_NAMES = {"images.lock.json"}
_IGNORED_SUFFIXES = (".pyc", ".egg-info")

#: The catalog image every other image, function images among them, builds FROM.
STACK_BASE = "base"


@dataclass(frozen=True)
class ImageEntry:
    """One image of the catalog.

    ``includes`` maps project paths (relative to the project root) to paths in
    the staged build context, so a Dockerfile can ``COPY runtime/ ...`` without
    the whole repository becoming its context. ``base`` names the catalog
    image it builds FROM; ``None`` only for the stack base itself, which builds
    on the Python base.
    """

    name: str
    description: str
    capabilities: tuple[str, ...]
    includes: tuple[tuple[str, str], ...] = ()
    base: str | None = STACK_BASE
    #: The only platforms it builds for (``linux/amd64``: Gramine is built for x86-64 alone); none: any.
    platforms: tuple[str, ...] = ()

    def context_dir(self) -> Path:
        """The image's own folder under ``images/``."""
        return images_root() / self.name


_RUNTIME_SOURCES = (
    ("runtime/pyproject.toml", "runtime/pyproject.toml"),
    ("runtime/README.md", "runtime/README.md"),
    ("runtime/requirements.lock", "runtime/requirements.lock"),
    ("runtime/src", "runtime/src"),
)

_CATALOG: dict[str, ImageEntry] = {
    entry.name: entry
    for entry in (
        ImageEntry(
            name=STACK_BASE,
            description="Python 3.11, uv, Metaflow and the Metaflow Stack runtime; runs as a non-root user",
            capabilities=("core", "flow"),
            includes=_RUNTIME_SOURCES,
            base=None,
        ),
        ImageEntry(
            name="metadata-service",
            description="The metadata service (metaflow service serve): SQLite, or PostgreSQL and NATS",
            capabilities=("service",),
            includes=(("runtime/requirements-service.lock", "requirements-service.lock"),),
        ),
        ImageEntry(
            name="ui",
            description="The UI (metaflow ui) with its built front end, on the metadata service or a mounted datastore",
            capabilities=("ui",),
            includes=(("runtime/requirements-ui.lock", "requirements-ui.lock"),),
        ),
        ImageEntry(
            name="key-release",
            description="The key-release service of @confidential steps: run data keys to attested enclaves only",
            capabilities=("key-release",),
            includes=(("runtime/requirements-key-release.lock", "requirements-key-release.lock"),),
        ),
        ImageEntry(
            name="confidential",
            description="The task image of @confidential steps in TDX confidential VMs (Phala Cloud)",
            capabilities=("confidential",),
            includes=(("runtime/requirements-confidential.lock", "requirements-confidential.lock"),),
        ),
        ImageEntry(
            name="gramine",
            description="Gramine on the confidential image: what each Gramine @confidential step's image builds FROM",
            capabilities=("confidential-gramine",),
            base="confidential",
            platforms=("linux/amd64",),
        ),
        ImageEntry(
            name="postgres",
            description="PostgreSQL 15 from Debian's packages, the local stack's service database",
            capabilities=("service-database",),
        ),
        ImageEntry(
            name="nats",
            description="NATS with JetStream from Debian's packages, the local stack's event broker",
            capabilities=("service-events",),
        ),
    )
}


def project_root() -> Path:
    """The Metaflow Stack source tree that holds ``images/``."""
    return images_root().parent


def images_root() -> Path:
    """The folder holding one build context per image.

    ``STACK_IMAGES_DIR`` names it explicitly; otherwise the source checkout
    this runtime was installed from (an editable install) is used.
    """
    configured = settings.load().images_dir
    if configured is not None:
        if not (configured / "base" / "Dockerfile").is_file():
            raise StackError(
                f"METAFLOW_STACK_IMAGES_DIR={configured} holds no images/base/Dockerfile",
                fix="point METAFLOW_STACK_IMAGES_DIR at the images/ folder of a Metaflow Stack checkout",
            )
        return configured
    for parent in Path(__file__).resolve().parents:
        if (parent / "images" / "base" / "Dockerfile").is_file() and (parent / "runtime").is_dir():
            return parent / "images"
    raise StackError(
        "no image build contexts found: this runtime was not installed from a Metaflow Stack checkout",
        fix="install a released runtime (its image lock pulls the published images by digest), "
        "or set METAFLOW_STACK_IMAGES_DIR to a checkout's images/ folder to build them",
    )


def has_sources() -> bool:
    """Whether the images' build contexts are here: a checkout, or ``METAFLOW_STACK_IMAGES_DIR``."""
    try:
        images_root()
    except StackError:
        return False
    return True


def names() -> list[str]:
    """Every image name in the catalog, sorted."""
    return sorted(_CATALOG)


def get(name: str) -> ImageEntry:
    """The entry for an image name or a capability name."""
    if name in _CATALOG:
        return _CATALOG[name]
    for entry in _CATALOG.values():
        if name in entry.capabilities:
            return entry
    known = ", ".join(names())
    capabilities = ", ".join(sorted(c for e in _CATALOG.values() for c in e.capabilities))
    raise UnknownImageError(f"unknown image or capability {name!r}; images: {known}; capabilities: {capabilities}")


def _wanted(path: Path) -> bool:
    if _IGNORED_PARTS.intersection(path.parts) or path.name in _IGNORED_NAMES:
        return False
    return not any(part.endswith(_IGNORED_SUFFIXES) for part in path.parts)


def _copy(source: Path, dest: Path) -> None:
    if source.is_dir() and not source.is_symlink():
        for item in sorted(source.rglob("*")):  # (never into a linked folder: the link itself is copied)
            relative = item.relative_to(source)
            if (item.is_symlink() or item.is_file()) and _wanted(relative):
                _copy_entry(item, dest / relative)
    elif source.is_symlink() or source.is_file():
        _copy_entry(source, dest)
    else:
        raise StackError(f"the build context of an image needs {source}, which is missing")


def _copy_entry(source: Path, dest: Path) -> None:
    """A file by its bytes, a link as a link: a link's target, maybe outside the tree, is never read."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, dest, follow_symlinks=False)


def normalise_modes(tree: Path) -> None:
    """Make ``tree``'s folders 0755 and its files 0644, or 0755 when executable, as an image should get them.

    ``COPY`` keeps every mode bit: a file staged under a umask of 077, or one
    its owner made private, would be unreadable to an image's non-root user.
    Links are left alone (a mode change would reach their targets).
    """
    for path in (tree, *tree.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


@contextmanager
def staged_context(entry: ImageEntry) -> Iterator[Path]:
    """A temporary build context: the image's folder plus its included sources."""
    root = project_root()
    with tempfile.TemporaryDirectory(prefix=f"stack-{entry.name}-") as tmp:
        staged = Path(tmp)
        _copy(entry.context_dir(), staged)
        for source, dest in entry.includes:
            _copy(root / source, staged / dest)
        normalise_modes(staged)
        yield staged


def context_hash(context: Path, base_image: str) -> str:
    """A digest of a context's files (paths, executable bits and bytes), its links (paths and targets' names)
    and the base image."""
    digest = hashlib.sha256()
    digest.update(f"base={base_image}\n".encode())
    for item in sorted(p for p in context.rglob("*") if p.is_symlink() or p.is_file()):
        relative = item.relative_to(context).as_posix()
        if item.is_symlink():
            digest.update(f"{relative}\0link\0{os.readlink(item)}\0".encode())
            continue
        executable = item.stat().st_mode & 0o111 != 0
        digest.update(f"{relative}\0{int(executable)}\0".encode())
        digest.update(hashlib.sha256(item.read_bytes()).digest())
    return digest.hexdigest()


def tag_for(context: Path, base_image: str) -> str:
    """The reproducible tag of an image built from ``context`` on ``base_image``."""
    return context_hash(context, base_image)[:16]


def repository(entry: ImageEntry, registry: str | None = None) -> str:
    """The image's repository name, under the configured registry when there is one."""
    config = settings.load()
    registry = config.registry if registry is None else registry
    name = f"{config.image_namespace}/{entry.name}"
    return f"{registry}/{name}" if registry else name
