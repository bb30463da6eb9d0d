"""``@worker_pool`` on real Metaflow runs (local datastore and metadata): every pooled item is the task
a plain foreach makes, failures stay per item, and nothing of a pool outlives its run."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import redis.asyncio
from conftest import PROJECT, VENV_BIN, gone, need
from devservers import free_port, redis_server
from nomad_jobs import jobs_left

from metaflow_stack.engines.nomad.client import NomadClient, NotFound, Settings
from metaflow_stack.engines.nomad.job_variable import variable_path
from metaflow_stack.pool import handover, redis_dispatch, redis_queue, trampoline
from metaflow_stack.pool.child import Task
from metaflow_stack.pool.local import TRAMPOLINE_FOLDER, LocalPool, trampoline_command
from metaflow_stack.pool.processes import OWNER_LOCK, PoolFolder
from metaflow_stack.pool.redis_pool import URL_VARIABLE
from metaflow_stack.pool.redis_queue import RedisQueue

pytestmark = pytest.mark.slow

FLOWS = Path(__file__).resolve().parent / "worker_pool_flows"
#: A kubectl double (the commands the kubernetes backend runs; its pods are local processes): no cluster
#: runs here. The GitHub workflow's kind job runs the same backend on a real cluster.
KUBECTL_DOUBLE = Path(__file__).resolve().parent / "kubectl_double"
#: What every process of a pool has on its command line (the fork server and its tasks, a dispatcher,
#: Redis workers and their tasks).
POOL_MARKS = ("metaflow_stack.pool.forkserver", "metaflow_stack.pool.dispatcher", "metaflow_stack.pool.redis_worker")
#: And of a Ray pool: its actors, and the Ray it starts (whose files are in the pool's folder).
RAY_MARKS = ("ray::PoolActor", "mf-pool-")

#: Read in a subprocess: Metaflow's client keeps one datastore root per process.
FACTS = """
import json, sys
from metaflow import Flow, Task, metadata, namespace
metadata("local@" + sys.argv[1])
namespace(None)
run = Flow(sys.argv[2]).latest_run
USER = ("input", "square", "label", "alloc", "host_only", "node_only", "metadata_setting", "pool_secrets")
items = []
for task in sorted(run["each"], key=lambda t: t.index):
    first = Task(task.pathspec, attempt=0)
    items.append({
        "index": task.index,
        "successful": task.successful,
        "attempt": task.current_attempt,
        "artifacts": sorted(a.id for a in task),
        "values": {a.id: repr(a.data) for a in task if a.id in USER},
        "foreach": [list(frame)[:4] for frame in task["_foreach_stack"].data],
        "stdout": task.stdout,
        "stderr": task.stderr,
        "first_stderr": first.stderr,
        "worker": task.metadata_dict.get("worker-pool"),
        "cloned": task.origin_pathspec is not None,
        "origin_run": task.metadata_dict.get("origin-run-id"),
    })
join = run["join"].task if "join" in run else None
def joined(name):
    return getattr(join.data, name) if join is not None and join.successful and name in join else None
print(json.dumps({
    "id": run.id,
    "successful": run.successful,
    "tags": sorted(run.tags),
    "tasks": len(list(run["each"])),
    "squares": joined("squares"),
    "errors": joined("errors"),
    "values": joined("values"),
    "items": items,
}))
"""


def run_flow(
    root: Path,
    *args: str,
    pooled: bool = True,
    env: dict[str, str] | None = None,
    command: str = "run",
    flow: str = "pool_flow.py",
    backend: str = "local",
    s3_root: str | None = None,
    top: tuple[str, ...] = (),
    wrapper: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``flow`` run in ``root``; ``pooled``: with ``--with worker_pool:size=2,backend=...``; its datastore the
    local one in ``root``, or S3 at ``s3_root``; ``top``: the flow's own options (``--branch``...); ``wrapper``:
    a script and its arguments that run the flow file."""
    shutil.copy(FLOWS / flow, root)
    environment = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "METAFLOW_DEFAULT_METADATA": "local"}
    environment.update(env or {})
    pool = ["--with", f"worker_pool:size=2,backend={backend}"] if pooled else []
    store = (
        ["--datastore", "s3", "--datastore-root", s3_root] if s3_root else ["--datastore-root", str(root / ".metaflow")]
    )
    line = [sys.executable, *wrapper, flow, *store, *top, command, *pool, *args]
    return subprocess.run(line, cwd=root, env=environment, capture_output=True, text=True, timeout=600)


def facts(root: Path, flow: str = "PoolFlow") -> dict:
    """The latest run of ``flow`` in ``root``, through the Client API."""
    line = [sys.executable, "-c", FACTS, str(root), flow]
    done = subprocess.run(line, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def comparable(run: dict, root: Path) -> dict:
    """A run's Client API view without what differs between any two runs: ids, where items ran, and the
    folder the flow ran in (tracebacks name it)."""
    items = [{k: v for k, v in item.items() if k != "worker"} for item in run["items"]]
    view = {**{k: v for k, v in run.items() if k not in ("id", "items")}, "items": items}
    return json.loads(json.dumps(view).replace(str(root), "<root>"))


def differences(left: dict, right: dict) -> str:
    """Where two ``comparable`` views differ, a line per field (item by item; of two texts, their changed
    lines): a failure names what differs instead of printing two whole runs, which CI's excerpt cuts."""

    def changed(name: str, mine: object, theirs: object) -> list[str]:
        if mine == theirs:
            return []
        if isinstance(mine, str) and isinstance(theirs, str):
            lines = difflib.ndiff(mine.splitlines(keepends=True), theirs.splitlines(keepends=True))
            return [f"{name}: {line!r}" for line in lines if line[:1] in "-+"]
        return [f"{name}: {mine!r} != {theirs!r}"]

    lines = [line for key in left.keys() - {"items"} for line in changed(key, left[key], right.get(key))]
    for index, (mine, theirs) in enumerate(zip(left["items"], right["items"], strict=False)):
        lines += [line for key in mine for line in changed(f"item {index} {key}", mine[key], theirs.get(key))]
    if len(left["items"]) != len(right["items"]):
        lines.append(f"items: {len(left['items'])} != {len(right['items'])}")
    return "\n".join(lines)


#: In the environment of every process a test starts (``this_test``): which test started it.
TEST_VARIABLE = "POOL_TEST_ROOT"


@pytest.fixture(autouse=True)
def this_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process this test starts (its runs, and through them their pools) carries the test's folder in
    its environment, and its pods that folder on their command lines: ``pool_processes`` finds this test's
    alone, not those of a test running beside it (the suite runs two at once)."""
    monkeypatch.setenv(TEST_VARIABLE, str(tmp_path))


def pool_processes(marks: tuple[str, ...] = POOL_MARKS + RAY_MARKS) -> list[psutil.Process]:
    """This test's processes of any pool (a fork server, its tasks, a dispatcher, Redis workers, Ray actors,
    a Ray a pool started, a trampoline, the kubectl double's pods)."""
    root, found = os.environ[TEST_VARIABLE], []
    for process in psutil.process_iter(["cmdline"]):
        line = process.info["cmdline"] or []
        if any(mark in part for part in line for mark in marks) and (
            any(part.startswith(root + os.sep) for part in line) or _started_by(process, root)
        ):
            found.append(process)
    return found


def still_there(processes: list[psutil.Process]) -> str:
    """What each of ``processes`` is: its threads (what each waits in, from ``/proc``), its open files and, for
    a dispatcher, its threads' Python stacks (which it writes to its log on SIGUSR1; read through its own
    descriptor, as the log's folder may be gone)."""

    def read(path: Path) -> str:  # (each on its own: a thread gone, or no right to trace it, costs only it)
        try:
            return path.read_text().strip()[:60]
        except OSError as exc:
            return f"({exc.strerror})"

    lines = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            line = process.cmdline()
            lines.append(f"{process.pid} (parent {process.ppid()}, {process.status()}): {' '.join(line)[:300]}")
        with contextlib.suppress(OSError):
            for thread in Path(f"/proc/{process.pid}/task").iterdir():
                waits = [read(thread / name) for name in ("comm", "wchan", "syscall")]
                lines.append(f"  thread {thread.name}: {' | '.join(waits)}")
        fds = Path(f"/proc/{process.pid}/fd")
        with contextlib.suppress(OSError):
            lines.append("  files: " + ", ".join(f"{fd.name}={os.readlink(fd)}" for fd in sorted(fds.iterdir()))[:1500])
        with contextlib.suppress(OSError, psutil.Error):
            if "metaflow_stack.pool.dispatcher" in " ".join(process.cmdline()):
                with (fds / "2").open("rb") as log:  # (opened first: its folder goes if it ends meanwhile)
                    process.send_signal(signal.SIGUSR1)
                    time.sleep(1)
                    lines.append(log.read()[-6000:].decode(errors="replace") or "(nothing in its log)")
    return "\n".join(lines)


def _started_by(process: psutil.Process, root: str) -> bool:
    """Whether ``process`` carries the test ``root``'s mark in its environment."""
    try:
        return process.environ().get(TEST_VARIABLE) == root
    except (psutil.Error, OSError):  # gone, or not this user's
        return False


def start_busy_run(
    root: Path, backend: str = "local", env: dict[str, str] | None = None, step_python: Path | None = None
) -> subprocess.Popen:
    """A pooled run of 6 items on 2 workers, started in the background and returned once both workers run
    an item; the items wait for ``root/release`` to exist before they end. ``step_python``: the run's steps
    each in that interpreter's environment, as ``--environment pypi`` made it (``made_environment.py``)."""
    shutil.copy(FLOWS / "pool_flow.py", root)
    environment = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "METAFLOW_DEFAULT_METADATA": "local",
        "POOL_FLOW_RELEASE": str(root / "release"),
        **(env or {}),
    }
    made = [str(FLOWS / "made_environment.py"), str(step_python.parents[1])] if step_python else []
    line = [sys.executable, *made, "pool_flow.py", *(["--environment", "pypi"] if step_python else [])]
    line += ["--datastore-root", str(root / ".metaflow"), "run", "--with", f"worker_pool:size=2,backend={backend}"]
    runtime = subprocess.Popen(
        line, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started = 0
    for output in runtime.stdout:
        started += "attempt 0" in output
        if started == 2:
            return runtime
    runtime.kill()
    raise AssertionError("the run ended before two items started")


def backend_env(backend: str, request: pytest.FixtureRequest, root: Path) -> dict[str, str]:
    """What a run on ``backend`` needs: a Redis (redis, kubernetes) and the kubectl double (kubernetes)."""
    env = {}
    if backend in ("redis", "kubernetes"):
        env[URL_VARIABLE] = request.getfixturevalue("redis_url")
    if backend == "kubernetes":
        env["PATH"] = f"{KUBECTL_DOUBLE}:{VENV_BIN}:{os.environ['PATH']}"
        env["KUBECTL_DOUBLE_STATE"] = str(root / "cluster")
        env["METAFLOW_STACK_POOL_IMAGE"] = "metaflow-stack/base:test"  # (the double runs no image)
    return env


def pods_left(env: dict[str, str]) -> list[str]:
    """The kubectl double's Deployments still applied."""
    book = Path(env.get("KUBECTL_DOUBLE_STATE", "/nonexistent")) / "state.json"
    return list(json.loads(book.read_text())["deployments"]) if book.exists() else []


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    need(
        "redis-server",
        shutil.which("redis-server") is not None,
        "the Redis backend's queue (apt-get install redis-server)",
    )
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def none_left(timeout_s: float = 30) -> list[str]:
    """The command lines of pool processes still alive after ``timeout_s`` (a Ray winds down in seconds)."""
    left = pool_processes()
    for _ in range(int(timeout_s * 4)):
        if not left:
            break
        psutil.wait_procs(left, timeout=0.25)
        left = pool_processes()
    return [" ".join(p.cmdline())[:200] for p in left]


def pool_keys(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match="mf-pool:*"))
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["local", "redis", "ray", "kubernetes"])
def test_a_pooled_run_reads_like_a_plain_one(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """Same tasks, artifacts, values, foreach frames, logs and retried item through the Client API;
    only the pooled items say which worker ran them."""
    flaky = {"POOL_FLOW_FLAKY": "2"}
    (tmp_path / "plain").mkdir()
    (tmp_path / "pooled").mkdir()
    plain = run_flow(tmp_path / "plain", pooled=False, env=flaky)
    assert plain.returncode == 0, plain.stderr[-3000:]
    env = {**flaky, **backend_env(backend, request, tmp_path)}
    pooled = run_flow(tmp_path / "pooled", env=env, backend=backend)
    assert pooled.returncode == 0, pooled.stderr[-3000:]
    plain_facts, pooled_facts = facts(tmp_path / "plain"), facts(tmp_path / "pooled")

    pooled_view, plain_view = comparable(pooled_facts, tmp_path / "pooled"), comparable(plain_facts, tmp_path / "plain")
    assert pooled_view == plain_view, differences(pooled_view, plain_view)
    assert pooled_facts["squares"] == [0, 1, 4, 9, 16, 25]
    retried = pooled_facts["items"][2]
    assert retried["attempt"] == 1 and "RuntimeError: item-2 failed on attempt 0" in retried["first_stderr"]
    assert [item["attempt"] for item in pooled_facts["items"]] == [0, 0, 1, 0, 0, 0]
    assert all(item["worker"] is None for item in plain_facts["items"])
    workers = {item["worker"] for item in pooled_facts["items"]}
    if backend == "kubernetes":  # a pod's name: its Deployment's, and its own
        assert all(w and w.startswith("mf-pool-each-") for w in workers), workers
    else:
        assert all(w and w.startswith("each@") and w.rsplit("/", 1)[1] in ("0", "1") for w in workers), workers
    assert "worker pool each: 6/6 done" in pooled.stdout + pooled.stderr
    assert not none_left()
    assert not pods_left(env)
    if URL_VARIABLE in env:
        assert not pool_keys(env[URL_VARIABLE])


def test_a_task_for_workers_elsewhere_keeps_the_runs_trace_and_not_the_shell() -> None:
    """Metaflow's tracing adds the trace's variables to a task after every decorator has seen it: the names a
    pool elsewhere lets through include its propagator's (a pooled task stays in the run's trace), and never a
    variable of this shell's own."""
    from metaflow.plugins import STEP_DECORATORS

    (pool,) = [d for d in STEP_DECORATORS if d.name == "worker_pool"]
    deco = pool(attributes={"backend": "kubernetes"})
    deco.devcontainer, deco.remote, deco.step_variables, deco.settings_names = None, True, ["GIVEN"], None
    passed = deco._passed({"METAFLOW_INPUT_PATHS_0": "p"})
    assert {"traceparent", "tracestate", "METAFLOW_INPUT_PATHS_0", "GIVEN", "METAFLOW_RUN_ID"} <= passed
    assert not {"HOME", "PATH", "AWS_SECRET_ACCESS_KEY"} & passed


#: A Ray cluster of its own (as ``ray start --head`` makes one, without its fixed-port services), its address
#: printed once it answers; SIGTERM stops it.
RAY_CLUSTER = """
import signal, sys, ray
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1])
print(ray.get_runtime_context().gcs_address, flush=True)
try:
    signal.pause()
finally:
    ray.shutdown()
"""


def test_a_ray_clusters_actors_get_the_runs_metaflow_settings_not_its_environment(tmp_path: Path) -> None:
    """With ``RAY_ADDRESS``, the actors are a cluster's, as a ``@kubernetes`` pod is: each task gets what
    ``@kubernetes`` would send (what Metaflow and the step's decorators set, the run's Metaflow settings, which
    the actor has before it imports Metaflow) over the actor's own environment (its node's, as Ray's own
    tasks), never the rest of the runtime's (its credentials), which went through Ray to every actor."""
    token = uuid.uuid4().hex + uuid.uuid4().hex
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}  # (a cluster as it should be set up)
    quiet = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    folder = tempfile.mkdtemp(prefix="mf-ray-")  # (a short path: Ray's sockets are in it)
    line = [sys.executable, "-c", RAY_CLUSTER, folder]
    node = {"STACK_TEST_NODE_ONLY": "the node's", "METAFLOW_DEFAULT_METADATA": "service"}  # (the run's: local)
    cluster = subprocess.Popen(line, env={**quiet, **auth, **node}, stdout=subprocess.PIPE, text=True)
    try:
        address = cluster.stdout.readline().strip()
        assert address, "the test's Ray cluster did not start"
        env = {**auth, "RAY_ADDRESS": address, "STACK_TEST_HOST_ONLY": "this machine's", "POOL_FLOW_FLAKY": "1"}
        done = run_flow(tmp_path, "--n", "3", env=env, backend="ray")
        assert done.returncode == 0, done.stderr[-3000:]
        run = facts(tmp_path)
        assert run["squares"] == [0, 1, 4] and [item["attempt"] for item in run["items"]] == [0, 1, 0]
        values = [item["values"] for item in run["items"]]
        assert all(v["host_only"] == "None" and v["node_only"] == repr("the node's") for v in values), values
        assert all(v["metadata_setting"] == repr("local") for v in values), values  # (the run's settings, at import)
        assert all(item["worker"] and item["worker"].startswith("each@") for item in run["items"]), run["items"]
    finally:
        cluster.terminate()
        cluster.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
    assert not none_left()


