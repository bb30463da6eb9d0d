"""``@devcontainer``: run a step's tasks in Docker containers on this machine, sandboxed.

Follows Metaflow's compute-decorator contract: the runtime launches each
task as ``devcontainer step ...`` (the trampoline in ``devcontainer_cli``)
instead of the step itself, with the code package saved once in the
datastore; the trampoline runs the real step command in a container and
exits with its code, so ``@retry``, ``@catch`` and foreach work unchanged
(a ``@catch`` fallback attempt runs as a plain local task, as with
``@kubernetes``).
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException

#: The options the trampoline takes, in the decorator's words.
OPTIONS = ("image", "network", "cpu", "memory", "read_only", "pids")


class DevcontainerException(MetaflowException):
    headline = "@devcontainer"


class DevcontainerDecorator(StepDecorator):
    """Run this step in a container of ``image`` (default: the stack's ``base`` image, built if needed).

    network: "none" (default) or "bridge"; read_only: a read-only root file system (default True);
    cpu, memory ("2g"), pids (default 512): limits. The container runs as the host user with every
    capability dropped and no privilege escalation; the local datastore is mounted at its own path.
    """

    name = "devcontainer"
    defaults: ClassVar[dict[str, Any]] = {
        "image": None,
        "network": "none",
        "cpu": None,
        "memory": None,
        "read_only": True,
        "pids": 512,
    }
    #: The default image's reference, resolved once per run (its tag hashes the image's sources).
    default_image: ClassVar[str | None] = None
    package_url: ClassVar[str | None] = None
    package_sha: ClassVar[str | None] = None
    package_metadata: ClassVar[str | None] = None

    def step_init(self, flow, graph, step, decos, environment, flow_datastore, logger) -> None:
        from metaflow_stack.devcontainer.policy import SandboxPolicy
        from metaflow_stack.errors import StackError

        if flow_datastore.TYPE != "local":
            raise DevcontainerException(
                f"step {step}: @devcontainer runs with the local datastore for now, not {flow_datastore.TYPE} "
                "(fix: run with --datastore local)"
            )
        others = [d.name for d in decos if d.name in ("kubernetes", "batch", "nomad", "worker_pool")]
        if others:
            raise DevcontainerException(f"step {step}: @devcontainer cannot be combined with @{others[0]}")
        try:
            self.policy = SandboxPolicy(
                network=self.attributes["network"],
                read_only=bool(self.attributes["read_only"]),
                cpu=float(self.attributes["cpu"]) if self.attributes["cpu"] is not None else None,
                memory=str(self.attributes["memory"]) if self.attributes["memory"] is not None else None,
                pids=int(self.attributes["pids"]),
            )
        except StackError as exc:
            raise DevcontainerException(f"step {step}: {exc.message} (fix: {exc.fix})") from None
        self.flow_datastore = flow_datastore
        self.step = step

    def runtime_init(self, flow, graph, package, run_id) -> None:
        from metaflow_stack import images
        from metaflow_stack.errors import StackError

        self.package = package
        if self.attributes["image"] is None:
            cls = type(self)
            if cls.default_image is None:
                try:  # once per run: built here, with progress, if it is not here yet
                    cls.default_image = images.resolve("base")
                except StackError as exc:
                    raise DevcontainerException(f"step {self.step}: {exc.message} (fix: {exc.fix})") from None
            self.attributes["image"] = cls.default_image

    def runtime_task_created(self, task_datastore, task_id, split_index, input_paths, is_cloned, ubf_context) -> None:
        if not is_cloned:
            self._save_package_once(self.flow_datastore, self.package)

    def runtime_step_cli(self, cli_args, retry_count, max_user_code_retries, ubf_context) -> None:
        if retry_count > max_user_code_retries:
            return  # a @catch fallback attempt: run locally, as Metaflow's own compute decorators do
        cli_args.commands = ["devcontainer", "step"]
        cli_args.command_args += [self.package_metadata, self.package_sha, self.package_url]
        for option in OPTIONS:
            value = self.attributes[option]
            if option == "read_only":
                cli_args.command_options["read-only" if value else "no-read-only"] = True
            elif value is not None:
                cli_args.command_options[option] = value
        cli_args.entrypoint[0] = sys.executable

    @classmethod
    def _save_package_once(cls, flow_datastore, package) -> None:
        if cls.package_url is None:
            cls.package_url, cls.package_sha = flow_datastore.save_data([package.blob], len_hint=1)[0]
            cls.package_metadata = package.package_metadata
