"""The program `pulumi up` runs (``__main__``), and `metaflow stack cluster up` runs inline: the metadata
service, its UI and/or one bound function on the current Kubernetes context, or the whole dev stack
(``dev-stack:*``: Argo Workflows, S3, PostgreSQL, NATS, the service and the UI).

Set ``metadata-service:image`` to deploy the service, ``ui:image`` for the UI
(on that service, or on ``ui:serviceUrl``), ``function:image`` and
``function:name`` to serve a function, ``worker-pool:image`` (with
``prefix``, ``flowFile`` and ``redisSecret``) for standing pool workers;
any of them. On a Nomad cluster instead, set ``metaflow-nomad:namespace``
(with ``serviceImage`` and the secret ``serviceAuthKey`` for the metadata
service job there). Each Kubernetes server needs the
Secret holding its own key (``metadata-service:authSecret``, ``ui:authSecret``,
``function:authSecret``) or that namespace's ``insecureNoAuth`` set to true.
The UI sends the service's key from ``ui:serviceAuthSecret``, or from
``metadata-service:authSecret`` when this program deploys the service too.

Each output has one name whatever else is configured: the dev stack's are the
profile's (``service_url``, ``ui_url``, ...), and the separately configured
servers' are named for them (``metadata_service_url``, ``metaflow_ui_url``,
``function_service_url``), so that one never silently replaces another.
"""

import pulumi
from components.dev_stack import DevStack, DevStackArgs
from components.function_server import FunctionServer, FunctionServerArgs
from components.metadata_service import MetadataService, MetadataServiceArgs, cluster_url
from components.nomad_stack import NomadStack, NomadStackArgs
from components.ui import Ui, UiArgs
from components.worker_pool import WorkerPool, WorkerPoolArgs


def main() -> None:
    """Declare what the stack's configuration asks for."""
    dev_config = pulumi.Config("dev-stack")
    if dev_config.get("serviceImage"):
        dev = DevStack(
            "dev",
            DevStackArgs(
                service_image=dev_config.require("serviceImage"),
                ui_image=dev_config.require("uiImage"),
                task_image=dev_config.require("taskImage"),
                db_password=dev_config.require_secret("dbPassword"),
                s3_secret_key=dev_config.require_secret("s3SecretKey"),
                s3_task_secret_key=dev_config.require_secret("s3TaskSecretKey"),
                auth_key=dev_config.require_secret("authKey"),
                namespace=dev_config.get("namespace") or "metaflow",
                s3_access_key=dev_config.get("s3AccessKey") or "metaflow",
            ),
        )
        for key, value in dev.outputs.items():
            pulumi.export(key, value)
    service_url = ""
    service_config = pulumi.Config("metadata-service")
    if service_config.get("image"):
        namespace = service_config.get("namespace") or "default"
        service = MetadataService(
            "metadata-service",
            MetadataServiceArgs(
                image=service_config.require("image"),
                database_secret=service_config.get("databaseSecret") or "",
                nats_url=service_config.get("natsUrl") or "",
                auth_secret=service_config.get("authSecret") or "",
                insecure_no_auth=service_config.get_bool("insecureNoAuth") or False,
                replicas=service_config.get_int("replicas") or 2,
                namespace=namespace,
            ),
        )
        service_url = cluster_url("metadata-service", namespace)
        pulumi.export("metadata_service_url", service.service_url)

    ui_config = pulumi.Config("ui")
    if ui_config.get("image"):
        ui = Ui(
            "metaflow-ui",
            UiArgs(
                image=ui_config.require("image"),
                service_url=ui_config.get("serviceUrl") or service_url or ui_config.require("serviceUrl"),
                datastore_roots=tuple((ui_config.get("datastoreRoots") or "").split()),
                auth_secret=ui_config.get("authSecret") or "",
                insecure_no_auth=ui_config.get_bool("insecureNoAuth") or False,
                service_auth_secret=ui_config.get("serviceAuthSecret") or service_config.get("authSecret") or "",
                replicas=ui_config.get_int("replicas") or 1,
                namespace=ui_config.get("namespace") or service_config.get("namespace") or "default",
            ),
        )
        pulumi.export("metaflow_ui_url", ui.url)

    function_config = pulumi.Config("function")
    if function_config.get("image"):
        server = FunctionServer(
            f"function-{function_config.require('name').replace('_', '-').lower()}",
            FunctionServerArgs(
                image=function_config.require("image"),
                function=function_config.require("name"),
                replicas=function_config.get_int("replicas") or 1,
                namespace=function_config.get("namespace") or "default",
                auth_secret=function_config.get("authSecret") or "",
                insecure_no_auth=function_config.get_bool("insecureNoAuth") or False,
            ),
        )
        pulumi.export("function_service_url", server.service_url)

    pool_config = pulumi.Config("worker-pool")
    if pool_config.get("image"):
        WorkerPool(
            pool_config.get("name") or "worker-pool",
            WorkerPoolArgs(
                image=pool_config.require("image"),
                prefix=pool_config.require("prefix"),
                flow_file=pool_config.require("flowFile"),
                redis_secret=pool_config.require("redisSecret"),
                size=pool_config.get_int("size") or 2,
                namespace=pool_config.get("namespace") or "default",
            ),
        )

    nomad_config = pulumi.Config("metaflow-nomad")
    if nomad_config.get("namespace"):
        stack = NomadStack(
            "metaflow-nomad",
            NomadStackArgs(
                namespace=nomad_config.require("namespace"),
                service_image=nomad_config.get("serviceImage") or "",
                service_auth_key=nomad_config.get_secret("serviceAuthKey"),
                service_database_url=nomad_config.get_secret("serviceDatabaseUrl"),
                service_variables={
                    k: v
                    for k, v in (
                        ("nats_url", nomad_config.get("natsUrl")),
                        ("instances", nomad_config.get_int("instances")),
                        ("insecure_no_auth", nomad_config.get_bool("insecureNoAuth")),
                    )
                    if v is not None
                },
            ),
        )
        pulumi.export("nomad_namespace", stack.namespace.name)
