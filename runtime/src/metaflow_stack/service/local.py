"""The local stack's metadata service, as ``just up`` starts it.

Without Docker: ``metaflow service serve`` as a background process on
127.0.0.1, SQLite in the state folder, events in process (the embedded
default). With Docker: the ``metadata-service`` image beside ``postgres`` and
``nats`` containers (images built here from Debian's packages) on a private
network; only the service is published, on 127.0.0.1. Either way the service
reads task logs under the given datastore roots (the container gets local ones
mounted read-only and runs as the host user, so it reads what that user can). Data lives in named
volumes belonging to the state folder, so ``down`` then ``up`` keeps it and
``down --purge`` drops it. Containers and their network are named after the
state folder too, and carry its label: one folder's ``up`` and ``down`` never
touch another's. Only this folder's process (``daemon``) or container counts
as the service: whatever else answers on the port is refused, never sent the
stack's key. An older release named its containers for no folder: ``up``
refuses while they run (its postgres would share this folder's volume with
a second one), ``down`` removes them. The database password is generated once, kept in
the state folder (mode 0600) beside the volumes it opens, and handed over as
an environment variable at run time: it is in no image and no log.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from rich.console import Console

from metaflow_stack.daemon import Daemon, locked, port_taken
from metaflow_stack.errors import DockerUnavailableError, StackError
from metaflow_stack.local_secrets import secret, state_dir

if TYPE_CHECKING:
    from python_on_whales import Container, DockerClient

DEFAULT_PORT = 8080
#: The containers of the Docker flavour, in start order (each named ``metaflow-stack-FOLDER-ROLE``); ``down``
#: removes them (volumes stay).
ROLES = ("postgres", "nats", "metadata-service")
#: The label naming the state folder (its digest, ``LocalService.folder``) a container of ``up`` belongs to.
FOLDER_LABEL = "io.metaflow-stack.folder"
_SERVICE_LABEL = {"io.metaflow-stack.service": "local"}
#: The containers of an older release's Docker flavour: one set per machine, labelled ``_SERVICE_LABEL`` alone
#: (no folder), their data in the same volumes as now.
OLDER_CONTAINERS = ("metaflow-stack-postgres", "metaflow-stack-nats", "metaflow-stack-metadata-service")
_PORT_FIX = "choose another with --service-port (METAFLOW_STACK_SERVICE_PORT), or stop what listens there"
_STOP_FIX = "stop it first (`metaflow stack down`)"


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
        self.home = home or state_dir() / "service"
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
    def folder(self) -> str:
        """The digest that names this state folder's volumes, containers and network, and labels them."""
        return hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:8]

    @property
    def volumes(self) -> dict[str, str]:
        """The named volumes of this state folder's PostgreSQL and NATS data."""
        return {"postgres": f"metaflow-stack-pgdata-{self.folder}", "nats": f"metaflow-stack-natsdata-{self.folder}"}

    @property
    def containers(self) -> tuple[str, ...]:
        """This state folder's containers of the Docker flavour, in ``ROLES`` order."""
        return tuple(f"metaflow-stack-{self.folder}-{role}" for role in ROLES)

    @property
    def network(self) -> str:
        return f"metaflow-stack-{self.folder}"

    @property
    def labels(self) -> dict[str, str]:
        """The labels of this state folder's containers: what ``down`` finds them by."""
        return {**_SERVICE_LABEL, FOLDER_LABEL: self.folder}

    @property
    def daemon(self) -> Daemon:
        """The service's process on SQLite."""
        return Daemon(self.home, "service")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthcheck", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, console: Console, *, use_docker: bool = True) -> RunningService:
        """Start the service (or find this folder's running); Docker gives it PostgreSQL and NATS."""
        if use_docker and self.daemon.pid() is None:  # (this folder's service on SQLite runs: that one)
            try:
                return self._start_containers(console)
            except DockerUnavailableError as exc:
                console.print(f"[yellow]{exc.message}[/]: running the metadata service on SQLite instead")
        return self._start_process(console)

    # -- embedded: a process on SQLite ---------------------------------------

    def _start_process(self, console: Console) -> RunningService:
        database = self.home / "metadata.db"
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
        with console.status(f"waiting for the metadata service on {self.url}"):
            started = self.daemon.start(
                command, self.healthy, 60, ports=(self.port,), port_fix=_PORT_FIX, stop_fix=_STOP_FIX,
                env=self._key_env(),
            )  # fmt: skip
        if not started:
            raise self._silent()
        return RunningService(self.url, f"SQLite ({database})", "in-process")

    # -- Docker: PostgreSQL and NATS beside the service -----------------------

    def _password(self) -> str:
        return secret(self.home / "postgres-password")[0]

    def _start_containers(self, console: Console) -> RunningService:
        from metaflow_stack.engines.docker import require_engine

        for root in self.log_roots:
            if not root.startswith("s3://"):
                Path(root).mkdir(parents=True, exist_ok=True)

        docker = require_engine()
        running = RunningService(self.url, f"PostgreSQL (container {self.containers[0]})", "NATS JetStream")
        with locked(self.daemon.lock):  # (the process's lock too: one `up` of this folder's service at a time)
            self.daemon.refuse_an_older_release(then=", then run up again")
            older = [c.name for c in self._older_containers(docker) if c.state.running]
            if older:
                raise StackError(f"an older release's containers run: {', '.join(older)}", fix=_STOP_FIX)
            if self._serving(docker):
                return running
            if port_taken(self.port):
                raise StackError(f"port {self.port} is in use by something else", fix=_PORT_FIX)
            self._launch(docker, console)
        return running

    def _serving(self, docker: DockerClient) -> bool:
        """Whether this folder's service container runs (its name and its folder label both this folder's) on
        this port; on another, it is refused in one line (the URL ``up`` prints would name this port)."""
        name = self.containers[2]
        if not docker.container.exists(name):
            return False
        container = docker.container.inspect(name)
        if not container.state.running or container.config.labels.get(FOLDER_LABEL) != self.folder:
            return False
        bindings = (container.host_config.port_bindings or {}).get("8080/tcp") or []
        published = sorted({binding.host_port for binding in bindings if binding.host_port})
        if str(self.port) not in published:
            raise StackError(
                f"the metadata service of {self.home} runs already, on port {', '.join(published) or 'none'}",
                fix=_STOP_FIX,
            )
        return True

    def _launch(self, docker: DockerClient, console: Console) -> None:
        from metaflow_stack import images
        from metaflow_stack.engines import STACK_UP, JobSpec, Mount, get_engine, host_user

        postgres, nats, service = self.containers
        refs = {role: images.build(role, console=console) for role in ROLES}
        if not docker.network.exists(self.network):
            docker.network.create(self.network, labels=self.labels)
        self._remove_containers(docker)
        password = self._password()
        engine = get_engine("docker")
        specs = [
            JobSpec(
                image=refs["postgres"],
                command=[],
                name=postgres,
                network=self.network,
                env={"POSTGRES_PASSWORD": password},
                mounts=[Mount(self.volumes["postgres"], "/var/lib/postgresql/data", read_only=False)],
                labels=self.labels,
                owner=STACK_UP,
            ),
            JobSpec(
                image=refs["nats"],
                command=[],
                name=nats,
                network=self.network,
                mounts=[Mount(self.volumes["nats"], "/data", read_only=False)],
                labels=self.labels,
                owner=STACK_UP,
            ),
            JobSpec(
                image=refs["metadata-service"],
                command=[],
                name=service,
                network=self.network,
                env={
                    "METAFLOW_STACK_SERVICE_DATABASE": f"postgresql://metaflow:{password}@{postgres}:5432/metaflow",
                    "METAFLOW_STACK_SERVICE_NATS_URL": f"nats://{nats}:4222",
                    "METAFLOW_STACK_SERVICE_LOG_ROOTS": " ".join(self.log_roots),
                    **self._key_env(),
                },
                ports={8080: self.port},
                # Local datastores at their own paths, read-only, read as their owner (no capabilities).
                mounts=[Mount(root, root) for root in self.log_roots if not root.startswith("s3://")],
                user=host_user(),
                labels=self.labels,
                owner=STACK_UP,
            ),
        ]
        for spec in specs[:2]:
            engine.launch(spec)
        # The service migrates at start and exits if PostgreSQL is still creating its cluster.
        self._wait_healthy(docker, postgres, console)
        engine.launch(specs[2])
        self._wait(console, lambda: docker.container.inspect(service).state.running, seconds=180)

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
        raise self._silent()

    def _silent(self) -> StackError:
        return StackError(
            f"the metadata service did not answer on {self.url}",
            fix=f"see {self.home / 'service.log'} (or `docker logs {self.containers[2]}`); "
            f"is port {self.port} taken? set METAFLOW_STACK_SERVICE_PORT",
        )

    # -- stopping -----------------------------------------------------------

    def _remove_containers(self, docker: DockerClient) -> int:
        """Remove this folder's containers (found by its label), running or not; how many."""
        present = docker.container.list(all=True, filters=[("label", f"{k}={v}") for k, v in self.labels.items()])
        if present:
            docker.container.remove(present, force=True)
        return len(present)

    def _older_containers(self, docker: DockerClient) -> list[Container]:
        """An older release's containers (``OLDER_CONTAINERS``), running or not: its names, its label, no
        folder's."""
        labelled = docker.container.list(all=True, filters=[("label", f"{k}={v}") for k, v in _SERVICE_LABEL.items()])
        return [c for c in labelled if c.name in OLDER_CONTAINERS and FOLDER_LABEL not in c.config.labels]

    def stop(self, purge: bool = False) -> bool:
        """Stop what ``start`` started (the process, or this folder's containers), and an older release's
        containers as its ``down`` did; ``purge`` also drops the data. A network something else is attached
        to stays, refused in one line naming what (once the rest is done)."""
        from python_on_whales.exceptions import DockerException

        from metaflow_stack.engines.docker import require_engine

        stopped = self.daemon.stop()
        try:
            docker = require_engine()
        except DockerUnavailableError:
            return stopped
        older = self._older_containers(docker)
        if older:
            docker.container.remove(older, force=True)
        removed = self._remove_containers(docker) + len(older)
        if purge:
            volumes = [v for v in self.volumes.values() if docker.volume.exists(v)]
            if volumes:
                docker.volume.remove(volumes)
            (self.home / "metadata.db").unlink(missing_ok=True)
            (self.home / "postgres-password").unlink(missing_ok=True)
        if docker.network.exists(self.network):
            try:
                docker.network.remove(self.network)
            except DockerException as exc:
                attached = sorted(
                    c.name or key for key, c in (docker.network.inspect(self.network).containers or {}).items()
                )
                raise StackError(
                    f"the network {self.network} stays: {', '.join(attached) or 'something'} is attached to it",
                    fix=f"disconnect it (`docker network disconnect {self.network} NAME`), then run "
                    "`metaflow stack down` again",
                ) from exc
        return stopped or bool(removed)
