"""``Ui``: the Metaflow Stack UI on Kubernetes from its ui image, reading a metadata service.

Installs the ``ui`` Helm chart as an atomic release. The service's API key
stays in a Kubernetes Secret the component only names. The values are
rendered and validated offline at construction, so a missing service URL or
a root that is not ``s3://`` fails at ``pulumi preview`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

from components.release import chart_release

CHART = "ui"


@dataclass(frozen=True)
class UiArgs:
    """Which service the UI reads and which datastore roots its previews may read."""

    image: str
    #: The metadata service's URL in the cluster (``MetadataService.service_url``).
    service_url: str
    #: S3 prefixes (s3://bucket/prefix) whose values the UI may preview.
    datastore_roots: tuple[str, ...] = ()
    #: A Secret holding ``auth-key``, when the service wants one.
    auth_secret: str = ""
    replicas: int = 1
    namespace: str = "default"
    #: Annotations for the pod's service account (IRSA, workload identity) so it can read S3.
    service_account_annotations: tuple[tuple[str, str], ...] = ()

    def values(self) -> dict[str, Any]:
        repository, _, tag = self.image.rpartition(":")
        return {
            "image": {"repository": repository, "tag": tag},
            "metadataService": {"url": self.service_url, "auth": {"existingSecret": self.auth_secret}},
            "datastoreRoots": list(self.datastore_roots),
            "replicaCount": self.replicas,
            "serviceAccount": {"annotations": dict(self.service_account_annotations)},
        }


class Ui(pulumi.ComponentResource):
    """A Helm release of ``infra/helm/ui`` and the URL it answers on in the cluster."""

    def __init__(self, name: str, args: UiArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("metaflow-stack:ui:Ui", name, None, opts)
        self.release = chart_release(self, name, CHART, args.namespace, args.values())
        self.url = pulumi.Output.concat("http://", name, ".", args.namespace, ".svc.cluster.local:8324")
        self.register_outputs({"url": self.url, "release": self.release.name})
