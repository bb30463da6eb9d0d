"""The one way a component installs its chart: validated offline, then an atomic Helm release."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pulumi
import pulumi_kubernetes as kubernetes

from metaflow_stack.deploy import helm


def chart_release(
    parent: pulumi.ComponentResource,
    name: str,
    chart: str,
    namespace: str,
    values: dict[str, Any],
    depends_on: pulumi.Input[Sequence[pulumi.Resource]] | None = None,
    **extra: Any,
) -> kubernetes.helm.v3.Release:
    """A release of ``infra/helm/<chart>`` named ``name``, child of ``parent``, after ``depends_on``.

    The values are rendered and validated first, so a bad one fails at
    ``pulumi preview`` naming the field; an atomic release rolls back a failed
    upgrade instead of leaving it half-applied.
    """
    helm.render(chart, values, name, namespace)
    return kubernetes.helm.v3.Release(
        name,
        kubernetes.helm.v3.ReleaseArgs(
            name=name,
            chart=str(helm.chart_dir(chart)),
            namespace=namespace,
            values=values,
            atomic=True,
            **extra,
        ),
        opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on),
    )
