"""``NomadStack``: a Nomad cluster made ready for Metaflow, through the Pulumi Nomad provider.

It applies the flows' namespace (its jobs limited to the task drivers
named: ``docker`` and ``exec``, not the unisolated ``raw_exec``, unless
told) and its ACL policy (the rules of ``infra/nomad/dev/metaflow.policy.hcl``,
the file the dev cluster applies, for the namespace chosen here), and,
given an image, the metadata service job
``infra/nomad/metadata-service.nomad.hcl`` with its key (and database URL)
in Nomad Variables, where the job's template reads them. The service runs
in a namespace of its own (``default`` unless its variables name one),
never the flows': a flows' token may submit jobs there, and so could
replace the service or read its secrets. The job's variables are checked against its
declarations at construction (``metaflow_stack.deploy.nomad.render``), so a
bad one fails at ``pulumi preview``; Nomad's own HCL2 parser then applies
them, as ``nomad job run -var`` would. The provider finds the cluster as
Nomad's CLI does (``NOMAD_ADDR``, ``NOMAD_TOKEN``: a management token) or
from the ``nomad:`` configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_nomad

from metaflow_stack.deploy import nomad
from metaflow_stack.errors import StackError
from metaflow_stack.nomad.dev_cluster import NAMESPACE, policy_rules


@dataclass(frozen=True)
class NomadStackArgs:
    """Which namespace flows run in, and the metadata service job when ``service_image`` is given."""

    namespace: str = NAMESPACE
    #: The task drivers the flows' jobs may use.
    drivers: tuple[str, ...] = ("docker", "exec")
    service_image: str = ""
    #: The service's key (a Pulumi secret), required unless ``service_variables`` opts out of auth.
    service_auth_key: pulumi.Input[str] | None = None
    #: A PostgreSQL URL (a Pulumi secret); without one the service runs on SQLite in its allocation.
    service_database_url: pulumi.Input[str] | None = None
    #: Other variables of ``metadata-service.nomad.hcl`` (``namespace``, ``nats_url``, ``instances``...).
    service_variables: dict[str, Any] = field(default_factory=dict)


class NomadStack(pulumi.ComponentResource):
    """The namespace, its policy and (optionally) the metadata service job.

    No token: one made here would keep its secret in Pulumi's state. Flows get theirs from
    ``nomad acl token create -name=flows -policy=<namespace>``."""

    def __init__(self, name: str, args: NomadStackArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("metaflow-stack:nomad:NomadStack", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        rules = policy_rules(args.namespace)
        self.namespace = pulumi_nomad.Namespace(
            f"{name}-namespace",
            name=args.namespace,
            description="Metaflow runs (@nomad)",
            capabilities=pulumi_nomad.NamespaceCapabilitiesArgs(enabled_task_drivers=list(args.drivers)),
            opts=child,
        )
        self.policy = pulumi_nomad.AclPolicy(
            f"{name}-policy",
            name=args.namespace,
            description="What a @nomad run needs in its namespace",
            rules_hcl=rules,
            opts=child,
        )
        self.service: pulumi_nomad.Job | None = None
        self.service_secrets: pulumi_nomad.Variable | None = None
        if args.service_image:
            self.service = self._service(name, args)
        self.register_outputs({"namespace": self.namespace.name, "policy": self.policy.name})

    def _service(self, name: str, args: NomadStackArgs) -> pulumi_nomad.Job:
        variables = {"namespace": "default", **args.service_variables, "image": args.service_image}
        if variables["namespace"] == args.namespace:
            raise StackError(
                f"the metadata service would run in the flows' namespace {args.namespace!r}, where their token "
                "may replace it and read its secrets",
                fix="give service_variables a namespace of its own (or leave it to 'default')",
            )
        job = nomad.render("metadata-service", variables)
        job_name = str(variables.get("name", "metadata-service"))
        # The job's template waits until its variable exists: it is made even when it holds no secret.
        items: dict[str, pulumi.Input[str]] = {}
        if args.service_auth_key is not None:
            items["auth_key"] = args.service_auth_key
        elif variables.get("insecure_no_auth"):
            items["insecure_no_auth"] = "true"
        else:
            raise StackError(
                "the metadata service job needs service_auth_key, or insecure_no_auth=True in service_variables",
                fix="set metaflow-nomad:serviceAuthKey with `pulumi config set --secret`",
            )
        if args.service_database_url is not None:
            items["database_url"] = args.service_database_url
        self.service_secrets = pulumi_nomad.Variable(
            f"{name}-service-secrets",
            path=f"nomad/jobs/{job_name}",
            namespace=variables["namespace"],
            items=items,
            opts=pulumi.ResourceOptions(parent=self),
        )
        return pulumi_nomad.Job(
            f"{name}-metadata-service",
            jobspec=job.hcl,
            hcl2=pulumi_nomad.JobHcl2Args(vars=job.cli_vars()),
            purge_on_destroy=True,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.service_secrets]),
        )
