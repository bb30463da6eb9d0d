"""``DevStack``: everything a Metaflow user needs on one Kubernetes cluster, for development.

In one namespace: Argo Workflows (its official chart, small CRDs, no server:
Metaflow uses the Kubernetes API; a workflow service account with its RBAC), an S3
object store (MinIO's chart, one standalone server, a bucket), PostgreSQL
(the CloudNativePG operator and one ``Cluster``), NATS with JetStream (its
official chart), and this project's metadata service and UI on them. The
metadata service, the UI and S3 are NodePorts too, at the ports
``metaflow_stack.cluster.kind`` publishes on this machine's loopback.

The laptop and the pods reach S3 at different addresses, as in Metaflow's
own dev stack: the laptop through the published port (the profile's
``METAFLOW_DATATOOLS_CLIENT_PARAMS``), the pods through the cluster's DNS
(``AWS_ENDPOINT_URL_S3`` in the ``metaflow-task`` Secret every task gets with
``METAFLOW_KUBERNETES_SECRETS``). Metaflow would give pods its own
``METAFLOW_S3_ENDPOINT_URL`` verbatim, so the profile sets none.

Tasks reach S3 as a MinIO user of their own (``metaflow-task``), whose policy
(the chart's ``policies``) allows the objects of the stack's bucket and nothing
else: not MinIO's root account, which stays with the chart's jobs and this
machine's profile. The chart's default ``users`` (an admin ``console`` with a
published password) are replaced by that one user.

NATS takes clients from the metadata service's pods alone (a NetworkPolicy on
its client port; kind enforces NetworkPolicies since v0.24): a task cannot read
the runs' events or publish forged ones. The policy trusts pod labels, which a
flow can set on its own pods (``@kubernetes(labels=...)``): NATS credentials
would close that, and wait on the metadata-service chart reading its NATS URL
from a Secret (its values put it in the pod spec, which tasks may read).

Secrets (the database password, the S3 keys, the service's key) come in as
Pulumi secrets and reach the cluster as Kubernetes Secrets; a deployed flow's
WorkflowTemplate leaves the service's key out (the task Secret carries it),
but ``--with kubernetes`` puts Metaflow's headers, the key among them, in its
pods' specs: whoever reads pods in the namespace reads the key. Charts are
pinned; third-party ones are fetched from their repositories at ``up``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as kubernetes

from components.metadata_service import MetadataService, MetadataServiceArgs, cluster_url
from components.ui import Ui, UiArgs
from metaflow_stack.cluster.kind import NODE_PORTS

ARGO = ("argo-workflows", "https://argoproj.github.io/argo-helm", "0.47.5")
MINIO = ("minio", "https://charts.min.io/", "5.4.0")
CLOUDNATIVE_PG = ("cloudnative-pg", "https://cloudnative-pg.github.io/charts", "0.29.0")
NATS = ("nats", "https://nats-io.github.io/k8s/helm/charts/", "2.14.2")
BUCKET = "metaflow"
#: The Secret every task gets: S3's credentials and endpoint, the service's headers.
TASK_SECRET = "metaflow-task"
#: The MinIO user tasks are, and the policy that keeps it to the bucket's objects.
TASK_S3_USER = "metaflow-task"
TASK_S3_POLICY = "metaflow-bucket"
#: The metadata service's pods (its chart's selector labels): NATS's only clients.
SERVICE_PODS = {"app.kubernetes.io/name": "metadata-service", "app.kubernetes.io/instance": "metadata-service"}
#: The service account Argo's workflows (and so Metaflow's tasks on Argo) run as, with the RBAC they need.
WORKFLOW_SERVICE_ACCOUNT = "argo-workflow"
#: What every dev server may use: enough on a laptop, little enough for several.
SMALL = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}


@dataclass(frozen=True)
class DevStackArgs:
    """The images of this project's servers, and the secrets the stack is made with."""

    service_image: str
    ui_image: str
    #: The image tasks run in (the stack's base), given back as an output for the profile.
    task_image: str
    db_password: pulumi.Input[str]
    #: MinIO's root password (its chart's jobs, this machine's profile).
    s3_secret_key: pulumi.Input[str]
    #: The password of the tasks' MinIO user (``TASK_S3_USER``).
    s3_task_secret_key: pulumi.Input[str]
    auth_key: pulumi.Input[str]
    namespace: str = "metaflow"
    s3_access_key: str = "metaflow"


