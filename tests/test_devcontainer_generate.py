"""``metaflow devcontainer generate`` beyond ``@pypi`` on the base image: ``@conda``/``@conda_base``
captured as a micromamba Dockerfile plus the project's feature (read, linted, and built and run
where conda-forge answers), generated Dockerfiles passing hadolint, and the settings it refuses."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import VENV_BIN, need
from test_devcontainer_config import (
    CAPTURED_FLOW,
    GENERATED_TEMPLATE,
    PYPI_FLOW,
    _env,
    artifacts,
    cli_installed,
    feature_with_wheels,
    run_flow,
)
from test_lint import _tool

CONDA_FLOW = CAPTURED_FLOW.format(
    name="CondaFlow",
    flow='@conda_base(packages={"pyyaml": "6.0.2"}, python="3.11")',
    start='@environment(vars={"MODEL_KIND": "tiny"})\n    @conda(packages={"jq": ">=1.7"})',
    end="@conda(disabled=True)",
)

#: The step, run in the container generated from its conda settings.
GENERATED_FLOW = GENERATED_TEMPLATE.format(
    name="GeneratedCondaFlow",
    config=".devcontainer/condaflow-start/devcontainer.json",
    body="""        import yaml

        self.yaml_from = yaml.__file__
        self.jq = subprocess.run(["jq", "--version"], capture_output=True, text=True, check=True).stdout.strip()
        self.kind = os.environ["MODEL_KIND"]
        self.python = sys.version.split()[0]""",
)


def generate(root: Path, flow: str, *args: str) -> subprocess.CompletedProcess:
    (root / "flow.py").write_text(flow)
    command = [str(VENV_BIN / "metaflow"), "devcontainer", "generate", "flow.py", *args]
    return subprocess.run(command, cwd=root, env=_env(), capture_output=True, text=True, timeout=120)


def test_conda_settings_become_a_micromamba_dockerfile_and_the_feature(tmp_path: Path) -> None:
    from metaflow_stack.devcontainer import generate as generated
    from metaflow_stack.devcontainer import spec

    done = generate(tmp_path, CONDA_FLOW)
    assert done.returncode == 0, done.stderr
    assert "CondaFlow.start: wrote .devcontainer/condaflow-start/devcontainer.json" in done.stdout
    folder = tmp_path / ".devcontainer" / "condaflow-start"
    config, _ = spec.load(folder / "devcontainer.json")  # valid, its local feature too
    pinned = {"version": version("metaflow-stack"), "packages": f"metaflow=={version('metaflow')}"}
    assert config.features == {"./metaflow-stack": {"systemSitePackages": True, **pinned}}  # the host's versions
    assert config.containerEnv == {"MODEL_KIND": "tiny"}
    assert config.customizations["metaflow"]["from"] == ["@conda_base", "@conda", "@environment"]
    dockerfile = (folder / "Dockerfile").read_text()
    assert (
        '--channel conda-forge \\\n        "python=3.11" \\\n        "jq>=1.7" \\\n        "pyyaml==6.0.2"'
        in dockerfile
    )
    froms = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert froms == [f"FROM {generated.MICROMAMBA_IMAGE} AS micromamba", f"FROM {generated.CONDA_IMAGE}"]

    # @conda(disabled=True) leaves the step on the base image, as Metaflow runs it without conda.
    end = (tmp_path / ".devcontainer" / "condaflow-end" / "Dockerfile").read_text()
    assert "FROM ${BASE_IMAGE}" in end and "micromamba" not in end


def test_the_feature_keeps_a_metaflow_the_step_names_and_pins_only_released_runtimes(monkeypatch) -> None:
    import metaflow_stack
    from metaflow_stack.devcontainer import generate as generated

    step = generated.StepEnvironment("F", "start", python="3.12", packages={"metaflow": "2.19.0", "rich": ""})
    config, _ = generated.render(step)
    assert config["features"]["./metaflow-stack"]["packages"] == "metaflow==2.19.0 rich"
    spelled = generated.StepEnvironment("F", "start", python="3.12", packages={"MetaFlow": "2.19.0"})
    assert generated.render(spelled)[0]["features"]["./metaflow-stack"]["packages"] == "MetaFlow==2.19.0"
    monkeypatch.setattr(metaflow_stack, "__version__", "0.2.0.dev3+g1234")  # a development build: nothing to pin
    assert "version" not in generated.render(step)[0]["features"]["./metaflow-stack"]


@pytest.mark.parametrize(
    ("flow", "start", "conda", "python"),
    [
        ('@conda_base(packages={"jq": "1.7.1"}, disabled=True)', '@conda(packages={"zstd": "1.5.6"})', None, None),
        (
            '@conda_base(packages={"jq": "1.7.1"}, python="3.12", disabled=True)',
            '@conda(packages={"zstd": "1.5.6"}, disabled=False)',
            {"jq": "1.7.1", "zstd": "1.5.6"},
            "3.12",
        ),
        ('@conda_base(python="3.12")', '@pypi(packages={"tomli-w": "1.0.0"})', None, "3.12"),
    ],
    ids=["base-disabled", "step-enabled", "pypi-on-conda-python"],
)
def test_conda_settings_merge_as_metaflow_merges_them(
    tmp_path: Path, flow: str, start: str, conda: dict | None, python: str | None
) -> None:
    from metaflow_stack.devcontainer.generate import environments

    (tmp_path / "flow.py").write_text(CAPTURED_FLOW.format(name="Flow", flow=flow, start=start, end=""))
    (env,) = environments(tmp_path / "flow.py", "start")
    assert (env.conda, env.python) == (conda, python)


def test_conda_channels_follow_the_conda_channels_variable(tmp_path: Path) -> None:
    (tmp_path / "flow.py").write_text(CONDA_FLOW)
    command = [str(VENV_BIN / "metaflow"), "devcontainer", "generate", "flow.py", "--step", "start", "--out", "env"]
    env = {**_env(), "CONDA_CHANNELS": "conda-forge, bioconda"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--channel conda-forge \\\n        --channel bioconda \\\n" in (tmp_path / "env" / "Dockerfile").read_text()


#: Both kinds of environment on an image the step names: installed as root, left as a non-root user.
ON_AN_IMAGE = CAPTURED_FLOW.format(
    name="ImageFlow",
    flow="",
    start='@devcontainer(image="python:3.12-slim")\n    @conda(packages={"jq": "1.7.1"})',
    end='@devcontainer(image="python:3.12-slim")\n    @pypi(packages={"tomli-w": "1.0.0"})',
)


@pytest.mark.parametrize(
    ("flow", "step"),
    [(PYPI_FLOW, "start"), (CONDA_FLOW, "start"), (ON_AN_IMAGE, "start"), (ON_AN_IMAGE, "end")],
    ids=["pypi", "conda", "conda-on-image", "pypi-on-image"],
)
def test_generated_dockerfiles_pass_hadolint(tmp_path: Path, flow: str, step: str) -> None:
    done = generate(tmp_path, flow, "--step", step, "--out", "env")
    assert done.returncode == 0, done.stderr
    lint = subprocess.run([_tool("hadolint"), "--no-color", str(tmp_path / "env" / "Dockerfile")], capture_output=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize(
    ("decorators", "said"),
    [
        (
            '@conda(packages={"jq": "1.7.1"})\n    @pypi(packages={"tomli-w": "1.0.0"})',
            "Flow.start has both PyPI and conda packages\nfix: use one of @pypi or @conda",
        ),
        ('@conda(python="3.10")', "Flow.start asks for Python 3.10; the runtime needs 3.11 or newer"),
        ('@pypi(python="3.9.18")', "Flow.start asks for Python 3.9.18; the runtime needs 3.11 or newer"),
    ],
)
def test_settings_a_container_cannot_honour_are_refused_in_one_line(tmp_path: Path, decorators: str, said: str) -> None:
    flow = CAPTURED_FLOW.format(name="Flow", flow="", start=decorators, end="")
    done = generate(tmp_path, flow)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert said in done.stderr
    assert not (tmp_path / ".devcontainer").exists()  # nothing written


def test_a_value_from_the_hosts_variable_of_its_name_is_written_as_a_reference(tmp_path: Path) -> None:
    """``@environment(vars={"HF_TOKEN": os.environ["HF_TOKEN"]})``: the folder is meant to be committed, so the
    token is written as ``${localEnv:HF_TOKEN}`` (read again where the file is used), and the command says so;
    a value the host has under no such name stays as written."""
    from metaflow_stack.devcontainer import spec

    start = '@environment(vars={"HF_TOKEN": __import__("os").environ["HF_TOKEN"], "MODEL_KIND": "tiny", "TZ": "UTC"})'
    flow = CAPTURED_FLOW.format(name="Flow", flow="", start=start, end="")
    (tmp_path / "flow.py").write_text(flow)
    command = [str(VENV_BIN / "metaflow"), "devcontainer", "generate", "flow.py", "--step", "start", "--out", "env"]
    env = {**_env(), "HF_TOKEN": "hf_SECRET_1234", "TZ": "UTC"}  # (TZ: this machine's too, and no secret)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hf_SECRET_1234" not in (tmp_path / "env" / "devcontainer.json").read_text() + done.stdout + done.stderr
    config, _ = spec.load(tmp_path / "env" / "devcontainer.json")
    assert config.containerEnv == {"HF_TOKEN": "${localEnv:HF_TOKEN}", "MODEL_KIND": "tiny", "TZ": "UTC"}
    assert "Flow.start: HF_TOKEN written as ${localEnv:HF_TOKEN}, not this machine's value" in done.stderr


def _conda_forge_answers() -> bool:
    try:
        request = urllib.request.Request("https://conda.anaconda.org/conda-forge/noarch/repodata.json", method="HEAD")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.docker
@pytest.mark.slow
def test_a_step_runs_in_a_devcontainer_generated_from_its_conda_settings(docker_engine, tmp_path: Path) -> None:
    cli_installed()
    need("conda-forge", _conda_forge_answers(), "the generated image's conda packages come from conda-forge")
    assert generate(tmp_path, CONDA_FLOW, "--step", "start").returncode == 0
    folder = tmp_path / ".devcontainer" / "condaflow-start"
    config_file = folder / "devcontainer.json"
    header, body = config_file.read_text().split("\n", 1)
    config = json.loads(body)
    config["features"]["./metaflow-stack"]["wheels"] = feature_with_wheels(folder / "metaflow-stack")
    config_file.write_text(header + "\n" + json.dumps(config, indent=2))
    (tmp_path / "generated_flow.py").write_text(GENERATED_FLOW)

    done = run_flow(tmp_path, "generated_flow.py", _env())
    assert done.returncode == 0, done.stderr[-4000:]
    run = artifacts(tmp_path, "GeneratedCondaFlow", "yaml_from", "jq", "kind", "python")
    assert run["yaml_from"].startswith("/opt/conda/lib/python3.11/site-packages/")  # conda's, through the feature
    assert run["jq"].startswith("jq-1.") and run["kind"] == "tiny" and run["python"].startswith("3.11.")
