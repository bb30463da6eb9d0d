"""`metaflow stack up` starts the metadata service and runs the hello flow
recorded by it: in the base image beside PostgreSQL and NATS containers, or on
the embedded defaults (a local process, SQLite, in-process events).

It takes only its own processes and containers for its services: whatever else
answers on a port is refused in one line and sent none of the stack's secrets;
one state folder's `down` leaves another folder's containers alone; and the
state folder is its owner's alone. What an older release left is named (a
process, with its PID) or removed by `down` (its containers)."""

from __future__ import annotations

import http.server
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from conftest import DEAD_ENGINE_ENV, TEST_LABELS, free_port, need, run_cli
from devservers import nomad_double
from rich.console import Console

from metaflow_stack.confidential.local_service import LocalKeyRelease
from metaflow_stack.engines import JOB_LABEL, OWNER_LABEL, STACK_UP, JobSpec
from metaflow_stack.engines.docker import DockerEngine
from metaflow_stack.errors import StackError
from metaflow_stack.local_secrets import stack_key, stack_key_path
from metaflow_stack.nomad.dev_cluster import LocalNomad
from metaflow_stack.pool.local_redis import stack_url
from metaflow_stack.service.local import FOLDER_LABEL, OLDER_CONTAINERS, LocalService


def _ok_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("ok "))


def _keyed() -> dict[str, str]:
    """The header the stack's service wants: its key, from the file `up` keeps it in (mode 600)."""
    path = stack_key_path()
    assert path.stat().st_mode & 0o777 == 0o600
    return {"x-api-key": path.read_text()}


def _hello_says(url: str, run: str) -> str:
    """The last line the demo's hello step printed, as the service's logs route reads it."""
    task = httpx.get(f"{url}/flows/HelloFlow/runs/{run}/steps/hello/tasks", headers=_keyed()).json()[0]["task_id"]
    logs = httpx.get(
        f"{url}/flows/HelloFlow/runs/{run}/steps/hello/tasks/{task}/logs/stdout", params={"tail": 1}, headers=_keyed()
    )
    assert logs.status_code == 200, logs.text
    return logs.json()["lines"][-1]["text"]


