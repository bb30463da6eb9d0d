"""``@worker_pool``'s kubernetes backend on a real cluster: the GitHub workflow's kind job (skipped here,
naming kind). Apart from ``tests/test_worker_pool.py``: it loads the base image into the cluster, so it runs
with the tests that use the engine's images (``MACHINE_GROUPS`` in ``tests/conftest.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import need, need_kind_cluster
from devservers import free_port
from test_worker_pool import facts, pool_keys, run_flow

from metaflow_stack.pool.redis_pool import URL_VARIABLE

pytestmark = pytest.mark.slow


@pytest.mark.docker
def test_kind_cluster_runs_a_pooled_foreach(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The kubernetes backend on a real cluster (the GitHub workflow's kind job): pods of the stack's base
    image, the flow's folder and datastore mounted from the node at the run's path, Redis on the host;
    the run reads like a plain one, and no pod, Secret or key is left."""
    need_kind_cluster()
    shared = os.environ.get("STACK_KIND_SHARED", "")
    need("kind", bool(shared), "STACK_KIND_SHARED: a folder the kind node mounts at the same path")
    need("redis-server", shutil.which("redis-server") is not None, "the pool's queue (apt-get install redis-server)")
    base_image = request.getfixturevalue("base_image")  # (built only where a cluster will run it)
    subprocess.run(["kind", "load", "docker-image", base_image], check=True)
    root = Path(tempfile.mkdtemp(dir=shared))
    root.chmod(0o755)
    network = json.loads(
        subprocess.run(["docker", "network", "inspect", "kind"], capture_output=True, check=True).stdout
    )
    gateway = next(c["Gateway"] for c in network[0]["IPAM"]["Config"] if "." in c.get("Gateway", ""))
    password, port = uuid.uuid4().hex, free_port()
    server = subprocess.Popen(
        ["redis-server", "--bind", "0.0.0.0", "--port", str(port), "--requirepass", password, "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        values = tmp_path / "values.yaml"
        ids = {"runAsUser": os.getuid(), "runAsGroup": os.getgid(), "fsGroup": os.getgid()}
        values.write_text(json.dumps({"hostPaths": [str(root)], "podSecurity": ids}))
        env = {
            URL_VARIABLE: f"redis://:{password}@127.0.0.1:{port}/0",
            "METAFLOW_STACK_POOL_POD_REDIS_URL": f"redis://:{password}@{gateway}:{port}/0",
            "METAFLOW_STACK_POOL_IMAGE": base_image,
            "METAFLOW_STACK_POOL_VALUES": str(values),
            "POOL_FLOW_FLAKY": "2",
        }
        done = run_flow(root, env=env, backend="kubernetes")
        assert done.returncode == 0, done.stderr[-5000:]
        run = facts(root)
        assert run["successful"] and run["squares"] == [0, 1, 4, 9, 16, 25]
        assert [item["attempt"] for item in run["items"]] == [0, 0, 1, 0, 0, 0]
        assert all(item["worker"].startswith("mf-pool-each-") for item in run["items"])
        left = subprocess.run(
            ["kubectl", "get", "deployments,secrets,pods", "-l", "app.kubernetes.io/name=worker-pool", "-o", "name"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert left.stdout.strip() == ""
        assert not pool_keys(env[URL_VARIABLE])
    finally:
        server.terminate()
        server.wait(timeout=15)
