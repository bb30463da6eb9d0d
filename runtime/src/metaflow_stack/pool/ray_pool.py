"""The ``ray`` backend: tasks on a pool of Ray actors (``ray_dispatch``), for a pool larger than this
machine (``RAY_ADDRESS``: an existing cluster) or on a Ray of its own here."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from metaflow_stack.pool.dispatched import DispatchedPool
from metaflow_stack.pool.local import Interpreter


class RayPool(DispatchedPool):
    """A dispatcher that starts (or joins) Ray and keeps ``size`` actors, each with the step's ``resources``
    (``@resources``: ``cpu``, ``gpu``, ``memory`` in MB), their fork servers under ``interpreter`` where the
    step has an environment of its own (made on this machine: a Ray of the pool's own only)."""

    backend = "ray"
    fix = "start Ray (ray start --head) and set RAY_ADDRESS to it, or unset RAY_ADDRESS for a Ray on this machine"

    def __init__(
        self, flow_file: str, size: int, name: str, resources: dict[str, Any], interpreter: Interpreter | None = None
    ) -> None:
        actor = ray_resources(resources.get("cpu"), resources.get("gpu"), resources.get("memory"))
        own = json.dumps(dataclasses.asdict(interpreter)) if interpreter else ""
        super().__init__(flow_file, size, name, [flow_file, str(size), name, json.dumps(actor), own])


def ray_resources(cpu: str | float | None, gpu: str | float | None, memory_mb: str | float | None) -> dict[str, float]:
    """An actor's Ray resources from a step's ``@resources`` (memory in MB, as Metaflow's)."""
    resources: dict[str, float] = {}
    if cpu:
        resources["num_cpus"] = float(cpu)
    if gpu:
        resources["num_gpus"] = float(gpu)
    if memory_mb:
        resources["memory"] = float(memory_mb) * (1 << 20)
    return resources
