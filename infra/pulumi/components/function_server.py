"""``FunctionServer``: one bound function served on Kubernetes from its function-fastapi image.

The component installs the ``function-server`` Helm chart (the one definition
of the Kubernetes objects, shared with ``metaflow function deploy``) as a Helm
release. Its values come from the runtime, which also renders and validates
them offline at construction, so a bad image or size fails at ``pulumi
preview``, naming the field, rather than half-way through ``pulumi up``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components.release import chart_release
from metaflow_stack.serving.deploy import CHART, DeployOptions, chart_values


@dataclass(frozen=True)
class FunctionServerArgs:
    """What to serve and how big."""

    image: str
    function: str
    replicas: int = 1
    namespace: str = "default"
    cpu: float = 0.5
    memory_mb: int = 1024
    max_batch_size: int = 32


class FunctionServer(pulumi.ComponentResource):
    """A Helm release of ``infra/helm/function-server`` and the URL its Service answers on in the cluster."""

    def __init__(self, name: str, args: FunctionServerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("metaflow-stack:serving:FunctionServer", name, None, opts)
        sizes = DeployOptions(
            replicas=args.replicas, cpu=args.cpu, memory_mb=args.memory_mb, max_batch_size=args.max_batch_size
        )
        values = chart_values(args.function, args.image, sizes)
        self.release = chart_release(self, name, CHART, args.namespace, values, wait_for_jobs=True)
        self.service_url = pulumi.Output.concat("http://", name, ".", args.namespace, ".svc.cluster.local")
        self.register_outputs({"service_url": self.service_url, "release": self.release.name})
