"""``@nomad``: run a step's tasks as Nomad batch jobs, in the stack's images.

Follows Metaflow's compute-decorator contract as ``@kubernetes`` does: the runtime launches each task as
``nomad step ...`` (the trampoline in ``nomad_cli``) with the code package saved once in the datastore;
the job fetches it, runs the step and saves its logs; the trampoline exits with the task's real exit
code, so ``@retry``, ``@catch`` (a fallback attempt runs locally) and foreach work unchanged. Nomad
itself never restarts or reschedules the task: retries are Metaflow's alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException
from metaflow.metadata_provider import MetaDatum

from metaflow_stack.trampolines import Trampolined

#: Carries the task's placement (``jobspec.Placement``) and whether its image is the stack's, as JSON.
PLACEMENT_VARIABLE = "METAFLOW_STACK_NOMAD_PLACEMENT"
#: Decorators that run the task somewhere else. (``@worker_pool`` is not among them: above ``@nomad`` it runs
#: the step's tasks on a Nomad job of warm workers, which ``@nomad`` describes.)
ELSEWHERE = ("kubernetes", "batch", "devcontainer", "parallel", "slurm")


class NomadException(MetaflowException):
    headline = "@nomad"


class NomadDecorator(Trampolined, StepDecorator):
    """Run this step as a Nomad batch job on the agent at ``NOMAD_ADDR`` (``METAFLOW_NOMAD_ADDR`` over it),
    with ``NOMAD_TOKEN``, ``NOMAD_NAMESPACE``, ``NOMAD_REGION`` and ``NOMAD_CACERT`` as Nomad's CLI reads them.

    cpu, memory (MB), gpu: what the task reserves (default: ``@resources``', else 1 CPU and 4096 MB);
    gpu_model, gpu_memory (MB): constraints on the GPUs. image: the container's (default: the stack's
    base image, from the configured registry). driver: "docker" (default), "exec" (the client's own
    files, chrooted) or "raw_exec" (no isolation: only when asked for). datacenters, namespace, region,
    node_pool, constraints ([{"attribute": ..., "operator": ..., "value": ...}]): where it may run.
    Needs a datastore the Nomad clients reach (S3).
    """

    name = "nomad"
    defaults: ClassVar[dict[str, Any]] = {
        "cpu": None,
        "memory": None,
        "gpu": None,
        "gpu_model": None,
        "gpu_memory": None,
        "image": None,
        "driver": "docker",
        "datacenters": None,
        "namespace": None,
        "region": None,
        "node_pool": None,
        "constraints": None,
    }
    default_image: ClassVar[str | None] = None
    #: The namespaces and regions whose orphaned jobs this run has purged.
    swept: ClassVar[set[tuple[str | None, str | None]]] = set()
    #: Metaflow's environments (``--environment pypi|conda``) solve a step for where it runs, as for
    #: ``@kubernetes``: the stack's images are Linux on x86-64.
    supports_conda_environment: ClassVar[bool] = True
    target_platform: ClassVar[str] = "linux-64"

    def step_init(self, flow, graph, step, decos, environment, flow_datastore, logger) -> None:
        from metaflow_stack.engines.nomad.jobspec import Placement, constraints_of
        from metaflow_stack.errors import StackError

        self.step, self.flow_datastore, self.decos = step, flow_datastore, decos
        if flow_datastore.TYPE == "local":
            raise NomadException(
                f"step {step}: a Nomad job reads and writes the run's datastore from another machine, and this "
                "run's is a folder here (fix: run with --datastore s3)"
            )
        elsewhere = [d.name for d in decos if d.name in ELSEWHERE]
        if elsewhere:
            raise NomadException(f"step {step}: @nomad cannot be combined with @{elsewhere[0]} (fix: keep one)")
        resources = next((d.attributes for d in decos if d.name == "resources"), {})
        a = self.attributes
        try:
            gpu = float(a["gpu"] or resources.get("gpu") or 0)
            if not gpu.is_integer():  # (int() would take 2.7 for 2)
                raise StackError(f"gpu={gpu:g} is not a whole number of GPUs", fix="@nomad(gpu=1)")
            self.placement = Placement(
                cpu=float(a["cpu"] or resources.get("cpu") or 1),
                memory=int(float(a["memory"] or resources.get("memory") or 4096)),
                gpu=int(gpu),
                gpu_model=a["gpu_model"],
                gpu_memory=int(a["gpu_memory"]) if a["gpu_memory"] else None,
                image=a["image"],
                driver=a["driver"],
                datacenters=tuple(_names(a["datacenters"])),
                namespace=a["namespace"],
                region=a["region"],
                node_pool=a["node_pool"],
                constraints=constraints_of(a["constraints"]),
            )
        except StackError as exc:
            raise NomadException(f"step {step}: {exc}") from None
        except (TypeError, ValueError, OverflowError) as exc:  # (OverflowError: memory=float("inf"))
            raise NomadException(f"step {step}: cpu, memory, gpu and gpu_memory are numbers ({exc})") from None

    def runtime_init(self, flow, graph, package, run_id) -> None:
        from metaflow_stack.errors import StackError

        self.take_over(package)
        try:
            self._sweep_once(self.placement.namespace, self.placement.region)
            if self.placement.driver == "docker" and self.placement.image is None:
                self.placement = dataclasses.replace(self.placement, image=self._stack_image())
        except StackError as exc:
            raise NomadException(f"step {self.step}: {exc}") from None

    @classmethod
    def _sweep_once(cls, namespace: str | None, region: str | None) -> None:
        """Purge the jobs of trampolines on this host that were killed outright, once per run in each namespace
        and region its ``@nomad`` steps use (Nomad lists a namespace's jobs only, and a step's jobs are in its
        own)."""
        from metaflow_stack.engines.nomad.client import NomadClient, Settings
        from metaflow_stack.engines.nomad.orphans import sweep

        if (namespace, region) not in cls.swept:
            with NomadClient(Settings.from_env().at(namespace, region)) as client:
                sweep(client, variables=True)  # (a task's job may keep the run's credentials in its own)
            cls.swept.add((namespace, region))

    @classmethod
    def _stack_image(cls) -> str:
        """The stack's base image where the clients can pull it, chosen once per run (in a deployed flow's
        job, by its deployer)."""
        from metaflow_stack.engines.nomad.client import Settings
        from metaflow_stack.engines.nomad.image import stack_image
        from metaflow_stack.nomad.deployment import STEP_IMAGE_VARIABLE

        if cls.default_image is None:
            chosen = os.environ.get(STEP_IMAGE_VARIABLE)
            cls.default_image = chosen or stack_image(Settings.from_env(), "@nomad(image=...)")
        return cls.default_image

    def runtime_step_cli(self, cli_args, retry_count, max_user_code_retries, ubf_context) -> None:
        if not self.trampoline(cli_args, retry_count, max_user_code_retries, "nomad"):
            return
        cls = type(self)
        stack_image = self.placement.image is not None and self.placement.image == cls.default_image
        placement = dataclasses.asdict(self.placement)
        cli_args.env[PLACEMENT_VARIABLE] = json.dumps({"placement": placement, "stack_image": stack_image})

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph, retry_count, *_) -> None:
        """In the job: which allocation ran the attempt, on which node, as the task's metadata."""
        from metaflow_stack.nomad.task import WORKLOAD_VARIABLE

        self.metadata, self.task_datastore = metadata, task_datastore
        if not os.environ.get(WORKLOAD_VARIABLE):
            return  # a @catch fallback attempt, here
        found = {
            "nomad-job-id": os.environ.get("NOMAD_JOB_ID"),
            "nomad-alloc-id": os.environ.get("NOMAD_ALLOC_ID"),
            "nomad-node": os.environ.get("NOMAD_NODE_NAME") or os.environ.get("NOMAD_NODE_ID"),
            "nomad-datacenter": os.environ.get("NOMAD_DC"),
        }
        entries = [
            MetaDatum(field=k, value=v, type=k, tags=[f"attempt_id:{retry_count}"]) for k, v in found.items() if v
        ]
        if entries:
            metadata.register_metadata(run_id, step_name, task_id, entries)
        # The task's logs saved to the datastore as it runs, as @kubernetes does: a job killed (out of
        # memory, purged) keeps what it wrote.
        from metaflow.sidecar import Sidecar

        self._save_logs = Sidecar("save_logs_periodically")
        self._save_logs.start()

    def task_finished(self, step_name, flow, graph, is_task_ok, retry_count, max_user_code_retries) -> None:
        """In the job, with local metadata: the task's metadata into the datastore, for the trampoline to
        bring back (the job's disk goes with it)."""
        from metaflow.metadata_provider.util import sync_local_metadata_to_datastore
        from metaflow.metaflow_config import DATASTORE_LOCAL_DIR

        from metaflow_stack.nomad.task import WORKLOAD_VARIABLE

        if os.environ.get(WORKLOAD_VARIABLE) and getattr(self, "metadata", None) and self.metadata.TYPE == "local":
            sync_local_metadata_to_datastore(DATASTORE_LOCAL_DIR, self.task_datastore)
        if getattr(self, "_save_logs", None) is not None:
            self._save_logs.terminate()


def _names(value: Any) -> list[str]:
    """``datacenters`` as a list, from a list or a comma-separated string (``--with nomad:datacenters=a,b``)."""
    from metaflow_stack.errors import StackError

    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    if not isinstance(value, list | tuple):
        raise StackError(f"datacenters={value!r} names no datacenter", fix='datacenters=["dc1", "dc2"] or "dc1,dc2"')
    return [str(v) for v in value]
