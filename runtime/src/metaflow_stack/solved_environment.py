"""A step's ``@pypi`` environment as Metaflow solved it, so an image built for the step installs exactly that.

With ``--environment pypi`` (or ``conda``) Metaflow solves every step's
environment at the run's start: micromamba for the Python and conda
packages, pip for the PyPI wheels, for the platform of the step's compute
decorator. It keeps the result in its environment manifest, keyed by the
environment's id, the platform and the kind, and packs that file into the
code package. A step whose tasks run in an image of their own (a Gramine
step's, GSC-style) installs the wheels that manifest lists, with no
resolution of its own: the image holds the environment the run was solved
with, not whatever an index offers on the day it is built.

Only PyPI environments are read: the image brings its own Python (the
stack's, of the same minor version), so the conda packages Metaflow solved
for a PyPI environment (Python and its libraries) are not needed. A
``@conda`` environment's packages need micromamba in the image's build,
which is not built yet; it is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metaflow_stack.errors import StackError

#: Metaflow's environments that solve a step's own packages (``--environment``).
SOLVING = ("conda", "pypi")


@dataclass(frozen=True)
class SolvedEnvironment:
    """A step's environment: Metaflow's id for it, its Python (major.minor) and its wheels, by URL."""

    id: str
    python: str
    wheels: tuple[str, ...]


def has_own(environment: Any, decos: list[Any]) -> bool:
    """Whether a step with these decorators runs in an environment Metaflow solves for it: every step does
    under ``--environment pypi|conda`` (which gives each one Metaflow's ``@conda``), unless its first
    ``@pypi``/``@conda`` says ``disabled=True`` (as Metaflow's ``is_disabled`` reads it)."""
    if getattr(environment, "TYPE", None) not in SOLVING:
        return False
    first = next((d for d in decos if d.name in SOLVING), None)
    return first is not None and str(first.attributes.get("disabled")).lower() != "true"


def solved(environment: Any, step_name: str, platform: str) -> SolvedEnvironment | None:
    """The step's environment as solved for ``platform`` (``linux-64``) from Metaflow's ``environment`` (a
    trampoline's ``ctx.obj.environment``); None when the step has none of its own."""
    if getattr(environment, "TYPE", None) not in SOLVING:
        return None
    step = next(s for s in environment.flow if s.name == step_name)
    if environment.is_disabled(step):
        return None
    described = environment.get_environment(step)
    where = f"step {step_name}"
    if not described:
        return None
    conda = described.get("conda", {})
    if "pypi" not in described and conda.get("packages"):
        raise StackError(
            f"{where}'s environment is a conda one (packages: {', '.join(sorted(conda['packages']))}), which "
            "its image cannot install yet",
            fix="use @pypi for the step's packages",
        )
    kind = "pypi" if "pypi" in described else "conda"
    python = str(described[kind].get("python") or conda.get("python") or "")
    found = environment.read_from_environment_manifest([described["id_"], platform, kind])
    if found is None:
        raise StackError(
            f"{where}'s environment was not solved for {platform}",
            fix="run the flow with --environment pypi (Metaflow solves each step's environment at the run's start)",
        )
    wheels = []
    for package in found if kind == "pypi" else []:
        url = str(package.get("url", ""))
        if package.get("require_build") or not url.split("#", 1)[0].endswith(".whl"):
            raise StackError(
                f"{where}'s package {url} is not a wheel, and its image installs wheels only",
                fix="pin a version the package index has a wheel of for Linux",
            )
        wheels.append(url)
    return SolvedEnvironment(described["id_"], ".".join(python.split(".")[:2]), tuple(wheels))
