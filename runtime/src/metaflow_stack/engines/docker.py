"""Jobs as containers on the local Docker engine, through python-on-whales."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tempfile
import time
from collections.abc import Iterator

from python_on_whales import Container, DockerClient
from python_on_whales.client_config import ClientNotFoundError
from python_on_whales.exceptions import DockerException, NoSuchContainer

from metaflow_stack import settings
from metaflow_stack.engines import JOB_LABEL, OWNER_LABEL, JobSpec, one_line
from metaflow_stack.errors import DockerUnavailableError, StackError

#: The message (and fix) every caller shows when no engine answers.
NO_ENGINE_FIX = (
    "start a Docker engine (Docker Desktop, `sudo systemctl start docker`, or `sudo dockerd &`), "
    "then check that `docker info` answers"
)

_POLL_SECONDS = 0.1


def client() -> DockerClient:
    """A client for the configured ``docker`` binary."""
    binary = settings.load().docker_client or "docker"
    return DockerClient(client_call=[binary])


def engine_version(docker: DockerClient | None = None) -> str:
    """The engine's server version; raises ``DockerUnavailableError`` when none answers."""
    docker = docker or client()
    try:
        return docker.system.info().server_version or "unknown"
    except ClientNotFoundError as exc:
        raise DockerUnavailableError("the docker command is not installed", fix=NO_ENGINE_FIX) from exc
    except DockerException as exc:
        raise DockerUnavailableError("no Docker engine answers", fix=NO_ENGINE_FIX) from exc


#: The names ``docker info`` gives an engine's architecture, to one name each (the kernel's).
_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


def machine(docker: DockerClient) -> str:
    """The engine's architecture by the kernel's name (``x86_64``, ``aarch64``), whichever name it reports."""
    reported = docker.system.info().architecture or ""
    return _MACHINES.get(reported, reported)


def require_engine() -> DockerClient:
    """A client whose engine answers, or the one error every caller shows."""
    docker = client()
    engine_version(docker)
    return docker


def host_address(docker: DockerClient | None = None) -> str:
    """Where a container on the default bridge network reaches this host: the address Docker's
    ``host-gateway`` stands for, the bridge's gateway. Some engines report only the bridge's subnet;
    the gateway is then the subnet's first address, which is the one Docker gives it."""
    return gateway_of((docker or require_engine()).network.inspect("bridge").ipam.config)


def gateway_of(config: list[dict[str, str]]) -> str:
    """The gateway of a network from its IPAM config entries (``Gateway``, else from ``Subnet``)."""
    for entry in config:
        if entry.get("Gateway"):
            return entry["Gateway"]
    for entry in config:
        subnet = ipaddress.ip_network(entry.get("Subnet", ""), strict=False) if entry.get("Subnet") else None
        if subnet is not None and subnet.version == 4:
            return str(next(subnet.hosts()))
    raise StackError(
        "Docker reports neither a gateway nor a subnet for its bridge network",
        fix="check `docker network inspect bridge`; restart the engine to recreate the bridge",
    )


def _lines(chunks: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, str]]:
    """Reassemble streamed output chunks into (stream, line) pairs, per stream."""
    pending: dict[str, bytes] = {}
    for source, chunk in chunks:
        buffered = pending.get(source, b"") + chunk
        *complete, rest = buffered.split(b"\n")
        pending[source] = rest
        for line in complete:
            yield source, line.decode(errors="replace")
    for source, rest in pending.items():
        if rest:
            yield source, rest.decode(errors="replace")


@contextlib.contextmanager
def _env_file(env: dict[str, str]) -> Iterator[str]:
    """The job's environment in a file only this user can read, removed once the container is created:
    values on ``docker run``'s command line would be visible to every user of the machine (``ps``), so a
    value the file cannot hold (``one_line``) is refused rather than put there."""
    lines = "".join(f"{name}={one_line(f'variable {name}', value)}\n" for name, value in env.items())
    with tempfile.NamedTemporaryFile("w", prefix="stack-env-", suffix=".list") as handle:
        os.chmod(handle.name, 0o600)
        handle.write(lines)
        handle.flush()
        yield handle.name


