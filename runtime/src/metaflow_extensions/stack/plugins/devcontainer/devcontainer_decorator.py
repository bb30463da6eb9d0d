"""``@devcontainer``: run a step's tasks in containers: sandboxed in Docker on this machine (the
default), or in DevPod workspaces or Daytona sandboxes (``backend=``).

Follows Metaflow's compute-decorator contract: the runtime launches each
task as ``devcontainer step ...`` (the trampoline in ``devcontainer_cli``)
instead of the step itself, with the code package saved once in the
datastore; the trampoline runs the real step command in a container and
exits with its code, so ``@retry``, ``@catch`` and foreach work unchanged
(a ``@catch`` fallback attempt runs as a plain local task, as with
``@kubernetes``).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from metaflow._vendor import click
from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException

from metaflow_stack.trampolines import Trampolined, save_package_once

if TYPE_CHECKING:
    from metaflow_stack.engines import Job

#: Carries what a devcontainer.json adds to each task's container to the trampoline, as JSON.
TASK_CONTAINER_VARIABLE = "METAFLOW_STACK_DEVCONTAINER_TASK"
#: Set for a task's trampoline and its container: the run's start checked everything step_init would.
CHECKED_VARIABLE = "METAFLOW_STACK_DEVCONTAINER_CHECKED"
#: The options the trampoline takes, in the decorator's words.
OPTIONS = ("image", "network", "cpu", "memory", "read_only", "pids", "backend", "provider")
#: Where a step's container runs: this machine's Docker engine, a DevPod workspace, a Daytona sandbox.
BACKENDS = ("docker", "devpod", "daytona")


#: What a step's container needs from the host's environment (it starts with nothing else).
FORWARDED = ("USER", "USERNAME", "METAFLOW_USER", "LANG", "TZ")


def container_env(code_metadata: str, code_sha: str, code_url: str, datastore: str) -> dict[str, str]:
    """The variables every container of a step starts with: the host's user and locale, the code package,
    and the mark that the run's start checked the step."""
    env = {name: os.environ[name] for name in FORWARDED if name in os.environ}
    env.update(
        METAFLOW_CODE_METADATA=code_metadata,
        METAFLOW_CODE_SHA=code_sha,
        METAFLOW_CODE_URL=code_url,
        METAFLOW_CODE_DS=datastore,
        METAFLOW_FLOW_FILENAME=os.path.basename(sys.argv[0]),
        **{CHECKED_VARIABLE: "1"},
    )
    return env


def _inline_cache() -> Path:
    from metaflow_stack import settings

    return settings.load().state_dir / "devcontainer" / "inline"


def _check_environment(environment: Any, decos: list[Any]) -> None:
    """A step's own environment (``--environment pypi|conda``) is not made in its container, which runs the
    image's Python: refused, not silently missing; ``generate`` puts it in the step's image."""
    from metaflow_stack.errors import StackError
    from metaflow_stack.solved_environment import has_own

    if has_own(environment, decos):
        raise StackError(
            f"its {environment.TYPE} environment would not be in the container, which runs its image's Python",
            fix=f"metaflow devcontainer generate {os.path.basename(sys.argv[0])}, then @devcontainer(config=...) "
            "in place of @pypi/@conda; or @pypi(disabled=True)",
        )


def _metadata_type() -> str | None:
    """The run's metadata provider (``local``, ``service``): Metaflow's command holds it, hooks are not told."""
    context = click.get_current_context(silent=True)
    metadata = getattr(getattr(context, "obj", None), "metadata", None)
    return getattr(metadata, "TYPE", None)


class DevcontainerException(MetaflowException):
    headline = "@devcontainer"


