"""`metaflow stack up` starts the metadata service and runs the hello flow
recorded by it: in the base image beside PostgreSQL and NATS containers, or on
the embedded defaults (a local process, SQLite, in-process events)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from conftest import DEAD_ENGINE_ENV, TEST_LABELS, free_port, need, run_cli

from metaflow_stack.engines import STACK_UP, JobSpec
from metaflow_stack.engines.docker import DockerEngine
from metaflow_stack.local_secrets import stack_key_path


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
        leftover = engine.launch(JobSpec(base_image, ["sleep", "300"], owner=STACK_UP, labels=TEST_LABELS))
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
