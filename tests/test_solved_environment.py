"""A step's environment as Metaflow solved it (``solved_environment``), read through Metaflow's own
environment, from the manifest Metaflow's own writer keeps and the wheels its pip solver downloaded.

Metaflow solves with micromamba and pip at a run's start; micromamba is not on these machines (the GitHub
``pypi-environments`` job has it, and runs a whole flow). Here the solve's result is written with Metaflow's
``write_to_environment_manifest``, in the shape its pip solver returns (``url``, ``require_build``), and
its downloads as its pip solver records them (``METADATA_FILE``, in the environment micromamba would name).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from metaflow_stack.errors import StackError
from metaflow_stack.solved_environment import conda_packages, has_own, requested_python, solved

FLOW = """from metaflow import FlowSpec, conda, confidential, nomad, pypi, step


class SolvedFlow(FlowSpec):
    @pypi(python="3.11.9", packages={"tabulate": "0.9.0"})
    @step
    def start(self):
        self.next(self.plain)

    @pypi(disabled=True)
    @step
    def plain(self):
        self.next(self.conda_step)

    @conda(packages={"numpy": "2.1.0"})
    @step
    def conda_step(self):
        self.next(self.enclave)

    @confidential(container=True)
    @step
    def enclave(self):
        self.next(self.on_nomad)

    @nomad
    @step
    def on_nomad(self):
        self.next(self.end)

    @step
    def end(self):
        pass
"""

WHEEL = "https://files.example/packages/tabulate-0.9.0-py3-none-any.whl"
SOURCE = "git+https://example/pkg@0123abcd"
#: Metaflow's pip solve of a step: a wheel from the index, and a package it builds from its repository.
SOLVE = [{"url": WHEEL, "require_build": False}, {"url": SOURCE, "require_build": True, "hash": "0123abcd"}]


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Metaflow's ``--environment pypi`` on the flow, its decorators attached as a run attaches them."""
    from metaflow import decorators
    from metaflow.plugins.pypi.pypi_environment import PyPIEnvironment

    (tmp_path / "solved_flow.py").write_text(FLOW)
    (tmp_path / ".metaflow").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["solved_flow.py"])
    from solved_flow import SolvedFlow

    flow = SolvedFlow(use_cli=False)
    env = PyPIEnvironment(flow)
    env.validate_environment(print, "local")
    decorators._attach_decorators(flow, list(env.decospecs()))
    env.set_local_root(str(tmp_path / ".metaflow"))
    yield env
    sys.modules.pop("solved_flow", None)


def _step(environment, name: str):
    return next(s for s in environment.flow if s.name == name)


def _solve(environment, name: str, packages: list[dict], downloaded: dict[str, Path] | None = None) -> None:
    """What Metaflow keeps for the step at the run's start: its solve, written by Metaflow's own writer, and
    the files its pip solver downloaded (or built), recorded where it records them, in the environment
    micromamba made for this machine (micromamba is not here: the test says where that is)."""
    from metaflow.plugins.pypi.pip import METADATA_FILE

    found = environment.get_environment(_step(environment, name))
    environment.write_to_environment_manifest([found["id_"], "linux-64", "pypi"], packages)
    prefix = Path(environment.local_root) / "envs" / found["id_"]
    kept = Path(METADATA_FILE.format(prefix=prefix))
    kept.parent.mkdir(parents=True)
    kept.write_text(json.dumps({url: str(path) for url, path in (downloaded or {}).items()}))
    environment.solvers["conda"].path_to_environment = {found["id_"]: str(prefix)}.get


def _wheel(folder: Path, name: str) -> Path:
    (folder / name).write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: not installed here
    return folder / name


def test_a_solved_pypi_step_gives_the_wheels_metaflow_downloaded_and_its_python(environment, tmp_path) -> None:
    built = _wheel(tmp_path, "pkg-0.1-py3-none-any.whl")  # built by Metaflow from its repository
    wheels = {WHEEL: _wheel(tmp_path, "tabulate-0.9.0-py3-none-any.whl"), SOURCE: built}
    _solve(environment, "start", SOLVE, wheels)
    found = solved(environment, "start", "linux-64")
    assert found is not None
    assert (found.python, found.wheels) == ("3.11", (wheels[WHEEL], built))


def test_a_disabled_environment_and_a_plain_one_give_none(environment) -> None:
    assert solved(environment, "plain", "linux-64") is None
    from metaflow.metaflow_environment import MetaflowEnvironment

    assert solved(MetaflowEnvironment(environment.flow), "start", "linux-64") is None
    assert not has_own(MetaflowEnvironment(environment.flow), _step(environment, "start").decorators)
    assert has_own(environment, _step(environment, "start").decorators)
    assert not has_own(environment, _step(environment, "plain").decorators)


def test_a_step_not_solved_for_the_platform_is_refused_naming_it(environment, tmp_path) -> None:
    _solve(environment, "start", [{"url": WHEEL, "require_build": False}], {WHEEL: _wheel(tmp_path, "t.whl")})
    with pytest.raises(StackError, match="not solved for linux-aarch64") as raised:
        solved(environment, "start", "linux-aarch64")
    assert "--environment pypi" in (raised.value.fix or "")


