"""``@worker_pool``: run a foreach step's items on warm workers, each item still a real Metaflow task.

Metaflow's runtime schedules the step as always: it creates each item's
task id, retries and joins. ``runtime_step_cli`` only changes the process
it starts per task: a standard-library trampoline that hands the task's own
command line to the step's pool (started with the step's first task,
stopped when the run ends), where Metaflow's ``step`` command runs it in a
warm worker. A ``@catch`` fallback attempt runs as a plain task, as with
Metaflow's own compute decorators.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException
from metaflow.metadata_provider import MetaDatum

if TYPE_CHECKING:
    from metaflow_stack.pool.local import Interpreter

#: Decorators that move a task elsewhere: their trampoline and the pool's cannot both start the task.
#: (``@kubernetes``, ``@nomad`` and ``@devcontainer`` are not among them: under ``@worker_pool`` they
#: describe where the pool's workers run: pods, a Nomad job's allocations, a container.)
ELSEWHERE = ("batch", "confidential", "parallel")
#: What of ``@kubernetes`` the pool's pods take; a setting beyond these is refused, not dropped.
KUBERNETES_APPLIED = frozenset(
    {"cpu", "memory", "gpu", "image", "namespace", "node_selector", "tolerations", "service_account"}
)
#: A Kubernetes toleration's fields as Metaflow's ``@kubernetes`` takes them, in the manifest's words.
TOLERATION_FIELDS = {"toleration_seconds": "tolerationSeconds"}


class WorkerPoolException(MetaflowException):
    headline = "@worker_pool"


class WorkerPoolDecorator(StepDecorator):
    """Run this foreach step's items on ``size`` warm workers (default: this machine's CPU count).

    backend: "local" (default: a fork server on this machine, which imports
    Metaflow and the flow once and runs each item in a child process of its
    own) or "redis" (items through a Redis queue at ``redis_url``, default
    ``METAFLOW_STACK_POOL_REDIS_URL`` or a Redis on this machine, to ``size``
    warm workers that each claim one at a time) or "ray" (items on ``size`` Ray actors, on the cluster at
    ``RAY_ADDRESS`` or a Ray of the pool's own here, each with the step's ``@resources``) or "kubernetes"
    (the Redis queue, its ``size`` workers pods of ``image``, default the stack's base image, with the
    step's ``@resources``, applied with kubectl when the run starts and deleted when it ends) or "nomad"
    (the Redis queue, its ``size`` workers the allocations of a Nomad job placed as the step's ``@nomad``
    says, else with its ``@resources`` in ``image``, default the stack's base image; registered when the
    run starts and purged when it ends). Every item
    keeps its task id, attempts, metadata, artifacts and logs;
    ``@retry``, ``@catch`` and ``@timeout`` apply per item. A step with an environment of its own
    (``@pypi``, ``@conda``) runs on the local or redis backend, or on a Ray of the pool's own, its workers'
    fork servers in that environment.
    """

    name = "worker_pool"
    defaults: ClassVar[dict[str, Any]] = {"size": None, "backend": "local", "redis_url": None, "image": None}
    #: The run's pools, by step: started with a step's first task, stopped when the run ends.
    pools: ClassVar[dict[str, Any]] = {}
    #: The run's progress display, shared by its pools; the steps it shows, each with the foreach tasks whose
    #: items it counts (a nested foreach's body has one per outer item); what each step's pools that died
    #: had done (``Counts``: a pool started again counts from nothing).
    progress: ClassVar[Any] = None
    watched: ClassVar[dict[str, set[str]]] = {}
    carried: ClassVar[dict[str, Any]] = {}

    def step_init(self, flow, graph, step, decos, environment, flow_datastore, logger) -> None:
        self.step, self.flow_datastore, self.logger = step, flow_datastore, logger
        self.active = True
        size, backend = self.attributes["size"], self.attributes["backend"]
        try:
            self.size = (os.cpu_count() or 1) if size is None else int(size)
        except (TypeError, ValueError, OverflowError):  # (OverflowError: size=float("inf"))
            raise WorkerPoolException(f"step {step}: size={size!r} is not a number of workers (fix: size=4)") from None
        if self.size < 1:
            raise WorkerPoolException(f"step {step}: size={size!r} must be at least 1 (fix: size=4)")
        from metaflow_stack.pool.backend import BACKENDS
        from metaflow_stack.solved_environment import has_own

        if backend not in BACKENDS:
            raise WorkerPoolException(
                f'step {step}: backend={backend!r} is not one of {", ".join(BACKENDS)} (fix: backend="local")'
            )
        if self.attributes["redis_url"] and _has_password(str(self.attributes["redis_url"])):
            from metaflow_stack.pool.redis_queue import URL_VARIABLE

            raise WorkerPoolException(
                f"step {step}: redis_url= holds a password, which Metaflow saves with the run (its graph, in the "
                f"datastore) (fix: give the whole URL in {URL_VARIABLE} and remove redis_url=)"
            )
        from metaflow_stack.elsewhere import foreach_body

        if not foreach_body(graph, step):
            if not self.statically_defined:  # --with worker_pool: the foreach bodies only
                self.active = False
                return
            raise WorkerPoolException(
                f"step {step}: @worker_pool runs the items of a foreach, and {step} is not the body of one "
                f"(fix: put @worker_pool on the step a foreach's self.next(..., foreach=...) goes to)"
            )
        resources = next((d.attributes for d in decos if d.name == "resources"), {})
        self.resources = {key: resources.get(key) for key in ("cpu", "gpu", "memory")}
        self.devcontainer, self.nomad, self.namespace, self.placement = None, None, None, {}
        self.absorbed: str | None = None  # the decorator below this one that says where the workers run
        for deco in decos:
            if deco.name == "kubernetes":
                self._pods_of(deco, decos)
            elif deco.name == "devcontainer":
                self._container_of(deco, decos)
            elif deco.name == "nomad":
                self._absorb(deco, decos, "nomad", "the allocations of a Nomad job")
                self.nomad = deco  # (its placement, checked by its step_init; its image chosen at runtime_init)
        if self.attributes["backend"] == "nomad" and flow_datastore.TYPE == "local":
            raise WorkerPoolException(
                f"step {step}: a Nomad job's workers read and write the run's datastore from another machine, and "
                "this run's is a folder here (fix: run with --datastore s3)"
            )
        for key, value in self.resources.items():  # (what pods, allocations and actors are given: Kubernetes
            try:  # takes "nan" as far as its admission, and a half GPU was rounded down to none)
                number = float(value or 0)
            except (TypeError, ValueError):
                number = math.nan
            whole = key == "gpu" and self.attributes["backend"] != "ray"  # (Ray's actors may share a GPU)
            if not (math.isfinite(number) and number >= 0 and (not whole or number.is_integer())):
                raise WorkerPoolException(
                    f"step {step}: @resources({key}={value!r}) is not a {'whole ' if whole else ''}number "
                    f"of 0 or more, which a pool's workers need (fix: {key}=2{', in MB' if key == 'memory' else ''})"
                )
        self.environment, self.own_environment = environment, has_own(environment, decos)
        # (read here: an @environment written above this decorator, or added by --with, sets its variables
        # after this one's runtime_step_cli has named what a task takes to its pool)
        self.step_variables = [str(n) for d in decos if d.name == "environment" for n in d.attributes["vars"]]
        self.settings_names: set[str] | None = None  # (``_passed``'s, read with the first task)
        # (whether the workers run on other machines, which the run's own environment does not reach)
        remote_backends = ("kubernetes", "nomad", "ray") if os.environ.get("RAY_ADDRESS") else ("kubernetes", "nomad")
        self.remote = self.attributes["backend"] in remote_backends
        if self.own_environment:
            self._environment_here(environment.TYPE)
        elsewhere = [d.name for d in decos if d.name in ELSEWHERE]
        if elsewhere:
            raise WorkerPoolException(
                f"step {step}: @worker_pool cannot yet be combined with @{elsewhere[0]} "
                f"(fix: remove one of them from {step})"
            )

    def _environment_here(self, kind: str) -> None:
        """Refuse a step whose own environment (Metaflow makes it on this machine as the run starts) the
        pool's workers would not find: only the local and redis backends' (not as pods, Nomad allocations or
        a container's processes), and a Ray of the pool's own, run here."""
        backend, ray_address = self.attributes["backend"], os.environ.get("RAY_ADDRESS")
        if not self.absorbed and (backend in ("local", "redis") or (backend == "ray" and not ray_address)):
            return
        if self.absorbed:
            fix = f"or remove @{self.absorbed}"
        elif backend == "ray":
            fix = f"or unset RAY_ADDRESS={ray_address} for a Ray of the pool's own here"
        else:
            fix = 'or backend="local"'
        raise WorkerPoolException(
            f"step {self.step}: the {kind} environment Metaflow makes for {self.step} is on this machine, where "
            f"only the local and redis backends' workers run, and the ray backend's on a Ray of the pool's own "
            f"(fix: @{kind}(disabled=True) on {self.step}, {fix})"
        )

    def _pods_of(self, kubernetes: StepDecorator, decos: list[StepDecorator]) -> None:
        """``@kubernetes`` under ``@worker_pool``: the pool's workers are the step's pods (the kubernetes
        backend), with its cpu, memory and gpu (already the larger of it and ``@resources``), its image
        when one is given (else the stack's base image: the pods run the pool's worker), namespace, node
        selector and tolerations; its per-task pod is not started (``runtime_step_cli``)."""
        self._absorb(kubernetes, decos, "kubernetes", "pods")
        settings = kubernetes.attributes
        ignored = sorted(kubernetes._user_defined_attributes - KUBERNETES_APPLIED)
        if settings.get("gpu_vendor", "nvidia").lower() == "nvidia" and "gpu_vendor" in ignored:
            ignored.remove("gpu_vendor")
        if ignored:
            raise WorkerPoolException(
                f"step {self.step}: the pool's pods take @kubernetes's {', '.join(sorted(KUBERNETES_APPLIED))}, "
                f"not {', '.join(ignored)} (fix: set those for the pods in the chart values file "
                f"METAFLOW_STACK_POOL_VALUES names, and remove them from @kubernetes)"
            )
        if configured := self._configured_only(kubernetes):
            self.logger(
                f"step {self.step}: the pool's pods do not take @kubernetes's {', '.join(configured)}, which this "
                "machine's Metaflow configuration gives it (set them for the pods in the chart values file "
                "METAFLOW_STACK_POOL_VALUES names)",
                system_msg=True,
            )
        self.resources = {key: settings.get(key) for key in ("cpu", "gpu", "memory")}
        if self.attributes["image"] is None and "image" in kubernetes._user_defined_attributes:
            self.attributes["image"] = settings["image"]
        self.namespace = settings.get("namespace") or None
        tolerations = [
            {TOLERATION_FIELDS.get(key, key): value for key, value in toleration.items()}
            for toleration in settings.get("tolerations") or []
        ]
        self.placement = {"nodeSelector": settings.get("node_selector") or {}, "tolerations": tolerations}
        if settings.get("service_account"):  # (its workload identity: how a pod gets credentials, as @kubernetes's)
            self.placement["serviceAccountName"] = settings["service_account"]

    @staticmethod
    def _configured_only(kubernetes: StepDecorator) -> list[str]:
        """The settings of ``@kubernetes`` the pool's pods do not take that Metaflow's configuration gives it
        (``METAFLOW_KUBERNETES_*``; the flow's own are refused), which its own pods would have had. Read from
        the configuration itself: Metaflow rewrites some attributes (``disk`` from ``@resources``, say)."""
        from metaflow import metaflow_config

        configured = {
            "labels": "KUBERNETES_LABELS",
            "annotations": "KUBERNETES_ANNOTATIONS",
            "persistent_volume_claims": "KUBERNETES_PERSISTENT_VOLUME_CLAIMS",
            "secrets": "KUBERNETES_SECRETS",
            "image_pull_secrets": "KUBERNETES_IMAGE_PULL_SECRETS",
        }
        return [
            f"{key} (METAFLOW_{name})"
            for key, name in configured.items()
            if getattr(metaflow_config, name, None) and key not in kubernetes._user_defined_attributes
        ]

    def _container_of(self, devcontainer: StepDecorator, decos: list[StepDecorator]) -> None:
        """``@devcontainer`` under ``@worker_pool``: the pool's fork server runs in one container of the
        step's image and sandbox (its workers are that container's processes); its per-task container is
        not started (``runtime_step_cli``)."""
        self._absorb(devcontainer, decos, "local", "processes of one container of its image")
        if not sys.platform.startswith("linux"):  # Docker Desktop's VM: a socket's descriptors stay on its side
            raise WorkerPoolException(
                f"step {self.step}: a worker pool in a @devcontainer hands tasks over a Unix socket into the "
                "container, which works where Docker runs on this machine's own kernel: Linux "
                "(fix: remove @worker_pool from the step here, or run on Linux)"
            )
        if devcontainer.attributes["backend"] != "docker":
            raise WorkerPoolException(
                f"step {self.step}: a worker pool runs in a container on this machine, not in a "
                f"{devcontainer.attributes['backend']} workspace (fix: remove backend= from @devcontainer)"
            )
        self.devcontainer = devcontainer

    def _absorb(self, deco: StepDecorator, decos: list[StepDecorator], backend: str, workers: str) -> None:
        """Take ``deco`` (written below this one) as where the pool's workers run, on ``backend``."""
        step, chosen = self.step, self.attributes["backend"]
        if decos.index(deco) > decos.index(self):
            raise WorkerPoolException(
                f"step {step}: @{deco.name} would start each pooled task on its own (fix: write @worker_pool "
                f"above @{deco.name} on {step}; with --with, give --with {deco.name} first)"
            )
        if chosen != backend and "backend" in self._user_defined_attributes:
            raise WorkerPoolException(
                f"step {step}: with @{deco.name} the pool's workers are {workers}, and backend={chosen!r} runs "
                f'them elsewhere (fix: backend="{backend}", or no backend=)'
            )
        self.attributes["backend"], self.absorbed = backend, deco.name
        deco.runtime_step_cli = _variables_only(deco.runtime_step_cli)

    def runtime_init(self, flow, graph, package, run_id) -> None:
        """Start the step's pool with the run: it imports the flow while the steps before it run."""
        from metaflow_stack.errors import StackError
        from metaflow_stack.pool.backend import open_pool

        if self.active and self.step not in self.pools:
            flow_file = os.path.abspath(sys.argv[0])
            backend, url = self.attributes["backend"], self.attributes["redis_url"]
            image = self.attributes["image"]
            try:
                contained, interpreter = None, None
                if self.own_environment:
                    interpreter = self._environment_interpreter(package)
                if self.devcontainer is not None:  # the pool's workers see the flow in the code package
                    contained, flow_file = self.devcontainer.pool_launcher(package, flow_file)
                pool = open_pool(
                    backend,
                    flow_file,
                    self.size,
                    str(run_id),
                    self.step,
                    redis_url=url,
                    resources=self.resources,
                    image=image,
                    namespace=self.namespace,
                    values=self.placement,
                    contained=contained,
                    placement=self.nomad.placement if self.nomad is not None else None,
                    interpreter=interpreter,
                )
                pool.start()
            except StackError as exc:
                raise WorkerPoolException(f"step {self.step}: {exc}") from None
            self.pools[self.step] = pool

    def _environment_interpreter(self, package) -> Interpreter:
        """The step's own environment's interpreter (Metaflow made it as the run started) with the run's
        code package, unpacked once on this machine, on its path, as Metaflow's ``@conda`` gives its tasks."""
        from metaflow_stack.code_package import run_package_here
        from metaflow_stack.pool.local import Interpreter

        folder = str(run_package_here(package))
        env = {"PYTHONNOUSERSITE": "1"}  # (the interpreter's own packages only, as Metaflow runs it)
        for name, value in package.get_post_extract_env_vars(package.package_metadata, folder).items():
            env[name.rstrip(":")] = value
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (env.get("PYTHONPATH"), folder)))
        return Interpreter(self.environment.interpreter(self.step), env)

    def runtime_task_created(self, task_datastore, task_id, split_index, input_paths, is_cloned, ubf_context) -> None:
        """With the step's first task: its line in the run's progress display (the foreach's items); with the
        first task of each further foreach task (a nested foreach's), its items added."""
        from metaflow_stack.pool.counts import Counts
        from metaflow_stack.pool.progress import PoolProgress

        cls = type(self)
        if not self.active or input_paths[0] in cls.watched.get(self.step, ()):
            return
        run_id, step, task_id = input_paths[0].split("/")[-3:]
        items = self.flow_datastore.get_task_datastore(run_id, step, task_id)["_foreach_num_splits"]
        if self.step in cls.watched:
            cls.progress.more(self.step, items)
        else:
            if cls.progress is None:
                cls.progress = PoolProgress(lambda line: self.logger(line, system_msg=True))
            pool, step = self.pools[self.step], self.step  # (read once more as it stops, out of ``pools`` by then)
            cls.carried[step] = Counts()
            cls.progress.watch(step, items, lambda: pool.counts() + cls.carried[step])
        cls.watched.setdefault(self.step, set()).add(input_paths[0])

    def runtime_step_cli(self, cli_args, retry_count, max_user_code_retries, ubf_context) -> None:
        from metaflow_stack.errors import StackError

        if not self.active or retry_count > max_user_code_retries:
            return  # not a foreach body (--with), or a @catch fallback attempt: a plain task
        pool = self.pools[self.step]
        if (names := self._passed(cli_args.env)) is not None:
            from metaflow_stack.pool.contained import PASSED_VARIABLE

            cli_args.env[PASSED_VARIABLE] = ",".join(sorted(names))
        try:
            if not pool.alive():  # a pool that died (killed, out of memory) comes back for the next attempt
                if self.step in type(self).carried:
                    type(self).carried[self.step] += pool.counts().ended()
                pool.stop()
                pool.start()
            cli_args.entrypoint = pool.command(list(cli_args.entrypoint))
        except StackError as exc:
            raise WorkerPoolException(f"step {self.step}: {exc}") from None

    def _passed(self, env: dict[str, str]) -> set[str] | None:
        """The names of the only variables a task takes to its pool, where that is not this machine's own
        process (None: all of them, as Metaflow's runtime gives a task): in a sandbox, what Metaflow and the
        step's decorators set for it; to workers on other machines, that and the run's Metaflow settings,
        what ``@kubernetes`` and ``@nomad`` send a task; never the rest of this machine's environment (its
        credentials: those a pod needs come as ``@kubernetes`` tasks' do, from ``@environment``, a Secret
        or the pod's identity; a Ray cluster's actors, as Ray's own tasks, have their node's)."""
        if self.devcontainer is None and not self.remote:
            return None
        if self.settings_names is None:  # (once per step: every task's are the same)
            from metaflow_stack.elsewhere import metaflow_settings

            # (and who runs it: a pod has no USER, and its warm workers read Metaflow's settings, METAFLOW_USER
            # among them, before any task came; Metaflow then asks these, as each task starts)
            remote = self.devcontainer is None
            self.settings_names = {*metaflow_settings(), "SUDO_USER", "USERNAME", "USER"} if remote else set()
            self.settings_names |= _trace_fields()  # (Metaflow adds them to each task's variables after this)
        return {*env, *self.step_variables, "METAFLOW_RUN_ID", "PYTHONUNBUFFERED", *self.settings_names}

    def runtime_finished(self, exception) -> None:
        cls = type(self)
        pool = self.pools.pop(self.step, None)
        if pool is None:
            return
        if self.step in cls.watched:
            del cls.watched[self.step]
            cls.progress.finish(self.step)
            del cls.carried[self.step]
        pool.stop()
        if not cls.watched:
            cls.progress = None

    def task_pre_step(
        self,
        step_name,
        task_datastore,
        metadata,
        run_id,
        task_id,
        flow,
        graph,
        retry_count,
        max_user_code_retries,
        ubf_context,
        inputs,
    ) -> None:
        from metaflow_stack.pool import WORKER_VARIABLE

        worker = os.environ.get(WORKER_VARIABLE)
        if worker:
            metadata.register_metadata(
                run_id,
                step_name,
                task_id,
                [MetaDatum(field="worker-pool", value=worker, type="worker-pool", tags=[f"attempt_id:{retry_count}"])],
            )


