"""``metaflow stack cluster up|down|config``: the dev stack on a local kind cluster, end to end.

``up`` makes the kind cluster (unless it is there), builds or pulls the
stack's base image (what tasks run in), the service's and the UI's, and
loads them into the cluster, brings the
Pulumi stack up on it (the program's ``dev-stack`` configuration), and
writes the Metaflow profile that reaches it. Its secrets (the database
password, MinIO's root password and the tasks' S3 password, the service's key) are made once and kept in the state
folder (mode 0600), so running ``up`` again on the same cluster changes nothing. ``down``
deletes the cluster, which holds all the stack made, forgets the stack, and removes the profiles and
the AWS config file ``up`` wrote: they hold the service's key and S3's, for a cluster that is gone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metaflow_stack import images, local_secrets, settings
from metaflow_stack.cluster import kind, profile, stack
from metaflow_stack.engines.docker import require_engine
from metaflow_stack.errors import InvalidInput, StackError

#: A namespace: a DNS label (RFC 1123), and none of Kubernetes' own.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_RESERVED = {"default", "kube-system", "kube-public", "kube-node-lease"}


def _state() -> Path:
    return settings.load().state_dir / "cluster"


def _secrets() -> dict[str, str]:
    """The stack's secrets, made on first use and kept (mode 0600)."""
    state = _state()
    return {
        name: local_secrets.secret(state / name)[0]
        for name in ("dbPassword", "s3SecretKey", "s3TaskSecretKey", "authKey")
    }


def check_namespace(namespace: str) -> str:
    """``namespace`` when the stack may take it; else one line saying why not."""
    if not _NAMESPACE.fullmatch(namespace) or namespace in _RESERVED:
        raise InvalidInput(
            "--namespace",
            f"{namespace!r} is not a namespace the stack can take",
            fix="a DNS label of lowercase letters, digits and '-' (at most 63), not default or kube-*",
        )
    return namespace


def up(say: Callable[[str], Any], namespace: str = "metaflow", name: str = profile.PROFILE) -> dict[str, str]:
    """Bring the dev stack up on kind; the variables that select its profile.

    Every tool is checked first, so a missing one stops ``up`` before
    anything is made. A cluster made now starts the stack's state afresh
    (state left by a cluster deleted otherwise would say all exists).
    """
    check_namespace(namespace)
    kind.require()
    require_engine()
    stack.require()
    before = stack.outputs(missing_ok=True).get("namespace")
    if before and before != namespace:
        fix = f"`just cluster down` first, or keep --namespace {before}"
        raise InvalidInput("--namespace", f"the stack is up in {before!r}", fix=fix)
    if kind.create():
        say(f"made the kind cluster {kind.CLUSTER}")
        stack.forget()
    base, service, ui = (images.resolve(image) for image in ("base", "metadata-service", "ui"))
    kind.load([base, service, ui])
    config = {
        "kubernetes:context": kind.context(),
        "dev-stack:serviceImage": service,
        "dev-stack:uiImage": ui,
        "dev-stack:taskImage": base,
        "dev-stack:namespace": namespace,
    }
    outputs = stack.up(config, {f"dev-stack:{k}": v for k, v in _secrets().items()}, say)
    return _profile(outputs, name)


def _profile(outputs: dict[str, Any], name: str) -> dict[str, str]:
    secrets = _secrets()
    return profile.write(outputs, secrets["authKey"], secrets["s3SecretKey"], _state(), name)


def config(name: str = profile.PROFILE) -> dict[str, str]:
    """Write the profile again from the stack's outputs (after ``up``); the variables that select it."""
    outputs = stack.outputs(missing_ok=True)
    if not outputs:
        raise StackError("no dev stack is up on this machine", fix="run `just cluster up`")
    return _profile(outputs, name)


def down(say: Callable[[str], Any]) -> None:
    """Delete the cluster, and with it everything the stack made there; then forget the stack's state and
    remove the profiles that reached it."""
    if kind.delete():
        say(f"deleted the kind cluster {kind.CLUSTER}")
    else:
        say(f"no kind cluster {kind.CLUSTER} here")
    stack.forget()
    for path in profile.remove(_state()):
        say(f"removed {path}")
