"""Plugins Metaflow Stack adds to Metaflow.

``service`` replaces Metaflow's own service metadata provider with a subclass
that uses the service's pages, filters and run-end signal when the service
advertises them, and behaves exactly like the stock one when it does not.
``@devcontainer`` runs a step's tasks in Docker containers, through its
``devcontainer step`` trampoline. ``@worker_pool`` runs a foreach step's
items on warm workers, each item still a task of its own. ``@nomad`` runs a
step's tasks as Nomad batch jobs, through its ``nomad step`` trampoline; ``nomad create``
deploys a whole flow as one Nomad job, and ``Deployer(flow).nomad()`` drives it. ``@confidential`` runs a
step's tasks in a TEE (Gramine), through its ``confidential step`` trampoline, trusting their results only
after attestation; in its enclaves, artifacts are read through its input guard (an artifact serializer).
"""

METADATA_PROVIDERS_DESC = [("service", ".metadata_service.service_provider.StackServiceMetadataProvider")]

STEP_DECORATORS_DESC = [
    ("devcontainer", ".devcontainer.devcontainer_decorator.DevcontainerDecorator"),
    ("worker_pool", ".worker_pool.worker_pool_decorator.WorkerPoolDecorator"),
    ("nomad", ".nomad.nomad_decorator.NomadDecorator"),
    ("confidential", ".confidential.confidential_decorator.ConfidentialDecorator"),
]
ARTIFACT_SERIALIZERS_DESC = [("confidential_inputs", ".confidential.input_guard.InputGuard")]
DEPLOYER_IMPL_PROVIDERS_DESC = [("nomad", ".nomad.nomad_deployer.NomadDeployer")]
CLIS_DESC = [
    ("devcontainer", ".devcontainer.devcontainer_cli.cli"),
    ("nomad", ".nomad.nomad_cli.cli"),
    ("confidential", ".confidential.confidential_cli.cli"),
]
