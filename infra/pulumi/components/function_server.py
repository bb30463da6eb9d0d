"""``FunctionServer``: one bound function served on Kubernetes from its function-fastapi image.

The component installs the ``function-server`` Helm chart (the one definition
of the Kubernetes objects, shared with ``metaflow function deploy``) as a Helm
release. Its values come from the runtime, which also renders and validates
them offline at construction, so a bad image or size fails at ``pulumi
preview``, naming the field, rather than half-way through ``pulumi up``. The
API key stays in a Kubernetes Secret the component only names.
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
    #: A Secret holding ``auth-key``; callers then send it as x-api-key. The chart needs it or ``insecure_no_auth``.
    auth_secret: str = ""
    #: Serve without a key: anyone who reaches the server may call the function.
    insecure_no_auth: bool = False


class FunctionServer(pulumi.ComponentResource):
    """A Helm release of ``infra/helm/function-server`` and the URL its Service answers on in the cluster."""

    def __init__(self, name: str, args: FunctionServerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("metaflow-stack:serving:FunctionServer", name, None, opts)
        options = DeployOptions(
            replicas=args.replicas,
            cpu=args.cpu,
            memory_mb=args.memory_mb,
            max_batch_size=args.max_batch_size,
            auth_secret=args.auth_secret or None,
            insecure_no_auth=args.insecure_no_auth,
        )
        values = chart_values(args.function, args.image, options)
        self.release = chart_release(self, name, CHART, args.namespace, values, wait_for_jobs=True)
        self.service_url = pulumi.Output.concat("http://", name, ".", args.namespace, ".svc.cluster.local")
        self.register_outputs({"service_url": self.service_url, "release": self.release.name})
