"""``metaflow devcontainer generate``: a step's environment, captured as a devcontainer.json.

From the step's ``@pypi`` (and the flow's ``@pypi_base``), ``@environment`` and ``@devcontainer``
settings it writes ``<out>/devcontainer.json`` plus what builds it:

* on the stack's base image's Python (3.11, or no Python named), a ``Dockerfile`` on the base image
  that installs the packages: built directly, with the build machine's CA bundle as a secret;
* on another Python, the Python image of that version with the ``metaflow-stack`` feature (copied
  next to the file) installing Metaflow, the runtime and the packages: built by the Dev Containers CLI.

The same file opens in VS Code, Codespaces, DevPod or Daytona, and runs the step with
``@devcontainer(config=...)``. Nothing is written unless everything was understood; an existing
folder is replaced only with ``force``.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from metaflow_stack.errors import StackError

#: The base image's Python, major.minor.
BASE_PYTHON = "3.11"
FEATURE = Path(__file__).parent / "metaflow-stack"
_OPERATOR = re.compile(r"^\s*(==|>=|<=|~=|!=|>|<|@)")


@dataclass
class StepEnvironment:
    """What one step asks of its environment."""

    flow: str
    step: str
    python: str | None = None
    packages: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    run_args: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def _flow_class(flow_file: Path):
    from metaflow import FlowSpec

    if not flow_file.is_file():
        raise StackError(f"{flow_file}: no such flow file", fix="give the path of a flow's .py file")
    try:
        names = runpy.run_path(str(flow_file), run_name="__metaflow_stack_generate__")
    except Exception as exc:
        raise StackError(f"{flow_file}: importing it failed: {exc!r}", fix="run the flow to see the error") from exc
    flows = [v for v in names.values() if isinstance(v, type) and issubclass(v, FlowSpec) and v is not FlowSpec]
    flows = [v for v in flows if v.__module__ == "__metaflow_stack_generate__"] or flows
    if len(flows) != 1:
        raise StackError(f"{flow_file}: expected one FlowSpec subclass, found {len(flows)}", fix="one flow per file")
    return flows[0]


def _requirement(name: str, version: str) -> str:
    version = str(version).strip()
    if not version:
        return name
    return f"{name}{version}" if _OPERATOR.match(version) else f"{name}=={version}"


def environments(flow_file: Path, step: str | None) -> list[StepEnvironment]:
    """The environment of ``step``, or of every step that carries ``@pypi``/``@environment``/``@devcontainer``."""
    from metaflow.flowspec import FlowStateItems

    cls = _flow_class(flow_file)
    steps = {name: getattr(cls, name) for name in dir(cls) if getattr(getattr(cls, name), "is_step", False)}
    if step is not None and step not in steps:
        raise StackError(f"{cls.__name__} has no step {step!r}", fix=f"pick one of: {', '.join(sorted(steps))}")
    flow_decos = cls._flow_state[FlowStateItems.FLOW_DECORATORS]
    base = {k: v for d in flow_decos.get("pypi_base", []) for k, v in (d.attributes.get("packages") or {}).items()}
    base_python = next((d.attributes.get("python") for d in flow_decos.get("pypi_base", [])), None)
    if flow_decos.get("conda_base"):
        raise StackError(f"{cls.__name__}: @conda_base is not captured yet", fix="use @pypi_base (or a Dockerfile)")
    found = []
    for name in [step] if step else sorted(steps):
        env = StepEnvironment(cls.__name__, name, python=base_python, packages=dict(base))
        env.sources += ["@pypi_base"] if base or base_python else []
        for deco in steps[name].decorators:
            attributes = deco.attributes
            if deco.name == "conda":
                raise StackError(f"{cls.__name__}.{name}: @conda is not captured yet", fix="use @pypi for this step")
            if deco.name == "pypi":
                env.packages.update(attributes.get("packages") or {})
                env.python = attributes.get("python") or env.python
            elif deco.name == "environment":
                env.env.update({k: str(v) for k, v in (attributes.get("vars") or {}).items()})
            elif deco.name == "devcontainer":
                if attributes.get("config"):
                    raise StackError(f"{cls.__name__}.{name} already names a devcontainer.json", fix="edit that file")
                env.image = attributes.get("image")
                env.run_args += [f"--cpus={attributes['cpu']}"] if attributes.get("cpu") else []
                env.run_args += [f"--memory={attributes['memory']}"] if attributes.get("memory") else []
            else:
                continue
            env.sources.append(f"@{deco.name}")
        if env.sources or step:
            found.append(env)
    if not found:
        raise StackError(
            f"no step of {cls.__name__} carries @pypi, @environment or @devcontainer",
            fix="name a step with --step to capture the base image alone",
        )
    return found


def _dockerfile(env: StepEnvironment) -> str:
    lines = [f"# Generated by `metaflow devcontainer generate` from {env.flow}.{env.step}."]
    if env.image is None:
        lines += [
            "# BASE_IMAGE is the Metaflow Stack base image (Python 3.11, Metaflow, the runtime);",
            "# @devcontainer fills it in with the one built or pulled on this machine.",
            "ARG BASE_IMAGE=metaflow-stack/base",
            "FROM ${BASE_IMAGE}",
        ]
    else:
        lines.append(f"FROM {env.image}")
    if env.packages:
        requirements = " ".join(f'"{_requirement(n, v)}"' for n, v in sorted(env.packages.items()))
        install = "uv pip install" if env.image is None else "python3 -m pip install --no-cache-dir"
        lines += [
            "USER root",
            "# The build machine's CA bundle, when it needs one, is a build secret: it never lands in a layer.",
            "RUN --mount=type=secret,id=pipca \\",
            "    if [ -s /run/secrets/pipca ]; then \\",
            "        export PIP_CERT=/run/secrets/pipca SSL_CERT_FILE=/run/secrets/pipca; fi; \\",
            f"    {install} {requirements}",
        ]
        lines += ["USER 1000:1000"] if env.image is None else []
    return "\n".join(lines) + "\n"


def render(env: StepEnvironment) -> tuple[dict, dict[str, str]]:
    """The devcontainer.json of ``env`` and the other files it needs (name -> text)."""
    config: dict = {"name": f"{env.flow}.{env.step}".lower()}
    files: dict[str, str] = {}
    python = env.python and ".".join(str(env.python).split(".")[:2])
    if python in (None, BASE_PYTHON) or env.image is not None:
        config["build"] = {"dockerfile": "Dockerfile", "context": "."}
        files["Dockerfile"] = _dockerfile(env)
    else:
        requirements = " ".join(_requirement(n, v) for n, v in sorted(env.packages.items()))
        config["image"] = f"python:{python}-slim"
        config["features"] = {f"./{FEATURE.name}": {"packages": requirements} if requirements else {}}
    if env.env:
        config["containerEnv"] = env.env
    if env.run_args:
        config["runArgs"] = env.run_args
    config["customizations"] = {"metaflow": {"flow": env.flow, "step": env.step, "from": env.sources}}
    return config, files


def write(env: StepEnvironment, out: Path, force: bool) -> Path:
    """Write ``env``'s configuration folder at ``out`` whole (staged, then moved); the file's path."""
    if out.exists() and not force:
        raise StackError(f"{out} exists", fix="pass --force to replace it, or --out another folder")
    config, files = render(env)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".generate-", dir=out.parent))
    try:
        header = f"// Generated by `metaflow devcontainer generate` from {env.flow}.{env.step}; edit freely.\n"
        (stage / "devcontainer.json").write_text(header + json.dumps(config, indent=2) + "\n")
        for name, text in files.items():
            (stage / name).write_text(text)
        if "features" in config:
            shutil.copytree(FEATURE, stage / FEATURE.name)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out / "devcontainer.json"
