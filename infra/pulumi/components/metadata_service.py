"""``MetadataService``: the metadata service on Kubernetes from its metadata-service image.

Installs the ``metadata-service`` Helm chart as an atomic release. Secrets
(the PostgreSQL URL, the auth key) stay in Kubernetes Secrets the component
only names. The values are rendered and validated offline at construction, so
a wrong combination (several replicas on SQLite, several without NATS, neither
a key nor ``insecure_no_auth``) fails at ``pulumi preview`` with the chart's
own message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

from components.release import chart_release
from metaflow_stack.deploy import helm

CHART = "metadata-service"


def cluster_url(name: str, namespace: str) -> str:
    """Where Metaflow and the UI reach the release ``name`` inside the cluster."""
    return f"http://{name}.{namespace}.svc.cluster.local:8080"


@dataclass(frozen=True)
class MetadataServiceArgs:
    """Where the service keeps its data and publishes its events."""

    image: str
    #: A Secret holding ``database-url`` (postgresql://...); empty runs one replica on SQLite.
    database_secret: str = ""
    nats_url: str = ""
    #: A Secret holding ``auth-key``; clients then send it as x-api-key. The chart needs it or ``insecure_no_auth``.
    auth_secret: str = ""
    #: Serve without a key: anyone who reaches the service may read and write.
    insecure_no_auth: bool = False
    replicas: int = 2
    namespace: str = "default"
    #: S3 prefixes (s3://bucket/prefix) whose task logs the service may read.
    log_roots: tuple[str, ...] = ()

    def values(self) -> dict[str, Any]:
        return {
            "image": helm.image_values(self.image),
            "database": {"existingSecret": self.database_secret},
            "nats": {"url": self.nats_url},
            "auth": {"existingSecret": self.auth_secret, "insecureNoAuth": self.insecure_no_auth},
            "replicaCount": self.replicas,
            "logs": {"roots": list(self.log_roots)},
        }


class MetadataService(pulumi.ComponentResource):
    """A Helm release of ``infra/helm/metadata-service`` and the URL Metaflow should use in the cluster."""

    def __init__(self, name: str, args: MetadataServiceArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("metaflow-stack:service:MetadataService", name, None, opts)
        waits = opts.depends_on if opts else None  # what the release must wait for (a database, a broker)
        self.release = chart_release(self, name, CHART, args.namespace, args.values(), depends_on=waits)
        self.service_url = pulumi.Output.from_input(cluster_url(name, args.namespace))
        self.register_outputs({"service_url": self.service_url, "release": self.release.name})