def test_up_without_docker_runs_the_service_on_sqlite_and_the_demo(
    state_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METAFLOW_STACK_STATE_DIR", str(tmp_path))  # no key yet, whichever tests ran before
    env = {**DEAD_ENGINE_ENV, "METAFLOW_STACK_SERVICE_PORT": str(free_port())}
    result = run_cli("stack", "up", env=env)
    try:
        assert result.returncode == 0, result.stderr
        assert "no Docker engine answers" in result.stderr
        assert "SQLite" in result.stderr and "events in-process" in result.stderr
        line = _ok_line(result.stdout)
        assert line.startswith("ok HelloFlow/") and "a local process" in line
        url = f"http://127.0.0.1:{env['METAFLOW_STACK_SERVICE_PORT']}"
        run = line.split()[1].split("/")[1]
        assert httpx.get(f"{url}/flows/HelloFlow/runs/{run}/summary").status_code == 401  # the stack's key is due
        summary = httpx.get(f"{url}/flows/HelloFlow/runs/{run}/summary", headers=_keyed()).json()
        assert summary["status"] == "completed"
        assert _hello_says(url, run).startswith("hello from")
        assert f"METAFLOW_SERVICE_URL={url}" in result.stdout
        again = run_cli("stack", "up", env=env)  # finds the running service
        assert again.returncode == 0, again.stderr
        key = stack_key_path().read_text()
        assert (key in result.stderr) != (key in again.stderr), "the key is shown once, when it is made"
        assert key not in again.stdout and "$(cat " in again.stdout
    finally:
        down = run_cli("stack", "down", env=env)
    assert "metadata service stopped" in down.stderr


@pytest.mark.docker
@pytest.mark.slow
def test_up_runs_postgres_nats_and_the_service_in_containers(base_image: str, state_dir) -> None:
    env = {"METAFLOW_STACK_SERVICE_PORT": str(free_port())}
    result = run_cli("stack", "up", env=env)
    try:
        assert result.returncode == 0, result.stderr
        assert "PostgreSQL" in result.stderr and "NATS JetStream" in result.stderr
        line = " ".join(result.stdout.split())
        assert f"ran in image {base_image}" in line
        assert "hello from" in line
        url = f"http://127.0.0.1:{env['METAFLOW_STACK_SERVICE_PORT']}"
        health = httpx.get(f"{url}/healthcheck").json()
        assert health["events"]["bus"] == "nats" and health["events"]["error"] is None
        assert httpx.get(f"{url}/flows/HelloFlow/runs", params={"status:eq": "completed"}, headers=_keyed()).json()
        run = _ok_line(result.stdout).split()[1].split("/")[1]
        assert _hello_says(url, run).startswith("hello from")
        # A step of another run and a leftover of `up`'s own, both running when `down` comes.
        engine = DockerEngine()
        step = engine.launch(JobSpec(base_image, ["sleep", "300"], owner="devcontainer", labels=TEST_LABELS))
        this_folder = {**TEST_LABELS, FOLDER_LABEL: LocalService().folder}
        leftover = engine.launch(JobSpec(base_image, ["sleep", "300"], owner=STACK_UP, labels=this_folder))
    finally:
        down = run_cli("stack", "down", "--purge", env=env)
    assert "its data deleted" in down.stderr
    running = {c.id for c in engine.containers(TEST_LABELS)}
    assert step.id in running and leftover.id not in running, "down removes only what up started"
    refused = run_cli("stack", "down", "--all", env=env)  # no answer to the confirmation: nothing removed
    assert refused.returncode != 0 and step.id in {c.id for c in engine.containers(TEST_LABELS)}
    everything = run_cli("stack", "down", "--all", "--yes", env=env)
    assert everything.returncode == 0 and step.id not in {c.id for c in engine.containers()}


def test_up_with_redis_starts_the_pools_redis_behind_a_password(
    state_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`just up --with redis`: Redis on 127.0.0.1 that answers only with the password `up` keeps (mode 600,
    on no command line), the line to export for @worker_pool, and `down` stops it."""
    need("redis-server", shutil.which("redis-server") is not None, "the pools' Redis (apt-get install redis-server)")
    monkeypatch.setenv("METAFLOW_STACK_STATE_DIR", str(tmp_path))
    port = free_port()
    env = {**DEAD_ENGINE_ENV, "METAFLOW_STACK_SERVICE_PORT": str(free_port()), "METAFLOW_STACK_REDIS_PORT": str(port)}
    result = run_cli("stack", "up", "--with", "redis", env=env)
    try:
        assert result.returncode == 0, result.stderr
        password_file = tmp_path / "redis" / "password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        password = password_file.read_text()
        export = next(line for line in result.stdout.splitlines() if "METAFLOW_STACK_POOL_REDIS_URL" in line)
        assert password not in result.stdout + result.stderr and f"$(cat {password_file})" in export
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password=password).ping()
        assert not any(password in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
    finally:
        down = run_cli("stack", "down", env=env)
    assert "redis stopped" in down.stderr
    with pytest.raises(redis.ConnectionError):
        for _ in range(50):  # (it ends within a moment of SIGTERM)
            redis.Redis(port=port, password=password, socket_connect_timeout=1).ping()
            time.sleep(0.1)


class _Stranger(http.server.ThreadingHTTPServer):
    """Another program on a port of the stack's: answers every health and readiness check, keeps what it
    was sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str | None]] = []
        stranger = self

        class Answer(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                stranger.seen.append({"path": self.path, "x-api-key": self.headers.get("x-api-key")})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Answer)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def stranger() -> Iterator[_Stranger]:
    server = _Stranger()
    yield server
    server.shutdown()
    server.server_close()


def test_up_refuses_a_port_something_else_answers_on_and_hands_it_no_key(stranger: _Stranger, tmp_path: Path) -> None:
    env = {
        **DEAD_ENGINE_ENV,
        "METAFLOW_STACK_STATE_DIR": str(tmp_path),
        "METAFLOW_STACK_SERVICE_PORT": str(stranger.port),
    }
    up = run_cli("stack", "up", env=env)
    assert up.returncode == 1 and "Traceback" not in up.stderr
    assert f"error: port {stranger.port} is in use by something else" in up.stderr
    assert "--service-port" in up.stderr and "METAFLOW_SERVICE_URL" not in up.stdout
    assert all(request["x-api-key"] is None for request in stranger.seen), stranger.seen


