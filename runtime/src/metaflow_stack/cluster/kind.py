"""A kind cluster for the dev stack: made, loaded with local images, deleted.

The stack's services this machine uses (the metadata service, the UI, S3)
are NodePorts, and kind publishes each on this machine's loopback at the
same port number: nothing is published beyond this machine. The cluster's
pods reach the same services by the cluster's own DNS names.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from metaflow_stack.errors import StackError, ToolMissingError

CLUSTER = "metaflow-stack"
#: Each service's NodePort, published on this machine at the same port number.
NODE_PORTS = {"metadata-service": 30080, "ui": 30324, "s3": 30900}


def require() -> str:
    """kind's binary, or one line naming how to install it."""
    found = shutil.which("kind")
    if found is None:
        raise ToolMissingError(
            "kind is not installed", fix="install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
        )
    return found


def _run(args: list[str], what: str, timeout: float = 600) -> str:
    try:
        done = subprocess.run([require(), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        fix = "check Docker (`docker info`) and try again"
        raise StackError(f"{what} took over {timeout:.0f} s", fix=fix) from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise StackError(f"{what} failed: {reason}", fix="`just cluster down` removes a half-made cluster; try again")
    return done.stdout


def config() -> str:
    """kind's cluster configuration (JSON, which is YAML): one node, the stack's NodePorts published on
    this machine's loopback."""
    mappings = [{"containerPort": p, "hostPort": p, "listenAddress": "127.0.0.1"} for p in NODE_PORTS.values()]
    node = {"role": "control-plane", "extraPortMappings": mappings}
    return json.dumps({"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4", "nodes": [node]}, indent=2)


def exists(name: str = CLUSTER) -> bool:
    return name in _run(["get", "clusters"], "listing kind clusters").split()


def create(name: str = CLUSTER) -> bool:
    """Make the cluster unless it exists (then it must publish the stack's ports); whether it was made now."""
    if exists(name):
        _check_published(name)
        return False
    with tempfile.TemporaryDirectory(prefix="stack-kind-") as tmp:
        path = Path(tmp) / "kind.yaml"
        path.write_text(config())
        args = ["create", "cluster", "--name", name, "--config", str(path), "--wait", "180s"]
        _run(args, f"creating the kind cluster {name}", 900)
    return True


def _check_published(name: str) -> None:
    """Refuse a cluster of this name that was made without the stack's ports (by hand, or another tool)."""
    node = f"{name}-control-plane"
    try:
        done = subprocess.run(["docker", "port", node], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"cannot read {node}'s published ports: {exc}", fix="check Docker (`docker info`)") from None
    published = done.stdout
    missing = [port for port in NODE_PORTS.values() if f"127.0.0.1:{port}" not in published]
    if missing:
        raise StackError(
            f"the kind cluster {name} does not publish the stack's ports {missing} on 127.0.0.1",
            fix="`just cluster down` deletes it; `just cluster up` then makes it as the stack needs",
        )


def load(images: list[str], name: str = CLUSTER) -> None:
    """Copy local images into the cluster's node (pods of their content-derived tags then run them with
    ``imagePullPolicy: IfNotPresent``: nothing is pulled)."""
    for image in images:
        _run(["load", "docker-image", image, "--name", name], f"loading {image} into {name}")


def delete(name: str = CLUSTER) -> bool:
    """Delete the cluster; whether there was one."""
    if not exists(name):
        return False
    _run(["delete", "cluster", "--name", name], f"deleting the kind cluster {name}")
    return True


def context(name: str = CLUSTER) -> str:
    """The kubectl context kind writes for the cluster."""
    return f"kind-{name}"