class DevcontainerDecorator(Trampolined, StepDecorator):
    """Run this step in a container of ``image`` (default: the stack's ``base`` image, built if needed),
    or of the image a devcontainer.json describes (``config``, relative to the flow's file); features:
    Development Container features to add to the image ({"./folder" or a published id: options}).

    network: "none" (default) or "bridge"; read_only: a read-only root file system (default True);
    cpu, memory ("2g"), pids (default 512): limits. The container runs as the host user with every
    capability dropped and no privilege escalation; the local datastore is mounted at its own path.
    backend: "docker" (default), "devpod" (a DevPod workspace per task, on ``provider`` or DevPod's
    default one; the provider makes the container, so the sandbox settings above do not apply) or
    "daytona" (a Daytona sandbox per task, sized by cpu and memory).
    """

    name = "devcontainer"
    defaults: ClassVar[dict[str, Any]] = {
        "config": None,
        "image": None,
        "features": None,
        "network": "none",
        "cpu": None,
        "memory": None,
        "read_only": True,
        "pids": 512,
        "backend": "docker",
        "provider": None,
    }
    #: The default image's reference, resolved once per run (its tag hashes the image's sources).
    default_image: ClassVar[str | None] = None
    #: Per devcontainer.json (path and digest): its image (by ID: ``image.build``) and task settings, prepared
    #: once per run.
    prepared: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {}
    swept: ClassVar[bool] = False

    def step_init(self, flow, graph, step, decos, environment, flow_datastore, logger) -> None:
        self.flow_datastore, self.step, self.config, self.decos = flow_datastore, step, None, decos
        if os.environ.get(CHECKED_VARIABLE):
            return  # in a task's trampoline or container: the run's start checked everything already
        from pydantic import TypeAdapter

        from metaflow_stack.devcontainer.policy import SandboxPolicy
        from metaflow_stack.errors import StackError

        others = [d.name for d in decos if d.name in ("kubernetes", "batch", "nomad")]
        if others:
            raise DevcontainerException(f"step {step}: @devcontainer cannot be combined with @{others[0]}")
        try:
            a = self.attributes
            try:  # (--with devcontainer:read_only=False gives the text "False": read as pydantic reads a flag)
                limits = {
                    "read_only": TypeAdapter(bool).validate_python(a["read_only"]),
                    "cpu": float(a["cpu"]) if a["cpu"] is not None else None,
                    "pids": int(a["pids"]),
                }
            except (TypeError, ValueError, OverflowError):
                raise StackError(
                    f"@devcontainer read_only={a['read_only']!r}, cpu={a['cpu']!r}, pids={a['pids']!r}: "
                    "read_only must be true or false, cpu and pids numbers",
                    fix="e.g. @devcontainer(read_only=False, cpu=2, pids=512)",
                ) from None
            self.policy = SandboxPolicy(
                network=self.attributes["network"],
                memory=str(self.attributes["memory"]) if self.attributes["memory"] is not None else None,
                **limits,
            )
            self._check_backend(flow_datastore.TYPE, _metadata_type())
            self.config = self._check_config(flow)
            _check_environment(environment, decos)
        except StackError as exc:
            raise DevcontainerException(f"step {step}: {exc}") from None

    def _check_backend(self, datastore: str, metadata: str | None) -> None:
        from metaflow_stack.devcontainer import daytona_sandbox, devpod, stores
        from metaflow_stack.errors import StackError

        backend = self.attributes["backend"]
        if backend not in BACKENDS:
            raise StackError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}", fix='use backend="docker"')
        if backend == "docker":
            stores.check(datastore, self.policy.network, metadata)
            return
        devpod.binary() if backend == "devpod" else daytona_sandbox.require()
        stores.check_remote(backend, datastore, metadata)
        if backend == "daytona":
            stores.check(datastore, self.policy.network, metadata)  # the sandbox's network is blocked with "none"
        if self.attributes["config"] is None and self.attributes["image"] is None:
            raise StackError(
                f"a {backend} workspace needs image= or config=: this machine's base image is not where it runs",
                fix="give config= (a devcontainer.json) or image= (a published image)",
            )

    def _check_config(self, flow) -> tuple[Path, Any, str] | None:
        """The step's devcontainer.json, read and checked now so a mistake stops the run before it starts."""
        from metaflow_stack.devcontainer import inline, spec, task_container
        from metaflow_stack.errors import StackError

        flow_dir = Path(sys.modules[flow.__module__].__file__).parent
        if self.attributes["features"]:
            if self.attributes["config"] is not None:
                raise StackError("give config= or features=, not both", fix="put the features in the devcontainer.json")
            path = inline.write(self.attributes["image"], self.attributes["features"], flow_dir, _inline_cache())
            self.attributes["image"] = None  # it is in the configuration now
        elif self.attributes["config"] is None:
            return None
        elif self.attributes["image"] is not None:
            raise StackError("give config= or image=, not both", fix="put the image in the devcontainer.json")
        elif not isinstance(self.attributes["config"], str | os.PathLike):
            config = self.attributes["config"]
            raise StackError(f"config={config!r} is not a path", fix='e.g. config=".devcontainer/devcontainer.json"')
        else:
            path = flow_dir / self.attributes["config"]
        config, digest = spec.load(path)
        container = task_container.from_config(config, path, spec.workspace_folder(path), [])  # runArgs, mounts
        if container.pids and container.pids > self.policy.pids:  # (the decorator's limit is a ceiling)
            raise StackError(
                f"{path}: runArgs: --pids-limit {container.pids} is above @devcontainer(pids={self.policy.pids})",
                fix=f"@devcontainer(pids={container.pids}) to allow that many processes",
            )
        return path, config, digest

    def runtime_init(self, flow, graph, package, run_id) -> None:
        from metaflow_stack import images
        from metaflow_stack.errors import StackError

        self.take_over(package)
        if self.attributes["backend"] != "docker":
            return  # the workspace's provider builds and runs the container
        self._sweep_once()
        if self.config is not None:
            try:
                self.attributes["image"], self.container_json = self._prepare(*self.config)
            except StackError as exc:
                raise DevcontainerException(f"step {self.step}: {exc}") from None
        elif self.attributes["image"] is None:
            cls = type(self)
            if cls.default_image is None:
                try:  # once per run: built here, with progress, if it is not here yet
                    cls.default_image = images.resolve("base")
                except StackError as exc:
                    raise DevcontainerException(f"step {self.step}: {exc}") from None
            self.attributes["image"] = cls.default_image

    @classmethod
    def _sweep_once(cls) -> None:
        """Remove the containers of earlier runs' trampolines that were killed outright, once per run."""
        from metaflow_stack.devcontainer.launch import remove_orphans
        from metaflow_stack.engines.docker import DockerEngine
        from metaflow_stack.errors import StackError

        if not cls.swept:
            try:
                remove_orphans(DockerEngine())
            except StackError as exc:
                raise DevcontainerException(f"{exc}") from None
            cls.swept = True

    @classmethod
    def _prepare(cls, path: Path, config, digest: str) -> tuple[str, str]:
        """Once per run and file: its host command, its image, its task settings as JSON."""
        from metaflow_stack.devcontainer import image, lifecycle, spec, task_container

        key = (str(path), digest)
        if key not in cls.prepared:
            workspace = spec.workspace_folder(path)
            lifecycle.initialize(config, path, workspace)
            ref, metadata = image.build(config, path, workspace, digest)
            container = task_container.from_config(config, path, workspace, metadata)
            cls.prepared[key] = ref, container.model_dump_json()
        return cls.prepared[key]

    def runtime_step_cli(self, cli_args, retry_count, max_user_code_retries, ubf_context) -> None:
        if not self.trampoline(cli_args, retry_count, max_user_code_retries, "devcontainer"):
            return
        cli_args.env[CHECKED_VARIABLE] = "1"
        if self.config is not None and self.attributes["backend"] == "docker":
            # in the environment: a command line is visible to every user (ps)
            cli_args.env[TASK_CONTAINER_VARIABLE] = self.container_json
        elif self.config is not None:
            cli_args.command_options["config"] = str(self.config[0])
        for option in OPTIONS:
            value = self.attributes[option]
            if option == "read_only":
                cli_args.command_options["read-only" if value else "no-read-only"] = True
            elif value is not None:
                cli_args.command_options[option] = value

    def pool_launcher(self, package, flow_file: str) -> tuple[Callable[[list[str], Path], Job], str]:
        """How ``@worker_pool`` over this step starts its one container (its workers are that container's
        processes): this step's image, sandbox policy and devcontainer.json settings, the code package
        and the run's stores, plus the pool's folder at its own path; and where ``flow_file`` is in it.
        The policy's limits are the whole pool's. Called at ``runtime_init``, after this decorator's."""
        from metaflow_stack import code_package as code
        from metaflow_stack.devcontainer import stores
        from metaflow_stack.devcontainer.launch import CODE, POOL_FOLDER, job_spec, launched
        from metaflow_stack.devcontainer.task_container import TaskContainer
        from metaflow_stack.engines import Mount, get_engine

        flow_datastore = self.flow_datastore
        save_package_once(type(self), flow_datastore, package)
        cls = type(self)
        unpacked = code.unpacked_here(flow_datastore, cls.package_url, cls.package_sha)
        env = container_env(cls.package_metadata, cls.package_sha, cls.package_url, flow_datastore.TYPE)
        metadata = _metadata_type() or "local"
        env.update(stores.environment(flow_datastore.TYPE, metadata))
        mounts = stores.container_stores(flow_datastore, metadata, env)
        container = TaskContainer.model_validate_json(self.container_json) if self.config is not None else None
        image, policy, step = self.attributes["image"], self.policy, self.step

        def launch(python_args: list[str], folder: Path) -> Job:
            pool = Mount(str(folder), str(folder), read_only=False)
            command, labels = shlex.join(python_args), {POOL_FOLDER: str(folder)}
            spec = job_spec(image, command, unpacked, [*mounts, pool], env, policy, step, container, labels)
            return launched(get_engine("docker", probe=False), spec)

        return launch, f"{CODE}/{os.path.basename(flow_file)}"