@pytest.mark.docker
def test_the_containers_flavour_refuses_a_port_something_else_answers_on(
    docker_engine, stranger: _Stranger, tmp_path: Path
) -> None:
    service = LocalService(home=tmp_path, port=stranger.port, auth_key="k" * 32)
    with pytest.raises(StackError) as refused:
        service.start(Console(quiet=True), use_docker=True)
    assert refused.value.message == f"port {stranger.port} is in use by something else"
    assert stranger.seen == [] and not docker_engine.container.exists(service.containers[2])


def test_the_key_release_service_refuses_a_port_something_else_answers_on(
    stranger: _Stranger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METAFLOW_STACK_STATE_DIR", str(tmp_path))
    with pytest.raises(StackError) as refused:
        LocalKeyRelease(home=tmp_path / "key-release", port=stranger.port).start()
    assert refused.value.message == f"port {stranger.port} is in use by something else"
    assert "METAFLOW_STACK_KEY_RELEASE_PORT" in (refused.value.fix or "") and stranger.seen == []


def test_nomad_up_refuses_an_agent_it_did_not_start_and_hands_it_no_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another agent with its ACLs not yet bootstrapped: set up as ours, its management token would be
    someone else's to use. (``nomad`` here only has to be on PATH: nothing is started.)"""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "nomad").write_text("#!/bin/sh\nexit 1\n")
    (bin_folder / "nomad").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_folder}:{os.environ['PATH']}")
    with nomad_double("--acl-bootstrap") as address:
        port = int(address.rsplit(":", 1)[1])
        with pytest.raises(StackError) as refused:
            LocalNomad(home=tmp_path / "nomad", port=port).start()
        assert httpx.post(f"{address}/v1/acl/bootstrap").status_code == 200, "its ACLs are still its own to set up"
    assert refused.value.message == f"port {port} is in use by something else"
    assert not (tmp_path / "nomad" / "management-token").exists()


def test_a_state_folder_made_readable_before_is_made_its_owners_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder made by hand (or by an older release) with the usual 0755: the service's database and log
    under it hold every run's metadata."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    monkeypatch.setenv("METAFLOW_STACK_STATE_DIR", str(state))
    key, _ = stack_key()
    service = LocalService(port=free_port(), auth_key=key)
    service.start(Console(quiet=True), use_docker=False)
    try:
        assert httpx.post(f"{service.url}/flows/PermFlow", headers={"x-api-key": key}, json={}).is_success
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in ("metadata.db", "service.log"):
            assert stat.S_IMODE((state / "service" / name).stat().st_mode) == 0o600, name
    finally:
        assert service.stop()


def test_a_redis_port_that_is_no_number_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAFLOW_STACK_REDIS_PORT", "63 79")
    with pytest.raises(StackError) as refused:
        stack_url()
    assert "METAFLOW_STACK_REDIS_PORT" in refused.value.message and "METAFLOW_STACK_REDIS_PORT" in refused.value.fix


@pytest.fixture
def empty_image(docker_engine, tmp_path: Path) -> Iterator[str]:
    """An image of no layers: enough to make containers that never run."""
    archive = tmp_path / "empty.tar"
    archive.write_bytes(b"\0" * 1024)  # (an archive of no members)
    tag = f"stack-test/empty:{tmp_path.name[-20:].lower().replace('_', '-')}"
    docker_engine.image.import_(archive, tag=tag)
    yield tag
    docker_engine.image.remove(tag, force=True)


def _container_of(docker_engine, image: str, service: LocalService) -> str:
    """A container as `up` of ``service``'s state folder labels them."""
    labels = {**service.labels, JOB_LABEL: "true", OWNER_LABEL: STACK_UP, **TEST_LABELS}
    return docker_engine.container.create(image, ["none"], labels=labels).id


@pytest.mark.docker
def test_down_removes_its_own_folders_containers_and_no_other_folders(
    docker_engine, empty_image: str, tmp_path: Path
) -> None:
    ours, theirs = (LocalService(home=tmp_path / name / "service") for name in ("ours", "theirs"))
    assert ours.containers != theirs.containers and ours.network != theirs.network
    mine, other = _container_of(docker_engine, empty_image, ours), _container_of(docker_engine, empty_image, theirs)
    assert ours.stop()
    assert not docker_engine.container.exists(mine) and docker_engine.container.exists(other)
    left = _container_of(docker_engine, empty_image, ours)  # what the CLI's cleanup sweeps: `up`'s leftovers
    down = run_cli("stack", "down", env={"METAFLOW_STACK_STATE_DIR": str(tmp_path / "ours")})
    assert down.returncode == 0, down.stderr
    assert not docker_engine.container.exists(left) and docker_engine.container.exists(other)
    assert docker_engine.container.inspect(other).config.labels[FOLDER_LABEL] == theirs.folder
    assert theirs.stop() and not docker_engine.container.exists(other)


