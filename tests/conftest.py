"""Shared fixtures: real Docker, a real registry, an isolated Metaflow Stack state.

Tests that need a tool this machine lacks are skipped with a reason naming
the tool, unless ``STACK_TEST_REQUIRE`` lists it (as CI does): then the
missing tool is a failure, so CI cannot pass by skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devservers import free_port
from python_on_whales import Container, DockerClient
from python_on_whales.exceptions import DockerException

from metaflow_stack.ci.plugin import need  # the rule every test's tools follow, here and in flow suites
from metaflow_stack.elsewhere import Launcher

PROJECT = Path(__file__).resolve().parents[1]
FUNCTIONS_APP = Path(__file__).resolve().parent / "functions_app"


# Metaflow reads its S3 endpoint when it is first imported: point it at the
# test S3 server (started on demand by the ``s3_bucket`` fixture) before that.
# Each process of the suite has its own (an xdist worker inherits its
# controller's variables, never its server). The port is held (bound, not
# listening) until the server starts, so that no server the session starts
# before it is handed the same port (seen: a CreateBucket answered 405).
_S3_HOLD = socket.socket()
_S3_HOLD.bind(("127.0.0.1", 0))
_S3_PORT = _S3_HOLD.getsockname()[1]
os.environ["METAFLOW_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{_S3_PORT}"
# In a GitHub job, the job's own summary: the suite's `stack ci report` runs (which append to it) write to
# their tests' files or nowhere, never into the job's page.
os.environ.pop("GITHUB_STEP_SUMMARY", None)
for _name, _value in (
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
):
    os.environ.setdefault(_name, _value)
sys.path.insert(0, str(FUNCTIONS_APP))

# Metaflow refuses to run without a user name, and as plain root; $USER is read on every call.
if not any(os.environ.get(v, "root") != "root" for v in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")):
    os.environ["USER"] = "tester"
VENV_BIN = Path(sys.executable).parent
#: Environment under which no Docker engine answers.
DEAD_ENGINE_ENV = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
#: Label on every container a test launches (and the Nomad double's tasks), its value this test process as a
#: launcher (``elsewhere.Launcher``): the session removes its own when it ends, and those of a session that
#: ended without (killed), never those of the worker running beside it.
TEST_LABEL = "io.metaflow-stack.test"
TEST_LABELS = {TEST_LABEL: Launcher.this().label}
#: Where in-process test clients say they connect: servers answer loopback names only (``http_guard``).
LOOPBACK = "http://127.0.0.1"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Metaflow's local metadata and datastore use the first ``.metaflow`` folder above the working folder:
    one left above the temporary folder (a flow run in it by hand) would take every test run's records, which
    the tests then look for, and miss, in their own folders."""
    import tempfile

    here = Path(tempfile.gettempdir()).resolve()
    stray = next((p / ".metaflow" for p in (here, *here.parents) if (p / ".metaflow").is_dir()), None)
    if stray is not None:
        pytest.exit(f"{stray} would take the test runs' Metaflow records: remove it (or set TMPDIR elsewhere)", 2)


#: Modules whose tests use what every process on this machine shares, in groups. Under ``just test``'s two
#: xdist workers each group runs in one worker, one module after another (``pytest_xdist_make_scheduler``),
#: and the groups run beside each other and beside the rest, so no group may change what another uses.
#: ``engine``: the Docker engine's images (tests remove the base image, or move its tag to other content),
#: its bridge, the registry, the Nomad double's docker tasks. ``pools``: pools' workers, found among every
#: process by their test's folder, the Nomad double's raw_exec workers, Rays of the pools' own; no image.
#: Every Ray a test starts is its own: none may start Ray with ``RAY_ADDRESS=auto``, which joins any.
MACHINE_GROUPS = {
    "engine": frozenset(
        {"test_catalog", "test_cluster", "test_confidential_cvm", "test_confidential_image"}
        | {"test_confidential_seccomp", "test_demo", "test_deploy", "test_devcontainer", "test_devcontainer_backends"}
        | {"test_devcontainer_config", "test_devcontainer_generate", "test_devcontainer_stores", "test_doctor"}
        | {"test_engine_docker", "test_flow_suite", "test_functions_api", "test_functions_backends"}
        | {"test_functions_ray", "test_images", "test_key_release_deploy", "test_nomad", "test_nomad_client"}
        | {"test_nomad_dev_cluster", "test_published_images", "test_registry", "test_service_deploy"}
        | {"test_serving_batch", "test_serving_image", "test_ui_deploy", "test_worker_pool_kind"}
    ),
    "pools": frozenset({"test_worker_pool"}),
}
#: The fixtures a module of any group may use: the engine (for the sessions' removal of their containers),
#: and a Nomad agent: the double, one a session (its docker tasks labelled the session's), or the real one
#: ``NOMAD_ADDR`` names, where the jobs' names keep each test's apart.
SHARED_FIXTURES = frozenset({"docker_engine", "nomad_agent"})
#: The fixtures (and the ``docker`` mark) that make a module one of the ``engine`` group's.
ENGINE_FIXTURES = frozenset({"base_image", "registry_server", "local_registry", "bridge_address", "bridge_s3"})


def _group(module: str) -> str | None:
    """The machine group of the test module named ``module``; None for one of none."""
    return next((name for name, modules in MACHINE_GROUPS.items() if module in modules), None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A module that uses the engine's shared things outside the ``engine`` group, or a session's shared
    things outside any group, would run beside the modules that do: refused, naming it. The groups' tests
    come first, then the other modules', most tests first: xdist hands the modules out in that order, so
    each group starts at once, in a worker of its own."""
    for item in items:
        module, uses = Path(item.path).stem, set(getattr(item, "fixturenames", ()))
        engine = bool(item.get_closest_marker("docker") or ENGINE_FIXTURES & uses)
        if engine and _group(module) != "engine":
            raise pytest.UsageError(f"{module} uses the machine's engine: add it to MACHINE_GROUPS['engine']")
        if SHARED_FIXTURES & uses and _group(module) is None:
            raise pytest.UsageError(f"{module} uses the machine's engine or services: add it to MACHINE_GROUPS")
    sizes = Counter(Path(item.path).stem for item in items)
    ranks = {name: rank for rank, name in enumerate(MACHINE_GROUPS)}

    def turn(item: pytest.Item) -> tuple[int, int]:
        module = Path(item.path).stem
        group = _group(module)
        return (ranks[group], 0) if group else (len(ranks), -sizes[module])

    items.sort(key=turn)  # (stable: a group's modules, and each module's tests, stay in the order collected)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scheduling by module (each module's fixtures made once), with each of ``MACHINE_GROUPS``
    as one unit: a worker runs its modules in turn, the groups in workers of their own, while the other
    modules fill in beside them. Units go out in the order of collection (``pytest_collection_modifyitems``),
    not re-sorted by size (``loadscopereorder``: pytest-xdist 3.8 and later)."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class MachineScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = Path(nodeid.split("::", 1)[0]).stem
            return _group(module) or module

    return MachineScheduling(config, log)


def ended_launcher() -> str:
    """The label (``elsewhere.Launcher``) of a process that named itself and ended: a launcher killed outright."""
    named = "from metaflow_stack.elsewhere import Launcher; print(Launcher.this().label)"
    done = subprocess.run([sys.executable, "-c", named], capture_output=True, text=True, check=True, timeout=60)
    return done.stdout.strip()


def need_kind_cluster() -> None:
    """Skip (or fail, where CI requires kind) unless kind's cluster ``KIND_CLUSTER_NAME`` (default ``kind``)
    exists and kubectl is here: GitHub's runners have kind in every job, a cluster only where a job makes one."""
    name = os.environ.get("KIND_CLUSTER_NAME", "kind")
    kind = shutil.which("kind")
    listed = subprocess.run([kind, "get", "clusters"], capture_output=True, text=True, timeout=60) if kind else None
    clusters = listed.stdout.split() if listed is not None and listed.returncode == 0 else []
    why = f"no kind cluster {name!r} (kind and kubectl on PATH, the cluster named by KIND_CLUSTER_NAME)"
    need("kind", bool(shutil.which("kubectl")) and name in clusters, why)


#: Debian's Chromium, driven by Playwright (never a downloaded browser); screenshots land under SCREENSHOTS.
CHROMIUM = Path(os.environ.get("STACK_TEST_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = PROJECT / ".stack" / "test-results"


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    need("chromium", CHROMIUM.exists(), "install Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private state directory for the whole session (registry storage, demo datastore)."""
    path = tmp_path_factory.mktemp("stack-state")
    os.environ["METAFLOW_STACK_STATE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[object]:
    """A python-on-whales client whose engine answers; this session's test containers are removed after, and
    those no live session owns (``_stale_containers``)."""
    from metaflow_stack.engines.docker import require_engine
    from metaflow_stack.errors import DockerUnavailableError

    try:
        docker, reason = require_engine(), ""
    except DockerUnavailableError as exc:
        docker, reason = None, exc.message
    need("docker", docker is not None, reason)
    yield docker
    own = docker.container.list(all=True, filters=[("label", f"{k}={v}") for k, v in TEST_LABELS.items()])
    _remove_containers(docker, [*own, *_stale_containers(docker, {container.id for container in own})])


def _stale_containers(docker: DockerClient, own: set[str]) -> list[Container]:
    """The test containers (but ``own``) no live session owns: a killed session's, and those the builds
    before sessions had labels of their own left (``true``). (Not ``elsewhere.orphans``: that one knows only
    the runtime's own containers, by its job label, and never an unparsable owner.)"""
    stale = []
    for container in docker.container.list(all=True, filters=[("label", TEST_LABEL)]):
        if container.id in own:
            continue
        with contextlib.suppress(DockerException):  # (removed meanwhile, by its own session)
            launcher = Launcher.parse(container.config.labels.get(TEST_LABEL))
            if launcher is None or launcher.gone():
                stale.append(container)
    return stale


def _remove_containers(docker: DockerClient, containers: list[Container]) -> None:
    """Remove ``containers``, each on its own: one removed meanwhile (by another session's sweep, or by the
    Nomad double, as its task ended) is no error."""
    for container in containers:
        with contextlib.suppress(DockerException):
            docker.container.remove(container, force=True)


@pytest.fixture(scope="session")
def base_image(docker_engine: object, state_dir: Path) -> str:
    """The base image, built (or found up to date) once per session."""
    from metaflow_stack import images

    return images.build("base")


@pytest.fixture(scope="session")
def registry_server(state_dir: Path) -> Iterator[str]:
    """A real Distribution registry on a free 127.0.0.1 port for the session; its address."""
    from metaflow_stack.registry import LocalRegistry

    need(
        "docker-registry",
        any(shutil.which(b) for b in ("registry", "docker-registry")),
        "the Distribution registry binary is not installed",
    )
    registry = LocalRegistry(home=state_dir / "test-registry", port=free_port())
    address = registry.start()
    yield address
    registry.stop()


@pytest.fixture
def local_registry(registry_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session's registry, configured as the stack's registry for the test that asks for it only: a later
    test configured for none must not push to it (and leave the engine knowing its images by digest)."""
    monkeypatch.setenv("METAFLOW_STACK_REGISTRY", registry_server)
    return registry_server


#: Every manifest kind a registry may hold for an image (a multi-platform index among them).
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


def registry_manifest(registry: str, repository: str, reference: str, method: str = "HEAD") -> Any:
    """The registry's answer for ``repository``'s manifest at ``reference`` (a tag or a digest): its
    ``Docker-Content-Digest`` is what a pull by that reference gets."""
    import httpx

    return httpx.request(
        method, f"http://{registry}/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES}
    )


def refuse_unpickling(monkeypatch: pytest.MonkeyPatch, what: str = "the code under test") -> None:
    """From here on, unpickling anything in this process fails the test: the module's loaders and its
    ``Unpickler`` classes (C and Python), so no road to ``pickle`` is left open."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} unpickled something")

    class Refused:
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse()

    for name in ("loads", "load"):
        monkeypatch.setattr(pickle, name, refuse)
    for name in ("Unpickler", "_Unpickler"):
        monkeypatch.setattr(pickle, name, Refused)


def fuzz_finds_nothing(url: str, tmp_path: Path, *, exclude: tuple[str, ...] = (), examples: int = 20) -> str:
    """Schemathesis over the server's OpenAPI document at ``url``: no 5xx, every error JSON
    (``schemathesis_hooks``); streams are ``exclude``d. Returns its report."""
    schemathesis = shutil.which("st", path=str(VENV_BIN))
    need("schemathesis", schemathesis is not None, "install the dev extra (schemathesis)")
    command = [str(schemathesis), "run", f"{url}/openapi.json", "--checks", "not_a_server_error,errors_are_json"]
    for path in exclude:
        command += ["--exclude-path", path]
    command += ["--max-examples", str(examples), "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(Path(__file__).parent)}
    # Run in a scratch folder: Schemathesis keeps a cache beside where it runs.
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-6000:]
    assert " failed" not in result.stdout.split("Test cases:")[1]
    return result.stdout


def gone(pid: int, within: float = 10.0) -> bool:
    """Whether process ``pid`` ends (or is left a zombie, which runs nothing) within ``within`` seconds."""
    import psutil

    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``metaflow`` console script of this environment."""
    return subprocess.run(
        [str(VENV_BIN / "metaflow"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=cwd,
        timeout=600,
    )


def json_stdout(result: subprocess.CompletedProcess[str]) -> object:
    """The JSON a ``metaflow`` command printed, after the banner Metaflow itself prints on stdout."""
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("[", "{")))
    return json.loads("\n".join(lines[start:]))


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last line a command printed on stdout."""
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def iris_run(tmp_path_factory: pytest.TempPathFactory, state_dir: Path) -> Path:
    """A real run of IrisTrainFlow on the local datastore; returns the folder holding ``.metaflow``."""
    from metaflow import metadata, namespace

    root = tmp_path_factory.mktemp("iris")
    shutil.copy(FUNCTIONS_APP / "train_flow.py", root)
    result = subprocess.run(
        [sys.executable, "train_flow.py", "--datastore-root", str(root / ".metaflow"), "run"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metadata(f"local@{root}")
    namespace(None)
    return root


@pytest.fixture(scope="session")
def train_task(iris_run: Path):
    """The ``train`` task of that run (a ``metaflow.Task``)."""
    from metaflow import Flow

    return Flow("IrisTrainFlow").latest_run["train"].task


@pytest.fixture(scope="session")
def s3_bucket(state_dir: Path) -> Iterator[str]:
    """A bucket on a real S3-compatible server (moto) on 127.0.0.1; yields ``s3://bucket``."""
    import boto3

    server = shutil.which("moto_server", path=str(VENV_BIN)) or shutil.which("moto_server")
    need("moto_server", server is not None, "install the dev extra (moto[server])")
    log = (state_dir / "moto.log").open("wb")
    _S3_HOLD.close()
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(_S3_PORT)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
    )
    endpoint = os.environ["METAFLOW_S3_ENDPOINT_URL"]
    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(100):
        assert process.poll() is None, f"moto_server ended ({process.returncode}): see {log.name}"
        try:
            client.list_buckets()
            break
        except Exception:  # not listening yet
            time.sleep(0.1)
    client.create_bucket(Bucket="functions")
    yield "s3://functions"
    process.terminate()
    process.wait(timeout=10)


#: ``packaging`` version the second (binding) virtualenv pins; the test environment has another.
BINDING_ENV_PACKAGING = "23.2"

_BIND_SCRIPT = """
import sys
from metaflow import JsonFunction, Task, metadata, namespace
sys.path.insert(0, sys.argv[2])
import iris_functions
metadata("local@" + sys.argv[1])
namespace(None)
print(JsonFunction(getattr(iris_functions, sys.argv[4]), task=Task(sys.argv[3])).reference)
"""


@pytest.fixture(scope="session")
def binding_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, small virtualenv: the runtime, scikit-learn, and an older ``packaging``; returns its python."""
    from uv import find_uv_bin

    env = tmp_path_factory.mktemp("binding-env") / "venv"
    constraints = env.parent / "constraints.txt"  # the runtime's lock, less the package pinned differently
    lock = (PROJECT / "runtime" / "requirements.lock").read_text().splitlines()
    constraints.write_text("\n".join(line for line in lock if not line.startswith("packaging==")))
    uv = find_uv_bin()
    subprocess.run([uv, "venv", "--quiet", "--python", "3.11", str(env)], check=True)
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(env / "bin" / "python"),
            "-c",
            str(constraints),
            "-e",
            str(PROJECT / "runtime"),
            "scikit-learn",
            f"packaging=={BINDING_ENV_PACKAGING}",
        ],
        check=True,
        timeout=600,
    )
    return env / "bin" / "python"


def bind_in(python: Path, run_root: Path, function: str, task: str) -> str:
    """The reference of ``iris_functions.<function>`` bound to ``task`` by another environment's Python."""
    result = subprocess.run(
        [str(python), "-c", _BIND_SCRIPT, str(run_root), str(FUNCTIONS_APP), task, function],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return result.stdout


#: Seconds a served function's first call may take: it loads the function's artifacts (lazy by design),
#: several seconds for a scikit-learn model on 2 busy cores, more than httpx's default 5 s.
FIRST_CALL_S = 60


def wait_ready(url: str, seconds: float = 120) -> bool:
    """Whether ``url``/ready answered 200 within ``seconds``."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


#: The Pulumi program under infra/pulumi, whose components the deploy tests import.
PULUMI_PROGRAM = PROJECT / "infra" / "pulumi"


@pytest.fixture
def pulumi_offline() -> Iterator[list]:
    """Pulumi's own offline test mode for ``infra/pulumi``'s components: every resource is echoed back, and
    recorded (``MockResourceArgs``: its type, name and inputs) in the list the fixture yields.

    The mocks run on an event loop of the test's own; afterwards the registrations a test never awaited
    (a component refused half-way, say) are cancelled and the loop closed, rather than destroyed pending."""
    import asyncio

    import pulumi

    registered: list = []

    class Mocks(pulumi.runtime.Mocks):
        def new_resource(self, args: pulumi.runtime.MockResourceArgs):
            registered.append(args)
            return f"{args.name}-id", args.inputs

        def call(self, args: pulumi.runtime.MockCallArgs):
            return {}

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    pulumi.runtime.set_mocks(Mocks(), preview=False)
    if str(PULUMI_PROGRAM) not in sys.path:
        sys.path.insert(0, str(PULUMI_PROGRAM))
    yield registered
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


# The metadata service's servers (PostgreSQL, a lagging replica, NATS, the service), as fixtures for every module.
from service_servers import lagging_replica, nats_server, postgres, service_factory  # noqa: E402, F401


@pytest.fixture(scope="session")
def bridge_address() -> str:
    """The Docker bridge's address on this machine: where a container on the default network reaches
    the host. Test servers listen there (the stack's own bind 127.0.0.1 unless told otherwise)."""
    from metaflow_stack.engines.docker import host_address, require_engine
    from metaflow_stack.errors import DockerUnavailableError

    try:
        docker = require_engine()
    except DockerUnavailableError as exc:
        need("docker", False, exc.message)
    return host_address(docker)


@pytest.fixture(scope="session")
def bridge_s3(bridge_address: str) -> Iterator[str]:
    """moto's S3 server on the bridge address with a bucket; yields its endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=bridge_address, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="sandbox")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def nomad_agent(docker_engine: DockerClient) -> Iterator[object]:
    """A Nomad agent's settings (``metaflow_stack.engines.nomad.client.Settings``): the one at ``NOMAD_ADDR`` where
    one runs (the GitHub workflow's), else the double in ``tests/nomad_double`` (its docker tasks on the
    local engine), with ACLs on; its variables are set for the processes the tests start."""
    import uuid

    from devservers import nomad_double

    from metaflow_stack.engines.nomad.client import Settings

    if os.environ.get("NOMAD_ADDR"):
        yield Settings.from_env()
        return
    token = uuid.uuid4().hex
    # Its docker tasks carry this session's label: any the double leaves, ``docker_engine`` removes after it.
    labels = [f"--label={name}={value}" for name, value in TEST_LABELS.items()]
    # The node's own Python for raw_exec tasks, as a client whose PATH holds one with Metaflow's needs.
    with nomad_double("--token", token, *labels, path=f"{VENV_BIN}:{os.environ['PATH']}") as address:
        yield Settings(address=address, token=token)


def gramine_path() -> str:
    """A PATH with Gramine's commands: the installed ones where Gramine is (the GitHub workflow's ``gramine``
    job, where ``STACK_TEST_REQUIRE`` makes their absence a failure), else the double in
    ``tests/gramine_double`` (with this environment's Python, which the double runs on)."""
    from metaflow_stack.ci.plugin import required

    if shutil.which("gramine-direct"):
        return os.environ["PATH"]
    need("gramine", "gramine" not in required(), "STACK_TEST_REQUIRE lists gramine and it is not installed")
    return f"{Path(__file__).resolve().parent / 'gramine_double'}:{VENV_BIN}:{os.environ['PATH']}"


@pytest.fixture
def gramine_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gramine's commands on PATH for the test (``gramine_path``)."""
    monkeypatch.setenv("PATH", gramine_path())
