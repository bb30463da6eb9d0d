"""Throwaway PostgreSQL clusters, NATS servers and Redis servers from locally installed binaries, and the
API doubles of Nomad (``tests/nomad_double``), of GitHub's check runs (``tests/github_double``) and of Phala
Cloud (``tests/phala_double``).

For the test suite, the benchmarks and trying the service by hand: each server
listens on 127.0.0.1 only, on a free port, in a folder of its own, with trust
authentication (so never for data that matters). PostgreSQL refuses to run as
root, so as root its tools run as the ``postgres`` account.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaflow_stack.errors import ToolMissingError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 20, process: subprocess.Popen | None = None) -> None:
    """Until something listens on ``port``; at once an error if ``process``, which is to, has ended."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[:2]} ended ({process.returncode}) before it listened on {port}")
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f}s")


def postgres_binary(name: str) -> str | None:
    """``initdb``, ``pg_ctl``, ...: on PATH, else in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str]) -> None:
    result = subprocess.run(_as_postgres_user(command), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed: {result.stderr.strip()[-2000:]}")


def _owned(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
    path.chmod(mode)
    return path


@dataclass
class PostgresServer:
    """One PostgreSQL cluster (a primary, or a streaming replica of one) on 127.0.0.1."""

    data: Path
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://metaflow@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        _run(
            [
                postgres_binary("pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.data / "server.log"),
                "-w",
                "-o",
                options,
                "start",
            ]
        )

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            _run([postgres_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def replica(self, folder: Path, apply_delay_ms: int = 0) -> PostgresServer:
        """A hot-standby streaming replica in ``folder``, applying changes ``apply_delay_ms`` late; started."""
        data = _owned(folder / "data")
        _run(
            [
                postgres_binary("pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "metaflow",
                "-D",
                str(data),
                "-R",
                # An immediate checkpoint: the default spreads it over minutes on a busy primary.
                "--checkpoint=fast",
            ]
        )
        with (data / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"recovery_min_apply_delay = '{apply_delay_ms}ms'\nhot_standby = on\n")
        replica = PostgresServer(data=data, port=free_port())
        replica.start()
        return replica


@contextlib.contextmanager
def postgres_cluster(prefix: str = "stack-pg-") -> Iterator[PostgresServer]:
    """A new, started PostgreSQL cluster (user ``metaflow``, fsync on); removed afterwards."""
    if postgres_binary("initdb") is None:
        raise ToolMissingError("PostgreSQL's initdb is not installed", fix="apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # reachable by the postgres account
    servers: list[PostgresServer] = []
    try:
        data = _owned(root / "primary")
        _run([postgres_binary("initdb"), "-D", str(data), "-U", "metaflow", "--auth=trust", "-E", "UTF8"])
        server = PostgresServer(data=data, port=free_port())
        server.start()
        servers.append(server)
        yield server
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def replica_of(primary: PostgresServer, apply_delay_ms: int) -> Iterator[PostgresServer]:
    """A streaming replica of ``primary`` that applies every change ``apply_delay_ms`` late."""
    root = Path(tempfile.mkdtemp(prefix="stack-pg-replica-"))
    root.chmod(0o755)
    replica = None
    try:
        replica = primary.replica(root, apply_delay_ms)
        yield replica
    finally:
        if replica is not None:
            replica.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class NatsServer:
    """nats-server with JetStream on 127.0.0.1; ``stop`` then ``start`` keeps its port and store."""

    port: int
    store: Path
    process: subprocess.Popen | None = None
    #: The largest message the server takes (its ``max_payload``); None keeps NATS's 1 MB.
    max_payload: int | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            raise ToolMissingError("nats-server is not installed", fix="apt-get install nats-server")
        self.store.mkdir(parents=True, exist_ok=True)
        command = [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)]
        if self.max_payload is not None:  # settable only in a configuration file
            config = self.store.parent / "nats.conf"
            config.write_text(f"max_payload: {self.max_payload}\n")
            command += ["-c", str(config)]
        with (self.store.parent / "nats.log").open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        wait_for_port(self.port, 60, self.process)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


@contextlib.contextmanager
def nats_server(folder: Path, max_payload: int | None = None) -> Iterator[NatsServer]:
    """A started nats-server with JetStream storing under ``folder``."""
    server = NatsServer(port=free_port(), store=folder / "jetstream", max_payload=max_payload)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A started redis-server on 127.0.0.1 with a password, as the pools ask (no persistence, its files under
    ``folder``); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ToolMissingError("redis-server is not installed", fix="apt-get install redis-server")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    password = secrets.token_hex(16)
    config = folder / "redis.conf"  # (the password on no command line)
    config.write_text(f"requirepass {password}\n")
    config.chmod(0o600)
    command += ["--dir", str(folder), "--daemonize", "no"]
    with (
        (folder / "redis.log").open("ab") as log,
        _serving([binary, str(config), *command[1:]], port, stdout=log, stderr=log),
    ):
        yield f"redis://:{password}@127.0.0.1:{port}/0"


@contextlib.contextmanager
def nomad_double(*args: str, path: str | None = None, port: int | None = None) -> Iterator[str]:
    """The Nomad API double (``tests/nomad_double/server.py ARGS``) on ``port`` (else a free one), its raw_exec
    tasks finding commands on ``path`` (else this PATH); its address."""
    port = port or free_port()
    server = Path(__file__).resolve().parent / "nomad_double" / "server.py"
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    with _serving([sys.executable, str(server), "--port", str(port), *args], port, env=env):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def github_double(token: str, record: Path) -> Iterator[str]:
    """The double of GitHub's check-runs API (``tests/github_double/server.py``) on a free port, recording
    every request to ``record`` (JSON lines); its address."""
    port = free_port()
    server = Path(__file__).resolve().parent / "github_double" / "server.py"
    with _serving([sys.executable, str(server), "--port", str(port), "--token", token, "--record", str(record)], port):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def phala_double(engine: Any = None) -> Iterator[tuple[str, str]]:
    """The double of Phala Cloud's API (``tests/phala_double/server.py``) in this process on a free port, its
    CVMs run on ``engine`` when one is given; its API prefix and its API key."""
    import secrets
    import threading

    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parent / "phala_double"))
    from server import create_app

    key, port = secrets.token_hex(16), free_port()
    config = uvicorn.Config(create_app(key, engine), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/api/v1", key
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def _serving(command: list[str], port: int, **popen: Any) -> Iterator[None]:
    """``command`` running while the block runs, from when it listens on ``port`` (a server importing its
    framework on a machine the suite keeps busy may take a while); ended after (it has 30 s)."""
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, **popen)
    try:
        wait_for_port(port, 60, process)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)
