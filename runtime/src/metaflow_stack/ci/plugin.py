"""pytest-metaflow-stack: one flow test, run on every backend named with ``--backend``.

A test asks for the ``flow_runner`` fixture and runs a flow file through it::

    @pytest.mark.backends("local", "devcontainer")     # optional: where it may run
    def test_foreach(flow_runner):
        run = flow_runner.run("flows/foreach_flow.py", count=5)
        assert run.successful

    pytest tests/flow_suite --backend local,devcontainer,nomad

Each test is collected once per selected backend (``test_foreach[local]``,
...), less those its ``backends`` marker leaves out or its ``skip_backend``
marker names. A backend whose infrastructure is missing skips with the
reason, naming the tool, unless ``STACK_TEST_REQUIRE`` lists it (or its
tool): then it fails. What a cross-backend report needs goes into each
case's JUnit properties: the backend, the test's id without it, the run's
pathspec, the flow file and, when the run failed, its failed step's line.

Runs go through Metaflow's own ``Runner``, with the backend's decorator
``--with``; scheduler backends (``argo``) deploy with ``Deployer``, trigger,
wait, and delete the deployment after. A run that outlasts
``--flow-timeout`` is stopped (Metaflow's ``Runner`` kills its process and
the processes it started) and its test fails naming the timeout; a deployed
flow's triggered run is waited for as long. Each flow runs from a copy of
its folder, so the modules beside it import and two flow files of one name
in two folders stay apart. Registered as a pytest plugin by the runtime's
``pytest11`` entry point.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from metaflow_stack.ci import results
from metaflow_stack.ci.backends import BACKENDS, Backend

_DEFAULT = "local"
#: How long a run (or a deployed flow's triggered run) may take before it is stopped and the test fails.
RUN_TIMEOUT_S = 1800
#: What a flow's folder is copied without: Metaflow's local datastore, caches, hidden folders.
_NOT_COPIED = shutil.ignore_patterns(".*", "__pycache__")


def required() -> set[str]:
    """The tools (and backends) ``STACK_TEST_REQUIRE`` says must be present."""
    return {t.strip() for t in os.environ.get("STACK_TEST_REQUIRE", "").split(",") if t.strip()}


def need(tool: str, available: bool, why: str) -> None:
    """Skip (or, when ``STACK_TEST_REQUIRE`` lists ``tool``, fail) unless ``tool`` is available."""
    if available:
        return
    message = f"{tool} unavailable: {why}"
    if tool in required():
        pytest.fail(f"{message} (STACK_TEST_REQUIRE lists {tool})")
    pytest.skip(message)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("metaflow-stack")
    group.addoption(
        "--backend",
        default=os.environ.get("STACK_TEST_BACKENDS", _DEFAULT),
        help=f"Comma-separated backends to run flow tests on ({', '.join(BACKENDS)}); default {_DEFAULT} "
        "or STACK_TEST_BACKENDS.",
    )
    group.addoption(
        "--flow-with",
        action="append",
        default=[],
        metavar="DECOSPEC",
        help="A decorator every step of every flow run gets, as `run --with` takes it (repeat). It travels in "
        "command lines and job specs: give workers secrets through the backend instead "
        "(METAFLOW_KUBERNETES_SECRETS, Nomad Variables), test credentials only here.",
    )
    group.addoption(
        "--flow-timeout",
        type=float,
        default=RUN_TIMEOUT_S,
        metavar="SECONDS",
        help=f"How long one flow run may take before it is stopped and its test fails (default {RUN_TIMEOUT_S}).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): the only backends this flow test runs on")
    config.addinivalue_line("markers", "skip_backend(*names, reason=...): backends this flow test skips")
    selected(config)  # a wrong --backend stops the session before collection, in one line


def selected(config: pytest.Config) -> list[str]:
    """The backends ``--backend`` names, in its order; an unknown one is a usage error naming the choices."""
    names = [n.strip() for n in str(config.getoption("--backend")).split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise pytest.UsageError(f"--backend {','.join(unknown) or '(none)'}: choose from {', '.join(BACKENDS)}")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "flow_runner" not in metafunc.fixturenames:
        return
    names = chosen = selected(metafunc.config)
    if only := metafunc.definition.get_closest_marker("backends"):
        names = [n for n in names if n in only.args]
        if not names:  # one skipped case that says why, rather than pytest's "empty parameter set"
            reason = f"runs on {', '.join(only.args)} only; --backend names {', '.join(chosen)}"
            skipped = pytest.param(only.args[0], marks=pytest.mark.skip(reason=reason))
            metafunc.parametrize("flow_backend", [skipped], indirect=True)
            return
    params = []
    for name in names:
        marks = []
        for skip in metafunc.definition.iter_markers("skip_backend"):
            if name in skip.args:
                marks.append(pytest.mark.skip(reason=skip.kwargs.get("reason", f"not run on {name}")))
        params.append(pytest.param(name, id=name, marks=marks))
    metafunc.parametrize("flow_backend", params, indirect=True)


@pytest.fixture
def flow_backend(request: pytest.FixtureRequest) -> Backend:
    """The backend of this test's run: present, or the test skips (or fails) naming what is missing."""
    backend = BACKENDS[request.param]
    reason = backend.missing()
    if reason is not None and backend.name in required():
        pytest.fail(f"{backend.name} unavailable: {reason} (STACK_TEST_REQUIRE lists {backend.name})")
    need(backend.tool, reason is None, f"the {backend.name} backend: {reason}")
    return backend


