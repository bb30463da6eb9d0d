"""What a devcontainer.json (or an image's label) can and cannot do to a ``@devcontainer`` step's
sandbox, read from the container settings the stack works out, without a Docker engine: secrets stay
off command lines, the AWS files mounted are exactly the ones named, root stays out, the decorator's
limits and the stack's labels win, and malformed input is one line. ``docker`` is a stand-in script
that records what it was asked to run."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from metaflow_stack.devcontainer import spec, stores
from metaflow_stack.devcontainer.launch import job_spec
from metaflow_stack.devcontainer.policy import SandboxPolicy
from metaflow_stack.devcontainer.task_container import CARRIER, TaskContainer, from_config
from metaflow_stack.engines import JobSpec, Mount
from metaflow_stack.errors import StackError


def settings_of(tmp_path: Path, **fields: object) -> TaskContainer:
    config = spec.DevcontainerConfig.model_validate({"image": "x", **fields})
    return from_config(config, tmp_path / "devcontainer.json", tmp_path, [])


def spec_of(tmp_path: Path, container: TaskContainer, policy: SandboxPolicy | None = None) -> JobSpec:
    return job_spec("x", "flow.py step start", tmp_path, [], {}, policy or SandboxPolicy(), "F/1/start/2", container)


def test_remote_env_reaches_the_step_through_its_environment_not_its_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_SECRET")
    tricky = "${containerEnv:BASE}:/extra 'q' \"$(echo no)\" `x` \\"
    remote = {"GITHUB_TOKEN": "${localEnv:GITHUB_TOKEN}", "TRICKY": tricky, "EMPTY": "", "GONE": None}
    container = settings_of(tmp_path, remoteEnv=remote)
    assert "ghp_SECRET" not in " ".join(spec_of(tmp_path, container).command)
    # what the container's shell makes of it, with the container's environment
    env = {**container.env, "BASE": "/opt/x", "GONE": "was set", "PATH": os.environ["PATH"]}
    shown = subprocess.run(["sh", "-c", f"true{container.prelude()} && env -0"], env=env, capture_output=True)
    assert shown.returncode == 0, shown.stderr
    inside = dict(item.split("=", 1) for item in shown.stdout.decode().split("\0") if item)
    assert inside["GITHUB_TOKEN"] == "ghp_SECRET" and inside["EMPTY"] == ""
    assert inside["TRICKY"] == "/opt/x:/extra 'q' \"$(echo no)\" `x` \\"  # ${containerEnv:...} read, nothing run
    assert "GONE" not in inside and not any(name.startswith(CARRIER) for name in inside)


def test_a_remote_env_name_that_is_not_a_variable_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"remoteEnv: 'X; id' is not a variable name"):
        settings_of(tmp_path, remoteEnv={"X; id": "1"})


def test_a_multi_line_value_from_the_file_is_refused_naming_its_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEM", "-----BEGIN-----\nabc\n-----END-----")
    with pytest.raises(StackError, match=r"devcontainer\.json: remoteEnv\.CERT: its value spans lines"):
        settings_of(tmp_path, remoteEnv={"CERT": "${localEnv:PEM}"})


@pytest.mark.parametrize("label", ["io.metaflow-stack.job=false", "io.metaflow-stack.owner=stack-up"])
def test_a_label_in_the_stacks_namespace_is_refused(tmp_path: Path, label: str) -> None:
    with pytest.raises(StackError, match=re.escape(f"runArgs: --label {label} is in the stack's own namespace")):
        settings_of(tmp_path, runArgs=["--label", label])


def test_a_bare_label_is_empty_not_the_hosts_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "secret")
    assert settings_of(tmp_path, runArgs=["--label", "API_TOKEN"]).labels == {"API_TOKEN": ""}


def test_the_decorators_pids_is_a_ceiling_the_file_may_only_lower(tmp_path: Path) -> None:
    policy = SandboxPolicy(pids=64)
    assert spec_of(tmp_path, settings_of(tmp_path, runArgs=["--pids-limit=1024"]), policy).pids_limit == 64
    assert spec_of(tmp_path, settings_of(tmp_path, runArgs=["--pids-limit=32"]), policy).pids_limit == 32


@pytest.mark.parametrize("limit", ["-1", "0"])
def test_a_pids_limit_that_lifts_the_limit_is_refused(tmp_path: Path, limit: str) -> None:
    with pytest.raises(StackError, match=f"runArgs: --pids-limit {limit} lifts the limit on processes"):
        settings_of(tmp_path, runArgs=[f"--pids-limit={limit}"])


@pytest.mark.parametrize("ulimit", ["rtprio=99", "nice=40", "rttime=1000000"])
def test_a_ulimit_raising_scheduling_priority_is_refused(tmp_path: Path, ulimit: str) -> None:
    with pytest.raises(StackError, match=f"runArgs: --ulimit {ulimit} is not allowed"):
        settings_of(tmp_path, runArgs=["--ulimit", ulimit])


@pytest.mark.parametrize("user", ["root:root", "root:0", "0:1000", "00"])
def test_root_by_any_spelling_is_refused(tmp_path: Path, user: str) -> None:
    with pytest.raises(StackError, match="is root, and a @devcontainer sandbox runs as a non-root user"):
        settings_of(tmp_path, remoteUser=user, updateRemoteUserUID=False)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "config").write_text("[default]\n")
    (home / ".aws" / "credentials").write_text("[default]\n")
    monkeypatch.setenv("HOME", str(home))
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_a_named_aws_config_file_is_mounted_alone_not_the_folder_it_sits_in(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (home / "aws.conf").write_text("[default]\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "aws.conf"))
    assert stores.mounts("s3", "service", None, "AnyFlow") == [
        Mount(str(home / "aws.conf"), "/mf/aws/config", read_only=True),
        Mount(str(home / ".aws" / "credentials"), "/mf/aws/credentials", read_only=True),  # the SDK's default
    ]


def test_a_named_credentials_file_is_mounted_where_its_variable_points(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (home / ".aws" / "config").unlink()
    (home / "creds").write_text("[default]\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "creds"))
    assert stores.mounts("s3", "service", None, "AnyFlow") == [
        Mount(str(home / "creds"), "/mf/aws/credentials", read_only=True)
    ]
    env = stores.environment("s3", "local")
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/mf/aws/credentials" and "AWS_CONFIG_FILE" not in env


@pytest.mark.parametrize(
    ("label", "said"),
    [
        ("{", "Expecting property name"),
        ("[1]", "[0]: Input should be a valid dictionary"),
        ('[{"remoteEnv": ["A=1"]}]', "[0].remoteEnv: Input should be a valid dictionary"),
        ('[{"postCreateCommand": 3}]', "[0].postCreateCommand"),
        ("[" * 100_000 + "]" * 100_000, "maximum recursion depth"),
    ],
)
def test_a_malformed_metadata_label_is_one_line_naming_the_image(label: str, said: str) -> None:
    with pytest.raises(StackError, match=r"image x:1: its devcontainer\.metadata label is not a list of settings") as e:
        spec.recorded_settings(label, "image x:1")
    assert said in str(e.value)


def test_a_devcontainer_json_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "devcontainer.json"
    path.write_text('{"image": "x", "customizations": ' + "[" * 1000 + "]" * 1000 + "}")
    with pytest.raises(StackError, match=r"devcontainer\.json: nested too deeply to read"):
        spec.load(path)
