"""What of this machine a task run elsewhere (a pod, a container, a Nomad job) takes, and what it must not:
the run's Metaflow settings go; what names this machine (its paths, its files, its profile) stays."""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaflow_stack.errors import StackError

if TYPE_CHECKING:
    from metaflow_stack.engines.docker import DockerEngine

#: Variables of a task's environment that describe the runtime's machine, not the one a pod or container is.
MACHINE_VARIABLES = frozenset(
    {"PATH", "HOME", "PWD", "OLDPWD", "SHELL", "TMPDIR", "HOSTNAME", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    | {"LD_LIBRARY_PATH", "LD_PRELOAD", "CONDA_PREFIX", "SSH_AUTH_SOCK", "XDG_RUNTIME_DIR", "DISPLAY", "TERM"}
    | {"TMP", "TEMP", "KUBECONFIG"}
)

#: Variables naming a file of the runtime's machine: kept only where this machine has that file too.
MACHINE_FILES = frozenset(
    {"SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "AWS_CA_BUNDLE", "METAFLOW_HOME"}
    | {"AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "GOOGLE_APPLICATION_CREDENTIALS"}
)

#: Variables that are the stack's own, not Metaflow's settings: nothing elsewhere gets them.
NOT_SETTINGS = ("METAFLOW_STACK_",)
#: Variables that name this machine's Metaflow configuration rather than hold it.
PROFILE_VARIABLES = frozenset({"METAFLOW_PROFILE", "METAFLOW_HOME"})


def machine() -> str:
    """This machine as what it launched elsewhere names it (``host/boot``): its host name and, where the kernel
    tells, its boot (host names repeat across containers and laptops; a pid is only this boot's), so what a
    launcher killed outright left running can be told from what a live one still watches."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


@dataclass(frozen=True)
class Launcher:
    """The process that keeps a task running elsewhere (a container, a Nomad job, a CVM), as what it launched
    names it: Ctrl-C or SIGTERM have it remove what it launched; SIGKILL, a crash or a reboot do not, so a
    later run's sweep removes what a launcher that is gone left. Its machine (``host/boot``), pid and start
    (``started_at``) tell it from a live one: a pid is reused, its start is not."""

    machine: str
    pid: int
    started: float

    @classmethod
    def this(cls) -> Launcher:
        return cls(machine(), os.getpid(), started_at(os.getpid()))

    @property
    def label(self) -> str:
        """As one string for a container's label or a job's ``Meta``: ``host/boot:pid:started``."""
        return f"{self.machine}:{self.pid}:{self.started:.3f}"

    @classmethod
    def parse(cls, label: object) -> Launcher | None:
        """The launcher a ``label`` names; None for one that names none (another tool's, an older build's):
        it is not judged."""
        if not isinstance(label, str):
            return None
        parts = label.rsplit(":", 2)
        if len(parts) != 3 or "/" not in parts[0]:
            return None
        try:
            pid, started = int(parts[1]), float(parts[2])
        except ValueError:
            return None
        return cls(parts[0], pid, started) if pid > 0 else None

    def gone(self) -> bool:
        """Whether the launcher has ended, judged on its own host only (a state folder or an engine shared
        between hosts: each judges its own): after a reboot it has; on this boot, when no live process of
        its pid started when it did."""
        import psutil

        host, _, boot = self.machine.partition("/")
        here_host, _, here_boot = machine().partition("/")
        if host != here_host:
            return False
        if boot != here_boot:
            return True
        try:
            return abs(started_at(self.pid) - self.started) > 0.5
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:  # not ours to ask: taken as alive (removing what a live one watches is worse)
            return False


def orphans(engine: DockerEngine, label: str, owner: str) -> list[Any]:
    """The containers labelled ``label`` whose launcher (named by their ``owner`` label) on this host no
    longer runs: what a launcher killed outright left."""
    found = []
    for container in engine.containers({label: None}):
        launcher = Launcher.parse(container.config.labels.get(owner))
        if launcher is not None and launcher.gone():
            found.append(container)
    return found


def remove_orphans(engine: DockerEngine, label: str, owner: str) -> int:
    """Remove the ``orphans``; how many."""
    return engine.remove(orphans(engine, label, owner))


def started_at(pid: int) -> float:
    """When process ``pid`` started, in what no clock step changes where the kernel tells it: clock ticks
    since boot (``/proc/PID/stat``'s 22nd field), else psutil's creation time. ``psutil.NoSuchProcess`` for
    none, or for a zombie (it has ended; only its parent has not read its end)."""
    import psutil

    if not Path("/proc/self/stat").is_file():
        return psutil.Process(pid).create_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None
    if fields[0] == "Z":
        raise psutil.NoSuchProcess(pid)
    return float(fields[19])


def metaflow_settings() -> dict[str, str]:
    """The run's Metaflow settings, which a pod or job needs before it imports Metaflow (Metaflow reads them once,
    at import: a task's own variables come too late for its S3 endpoint, say): the configuration
    profile's values and this process's ``METAFLOW_*`` variables over them, less the stack's own (its
    keys and the pool's settings: the pods need none of them) and those naming a file or profile of this
    machine (the pods have no ``config_<profile>.json``: its values are here already)."""
    from metaflow.metaflow_config_funcs import METAFLOW_CONFIG

    settings = {**METAFLOW_CONFIG, **{k: v for k, v in os.environ.items() if k.startswith("METAFLOW_")}}
    return {
        name: value if isinstance(value, str) else json.dumps(value)
        for name, value in settings.items()
        if not name.startswith(NOT_SETTINGS) and name not in MACHINE_FILES and name not in PROFILE_VARIABLES
    }


def foreach_body(graph: Any, step: str) -> bool:
    """Whether ``step`` of Metaflow's ``graph`` runs a foreach's items: the steps ``--with worker_pool`` sends
    to a pool elsewhere (it leaves the others alone)."""
    return any(graph[parent].type == "foreach" for parent in graph[step].in_funcs)


def step_environment(obj: Any, step_name: str) -> dict[str, str]:
    """The step's ``@environment`` variables (``obj``: a trampoline's click ``obj``)."""
    node = obj.graph[step_name]
    environment = next((d.attributes["vars"] for d in node.decorators if d.name == "environment"), {})
    return {str(k): str(v) for k, v in environment.items()}


def task_variables(obj: Any, step_name: str, package: tuple[str, str, str], extra: dict[str, str]) -> dict[str, str]:
    """The variables of a task run elsewhere, as Metaflow's ``@kubernetes`` sets them: the run's settings,
    the step's ``@environment``, the trampoline's ``extra``, the code package (``package``: its metadata,
    sha and URL), who runs it and how it records (``obj``: a trampoline's click ``obj``)."""
    from metaflow.util import get_username

    metadata, sha, url = package
    datastore = obj.flow_datastore.TYPE
    return {
        **metaflow_settings(),
        **step_environment(obj, step_name),
        **extra,
        "METAFLOW_CODE_METADATA": metadata,
        "METAFLOW_CODE_SHA": sha,
        "METAFLOW_CODE_URL": url,
        "METAFLOW_CODE_DS": datastore,
        "METAFLOW_USER": get_username() or "unknown",
        "METAFLOW_DEFAULT_DATASTORE": datastore,
        "METAFLOW_DEFAULT_METADATA": obj.metadata.TYPE,
        "METAFLOW_FLOW_FILENAME": os.path.basename(sys.argv[0]),
    }


def task_command(
    environment: Any,
    datastore: tuple[str, str],
    ids: dict[str, Any],
    package: tuple[str, str],
    step_cli: str,
    *,
    workdir: str,
    logs: str,
    after: str = "",
    before_extracting: str = "",
    before_step: str = "",
) -> list[str]:
    """A task's command elsewhere, as Metaflow's ``@kubernetes`` builds it: capture logs (in ``logs``), fetch
    and unpack the code package (``package``: its metadata and URL) in ``workdir``, bootstrap the step's
    environment, run ``step_cli`` (a shell command line, each value quoted), save the logs, run ``after``
    (bash, the step's exit code in ``$c``), exit with the step's code; ``before_extracting`` (bash) runs on
    the fetched package (``job.tar``, in the working folder) before anything of it is unpacked,
    ``before_step`` (bash) once it is unpacked, before the environment's bootstrap; one ``bash
    -c`` line, quoted as Metaflow's commands expect (they are written to go through ``shlex`` inside double
    quotes: ``step_cli`` is escaped for them, ``in_double_quotes``)."""
    from metaflow.mflog import BASH_SAVE_LOGS, bash_capture_logs, export_mflog_env_vars

    datastore_type, datastore_root = datastore  # (the root: where the logs are saved, as the run's CLI named it)
    mflog = export_mflog_env_vars(
        flow_name=ids["flow"],
        run_id=ids["run_id"],
        step_name=ids["step"],
        task_id=ids["task_id"],
        retry_count=ids["attempt"],
        datastore_type=datastore_type,
        datastore_root=datastore_root,
        stdout_path=f"{logs}/stdout.log",
        stderr_path=f"{logs}/stderr.log",
    )
    metadata, url = package
    commands = environment.get_package_commands(url, datastore_type, metadata)
    if before_extracting:
        from metaflow.package import MetaflowPackage

        extract = MetaflowPackage.get_extract_commands(metadata, "job.tar", dest_dir=".")
        at = next((i for i in range(len(commands)) if commands[i : i + len(extract)] == extract), None)
        if at is None:  # Metaflow fetches its package otherwise than this runtime knows: never skip the check
            raise StackError("Metaflow's package commands do not unpack job.tar as expected", fix="report this")
        commands = [*commands[:at], before_extracting, *commands[at:]]
    init = " && ".join([*commands, *([before_step] if before_step else [])])
    bootstrap = environment.bootstrap_commands(ids["step"], datastore_type)
    step = bash_capture_logs(" && ".join([*bootstrap, in_double_quotes(step_cli)]))
    then = f"; {after}" if after else ""
    script = (
        f"mkdir -p {logs} {workdir} && cd {workdir} && {mflog} && {init} && {step}; c=$?; {BASH_SAVE_LOGS}{then}; "
        "exit $c"
    )
    return shlex.split(f'bash -c "{script}"')


def in_double_quotes(command: str) -> str:
    """``command``, a shell command line, escaped for the ``bash -c "..."`` Metaflow's commands are written
    for (``shlex`` splits it, reading a backslash and a double quote inside the double quotes as escaped): a
    value whose shell quoting holds a ``"`` (Metaflow quotes ``bob's`` as ``'bob'"'"'s'``) closed the double
    quotes, and the task failed to start, or read part of the value as shell."""
    return command.replace("\\", "\\\\").replace('"', '\\"')


def bring_back_metadata(obj: Any, run_id: str, step_name: str, task_id: str) -> str | None:
    """With local metadata, the task's records its run elsewhere wrote into the datastore, copied to this
    machine (as Metaflow's ``@kubernetes`` does); ``None``, or why there were none."""
    if obj.metadata.TYPE != "local":
        return None
    from metaflow.metadata_provider.util import sync_local_metadata_from_datastore
    from metaflow.metaflow_config import DATASTORE_LOCAL_DIR

    try:
        task_datastore = obj.flow_datastore.get_task_datastore(run_id, step_name, task_id)
        sync_local_metadata_from_datastore(DATASTORE_LOCAL_DIR, task_datastore)
    except Exception as exc:  # a task that never ran wrote none: its ending says why
        return f"no metadata to bring back ({type(exc).__name__})"
    return None
