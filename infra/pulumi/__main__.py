"""`pulumi up`: the metadata service and/or one bound function on the current Kubernetes context.

Set ``metadata-service:image`` to deploy the service, ``function:image`` and
``function:name`` to serve a function; either or both.
"""

import pulumi
from components.function_server import FunctionServer, FunctionServerArgs
from components.metadata_service import MetadataService, MetadataServiceArgs

service_config = pulumi.Config("metadata-service")
if service_config.get("image"):
    service = MetadataService(
        "metadata-service",
        MetadataServiceArgs(
            image=service_config.require("image"),
            database_secret=service_config.get("databaseSecret") or "",
            nats_url=service_config.get("natsUrl") or "",
            auth_secret=service_config.get("authSecret") or "",
            replicas=service_config.get_int("replicas") or 2,
            namespace=service_config.get("namespace") or "default",
        ),
    )
    pulumi.export("metadata_service_url", service.service_url)

function_config = pulumi.Config("function")
if function_config.get("image"):
    server = FunctionServer(
        f"function-{function_config.require('name').replace('_', '-').lower()}",
        FunctionServerArgs(
            image=function_config.require("image"),
            function=function_config.require("name"),
            replicas=function_config.get_int("replicas") or 1,
            namespace=function_config.get("namespace") or "default",
        ),
    )
    pulumi.export("service_url", server.service_url)
