"""The ``DeployedFlow`` of ``Deployer(flow).nomad()``: a flow deployed as a Nomad job, and its ``trigger``.

Apart from ``nomad_deployer``: Metaflow's deployer module, which this one needs, imports the plugins.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
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
        """The flow deployed as the Nomad job ``identifier`` (at ``NOMAD_ADDR``), to trigger without its file:
        its parameters and ``@project`` branch are in the job's ``Meta``, as Argo Workflows keeps them."""
        from metaflow import Deployer
        from metaflow.exception import MetaflowException
        from metaflow.runner.deployer import generate_fake_flow_file_contents

        from metaflow_stack.engines.nomad.client import NomadClient
        from metaflow_stack.errors import StackError
        from metaflow_stack.nomad.deployment import DEPLOYED, deployment_facts

        try:
            with NomadClient() as client:
                meta = client.job(identifier).get("Meta") or {}
        except StackError as exc:
            raise MetaflowException(f"no deployed flow {identifier}: {exc}") from None
        if meta.get(DEPLOYED) != "true":
            raise MetaflowException(f"the Nomad job {identifier} is not a deployed flow (`nomad create` makes those)")
        try:
            flow_name, param_info, project_name = deployment_facts(meta)
        except StackError as exc:
            raise MetaflowException(f"the Nomad job {identifier}: {exc}") from None
        branch = meta.get("metaflow.branch_name")
        project_kwargs: dict[str, Any] = {}
        if branch is not None:  # Metaflow's branch names: prod, prod.<name>, test.<name>
            prefix, _, given = branch.partition(".")
            project_kwargs = {"production": True} if prefix == "prod" else {}
            if given:
                project_kwargs["branch"] = given
        contents = generate_fake_flow_file_contents(flow_name, param_info, project_name)
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as flow_file:
            flow_file.write(contents)
        owner = {"METAFLOW_USER": meta["metaflow.owner"]} if meta.get("metaflow.owner") else {}
        deployer = Deployer(flow_file.name, env=owner, **project_kwargs).nomad(name=identifier)
        deployer.name, deployer.flow_name = identifier, flow_name
        deployer.metadata = metadata or _metadata()
        deployed = cls(deployer=deployer)
        # (Its commands run the file: it goes with the deployer, or when this interpreter ends.)
        weakref.finalize(deployer, functools.partial(Path(flow_file.name).unlink, missing_ok=True))
        return deployed

    @classmethod
    def list_deployed_flows(cls, flow_name: str | None = None) -> Iterator[NomadDeployedFlow]:
        """The flows deployed at ``NOMAD_ADDR`` (in its namespace), or those of ``flow_name``."""
        from metaflow.exception import MetaflowException

        from metaflow_stack.engines.nomad.client import NomadClient
        from metaflow_stack.nomad.deployment import DEPLOYED

        with NomadClient() as client:
            jobs = client.jobs("")
        for job in jobs:
            meta = job.get("Meta") or {}
            ours = flow_name is None or meta.get("metaflow.flow") == flow_name
            if meta.get(DEPLOYED) == "true" and not job.get("ParentID") and ours:  # (not a dispatch of one)
                try:
                    yield cls.from_deployment(job["ID"])
                except MetaflowException as exc:  # (one job anyone may submit stops no one's listing)
                    warnings.warn(f"skipped: {exc}", stacklevel=2)

    @classmethod
    def get_triggered_run(cls, identifier: str, run_id: str, metadata: str | None = None) -> TriggeredRun:
        """The run ``run_id`` of the flow deployed as ``identifier``."""
        deployed = cls.from_deployment(identifier, metadata)
        content = {
            "name": identifier,
            "metadata": deployed.deployer.metadata,
            "pathspec": f"{deployed.flow_name}/{run_id}",
        }
        return TriggeredRun(deployer=deployed.deployer, content=json.dumps(content))


def _metadata() -> str:
    """The metadata provider this process uses, as ``TYPE@info``."""
    from metaflow import get_metadata

    return get_metadata()
