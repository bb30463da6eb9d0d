"""`pulumi up`: serve one bound function on the current Kubernetes context."""

import pulumi
from components.function_server import FunctionServer, FunctionServerArgs

config = pulumi.Config("function")
server = FunctionServer(
    f"function-{config.require('name').replace('_', '-').lower()}",
    FunctionServerArgs(
        image=config.require("image"),
        function=config.require("name"),
        replicas=config.get_int("replicas") or 1,
        namespace=config.get("namespace") or "default",
    ),
)
pulumi.export("service_url", server.service_url)
