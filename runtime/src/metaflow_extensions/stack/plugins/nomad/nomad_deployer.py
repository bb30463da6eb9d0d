"""``Deployer(flow).nomad()``: Metaflow's Deployer API over ``nomad create`` and ``nomad trigger``.

``Deployer("flow.py").nomad(name=...).create(cpu=..., memory=...)`` deploys the flow as one Nomad job (see
``metaflow_stack.nomad.deployment``); the ``DeployedFlow`` it returns runs it with ``trigger(**parameters)``,
whose ``TriggeredRun`` names the run as soon as it has started (``wait_for_run``, ``run``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from metaflow.runner.deployer_impl import DeployerImpl

if TYPE_CHECKING:
    from .nomad_deployer_objects import NomadDeployedFlow


class NomadDeployer(DeployerImpl):
    """Deploys a flow as a Nomad job. ``name``: the job's ID (default ``metaflow-<flow>``)."""

    TYPE: ClassVar[str | None] = "nomad"

    def __init__(self, deployer_kwargs: dict[str, Any], **kwargs: Any) -> None:
        self._deployer_kwargs = deployer_kwargs
        super().__init__(**kwargs)

    @property
    def deployer_kwargs(self) -> dict[str, Any]:
        return self._deployer_kwargs

    @staticmethod
    def deployed_flow_type() -> type[NomadDeployedFlow]:
        # (imported here: Metaflow's deployer module imports the plugins, which import this one)
        from .nomad_deployer_objects import NomadDeployedFlow

        return NomadDeployedFlow

    def create(self, **kwargs: Any) -> NomadDeployedFlow:
        """Deploy the flow (``nomad create``: ``cpu``, ``memory``, ``image``)."""
        return self._create(self.deployed_flow_type(), **kwargs)