def test_down_names_the_service_an_older_release_started_and_keeps_its_pid_file(tmp_path: Path) -> None:
    """Its pid file holds a bare PID: `down` neither signals it (unverified) nor deletes the only record of
    it (the next `up` would find the port taken by something it could not name)."""
    older = subprocess.Popen(["sleep", "300"])
    pidfile = tmp_path / "service" / "service.pid"
    pidfile.parent.mkdir()
    pidfile.write_text(str(older.pid))
    try:
        down = run_cli("stack", "down", env={**DEAD_ENGINE_ENV, "METAFLOW_STACK_STATE_DIR": str(tmp_path)})
        said = " ".join(down.stderr.split())
        assert down.returncode == 0 and "Traceback" not in down.stderr, down.stderr
        assert f"perhaps the service an older release started (pid {older.pid}, sleep)" in said
        assert f"stop it (kill {older.pid})" in said
        assert older.poll() is None and pidfile.read_text() == str(older.pid)
    finally:
        older.kill()
        older.wait()


def _run(docker_engine, image: str, **options: object) -> str:
    """A running container of ``image`` (removed with this session's test containers, whatever happens)."""
    labels = {**TEST_LABELS, **options.pop("labels", {})}
    return docker_engine.run(image, ["sleep", "300"], detach=True, labels=labels, **options).id


@pytest.mark.docker
def test_up_refuses_while_an_older_releases_containers_run_and_down_removes_them(
    docker_engine, base_image: str, tmp_path: Path
) -> None:
    """Named for no folder, labelled as the service: a second PostgreSQL on the same volume would corrupt it."""
    older = [
        _run(docker_engine, base_image, name=name, labels={"io.metaflow-stack.service": "local"})
        for name in OLDER_CONTAINERS
    ]
    service = LocalService(home=tmp_path / "service", port=free_port(), auth_key="k" * 32)
    try:
        with pytest.raises(StackError) as refused:
            service.start(Console(quiet=True), use_docker=True)
        assert all(name in refused.value.message for name in OLDER_CONTAINERS), refused.value.message
        assert "metaflow stack down" in (refused.value.fix or "")
        assert not docker_engine.container.exists(service.containers[0])
        down = run_cli("stack", "down", env={"METAFLOW_STACK_STATE_DIR": str(tmp_path)})
        assert down.returncode == 0, down.stderr
        assert not any(docker_engine.container.exists(container) for container in older)
    finally:
        service.stop()  # (what a start taken for granted would have launched)


@pytest.mark.docker
def test_up_on_another_port_than_this_folders_container_publishes_is_refused(
    docker_engine, base_image: str, tmp_path: Path
) -> None:
    """The URL `up` prints (and the demo uses) would name a port no one serves."""
    running_on = free_port()
    service = LocalService(home=tmp_path / "service", port=free_port(), auth_key="k" * 32)
    _run(docker_engine, base_image, name=service.containers[2], labels=service.labels, publish=[(running_on, 8080)])
    try:
        with pytest.raises(StackError) as refused:
            service.start(Console(quiet=True), use_docker=True)
        assert refused.value.message.endswith(f"runs already, on port {running_on}")
        assert "metaflow stack down" in (refused.value.fix or "")
    finally:
        assert service.stop()


@pytest.mark.docker
def test_down_leaves_a_network_something_else_is_attached_to_in_one_line(
    docker_engine, base_image: str, tmp_path: Path
) -> None:
    service = LocalService(home=tmp_path / "service")
    docker_engine.network.create(service.network, labels=service.labels)
    name = f"attached-{service.folder}"
    attached = _run(docker_engine, base_image, name=name, networks=[service.network])
    try:
        down = run_cli("stack", "down", env={"METAFLOW_STACK_STATE_DIR": str(tmp_path)})
        said = " ".join(down.stderr.split())
        assert down.returncode == 0 and "Traceback" not in down.stderr, down.stderr
        assert f"the network {service.network} stays: {name} is attached to it" in said
        assert f"docker network disconnect {service.network}" in said
        assert docker_engine.container.exists(attached)
    finally:
        docker_engine.container.remove(attached, force=True)
        docker_engine.network.remove(service.network)
