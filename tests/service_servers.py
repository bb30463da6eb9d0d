"""Fixtures for the metadata service's tests (the root conftest makes them
global): PostgreSQL, a streaming replica that applies changes late, NATS
JetStream (``metaflow_stack.service.devservers``), and the service itself as a
subprocess (``metaflow service serve``), all on free 127.0.0.1 ports."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import VENV_BIN, free_port, need
from devservers import NatsServer, PostgresServer, postgres_binary, postgres_cluster, replica_of
from devservers import nats_server as start_nats

FLOWS = Path(__file__).resolve().parent / "service_flows"
#: A service's environment with a key, for one listening beyond loopback (which refuses to start without one).
KEYED = {"METAFLOW_STACK_SERVICE_AUTH_KEY": "test-service-key"}


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL primary (trust auth on loopback, fsync on) for the session."""
    need("postgresql", postgres_binary("initdb") is not None, "initdb/pg_ctl not found (apt-get install postgresql)")
    with postgres_cluster() as server:
        yield server


@pytest.fixture(scope="session")
def lagging_replica(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A hot-standby streaming replica of ``postgres`` that applies every change 700 ms late."""
    with replica_of(postgres, apply_delay_ms=700) as replica:
        yield replica


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    need("nats-server", shutil.which("nats-server") is not None, "apt-get install nats-server")
    with start_nats(tmp_path) as server:
        yield server


@dataclass
class Service:
    """A running ``metaflow service serve``."""

    url: str
    process: subprocess.Popen
    log: Path
    database: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


def start_service(
    database: str,
    log: Path,
    *,
    nats_url: str | None = None,
    read_database: str | None = None,
    env: dict[str, str] | None = None,
    heartbeat_cutoff: int = 360,
    log_roots: tuple[str, ...] = (),
    host: str = "127.0.0.1",
) -> Service:
    """Start the service on a free port of ``host`` and wait until its database answers."""
    port = free_port()
    command = [
        str(VENV_BIN / "metaflow"),
        "service",
        "serve",
        "--database",
        database,
        "--port",
        str(port),
        "--heartbeat-cutoff",
        str(heartbeat_cutoff),
        "--host",
        host,
    ]
    if nats_url:
        command += ["--nats-url", nats_url]
    if read_database:
        command += ["--read-database", read_database]
    for root in log_roots:
        command += ["--log-root", root]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
        )
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200:
                return Service(url, process, log, database)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise TimeoutError(f"the service did not answer: {log.read_text()[-3000:]}")


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator:
    """Starts services for the test and stops them after."""
    started: list[Service] = []

    def start(database: str | None = None, **kwargs) -> Service:
        service = start_service(
            database or str(tmp_path / "metadata.db"), tmp_path / f"service-{len(started)}.log", **kwargs
        )
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def run_flow(
    root: Path,
    *args: str,
    service_url: str | None,
    env: dict[str, str] | None = None,
    flow: str = "fan_flow.py",
    datastore: tuple[str, ...] | None = None,
    timeout: int = 900,
) -> subprocess.CompletedProcess[str]:
    """Run ``flow`` in ``root`` (on the local datastore unless ``datastore`` gives other options),
    recording to the service (or locally)."""
    shutil.copy(FLOWS / flow, root)
    metadata = (
        {"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": service_url}
        if service_url
        else {"METAFLOW_DEFAULT_METADATA": "local"}
    )
    return subprocess.run(
        [sys.executable, flow, *(datastore or ("--datastore-root", str(root / ".metaflow"))), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **metadata, **(env or {})},
    )


@contextlib.contextmanager
def metaflow_ui(datastore_root: Path, *options: str) -> Iterator[str]:
    """``metaflow ui`` on a free port, serving the runs under ``datastore_root`` (and ``options``, such as
    ``--service-url``): its URL once it answers; stopped on the way out."""
    command = [str(VENV_BIN / "metaflow"), "ui", "--port", "0", "--no-browser", "--datastore-root",
               str(datastore_root), *options]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})  # fmt: skip
    try:
        line = ""
        while "UI on" not in line:
            line = server.stderr.readline()
            assert line or server.poll() is None, "metaflow ui exited before it served"
        url = re.search(r"http://\S+/", line)[0].rstrip("/")
        wait_until_it_answers(f"{url}/api/source")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_until_it_answers(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(url).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
