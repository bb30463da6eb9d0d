"""``@devcontainer(config=...)`` on real runs: a devcontainer.json built directly (Dockerfile, build
args, environment, mounts, runArgs, lifecycle commands) and by the Dev Containers CLI (a local
feature); a step's environment captured by ``metaflow devcontainer generate`` and run; the project's
feature checked against the specification's rules and installed; and the errors a user meets when
the file, the build or the engine is wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import VENV_BIN, need
from test_devcontainer import ONE_STEP_FLOW

REPO = Path(__file__).parents[1]
PROJECT = Path(__file__).parent / "devcontainer_project"
FEATURE = REPO / "devcontainers" / "src" / "metaflow-stack"

#: Read in a subprocess (Metaflow's client keeps one datastore root per process): the named
#: artifacts of a step of the latest run.
ARTIFACTS = """
import json, sys
from metaflow import Flow, metadata, namespace
metadata("local@" + sys.argv[1])
namespace(None)
run = Flow(sys.argv[2]).latest_run
step, names = sys.argv[3], sys.argv[4:]
print(json.dumps({"successful": run.successful, **{n: getattr(run[step].task.data, n) for n in names}}))
"""


def _env(**extra: str) -> dict[str, str]:
    path = f"{VENV_BIN}:{REPO / '.stack/tools/node_modules/.bin'}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "METAFLOW_DEFAULT_METADATA": "local", **extra}


def run_flow(root: Path, flow_file: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, flow_file, "--datastore-root", str(root / ".metaflow"), "run"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200)


def artifacts(root: Path, flow: str, *names: str, step: str = "start") -> dict:
    command = [sys.executable, "-c", ARTIFACTS, str(root), flow, step, *names]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(PROJECT, root)
    return root


def cli_installed() -> None:
    from metaflow_stack.devcontainer.image import CLI_FIX

    found = shutil.which("devcontainer", path=_env()["PATH"])
    need("devcontainer-cli", found is not None, f"the Dev Containers CLI is not on PATH ({CLI_FIX})")


@pytest.mark.docker
@pytest.mark.slow
def test_a_step_runs_in_the_image_and_with_the_settings_of_its_devcontainer_json(docker_engine, project: Path) -> None:
    done = run_flow(project, "configured_flow.py", _env(DEVCONTAINER_TEST_VALUE="from the host"))
    assert done.returncode == 0, done.stderr[-4000:]
    run = artifacts(project, "ConfiguredFlow", "greeting", "env", "data", "created", "shm", "extended_path")
    assert run["successful"]
    assert run["greeting"] == "hello from the build"  # build.args reached the Dockerfile
    assert run["env"] == {"FROM_CONFIG": "yes", "FROM_HOST": "from the host"}  # ${localEnv:...}
    assert run["data"] == "mounted data"  # mounts, with ${localWorkspaceFolder}
    assert run["created"] == ["created", "post-created"]  # onCreateCommand, then postCreateCommand
    assert run["shm"] == 128 * 1024 * 1024  # runArgs --shm-size
    assert run["extended_path"].startswith("/opt/stack/bin:") and run["extended_path"].endswith(":/extra")  # remoteEnv


@pytest.mark.docker
@pytest.mark.slow
def test_a_config_with_features_is_built_by_the_dev_containers_cli(docker_engine, project: Path) -> None:
    cli_installed()
    done = run_flow(project, "featured_flow.py", _env())
    assert done.returncode == 0, done.stderr[-4000:]
    run = artifacts(project, "FeaturedFlow", "greeting", "env", "lifecycle")
    assert run["greeting"] == "hello from a feature"  # the feature's install.sh, with its option
    assert run["env"] == {"GREETER": "installed", "FROM_REMOTE_ENV": "yes"}
    assert run["lifecycle"] == ["feature-post-create", "started"]  # the feature's command runs first
    inline = artifacts(project, "FeaturedFlow", "inline_greeting", step="inline")  # @devcontainer(features=...)
    assert inline["inline_greeting"] == "hello from the decorator"


#: A two-step flow for ``generate``: ``{flow}`` and ``{start}``/``{end}`` are decorator lines.
CAPTURED_FLOW = """
from metaflow import FlowSpec, conda, conda_base, devcontainer, environment, pypi, step


