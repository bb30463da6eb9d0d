"""A step's ``@pypi`` environment as Metaflow solved it, so an image built for the step installs exactly that.

With ``--environment pypi`` (or ``conda``) Metaflow solves every step's
environment at the run's start: micromamba for the Python and conda
packages, pip for the PyPI packages, for the platform of the step's compute
decorator. It keeps the solve in its environment manifest (keyed by the
environment's id, the platform and the kind; it also travels in the code
package), and downloads every wheel (building the ones named by a ``git+``
URL) into the environment's folder on this machine. A step whose
tasks run in an image of their own (a Gramine step's, GSC-style) installs
those very files: no resolution and no download of its own, so the image
holds, byte for byte, what the run was solved and started with.

The image brings its own Python, of the minor version the step asks for, so
the conda packages Metaflow solves for a PyPI environment (Python and its
libraries), and for a step with no packages of its own (Python and
Metaflow's pins, which the stack's images have), are not needed. Conda
packages a step asks for itself need micromamba in the image's build, which
is not built yet: ``conda_packages`` names them, so they are refused when
the run starts.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaflow_stack.errors import StackError

#: Metaflow's environments that solve a step's own packages (``--environment``).
SOLVING = ("conda", "pypi")


@dataclass(frozen=True)
class SolvedEnvironment:
    """A step's PyPI environment: its Python (major.minor) and its wheels, the files on this machine."""

    python: str
    wheels: tuple[Path, ...]


def has_own(environment: Any, decos: list[Any]) -> bool:
    """Whether a step with these decorators runs in an environment Metaflow solves for it: every step does
    under ``--environment pypi|conda`` (which gives each one Metaflow's ``@conda``), unless its first
    ``@pypi``/``@conda`` says ``disabled=True`` (as Metaflow's ``is_disabled`` reads it)."""
    if getattr(environment, "TYPE", None) not in SOLVING:
        return False
    first = next((d for d in decos if d.name in SOLVING), None)
    return first is not None and str(first.attributes.get("disabled")).lower() != "true"


def _asked(flow: Any, decos: list[Any], name: str) -> list[dict[str, Any]]:
    """The attributes of the step's ``@name`` and the flow's ``@name_base``, the step's first (read before
    Metaflow's own ``step_init`` merges them)."""
    found = [d.attributes for d in decos if d.name == name]
    return found + [d.attributes for d in getattr(flow, "_flow_decorators", {}).get(f"{name}_base", [])]


def conda_packages(flow: Any, decos: list[Any]) -> list[str]:
    """The conda packages the step asks for itself (its ``@conda``, the flow's ``@conda_base``), by name."""
    names = set()
    for attributes in _asked(flow, decos, "conda"):
        names |= set(attributes.get("packages") or {}) | set(attributes.get("libraries") or {})
    return sorted(names)


def requested_python(flow: Any, decos: list[Any]) -> str | None:
    """The Python (major.minor) the step's ``@pypi`` environment is solved for, as Metaflow picks it (its
    ``@pypi``'s, the flow's ``@pypi_base``'s, its ``@conda``'s, else the Python running the flow); None for a
    step without ``@pypi``."""
    pypi = _asked(flow, decos, "pypi")
    if not pypi:
        return None
    named = [a.get("python") for a in pypi + _asked(flow, decos, "conda") if a.get("python")]
    return ".".join(str(named[0] if named else platform.python_version()).split(".")[:2])


def solved(environment: Any, step_name: str, target: str) -> SolvedEnvironment | None:
    """The step's PyPI environment as solved for the ``target`` platform (``linux-64``) from Metaflow's
    ``environment`` (a trampoline's ``ctx.obj.environment``), its wheels where Metaflow downloaded or built
    them at the run's start; None when it has no PyPI packages of its own."""
    from metaflow.plugins.pypi.pip import METADATA_FILE

    if getattr(environment, "TYPE", None) not in SOLVING:
        return None
    step = next(s for s in environment.flow if s.name == step_name)
    if environment.is_disabled(step):
        return None
    described = environment.get_environment(step)
    if "pypi" not in described:
        return None
    rerun = "run the flow again with --environment pypi (Metaflow solves and downloads it at the run's start)"
    found = environment.read_from_environment_manifest([described["id_"], target, "pypi"])
    if found is None:
        raise StackError(f"step {step_name}'s environment was not solved for {target}", fix=rerun)
    # Where pip ran for it: the environment Metaflow made for this machine's platform (micromamba knows).
    prefix = environment.solvers["conda"].path_to_environment(described["id_"])
    kept = Path(METADATA_FILE.format(prefix=prefix)) if prefix else None
    if kept is None or not kept.is_file():
        raise StackError(f"step {step_name}'s environment is not on this machine", fix=rerun)
    downloaded = json.loads(kept.read_text())
    wheels = []
    for package in found:
        path = Path(str(downloaded.get(package["url"], "")))
        if path.suffix != ".whl":
            raise StackError(f"step {step_name}'s package {package['url']} was not downloaded here", fix=rerun)
        if not path.is_file():  # Metaflow downloads an environment's packages only while it has no record
            raise StackError(
                f"step {step_name}'s package {package['url']} was downloaded to {path}, which is gone",
                fix=f"remove {prefix} (Metaflow's environment of the step), then {rerun}",
            )
        wheels.append(path)
    python = str(described["pypi"]["python"])
    return SolvedEnvironment(".".join(python.split(".")[:2]), tuple(wheels))
