"""The ``kubernetes`` backend: the Redis backend's queue and dispatcher, its workers long-running pods.

The run's runtime renders ``infra/helm/worker-pool`` for the step (``size``
replicas of the stack's image running the Redis worker, with the step's
``@resources``), validates every manifest offline against Kubernetes'
schemas, applies it with ``kubectl`` when the run starts and waits for the
pods to be ready (warm) before the first item. The dispatcher deletes them
when it stops, which it does when the run ends however it ends (its pipe
from the runtime closes even when the runtime is killed outright). The pods
must see the flow's file at the run's path (built into the image, or
mounted through ``hostPaths`` on a dev cluster), reach Redis at the pod URL
and a datastore both sides share.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from metaflow_stack.errors import StackError, ToolMissingError
from metaflow_stack.pool.processes import PoolProcess
from metaflow_stack.pool.redis_pool import RedisPool

#: Where the pods find Redis, when not where the runtime does (a cluster's view of the same server).
POD_URL_VARIABLE = "METAFLOW_STACK_POOL_POD_REDIS_URL"
#: The image the pods run, when the decorator does not say (default: the stack's base image).
IMAGE_VARIABLE = "METAFLOW_STACK_POOL_IMAGE"
#: A YAML file of chart values laid over the runtime's (``hostPaths``, ``envFrom``, ``nodeSelector``...).
VALUES_VARIABLE = "METAFLOW_STACK_POOL_VALUES"
#: Seconds the pods have to pull the image, start and import the flow before the step fails.
READY_TIMEOUT_S = 300
#: The pool's manifests in its folder (mode 0600: the Secret is among them), for the dispatcher.
PODS_FILE = "pods.yaml"
#: Seconds ``kubectl`` has for anything else.
KUBECTL_TIMEOUT_S = 120


class KubernetesPool(RedisPool):
    """A dispatcher here and ``size`` worker pods, sharing one Redis queue."""

    backend = "kubernetes"

    fix = "check the cluster (kubectl get pods) and that the pods reach Redis (" + POD_URL_VARIABLE + ")"

    def __init__(
        self,
        flow_file: str,
        size: int,
        name: str,
        url: str,
        prefix: str,
        *,
        image: str,
        resources: dict[str, Any],
        values: dict[str, Any],
        namespace: str,
    ) -> None:
        super().__init__(flow_file, size, name, url, prefix)
        self.args += [namespace, self.release]  # the dispatcher's: which pods to delete
        self.image, self.resources, self.extra_values, self.namespace = image, resources, values, namespace
        self.applied: str | None = None  # the applied manifests, as YAML
        self.rolled_out = False

    @property
    def release(self) -> str:
        """A release name of Kubernetes' alphabet, one per run and step."""
        step = re.sub(r"[^a-z0-9-]+", "-", self.name.split("@")[0].lower()).strip("-")[:24] or "step"
        return f"mf-pool-{step}-{hashlib.sha256(self.prefix.encode()).hexdigest()[:10]}"

    def values(self) -> dict[str, Any]:
        redis = {"url": os.environ.get(POD_URL_VARIABLE) or self.url}
        values = chart_values(self.prefix, self.flow_file, self.size, self.image, redis, self.resources)
        return merge(values, self.extra_values)

    def start(self) -> None:
        from metaflow_stack.deploy import helm

        release = helm.render(CHART, self.values(), self.release, self.namespace)
        secrets_first = sorted(release.manifests, key=lambda m: m["kind"] != "Secret")  # the pods read it at start
        manifests = helm.Release(release.name, release.namespace, secrets_first).to_yaml()
        super().start()  # the dispatcher: Redis must answer before anything reaches the cluster
        assert self.folder is not None
        pods = self.folder.path / PODS_FILE  # for the dispatcher, which deletes them however the run ends
        os.close(os.open(pods, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # (it holds the Secret)
        pods.write_text(manifests)
        try:
            kubectl("apply", "--namespace", self.namespace, "-f", "-", stdin=manifests)
        except StackError:
            super().stop()
            raise
        self.applied = manifests

    def start_workers(self) -> list[PoolProcess]:
        return []  # pods, started by the cluster

    def command(self, entrypoint: list[str]) -> list[str]:
        line = super().command(entrypoint)
        if not self.rolled_out:
            try:
                kubectl(
                    "rollout",
                    "status",
                    f"deployment/{self.release}",
                    "--namespace",
                    self.namespace,
                    f"--timeout={READY_TIMEOUT_S}s",
                    timeout_s=READY_TIMEOUT_S + 30,
                )
            except StackError as exc:
                self.stop()
                raise StackError(
                    f"the pool's pods did not become ready: {exc.message}",
                    fix=f"kubectl --namespace {self.namespace} describe pods -l app.kubernetes.io/instance="
                    f"{self.release} (the pods need the image, the flow at {self.flow_file} and Redis)",
                ) from None
            self.rolled_out = True
        return line

    def stop(self) -> None:
        super().stop()  # the dispatcher deletes the pods as it stops
        self.rolled_out = False
        if self.applied is not None:  # and if it could not (it was killed), this does; else finds none
            manifests, self.applied = self.applied, None
            delete_pods(manifests, self.namespace, self.release)


def delete_pods(manifests: str, namespace: str, release: str) -> None:
    """Delete a pool's objects and wait for its pods to end; if kubectl cannot, say what is left and how to
    remove it (stopping goes on)."""
    delete = ["delete", "--namespace", namespace, "--ignore-not-found", "--wait=true", "-f", "-"]
    try:
        kubectl(*delete, stdin=manifests)
    except StackError as exc:
        label = f"app.kubernetes.io/instance={release}"
        print(
            f"worker pool: the pods may be left: {exc.message} "
            f"(fix: kubectl --namespace {namespace} delete deployment,secret -l {label})",
            file=sys.stderr,
        )


#: The chart every worker pod comes from.
CHART = "worker-pool"


def chart_values(
    prefix: str, flow_file: str, size: int, image: str, redis: dict[str, str], resources: dict[str, Any]
) -> dict[str, Any]:
    """The chart's values for a pool (shared by the runtime and the Pulumi component): ``redis`` is
    ``{"url": ...}`` or ``{"existingSecret": ...}``."""
    repository, tag = split_image(image)
    return {
        "image": {"repository": repository, "tag": tag},
        "pool": {"prefix": prefix, "flowFile": flow_file, "size": size},
        "redis": redis,
        "resources": resources,
    }


def open_kubernetes_pool(
    flow_file: str, size: int, name: str, url: str, prefix: str, resources: dict[str, Any], image: str | None
) -> KubernetesPool:
    """The pool as the decorator's settings and the environment describe it."""
    return KubernetesPool(
        flow_file,
        size,
        name,
        url,
        prefix,
        image=image or os.environ.get(IMAGE_VARIABLE) or stack_image(),
        resources=kubernetes_resources(resources.get("cpu"), resources.get("gpu"), resources.get("memory")),
        values=extra_values(),
        namespace=os.environ.get("METAFLOW_KUBERNETES_NAMESPACE") or "default",
    )


def stack_image() -> str:
    """The stack's base image: here already, else published, else built now; pushed where a registry is
    configured (the cluster pulls it from there), else as it is here (``kind load docker-image`` it)."""
    from metaflow_stack import images, settings

    reference = images.resolve("base")
    return images.push_reference(reference) if settings.load().registry else reference


def extra_values() -> dict[str, Any]:
    """The chart values of the file ``METAFLOW_STACK_POOL_VALUES`` names, if it does."""
    import yaml

    path = os.environ.get(VALUES_VARIABLE)
    if not path:
        return {}
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise StackError(f"{VALUES_VARIABLE}={path} is not readable YAML: {exc}", fix="correct the file") from None
    if not isinstance(values, dict):
        raise StackError(f"{VALUES_VARIABLE}={path} holds no mapping of values", fix="write chart values as a mapping")
    return values


def kubectl(*args: str, stdin: str | None = None, timeout_s: float = KUBECTL_TIMEOUT_S) -> str:
    """Run ``kubectl`` on the current context; ``StackError`` with its last line if it fails (manifests go on
    standard input: the Secret's URL is on no command line)."""
    binary = shutil.which("kubectl")
    if binary is None:
        raise ToolMissingError("kubectl is not on PATH", fix="install kubectl and point it at the cluster")
    try:
        done = subprocess.run(
            [binary, *args], input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise StackError(f"kubectl {args[0]} did not end in {timeout_s:.0f}s", fix="check the cluster") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise StackError(f"kubectl {args[0]} failed: {lines[-1]}", fix="check the current kubectl context")
    return done.stdout


def split_image(image: str) -> tuple[str, str]:
    """``repository`` and ``tag`` of an image reference (a registry's port is not a tag)."""
    repository, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:
        return image, "latest"
    return repository, tag


def kubernetes_resources(cpu: Any, gpu: Any, memory_mb: Any) -> dict[str, Any]:
    """A container's resources from a step's ``@resources`` (memory in MB, as Metaflow's): requests, and the
    memory and GPUs as limits too."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu:
        requests["cpu"] = str(cpu)
    if memory_mb:
        requests["memory"] = limits["memory"] = f"{int(float(memory_mb))}Mi"
    if gpu:
        limits["nvidia.com/gpu"] = str(int(float(gpu)))
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``, dictionaries merged key by key (as Helm merges values files)."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = (
            merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged
