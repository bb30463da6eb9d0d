"""Real servers for the metadata service's tests, imported as fixtures by its
test modules: PostgreSQL, a streaming replica that applies changes late, NATS
JetStream, and the service itself as a subprocess (``metaflow service
serve``), all on free 127.0.0.1 ports."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import VENV_BIN, free_port, need

FLOWS = Path(__file__).resolve().parent / "service_flows"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` account then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@dataclass
class PostgresServer:
    """One PostgreSQL cluster (a primary, or a replica of one) on 127.0.0.1."""

    data: Path
    port: int
    log: Path
    process_user_root: bool = field(default_factory=lambda: os.geteuid() == 0)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://metaflow@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        subprocess.run(
            _as_postgres_user(
                [
                    _pg_bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-o",
                    f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop(self) -> None:
        subprocess.run(
            _as_postgres_user([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            timeout=60,
        )

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def _postgres_root(prefix: str) -> Iterator[Path]:
    """A folder the ``postgres`` account can reach (pytest's own temp folders are private to root)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _owned_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
        path.parent.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL primary (trust auth on loopback, fsync on) for the session."""
    need("postgresql", _pg_bin("initdb") is not None, "initdb/pg_ctl not found (apt-get install postgresql)")
    with _postgres_root("stack-pg-") as root:
        yield from _primary(root)


def _primary(root: Path) -> Iterator[PostgresServer]:
    data = _owned_dir(root / "primary")
    subprocess.run(
        _as_postgres_user([_pg_bin("initdb"), "-D", str(data), "-U", "metaflow", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = PostgresServer(data=data, port=free_port(), log=root / "primary.log")
    server.log.touch()
    if os.geteuid() == 0:
        shutil.chown(server.log, "postgres", "postgres")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lagging_replica(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A hot-standby streaming replica of ``postgres`` that applies every change 700 ms late."""
    with _postgres_root("stack-pg-replica-") as root:
        yield from _replica(postgres, root)


def _replica(postgres: PostgresServer, root: Path) -> Iterator[PostgresServer]:
    data = _owned_dir(root / "replica")
    data.chmod(0o700)
    subprocess.run(
        _as_postgres_user(
            [
                _pg_bin("pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(postgres.port),
                "-U",
                "metaflow",
                "-D",
                str(data),
                "-R",
            ]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    with (data / "postgresql.auto.conf").open("a") as conf:
        conf.write("recovery_min_apply_delay = '700ms'\nhot_standby = on\n")
    replica = PostgresServer(data=data, port=free_port(), log=root / "replica.log")
    replica.log.touch()
    if os.geteuid() == 0:
        shutil.chown(replica.log, "postgres", "postgres")
    replica.start()
    yield replica
    replica.stop()


@dataclass
class NatsServer:
    """nats-server with JetStream on 127.0.0.1; ``restart`` keeps its port and store."""

    port: int
    store: Path
    log: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [shutil.which("nats-server"), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        _wait_for_port(self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


def _wait_for_port(port: int, seconds: float = 20) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    need("nats-server", shutil.which("nats-server") is not None, "apt-get install nats-server")
    server = NatsServer(port=free_port(), store=tmp_path / "jetstream", log=tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()


@dataclass
class Service:
    """A running ``metaflow service serve``."""

    url: str
    process: subprocess.Popen
    log: Path

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
) -> Service:
    """Start the service on a free port and wait until its database answers."""
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
    ]
    if nats_url:
        command += ["--nats-url", nats_url]
    if read_database:
        command += ["--read-database", read_database]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200:
                return Service(url, process, log)
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
    root: Path, *args: str, service_url: str | None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``fan_flow.py`` in ``root`` on the local datastore, recording to the service (or locally)."""
    shutil.copy(FLOWS / "fan_flow.py", root)
    metadata = (
        {"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": service_url}
        if service_url
        else {"METAFLOW_DEFAULT_METADATA": "local"}
    )
    return subprocess.run(
        [sys.executable, "fan_flow.py", "--datastore-root", str(root / ".metaflow"), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **metadata, **(env or {})},
    )