{flow}
class {name}(FlowSpec):
    {start}
    @step
    def start(self):
        self.next(self.end)

    {end}
    @step
    def end(self):
        pass
"""

PYPI_FLOW = CAPTURED_FLOW.format(
    name="TrainFlow",
    flow="",
    start='@environment(vars={"MODEL_KIND": "tiny"})\n    @pypi(packages={"tomli-w": "1.0.0"}, python="3.11")',
    end="",
)

#: A step run in a generated container: ``{config}`` names its devcontainer.json, ``{body}`` is the
#: step's code (indented for it), recording what the tests check.
GENERATED_TEMPLATE = """
import os
import subprocess
import sys

from metaflow import FlowSpec, devcontainer, step


class {name}(FlowSpec):
    @devcontainer(config="{config}")
    @step
    def start(self):
{body}
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    {name}()
"""

#: The @pypi step, run in the container generated from its @pypi and @environment settings.
GENERATED_FLOW = GENERATED_TEMPLATE.format(
    name="GeneratedFlow",
    config=".devcontainer/trainflow-start/devcontainer.json",
    body="""        import tomli_w

        self.toml = tomli_w.dumps({"kind": os.environ["MODEL_KIND"]})""",
)


@pytest.mark.docker
@pytest.mark.slow
def test_a_step_runs_in_a_devcontainer_generated_from_its_pypi_settings(docker_engine, tmp_path: Path) -> None:
    (tmp_path / "train_flow.py").write_text(PYPI_FLOW)
    (tmp_path / "generated_flow.py").write_text(GENERATED_FLOW)
    metaflow = [str(VENV_BIN / "metaflow"), "devcontainer", "generate", "train_flow.py"]
    done = subprocess.run(metaflow, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "TrainFlow.start: wrote .devcontainer/trainflow-start/devcontainer.json" in done.stdout
    assert "uv pip install" in (tmp_path / ".devcontainer/trainflow-start/Dockerfile").read_text()

    done = run_flow(tmp_path, "generated_flow.py", _env())
    assert done.returncode == 0, done.stderr[-4000:]
    assert artifacts(tmp_path, "GeneratedFlow", "toml")["toml"] == 'kind = "tiny"\n'

    again = subprocess.run(metaflow, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "Traceback" not in again.stderr and "--force" in again.stderr


def test_generate_names_the_feature_for_another_python(tmp_path: Path) -> None:
    from metaflow_stack.devcontainer import spec

    (tmp_path / "train_flow.py").write_text(PYPI_FLOW.replace('python="3.11"', 'python="3.12.4"'))
    command = [str(VENV_BIN / "metaflow"), "devcontainer", "generate", "train_flow.py", "--out", "env"]
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    config, _ = spec.load(tmp_path / "env" / "devcontainer.json")  # valid, its local feature too
    assert config.image == "python:3.12-slim"
    packages = f"metaflow=={version('metaflow')} tomli-w==1.0.0"  # Metaflow and the runtime as on the host
    assert config.features == {"./metaflow-stack": {"version": version("metaflow-stack"), "packages": packages}}
    assert config.containerEnv == {"MODEL_KIND": "tiny"}


def test_the_project_feature_follows_the_feature_specification() -> None:
    from metaflow_stack.devcontainer import spec

    manifest = spec.load_feature(FEATURE)
    assert manifest.id == "metaflow-stack"
    assert set(manifest.options) == {"version", "packages", "wheels", "systemSitePackages"}
    assert manifest.containerEnv["PATH"].startswith("/opt/metaflow-stack/bin:")


def feature_with_wheels(feature: Path, *requirements: str) -> str:
    """Put the wheels of the runtime, its locked dependencies and ``requirements`` in ``feature``'s
    ``wheels`` folder (the runtime is not on the package index); the folder's option value."""
    wheels = feature / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    lock = ["-r", str(REPO / "runtime/requirements.lock")]
    for args in (
        ["download", "--only-binary=:all:", "-d", str(wheels), *lock, *requirements],
        ["wheel", "--no-deps", "-w", str(wheels), str(REPO / "runtime")],
    ):
        done = subprocess.run(pip + args, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return wheels.name


#: Puts a module into the image's own site-packages, which only ``systemSitePackages`` lets the
#: feature's environment see, from another stage mounted for one step: the way generated conda
#: Dockerfiles mount micromamba, which only BuildKit builds; it ends, as they do, as a uid the image
#: has no account for.
SYSTEM_PACKAGE_DOCKERFILE = """
ARG BASE_IMAGE
FROM ${BASE_IMAGE} AS probe
RUN echo 'WHERE = "system"' > /tmp/stack_probe.py
FROM ${BASE_IMAGE}
RUN --mount=type=bind,from=probe,source=/tmp,target=/probe \\
    cp /probe/stack_probe.py "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
USER 1000:1000
"""


@pytest.mark.docker
@pytest.mark.slow
def test_the_project_feature_installs_metaflow_and_the_runtime(
    docker_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from metaflow_stack import base_images
    from metaflow_stack.devcontainer import image, spec

    cli_installed()
    folder = tmp_path / "ws" / ".devcontainer"
    shutil.copytree(FEATURE, folder / "metaflow-stack")
    options = {"wheels": feature_with_wheels(folder / "metaflow-stack", "tomli-w"), "packages": "tomli-w"}
    python = base_images.choose(docker_engine)  # a plain Python 3.11, with neither Metaflow nor the runtime
    base_images.ensure(python, docker_engine, Console(stderr=True))
    (folder / "Dockerfile").write_text(SYSTEM_PACKAGE_DOCKERFILE)
    config = {
        "name": "feature-test",
        "build": {"dockerfile": "Dockerfile", "args": {"BASE_IMAGE": python}},
        "features": {"./metaflow-stack": {**options, "systemSitePackages": True}},
    }
    (folder / "devcontainer.json").write_text(json.dumps(config))
    monkeypatch.setenv("PATH", _env()["PATH"])  # the CLI, as a flow's run finds it
    config_file = folder / "devcontainer.json"
    loaded, digest = spec.load(config_file)
    built, _ = image.build(loaded, config_file, folder.parent, digest)  # through the CLI, as a step's is
    assert not (folder / "devcontainer-lock.json").exists()  # local features only: nothing to pin
    try:
        check = "import metaflow, metaflow_stack, tomli_w, stack_probe as p; print(metaflow_stack.__version__, p.WHERE)"
        out = docker_engine.run(built, ["python", "-c", check], remove=True)
        assert out.strip().splitlines()[-1] == f"{__import__('metaflow_stack').__version__} system"
    finally:
        docker_engine.image.remove(built, force=True)


BAD_CONFIG_FLOW = ONE_STEP_FLOW.format(args='config="dc/devcontainer.json"')


@pytest.mark.parametrize(
    ("config", "said"),
    [
        (
            '{"image": "x", "build": {"dockerfile": 3}}',
            "build.dockerfile: Input should be a valid string (rule: string_type)",
        ),
        ('{"build": {"context": "."}}', "build.dockerfile: Field required (rule: missing)"),
        (
            '{"image": "x", "mounts": [{"type": "bind", "target": 4}]}',
            "mounts[0].target: Input should be a valid string",
        ),
        (
            '{"image": "x", "runArgs": ["--privileged"]}',
            "runArgs: --privileged is not allowed in a @devcontainer sandbox",
        ),
        ('{"image": "x", "dockerComposeFile": "c.yml"}', "dockerComposeFile is not supported"),
        ('{\n  // a comment is fine\n  "image": "x" "y"\n}', "not valid JSON with comments: line 3"),
        ('{"image": "x", "features": {"./nope": {}}}', "nope/devcontainer-feature.json"),
    ],
)
def test_an_invalid_devcontainer_json_is_one_line_naming_file_field_and_rule(
    tmp_path: Path, config: str, said: str
) -> None:
    (tmp_path / "dc").mkdir()
    (tmp_path / "dc" / "devcontainer.json").write_text(config)
    (tmp_path / "bad_flow.py").write_text(BAD_CONFIG_FLOW)
    done = run_flow(tmp_path, "bad_flow.py", _env())
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'dc' / 'devcontainer.json'}" in done.stderr and said in done.stderr
    assert not (tmp_path / ".metaflow" / "OneStepFlow").exists()  # refused before anything ran


@pytest.mark.docker
@pytest.mark.slow
def test_a_task_runs_the_image_its_run_prepared_after_another_build_takes_the_tag(
    docker_engine, base_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Two projects' devcontainer.json of one text (the tag hashes it alone) over different Dockerfiles: the
    second build moves the tag, and a task of the run prepared from the first still starts the first's image."""
    from metaflow_extensions.stack.plugins.devcontainer.devcontainer_decorator import DevcontainerDecorator
    from metaflow_stack.devcontainer import spec
    from metaflow_stack.devcontainer.launch import job_spec, run_step
    from metaflow_stack.devcontainer.policy import SandboxPolicy

    monkeypatch.setenv("METAFLOW_STACK_DEVCONTAINER_BASE", base_image)
    monkeypatch.setattr(DevcontainerDecorator, "prepared", {})
    prepared = {}
    for mark in ("a", "b"):
        folder = tmp_path / mark / "project" / ".devcontainer"
        folder.mkdir(parents=True)
        (folder / "Dockerfile").write_text(f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nENV STACK_TEST_MARK={mark}\n")
        (folder / "devcontainer.json").write_text('{"build": {"dockerfile": "Dockerfile"}}')
        config_file = folder / "devcontainer.json"
        prepared[mark], _ = DevcontainerDecorator._prepare(config_file, *spec.load(config_file))
    try:
        (tag,) = docker_engine.image.inspect(prepared["b"]).repo_tags
        assert tag.startswith("metaflow-stack-devcontainer/project:")  # the first's tag too: it moved
        code = tmp_path / "code"
        code.mkdir()
        mark = '-c \'import os; print("mark", os.environ["STACK_TEST_MARK"])\''
        assert run_step(job_spec(prepared["a"], mark, code, [], {}, SandboxPolicy(), "F/1/start/1")) == 0
        assert "mark a" in capsys.readouterr().out
    finally:
        for image in prepared.values():
            docker_engine.image.remove(image, force=True)


@pytest.mark.docker
@pytest.mark.slow
def test_a_failing_image_build_names_the_step_and_its_log(docker_engine, tmp_path: Path) -> None:
    (tmp_path / "dc").mkdir()
    (tmp_path / "dc" / "Dockerfile").write_text(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo about to fail && exit 3\n"
    )
    (tmp_path / "dc" / "devcontainer.json").write_text('{"build": {"dockerfile": "Dockerfile"}}')
    (tmp_path / "bad_flow.py").write_text(BAD_CONFIG_FLOW)
    done = run_flow(tmp_path, "bad_flow.py", _env())
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "failed at: [2/2] RUN echo about to fail && exit 3" in done.stderr
    assert "about to fail" in done.stderr.split("failed at:")[1]  # the log tail


#: A build arg holding a credential, from the host's environment as a devcontainer.json names one.
PRIVATE_INDEX = "https://user:s3cret-Token-42@pypi.invalid/simple"


def _private_index_config(folder: Path, context: str) -> Path:
    folder.mkdir()
    (folder / "Dockerfile").write_text(
        'ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nARG PIP_INDEX_URL\nRUN echo "index: $PIP_INDEX_URL" && exit 3\n'
    )
    args = {"PIP_INDEX_URL": "${localEnv:STACK_TEST_INDEX}"}
    config = {"build": {"dockerfile": "Dockerfile", "context": context, "args": args}}
    (folder / "devcontainer.json").write_text(json.dumps(config))
    return folder / "devcontainer.json"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize(
    ("context", "said"),
    [("../nope", 'unable to prepare context: path "'), (".", "index: ***")],
    ids=["before-any-step", "echoed-by-a-step"],
)
def test_a_failed_build_shows_no_build_arg_value(
    docker_engine, base_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd, context: str, said: str
) -> None:
    """A build that fails before its first step used to say so with the whole ``docker build`` command line,
    ``--build-arg PIP_INDEX_URL=...`` and all; one whose step prints the value kept it in its log tail."""
    import io

    from rich.console import Console

    from metaflow_stack.devcontainer import image, spec
    from metaflow_stack.errors import ImageBuildError

    monkeypatch.setenv("STACK_TEST_INDEX", PRIVATE_INDEX)
    monkeypatch.setenv(image.BASE_VARIABLE, base_image)
    config_file = _private_index_config(tmp_path / "dc", context)
    loaded, digest = spec.load(config_file)
    printed = io.StringIO()
    with pytest.raises(ImageBuildError) as error:
        image.build(loaded, config_file, tmp_path, digest, Console(file=printed, width=200))
    told = f"{error.value.message}\n{error.value.fix}\n{printed.getvalue()}\n{''.join(capfd.readouterr())}"
    assert said in error.value.message
    assert "s3cret-Token-42" not in told


def test_the_dev_containers_clis_log_shows_no_build_arg_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """The CLI logs the docker commands it runs, ``--build-arg`` values and all: its tail says none."""
    import io

    from rich.console import Console

    from metaflow_stack.devcontainer import image, spec
    from metaflow_stack.errors import ImageBuildError

    cli = tmp_path / "devcontainer"
    cli.write_text(
        "#!/bin/sh\n"
        f"echo 'Start: Run: docker buildx build --build-arg PIP_INDEX_URL={PRIVATE_INDEX} --build-arg=A=b -t x .'\n"
        f"echo 'index: {PRIVATE_INDEX}'\n"
        'echo \'{"outcome": "error", "message": "Command failed: docker buildx build"}\'\n'
        "exit 1\n"
    )
    cli.chmod(0o755)
    monkeypatch.setenv("METAFLOW_STACK_DEVCONTAINER_CLI", str(cli))
    monkeypatch.setattr(image, "_cli_docker", lambda: ([], {}))  # (no engine needed: the CLI is a stand-in)
    monkeypatch.setenv("STACK_TEST_INDEX", PRIVATE_INDEX)
    config_file = _private_index_config(tmp_path / "dc", ".")
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "features": {"ghcr.io/devcontainers/features/git:1": {}}}))
    loaded, digest = spec.load(config_file)
    printed = io.StringIO()
    with pytest.raises(ImageBuildError) as error:
        image.build(loaded, config_file, tmp_path, digest, Console(file=printed, width=200))
    told = f"{error.value.message}\n{error.value.fix}\n{printed.getvalue()}\n{''.join(capfd.readouterr())}"
    assert "--build-arg PIP_INDEX_URL=*** --build-arg=A=*** -t x ." in error.value.message
    assert "index: ***" in error.value.message
    assert "s3cret-Token-42" not in told


def test_no_docker_engine_gives_the_doctor_message(tmp_path: Path) -> None:
    from metaflow_stack.engines.docker import NO_ENGINE_FIX

    (tmp_path / "dc").mkdir()
    (tmp_path / "dc" / "devcontainer.json").write_text('{"image": "x"}')
    (tmp_path / "bad_flow.py").write_text(BAD_CONFIG_FLOW)
    done = run_flow(tmp_path, "bad_flow.py", _env(METAFLOW_STACK_DOCKER_CLIENT=str(tmp_path / "no-docker")))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "the docker command is not installed" in done.stderr and NO_ENGINE_FIX in done.stderr


def test_a_missing_feature_folder_is_one_line(tmp_path: Path) -> None:
    flow = BAD_CONFIG_FLOW.replace('config="dc/devcontainer.json"', 'features={"./nope": {}}')
    (tmp_path / "bad_flow.py").write_text(flow)
    done = run_flow(tmp_path, "bad_flow.py", _env())
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "features: './nope' has no devcontainer-feature.json" in done.stderr
