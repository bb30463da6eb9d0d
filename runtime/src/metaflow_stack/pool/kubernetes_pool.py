"""The ``kubernetes`` backend: the Redis backend's queue and dispatcher, its workers long-running pods.

The run's runtime renders ``infra/helm/worker-pool`` for the step (``size``
replicas of the stack's image running the Redis worker, with the step's
``@resources``), validates every manifest offline against Kubernetes'
schemas, applies it with ``kubectl`` when the run starts (once the dispatcher
reached Redis) and waits for the pods to be ready (warm) before the first
item, failing at once, with the reason, for a pod that cannot start. The
dispatcher deletes them, and waits for them to go, when it stops, which it
does when the run ends however it ends (its pipe from the runtime closes
even when the runtime is killed outright). Every call after the first goes
to the context that was kubectl's current one when the pool started: a user
who switches clusters while a run goes on leaves no pods behind. The pods
must see the flow's file at the run's path (built into the image, or
mounted through ``hostPaths`` on a dev cluster), reach Redis at the pod URL
and a datastore both sides share.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from metaflow_stack.deploy import helm
from metaflow_stack.deploy.helm import kubectl
from metaflow_stack.elsewhere import metaflow_settings
from metaflow_stack.errors import StackError, ToolMissingError
from metaflow_stack.pool.cluster_pool import POLL_S, READY_TIMEOUT_S, ClusterPool

#: Where the pods find Redis, when not where the runtime does (a cluster's view of the same server).
POD_URL_VARIABLE = "METAFLOW_STACK_POOL_POD_REDIS_URL"
#: The image the pods run, when the decorator does not say (default: the stack's base image).
IMAGE_VARIABLE = "METAFLOW_STACK_POOL_IMAGE"
#: A YAML file of chart values laid over the runtime's (``hostPaths``, ``envFrom``, ``nodeSelector``...).
VALUES_VARIABLE = "METAFLOW_STACK_POOL_VALUES"
#: Seconds the pods have to end when they are deleted (their grace period is 15 s).
DELETE_TIMEOUT_S = 90
#: Seconds the cluster must go on refusing to make the pods before the step fails (a quota may be full only
#: while other pods end).
REFUSED_FOR_S = 20
#: What a pool's objects are found by.
INSTANCE = "app.kubernetes.io/instance"
#: Why a pod's container waits that will not pass by waiting longer.
CANNOT_START = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "RunContainerError"}
)


class KubernetesPool(ClusterPool):
    """A dispatcher here and ``size`` worker pods, sharing one Redis queue."""

    backend = "kubernetes"
    workers_kind = "pods"
    fix = "check the cluster (kubectl get pods) and that the pods reach Redis (" + POD_URL_VARIABLE + ")"
    stop_timeout_s = DELETE_TIMEOUT_S + 30  # the dispatcher waits for the pods to go

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
        self.image, self.resources, self.extra_values, self.namespace = image, resources, values, namespace
        self.context: str | None = None  # kubectl's, pinned as the pool first starts
        self.pinned = False
        self.args += [namespace, self.workers_name, ""]  # the dispatcher's: which pods to delete, and where

    def start(self) -> None:
        if not self.pinned:  # (a pool started again after it died goes back to the same cluster)
            self.context, self.pinned = current_context(), True
            self.args[-1] = self.context or ""
        super().start()

    def values(self) -> dict[str, Any]:
        redis = {"url": self.workers_url(POD_URL_VARIABLE)}
        values = chart_values(self.prefix, self.flow_file, self.size, self.image, redis, self.resources)
        return merge({**values, "metaflow": metaflow_settings()}, self.extra_values)

    def render(self) -> str:
        """The pods' manifests, validated, the Secret first (the pods read it at start)."""
        release = helm.render(CHART, self.values(), self.workers_name, self.namespace)
        secrets_first = sorted(release.manifests, key=lambda m: m["kind"] != "Secret")
        return helm.Release(release.name, release.namespace, secrets_first).to_yaml()

    def place(self, rendered: str) -> None:
        # Server-side: kubectl keeps no copy of the Secret (the URL) in an annotation.
        kubectl(
            "apply", "--server-side", "--namespace", self.namespace, "-f", "-", stdin=rendered, context=self.context
        )

    def wait_workers(self) -> None:
        wait_for_pods(self.namespace, self.workers_name, self.size, self.context)

    def remove(self) -> None:
        delete_pods(self.namespace, self.workers_name, self.context)

    def advice(self) -> str:
        # (the pods are deleted by then: their events stay a while)
        return (
            f"kubectl --namespace {self.namespace} get events (the pods need the image, the flow at "
            f"{self.flow_file} and Redis: {POD_URL_VARIABLE} where the cluster reaches it at another address)"
        )


def current_context() -> str | None:
    """kubectl's current context, or None where it has none (in a pod: its own cluster's credentials)."""
    try:
        return kubectl("config", "current-context").strip() or None
    except StackError as exc:
        if isinstance(exc, ToolMissingError):
            raise
        return None


