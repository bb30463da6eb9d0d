"""A flow compiled for Argo Workflows with no cluster, and the result checked against Argo's API schema.

``compile_flow`` asks Metaflow itself (``Deployer(flow).argo_workflows()
.create(only_json=True)``) for the WorkflowTemplate it would create. That
uploads the flow's code package, so it needs an S3 datastore (any
S3-compatible server); it needs no cluster. ``validate`` checks the template
against hera's models of Argo Workflows' API (generated from the OpenAPI
description Argo publishes), strictly: a field Argo does not know fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaflow_stack.ci import schemas
from metaflow_stack.deploy import require
from metaflow_stack.errors import StackError


def compile_flow(flow_file: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The WorkflowTemplate ``flow_file`` deploys as (nothing is made in a cluster; the code package is
    uploaded)."""
    from metaflow import Deployer

    try:
        deployer = Deployer(str(flow_file), show_output=False, env=env or {}, cwd=str(flow_file.parent))
        deployer = deployer.argo_workflows()
    except Exception as exc:  # (the flow's file is imported here: whatever it raises, or defines no flow)
        said = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise StackError(
            f"{flow_file.name} cannot be loaded as a flow: {type(exc).__name__}{': ' + said if said else ''}",
            fix=f"run `python {flow_file.name} show` to see the whole error",
        ) from None
    try:
        deployed = deployer.create(only_json=True)
    except RuntimeError as exc:  # the Deployer's word for a create command that failed
        raise StackError(
            f"{flow_file.name} does not compile for Argo Workflows: {str(exc).strip().splitlines()[-1]}",
            fix="run `python FLOW --datastore s3 argo-workflows create --only-json` to see the whole error; it "
            "needs an S3 datastore (METAFLOW_DEFAULT_DATASTORE=s3, METAFLOW_DATASTORE_SYSROOT_S3)",
        ) from None
    finally:
        deployer.cleanup()
    return deployed.workflow_template


def _hera_models() -> Any:
    """hera's models, imported with the installed ``typing_extensions``'s own generics rule in ``typing``.

    Each copy of ``typing_extensions`` replaces ``typing._collect_parameters``
    when imported, and Metaflow vendors its own copy (loaded by its Runner
    and Deployer): under that copy's rule, a class generic over the installed
    copy's type variables fails to define ("Type parameter ... without a
    default follows type parameter with a default"), and hera defines such
    classes. The installed copy's rule is put back for the import only.
    """
    import typing

    import typing_extensions

    current = typing._collect_parameters  # type: ignore[attr-defined]
    own = getattr(typing_extensions, "_collect_parameters", current)
    typing._collect_parameters = own  # type: ignore[attr-defined]
    try:
        return require("hera.workflows.models", extra="ci")
    finally:
        typing._collect_parameters = current  # type: ignore[attr-defined]


def validate(template: dict[str, Any]) -> Any:
    """``template`` as hera's ``WorkflowTemplate``, or ``InvalidInput`` naming the field Argo would refuse."""
    models = _hera_models()
    return schemas.validate(template, [models.WorkflowTemplate], "Argo Workflows' WorkflowTemplate")