def test_a_package_that_was_not_downloaded_here_is_refused_naming_it(environment, tmp_path) -> None:
    _solve(environment, "start", SOLVE, {WHEEL: _wheel(tmp_path, "tabulate-0.9.0-py3-none-any.whl")})
    with pytest.raises(StackError, match=re.escape(f"package {SOURCE} was not downloaded here")) as raised:
        solved(environment, "start", "linux-64")
    assert "run the flow again with --environment pypi" in (raised.value.fix or "")


def test_a_downloaded_wheel_that_is_gone_is_refused_naming_the_environment_to_remove(environment, tmp_path) -> None:
    wheel = _wheel(tmp_path, "tabulate-0.9.0-py3-none-any.whl")
    _solve(environment, "start", SOLVE[:1], {WHEEL: wheel})
    wheel.unlink()
    with pytest.raises(StackError, match="which is gone") as raised:
        solved(environment, "start", "linux-64")
    assert (raised.value.fix or "").startswith(f"remove {environment.local_root}/envs/")


def test_an_environment_micromamba_does_not_know_here_is_refused(environment) -> None:
    _solve(environment, "start", [{"url": WHEEL, "require_build": False}])
    environment.solvers["conda"].path_to_environment = lambda id_: None
    with pytest.raises(StackError, match="start's environment is not on this machine"):
        solved(environment, "start", "linux-64")


def test_a_step_without_pypi_packages_needs_nothing_installed(environment) -> None:
    """Its environment is conda's: the Python and Metaflow's pins (requests), which the stack's images have;
    conda packages a step asks for itself are named, to be refused when the run starts."""
    assert solved(environment, "conda_step", "linux-64") is None
    assert solved(environment, "end", "linux-64") is None
    assert conda_packages(environment.flow, _step(environment, "conda_step").decorators) == ["numpy"]
    assert conda_packages(environment.flow, _step(environment, "end").decorators) == []


def test_the_python_a_pypi_step_is_solved_for_is_the_one_metaflow_picks(environment) -> None:
    flow = environment.flow
    assert requested_python(flow, _step(environment, "start").decorators) == "3.11"  # @pypi(python="3.11.9")
    assert requested_python(flow, _step(environment, "end").decorators) is None  # no @pypi
    from metaflow.plugins.pypi.pypi_decorator import PyPIStepDecorator

    running = "{}.{}".format(*sys.version_info[:2])
    assert requested_python(flow, [PyPIStepDecorator()]) == running  # Metaflow's default: the flow's Python


def test_steps_that_run_in_a_tee_or_on_nomad_are_solved_for_linux_on_x86_64(environment, monkeypatch) -> None:
    """From a launching machine of another platform (a Mac), as Metaflow solves for ``@kubernetes``."""
    from metaflow.plugins.pypi import conda_environment

    monkeypatch.setattr(conda_environment, "conda_platform", lambda: "osx-arm64")
    for name in ("enclave", "on_nomad"):
        assert environment.get_environment(_step(environment, name))["conda"]["platforms"] == ["linux-64"]
    assert environment.get_environment(_step(environment, "end"))["conda"]["platforms"] == ["osx-arm64"]


@pytest.mark.parametrize("conda_first", [False, True], ids=["conda-after", "conda-before"])
def test_a_trampolined_step_runs_this_interpreter_and_this_runtime(tmp_path: Path, monkeypatch, conda_first) -> None:
    """Metaflow's runtime calls each decorator's hooks in the step's order; its ``@conda`` (added after the
    user's decorators, or written below ours) would look the environment's interpreter up here (not made
    here when solved for another platform) and run the trampoline under it, with the code package first on
    its path, where the runtime's images and templates are not. Taken over at ``runtime_init``, it does
    neither, in either order."""
    import tempfile
    from types import SimpleNamespace

    from metaflow.plugins.pypi.conda_decorator import CondaStepDecorator

    from metaflow_extensions.stack.plugins.confidential.confidential_decorator import ConfidentialDecorator

    home = tempfile.TemporaryDirectory(dir=tmp_path)
    monkeypatch.setattr(CondaStepDecorator, "_metaflow_home", home)
    monkeypatch.setattr(CondaStepDecorator, "_addl_env_vars", {"PYTHONPATH": f"{home.name}/.mf_code"})
    conda = CondaStepDecorator()
    conda.disabled = False  # as its step_init leaves it for a step with an environment
    ours = ConfidentialDecorator(attributes={"container": True})
    ours.decos = [conda, ours] if conda_first else [ours, conda]
    ours.take_over(package=None)
    args = SimpleNamespace(commands=["step"], command_args=["start"], command_options={}, env={},
                           entrypoint=[sys.executable, "flow.py"])  # fmt: skip
    # Its environment object is never asked: an environment solved for linux-64 on a Mac has no interpreter here.
    conda.runtime_task_created(None, "1", None, None, False, None)
    for deco in ours.decos:
        deco.runtime_step_cli(args, 0, 0, None)
    assert args.entrypoint == [sys.executable, "flow.py"] and args.commands == ["confidential", "step"]
    assert args.env == {}