def delete_pods(namespace: str, release: str, context: str | None = None) -> None:
    """Delete a pool's objects by their label (whatever of them was applied) and wait until its pods are
    gone (foreground: the pods first, then their Deployment); if kubectl cannot, say what is left and how
    to remove it (stopping goes on)."""
    delete = ["delete", "deployment,secret", "--namespace", namespace, "-l", f"{INSTANCE}={release}"]
    delete += ["--ignore-not-found", "--cascade=foreground", "--wait=true", f"--timeout={DELETE_TIMEOUT_S}s"]
    try:
        kubectl(*delete, timeout_s=DELETE_TIMEOUT_S + 30, context=context)
    except StackError as exc:
        print(
            f"worker pool: the pods may be left: {exc.message} "
            f"(fix: kubectl{f' --context {context}' if context else ''} --namespace {namespace} delete "
            f"deployment,secret -l {INSTANCE}={release})",
            file=sys.stderr,
            flush=True,
        )


def wait_for_pods(namespace: str, release: str, size: int, context: str | None = None) -> None:
    """Until ``size`` pods of ``release`` are ready (warm); ``StackError`` at once for a pod that cannot
    start (its image, its Secret, a crash: with the crash's last line), or after ``READY_TIMEOUT_S``."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    ready, refused_since = 0, None
    while time.monotonic() < deadline:
        listing = ["get", "pods", "--namespace", namespace, "-l", f"{INSTANCE}={release}", "-o", "json"]
        pods = json.loads(kubectl(*listing, context=context))["items"]
        ready = 0
        for pod in pods:
            statuses = pod.get("status", {}).get("containerStatuses") or []
            ready += bool(statuses) and all(status.get("ready") for status in statuses)
            for status in statuses:
                waiting = status.get("state", {}).get("waiting") or {}
                if waiting.get("reason") in CANNOT_START:
                    name = pod["metadata"]["name"]
                    said = f"pod {name}: {waiting['reason']}: {waiting.get('message', '').strip()}"
                    raise StackError(said + _last_words(namespace, name, context))
        if ready >= size:
            return
        refusal = _refusal(namespace, release, context) if len(pods) < size else None
        refused_since = (refused_since or time.monotonic()) if refusal else None
        if refusal and time.monotonic() - refused_since >= REFUSED_FOR_S:  # (not a quota full for a moment)
            raise StackError(
                f"the cluster refuses to make them: {refusal}",
                fix="ask for less (@resources) or have the namespace's quota or policy changed",
            )
        time.sleep(POLL_S)
    raise StackError(f"{ready} of {size} ready after {READY_TIMEOUT_S}s")


def _refusal(namespace: str, release: str, context: str | None) -> str | None:
    """The cluster's reason where it refuses to make the pods (a namespace's quota, a Pod Security
    admission): their Deployment's ``ReplicaFailure`` condition says so, and no pod ever appears to tell it."""
    listing = ["get", "deployments", "--namespace", namespace, "-l", f"{INSTANCE}={release}", "-o", "json"]
    for deployment in json.loads(kubectl(*listing, context=context))["items"]:
        for condition in deployment.get("status", {}).get("conditions") or []:
            if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
                return f"{condition.get('reason')}: {condition.get('message', '')}"
    return None


def _last_words(namespace: str, pod: str, context: str | None) -> str:
    """The last line a crashed pod's worker wrote, if kubectl can read it."""
    try:
        lines = kubectl("logs", pod, "--namespace", namespace, "--previous", "--tail=1", context=context)
        lines = lines.strip().splitlines()
    except StackError:
        return ""
    return f" (its last line: {lines[-1]})" if lines else ""


#: The chart every worker pod comes from.
CHART = "worker-pool"


def chart_values(
    prefix: str, flow_file: str, size: int, image: str, redis: dict[str, str], resources: dict[str, Any]
) -> dict[str, Any]:
    """The chart's values for a pool (shared by the runtime and the Pulumi component): ``redis`` is
    ``{"url": ...}`` or ``{"existingSecret": ...}``."""
    return {
        "image": helm.image_values(image),
        "pool": {"prefix": prefix, "flowFile": flow_file, "size": size},
        "redis": redis,
        "resources": resources,
    }


def open_kubernetes_pool(
    flow_file: str,
    size: int,
    name: str,
    url: str,
    prefix: str,
    resources: dict[str, Any],
    image: str | None,
    namespace: str | None,
    values: dict[str, Any],
) -> KubernetesPool:
    """The pool as the decorators' settings and the environment describe it (``METAFLOW_STACK_POOL_VALUES``
    over the step's ``values``)."""
    return KubernetesPool(
        flow_file,
        size,
        name,
        url,
        prefix,
        image=image or os.environ.get(IMAGE_VARIABLE) or stack_image(),
        resources=kubernetes_resources(resources.get("cpu"), resources.get("gpu"), resources.get("memory")),
        values=merge(values, extra_values()),
        namespace=namespace or os.environ.get("METAFLOW_KUBERNETES_NAMESPACE") or "default",
    )


def stack_image() -> str:
    """The stack's base image: here already, else published, else built now; pushed where a registry is
    configured (the cluster pulls it from there), else as it is here (``kind load docker-image`` it)."""
    from metaflow_stack import images, settings

    reference = images.resolve("base")
    return images.push_reference(reference, by_digest=True) if settings.load().registry else reference


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


def kubernetes_resources(cpu: Any, gpu: Any, memory_mb: Any) -> dict[str, Any]:
    """A container's resources from a step's ``@resources`` (memory in MB, as Metaflow's): requests, and the
    memory and GPUs as limits too."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu:
        requests["cpu"] = str(cpu)
    if memory_mb:
        requests["memory"] = limits["memory"] = f"{math.ceil(float(memory_mb))}Mi"  # (half a MB is not none)
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
