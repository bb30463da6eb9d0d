"""The kubernetes backend's pods, rendered and validated offline: what the runtime applies, and what the
Pulumi component installs (the same chart, ``infra/helm/worker-pool``). The runs themselves are in
``test_worker_pool.py`` (through a kubectl double here, on kind in the GitHub workflow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from metaflow_stack.deploy import helm
from metaflow_stack.errors import StackError
from metaflow_stack.pool.kubernetes_pool import (
    CHART,
    VALUES_VARIABLE,
    KubernetesPool,
    extra_values,
    kubernetes_resources,
)
from metaflow_stack.pool.redis_worker import READY_FILE

URL = "redis://:s3cret@redis.pools.svc:6379/0"
PREFIX = "mf-pool:1796207678482231:score_items:"


def pool(values: dict | None = None, size: int = 3) -> KubernetesPool:
    return KubernetesPool(
        "/srv/flows/score/flow.py",
        size,
        "score_items@laptop",
        URL,
        PREFIX,
        image="registry.example:5000/metaflow-stack/base:0123abcd",
        resources=kubernetes_resources("2", "1", "4096"),
        values=values or {},
        namespace="ml",
    )


def rendered(values: dict | None = None) -> helm.Release:
    subject = pool(values)
    return helm.render(CHART, subject.values(), subject.workers_name, subject.namespace)


def by_kind(release: helm.Release) -> dict[str, dict]:
    return {manifest["kind"]: manifest for manifest in release.manifests}


def test_the_pods_run_warm_redis_workers_with_the_steps_resources() -> None:
    release = rendered({"hostPaths": ["/srv/flows/score"]})
    manifests = by_kind(release)
    assert sorted(manifests) == ["Deployment", "Secret"]
    deployment = manifests["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["image"] == "registry.example:5000/metaflow-stack/base:0123abcd"
    assert worker["command"][-1] == "from metaflow_stack.pool.redis_worker import main; main()"
    assert worker["args"] == [PREFIX, "/srv/flows/score/flow.py", "$(POD_NAME)", "--detached"]
    assert worker["resources"] == {
        "requests": {"cpu": "2", "memory": "4096Mi"},
        "limits": {"memory": "4096Mi", "nvidia.com/gpu": "1"},
    }
    assert worker["readinessProbe"]["exec"]["command"] == ["test", "-e", f"/tmp/{READY_FILE}"]
    # The flow's folder at the run's path; /tmp writable, the rest of the image not.
    assert {m["mountPath"] for m in worker["volumeMounts"]} == {"/tmp", "/srv/flows/score"}
    assert worker["securityContext"]["readOnlyRootFilesystem"] and worker["securityContext"]["capabilities"] == {
        "drop": ["ALL"]
    }
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    # The URL (a password in it) reaches the workers from the Secret only: not in the Deployment.
    env = {item["name"]: item for item in worker["env"]}
    assert (
        env["METAFLOW_STACK_POOL_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"]
        == manifests["Secret"]["metadata"]["name"]
    )
    assert "s3cret" not in yaml.safe_dump(deployment)
    # The same Redis, as the pool's own user (redis_user): never the run's password.
    (url,) = manifests["Secret"]["stringData"].values()
    assert url.startswith(f"redis://{release.name}:") and url.endswith("@redis.pools.svc:6379/0")
    assert "s3cret" not in url


def test_the_release_name_is_kubernetes_alphabet_and_one_per_run_and_step() -> None:
    name = pool().workers_name
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 53, name
    assert name.startswith("mf-pool-score-items-")
    other = KubernetesPool(
        "/f.py", 1, "score_items@x", URL, "mf-pool:2:score_items:", image="i:t", resources={}, values={}, namespace="d"
    )
    assert other.workers_name != name


def test_values_from_the_file_are_laid_over_the_runtimes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "pool-values.yaml"
    file.write_text("podSecurity: {runAsUser: 1001}\nnodeSelector: {pool: warm}\npool: {size: 5}\n")
    monkeypatch.setenv(VALUES_VARIABLE, str(file))
    deployment = by_kind(rendered(extra_values()))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 1001 and pod["securityContext"]["runAsGroup"] == 1000
    assert pod["nodeSelector"] == {"pool": "warm"} and deployment["spec"]["replicas"] == 5

    file.write_text("pool: [not, a, mapping")
    with pytest.raises(StackError, match="is not readable YAML"):
        extra_values()


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"pool": {"size": 0}}, "/pool/size"),
        ({"pool": {"flowFile": "relative.py"}}, "/pool/flowFile"),
        ({"hostPaths": ["relative"]}, "hostPaths"),
        ({"redis": {"url": "http://not-redis"}}, "/redis/url"),
        ({"redis": {"url": ""}}, "the workers need their queue"),
    ],
)
def test_bad_values_are_refused_before_anything_reaches_a_cluster(values: dict, named: str) -> None:
    with pytest.raises(StackError) as refused:
        rendered(values)
    assert named in refused.value.message


def test_the_chart_lints_clean() -> None:
    import helm_python

    subject = pool({"hostPaths": ["/srv/flows/score"], "env": {"LOG_LEVEL": "debug"}})
    report = helm_python.lint(helm.chart_dir(CHART), subject.values(), strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("metaflow-stack/base:abc", {"repository": "metaflow-stack/base", "tag": "abc"}),
        ("127.0.0.1:5000/metaflow-stack/base:abc", {"repository": "127.0.0.1:5000/metaflow-stack/base", "tag": "abc"}),
        (f"r.example/base@sha256:{'a' * 64}", {"repository": "r.example/base", "digest": f"sha256:{'a' * 64}"}),
        (
            f"[::1]:5000/base:t@sha256:{'b' * 64}",
            {"repository": "[::1]:5000/base", "tag": "t", "digest": f"sha256:{'b' * 64}"},
        ),
    ],
)
def test_an_image_reference_splits_at_its_tag_not_a_registrys_port(image: str, parts: dict) -> None:
    assert helm.image_values(image) == parts


def test_an_image_without_a_tag_is_refused_before_anything_starts() -> None:
    with pytest.raises(StackError, match="names no tag"):
        KubernetesPool(
            "/f.py", 1, "each@x", URL, PREFIX, image="127.0.0.1:5000/base", resources={}, values={}, namespace="d"
        ).values()


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_installs_the_chart_with_validated_values() -> None:
    import pulumi
    from components.worker_pool import WorkerPool, WorkerPoolArgs

    args = WorkerPoolArgs(
        image="r/metaflow-stack/base:t1", prefix=PREFIX, flow_file="/srv/flows/score.py", redis_secret="pool-redis"
    )
    component = WorkerPool("score-pool", args)

    def check(outputs: list) -> None:
        chart, values, namespace = outputs
        assert Path(chart) == helm.chart_dir(CHART)
        assert values["redis"] == {"existingSecret": "pool-redis"} and values["pool"]["size"] == 2
        assert values["resources"]["requests"] == {"cpu": "1", "memory": "1024Mi"}
        assert namespace == "default"

    done = pulumi.Output.all(component.release.chart, component.release.values, component.release.namespace)
    pulumi.runtime.test(lambda: done.apply(check))()

    with pytest.raises(StackError, match="/pool/flowFile"):
        WorkerPool("broken", WorkerPoolArgs(image="r/b:t", prefix=PREFIX, flow_file="flow.py", redis_secret="s"))


def test_a_pod_runs_a_task_on_its_own_terms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A detached worker keeps its own interpreter, PATH and HOME, drops a certificate bundle it does not
    have, keeps every other variable of the task (a path yet to be written included), and runs its own
    copy of the flow, in the flow's folder, when the task's file and folder are not on its machine."""
    import sys

    from metaflow_stack.pool.child import Task, on_this_machine

    monkeypatch.setenv("PATH", "/opt/stack/bin:/usr/bin")
    monkeypatch.setenv("HOME", "/tmp")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    flow = tmp_path / "flow.py"
    task_env = {
        "PATH": "/Users/ana/venv/bin",
        "HOME": "/Users/ana",
        "SSL_CERT_FILE": "/Users/ana/corp-ca.pem",
        "METAFLOW_DATASTORE_SYSROOT_S3": "s3://bucket/metaflow",
        "RESULTS_TO": "/shared/out/not-yet-written.json",
        "USER": "ana",
    }
    task = on_this_machine(
        Task("/Users/ana/venv/bin/python", ["python", "flow.py"], task_env, "/Users/ana/p"), str(flow)
    )
    assert task.python == sys.executable and task.cwd == str(tmp_path) and task.argv == ["python", str(flow)]
    assert task.env["PATH"] == "/opt/stack/bin:/usr/bin" and task.env["HOME"] == "/tmp"
    assert "SSL_CERT_FILE" not in task.env
    assert task.env["RESULTS_TO"] == "/shared/out/not-yet-written.json" and task.env["USER"] == "ana"
    assert task.env["METAFLOW_DATASTORE_SYSROOT_S3"] == "s3://bucket/metaflow"


