"""``Ui``: the Metaflow Stack UI on Kubernetes from its ui image, reading a metadata service.

Installs the ``ui`` Helm chart as an atomic release. The UI's own key and the
service's stay in Kubernetes Secrets the component only names. The values are
rendered and validated offline at construction, so a missing service URL, a
root that is not ``s3://``, or neither a key nor ``insecure_no_auth`` fails at
``pulumi preview`` naming what to set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

from components.release import chart_release
from metaflow_stack.deploy import helm

CHART = "ui"


@dataclass(frozen=True)
class UiArgs:
    """Which service the UI reads and which datastore roots its previews may read."""

    image: str
    #: The metadata service's URL in the cluster (``MetadataService.service_url``).
    service_url: str
    #: S3 prefixes (s3://bucket/prefix) whose values the UI may preview.
    datastore_roots: tuple[str, ...] = ()
    #: A Secret holding the UI's own key as ``auth-key`` (browsers sign in with it). The chart needs it or
    #: ``insecure_no_auth``.
    auth_secret: str = ""
    #: Serve without a key: anyone who reaches the UI sees every run, log and value it can read.
    insecure_no_auth: bool = False
    #: A Secret holding the service's key as ``auth-key``, when the service wants one.
    service_auth_secret: str = ""
    replicas: int = 1
    namespace: str = "default"
    #: Annotations for the pod's service account (IRSA, workload identity) so it can read S3.
    service_account_annotations: tuple[tuple[str, str], ...] = ()

    def values(self) -> dict[str, Any]:
        return {
            "image": helm.image_values(self.image),
            "auth": {"existingSecret": self.auth_secret, "insecureNoAuth": self.insecure_no_auth},
            "metadataService": {"url": self.service_url, "auth": {"existingSecret": self.service_auth_secret}},
            "datastoreRoots": list(self.datastore_roots),
            "replicaCount": self.replicas,
            "serviceAccount": {"annotations": dict(self.service_account_annotations)},
        }


class Ui(pulumi.ComponentResource):
    """A Helm release of ``infra/helm/ui`` and the URL it answers on in the cluster."""

    def __init__(self, name: str, args: UiArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("metaflow-stack:ui:Ui", name, None, opts)
        waits = opts.depends_on if opts else None  # what the release must wait for (a database, a broker)
        self.release = chart_release(self, name, CHART, args.namespace, args.values(), depends_on=waits)
        self.url = pulumi.Output.concat("http://", name, ".", args.namespace, ".svc.cluster.local:8324")
        self.register_outputs({"url": self.url, "release": self.release.name})