def _trace_fields() -> set[str]:
    """The variables Metaflow's tracing sets for a task as it starts (its OpenTelemetry propagator's fields:
    ``traceparent``...), so a pooled task stays in the run's trace; none without OpenTelemetry."""
    try:
        from opentelemetry.propagate import get_global_textmap
    except ImportError:
        return set()
    return set(get_global_textmap().fields)


def _has_password(url: str) -> bool:
    """Whether a Redis URL holds a password (in its user part or its query, as redis-py reads it); a URL
    redis-py cannot read is the pool's to refuse, as it starts."""
    from redis.connection import parse_url

    try:
        return bool(parse_url(url).get("password"))
    except ValueError:
        return False


def _variables_only(runtime_step_cli: Callable[..., Any]) -> Callable[..., Any]:
    """An absorbed decorator's ``runtime_step_cli`` that keeps only the variables it sets for the task: the
    command it would make (``kubernetes step``, ``nomad step``, ``devcontainer step``: a pod, job or
    container per task) is the pool's to replace, and what Metaflow put on the command line before (a
    resume's ``clone-run-id``, ``spin``'s options) stays as it was."""

    def variables_only(cli_args: Any, *args: Any, **kwargs: Any) -> Any:
        scratch = copy.copy(cli_args)
        scratch.commands, scratch.command_args = list(cli_args.commands), list(cli_args.command_args)
        scratch.command_options, scratch.entrypoint = dict(cli_args.command_options), list(cli_args.entrypoint)
        scratch.top_level_options, scratch.env = dict(cli_args.top_level_options), dict(cli_args.env)
        runtime_step_cli(scratch, *args, **kwargs)
        cli_args.env.update(scratch.env)

    return variables_only
