"""``deploy(reference, options)``: run a function's server here, or render it for a cluster.

- ``docker``: builds (or reuses) the function-fastapi image and runs it on this
  machine's engine, published on 127.0.0.1, then waits until ``/ready``.
- ``kubernetes``: renders the ``function-server`` Helm chart with the image
  and validates every manifest offline; ``apply`` runs ``kubectl apply``.
- ``nomad``: fills the ``function-server`` Nomad job's variables and checks
  them offline; ``apply`` registers it with the agent at ``NOMAD_ADDR``.

For a cluster the image must be pullable there: with a registry configured it
is pushed, else the local reference is used (``kind load docker-image`` or a
Nomad client sharing this engine can run it).
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from python_on_whales.exceptions import NoSuchContainer
from rich.console import Console

from metaflow_stack import settings
from metaflow_stack.deploy import helm, nomad
from metaflow_stack.engines import JobSpec, get_engine
from metaflow_stack.engines.docker import require_engine
from metaflow_stack.errors import StackError
from metaflow_stack.functions.bundle import resolve_reference
from metaflow_stack.functions.reference import FunctionReference
from metaflow_stack.local_secrets import secret, state_dir
from metaflow_stack.serving.image import build_image

TARGETS = ("docker", "kubernetes", "nomad")
#: Label on a deployed server's container: ``metaflow stack down`` removes it with the other jobs.
DEPLOYMENT_LABEL = "io.metaflow-stack.deployment"
CHART = "function-server"
NOMAD_JOB = "function-server"


@dataclass(frozen=True)
class DeployOptions:
    """Where and how big; the defaults suit one small model."""

    target: str = "docker"
    #: Use this image instead of building the function's own.
    image: str | None = None
    #: Release, job and container name; ``function-<function name>`` by default.
    name: str | None = None
    namespace: str = "default"
    replicas: int = 1
    cpu: float = 0.5
    memory_mb: int = 1024
    max_batch_size: int = 32
    #: Host port of the docker target (on 127.0.0.1).
    port: int = 8000
    #: Where rendered files go; ``<state dir>/deploy/<name>`` by default.
    output: Path | None = None
    #: Submit to the cluster after rendering (kubectl / the Nomad API).
    apply: bool = False
    ready_timeout_s: float = 180
    #: kubernetes: the Secret whose ``auth-key`` holds the server's key (a cluster's server needs one).
    auth_secret: str | None = None
    #: kubernetes, nomad: serve without a key, by explicit choice.
    insecure_no_auth: bool = False


@dataclass
class Deployment:
    """What was deployed or rendered, and what to do next."""

    target: str
    name: str
    image: str
    url: str | None = None
    files: list[Path] = field(default_factory=list)
    next_step: str = ""


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def deploy(source: Any, options: DeployOptions, console: Console | None = None) -> Deployment:
    """Deploy the function ``source`` names to ``options.target``."""
    console = console or Console(stderr=True)
    if options.target not in TARGETS:
        raise StackError(f"unknown deploy target {options.target!r}", fix=f"choose one of {', '.join(TARGETS)}")
    ref, _ = resolve_reference(source)
    name = options.name or f"function-{_slug(ref.name)}"
    if options.target == "docker":
        return _docker(source, ref, name, options, console)
    image = options.image or build_image(source, "fastapi", push=bool(settings.load().registry), console=console)
    output = options.output or settings.load().state_dir / "deploy" / name
    if options.target == "kubernetes":
        if not (options.auth_secret or options.insecure_no_auth):
            raise StackError(
                "a function server in a cluster needs a key, and none was named",
                fix="pass --auth-secret NAME (a Secret whose auth-key holds the key) or --insecure-no-auth",
            )
        return _kubernetes(ref, name, image, output, options, console)
    return _nomad(ref, name, image, output, options, console)


def _docker(source: Any, ref: FunctionReference, name: str, options: DeployOptions, console: Console) -> Deployment:
    docker = require_engine()
    image = options.image or build_image(source, "fastapi", console=console)
    key = function_key(name)
    with contextlib.suppress(NoSuchContainer):  # a redeploy replaces the previous server
        docker.container.remove(name, force=True)
    job = get_engine("docker").launch(
        JobSpec(
            image=image,
            command=[],
            # Its own key: calls carry it as x-api-key (the container listens beyond its loopback).
            env={"METAFLOW_STACK_SERVE_MAX_BATCH_SIZE": str(options.max_batch_size), "METAFLOW_STACK_AUTH_KEY": key},
            name=name,
            ports={8000: options.port},
            cpu=options.cpu,
            memory=f"{options.memory_mb}m",
            labels={DEPLOYMENT_LABEL: name},
            owner="function-server",
        )
    )
    url = f"http://127.0.0.1:{options.port}"
    deadline = time.monotonic() + options.ready_timeout_s
    with console.status(f"waiting for {name} to load {ref.name}"):
        while not _ready(url):
            if job.exit_code is not None or time.monotonic() > deadline:
                logs = "\n".join(list(job.logs())[-20:])
                job.kill()
                raise StackError(f"{name} never became ready; its last output:\n{logs}", fix="correct the error above")
            time.sleep(0.25)
    calls = f'curl -H "x-api-key: $(cat {function_key_path(name)})" {url}/invoke -d @input.json'
    return Deployment("docker", name, image, url, [], f"{calls}; remove it with docker rm -f {name}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def chart_values(function: str, image: str, options: DeployOptions) -> dict[str, Any]:
    """The ``function-server`` chart's values for ``image``: what ``deploy`` and the Pulumi component install."""
    return {
        "image": helm.image_values(image),
        "function": function,
        "replicaCount": options.replicas,
        "resources": {
            "requests": {"cpu": f"{int(options.cpu * 1000)}m", "memory": f"{options.memory_mb}Mi"},
            "limits": {"memory": f"{options.memory_mb}Mi"},
        },
        "server": {"maxBatchSize": options.max_batch_size},
        "auth": {"existingSecret": options.auth_secret or "", "insecureNoAuth": options.insecure_no_auth},
    }


