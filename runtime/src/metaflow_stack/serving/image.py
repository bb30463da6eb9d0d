"""Build the image that serves one function: ``images/function-fastapi`` from a reference.

The build context is staged from the reference: the function's exact pins
(plus the serving packages at this environment's versions when the function's
environment lacks them) as ``requirements.lock``, the runtime as it travels to
foreign workers, and a self-contained bundle with the artifacts. The tag is a
hash of what decides the image's content (Dockerfile, base, lock, runtime,
reference digest), so the same reference always gives the same tag.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from metaflow_stack import base_images, builders, catalog, settings
from metaflow_stack.engines.docker import require_engine
from metaflow_stack.errors import UnknownImageError
from metaflow_stack.functions import environment
from metaflow_stack.functions.bundle import export, resolve_reference
from metaflow_stack.functions.reference import FunctionReference

KINDS = {"fastapi": "function-fastapi"}
#: What the served image needs beyond the function's own environment.
SERVING_REQUIREMENTS = ("fastapi", "uvicorn", "prometheus-client")


def requirements(ref: FunctionReference) -> str:
    """The image's lock: the function's pins, then serving packages it lacks."""
    pins = {line.split("==", 1)[0]: line for line in ref.environment.packages}
    for name, pin in environment.closure(SERVING_REQUIREMENTS).items():
        pins.setdefault(name, pin)
    return "\n".join(sorted(pins.values())) + "\n"


def _tag(dockerfile: bytes, base: str, lock: str, runtime: Path, ref: FunctionReference) -> str:
    digest = hashlib.sha256()
    for part in (dockerfile, base.encode(), lock.encode(), runtime.name.encode(), ref.digest.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def build_image(source: Any, kind: str = "fastapi", console: Console | None = None) -> str:
    """Build (or find up to date) the serving image of a reference; return its local reference."""
    console = console or Console(stderr=True)
    if kind not in KINDS:
        raise UnknownImageError(f"unknown image kind {kind!r}; kinds: {', '.join(KINDS)}")
    ref, base = resolve_reference(source)
    docker = require_engine()
    base_image = base_images.choose(docker)
    context_dir = catalog.images_root() / KINDS[kind]
    dockerfile = (context_dir / "Dockerfile").read_bytes()
    lock = requirements(ref)
    runtime = environment.runtime_snapshot()
    name = f"{settings.load().image_namespace}/{KINDS[kind]}-{ref.name.replace('_', '-').lower()}"
    image = f"{name}:{_tag(dockerfile, base_image, lock, runtime, ref)}"
    if docker.image.exists(image):
        console.print(f"{image} is up to date")
        return image
    base_images.ensure(base_image, docker, console)
    with tempfile.TemporaryDirectory(prefix="stack-function-image-") as tmp:
        context = Path(tmp)
        shutil.copytree(context_dir, context, dirs_exist_ok=True)
        (context / "requirements.lock").write_text(lock)
        shutil.copytree(runtime, context / "runtime")
        export(ref, str(context / "bundle"), include_artifacts=True, base=base)
        for path in context.rglob("*"):  # the image's non-root user reads everything; staging files are private
            path.chmod(0o755 if path.is_dir() else 0o644)
        request = builders.BuildRequest(
            context=context,
            tag=image,
            build_args={"BASE_IMAGE": base_image},
            labels={"io.metaflow-stack.function": ref.name, "io.metaflow-stack.task": ref.task.pathspec},
        )
        with console.status(f"building {image}"):
            builders.build(request, console)
    console.print(f"built {image}")
    return image
