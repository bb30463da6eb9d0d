"""The ``DeployedFlow`` of ``Deployer(flow).nomad()``: a flow deployed as a Nomad job, and its ``trigger``.

Apart from ``nomad_deployer``: Metaflow's deployer module, which this one needs, imports the plugins.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from metaflow.runner.deployer import DeployedFlow, TriggeredRun
from metaflow.runner.utils import get_lower_level_group, handle_timeout, temporary_fifo


class NomadDeployedFlow(DeployedFlow):
    """A flow deployed as a Nomad job."""

    TYPE: ClassVar[str | None] = "nomad"

    def trigger(self, **kwargs: Any) -> TriggeredRun:
        """Run the deployed flow once with these parameters (``nomad trigger``); returns when the run has an id."""
        with temporary_fifo() as (attribute_file_path, attribute_file_fd):
            group = get_lower_level_group(
                self.deployer.api, self.deployer.top_level_kwargs, self.deployer.TYPE, self.deployer.deployer_kwargs
            )
            command = group.trigger(deployer_attribute_file=attribute_file_path, **kwargs)
            pid = self.deployer.spm.run_command(
                [sys.executable, *command],
                env=self.deployer.env_vars,
                cwd=self.deployer.cwd,
                show_output=self.deployer.show_output,
            )
            command_obj = self.deployer.spm.get(pid)
            content = handle_timeout(attribute_file_fd, command_obj, self.deployer.file_read_timeout)
            command_obj.sync_wait()
            if command_obj.process.returncode == 0:
                return TriggeredRun(deployer=self.deployer, content=content)
        raise RuntimeError(f"could not trigger {self.deployer.name} on Nomad for {self.deployer.flow_file}")

    @classmethod
    def from_deployment(cls, identifier: str, metadata: str | None = None) -> NomadDeployedFlow:
        raise NotImplementedError(_NOT_YET)

    @classmethod
    def list_deployed_flows(cls, flow_name: str | None = None) -> list[NomadDeployedFlow]:
        raise NotImplementedError(_NOT_YET)

    @classmethod
    def get_triggered_run(cls, identifier: str, run_id: str, metadata: str | None = None) -> TriggeredRun:
        raise NotImplementedError(_NOT_YET)


#: Metaflow's other entry points to deployed flows, which would otherwise fall through to Argo Workflows'.
_NOT_YET = (
    "a Nomad deployment is reached from its flow for now: Deployer('flow.py').nomad(name=...).create(), or "
    "`python flow.py nomad trigger`; its runs are in the metadata service (tag nomad-job:<job>)"
)