@pytest.fixture
def flow_env() -> dict[str, str]:
    """Settings every flow run of the test gets (override it in a conftest to add a backend's own)."""
    return {}


@pytest.fixture
def flow_runner(
    flow_backend: Backend,
    flow_env: dict[str, str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[FlowHarness]:
    """Runs flow files on this test's backend and records each run for the report."""

    def record(name: str, value: str) -> None:
        # What ``record_property`` does, less its warning under the xunit2 JUnit family: pytest's JUnit
        # writer puts a test's user properties in its case under any family.
        request.node.user_properties.append((name, value))

    record(results.PROPERTY_BACKEND, flow_backend.name)
    record(results.PROPERTY_TEST, request.node.nodeid.removesuffix(f"[{flow_backend.name}]"))
    harness = FlowHarness(flow_backend, flow_env, tmp_path, Path(request.node.path).parent, record)
    harness.decospecs += request.config.getoption("--flow-with")
    harness.timeout = request.config.getoption("--flow-timeout")
    yield harness
    harness.close()


class FlowHarness:
    """A test's runs on one backend: each flow's folder copied into the test's own folder and run from there."""

    def __init__(self, backend: Backend, env: dict[str, str], folder: Path, tests: Path, record: Any) -> None:
        self.backend = backend
        self.folder = folder
        self._env = env
        self._tests = tests
        self._record = record
        self._deployed: list[Any] = []
        self._deployers: list[Any] = []
        #: Decorators every step gets (``--with``): the backend's, then ``--flow-with``'s.
        self.decospecs = list(backend.decospecs)
        #: What the last run printed (stdout, then stderr), to show when a test's assertion fails.
        self.output = ""
        #: Seconds one run may take (``--flow-timeout``).
        self.timeout: float = RUN_TIMEOUT_S

    def _stage(self, flow_file: str) -> tuple[Path, Path]:
        """The flow file, and its copy: its whole folder (the modules it imports) copied once per test, into a
        folder named for the source folder, so ``v1/train.py`` and ``v2/train.py`` each run their own."""
        source = (self._tests / flow_file).resolve()
        digest = hashlib.sha256(str(source.parent).encode()).hexdigest()[:12]
        copy = self.folder / "flows" / f"{source.parent.name}-{digest}"
        if not copy.exists():
            shutil.copytree(source.parent, copy, ignore=_NOT_COPIED)
        return source, copy / source.name

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        return {"USER": os.environ.get("USER") or "flowtest", **self._env, **extra}

    def _finished(self, flow_file: str, env: dict[str, str] | None, start: Callable[[Any], Awaitable[Any]]) -> Any:
        """The run that ``start`` begins with a ``Runner`` of ``flow_file``, recorded once it ended; a run
        still going after ``timeout`` seconds is stopped and the test fails."""
        from metaflow import Runner

        source, staged = self._stage(flow_file)
        deadline = time.monotonic() + self.timeout
        options = {"env": self._environment(env or {}), "cwd": str(self.folder), "decospecs": self.decospecs}

        async def until_done(runner: Any) -> Any:
            try:
                executing = await start(runner)  # back once the run has its id (or file_read_timeout passed)
                await executing.wait(timeout=max(deadline - time.monotonic(), 0.001))  # Metaflow kills it after
                return executing
            finally:  # what outlived that (Metaflow's kill leaves a run with no child process) is killed here
                for command in runner.spm.commands.values():
                    if command.process is not None and command.process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            command.process.kill()
                        await command.process.wait()

        runner = Runner(str(staged), show_output=False, file_read_timeout=int(self.timeout) + 1, **options)
        with runner:
            try:
                executing = asyncio.run(until_done(runner))
            except RuntimeError:  # no run id: Metaflow's error, with the run's output, unless time ran out
                if time.monotonic() < deadline:
                    raise
                executing = None
            if executing is None or executing.status == "timeout":
                pytest.fail(f"{flow_file}: the run did not finish within {self.timeout:g} s (--flow-timeout): stopped")
            return self._recorded(executing.run, source, executing.stdout + executing.stderr)

    def run(self, flow_file: str, *, env: dict[str, str] | None = None, **parameters: Any) -> Any:
        """Run ``flow_file`` (relative to the test's file) with ``parameters``; the run, through the Client."""
        if self.backend.scheduler:
            return self._deployed_run(flow_file, env or {}, parameters)
        return self._finished(flow_file, env, lambda runner: runner.async_run(**parameters))

    def resume(self, flow_file: str, *, origin_run_id: str, env: dict[str, str] | None = None, **options: Any) -> Any:
        """Resume a run of ``flow_file`` made by this test (``Runner.resume``); the new run."""
        if self.backend.scheduler:
            pytest.skip(f"resume runs here, not on {self.backend.name}")
        return self._finished(
            flow_file, env, lambda runner: runner.async_resume(origin_run_id=origin_run_id, **options)
        )

    def _deployed_run(self, flow_file: str, env: dict[str, str], parameters: dict[str, Any]) -> Any:
        from metaflow import Deployer

        source, staged = self._stage(flow_file)
        deployer = Deployer(
            str(staged), show_output=False, env=self._environment(env), cwd=str(self.folder), decospecs=self.decospecs
        )
        scheduler = getattr(deployer, self.backend.scheduler.replace("-", "_"))()
        self._deployers.append(scheduler)
        deployed = scheduler.create()
        self._deployed.append(deployed)
        triggered = deployed.trigger(**parameters)
        run = triggered.wait_for_run(timeout=self.timeout)
        # The scheduler's own word on the run: a run that fails before its end step never "finishes".
        triggered.wait_for_completion(timeout=self.timeout)
        return self._recorded(run, source, "")

    @property
    def deployed(self) -> list[Any]:
        """What this test deployed so far (Metaflow's ``DeployedFlow``s), for what a test checks of them."""
        return list(self._deployed)

    def _recorded(self, run: Any, source: Path, output: str) -> Any:
        """Record ``run`` for the report (and, when it failed, where its failed step is); return it."""
        self.output = output
        self._record(results.PROPERTY_RUN, run.pathspec)
        self._record(results.PROPERTY_FLOW_FILE, _in_repository(source))
        if not run.successful and (line := _failed_step_line(run, source)):
            self._record(results.PROPERTY_FLOW_LINE, str(line))
        return run

    def close(self) -> None:
        """Delete what the test deployed (each, whatever the others do) and the deployers' files."""
        failed = []
        for deployed in self._deployed:
            try:
                deployed.delete()
            except Exception as exc:  # the next deletion still runs; the failures are reported together
                failed.append(f"{deployed.name}: {exc}")
        for deployer in self._deployers:
            deployer.cleanup()
        if failed:
            pytest.fail(f"could not delete what the test deployed: {'; '.join(failed)}")


def _in_repository(path: Path) -> str:
    """``path`` relative to its git repository (what a check run's annotation names), else as it is."""
    top = next((parent for parent in path.parents if (parent / ".git").exists()), None)
    return str(path.relative_to(top)) if top is not None else str(path)


def _failed_step_line(run: Any, source: Path) -> int | None:
    """The line of the first failed step's ``def`` in the flow file."""
    failed = next((step.id for step in run if any(not task.successful for task in step)), None)
    if failed is None:
        return None
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == failed:
            return node.lineno
    return None