class DockerJob:
    """One container; it stays until ``remove()`` so its exit code can be read."""

    def __init__(self, docker: DockerClient, container_id: str) -> None:
        self._docker = docker
        self.id = container_id

    def wait(self, timeout: float | None = None) -> int:
        """Block until the container exits; ``TimeoutError`` after ``timeout`` seconds."""
        if timeout is None:
            return int(self._docker.container.wait(self.id))
        deadline = time.monotonic() + timeout
        while (code := self.exit_code) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id[:12]} still running after {timeout}s")
            time.sleep(_POLL_SECONDS)
        return code

    def logs(self, follow: bool = False) -> Iterator[str]:
        """Output lines of the container, stdout and stderr interleaved as written."""
        return (line for _, line in self.streams(follow))

    def streams(self, follow: bool = False) -> Iterator[tuple[str, str]]:
        """Output lines of the container with the stream each came on (``stdout`` or ``stderr``)."""
        return _lines(self._docker.container.logs(self.id, follow=follow, stream=True))

    def kill(self) -> None:
        """Kill the container if it still runs, then remove it."""
        with contextlib.suppress(NoSuchContainer):
            self._docker.container.remove(self.id, force=True)

    def remove(self) -> None:
        """Remove the (ended) container."""
        self.kill()

    @property
    def exit_code(self) -> int | None:
        state = self._docker.container.inspect(self.id).state
        return None if state.running or state.status == "created" else int(state.exit_code)


def _security_options(spec: JobSpec) -> list[str]:
    """Docker's ``--security-opt`` values for ``spec``."""
    options = ["no-new-privileges"] if spec.no_new_privileges else []
    return options + ([f"seccomp={spec.seccomp}"] if spec.seccomp else [])


#: What the engine says when a port to publish is another process's.
_PORT_TAKEN = ("port is already allocated", "address already in use")


class DockerEngine:
    """Runs ``JobSpec``s as containers."""

    name = "docker"

    def __init__(self, probe: bool = True) -> None:
        """``probe=False`` skips asking the engine first (a caller that knows it answered moments ago);
        an engine gone since then still fails ``launch`` with the engine's own words."""
        self._docker = require_engine() if probe else client()

    def launch(self, spec: JobSpec) -> DockerJob:
        """Start a detached container for ``spec``."""
        with _env_file(spec.env) as env_file:
            return self._launch(spec, env_file)

    def _launch(self, spec: JobSpec, env_file: str) -> DockerJob:
        # The engine's own labels last: a job's labels cannot hide it from cleanup or pass it off as another owner's.
        labels = {**spec.labels, JOB_LABEL: "true", OWNER_LABEL: spec.owner}
        try:
            container = self._docker.run(
                spec.image,
                spec.command,
                detach=True,
                env_files=[env_file],
                volumes=[(m.source, m.target, "ro" if m.read_only else "rw") for m in spec.mounts],
                workdir=spec.workdir,
                user=spec.user,
                cpus=spec.cpu,
                memory=spec.memory,
                labels=labels,
                name=spec.name,
                networks=[spec.network] if spec.network else [],
                publish=[(f"127.0.0.1:{host}", container) for container, host in spec.ports.items()],
                cap_drop=list(spec.cap_drop),
                security_options=_security_options(spec),
                read_only=spec.read_only,
                tmpfs=list(spec.tmpfs),
                pids_limit=spec.pids_limit,
                shm_size=spec.shm_size,
                hostname=spec.hostname,
                init=spec.init,
                ulimit=spec.ulimits,
                devices=list(spec.devices),
                groups_add=list(spec.groups),
            )
        except DockerException as exc:
            said = str(exc.stderr or exc)
            taken = spec.ports and any(words in said for words in _PORT_TAKEN)
            raise StackError(
                f"could not start a container from {spec.image}: {said}".strip(),
                fix=f"another process holds port {', '.join(map(str, spec.ports.values()))}: choose another"
                if taken
                else "check the image name with `metaflow stack images list` and the job's limits",
            ) from exc
        return DockerJob(self._docker, container.id)

    def containers(self, labels: dict[str, str | None] | None = None) -> list[Container]:
        """The containers this runtime launched that carry ``labels`` (a None value: any value)."""
        wanted = {JOB_LABEL: "true", **(labels or {})}
        filters = [("label", k if v is None else f"{k}={v}") for k, v in wanted.items()]
        return self._docker.container.list(all=True, filters=filters)

    def remove(self, containers: list[Container]) -> int:
        """Remove ``containers``, running or not; how many."""
        if containers:
            self._docker.container.remove(containers, force=True)
        return len(containers)

    def cleanup(self, labels: dict[str, str] | None = None) -> int:
        """Remove every container this runtime launched that carries ``labels``."""
        return self.remove(self.containers(labels))
