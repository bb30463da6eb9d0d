"""``metaflow devcontainer generate``: a step's environment, captured as a devcontainer.json.

From the step's ``@pypi``/``@conda`` (and the flow's ``@pypi_base``/``@conda_base``),
``@environment`` and ``@devcontainer`` settings it writes ``<out>/devcontainer.json`` plus what
builds it:

* ``@pypi`` on the stack's base image's Python (3.11, or no Python named): a ``Dockerfile`` on the
  base image that installs the packages, built directly, with the build machine's CA bundle as a
  secret;
* ``@pypi`` on another Python: the Python image of that version with the ``metaflow-stack`` feature
  (copied next to the file) installing Metaflow, the runtime and the packages, built by the Dev
  Containers CLI;
* ``@conda``: a ``Dockerfile`` in which micromamba (borrowed from its image for the one build step,
  never left in the result) creates the conda environment at ``/opt/conda``, plus the feature
  installing Metaflow and the runtime in a virtual environment that sees the conda packages.

The same file opens in VS Code, Codespaces, DevPod or Daytona, and runs the step with
``@devcontainer(config=...)``. Nothing is written unless everything was understood; an existing
folder is replaced only with ``force``. The folder is meant to be committed, so an ``@environment``
value that is this machine's variable of the same name (``os.environ["HF_TOKEN"]``: often a secret)
is written as ``${localEnv:NAME}``, read again wherever the file is used (``_from_host``).
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from metaflow_stack import builders
from metaflow_stack.errors import StackError

#: The base image's Python, major.minor.
BASE_PYTHON = "3.11"
#: The oldest Python the runtime (and so a step's container) supports.
MIN_PYTHON = (3, 11)
#: Where a generated conda environment's micromamba comes from, and the image it is put on.
MICROMAMBA_IMAGE = "mambaorg/micromamba:2.3.3"
CONDA_IMAGE = "debian:bookworm-slim"
_MICROMAMBA_MOUNT = "--mount=type=bind,from=micromamba,source=/,target=/micromamba"
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
    #: The conda packages of a step with any (``@conda``/``@conda_base``): its environment is a conda one.
    conda: dict[str, str] | None = None


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


def _packages(attributes: dict) -> dict[str, str]:
    """A ``@pypi``/``@conda`` decorator's packages (``@conda``'s legacy ``libraries`` under them)."""
    return {**(attributes.get("libraries") or {}), **(attributes.get("packages") or {})}


def _resolve(kind: str, bases: list, own) -> tuple[dict[str, str] | None, str | None, list[str]]:
    """A step's ``@pypi`` or ``@conda`` environment as Metaflow merges it with the flow's
    ``@pypi_base``/``@conda_base``: the packages (None when there is none, or it is disabled), the
    Python, and the decorators it came from."""
    base = bases[0].attributes if bases else {}
    mine = own.attributes if own is not None else {}
    sources = ([f"@{kind}_base"] if bases else []) + ([f"@{kind}"] if own is not None else [])
    disabled = mine.get("disabled") if mine.get("disabled") is not None else base.get("disabled")
    if not sources or str(disabled).lower() == "true":
        return None, None, sources
    return {**_packages(base), **_packages(mine)}, mine.get("python") or base.get("python"), sources


def _apply(env: StepEnvironment, deco) -> bool:
    """Fold one ``@environment`` or ``@devcontainer`` into ``env``; whether ``deco`` was one."""
    attributes = deco.attributes
    if deco.name == "environment":
        env.env.update({k: str(v) for k, v in (attributes.get("vars") or {}).items()})
    elif deco.name == "devcontainer":
        if attributes.get("config"):
            raise StackError(f"{env.flow}.{env.step} already names a devcontainer.json", fix="edit that file")
        env.image = attributes.get("image")
        env.run_args += [f"--cpus={attributes['cpu']}"] if attributes.get("cpu") else []
        env.run_args += [f"--memory={attributes['memory']}"] if attributes.get("memory") else []
    else:
        return False
    return True


def _check(env: StepEnvironment) -> None:
    where = f"{env.flow}.{env.step}"
    if env.conda and env.packages:
        raise StackError(f"{where} has both PyPI and conda packages", fix="use one of @pypi or @conda (as Metaflow)")
    if env.python and tuple(int(p) for p in re.findall(r"\d+", str(env.python))[:2]) < MIN_PYTHON:
        raise StackError(
            f"{where} asks for Python {env.python}; the runtime needs {'.'.join(map(str, MIN_PYTHON))} or newer",
            fix="raise the step's python= version",
        )


def environments(flow_file: Path, step: str | None) -> list[StepEnvironment]:
    """The environment of ``step``, or of every step that carries one of the decorators it captures."""
    from metaflow.flowspec import FlowStateItems

    cls = _flow_class(flow_file)
    steps = {name: getattr(cls, name) for name in dir(cls) if getattr(getattr(cls, name), "is_step", False)}
    if step is not None and step not in steps:
        raise StackError(f"{cls.__name__} has no step {step!r}", fix=f"pick one of: {', '.join(sorted(steps))}")
    flow_decos = cls._flow_state[FlowStateItems.FLOW_DECORATORS]
    found = []
    for name in [step] if step else sorted(steps):
        decos = {deco.name: deco for deco in steps[name].decorators}
        pypi, pypi_python, pypi_from = _resolve("pypi", flow_decos.get("pypi_base", []), decos.get("pypi"))
        conda, conda_python, conda_from = _resolve("conda", flow_decos.get("conda_base", []), decos.get("conda"))
        # as in Metaflow: @pypi's Python, falling back on @conda's; conda packages make a conda environment
        env = StepEnvironment(cls.__name__, name, pypi_python or conda_python, pypi or {}, conda=conda or None)
        env.sources = pypi_from + conda_from + [f"@{d.name}" for d in steps[name].decorators if _apply(env, d)]
        _check(env)
        if env.sources or step:
            found.append(env)
    if not found:
        raise StackError(
            f"no step of {cls.__name__} carries @pypi, @conda, @environment or @devcontainer",
            fix="name a step with --step to capture the base image alone",
        )
    return found


def _install(commands: list[str], trust: str, mounts: tuple[str, ...] = ()) -> list[str]:
    """One root ``RUN`` step of ``commands`` (shell lines), left as the non-root user 1000. The build
    machine's CA bundle, when it needs one, is a build secret (it never lands in a layer), exported
    in the variables ``trust`` names."""
    secret = f"/run/secrets/{builders.CA_SECRET_ID}"
    exports = " ".join(f"{name}={secret}" for name in trust.split())
    step = [
        *mounts,
        f"--mount=type=secret,id={builders.CA_SECRET_ID}",
        f"if [ -s {secret} ]; then export {exports}; fi;",
        *commands,
    ]
    return [
        "USER 0:0",
        "# The build machine's CA bundle, when it needs one, is a build secret: it never lands in a layer.",
        "RUN " + " \\\n    ".join(step),
        "USER 1000:1000",
    ]


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
        lines += _install([f"{install} {requirements}"], trust="PIP_CERT SSL_CERT_FILE")
    return "\n".join(lines) + "\n"


def _conda_dockerfile(env: StepEnvironment) -> str:
    python = str(env.python or "{}.{}".format(*sys.version_info[:2]))
    specs = [f"python={python}" if python.count(".") < 2 else f"python=={python}"]
    specs += [_requirement(n, v) for n, v in sorted((env.conda or {}).items())]
    channels = [c.strip() for c in os.environ.get("CONDA_CHANNELS", "").split(",") if c.strip()] or ["conda-forge"]
    create = [
        'export MAMBA_SSL_VERIFY="${MAMBA_SSL_VERIFY:-/micromamba/etc/ssl/certs/ca-certificates.crt}";',
        "/micromamba/bin/micromamba create --yes --root-prefix /tmp/mamba --prefix /opt/conda --override-channels",
        *[f"    --channel {c}" for c in channels],
        *[f'    "{spec}"' for spec in specs],
        "&& rm -rf /tmp/mamba",
    ]
    lines = [
        f"# Generated by `metaflow devcontainer generate` from {env.flow}.{env.step}.",
        "# micromamba creates the conda environment at /opt/conda; it is mounted from its image for",
        "# that one step only, and the packages' cache goes with it.",
        f"FROM {MICROMAMBA_IMAGE} AS micromamba",
        f"FROM {env.image or CONDA_IMAGE}",
        "ENV PATH=/opt/conda/bin:$PATH",
        *_install(create, trust="MAMBA_SSL_VERIFY", mounts=(_MICROMAMBA_MOUNT,)),
    ]
    return "\n".join(lines) + "\n"


def _feature(packages: dict[str, str], **options: object) -> dict[str, dict]:
    """The ``metaflow-stack`` feature entry installing ``packages`` too, pinned to the Metaflow and
    runtime generating it, so the container gets the versions the flow was written against rather
    than whatever is newest when it is built (a step that names its own Metaflow keeps it; a runtime
    that is no release, a local or development build, leaves the feature's default)."""
    from importlib.metadata import version

    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    from metaflow_stack import __version__

    named = {canonicalize_name(name) for name in packages}
    pins = {} if "metaflow" in named else {"metaflow": version("metaflow")}
    requirements = " ".join(_requirement(n, v) for n, v in sorted({**pins, **packages}.items()))
    try:
        release = Version(__version__)
    except InvalidVersion:
        release = None
    if release is not None and not (release.local or release.is_devrelease):
        options["version"] = __version__
    return {f"./{FEATURE.name}": {**options, "packages": requirements}}


#: Names of the variables that hold secrets, by the words they are named with.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY|AUTH", re.I)


def _from_host(env: StepEnvironment) -> list[str]:
    """The names of ``env``'s secrets (by name: ``_SECRET_NAME``) whose value is this machine's variable of the
    same name, which ``render`` writes as ``${localEnv:NAME}``. Only those: ``TZ=UTC`` that happens to be this
    machine's too is meant as written, and would read as empty wherever the variable is not set."""
    return sorted(
        name for name, value in env.env.items() if value and os.environ.get(name) == value and _SECRET_NAME.search(name)
    )


def render(env: StepEnvironment) -> tuple[dict, dict[str, str]]:
    """The devcontainer.json of ``env`` and the other files it needs (name -> text)."""
    config: dict = {"name": f"{env.flow}.{env.step}".lower()}
    files: dict[str, str] = {}
    python = env.python and ".".join(str(env.python).split(".")[:2])
    if env.conda is not None:
        config["build"] = {"dockerfile": "Dockerfile", "context": "."}
        config["features"] = _feature({}, systemSitePackages=True)
        files["Dockerfile"] = _conda_dockerfile(env)
    elif python in (None, BASE_PYTHON) or env.image is not None:
        config["build"] = {"dockerfile": "Dockerfile", "context": "."}
        files["Dockerfile"] = _dockerfile(env)
    else:
        config["image"] = f"python:{python}-slim"
        config["features"] = _feature(env.packages)
    if env.env:
        hosts = _from_host(env)
        config["containerEnv"] = {k: f"${{localEnv:{k}}}" if k in hosts else v for k, v in env.env.items()}
    if env.run_args:
        config["runArgs"] = env.run_args
    config["customizations"] = {"metaflow": {"flow": env.flow, "step": env.step, "from": env.sources}}
    return config, files


def write(env: StepEnvironment, out: Path, force: bool) -> Path:
    """Write ``env``'s configuration folder at ``out`` whole (staged, then moved); the file's path. Says on
    stderr which variables it wrote as ``${localEnv:NAME}`` (``_from_host``): whoever uses the file sets them."""
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
    for name in _from_host(env):
        reference = f"${{localEnv:{name}}}"
        print(f"{env.flow}.{env.step}: {name} written as {reference}, not this machine's value", file=sys.stderr)
    return out / "devcontainer.json"