def test_the_runs_metaflow_settings_reach_the_pods_in_a_secret_of_the_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metaflow reads its settings once, at import: the pods get the run's (an S3 endpoint, say) from a
    Secret labelled as the pool (deleted with it), but not the stack's own keys, nor what names this
    machine's configuration (a profile the pods do not have would stop Metaflow at import)."""
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", "http://minio.data:9000")
    monkeypatch.setenv("METAFLOW_SERVICE_HEADERS", '{"x-api-key": "k"}')
    for name in ("METAFLOW_PROFILE", "METAFLOW_HOME", "METAFLOW_STACK_SERVICE_AUTH_KEY", "METAFLOW_STACK_POOL_VALUES"):
        monkeypatch.setenv(name, "/not/for/pods")
    release = rendered()
    (secret,) = [m for m in release.manifests if m["kind"] == "Secret" and m["metadata"]["name"].endswith("-metaflow")]
    settings = secret["stringData"]
    assert settings["METAFLOW_S3_ENDPOINT_URL"] == "http://minio.data:9000"
    assert settings["METAFLOW_SERVICE_HEADERS"] == '{"x-api-key": "k"}'
    assert not {k for k in settings if not k.startswith("METAFLOW_") or k.startswith("METAFLOW_STACK_")}
    assert "METAFLOW_PROFILE" not in settings and "METAFLOW_HOME" not in settings
    deployment = by_kind(release)["Deployment"]
    assert deployment["metadata"]["labels"].items() <= secret["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    assert "minio.data" not in yaml.safe_dump(deployment)  # in the Secret only
