"""Capture a function's environment at bind time and recreate it where it runs.

Capture records the Python version and the exact pins of every distribution
installed in the binding environment that an index can provide (local and
editable installs are listed as omitted; the runtime itself travels with the
worker, as Metaflow's own code travels in a code package). Recreation builds
a virtualenv with uv once per environment digest, in a cache under the state
directory, guarded by a file lock so concurrent callers build it once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from metaflow_stack import settings
from metaflow_stack.functions.errors import EnvironmentBuildError
from metaflow_stack.functions.reference import EnvironmentRef

#: Distributions never pinned: the runtime travels with the worker; pip is not needed.
_NEVER_PINNED = {"metaflow-stack", "pip"}


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _installed_from_index(dist: importlib.metadata.Distribution) -> bool:
    direct_url = dist.read_text("direct_url.json")
    if not direct_url:
        return True
    info = json.loads(direct_url)
    return not ("dir_info" in info or info.get("url", "").startswith("file:"))


def digest_of(python: str, packages: list[str]) -> str:
    """The environment's identity: Python minor version and pins."""
    minor = ".".join(python.split(".")[:2])
    return hashlib.sha256("\n".join([f"python=={minor}", *packages]).encode()).hexdigest()


def _site_packages() -> list[str]:
    """The environment's own package folders (not whatever else is on sys.path: Ray adds its vendored folder)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _environment(python: str, source: str, pins: dict[str, str], omitted: set[str]) -> EnvironmentRef:
    packages = sorted(pins.values())
    return EnvironmentRef(
        python=python,
        platform=sysconfig.get_platform(),
        source=source,
        packages=packages,
        omitted=sorted(omitted - set(pins)),
        digest=digest_of(python, packages),
    )


def capture() -> EnvironmentRef:
    """The binding environment: this interpreter and the distributions installed in it."""
    pins: dict[str, str] = {}
    omitted: set[str] = set()
    for dist in importlib.metadata.distributions(path=_site_packages()):
        name = _canonical(dist.metadata["Name"] or "")
        if not name or name in pins or name in _NEVER_PINNED:
            continue
        if _installed_from_index(dist):
            pins[name] = f"{name}=={dist.version}"
        else:
            omitted.add(name)
    return _environment(platform.python_version(), "binding-environment", pins, omitted)


#: What a worker needs in any environment: Metaflow (to read the blob store) and the runtime's own imports.
WORKER_REQUIREMENTS = ("metaflow", "pydantic", "orjson", "msgpack", "fastavro", "fastjsonschema")


def closure(names: tuple[str, ...]) -> dict[str, str]:
    """Pins of ``names`` and everything they require, as installed in this environment."""
    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    pending = list(names)
    while pending:
        name = _canonical(pending.pop())
        if name in pins:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins[name] = f"{name}=={dist.version}"
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return pins


def _pin_from_url(url: str) -> tuple[str, str] | None:
    """``(name, version)`` of a wheel, sdist or conda package URL, as Metaflow's solvers record them."""
    from packaging.utils import parse_sdist_filename, parse_wheel_filename

    filename = url.split("#", 1)[0].rsplit("/", 1)[-1]
    try:
        if filename.endswith(".whl"):
            name, version, *_ = parse_wheel_filename(filename)
        elif filename.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(filename)
        elif filename.endswith((".conda", ".tar.bz2")):
            name, version, _ = filename.removesuffix(".conda").removesuffix(".tar.bz2").rsplit("-", 2)
        else:
            return None
    except ValueError:
        return None
    return _canonical(str(name)), str(version)


def from_task(task: Any) -> EnvironmentRef | None:
    """The task's own ``@pypi``/``@conda`` environment, when it ran in one.

    Metaflow records the solved environment (package URLs per kind) in the
    code package's manifest and exposes it as ``Task.environment_info``. PyPI
    packages become exact pins; conda packages that are not Python
    distributions (compilers, C libraries) cannot be recreated with uv and are
    listed as omitted; Python's version comes from the conda solve. The
    worker's own requirements are added from this environment when the task's
    lacks them.
    """
    info = task.environment_info
    if not isinstance(info, dict) or not info:  # plain tasks report a string, or nothing
        return None
    pins: dict[str, str] = {}
    omitted: set[str] = set()
    python = None
    for kind in ("conda", "pypi"):
        for package in info.get(kind) or []:
            parsed = _pin_from_url(package.get("url", ""))
            if parsed is None:
                continue
            name, version = parsed
            if kind == "conda" and name == "python":
                python = version
            elif kind == "pypi":
                pins[name] = f"{name}=={version}"
            else:
                omitted.add(name)
    for name, pin in closure(WORKER_REQUIREMENTS).items():
        pins.setdefault(name, pin)
    python = python or task.metadata_dict.get("python_version") or platform.python_version()
    return _environment(python, "task-environment", pins, omitted)