@pytest.mark.parametrize("backend", ["local", "redis", "ray"])
def test_a_slow_item_holds_no_other_back(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """One item takes 3 s: the other worker takes the rest as it frees up (the Redis workers claim one
    task at a time; the fork server gives each waiting task the next free slot)."""
    env = {"POOL_FLOW_SLOW": "0", **backend_env(backend, request, tmp_path)}
    done = run_flow(tmp_path, env=env, backend=backend)
    assert done.returncode == 0, done.stderr[-3000:]
    workers = [item["worker"] for item in facts(tmp_path)["items"]]
    slow, others = workers[0], workers[1:]
    assert sum(worker != slow for worker in others) >= 4, workers


def test_failures_stay_per_item_and_resume_reuses_the_rest(tmp_path: Path) -> None:
    """An item killed mid-attempt is retried alone; an item failing every attempt fails the run with its
    traceback in its own stderr; resume runs only that item again."""
    failed = run_flow(tmp_path, env={"POOL_FLOW_KILL": "1", "POOL_FLOW_FAIL": "3"})
    assert failed.returncode != 0
    run = facts(tmp_path)
    assert not run["successful"]
    by_index = {item["index"]: item for item in run["items"]}
    assert by_index[1]["successful"] and by_index[1]["attempt"] == 1
    assert not by_index[3]["successful"] and by_index[3]["attempt"] == 1
    assert "Traceback" in by_index[3]["stderr"] and "RuntimeError: item-3 failed on attempt 1" in by_index[3]["stderr"]
    assert all(by_index[i]["successful"] and by_index[i]["attempt"] == 0 for i in (0, 2, 4, 5))

    resumed = run_flow(tmp_path, command="resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = facts(tmp_path)
    assert again["id"] != run["id"] and again["successful"]
    assert again["squares"] == [0, 1, 4, 9, 16, 25]
    assert [item["cloned"] for item in again["items"]] == [True, True, True, False, True, True]
    assert not pool_processes()


def test_resume_over_an_absorbed_kubernetes_keeps_the_origin_run(
    tmp_path: Path, request: pytest.FixtureRequest, s3_bucket: str
) -> None:
    """Resume of a pool over ``@kubernetes`` clones the items that succeeded and runs the failed one again
    on the pool's pods, as a task of the resumed run naming its origin run (the absorbed decorator's
    command is undone without dropping what Metaflow put on the line)."""
    env = backend_env("kubernetes", request, tmp_path)
    s3_root, flow = f"{s3_bucket}/pools-{uuid.uuid4().hex[:8]}", "kubernetes_pool_flow.py"
    failed = run_flow(tmp_path, pooled=False, env={**env, "POOL_FLOW_FAIL": "3"}, flow=flow, s3_root=s3_root)
    assert failed.returncode != 0
    first = facts(tmp_path, "KubernetesPoolFlow")
    resumed = run_flow(tmp_path, pooled=False, env=env, flow=flow, command="resume", s3_root=s3_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = facts(tmp_path, "KubernetesPoolFlow")
    assert again["successful"] and again["squares"] == [0, 1, 4, 9]
    assert [item["cloned"] for item in again["items"]] == [True, True, True, False]
    rerun = again["items"][3]
    assert rerun["worker"] and rerun["worker"].startswith("mf-pool-each-") and rerun["origin_run"] == first["id"]
    assert not pods_left(env) and not pool_keys(env[URL_VARIABLE])


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_a_pooled_task_takes_the_flows_own_options(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """@project's --branch and a Config's --config-value are options of the flow's own command line, which
    Metaflow builds once per process: the pool's tasks take them as plain tasks do."""
    env = backend_env(backend, request, tmp_path)
    options = ("--branch", "ci", "--config-value", "settings", '{"scale": 10}')
    done = run_flow(tmp_path, flow="project_pool_flow.py", backend=backend, env=env, top=options)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run = facts(tmp_path, "ProjectPoolFlow")
    workers = [item["worker"] for item in run["items"]]
    assert run["values"] == [10, 20, 30] and "project_branch:test.ci" in run["tags"]
    assert len(workers) == 3 and all(workers), workers


#: ``caught_flow.py``'s items that hang (until their timeout) and that fail.
CAUGHT = {"POOL_FLOW_HANG": "2", "POOL_FLOW_FAIL": "4"}


def test_a_pooled_item_ends_as_its_own_process_would(tmp_path: Path) -> None:
    """A pooled item is a forked child of the pool, not a new interpreter, yet what Python's start and exit
    do for a task process holds for it: a write to a closed pipe raises (SIGPIPE ignored, not fatal), and
    its atexit callbacks (its own, and those of what the flow's file imported, in the pool), its threads
    and its executors' work all run to their end before it exits."""
    marked, tracked = {}, {}
    for pooled in (False, True):
        root, exits = tmp_path / f"pooled-{pooled}", tmp_path / f"exits-{pooled}"
        root.mkdir()
        exits.mkdir()
        shutil.copy(FLOWS / "pool_flow_tracker.py", root)
        done = run_flow(root, "--n", "2", pooled=pooled, env={"POOL_FLOW_EXITS": str(exits)})
        assert done.returncode == 0, done.stderr[-3000:]
        marked[pooled] = sorted(path.name for path in exits.iterdir() if path.name != "tracker.log")
        tracked[pooled] = sorted((exits / "tracker.log").read_text().split())
    assert marked[True] == marked[False] == [f"{kind}-{i}" for kind in ("atexit", "executor", "thread") for i in (0, 1)]
    assert tracked[True] == tracked[False] == ["each", "each", "end", "join", "start"]


def test_a_task_whose_output_cannot_be_flushed_as_it_ends_ends_there(tmp_path: Path) -> None:
    """A task that ends with output still buffered for a reader that has gone (SIGPIPE ignored: the flush
    raises) exits with the interpreter's own status for it, and nothing of it runs on past its end as a
    copy of its pool."""
    wait = 'while not os.path.exists("gone"):\n    time.sleep(0.01)\n'
    (tmp_path / "task.py").write_text(f'import os, sys, time\nsys.stdout.write("left unended")\n{wait}')
    script = f"""
import os, time
from metaflow_stack.pool.child import Task, fork_task
out_read, out_write = os.pipe()
task = Task({sys.executable!r}, [{sys.executable!r}, "task.py"], dict(os.environ), {str(tmp_path)!r})
try:
    pid = fork_task(task, (out_write, 2), "w")
except OSError:  # (as the fork server takes a fork that failed)
    pid = 0
if pid:
    time.sleep(0.5)
    os.close(out_read)  # (the reader gone, the task's line still in its buffer)
    open({str(tmp_path / "gone")!r}, "w").close()
with open({str(tmp_path / "said")!r}, "a") as said:  # (a task running on as a copy of its pool would say it too)
    said.write("the pool goes on\\n")
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) if pid else None
with open({str(tmp_path / "said")!r}, "a") as said:
    said.write(f"status {{status}}\\n")
"""
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=buffered)
    assert (tmp_path / "said").read_text().splitlines() == ["the pool goes on", "status 120"], done.stderr


def test_a_trampoline_whose_task_was_killed_outright_ends_the_same_way(tmp_path: Path) -> None:
    """A task the kernel killed (SIGKILL: the out-of-memory killer, ``kill -9``) ends its trampoline by the
    same signal, so the runtime reads what happened to the task, not a failure of the trampoline's own."""
    import socket
    import threading

    address = tmp_path / "pool.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(address))
        listener.listen()

        def answer() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(1 << 16)
                connection.sendall(trampoline.reply(-signal.SIGKILL))

        server = threading.Thread(target=answer, daemon=True)
        server.start()
        line = trampoline_command(address, os.getpid(), [sys.executable, "f.py"])
        done = subprocess.run(line, capture_output=True, text=True, timeout=30)
        server.join(timeout=10)
    assert (done.returncode, done.stderr) == (-signal.SIGKILL, "")


def test_catch_and_timeout_apply_to_one_item(tmp_path: Path) -> None:
    """With @worker_pool written on the step: @timeout kills only the hanging item's attempts, @catch
    records the failures of only those items, and the run goes on."""
    caught_per_item(run_flow(tmp_path, pooled=False, flow="caught_flow.py", env=CAUGHT), tmp_path)


@pytest.mark.parametrize("backend", ["redis", "ray"])
def test_catch_and_timeout_apply_to_one_item_in_the_steps_environment(
    tmp_path: Path, step_python: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """The same where each worker hands its tasks to a fork server of its own under the step's environment
    (``slot``): a timed-out attempt and a failing one fail alone, their status back through the worker, and
    their retries run there too (the environment as in
    ``test_a_pooled_pypi_step_runs_in_the_environment_metaflow_made``: a task under any other interpreter
    would be refused)."""
    wrapper = (str(FLOWS / "made_environment.py"), str(step_python.parents[1]))
    env = {**CAUGHT, "POOL_FLOW_BACKEND": backend, **backend_env(backend, request, tmp_path)}
    top = ("--environment", "pypi")
    done = run_flow(tmp_path, pooled=False, flow="caught_flow.py", env=env, top=top, wrapper=wrapper)
    caught_per_item(done, tmp_path)


def caught_per_item(done: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    """``caught_flow.py`` with ``CAUGHT``: only its hanging and failing items failed, each once, then was
    caught; every item ran in the pool."""
    assert done.returncode == 0, done.stderr[-3000:]
    run = facts(tmp_path, "CaughtFlow")
    assert run["successful"]
    assert run["squares"] == [0, 1, None, 9, None, 25]
    assert [bool(e) for e in run["errors"]] == [False, False, True, False, True, False]
    assert "Timeout" in run["errors"][2] and "item 4 failed" in run["errors"][4]
    # Each failing item retried once, in the pool, where @catch took its last attempt's exception.
    assert [item["attempt"] for item in run["items"]] == [0, 0, 1, 0, 1, 0]
    assert all(item["worker"] for item in run["items"])


#: A pool's processes while two items run, and their folders, by backend ("-environment": the step has an
#: environment of its own): local: the fork server and its two items; redis: a dispatcher, two workers and
#: their two items (in a step's environment, their items under a fork server of each worker's own, in a
#: folder of its own); ray: a dispatcher, each actor's fork server (a folder each) and their two items;
#: kubernetes: a dispatcher, two pods and their two items.
STOPPING = {"local": (3, 1), "redis": (5, 1), "ray": (5, 3), "kubernetes": (5, 1), "redis-environment": (7, 3)}


@pytest.mark.parametrize(
    ("pool_kind", "stop"),
    [(kind, stop) for kind in STOPPING for stop in (signal.SIGINT, signal.SIGTERM)],
    ids=[f"{kind}-{stop}" for kind in STOPPING for stop in ("ctrl-c", "sigterm")],
)
def test_stopping_the_run_leaves_no_worker_behind(
    tmp_path: Path, pool_kind: str, stop: signal.Signals, request: pytest.FixtureRequest
) -> None:
    """Ctrl-C (the runtime stops the pool) or SIGTERM (the runtime dies; the pool sees its pipe close):
    no process (a Ray the pool started, the pods included), folder or queue key of the pool is left."""
    backend, own = pool_kind.split("-")[0], pool_kind.endswith("-environment")
    env = backend_env(backend, request, tmp_path)
    runtime = start_busy_run(tmp_path, backend, env, request.getfixturevalue("step_python") if own else None)
    try:
        pool = pool_processes(POOL_MARKS)
        assert len(pool) == STOPPING[pool_kind][0], [p.cmdline() for p in pool]
        folders = {Path(part).parent for p in pool for part in p.cmdline() if part.endswith("pool.sock")}
        assert len(folders) == STOPPING[pool_kind][1]
        if URL_VARIABLE in env:  # the URL (it may hold a password) is in their environment, not on command lines
            assert not any(env[URL_VARIABLE] in " ".join(p.cmdline()) for p in pool)
        runtime.send_signal(stop)
        runtime.wait(timeout=60)
    finally:
        runtime.kill()
    _, alive = psutil.wait_procs(pool, timeout=40)
    assert not alive, still_there(alive)
    assert not none_left()
    assert not pods_left(env)
    assert not any(folder.exists() for folder in folders)
    if URL_VARIABLE in env:
        assert not pool_keys(env[URL_VARIABLE])


def test_a_pools_pods_are_deleted_where_they_run_when_the_user_switches_clusters(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """kubectl's current context is pinned as the pool starts: switched to another cluster while the items
    ran, the pods were deleted there (finding none) and kept running, on GPUs it may be, where they were."""
    env = backend_env("kubernetes", request, tmp_path)
    runtime = start_busy_run(tmp_path, "kubernetes", env)
    try:
        assert len(pods_left(env)) == 1
        kubectl = [str(KUBECTL_DOUBLE / "kubectl"), "config", "use-context", "another-cluster"]
        subprocess.run(kubectl, env={**os.environ, **env}, check=True, capture_output=True, timeout=30)
        (tmp_path / "release").touch()
        output, _ = runtime.communicate(timeout=300)
    finally:
        runtime.kill()
    assert runtime.returncode == 0, output[-3000:]
    assert not pods_left(env)  # (the cluster the pool started on)
    assert not none_left()


def _answer_once(listener: Any, received: list[bytes]) -> Any:
    """A thread in the pool's place: it takes one trampoline's request on ``listener`` (what it sent, whole, into
    ``received``: nothing where it sent nothing) and answers exit status 0."""
    import threading

    def answer() -> None:
        connection, _ = listener.accept()
        with connection:
            body = b""
            while chunk := connection.recv(1 << 16):
                body += chunk
                if len(body) >= 4 and len(body) >= 4 + int.from_bytes(body[:4], "big"):  # (the whole request)
                    break
            received.append(body)
            with contextlib.suppress(BrokenPipeError):  # (a refusing trampoline is gone already)
                connection.sendall(trampoline.reply(0))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_PEERCRED is Linux's")
def test_a_trampoline_hands_its_task_to_the_pools_process_only(tmp_path: Path) -> None:
    """Another process listening on the pool's socket (a task of a sandboxed pool can write its folder)
    gets neither the task's environment nor its output: the trampoline checks who answers."""
    import socket

    address = tmp_path / "pool.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(address))
        listener.listen()
        received: list[bytes] = []
        for peer, code in ((1, 1), (os.getpid(), 0)):  # pid 1 is not this test: refused; this test: served
            server = _answer_once(listener, received)
            line = trampoline_command(address, peer, [sys.executable, "f.py"])
            done = subprocess.run(line, capture_output=True, text=True, timeout=30, env={"SECRET": "s"})
            assert done.returncode == code, done.stderr
            if code:
                assert f"answers, not the pool's {peer}" in done.stderr
                server.join(timeout=10)
                assert received == [b""] or not any(b"SECRET" in r for r in received)
                received.clear()
            else:
                server.join(timeout=10)
                assert b"SECRET=s" in received[0]


def test_a_trampoline_hands_a_sandboxed_or_remote_pool_only_the_variables_it_names(tmp_path: Path) -> None:
    """Where ``PASSED_VARIABLE`` names what a task takes (a ``@devcontainer`` pool, workers on Kubernetes or
    Nomad), the trampoline sends only those: the whole environment reached the sandbox's fork server, whose
    forked tasks hold its heap (the host's credentials could be read from a task's memory), and the queue
    and other machines."""
    import socket

    from metaflow_stack.pool.contained import PASSED_VARIABLE

    address = tmp_path / "pool.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(address))
        listener.listen()
        received: list[bytes] = []
        server = _answer_once(listener, received)
        env = {"SECRET": "host's", "METAFLOW_INPUT_PATHS_0": "p", PASSED_VARIABLE: "METAFLOW_INPUT_PATHS_0,GONE"}
        line = trampoline_command(address, os.getpid(), [sys.executable, "f.py"])
        done = subprocess.run(line, capture_output=True, text=True, timeout=30, env=env)
        server.join(timeout=10)
    assert done.returncode == 0, done.stderr
    _, _, sent, _ = trampoline.decode(received[0][4:])
    assert sent == {"METAFLOW_INPUT_PATHS_0": "p", PASSED_VARIABLE: "METAFLOW_INPUT_PATHS_0,GONE"}
    assert trampoline.PASSED.decode() == PASSED_VARIABLE


def test_the_trampolines_folder_shadows_no_module_of_pythons_own() -> None:
    """The trampoline runs with its folder, this package's, first on its path (``local.trampoline_command``): a
    module there named as one of Python's own would replace it, in the trampoline and in what Python itself
    imports (printing a traceback, say)."""
    folder = Path(TRAMPOLINE_FOLDER)
    names = {path.stem for path in folder.iterdir() if path.suffix == ".py" or (path / "__init__.py").exists()}
    assert not names & set(sys.stdlib_module_names)


def test_a_request_reads_the_same_whether_its_fields_were_text_or_the_bytes_the_trampoline_sends() -> None:
    """The trampoline sends its environment and folder as the kernel gave them (``posix``: it imports no
    ``os``); the pool's own hand-overs (``slot``) send text. Both decode to the same task, undecodable bytes
    included."""
    odd = b"caf\xe9"  # (not UTF-8: kept through surrogateescape, as os.fsencode and os.fsdecode do)
    as_bytes = trampoline.encode("python3", ["python3", "f.py"], {b"A": b"1", b"ODD": odd}, b"runs-" + odd)
    as_text = trampoline.encode(
        "python3", ["python3", "f.py"], {"A": "1", "ODD": os.fsdecode(odd)}, "runs-" + os.fsdecode(odd)
    )
    assert as_bytes == as_text
    python, command, env, cwd = trampoline.decode(as_bytes[4:])
    assert (python, command, cwd) == ("python3", ["python3", "f.py"], "runs-" + os.fsdecode(odd))
    assert env == {"A": "1", "ODD": os.fsdecode(odd)}


def test_counts_that_cannot_be_written_are_no_error(tmp_path: Path) -> None:
    """The counts are for the progress display: a pool whose counts file cannot be made (a full disk, no
    inodes: here, a folder in its place) goes on running and answering its tasks; the runtime reads none."""
    from metaflow_stack.pool.counts import Counts, CountsFile

    path = tmp_path / "pool.counts"
    path.mkdir()
    CountsFile(path).write(Counts(done=2))
    assert Counts.read(path) is None


def test_counts_are_rewritten_in_place_and_a_torn_record_reads_as_none(tmp_path: Path) -> None:
    """One file, its record rewritten where it is (a new file per write cost a journal transaction each);
    a record caught mid-write, or cut short, fails its checksum and reads as none, never wrong counts: the
    pool's folder then gives the last counts it read."""
    from metaflow_stack.pool.counts import RECORD_BYTES, Counts, CountsFile
    from metaflow_stack.pool.processes import PoolFolder

    path = tmp_path / "pool.counts"
    counts = CountsFile(path)
    counts.write(Counts(queued=3))
    inode = path.stat().st_ino
    counts.write(Counts(running=1, done=12345, failed=2))
    assert Counts.read(path) == Counts(running=1, done=12345, failed=2)
    assert path.stat().st_ino == inode and path.stat().st_size == RECORD_BYTES
    torn = bytearray(path.read_bytes())
    torn[16:24] = Counts(done=99999).record()[16:24]  # the new done beside the old checksum
    path.write_bytes(bytes(torn))
    assert Counts.read(path) is None
    path.write_bytes(Counts(done=5).record()[:20])
    assert Counts.read(path) is None
    folder = PoolFolder(str(tmp_path))
    CountsFile(folder.address.with_suffix(".counts")).write(Counts(done=3))
    assert folder.counts() == Counts(done=3)
    folder.address.with_suffix(".counts").write_bytes(b"torn")
    assert folder.counts() == Counts(done=3)


def test_counts_that_are_not_a_regular_file_read_as_none_at_once(tmp_path: Path) -> None:
    """A sandboxed pool's tasks can write its folder: the runtime's progress never waits on what is there."""
    from metaflow_stack.pool.counts import Counts, CountsFile

    fifo = tmp_path / "pool.counts"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    assert Counts.read(fifo) is None
    CountsFile(tmp_path / "real.counts").write(Counts(queued=2, done=1))
    assert Counts.read(tmp_path / "real.counts") == Counts(queued=2, done=1)
    (tmp_path / "link.counts").symlink_to(tmp_path / "real.counts")
    assert Counts.read(tmp_path / "link.counts") is None
    CountsFile(tmp_path / "link.counts").write(Counts(done=7))  # (the pool's end follows no link either)
    assert Counts.read(tmp_path / "real.counts") == Counts(queued=2, done=1)


def test_a_pool_is_ready_only_when_it_says_so_whatever_the_flows_file_prints(tmp_path: Path) -> None:
    """The flow's file runs as the fork server imports it, and may print without ending its line (a progress
    bar, say): the server's ``ready`` is still read, on a line of its own (it once ended that line instead, and
    the pool failed after its whole start timeout). A line that says only ``ready``, printed before the server
    listens, is not taken for it."""
    flow = tmp_path / "chatty_flow.py"
    chatter = "import time\nprint('ready')\ntime.sleep(2)\nprint('loading the model', end='')\n"
    flow.write_text(chatter + (FLOWS / "pool_flow.py").read_text())
    pool = LocalPool(str(flow), 1, "chatty")
    pool.start()
    try:
        assert pool.address().exists()  # (raises, naming the 120 s start timeout, where ready goes unread)
    finally:
        pool.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's PF_EXITING is Linux's")
def test_a_pool_process_killed_is_not_alive_once_its_connections_end(tmp_path: Path) -> None:
    """A killed pool process closes its connections before it can be reaped: the retries its trampolines
    set off must not find it alive in that moment (it was, often, by its exit status alone)."""
    import socket

    from metaflow_stack.pool.processes import PoolProcess

    address = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(address))
        listener.listen()
        for _ in range(20):
            code = "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            code += "from metaflow_stack.pool.processes import say_ready; say_ready(); time.sleep(60)"
            process = PoolProcess(code, [str(address)], tmp_path / "log")
            process.wait_ready("the test process")
            connection, _ = listener.accept()
            with connection:
                assert process.alive()
                process.process.kill()
                assert connection.recv(1) == b""
                assert not process.alive()
            process.process.wait()


def test_a_nested_foreachs_progress_counts_the_items_of_every_outer_item(tmp_path: Path) -> None:
    done = run_flow(tmp_path, flow="nested_pool_flow.py")
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert "values [10, 11, 12, 20, 21, 22]" in said
    assert "worker pool mid: 2/2 done" in said and "worker pool each: 6/6 done" in said, said[-3000:]


def test_a_request_sent_a_byte_at_a_time_is_dropped_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork server reads a hand-over before it takes anything else: a peer sending its request a byte
    now and then held it for as long as it kept sending (the time limit was per read). The whole request
    now has the limit."""
    import socket
    import threading

    monkeypatch.setattr(handover, "RECEIVE_TIMEOUT_S", 1.0)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    request = trampoline.encode(sys.executable, [sys.executable, "flow.py"], {}, "/")
    sent = threading.Event()

    def drip() -> None:
        with open(os.devnull, "rb") as devnull:
            socket.send_fds(theirs, [request[:8]], [devnull.fileno(), devnull.fileno()])
        for byte in request[8:]:
            if sent.wait(0.2):
                return
            with contextlib.suppress(OSError):
                theirs.send(bytes([byte]))

    dripping = threading.Thread(target=drip)
    dripping.start()
    started = time.monotonic()
    try:
        with pytest.raises(ValueError, match="not whole after 1s"):
            handover.receive(ours)
        assert time.monotonic() - started < 2.5
    finally:
        sent.set()
        dripping.join()
        ours.close()
        theirs.close()


def test_a_new_pool_removes_the_folders_of_pools_whose_runtime_is_gone(tmp_path: Path) -> None:
    """A runtime killed outright with its pool leaves the pool's folder (its logs; a Ray pool's session): the
    next pool's start removes it, and leaves a live pool's, one with no lock (being made, or an older
    release's) and what a link points at."""
    hold = "import sys, time; from metaflow_stack.pool.processes import PoolFolder; "
    hold += "print(PoolFolder(sys.argv[1]).path, flush=True); time.sleep(600)"
    owners = [
        subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        folders = [Path(owner.stdout.readline().strip()) for owner in owners]
        (folders[0] / "pool.log").write_text("what its fork server said\n")
        owners[0].kill()
        owners[0].wait()
        unlocked = tmp_path / "mf-pool-older"
        unlocked.mkdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / OWNER_LOCK).touch()
        (tmp_path / "mf-pool-link").symlink_to(elsewhere)
        new = PoolFolder(str(tmp_path))
        assert not folders[0].exists()
        assert folders[1].exists() and unlocked.exists() and (elsewhere / OWNER_LOCK).exists()
    finally:
        for owner in owners:
            owner.kill()
            owner.wait()
    new.remove()
    assert not new.path.exists()
    PoolFolder(str(tmp_path)).remove()  # (its owner gone now)
    assert not folders[1].exists()


def test_a_pool_killed_mid_run_comes_back_and_its_items_run_again(tmp_path: Path) -> None:
    """The pool's process killed outright while items run: its tasks die with it, every item it held
    fails that attempt, @retry runs them again on a pool started afresh, and the run succeeds."""
    runtime = start_busy_run(tmp_path)
    try:
        server = next(p for p in pool_processes(POOL_MARKS[:1]) if p.ppid() == runtime.pid)
        tasks = server.children()
        assert len(tasks) == 2
        server.kill()
        _, alive = psutil.wait_procs(tasks, timeout=30)  # the kernel kills them with their parent
        assert not alive
        (tmp_path / "release").touch()
        output = runtime.stdout.read()
        assert runtime.wait(timeout=300) == 0, output
    finally:
        runtime.kill()
    # The progress goes on from what the pool that died had done: its attempts count as failed.
    counted = re.search(r"worker pool each: 6/6 done, 0 running, 0 queued, (\d+) failed attempts", output)
    assert counted and int(counted[1]) >= 2, output[-3000:]
    run = facts(tmp_path)
    assert run["successful"] and run["squares"] == [0, 1, 4, 9, 16, 25]
    # The runtime had handed all six items to the pool (two running, four waiting): each ran again.
    assert [item["attempt"] for item in run["items"]] == [1] * 6
    lost = [item["index"] for item in run["items"] if "worker pool stopped before" in item["first_stderr"]]
    assert len(lost) >= 2, lost  # the two that ran say why their first attempt failed
    assert not pool_processes()


@pytest.mark.parametrize(
    ("backend", "said"),
    [("redis", "stopped answering"), ("ray", "the Ray worker running this task was lost")],
)
def test_a_worker_lost_mid_item_fails_only_that_attempt(
    tmp_path: Path, backend: str, said: str, request: pytest.FixtureRequest
) -> None:
    """A worker killed mid-item (redis: a worker process, which stops renewing its lease; ray: an actor's
    process, whose fork server and task die with it): that attempt fails, @retry runs the item again on
    another worker, and the run ends with no key and no process of the pool left."""
    env = backend_env(backend, request, tmp_path)
    runtime = start_busy_run(tmp_path, backend, env)
    try:
        if backend == "redis":
            workers = [p for p in pool_processes(POOL_MARKS[2:]) if p.ppid() == runtime.pid]
        else:
            workers = [p for p in pool_processes(RAY_MARKS[:1]) if p.children()]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[0].kill()  # its task dies with it
    except BaseException:
        runtime.kill()
        raise
    one_item_retried(runtime, tmp_path, said)
    if backend == "redis":
        assert not pool_keys(env[URL_VARIABLE])
    assert not none_left()


def released(runtime: subprocess.Popen, root: Path) -> dict:
    """Release ``start_busy_run``'s items, see the run succeed with every item's square (the runtime is killed
    if it does not end), and return its ``facts``."""
    try:
        (root / "release").touch()
        rest = runtime.stdout.read()
        assert runtime.wait(timeout=300) == 0, rest[-3000:]
    finally:
        runtime.kill()
    run = facts(root)
    assert run["successful"] and run["squares"] == [0, 1, 4, 9, 16, 25]
    return run


def one_item_retried(runtime: subprocess.Popen, root: Path, said: str) -> None:
    """Release ``start_busy_run``'s items and see the run succeed with one item retried, its first attempt's
    stderr saying ``said``."""
    run = released(runtime, root)
    retried = [item for item in run["items"] if item["attempt"] == 1]
    assert len(retried) == 1, [item["attempt"] for item in run["items"]]
    assert said in retried[0]["first_stderr"]


def test_a_fork_server_out_of_descriptors_waits_rather_than_spins(tmp_path: Path) -> None:
    """A fork server that cannot accept (no descriptor left) found its listener readable again at once and
    spun a core, a log line each turn: it now pauses, says so once, and takes the task once it can."""
    import socket

    runtime = start_busy_run(tmp_path)
    try:
        (server,) = [p for p in pool_processes(POOL_MARKS[:1]) if p.ppid() == runtime.pid]
        (listening,) = {c.laddr for c in server.net_connections(kind="unix") if c.laddr}  # (accepted ones too)
        limits = server.rlimit(psutil.RLIMIT_NOFILE)
        for _ in range(3):
            taken = {int(fd) for fd in os.listdir(f"/proc/{server.pid}/fd")}
            lowest_free = next(n for n in range(len(taken) + 1) if n not in taken)
            # (not one more: a new descriptor takes the lowest free number, so a limit at the count would still
            # let one in where the server's descriptors leave a gap below it)
            server.rlimit(psutil.RLIMIT_NOFILE, (lowest_free, limits[1]))
            with open(f"/proc/{server.pid}/fd/2", "rb") as log:  # (its log, read from where it is now)
                log.seek(0, os.SEEK_END)
                caller = socket.socket(socket.AF_UNIX)
                caller.connect(listening)
                used = sum(server.cpu_times()[:2])
                time.sleep(3)
                spent = sum(server.cpu_times()[:2]) - used
                server.rlimit(psutil.RLIMIT_NOFILE, limits)
                caller.close()
                said = log.read().decode(errors="replace")
            # The busy run's tasks come and go: one that ended between the look and the limit freed a number
            # below it, and the caller was let in (and, sending nothing, refused): the look is taken again.
            if "unreadable request" not in said:
                break
        assert spent < 0.6, f"the fork server spent {spent:.1f} s of CPU in 3 s waiting for a descriptor"
        assert said.count("cannot accept now") == 1, said[-2000:]
    except BaseException:
        runtime.kill()
        raise
    released(runtime, tmp_path)


def test_a_workers_fork_server_killed_mid_item_comes_back(
    tmp_path: Path, step_python: Path, request: pytest.FixtureRequest
) -> None:
    """A Redis worker's own fork server (the step has an environment of its own) killed outright mid-item:
    that attempt fails saying so, the worker starts a fork server again before it claims another item, and
    @retry runs the item again."""
    env = backend_env("redis", request, tmp_path)
    runtime = start_busy_run(tmp_path, "redis", env, step_python)
    try:
        workers = [p for p in pool_processes(POOL_MARKS[2:]) if p.ppid() == runtime.pid]
        servers = [child for worker in workers for child in worker.children()]
        assert len(workers) == 2 and len(servers) == 2, [p.cmdline() for p in workers + servers]
        servers[0].kill()  # its task dies with it
        known, again, deadline = {server.pid for server in servers}, [], time.monotonic() + 120
        while not again and time.monotonic() < deadline:
            time.sleep(0.5)
            again = [child for worker in workers for child in worker.children() if child.pid not in known]
        assert again, "the worker started no fork server again"
    except BaseException:
        runtime.kill()
        raise
    one_item_retried(runtime, tmp_path, "fork server ended before the task did")
    assert not pool_keys(env[URL_VARIABLE])
    assert not none_left()


@pytest.mark.parametrize(
    ("backend", "variable", "value", "words"),
    [
        ("redis", URL_VARIABLE, "redis://:sekrit@{}/0", ["no Redis at redis://:(hidden)@127.0.0.1:", "just up --with"]),
        ("redis", URL_VARIABLE, ":sekrit@{}/0", [f"{URL_VARIABLE}) is not one redis-py", "redis://[:password@]"]),
        ("redis", URL_VARIABLE, "redis://:sekrit#x@{}/0", ["is not one redis-py can read", "%23"]),
        (
            "redis",
            URL_VARIABLE,
            "redis://{}/0",
            ["Redis URL has no password", "METAFLOW_STACK_POOL_REDIS_NO_PASSWORD=1"],
        ),
        ("ray", "RAY_ADDRESS", "{}", ["no Ray at 127.0.0.1:", "ray start --head"]),
    ],
)
def test_a_pool_with_nothing_to_reach_fails_in_one_line(
    tmp_path: Path, backend: str, variable: str, value: str, words: list[str]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    done = run_flow(tmp_path, backend=backend, env={variable: value.format(address)})
    assert done.returncode != 0
    assert all(word in done.stderr for word in words), done.stderr[-2000:]
    assert "sekrit" not in done.stdout + done.stderr  # a password in the URL is never shown
    assert "Traceback" not in done.stderr
    assert not none_left()


def test_a_redis_pool_takes_the_stacks_redis_when_none_is_named(tmp_path: Path) -> None:
    """No URL named: the stack's Redis (``just up --with redis``: its password in the state folder), else one
    line naming the ways to have one; never a Redis without a password, which any local user could reach."""
    state = tmp_path / "state"
    env = {URL_VARIABLE: "", "METAFLOW_STACK_STATE_DIR": str(state), "METAFLOW_STACK_REDIS_PORT": str(free_port())}
    done = run_flow(tmp_path, backend="redis", env=env)
    assert done.returncode != 0 and "the redis worker pool has no Redis: none is named" in done.stderr
    assert "just up --with redis" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    (state / "redis").mkdir(parents=True)
    (state / "redis" / "password").write_text("sekrit")
    done = run_flow(tmp_path, backend="redis", env=env)
    assert f"no Redis at redis://:(hidden)@127.0.0.1:{env['METAFLOW_STACK_REDIS_PORT']}/0" in done.stderr
    assert "sekrit" not in done.stdout + done.stderr and not none_left()


def test_a_kubernetes_pool_without_kubectl_fails_in_one_line(tmp_path: Path, redis_url: str) -> None:
    path = str(VENV_BIN)  # (this machine's kubectl, if any, is in a system folder)
    if shutil.which("kubectl", path=path):
        pytest.skip("kubectl is installed beside Python, where the test cannot hide it")
    env = {URL_VARIABLE: redis_url, "PATH": path, "METAFLOW_STACK_POOL_IMAGE": "metaflow-stack/base:test"}
    done = run_flow(tmp_path, backend="kubernetes", env=env)
    assert done.returncode != 0
    assert "kubectl is not on PATH" in done.stderr and "fix: install kubectl" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not none_left() and not pool_keys(redis_url)


def test_kubernetes_pods_that_cannot_start_fail_the_step_in_one_line(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Pods that crash (here: they cannot reach Redis at the pods' URL) fail the step at its first item
    with the pod's reason and its last line, not after minutes; nothing is left."""
    env = backend_env("kubernetes", request, tmp_path)
    env["METAFLOW_STACK_POOL_POD_REDIS_URL"] = f"redis://:sekrit@127.0.0.1:{free_port()}/0"
    done = run_flow(tmp_path, backend="kubernetes", env=env)
    assert done.returncode != 0
    assert "the pool's pods did not become ready" in done.stderr and "CrashLoopBackOff" in done.stderr
    assert "ConnectionError" in done.stderr and "fix: kubectl --namespace default get events" in done.stderr
    assert "Traceback" not in done.stderr
    assert not none_left() and not pods_left(env) and not pool_keys(env[URL_VARIABLE])


def test_kubernetes_pods_the_cluster_refuses_to_make_fail_the_step_at_once_with_its_reason(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A namespace's quota refuses the pods (no pod appears to say why): the step fails with the quota's words
    at once, not after the 300 s the pods have to become ready, and nothing is left."""
    env = backend_env("kubernetes", request, tmp_path)
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "team-quota"},
             "spec": {"hard": {"requests.cpu": "1"}}}  # fmt: skip
    kubectl = [str(KUBECTL_DOUBLE / "kubectl"), "apply", "--namespace", "default", "-f", "-"]
    subprocess.run(kubectl, input=json.dumps(quota), text=True, env={**os.environ, **env}, check=True, timeout=30)
    started = time.monotonic()
    done = run_flow(tmp_path, "--with", "resources:cpu=2", backend="kubernetes", env=env)
    assert done.returncode != 0 and time.monotonic() - started < 120
    assert "the pool's pods did not become ready: the cluster refuses to make them: FailedCreate" in done.stderr
    assert "exceeded quota: team-quota" in done.stderr and "fix: ask for less (@resources)" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not none_left() and not pods_left(env) and not pool_keys(env[URL_VARIABLE])


def test_a_pool_over_kubernetes_runs_its_items_on_pods_with_its_settings(
    tmp_path: Path, request: pytest.FixtureRequest, s3_bucket: str
) -> None:
    """The seed's example, ``@worker_pool(size=2)`` over ``@kubernetes(cpu=2, memory=4096, ...)``: no pod
    per task, but a Deployment of two worker pods with those resources, image, namespace, node selector,
    tolerations and service account, which run every item; the run reads as any other. What this machine's
    Metaflow configuration gives @kubernetes that the pods do not take (labels, here) is said, not dropped
    unsaid."""
    env = {**backend_env("kubernetes", request, tmp_path), "METAFLOW_KUBERNETES_LABELS": "team=ml"}
    env["STACK_TEST_HOST_ONLY"] = "this machine's"  # (as its credentials: never a pod's)
    s3_root = f"{s3_bucket}/pools-{uuid.uuid4().hex[:8]}"
    done = run_flow(tmp_path, pooled=False, env=env, flow="kubernetes_pool_flow.py", s3_root=s3_root)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert "the pool's pods do not take @kubernetes's labels (METAFLOW_KUBERNETES_LABELS), which this" in said
    run = facts(tmp_path, "KubernetesPoolFlow")
    assert run["successful"] and run["squares"] == [0, 1, 4, 9]
    assert all(item["worker"] and item["worker"].startswith("mf-pool-each-") for item in run["items"]), run["items"]
    assert all(item["values"]["host_only"] == "None" for item in run["items"]), run["items"]
    assert all(item["values"]["pool_secrets"] == "''" for item in run["items"]), run["items"]
    applied = [json.loads(line) for line in (tmp_path / "cluster" / "applied.jsonl").read_text().splitlines()]
    assert [entry["namespace"] for entry in applied] == ["pools"]
    deployment = applied[0]["deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2 and pod["nodeSelector"] == {"disk": "ssd"}
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": "4096Mi"}
    assert pod["containers"][0]["image"] == "registry.example/team/pool:1"
    assert pod["serviceAccountName"] == "pool-runner" and pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == [{"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}]
    assert not none_left() and not pods_left(env) and not pool_keys(env[URL_VARIABLE])


def nomad_env(agent, redis_url: str) -> dict[str, str]:
    """What a run with a pool on Nomad needs: the agent (the double here: its raw_exec workers are processes
    of this machine, which reach the same Redis), and the queue."""
    return {
        "NOMAD_ADDR": agent.address,
        **({"NOMAD_TOKEN": agent.token} if agent.token else {}),
        URL_VARIABLE: redis_url,
    }


def test_a_pool_over_nomad_runs_its_items_on_one_jobs_allocations(
    tmp_path: Path, nomad_agent, redis_url: str, s3_bucket: str
) -> None:
    """``@worker_pool(size=2)`` over ``@nomad``: no job per task, but one job of two workers placed as
    ``@nomad`` says, which run every item and are purged with the run; a failed item is retried there."""
    env = {**nomad_env(nomad_agent, redis_url), "POOL_FLOW_FLAKY": "2"}
    s3_root = f"{s3_bucket}/pools-{uuid.uuid4().hex[:8]}"
    done = run_flow(tmp_path, pooled=False, env=env, flow="nomad_pool_flow.py", s3_root=s3_root)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run = facts(tmp_path, "NomadPoolFlow")
    assert run["successful"] and run["squares"] == [0, 1, 4, 9]
    assert [item["attempt"] for item in run["items"]] == [0, 0, 1, 0]
    assert "RuntimeError: item 2 fails on attempt 0" in run["items"][2]["first_stderr"]
    workers = [item["worker"] for item in run["items"]]
    assert all(w and w.startswith("mf-pool-each-") and w.rsplit("/", 1)[1] in ("0", "1") for w in workers), workers
    allocations = {item["values"]["alloc"] for item in run["items"]}
    assert len(allocations) <= 2 and "None" not in allocations, allocations  # (items ran in the job's allocations)
    assert all(item["values"]["pool_secrets"] == "''" for item in run["items"]), run["items"]
    assert "Nomad job" not in done.stdout + done.stderr  # (no job per task: nothing said of one)
    assert not jobs_left(nomad_agent, "mf-pool-") and not none_left() and not pool_keys(redis_url)
    with NomadClient(nomad_agent) as client, pytest.raises(NotFound):  # (the queue's URL went with the job)
        client.variable(variable_path(workers[0].rsplit("/", 1)[0]))


def test_a_nomad_worker_that_cannot_read_its_jobs_variable_says_why_in_one_line(tmp_path: Path) -> None:
    """Its last line is what the runtime reports for a worker that ended before it was ready."""
    from metaflow_stack.pool.redis_pool import WORKER

    env = {**os.environ, "NOMAD_JOB_ID": "mf-pool-each-1", "NOMAD_SECRETS_DIR": str(tmp_path), "NOMAD_TOKEN": "t"}
    line = [
        sys.executable,
        "-c",
        WORKER,
        "mf-pool:1:each",
        "flow.py",
        "mf-pool-each-1/0",
        "--detached",
        "--job-variable",
    ]
    done = subprocess.run(line, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "worker pool: the queue's URL in the Nomad variable nomad/jobs/mf-pool-each-1 could not be read: its agent's "
        "Task API does not answer at $NOMAD_SECRETS_DIR/api.sock (fix: Nomad 1.5 or later, with a data_dir short "
        "enough for a socket's path)"
    )


def test_a_nomad_pools_job_holds_none_of_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever may read a Nomad job sees its spec: the queue's URL (its password) and the metadata service's
    key and headers go into the job's own variable, which only its workers read, and the rest of the run's
    Metaflow settings into the spec."""
    from metaflow_stack.engines.nomad.jobspec import Placement
    from metaflow_stack.pool.nomad_pool import NomadPool

    monkeypatch.setenv("METAFLOW_SERVICE_HEADERS", '{"x-api-key": "header-secret"}')
    monkeypatch.setenv("METAFLOW_SERVICE_AUTH_KEY", "key-secret")
    monkeypatch.setenv("METAFLOW_SERVICE_URL", "http://service.example:8080")
    url = "redis://:url-secret@redis.example:6379/0"
    placement = Placement(driver="raw_exec")
    pool = NomadPool("flow.py", 2, "each", url, "mf-pool:1:each", placement, Settings(address="http://n:4646"))
    job = json.dumps(pool.render())
    assert not [word for word in ("url-secret", "header-secret", "key-secret") if word in job]
    assert "http://service.example:8080" in job and "--job-variable" in job
    assert pool.user is not None and pool.secrets == {
        "METAFLOW_SERVICE_HEADERS": '{"x-api-key": "header-secret"}',
        "METAFLOW_SERVICE_AUTH_KEY": "key-secret",
        URL_VARIABLE: pool.user.url(url),  # (the pool's own Redis user: redis_user)
    }


def test_a_pool_over_nomad_that_nomad_cannot_place_fails_the_step_in_one_line(
    tmp_path: Path, nomad_agent, redis_url: str, s3_bucket: str
) -> None:
    """Workers asking for a GPU no node has: the step fails at its first item with Nomad's reason, and the
    job is purged."""
    decorators = '@worker_pool(size=2)\n    @nomad(driver="raw_exec", cpu=0.5, memory=512, gpu=1)'
    (tmp_path / "bad_flow.py").write_text(BAD.format(decorator_each=decorators, decorator_join=""))
    environment = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "METAFLOW_DEFAULT_METADATA": "local"}
    environment.update(nomad_env(nomad_agent, redis_url))
    root = f"{s3_bucket}/pools-{uuid.uuid4().hex[:8]}"
    line = [sys.executable, "bad_flow.py", "--datastore", "s3", "--datastore-root", root, "run"]
    done = subprocess.run(line, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert "the pool's Nomad workers did not become ready: Nomad cannot place the job" in said, said[-3000:]
    assert "missing devices" in said and "Traceback" not in said
    assert not jobs_left(nomad_agent, "mf-pool-") and not none_left() and not pool_keys(redis_url)


def test_a_pool_over_nomad_whose_workers_cannot_start_fails_the_step_with_their_last_line(
    tmp_path: Path, nomad_agent, redis_url: str, s3_bucket: str
) -> None:
    """The flow cannot be imported where the workers run (in an allocation; the runtime can): the step
    fails at its first item with the worker's last line, and nothing is left."""
    broken = 'import os\nif os.environ.get("NOMAD_ALLOC_ID"):\n'
    broken += '    raise RuntimeError("this worker cannot import the flow")\n'
    decorators = '@worker_pool(size=2)\n    @nomad(driver="raw_exec", cpu=0.5, memory=512)'
    flow = BAD.format(decorator_each=decorators, decorator_join="").replace("class BadFlow", broken + "\nclass BadFlow")
    (tmp_path / "bad_flow.py").write_text(flow)
    environment = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "METAFLOW_DEFAULT_METADATA": "local"}
    environment.update(nomad_env(nomad_agent, redis_url))
    root = f"{s3_bucket}/pools-{uuid.uuid4().hex[:8]}"
    line = [sys.executable, "bad_flow.py", "--datastore", "s3", "--datastore-root", root, "run"]
    done = subprocess.run(line, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert "the pool's Nomad workers did not become ready: worker mf-pool-each-" in said, said[-3000:]
    assert "ended: RuntimeError: this worker cannot import the flow" in said and "Traceback" not in said
    assert not jobs_left(nomad_agent, "mf-pool-") and not none_left() and not pool_keys(redis_url)


def test_nomad_workers_that_say_only_the_older_ready_are_named_when_the_wait_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers that say the bare ``ready`` of an older metaflow-stack (an image= built on an older base image)
    never say this runtime's word: when the wait ends the step's error names the mismatch and its fix,
    where it said only "0 of 1 ready". Not before, and not of a worker that said both: a flow's file may
    print ``ready`` at import (that worker is ready; the wait's end names only the one that never was). On
    the Nomad double (raw_exec jobs, their output read through the allocations' logs), the wait cut short."""
    from devservers import nomad_double

    from metaflow_stack.engines.nomad.jobspec import Placement, workers_job
    from metaflow_stack.errors import StackError
    from metaflow_stack.pool import nomad_pool

    monkeypatch.setattr(nomad_pool, "READY_TIMEOUT_S", 8)
    placement = Placement(driver="raw_exec", cpu=0.1, memory=64)

    def waited(job: str, script: str, size: int) -> StackError:
        spec = workers_job(job, ["sh", "-c", script], {}, placement, {}, size)
        with NomadClient(Settings(address=address)) as client:
            eval_id = client.register(spec)
            try:
                with pytest.raises(StackError) as raised:
                    nomad_pool.wait_for_workers(client, eval_id, job, size)
            finally:
                client.deregister(job)
        return raised.value

    with nomad_double() as address:
        said = waited("mf-pool-older", "echo loading; echo ready; exec sleep 600", 1)
        assert said.message.startswith("0 of 1 ready after 8s: worker mf-pool-older")
        assert "said 'ready', not 'metaflow-stack pool: ready'" in said.message
        assert "older metaflow-stack" in said.message and "leave image= out" in said.fix
        # Worker 0's flow prints "ready" at import, then it says the pool's word; worker 1 never starts.
        both = 'if [ "$NOMAD_ALLOC_INDEX" = 0 ]; then echo ready; sleep 1; echo "metaflow-stack pool: ready"; fi'
        said = waited("mf-pool-slow", both + "; exec sleep 600", 2)
        assert said.message == "1 of 2 ready after 8s" and "older" not in str(said.fix)
        # An older worker refuses the option this runtime gives it (its argparse's last line), at once.
        refused = "echo 'redis_worker: error: unrecognized arguments: --job-variable' >&2; exit 2"
        said = waited("mf-pool-refused", refused, 1)
        assert said.message == "worker mf-pool-refused.step[0] runs an older metaflow-stack than this run"
        assert "leave image= out" in said.fix


@pytest.mark.parametrize(
    ("decorators", "words"),
    [
        ("@kubernetes\n    @worker_pool", "write @worker_pool above @kubernetes"),
        ('@worker_pool(backend="redis")\n    @kubernetes', "with @kubernetes the pool's workers are pods"),
        ('@worker_pool\n    @kubernetes(secrets=["s3"], port=8080)', "not port, secrets"),
        ("@nomad\n    @worker_pool", "write @worker_pool above @nomad"),
        (
            '@worker_pool(backend="ray")\n    @nomad',
            "with @nomad the pool's workers are the allocations of a Nomad job",
        ),
    ],
    ids=["order", "backend", "settings-not-taken", "nomad-order", "nomad-backend"],
)
def test_a_pool_over_kubernetes_or_nomad_set_wrong_fails_in_one_line(
    tmp_path: Path, decorators: str, words: str
) -> None:
    (tmp_path / "bad_flow.py").write_text(BAD.format(decorator_each=decorators, decorator_join=""))
    line = [sys.executable, "bad_flow.py", "--datastore", "s3", "--datastore-root", "s3://nowhere/x", "run"]
    done = subprocess.run(line, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert words in done.stderr and "fix:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Task is starting" not in done.stdout + done.stderr


def execute_one(
    redis_url: str, pool: str, meanwhile: Callable | None = None, relay_s: float = 0.0
) -> tuple[int | None, bytes, float]:
    """One task through the dispatcher's Redis executor on a real Redis, with no worker; ``meanwhile(client,
    queue)`` runs once the task is queued; its first line's relay takes ``relay_s`` (a runtime that reads
    none of the task's output meanwhile). Its status, what it wrote and how long it took."""

    async def scenario() -> tuple[int | None, bytes, float]:
        client = redis.asyncio.Redis.from_url(redis_url)
        queue = RedisQueue(client, f"mf-pool:{pool}:each:")
        written = bytearray()

        async def output(fd: int, data: bytes) -> None:
            if not written:
                await asyncio.sleep(relay_s)
            written.extend(data)

        loop = asyncio.get_running_loop()
        never, started = loop.create_future(), loop.time()
        task = Task(sys.executable, ["f.py"], {}, "/")
        running = asyncio.ensure_future(redis_dispatch.RedisExecutor(queue).run(task, output, never))
        while not await client.llen(queue.key("pending")):
            await asyncio.sleep(0.01)
        if meanwhile is not None:
            await meanwhile(client, queue)
        code = await asyncio.wait_for(running, 30)
        elapsed = loop.time() - started
        await queue.purge()
        await client.aclose()
        return code, bytes(written), elapsed

    return asyncio.run(scenario())


def test_a_redis_task_no_worker_serves_is_given_up(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queue whose workers all went (pods crashing, say): a queued item fails as lost once no worker
    has said it lives for a while, instead of waiting forever."""
    monkeypatch.setattr(redis_dispatch, "UNSERVED_S", 1.0)
    code, written, _ = execute_one(redis_url, "test-unserved")
    assert code == trampoline.POOL_LOST and b"no worker of this pool answered" in written
    assert not pool_keys(redis_url)


def test_a_chatty_task_loses_no_line_to_a_dispatcher_that_fell_behind(redis_url: str) -> None:
    """A worker writes a task's output faster than the dispatcher relays it (the runtime busy a while): the
    stream keeps every line still to relay (it was trimmed to its last 10,000 entries, whatever was read)."""
    lines = 12_000

    async def chatty_worker(client: redis.asyncio.Redis, queue: RedisQueue) -> None:
        worker = RedisQueue(redis.Redis.from_url(redis_url), queue.prefix)
        claimed = worker.claim("w", 1)
        assert claimed is not None
        for number in range(lines):  # (the event loop, so the dispatcher, is held meanwhile)
            worker.output(claimed[0], 1, f"line {number}\n".encode())
        worker.finish(claimed[0], "w", 0)
        worker.client.close()

    code, written, _ = execute_one(redis_url, "test-chatty", chatty_worker)
    assert code == 0 and written.decode().splitlines() == [f"line {number}" for number in range(lines)]


def test_a_redis_tasks_keys_outlive_their_expiry_while_the_dispatcher_waits_on_it(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key of a task expires unless renewed: a task running several times its keys' time keeps them,
    as its dispatcher renews them, even while relaying its first line takes longer than that (a runtime busy
    starting another pool reads no task's output), and its output and status arrive (the stream made by the
    claim would otherwise be gone, and its lines with it)."""
    monkeypatch.setattr(redis_queue, "KEEP_S", 2)
    monkeypatch.setattr(redis_dispatch, "KEEP_EVERY_S", 0.3)

    def slow_worker(prefix: str) -> list[int]:
        worker = RedisQueue(redis.Redis.from_url(redis_url), prefix)
        claimed = worker.claim("w", 1)
        assert claimed is not None
        worker.output(claimed[0], 1, b"first\n")  # (its relay takes 5 s)
        expiries = []
        for _ in range(6):  # 6 s: three times the keys' time
            time.sleep(1)
            worker.renew(claimed[0], "w")
            expiries += [worker.client.ttl(worker.key(kind, claimed[0])) for kind in ("task", "out")]
        worker.output(claimed[0], 1, b"still here\n")
        worker.finish(claimed[0], "w", 0)
        worker.client.close()
        return expiries

    expiries = []

    async def slowly(client: redis.asyncio.Redis, queue: RedisQueue) -> None:
        expiries.extend(await asyncio.to_thread(slow_worker, queue.prefix))

    code, written, _ = execute_one(redis_url, "test-kept", slowly, relay_s=5)
    assert (code, written) == (0, b"first\nstill here\n")
    assert all(0 < seconds <= 2 for seconds in expiries), expiries
    assert not pool_keys(redis_url)


def test_a_redis_pool_killed_outright_leaves_only_keys_that_expire(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The runtime, its dispatcher and the workers all killed at once (a container or a machine lost): nothing
    is left to remove the pool's keys, and the tasks' hashes hold their environments, credentials and all.
    Every key the pool made expires within ``KEEP_S``."""
    env = backend_env("redis", request, tmp_path)
    runtime = start_busy_run(tmp_path, "redis", env)
    try:
        caught = [psutil.Process(runtime.pid), *pool_processes()]
        for process in caught:  # (frozen first: none of them sees another go and cleans up)
            process.suspend()
        for process in caught:
            process.kill()
    finally:
        runtime.kill()
        runtime.wait()
    assert not none_left()
    client = redis.Redis.from_url(env[URL_VARIABLE])
    try:
        keys = {key.decode(): client.ttl(key) for key in client.scan_iter(match="mf-pool:*")}
        for key in keys:
            client.delete(key)
    finally:
        client.close()
    assert sum(":task:" in key for key in keys) >= 2, keys  # (the two items that ran, at least)
    assert all(0 < seconds <= redis_queue.KEEP_S for seconds in keys.values()), keys


def test_a_redis_task_given_up_on_an_error_is_cancelled_for_its_worker(redis_url: str) -> None:
    """The dispatcher gives a task up when Redis fails a command mid-task (here Redis refuses to read the
    task's output as a stream): its attempt fails as lost, and its worker, holding it still, finds it
    cancelled rather than running it beside the retry."""

    async def scenario() -> list[bytes]:
        client = redis.asyncio.Redis.from_url(redis_url)
        queue = RedisQueue(client, "mf-pool:test-error:each:")
        never = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(
            redis_dispatch.RedisExecutor(queue).run(Task(sys.executable, ["f.py"], {}, "/"), print, never)
        )
        while not (pending := await client.lrange(queue.key("pending"), 0, -1)):
            await asyncio.sleep(0.01)
        await client.set(queue.key("out", pending[0].decode()), "not a stream")  # (XREAD: WRONGTYPE)
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await asyncio.wait_for(running, 30)
        marks = [key async for key in client.scan_iter(match=queue.key("cancel", "*"))]
        await queue.purge()
        await client.aclose()
        return marks

    assert len(asyncio.run(scenario())) == 1


def test_redis_workers_outlive_a_redis_that_stops_answering(tmp_path: Path) -> None:
    """Redis stopped mid-run for longer than the pool's commands wait: the items in flight fail as lost and
    run again, by the same workers, once Redis answers (an error from Redis ended each worker, and the
    pool ran on without them)."""
    with redis_server(tmp_path / "redis") as url:
        address = url.split("@")[1].split("/")[0]  # (redis-server names itself by it: its title)
        runtime = start_busy_run(tmp_path, "redis", {URL_VARIABLE: url})
        try:
            (server,) = [p for p in psutil.process_iter(["cmdline"]) if address in " ".join(p.info["cmdline"] or [])]
            workers = {p.pid for p in pool_processes(POOL_MARKS[2:]) if p.ppid() == runtime.pid}
            server.suspend()
            time.sleep(12)  # (past the 5 s a command waits, and the leases' 10 s)
            server.resume()
            time.sleep(3)
            assert len(workers) == 2 and not any(gone(pid, within=0) for pid in workers)
        except BaseException:
            runtime.kill()
            raise
        run = released(runtime, tmp_path)
    assert [item["attempt"] for item in run["items"]].count(1) >= 2  # (the two in flight, lost and run again)


def test_a_task_that_comes_while_redis_does_not_answer_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that comes while Redis is away (the retry of an attempt the outage failed) goes onto the queue once
    Redis answers again, rather than failing at once on a connection the outage broke and spending its own
    attempt too (the runs that failed when a Redis came back); after ``UNSERVED_S`` it fails."""
    from metaflow_stack.pool.redis_queue import TIMEOUT_S, connect

    monkeypatch.setattr(redis_dispatch, "UNSERVED_S", TIMEOUT_S + 3)
    with redis_server(tmp_path / "redis") as url:
        address = url.split("@")[1].split("/")[0]  # (redis-server names itself by it: its title)
        titled = [(p, " ".join(p.info["cmdline"] or "").split()) for p in psutil.process_iter(["cmdline"])]
        (server,) = [p for p, words in titled if address in words]

        async def scenario(away_s: float) -> tuple[BaseException | None, int]:
            client = connect(url, asynchronous=True)
            queue = RedisQueue(client, f"mf-pool:test-away-{away_s:.0f}:each:")
            await client.ping()  # (a connection made before the outage, as the dispatcher's are)
            server.suspend()
            never = asyncio.get_running_loop().create_future()
            running = asyncio.ensure_future(
                redis_dispatch.RedisExecutor(queue).run(Task(sys.executable, ["f.py"], {}, "/"), print, never)
            )
            try:
                await asyncio.sleep(away_s)
                server.resume()
                for _ in range(100):  # queued once Redis answers (no worker serves it: cancelled below)
                    if running.done() or await client.llen(queue.key("pending")):
                        break
                    await asyncio.sleep(0.1)
                if running.done():
                    return running.exception(), 0
                return None, await client.llen(queue.key("pending"))
            finally:
                server.resume()
                running.cancel()
                with contextlib.suppress(BaseException):
                    await running
                await client.aclose()

        failed, queued = asyncio.run(scenario(TIMEOUT_S + 1.5))  # (past the time a command waits)
        assert failed is None and queued == 1
        failed, _ = asyncio.run(scenario(20.0))
        assert isinstance(failed, redis.RedisError), failed


def test_a_redis_that_stops_answering_fails_the_task_in_seconds(tmp_path: Path) -> None:
    """A Redis that stops answering mid-task (stopped, its network gone) fails the dispatcher's commands once
    their time is up, so the attempt ends as lost (``@retry``'s to run again) rather than waiting for as long
    as Redis stays so."""
    from metaflow_stack.pool.redis_queue import TIMEOUT_S, connect

    with redis_server(tmp_path / "redis") as url:
        address = url.split("@")[1].split("/")[0]  # (redis-server names itself by it: its title)
        titled = [(p, " ".join(p.info["cmdline"] or "").split()) for p in psutil.process_iter(["cmdline"])]
        (server,) = [p for p, words in titled if address in words]

        async def scenario() -> tuple[BaseException | None, float]:
            client = connect(url, asynchronous=True)
            queue = RedisQueue(client, "mf-pool:test-stopped:each:")
            never = asyncio.get_running_loop().create_future()
            running = asyncio.ensure_future(
                redis_dispatch.RedisExecutor(queue).run(Task(sys.executable, ["f.py"], {}, "/"), print, never)
            )
            while not await client.llen(queue.key("pending")):
                await asyncio.sleep(0.01)
            server.suspend()  # (SIGSTOP: the connection stays open, nothing answers on it)
            started = time.monotonic()
            try:
                await asyncio.wait_for(running, TIMEOUT_S * 6)
            except Exception as exc:
                return exc, time.monotonic() - started
            finally:
                server.resume()
                await client.aclose()
            return None, time.monotonic() - started

        failed, took = asyncio.run(scenario())
    assert isinstance(failed, redis.RedisError), failed
    assert took < 2 * TIMEOUT_S + 5  # (the read; then one look to cancel the task)


def test_a_redis_task_taken_by_a_worker_that_died_before_its_lease_is_lost(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that took a task off the queue and died before it took the lease: the attempt fails as
    lost once the lease's time is past instead of waiting forever."""
    monkeypatch.setattr(redis_dispatch, "TAKEN_S", 1.0)

    async def take_and_die(client: redis.asyncio.Redis, queue: RedisQueue) -> None:
        await client.set(queue.key("served"), 1, ex=60)  # (a worker lived: the queue is served)
        await client.lmove(queue.key("pending"), queue.key("claimed", "gone"), "RIGHT", "LEFT")

    code, written, elapsed = execute_one(redis_url, "test-taken", take_and_die)
    assert code == trampoline.POOL_LOST and b"took it, then vanished" in written
    assert redis_dispatch.TAKEN_S <= elapsed < redis_dispatch.TAKEN_S + 4
    assert not pool_keys(redis_url)


def test_a_cluster_pools_workers_reach_only_their_own_pools_keys(redis_url: str) -> None:
    """An item's code can read its worker's URL (its memory, its environment): as the pool's own Redis user,
    a worker does all it does with its pool's keys (Redis checks its scripts' commands too; the scripts are
    loaded by whoever makes the user, again where Redis lost them), and nothing with another pool's, which
    hold their tasks' environments, credentials and all: no reading, no queueing, no listing, no emptying,
    no script of its own (which would hold every pool on that Redis while it ran). Removed with the pool,
    the user connects no more."""
    import redis

    from metaflow_stack.pool.redis_queue import RedisQueue, connect
    from metaflow_stack.pool.redis_user import PoolUser, remove

    ours, theirs = f"mf-pool:{uuid.uuid4().hex[:8]}:each:", f"mf-pool:{uuid.uuid4().hex[:8]}:each:"
    user = PoolUser(f"mf-pool-each-{uuid.uuid4().hex[:10]}", ours)
    admin = connect(redis_url)
    try:
        assert user.make(redis_url) is None and user.make(redis_url) is None  # (made again: the same)
        for prefix in (ours, theirs):
            admin.hset(f"{prefix}task:1", mapping={"python": "p", "argv": "[]", "env": '{"AWS": "k"}', "cwd": "/"})
            admin.lpush(f"{prefix}pending", "1")
        admin.script_flush()  # (as a restart does)
        worker = RedisQueue(connect(user.url(redis_url)), ours)
        worker.client.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.live("w")  # (its script lost, and the user may not load it)
        assert user.make(redis_url) is None
        worker.live("w")
        task_id, task = worker.claim("w", timeout_s=1)
        assert (task_id, task.env) == ("1", {"AWS": "k"})
        worker.output(task_id, 1, b"line")
        assert not worker.renew(task_id, "w")
        worker.finish(task_id, "w", 0)
        other = RedisQueue(worker.client, theirs)
        attempts = {
            "claim": lambda: other.claim("w", timeout_s=0.1),
            "read": lambda: worker.client.hgetall(f"{theirs}task:1"),
            "queue": lambda: worker.client.lpush(f"{theirs}pending", "2"),
            "list": lambda: worker.client.keys("*"),
            "scan": lambda: worker.client.scan(0),
            "empty": lambda: worker.client.flushall(),
            "make users": lambda: worker.client.execute_command("ACL", "SETUSER", "me", "on", ">x", "+@all", "~*"),
            "load a script": lambda: worker.client.script_load("while true do end"),
            "run a script": lambda: worker.client.eval("while true do end", 0),
        }
        refused = []
        for what, attempt in attempts.items():
            try:
                attempt()
            except redis.exceptions.NoPermissionError:
                refused.append(what)
        assert refused == list(attempts)
        assert admin.hgetall(f"{theirs}task:1")[b"env"] == b'{"AWS": "k"}' and admin.llen(f"{theirs}pending") == 1
        worker.client.close()
        remove(redis_url, user.name)
        with pytest.raises(redis.exceptions.AuthenticationError):
            connect(user.url(redis_url)).ping()
    finally:
        for prefix in (ours, theirs):
            for key in admin.scan_iter(match=prefix + "*"):
                admin.delete(key)
        remove(redis_url, user.name)
        admin.close()


@pytest.mark.parametrize("noticed", ["a failed command", "no worker serving"])
def test_the_dispatcher_makes_the_pool_user_again_where_redis_lost_it(redis_url: str, noticed: str) -> None:
    """Redis saves and replicates neither the pool's user nor its scripts: after a restart (here: both
    removed, as a restart does) the workers cannot log in, and try again every second. The dispatcher makes
    both again as it sees why: a command of its failed (Redis may have restarted), or no worker said it
    lives while a task waits (a restart between its commands); the task then runs."""
    import threading

    from metaflow_stack.pool.redis_queue import connect
    from metaflow_stack.pool.redis_user import PoolUser, remove

    prefix = f"mf-pool:{uuid.uuid4().hex[:8]}:each:"
    user = PoolUser(f"mf-pool-each-{uuid.uuid4().hex[:10]}", prefix)
    assert user.make(redis_url) is None
    admin = connect(redis_url)
    admin.execute_command("ACL", "DELUSER", user.name)
    admin.script_flush()
    served: list[str] = []

    def worker() -> None:  # (as redis_worker does: a failure is tried again a second later)
        for _ in range(60):
            try:
                queue = RedisQueue(connect(user.url(redis_url)), prefix)
                queue.live("w")
                claimed = queue.claim("w", timeout_s=0.5)
                if claimed is not None:
                    served.append(claimed[0])
                    queue.finish(claimed[0], "w", 0)
                    return
            except redis.RedisError:
                time.sleep(0.5)

    async def dispatched() -> int | None:
        executor = redis_dispatch.RedisExecutor(RedisQueue(connect(redis_url, asynchronous=True), prefix), user=user)
        executor.unsure = noticed == "a failed command"
        never = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(executor.run(Task(sys.executable, ["f.py"], {}, "/"), print, never), 20)
        finally:
            await executor.queue.client.aclose()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        assert asyncio.run(dispatched()) == 0 and len(served) == 1
    finally:
        thread.join(timeout=40)
        remove(redis_url, user.name)
        for key in admin.scan_iter(match=prefix + "*"):  # (the worker's: this test stands in for the purge)
            admin.delete(key)
        admin.close()


@pytest.mark.parametrize(
    ("lacks", "said"),
    [
        ("-@admin", "this user has no permissions to run the 'acl|setuser' command"),
        ("-@scripting", "this user has no permissions to run the 'script|load' command"),
    ],
    ids=["users", "scripts"],
)
def test_a_redis_that_takes_no_pool_user_is_named_so_the_run_can_say_it(redis_url: str, lacks: str, said: str) -> None:
    """A URL whose own user may not make users, or load the queue's scripts (a managed Redis's, say): the pool
    is told why, in Redis's words, and its workers connect with the run's URL (``cluster_pool`` says so
    once); a user made before its scripts were refused is not left behind."""
    from metaflow_stack.pool.redis_queue import connect
    from metaflow_stack.pool.redis_user import PoolUser, remove

    runner = f"runner-{uuid.uuid4().hex[:8]}"
    pool = PoolUser(f"mf-pool-each-{uuid.uuid4().hex[:10]}", "mf-pool:1:each:")
    admin = connect(redis_url)
    try:
        admin.execute_command("ACL", "SETUSER", runner, "on", ">pw", "~*", "+@all", lacks)
        runners_url = PoolUser(runner, "", password="pw").url(redis_url)  # (the same Redis, as that user)
        refused = pool.make(runners_url)
        left = admin.acl_getuser(pool.name)
    finally:
        remove(redis_url, runner)
        remove(redis_url, pool.name)
        admin.close()
    assert refused == said and left is None


def test_a_redis_worker_killed_between_its_move_and_its_claim_leaves_a_list_that_expires(redis_url: str) -> None:
    """A claim is a move of the task's id into the worker's list, then the claim's script, which gives the list
    an expiry. A worker killed between the two left a list that never expired; the list now exists, with an
    expiry, before the move (the worker keeps it so while it lives)."""
    client = redis.Redis.from_url(redis_url)
    queue = RedisQueue(client, "mf-pool:test-moved:each:")
    claimed = queue.key("claimed", "w")
    try:
        client.lpush(queue.key("pending"), "0123abcd")
        queue.live("w")
        assert client.blmove(queue.key("pending"), claimed, 1, "RIGHT", "LEFT") == b"0123abcd"  # (then killed)
        assert 0 < client.ttl(claimed) <= redis_queue.KEEP_S
        assert client.lrange(claimed, 0, -1) == [b"0123abcd", redis_queue.HELD.encode()]
    finally:
        client.delete(*client.keys("mf-pool:test-moved:*"))
        client.close()


def test_a_redis_task_whose_cancel_was_swallowed_ends_at_its_next_round(redis_url: str) -> None:
    """The pool stopping cancels each task in flight. redis-py sends each command under ``asyncio.wait_for``,
    which on Python 3.11 returns instead of raising when the cancel lands as the send completes: the task
    still ends at its next round, and leaves nothing in the queue, instead of keeping the stopping dispatcher
    waiting until its item counts as unserved (30 s: the runs that outlived their runtime by 40 s)."""

    async def scenario() -> tuple[asyncio.Task, float]:
        client = redis.asyncio.Redis.from_url(redis_url)
        queue = RedisQueue(client, "mf-pool:test-swallowed:each:")
        loop = asyncio.get_running_loop()

        async def output(fd: int, data: bytes) -> None:
            raise AssertionError("no worker: no output")

        async def cancel_swallowed_then_run() -> int | None:
            asyncio.current_task().cancel()
            with contextlib.suppress(asyncio.CancelledError):  # (what 3.11's wait_for does with it)
                await asyncio.sleep(0)
            task = Task(sys.executable, ["f.py"], {}, "/")
            return await redis_dispatch.RedisExecutor(queue).run(task, output, loop.create_future())

        started = loop.time()
        running = asyncio.ensure_future(cancel_swallowed_then_run())
        await asyncio.wait([running], timeout=redis_dispatch.UNSERVED_S / 2)
        elapsed = loop.time() - started
        await client.aclose()
        return running, elapsed

    running, elapsed = asyncio.run(scenario())
    assert running.cancelled() and elapsed < 5
    assert not pool_keys(redis_url)


@pytest.fixture(scope="module")
def step_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second interpreter, as Metaflow makes a step's own ``@pypi`` environment, where micromamba puts one
    (``.../metaflow/<platform>/<id>``): a virtual environment with what Metaflow puts in every one
    (``requests``) and the package ``EnvironmentPoolFlow``'s step asks for, neither Metaflow nor this runtime."""
    from uv import find_uv_bin

    env = tmp_path_factory.mktemp("envs") / "metaflow" / "linux-64" / "made"
    uv = find_uv_bin()
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(env)], check=True)
    lock, python = PROJECT / "runtime" / "requirements.lock", env / "bin" / "python"
    install = [uv, "pip", "install", "--quiet", "--python", str(python), "-c", str(lock), "requests", "tabulate==0.9.0"]
    subprocess.run(install, check=True, timeout=600)
    return python


#: Which process starts the fork server an item runs in, by backend: the runtime itself for a local pool.
LAUNCHERS = {"local": None, "redis": "metaflow_stack.pool.redis_worker", "ray": "ray::PoolActor"}


@pytest.mark.parametrize("backend", LAUNCHERS)
def test_a_pooled_pypi_step_runs_in_the_environment_metaflow_made(
    tmp_path: Path, step_python: Path, state_dir: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """``@worker_pool`` over ``@pypi``: the fork server (redis: each worker's, ray: each actor's) runs the
    step's environment's interpreter, the run's code package on its path, and every item runs there with the
    environment's packages. Metaflow makes the environment with micromamba, which these machines lack: here micromamba's
    part is a double (``made_environment.py``: Metaflow is told the environment is made, at
    ``step_python``'s); the GitHub ``pypi-environments`` job runs the same flow with micromamba
    (``test_a_pooled_pypi_step_runs_in_its_environment``)."""
    wrapper = (str(FLOWS / "made_environment.py"), str(step_python.parents[1]))
    env = {"ENVIRONMENT_POOL_FLOW_PYPI": "1", "ENVIRONMENT_POOL_FLOW_BACKEND": backend}
    env |= backend_env(backend, request, tmp_path)
    top = ("--environment", "pypi")
    done = run_flow(tmp_path, pooled=False, flow="environment_pool_flow.py", env=env, top=top, wrapper=wrapper)
    assert done.returncode == 0, done.stderr[-3000:]
    items = where_items_ran(tmp_path)
    ran_in_its_environment(items)
    assert items[0]["python"] == str(step_python)
    for item in items:
        assert all((mark in item["launcher"]) == (mark == LAUNCHERS[backend]) for mark in LAUNCHERS.values() if mark)
    # The code package as this machine keeps it unpacked for every compute decorator (not once more per run).
    assert Path(items[0]["metaflow"]).is_relative_to(state_dir / "code")


@pytest.mark.parametrize("backend", LAUNCHERS)
def test_a_pooled_pypi_step_runs_in_its_environment(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """``@worker_pool`` over ``@pypi``, the environment made by Metaflow with micromamba."""
    need("micromamba", shutil.which("micromamba") is not None, "Metaflow's @pypi solves environments with micromamba")
    env = {"ENVIRONMENT_POOL_FLOW_PYPI": "1", "ENVIRONMENT_POOL_FLOW_BACKEND": backend}
    env |= backend_env(backend, request, tmp_path)
    top = ("--environment", "pypi")
    done = run_flow(tmp_path, pooled=False, flow="environment_pool_flow.py", env=env, top=top)
    assert done.returncode == 0, done.stderr[-3000:]
    ran_in_its_environment(where_items_ran(tmp_path))


def ran_in_its_environment(items: list[dict]) -> None:
    """Every item ran in one environment, as Metaflow made it (its interpreter and the step's package,
    Metaflow's ``conda_env_prefix``), in the pool's warm workers, importing Metaflow from the run's code
    package, not the runtime's installation."""
    import metaflow

    runtime_metaflow = Path(metaflow.__file__).parents[1]
    assert len(items) == 3
    for item in items:
        assert item["successful"] and item["package"] == "0.9.0" and item["worker"], item
        assert item["prefix"] and item["prefix"] in item["python"] and item["python"] != sys.executable, item
        assert not Path(item["metaflow"]).is_relative_to(runtime_metaflow), item
    assert len({item["python"] for item in items}) == 1


#: Where each item of ``EnvironmentPoolFlow``'s latest run ran, read through the Client API.
WHERE = """
import json, sys
from metaflow import Flow, metadata, namespace
metadata("local@" + sys.argv[1])
namespace(None)
run = Flow("EnvironmentPoolFlow").latest_run
print(json.dumps([
    {"run": run.id, "id": task.id, "successful": task.successful, "attempt": task.current_attempt,
     "python": task.data.python, "metaflow": task.data.metaflow_from, "package": task.data.package,
     "launcher": task.data.launcher,
     "worker": task.metadata_dict.get("worker-pool"), "prefix": task.metadata_dict.get("conda_env_prefix")}
    for task in sorted(run["each"], key=lambda task: task.index)
]))
"""


def where_items_ran(root: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", WHERE, str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CHATTY_TASK = """
import pathlib, subprocess, sys
if __name__ == "__main__":  # (not when the fork server imports the file)
    chatter = "import os\\nwhile True:\\n    os.write(1, b'chatter' * 512)"  # (its pipe never empty)
    pathlib.Path(sys.argv[1]).write_text(str(subprocess.Popen([sys.executable, "-c", chatter]).pid))
"""


def test_a_task_that_leaves_a_writer_behind_holds_no_slot(tmp_path: Path) -> None:
    """A task that exits leaving a process that keeps writing into its output: a worker's one-slot fork
    server (``slot``) gives its status and stops reading after the drain, instead of relaying forever."""
    from metaflow_stack.pool.child import DRAIN_S
    from metaflow_stack.pool.slot import Slot

    script, pid_file = tmp_path / "chatty.py", tmp_path / "chatter.pid"
    script.write_text(CHATTY_TASK)
    slot = Slot(str(script), "test", str(tmp_path), None)
    assert slot.start() is None
    try:
        task = Task(sys.executable, [sys.executable, str(script), str(pid_file)], dict(os.environ), str(tmp_path))
        running, started, pieces = slot.submit(task, task.env), time.monotonic(), 0
        while not running.ended and time.monotonic() - started < DRAIN_S + 20:
            pieces += len(running.read(1.0))
            time.sleep(0.005)  # (as a Redis worker relays each piece: slower than the writer fills the pipe)
        running.close()
        assert running.ended and running.status == 0 and pieces > 0
        assert time.monotonic() - started < DRAIN_S + 20
    finally:
        slot.stop()
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


SPEAKING_TASK = """
import os, sys, time
if __name__ == "__main__":  # (not when the fork server imports the file)
    for number in range(3):
        os.write(1, f"line {number}\\n".encode())
    os.write(2, b"said\\n")
    time.sleep(float(sys.argv[1]))
    os.write(1, b"later\\n" + b"x" * int(sys.argv[2]))
"""


def test_a_ray_workers_task_output_goes_in_few_batches_and_still_live(tmp_path: Path) -> None:
    """A Ray actor sends what its task writes in batches (each one round trip of Ray's stream): a short
    task's output and its status as one; a longer one's first lines within ``FLUSH_S`` of being written,
    before it ends; a flood in pieces of about ``FLUSH_BYTES``. (The actor's class, without Ray.)"""
    from metaflow_stack.pool.ray_actor import FLUSH_BYTES, PoolActor

    script = tmp_path / "speaking.py"
    script.write_text(SPEAKING_TASK)
    actor = PoolActor(str(script), "test", str(tmp_path))
    assert actor.ready() is None
    try:

        def sent(pause: float, flood: int) -> list[tuple[float, list[tuple[int, bytes]], int | None]]:
            task = Task(sys.executable, [sys.executable, str(script), str(pause), str(flood)], dict(os.environ), "/")
            started = time.monotonic()
            return [(time.monotonic() - started, *batch) for batch in actor.run(task, uuid.uuid4().hex)]

        short = sent(0, 0)  # (one batch; more only where a busy machine stalls the task over 0.1 s: at most 3)
        pieces = [piece for _, batch, _ in short for piece in batch]
        assert len(short) <= 3 and [status for *_, status in short] == [None] * (len(short) - 1) + [0]
        assert b"".join(data for fd, data in pieces if fd == 1) == b"line 0\nline 1\nline 2\nlater\n"
        assert [data for fd, data in pieces if fd == 2] == [b"said\n"]
        first, *_, last = sent(2.0, 0)
        assert first[2] is None and first[0] < 1.0 and b"line 2" in b"".join(data for _, data in first[1])
        assert last[2] == 0 and last[0] >= 2.0
        batches = sent(0, 1 << 20)
        assert batches[-1][2] == 0 and all(status is None for _, _, status in batches[:-1])
        sizes = [sum(len(data) for _, data in pieces) for _, pieces, _ in batches]
        assert max(sizes) < FLUSH_BYTES + 65536, sizes  # (one pipe: the bound and at most one read past it)
        assert sum(sizes) == len(b"line 0\nline 1\nline 2\nsaid\nlater\n") + (1 << 20)
    finally:
        actor.stop()


@pytest.mark.parametrize(("pause", "ends"), [("60", trampoline.POOL_LOST), ("0", 0)])
def test_a_ray_worker_that_cannot_read_its_tasks_output_sends_what_it_had_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pause: str, ends: int
) -> None:
    """Reading a task's pipes failing (here: at the second read, as an ``EIO`` would) loses the attempt, not
    what the task wrote before: the batch gathered so far goes, then the reason, with ``POOL_LOST`` (``@retry``
    runs the item again), and the task is killed rather than left running; a task whose status had come
    (one that ended at once) keeps it, so is not run again. (The actor's class, without Ray.)"""
    from metaflow_stack.pool import slot
    from metaflow_stack.pool.ray_actor import PoolActor

    reads = 0
    real_read = slot.Running.read

    def failing_read(running: slot.Running, timeout: float | None) -> list[tuple[int, bytes]]:
        nonlocal reads
        reads += 1
        if reads > 1:
            raise OSError(5, "Input/output error")
        time.sleep(0.5)  # (the task's first lines are all in the pipes by then)
        return real_read(running, timeout)

    monkeypatch.setattr(slot.Running, "read", failing_read)
    script = tmp_path / "speaking.py"
    script.write_text(SPEAKING_TASK)
    actor = PoolActor(str(script), "test", str(tmp_path))
    assert actor.ready() is None
    try:
        task = Task(sys.executable, [sys.executable, str(script), pause, "0"], dict(os.environ), "/")
        started = time.monotonic()
        batches = list(actor.run(task, uuid.uuid4().hex))
        (pieces, status), *more = batches
        assert not more and status == ends
        assert b"line 0" in b"".join(data for fd, data in pieces if fd == 1), pieces
        said = b"worker pool: this Ray worker could not read the task's output: [Errno 5] Input/output error\n"
        assert pieces[-1] == (2, said)
        assert actor.slot.pool is not None
        deadline = time.monotonic() + 30  # a task asleep for 60 s is killed, its slot free again
        while actor.slot.pool.counts().running and time.monotonic() < deadline:
            time.sleep(0.1)
        counts = actor.slot.pool.counts()
        assert (counts.done, counts.failed) == ((0, 1) if ends else (1, 0)) and time.monotonic() - started < 30
    finally:
        actor.stop()


def test_a_task_for_another_interpreter_is_refused_in_one_line(tmp_path: Path, step_python: Path) -> None:
    """A task whose decorators chose another interpreter than the pool's reaches the pool through the
    trampoline, which runs under that interpreter; the pool refuses it rather than run it in its own. A
    virtual environment counts as another interpreter, though it links the same binary."""
    flow = tmp_path / "tiny_flow.py"
    flow.write_text("VALUE = 1\n")
    pool = LocalPool(str(flow), 1, "test")
    pool.start()
    try:
        done = subprocess.run(pool.command([str(step_python), str(flow), "step", "x"]), capture_output=True, text=True)
    finally:
        pool.stop()
    assert done.returncode == 1
    assert f"the pool runs {sys.executable} and this task asks for {step_python}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


BAD = """
from metaflow import FlowSpec, devcontainer, kubernetes, nomad, pypi, resources, step, worker_pool

class BadFlow(FlowSpec):
    @step
    def start(self):
        self.items = [1, 2]
        self.next(self.each, foreach="items")

    {decorator_each}
    @step
    def each(self):
        self.next(self.join)

    {decorator_join}
    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    BadFlow()
"""


@pytest.mark.parametrize(
    ("each", "join", "words"),
    [
        ("@worker_pool(size=0)", "", "size=0 must be at least 1"),
        ('@worker_pool(backend="elsewhere")', "", "backend='elsewhere' is not one of"),
        ("", "@worker_pool", "join is not the body of"),
        ('@worker_pool\n    @resources(memory="16Gi")', "", "@resources(memory='16Gi') is not a number"),
        ('@worker_pool\n    @resources(cpu="nan")', "", "@resources(cpu='nan') is not a number of 0 or more"),
        ("@worker_pool\n    @resources(gpu=0.5)", "", "@resources(gpu=0.5) is not a whole number of 0 or more"),
        ("@devcontainer\n    @worker_pool", "", "write @worker_pool above @devcontainer"),
        ('@worker_pool(backend="redis")\n    @devcontainer', "", "with @devcontainer the pool's workers are"),
        (
            '@worker_pool(backend="redis", redis_url="redis://:pw@127.0.0.1:1/0")',
            "",
            "redis_url= holds a password, which Metaflow saves with the run (its graph, in the datastore) "
            "(fix: give the whole URL in METAFLOW_STACK_POOL_REDIS_URL and remove redis_url=)",
        ),
    ],
    ids=[
        "size",
        "backend",
        "not-a-foreach-body",
        "resources",
        "resources-nan",
        "resources-half-gpu",
        "devcontainer-order",
        "devcontainer-backend",
        "password-in-redis-url",
    ],
)
def test_bad_settings_fail_at_start_in_one_line(tmp_path: Path, each: str, join: str, words: str) -> None:
    _fails_at_start(tmp_path, each, join, words)


@pytest.mark.parametrize(
    ("each", "fix", "store"),
    [
        ('@pypi(packages={})\n    @worker_pool(backend="nomad")', 'or backend="local")', "s3"),
        ('@worker_pool(backend="ray")', "or unset RAY_ADDRESS=auto for a Ray of the pool's own here)", "local"),
        ("@worker_pool\n    @kubernetes", "or remove @kubernetes)", "s3"),  # (@kubernetes's own check)
    ],
    ids=["pypi", "environment-on-a-ray-cluster", "kubernetes"],
)
def test_a_step_environment_off_this_machine_fails_at_start_in_one_line(
    tmp_path: Path, each: str, fix: str, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``--environment pypi`` Metaflow makes every step an environment of its own on this machine (with
    or without ``@pypi``): a pool runs it only where its workers are here, on the local backend or a Ray of
    the pool's own (not on the cluster ``RAY_ADDRESS`` names)."""
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    words = "where only the local and redis backends' workers run, and the ray backend's on a Ray of the pool's own"
    top = ("--environment", "pypi", "--datastore", store)
    _fails_at_start(tmp_path, each, "", f"{words} (fix: @pypi(disabled=True) on each, {fix}", *top)


def _fails_at_start(tmp_path: Path, each: str, join: str, words: str, *top: str) -> None:
    """``BAD`` with these decorators, run with the top-level options ``top``, stops before any task, saying
    ``words`` and a fix."""
    (tmp_path / "bad_flow.py").write_text(BAD.format(decorator_each=each, decorator_join=join))
    env = {**os.environ, "METAFLOW_DEFAULT_METADATA": "local"}
    line = [sys.executable, "bad_flow.py", *top, "--datastore-root", str(tmp_path / ".metaflow"), "run"]
    done = subprocess.run(line, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert words in done.stderr and "fix:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Task is starting" not in done.stdout + done.stderr


def test_on_a_terminal_each_pool_has_a_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """A terminal gets rich's bar per pool (items done of the foreach's, running, failed attempts), no
    lines; the last look at a pool, when it stops, is drawn."""
    from metaflow_stack.pool.counts import Counts
    from metaflow_stack.pool.progress import PoolProgress

    now = {"each": Counts(queued=4, running=2), "other": Counts(running=1)}
    lines: list[str] = []
    progress = PoolProgress(lines.append, terminal=True)
    progress.watch("each", 6, lambda: now["each"])
    progress.watch("other", 3, lambda: now["other"])
    now["each"] = Counts(done=6, failed=1)
    progress.finish("each")
    now["other"] = Counts(done=3)
    progress.finish("other")
    drawn = capsys.readouterr().err
    assert "each" in drawn and "6/6" in drawn and "1 failed attempts" in drawn
    assert "other" in drawn and "3/3" in drawn
    assert lines == []
