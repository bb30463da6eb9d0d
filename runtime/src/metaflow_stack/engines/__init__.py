"""The one launcher interface every container engine implements (``engines.nomad`` is Nomad's API, whose
callers write Nomad's own job JSON).

A caller describes a job once (``JobSpec``) and gets back a ``Job`` it can
wait on, stream logs from and kill, whichever engine runs it: local Docker
today.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from metaflow_stack.errors import StackError

#: Label every launched job carries, so leftovers can be found and removed.
JOB_LABEL = "io.metaflow-stack.job"
#: Label naming what started a job (``JobSpec.owner``): cleanup removes one owner's jobs, never all.
OWNER_LABEL = "io.metaflow-stack.owner"
#: The owner of what ``metaflow stack up`` starts, the only jobs ``metaflow stack down`` removes.
STACK_UP = "stack-up"


def one_line(name: str, value: str) -> str:
    """``value``, refused when it spans lines: Docker's env file holds one line a variable, and the only
    other way in, ``docker run``'s command line, shows the value to every user of the machine."""
    if "\n" in value or "\r" in value:
        raise StackError(
            f"{name}: its value spans lines, which a container's environment cannot be given without showing it"
            " on a command line",
            fix="give it on one line (base64-encode it, say), or put it in a file the container mounts",
        )
    return value


@dataclass(frozen=True)
class Mount:
    """A host path (or a named volume of the engine) made visible to a job at ``target``."""

    source: str
    target: str
    read_only: bool = True


def flow_mounts(root: str, flow: str, target: str | None = None) -> list[Mount]:
    """``root`` (a local datastore's, local metadata's or local cards' root: at ``target``, else at its
    own path) read-only, and ``flow``'s own folder in it writable over it (made first: an engine binds only
    what exists). A task writes only below its flow's folder (artifacts, logs, metadata, cards) and may read
    any flow's (the Client API). A sandboxed step that could write every flow's folder could change what
    their tasks load next, unchecked: their pickled artifacts, so code that runs wherever those load."""
    own = os.path.join(root, flow)
    os.makedirs(own, exist_ok=True)
    inside = target or root
    return [Mount(root, inside, read_only=True), Mount(own, os.path.join(inside, flow), read_only=False)]


@dataclass
class JobSpec:
    """What to run and with which limits; engines map it to their own terms."""

    image: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    cpu: float | None = None
    memory: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: What started the job (``STACK_UP``, ``devcontainer``, ``function-server``, ...), as a label.
    owner: str = "user"
    name: str | None = None
    network: str | None = None
    #: Container port -> host port, published on 127.0.0.1 only.
    ports: dict[int, int] = field(default_factory=dict)
    #: Secure by default: no Linux capabilities and no privilege escalation.
    cap_drop: tuple[str, ...] = ("ALL",)
    no_new_privileges: bool = True
    #: A seccomp profile (a JSON file) in place of the engine's default, for a job that needs a call it refuses.
    seccomp: str | None = None
    #: A read-only root file system (``tmpfs`` paths stay writable), and a cap on processes.
    read_only: bool = False
    tmpfs: tuple[str, ...] = ()
    pids_limit: int | None = None
    #: Docker's ``--shm-size``, ``--hostname``, ``--init`` and ``--ulimit`` (``nofile=1024:2048``).
    shm_size: str | None = None
    hostname: str | None = None
    init: bool = False
    ulimits: list[str] = field(default_factory=list)
    #: Host devices the job may use (Docker's ``--device``): an SGX enclave's ``/dev/sgx_enclave``; and the
    #: groups (numeric) its user joins to open them (``--group-add``: ``user`` alone carries no groups).
    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


class Job(Protocol):
    """A launched job."""

    id: str

    def wait(self, timeout: float | None = None) -> int:
        """Block until the job ends and return its exit code."""
        ...

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The job's output lines (stdout and stderr), following new ones if asked."""
        ...

    def streams(self, follow: bool = False) -> Iterator[tuple[str, str]]:
        """The job's output lines with the stream each came on (``stdout`` or ``stderr``)."""
        ...

    def kill(self) -> None:
        """Stop the job now and release what it holds."""
        ...

    @property
    def exit_code(self) -> int | None:
        """The exit code once the job has ended, else ``None``."""
        ...


class Engine(Protocol):
    """Something that runs jobs."""

    name: str

    def launch(self, spec: JobSpec) -> Job:
        """Start a job described by ``spec``."""
        ...

    def cleanup(self, labels: dict[str, str] | None = None) -> int:
        """Remove the jobs this engine launched that carry ``labels``; return how many."""
        ...


def host_user() -> str:
    """The uid:gid a container runs as to read and write what the user running the flow owns (the
    datastore it shares at the same path)."""
    return f"{os.getuid()}:{os.getgid()}"


def get_engine(name: str = "docker", probe: bool = True) -> Engine:
    """The engine called ``name``: how every launcher in the stack gets one. ``probe=False`` skips asking
    the engine first (a caller that knows it answered moments ago)."""
    if name == "docker":
        from metaflow_stack.engines.docker import DockerEngine

        return DockerEngine(probe)
    raise StackError(f"unknown engine {name!r}; engines: docker")