@functools.cache
def _current() -> tuple[str, frozenset[str]]:
    here = capture()
    return _minor(here.python), frozenset(here.packages)


def _minor(python: str) -> str:
    return ".".join(python.split(".")[:2])


def matches_current(env: EnvironmentRef) -> bool:
    """Whether this interpreter has the captured environment: its Python and every pin, exactly.

    Packages beyond the pins (a serving image's web server, Ray in a batch
    image) do not matter: the function imports the same versions it was bound with.
    """
    python, packages = _current()
    return python == _minor(env.python) and set(env.packages) <= packages


def uv_binary() -> str:
    """The uv executable this runtime ships with."""
    from uv import find_uv_bin

    return find_uv_bin()


def materialize(env: EnvironmentRef, console: Console | None = None) -> Path:
    """The Python executable of the recreated environment, built on first use."""
    console = console or Console(stderr=True)
    cache = settings.load().state_dir / "envs"
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / env.digest[:20]
    python = root / "bin" / "python"
    ready = root / ".ready"
    if ready.exists():
        return python
    with (cache / f"{env.digest[:20]}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; others wait, then find it ready
        if ready.exists():
            return python
        shutil.rmtree(root, ignore_errors=True)
        minor = ".".join(env.python.split(".")[:2])
        requirements = root.with_suffix(".txt")
        requirements.write_text("\n".join(env.packages) + "\n")
        with console.status(f"creating the function environment {env.digest[:12]} ({len(env.packages)} packages)"):
            _run([uv_binary(), "venv", "--quiet", "--python", minor, "--python-preference", "system", str(root)])
            _run([uv_binary(), "pip", "install", "--quiet", "--python", str(python), "-r", str(requirements)])
        ready.write_text(env.digest)
        console.print(f"function environment {env.digest[:12]} ready", highlight=False)
    return python


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise EnvironmentBuildError(
            f"recreating the function environment failed: {' '.join(command[1:3])}\n{tail}",
            fix="check that the pinned packages are available from your package index for this platform",
        )


def _runtime_packages() -> dict[str, Path]:
    """The runtime's two packages: ``metaflow_stack`` and its Metaflow extension."""
    import importlib.util

    import metaflow_stack

    extension = importlib.util.find_spec("metaflow_extensions.stack")
    assert extension is not None and extension.submodule_search_locations
    return {
        "metaflow_stack": Path(metaflow_stack.__file__).parent,
        "metaflow_extensions/stack": Path(next(iter(extension.submodule_search_locations))),
    }


@functools.cache
def runtime_snapshot() -> Path:
    """A copy of this runtime for worker processes in other environments.

    Workers run in the function's own environment, where metaflow-stack is not
    installed; like Metaflow's code package carries Metaflow, the worker's
    ``PYTHONPATH`` carries the runtime and its extension (so the function's
    ``from metaflow import FunctionParameters`` works there). The copy is
    keyed by the runtime's content.
    """
    import hashlib

    files = {
        f"{name}/{path.relative_to(root).as_posix()}": path
        for name, root in _runtime_packages().items()
        for path in sorted(root.rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes())
    target = settings.load().state_dir / "runtime" / digest.hexdigest()[:20]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".runtime-", dir=target.parent))
        for name, path in files.items():
            dest = staging / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        try:
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Interpreter:
    """Where a function's worker runs: a Python and what its ``PYTHONPATH`` needs."""

    python: Path
    pythonpath: str | None

    def env(self) -> dict[str, str]:
        """The worker's environment variables."""
        env = dict(os.environ)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env


def interpreter(env: EnvironmentRef, console: Console | None = None) -> Interpreter:
    """This interpreter when it is the captured environment, else the recreated one plus the runtime."""
    if matches_current(env):
        return Interpreter(Path(sys.executable), None)
    return Interpreter(materialize(env, console), str(runtime_snapshot()))