class DevStack(pulumi.ComponentResource):
    """The dev stack, and what a Metaflow profile needs to reach it (``outputs``)."""

    def __init__(self, name: str, args: DevStackArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("metaflow-stack:dev:DevStack", name, None, opts)
        ns = args.namespace
        namespace = kubernetes.core.v1.Namespace(
            f"{name}-namespace", metadata={"name": ns}, opts=pulumi.ResourceOptions(parent=self)
        )
        child = pulumi.ResourceOptions(parent=self, depends_on=[namespace])
        s3_internal = f"http://minio.{ns}.svc.cluster.local:9000"

        def secret(key: str, data: dict[str, pulumi.Input[str]], kind: str = "Opaque") -> kubernetes.core.v1.Secret:
            return kubernetes.core.v1.Secret(
                f"{name}-{key}", metadata={"name": key, "namespace": ns}, type=kind, string_data=data, opts=child
            )

        self.secrets = [
            secret("minio-root", {"rootUser": args.s3_access_key, "rootPassword": args.s3_secret_key}),
            # What every task gets (METAFLOW_KUBERNETES_SECRETS): its own S3 user and the in-cluster endpoint,
            # and the service's key as Metaflow's headers (a deployed flow's template skips its own copy).
            # MinIO's chart makes the user with the password read from here.
            secret(
                TASK_SECRET,
                {
                    "AWS_ACCESS_KEY_ID": TASK_S3_USER,
                    "AWS_SECRET_ACCESS_KEY": args.s3_task_secret_key,
                    "AWS_ENDPOINT_URL_S3": s3_internal,
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "METAFLOW_SERVICE_HEADERS": pulumi.Output.json_dumps({"x-api-key": args.auth_key}),
                },
            ),
            secret(
                "metaflow-db-owner", {"username": "metaflow", "password": args.db_password}, "kubernetes.io/basic-auth"
            ),
            secret(
                "metaflow-db-url",
                {
                    "database-url": pulumi.Output.concat(
                        "postgresql://metaflow:", args.db_password, f"@metaflow-db-rw.{ns}.svc:5432/metaflow"
                    )
                },
            ),
            secret("metaflow-auth", {"auth-key": args.auth_key}),
        ]
        after_secrets = pulumi.ResourceOptions(parent=self, depends_on=[namespace, *self.secrets])

        def release(chart: tuple[str, str, str], values: dict) -> kubernetes.helm.v3.Release:
            chart_name, repo, version = chart
            return kubernetes.helm.v3.Release(
                f"{name}-{chart_name}",
                kubernetes.helm.v3.ReleaseArgs(
                    # A fixed release name: Pulumi would otherwise add a suffix, and every Service name with it.
                    name=chart_name,
                    chart=chart_name,
                    version=version,
                    repository_opts=kubernetes.helm.v3.RepositoryOptsArgs(repo=repo),
                    namespace=ns,
                    values=values,
                    atomic=True,
                    timeout=600,  # a first install pulls its images
                ),
                opts=after_secrets,
            )

        self.argo = release(
            ARGO,
            {
                "crds": {"install": True, "full": False},  # the chart's own CRDs: no download from the cluster
                "singleNamespace": False,
                "controller": {
                    "workflowNamespaces": [ns],
                    "resources": SMALL,
                    "workflowDefaults": {
                        "spec": {
                            "ttlStrategy": {"secondsAfterSuccess": 300, "secondsAfterFailure": 3600},
                            "podGC": {"strategy": "OnWorkflowSuccess"},
                        }
                    },
                },
                # Metaflow talks to the Kubernetes API, never to Argo's server: no server, nothing to reach.
                "server": {"enabled": False},
                "workflow": {
                    "serviceAccount": {"create": True, "name": WORKFLOW_SERVICE_ACCOUNT},
                    "rbac": {"create": True},
                },
            },
        )
        self.minio = release(
            MINIO,
            {
                "mode": "standalone",
                "replicas": 1,
                "existingSecret": "minio-root",
                "buckets": [{"name": BUCKET, "policy": "none", "purge": False}],
                "policies": [
                    {
                        "name": TASK_S3_POLICY,
                        "statements": [
                            {
                                "resources": [f"arn:aws:s3:::{BUCKET}"],
                                "actions": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
                            },
                            {
                                "resources": [f"arn:aws:s3:::{BUCKET}/*"],
                                "actions": [
                                    "s3:GetObject",
                                    "s3:PutObject",
                                    "s3:DeleteObject",
                                    "s3:AbortMultipartUpload",
                                    "s3:ListMultipartUploadParts",
                                ],
                            },
                        ],
                    }
                ],
                "users": [
                    {
                        "accessKey": TASK_S3_USER,
                        "existingSecret": TASK_SECRET,
                        "existingSecretKey": "AWS_SECRET_ACCESS_KEY",
                        "policy": TASK_S3_POLICY,
                    }
                ],
                "persistence": {"enabled": True, "size": "5Gi"},
                "resources": {"requests": {"memory": "256Mi", "cpu": "50m"}},
                "service": {"type": "NodePort", "port": "9000", "nodePort": NODE_PORTS["s3"]},
                "consoleService": {"type": "ClusterIP"},
            },
        )
        self.postgres_operator = release(CLOUDNATIVE_PG, {"config": {"clusterWide": True}})
        # The operator's webhooks check a Cluster when it is made: it comes after the operator is ready.
        self.database = kubernetes.apiextensions.CustomResource(
            f"{name}-database",
            api_version="postgresql.cnpg.io/v1",
            kind="Cluster",
            # Pulumi waits for the database to be ready, so the service after it starts on a database.
            metadata={"name": "metaflow-db", "namespace": ns, "annotations": {"pulumi.com/waitFor": "condition=Ready"}},
            spec={
                "instances": 1,
                "bootstrap": {
                    "initdb": {"database": "metaflow", "owner": "metaflow", "secret": {"name": "metaflow-db-owner"}}
                },
                "storage": {"size": "2Gi"},
                "managed": {"services": {"disabledDefaultServices": ["ro", "r"]}},
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[namespace, *self.secrets, self.postgres_operator]),
        )
        self.nats = release(
            NATS,
            {
                "config": {
                    "jetstream": {
                        "enabled": True,
                        "fileStore": {"enabled": True, "pvc": {"enabled": True, "size": "1Gi"}},
                        "memoryStore": {"enabled": True, "maxSize": "256Mi"},
                    }
                },
                "natsBox": {"enabled": False},
            },
        )
        self.nats_clients = kubernetes.networking.v1.NetworkPolicy(
            f"{name}-nats-clients",
            metadata={"name": "nats-clients", "namespace": ns},
            spec={
                "podSelector": {
                    "matchLabels": {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "nats"}
                },
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": SERVICE_PODS}}], "ports": [{"port": 4222}]}],
            },
            opts=child,
        )
        self.service = MetadataService(
            "metadata-service",
            MetadataServiceArgs(
                image=args.service_image,
                database_secret="metaflow-db-url",
                nats_url=f"nats://nats.{ns}.svc.cluster.local:4222",
                auth_secret="metaflow-auth",
                replicas=2,
                namespace=ns,
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*self.secrets, self.database, self.nats]),
        )
        self.ui = Ui(
            "metaflow-ui",
            UiArgs(
                image=args.ui_image,
                service_url=cluster_url("metadata-service", ns),
                auth_secret="metaflow-auth",
                service_auth_secret="metaflow-auth",
                namespace=ns,
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.service]),
        )
        self.node_ports = [
            self._node_port(name, ns, "metadata-service", "metadata-service", 8080, self.service),
            self._node_port(name, ns, "ui", "metaflow-ui", 8324, self.ui),
        ]
        self.outputs = {
            "namespace": ns,
            "service_url": f"http://127.0.0.1:{NODE_PORTS['metadata-service']}",
            "service_internal_url": cluster_url("metadata-service", ns),
            "ui_url": f"http://127.0.0.1:{NODE_PORTS['ui']}",
            "s3_endpoint": f"http://127.0.0.1:{NODE_PORTS['s3']}",
            "s3_internal_endpoint": s3_internal,
            "datastore_root": f"s3://{BUCKET}/metaflow",
            "task_secret": TASK_SECRET,
            "task_image": args.task_image,
            "s3_access_key": args.s3_access_key,
            "service_account": WORKFLOW_SERVICE_ACCOUNT,
        }
        self.register_outputs(self.outputs)

    def _node_port(
        self, name: str, ns: str, app: str, release: str, port: int, after: pulumi.Resource
    ) -> kubernetes.core.v1.Service:
        """A NodePort beside a chart's own ClusterIP Service, at the port kind publishes on this machine."""
        return kubernetes.core.v1.Service(
            f"{name}-{app}-node-port",
            metadata={"name": f"{app}-node-port", "namespace": ns},
            spec={
                "type": "NodePort",
                "selector": {"app.kubernetes.io/name": app, "app.kubernetes.io/instance": release},
                "ports": [{"name": "http", "port": port, "targetPort": "http", "nodePort": NODE_PORTS[app]}],
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[after]),
        )
