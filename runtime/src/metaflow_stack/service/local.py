"""The local stack's metadata service, as ``just up`` starts it.

Without Docker: ``metaflow service serve`` as a background process on
127.0.0.1, SQLite in the state folder, events in process (the embedded
default). With Docker: the ``metadata-service`` image beside ``postgres`` and
``nats`` containers (images built here from Debian's packages) on a private
network; only the service is published, on 127.0.0.1. Either way the service
reads task logs under the given datastore roots (the container gets local ones
mounted read-only and runs as the host user, so it reads what that user can). Data lives in named
volumes belonging to the state folder, so ``down`` then ``up`` keeps it and
``down --purge`` drops it. The database password is generated once, kept in
the state folder (mode 0600) beside the volumes it opens, and handed over as
an environment variable at run time: it is in no image and no log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from metaflow_stack import settings
from metaflow_stack.daemon import running_pid
from metaflow_stack.errors import DockerUnavailableError, StackError
from metaflow_stack.local_secrets import secret

DEFAULT_PORT = 8080
NETWORK = "metaflow-stack"
#: Containers of the Docker flavour, in start order; ``down`` removes them (volumes stay).
CONTAINERS = ("metaflow-stack-postgres", "metaflow-stack-nats", "metaflow-stack-metadata-service")
_LABEL = {"io.metaflow-stack.service": "local"}


@dataclass(frozen=True)
class RunningService:
    """Where the local service answers and what it runs on."""

    url: str
    storage: str
    events: str


class LocalService:
    """Starts and stops the local stack's metadata service."""

    def __init__(
        self,
        home: Path | None = None,
        port: int = DEFAULT_PORT,
        log_roots: tuple[str, ...] = (),
        auth_key: str | None = None,
    ) -> None:
        self.home = home or settings.load().state_dir / "service"
        self.port = port
        #: Datastore roots whose task logs the service may read (local folders are mounted read-only).
        self.log_roots = log_roots
        #: The key every request but the health check must carry (``local_secrets.stack_key``).
        self.auth_key = auth_key

    def _key_env(self) -> dict[str, str]:
        return {"METAFLOW_STACK_SERVICE_AUTH_KEY": self.auth_key} if self.auth_key else {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def volumes(self) -> dict[str, str]:
        """The named volumes of this state folder's PostgreSQL and NATS data."""
        suffix = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:8]
        return {"postgres": f"metaflow-stack-pgdata-{suffix}", "nats": f"metaflow-stack-natsdata-{suffix}"}

    @property
    def _pidfile(self) -> Path:
        return self.home / "service.pid"

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthcheck", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, console: Console, *, use_docker: bool = True) -> RunningService:
        """Start the service (or find it running); Docker gives it PostgreSQL and NATS."""
        if use_docker:
            try:
                return self._start_containers(console)
            except DockerUnavailableError as exc:
                console.print(f"[yellow]{exc.message}[/]: running the metadata service on SQLite instead")
        return self._start_process(console)

    # -- embedded: a process on SQLite ---------------------------------------

    def _start_process(self, console: Console) -> RunningService:
        database = self.home / "metadata.db"
        running = RunningService(self.url, f"SQLite ({database})", "in-process")
        if self.healthy():
            return running
        self.home.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).with_name("metaflow")),
            "service",
            "serve",
            "--database",
            str(database),
            "--port",
            str(self.port),
            *[arg for root in self.log_roots for arg in ("--log-root", root)],
        ]
        with (self.home / "service.log").open("ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self._key_env()},
            )
        self._pidfile.write_text(str(process.pid))
        self._wait(console, lambda: process.poll() is None)
        return running

    # -- Docker: PostgreSQL and NATS beside the service -----------------------

    def _password(self) -> str:
        return secret(self.home / "postgres-password")[0]

    def _start_containers(self, console: Console) -> RunningService:
        from metaflow_stack import images
        from metaflow_stack.engines import STACK_UP, JobSpec, Mount, get_engine, host_user
        from metaflow_stack.engines.docker import require_engine

        for root in self.log_roots:
            if not root.startswith("s3://"):
                Path(root).mkdir(parents=True, exist_ok=True)

        docker = require_engine()
        running = RunningService(self.url, "PostgreSQL (container metaflow-stack-postgres)", "NATS JetStream")
        if self.healthy():
            return running
        refs = {name: images.build(name, console=console) for name in ("postgres", "nats", "metadata-service")}
        if not docker.network.exists(NETWORK):
            docker.network.create(NETWORK)
        for name in CONTAINERS:
            if docker.container.exists(name):
                docker.container.remove(name, force=True)
        password = self._password()
        engine = get_engine("docker")
        specs = [
            JobSpec(
                image=refs["postgres"],
                command=[],
                name=CONTAINERS[0],
                network=NETWORK,
                env={"POSTGRES_PASSWORD": password},
                mounts=[Mount(self.volumes["postgres"], "/var/lib/postgresql/data", read_only=False)],
                labels=_LABEL,
                owner=STACK_UP,
            ),
            JobSpec(
                image=refs["nats"],
                command=[],
                name=CONTAINERS[1],
                network=NETWORK,
                mounts=[Mount(self.volumes["nats"], "/data", read_only=False)],
                labels=_LABEL,
                owner=STACK_UP,
            ),
            JobSpec(
                image=refs["metadata-service"],
                command=[],
                name=CONTAINERS[2],
                network=NETWORK,
                env={
                    "METAFLOW_STACK_SERVICE_DATABASE": f"postgresql://metaflow:{password}@{CONTAINERS[0]}:5432/metaflow",
                    "METAFLOW_STACK_SERVICE_NATS_URL": f"nats://{CONTAINERS[1]}:4222",
                    "METAFLOW_STACK_SERVICE_LOG_ROOTS": " ".join(self.log_roots),
                    **self._key_env(),
                },
                ports={8080: self.port},
                # Local datastores at their own paths, read-only, read as their owner (no capabilities).
                mounts=[Mount(root, root) for root in self.log_roots if not root.startswith("s3://")],
                user=host_user(),
                labels=_LABEL,
                owner=STACK_UP,
            ),
        ]
        for spec in specs[:2]:
            engine.launch(spec)
        # The service migrates at start and exits if PostgreSQL is still creating its cluster.
        self._wait_healthy(docker, CONTAINERS[0], console)
        engine.launch(specs[2])
        self._wait(console, lambda: docker.container.inspect(CONTAINERS[2]).state.running, seconds=180)
        return running

    def _wait_healthy(self, docker, name: str, console: Console, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        with console.status(f"waiting for {name}"):
            while time.monotonic() < deadline:
                state = docker.container.inspect(name).state
                if state.health is not None and state.health.status == "healthy":
                    return
                if not state.running:
                    break
                time.sleep(0.5)
        raise StackError(f"{name} did not become healthy", fix=f"see `docker logs {name}`")

    def _wait(self, console: Console, alive, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        with console.status(f"waiting for the metadata service on {self.url}"):
            while time.monotonic() < deadline:
                if self.healthy():
                    return
                if not alive():
                    break
                time.sleep(0.3)
        raise StackError(
            f"the metadata service did not answer on {self.url}",
            fix=f"see {self.home / 'service.log'} (or `docker logs {CONTAINERS[2]}`); "
            f"is port {self.port} taken? set METAFLOW_STACK_SERVICE_PORT",
        )

    # -- stopping -----------------------------------------------------------

    def stop(self, purge: bool = False) -> bool:
        """Stop what ``start`` started (the process, or the containers); ``purge`` also drops the data."""
        stopped = False
        if self._pidfile.exists():
            pid = running_pid(self._pidfile)
            with contextlib.suppress(ProcessLookupError):  # (ended since)
                if pid is not None:
                    os.kill(pid, signal.SIGTERM)
                    stopped = True
            self._pidfile.unlink()
        try:
            from metaflow_stack.engines.docker import require_engine

            docker = require_engine()
        except DockerUnavailableError:
            return stopped
        present = [name for name in CONTAINERS if docker.container.exists(name)]
        if present:
            docker.container.remove(present, force=True)
        if purge:
            volumes = [v for v in self.volumes.values() if docker.volume.exists(v)]
            if volumes:
                docker.volume.remove(volumes)
            (self.home / "metadata.db").unlink(missing_ok=True)
            (self.home / "postgres-password").unlink(missing_ok=True)
        return stopped or bool(present)