def _kubernetes(
    ref: FunctionReference, name: str, image: str, output: Path, options: DeployOptions, console: Console
) -> Deployment:
    values = chart_values(ref.name, image, options)
    release = helm.render(CHART, values, name, options.namespace)
    files = helm.write(release, output, values)
    console.print(f"rendered and validated {len(release.manifests)} manifests into {files[0]}")
    apply_command = f"kubectl apply -n {options.namespace} -f {files[0]}"
    deployment = Deployment("kubernetes", name, image, None, files, apply_command)
    if options.apply:
        console.print(helm.apply(files[0], options.namespace))
        deployment.next_step = f"kubectl -n {options.namespace} port-forward svc/{name} 8000:80"
    return deployment


def function_key_path(name: str) -> Path:
    """Where this machine keeps the key of the function server ``name`` (deployed to Docker or a cluster)."""
    return state_dir() / "functions" / f"{name}.key"


def function_key(name: str) -> str:
    """The key of the function server ``name``, made once (0600): a key of its own, never the stack's, which
    guards this machine's services (the metadata service, the UI, the key-release service) and so must not
    reach a cluster, its operators, nor the function's code (which reads its server's environment)."""
    return secret(function_key_path(name))[0]


def _nomad(
    ref: FunctionReference, name: str, image: str, output: Path, options: DeployOptions, console: Console
) -> Deployment:
    variables = {
        "image": image,
        "name": name,
        "function": ref.name,
        "namespace": options.namespace,
        "instances": options.replicas,
        "cpu": int(options.cpu * 1000),
        "memory": options.memory_mb,
        "max_batch_size": options.max_batch_size,
        "insecure_no_auth": options.insecure_no_auth,
    }
    job = nomad.render(NOMAD_JOB, variables)
    files = nomad.write(job, output)
    console.print(f"rendered and checked the Nomad job into {output}")
    run = f"nomad job run -var-file={files[1]} {files[0]}"
    if not options.insecure_no_auth:  # the job reads its key from Nomad Variables: a key of its own, made here
        function_key(name)
        run = f'nomad var put nomad/jobs/{name} auth_key="$(cat {function_key_path(name)})" && {run}'
    deployment = Deployment("nomad", name, image, None, files, run)
    if options.apply:
        if not options.insecure_no_auth:
            nomad.put_variables(f"nomad/jobs/{name}", {"auth_key": function_key(name)}, options.namespace)
        evaluation = nomad.submit(job)
        console.print(f"registered with Nomad (evaluation {evaluation})")
        deployment.next_step = f"nomad job status {name}"
        if not options.insecure_no_auth:
            deployment.next_step += f'; calls carry -H "x-api-key: $(cat {function_key_path(name)})"'
    return deployment
