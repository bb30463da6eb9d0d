"""Build the image that runs one function, from ``images/function``: its ``fastapi`` stage (online) or ``ray`` (batch).

The build context is staged from the reference: the function's exact pins
(plus the kind's own packages, FastAPI or Ray Data, at versions that fit
them) as ``pylock.toml``, the runtime as it travels to foreign workers, and a
self-contained bundle with the artifacts, on the stack base image (resolved
first: found, pulled or built). The tag is a hash of what decides
the image's content (Dockerfile, base reference with its tag, lock, runtime, reference digest), so
the same reference always gives the same tag. ``push`` publishes it to the
configured registry under the same name.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from metaflow_stack import builders, catalog, images, settings
from metaflow_stack.engines.docker import machine, require_engine
from metaflow_stack.errors import UnknownImageError
from metaflow_stack.functions import environment
from metaflow_stack.functions.bundle import export, resolve_reference
from metaflow_stack.functions.errors import EnvironmentBuildError
from metaflow_stack.functions.reference import FunctionReference

#: The build context every kind's image is staged from; each kind is a stage of its Dockerfile.
CONTEXT = "function"

#: The lock's name in the context (PEP 751 asks for ``pylock.toml`` or ``pylock.<name>.toml``).
LOCK = "pylock.toml"

#: The stack base is Debian 12 (glibc 2.36) whichever way it is made (``settings.PUBLIC_BASE_IMAGE``), so its
#: wheels may need up to that.
BASE_GLIBC = "2_36"

#: The engines' architectures (``engines.docker.machine``) there are wheels for.
ARCHITECTURES = ("x86_64", "aarch64")


@dataclass(frozen=True)
class ImageKind:
    """One way to run a function from an image: the image's name and what it adds to the function's environment."""

    image: str
    requirements: tuple[str, ...]


KINDS = {
    "fastapi": ImageKind("function-fastapi", ("fastapi", "uvicorn", "prometheus-client")),
    "ray": ImageKind("function-ray", ("ray[data]",)),
}


def requirements(ref: FunctionReference, kind: str, architecture: str) -> str:
    """The image's lock: the function's exact pins plus the kind's packages, resolved by uv, as ``pylock.toml``.

    The kind's packages take whatever versions fit the function's pins (an old
    ``packaging`` pin means an older Ray), resolved as of the moment the
    function was bound, so the same reference gives the same lock later. The
    lock is PEP 751's: every file's URL and hash for the engine's
    architecture, so the build downloads exactly what was resolved here and
    checks it, without asking the index which versions exist (an index or
    its cache that has not yet seen a release the resolver saw cannot break
    the build; only a package built from source asks for its build tools).
    The files come from where uv found them: the build must reach that index.
    """
    if architecture not in ARCHITECTURES:
        raise EnvironmentBuildError(
            f"no wheels for a Docker engine on {architecture!r}",
            fix=f"build on an engine whose architecture is one of: {', '.join(ARCHITECTURES)}",
        )
    platform = f"{architecture}-manylinux_{BASE_GLIBC}"
    with tempfile.TemporaryDirectory(prefix="stack-function-lock-") as tmp:
        wanted, lock = Path(tmp) / "requirements.in", Path(tmp) / LOCK
        wanted.write_text("\n".join([*ref.environment.packages, *KINDS[kind].requirements]) + "\n")
        python = ".".join(ref.environment.python.split(".")[:2])
        command = [environment.uv_binary(), "pip", "compile", str(wanted), "--python-version", python]
        command += ["--python-platform", platform, "--exclude-newer", ref.created_at, "--format", "pylock.toml"]
        result = subprocess.run(
            [*command, "--no-header", "--quiet", "--output-file", str(lock)],
            capture_output=True,
            text=True,
            check=False,
        )
        text = lock.read_text() if result.returncode == 0 else ""
    if result.returncode != 0:
        raise EnvironmentBuildError(
            f"the function's environment cannot take the {kind} image's packages "
            f"({', '.join(KINDS[kind].requirements)}): {result.stderr.strip()}",
            fix="rebind the function in an environment whose pins are compatible, or choose another --kind",
        )
    return text


def _tag(dockerfile: bytes, kind: str, base: str, lock: str, runtime: Path, ref: FunctionReference) -> str:
    digest = hashlib.sha256()
    for part in (dockerfile, kind.encode(), base.encode(), lock.encode(), runtime.name.encode(), ref.digest.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def build_image(source: Any, kind: str = "fastapi", push: bool = False, console: Console | None = None) -> str:
    """Build (or find up to date) a reference's image; return its local reference, or the pushed one."""
    console = console or Console(stderr=True)
    if kind not in KINDS:
        raise UnknownImageError(f"unknown image kind {kind!r}; kinds: {', '.join(KINDS)}")
    ref, base = resolve_reference(source)
    docker = require_engine()
    base_image = images.resolve(catalog.STACK_BASE, console=console)
    context_dir = catalog.images_root() / CONTEXT
    dockerfile = (context_dir / "Dockerfile").read_bytes()
    lock = requirements(ref, kind, machine(docker))
    runtime = environment.runtime_snapshot()
    name = f"{settings.load().image_namespace}/{KINDS[kind].image}-{ref.name.replace('_', '-').lower()}"
    image = f"{name}:{_tag(dockerfile, kind, base_image, lock, runtime, ref)}"
    if docker.image.exists(image):
        console.print(f"{image} is up to date")
    else:
        with tempfile.TemporaryDirectory(prefix="stack-function-image-") as tmp:
            context = Path(tmp)
            shutil.copytree(context_dir, context, dirs_exist_ok=True)
            (context / LOCK).write_text(lock)
            shutil.copytree(runtime, context / "runtime")
            export(ref, str(context / "bundle"), include_artifacts=True, base=base)
            catalog.normalise_modes(context)  # the image's non-root user reads everything; staged files are private
            request = builders.BuildRequest(
                context=context,
                tag=image,
                build_args={"BASE_IMAGE": base_image},
                target=kind,
                labels={
                    "io.metaflow-stack.function": ref.name,
                    "io.metaflow-stack.task": ref.task.pathspec,
                    "io.metaflow-stack.kind": kind,
                },
            )
            with console.status(f"building {image}"):
                builders.build(request, console)
        console.print(f"built {image}")
    return images.push_reference(image, console=console, by_digest=True) if push else image
