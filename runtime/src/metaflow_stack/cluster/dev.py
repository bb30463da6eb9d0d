"""``metaflow stack cluster up|down|config``: the dev stack on a local kind cluster, end to end.

``up`` makes the kind cluster (unless it is there), builds or pulls the
stack's base image (what tasks run in), the service's and the UI's, and
loads them into the cluster, brings the
Pulumi stack up on it (the program's ``dev-stack`` configuration), and
writes the Metaflow profile that reaches it. Its secrets (the database
password, the S3 key, the service's key) are made once and kept in the state
folder (mode 0600), so running ``up`` again changes nothing. ``down``
deletes the cluster, which holds all the stack made, and forgets the stack.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from metaflow_stack import images, local_secrets, settings
from metaflow_stack.cluster import kind, profile, stack
from metaflow_stack.errors import StackError

S3_ACCESS_KEY = "metaflow"


def _state() -> Path:
    return settings.load().state_dir / "cluster"


def _secrets() -> dict[str, str]:
    """The stack's secrets, made on first use and kept (mode 0600)."""
    state = _state()
    return {name: local_secrets.secret(state / name)[0] for name in ("dbPassword", "s3SecretKey", "authKey")}


def up(say: Callable[[str], Any], namespace: str = "metaflow", name: str = profile.PROFILE) -> dict[str, str]:
    """Bring the dev stack up on kind; the variables that select its profile."""
    if kind.create():
        say(f"made the kind cluster {kind.CLUSTER}")
    base, service, ui = (images.resolve(image) for image in ("base", "metadata-service", "ui"))
    kind.load([base, service, ui])
    config = {
        "kubernetes:context": kind.context(),
        "dev-stack:serviceImage": service,
        "dev-stack:uiImage": ui,
        "dev-stack:namespace": namespace,
    }
    outputs = stack.up(config, {f"dev-stack:{k}": v for k, v in _secrets().items()}, say)
    return _profile(outputs, base, name)


def _profile(outputs: dict[str, Any], task_image: str, name: str) -> dict[str, str]:
    secrets = _secrets()
    outputs = {**outputs, "task_image": task_image}
    return profile.write(outputs, secrets["authKey"], S3_ACCESS_KEY, secrets["s3SecretKey"], _state(), name)


def config(name: str = profile.PROFILE) -> dict[str, str]:
    """Write the profile again from the stack's outputs (after ``up``); the variables that select it."""
    outputs = stack.outputs()
    if not outputs:
        raise StackError("no dev stack is up on this machine", fix="run `just cluster up`")
    return _profile(outputs, images.resolve("base"), name)


def down(say: Callable[[str], Any]) -> None:
    """Delete the cluster, and with it everything the stack made there; then forget the stack's state."""
    if kind.delete():
        say(f"deleted the kind cluster {kind.CLUSTER}")
    else:
        say(f"no kind cluster {kind.CLUSTER} here")
    stack.forget()
