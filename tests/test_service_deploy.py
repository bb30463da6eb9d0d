"""The metadata service's Helm chart, Nomad job and Pulumi component, checked
offline: rendered by Helm's engine and validated against Kubernetes 1.30, the
Nomad job parsed with its variables, the Pulumi component under mocks; and,
where kind runs (the GitHub ``clusters`` job), the chart installed in a
cluster recording a real flow."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, last_line, need_kind_cluster, run_cli
from service_servers import run_flow

from metaflow_stack.deploy import helm, nomad
from metaflow_stack.errors import StackError

IMAGE = {"repository": "registry.example/metaflow-stack/metadata-service", "tag": "0123456789abcdef"}
#: The service's key from a Secret, or the explicit opt-out: the chart refuses neither.
KEYED = {"existingSecret": "metaflow-auth"}
OPEN = {"insecureNoAuth": True}


def _env(manifest: dict) -> dict:
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_production_values_use_secrets_nats_and_several_replicas() -> None:
    values = {
        "image": IMAGE,
        "database": {"existingSecret": "metaflow-db", "readSecretKey": "read-url"},
        "nats": {"url": "nats://nats:4222"},
        "auth": KEYED,
        "logs": {"roots": ["s3://flows/metaflow", "s3://archive/mf"]},
    }
    release = helm.render("metadata-service", values, "metadata")
    kinds = {m["kind"]: m for m in release.manifests}
    assert set(kinds) == {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    env = _env(deployment)
    assert env["METAFLOW_STACK_SERVICE_DATABASE"] == {"secretKeyRef": {"name": "metaflow-db", "key": "database-url"}}
    assert env["METAFLOW_STACK_SERVICE_READ_DATABASE"]["secretKeyRef"]["key"] == "read-url"
    assert env["METAFLOW_STACK_SERVICE_AUTH_KEY"]["secretKeyRef"]["name"] == "metaflow-auth"
    assert env["METAFLOW_STACK_SERVICE_NATS_URL"] == "nats://nats:4222"
    assert env["METAFLOW_STACK_SERVICE_LOG_ROOTS"] == "s3://flows/metaflow s3://archive/mf"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert [h["kind"] for h in release.hooks] == ["Pod"]
    assert "METAFLOW_SERVICE_URL=http://metadata.default:8080" in release.notes


def test_sqlite_runs_one_replica_on_a_volume() -> None:
    release = helm.render("metadata-service", {"image": IMAGE, "replicaCount": 1, "auth": KEYED}, "metadata")
    kinds = {m["kind"]: m for m in release.manifests}
    assert "PersistentVolumeClaim" in kinds and "PodDisruptionBudget" not in kinds
    assert kinds["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}
    assert "METAFLOW_STACK_SERVICE_DATABASE" not in _env(kinds["Deployment"])  # the image's SQLite default


def test_the_key_comes_from_its_secret_and_the_probes_need_none() -> None:
    release = helm.render("metadata-service", {"image": IMAGE, "replicaCount": 1, "auth": KEYED}, "metadata")
    deployment = next(m for m in release.manifests if m["kind"] == "Deployment")
    env = _env(deployment)
    assert env["METAFLOW_STACK_SERVICE_AUTH_KEY"] == {"secretKeyRef": {"name": "metaflow-auth", "key": "auth-key"}}
    assert "METAFLOW_STACK_INSECURE_NO_AUTH" not in env
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    probes = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"/healthcheck"}  # the one route open without the key
    assert "METAFLOW_SERVICE_AUTH_KEY=<the key in Secret metaflow-auth>" in release.notes


def test_insecure_no_auth_serves_without_a_key_only_when_asked() -> None:
    release = helm.render("metadata-service", {"image": IMAGE, "replicaCount": 1, "auth": OPEN}, "metadata")
    env = _env(next(m for m in release.manifests if m["kind"] == "Deployment"))
    assert env["METAFLOW_STACK_INSECURE_NO_AUTH"] == "1"
    assert "METAFLOW_STACK_SERVICE_AUTH_KEY" not in env
    assert "anyone who reaches it may read and write" in release.notes


def test_neither_a_key_nor_the_opt_out_is_refused_naming_both() -> None:
    with pytest.raises(StackError) as refused:
        helm.render("metadata-service", {"image": IMAGE, "replicaCount": 1}, "metadata")
    assert "without an API key: set auth.existingSecret" in refused.value.message
    assert "or auth.insecureNoAuth=true" in refused.value.message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": IMAGE, "auth": KEYED}, "SQLite allows one replica"),
        ({"image": IMAGE, "auth": KEYED, "database": {"existingSecret": "db"}}, "several replicas need NATS"),
        ({"image": {"repository": "", "tag": "x"}, "replicaCount": 1, "auth": KEYED}, "repository"),
        ({"image": IMAGE, "replicaCount": 1, "auth": KEYED, "nats": {"url": "http://wrong"}}, "nats"),
        ({"image": IMAGE, "replicaCount": 1, "auth": KEYED, "logs": {"roots": ["/data/metaflow"]}}, "logs"),
        ({"image": IMAGE, "replicaCount": 1, "auth": {"insecureNoAuth": "yes"}}, "insecureNoAuth"),
    ],
)
def test_wrong_values_are_refused_naming_the_problem(values: dict, message: str) -> None:
    with pytest.raises(StackError, match=message):
        helm.render("metadata-service", values, "metadata")


def test_the_nomad_job_takes_an_image_and_keeps_secrets_in_nomad_variables() -> None:
    job = nomad.render(
        "metadata-service",
        {"image": "r/metadata-service:abc", "nats_url": "nats://n:4222", "log_roots": ["s3://flows/metaflow"]},
    )
    assert 'image = "r/metadata-service:abc"' in job.var_file()
    assert 'log_roots = ["s3://flows/metaflow"]' in job.var_file()
    assert 'nomadVar "nomad/jobs/${var.name}"' in job.hcl
    assert "database_url" not in job.var_file()
    with pytest.raises(StackError, match="needs variable"):
        nomad.render("metadata-service", {})
    with pytest.raises(StackError, match="instances"):
        nomad.render("metadata-service", {"image": "r/x:1", "instances": "two"})


def _template(job: nomad.NomadJob) -> dict:
    import hcl2

    (task,) = hcl2.loads(job.hcl)["job"][0]['"metadata-service"']["group"][0]['"service"']["task"]
    return task['"service"']["template"][0]


def test_the_nomad_job_needs_an_auth_key_unless_told_insecure() -> None:
    job = nomad.render("metadata-service", {"image": "r/metadata-service:abc"})
    assert "insecure_no_auth" not in job.var_file()  # false unless asked: a key is required
    data = _template(job)["data"]
    assert "{{- with .auth_key.Value }}METAFLOW_STACK_SERVICE_AUTH_KEY={{ . }}" in data
    assert "{{- if ${var.insecure_no_auth} }}METAFLOW_STACK_INSECURE_NO_AUTH=1" in data
    # Neither: the template fails, naming the variable to fill and the opt-out, rather than start keyless.
    assert '{{ sprig_fail "nomad/jobs/${var.name} holds no auth_key: put one there, or run the job with ' in data
    opted_out = nomad.render("metadata-service", {"image": "r/x:1", "insecure_no_auth": True})
    assert "insecure_no_auth = true" in opted_out.var_file()


def test_the_nomad_opt_out_must_be_a_bool() -> None:
    with pytest.raises(StackError) as refused:
        nomad.render("metadata-service", {"image": "r/x:1", "insecure_no_auth": "yes"})
    assert "'insecure_no_auth' of metadata-service.nomad.hcl must be a bool" in refused.value.message


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_installs_the_chart() -> None:
    import pulumi
    from components.metadata_service import MetadataService, MetadataServiceArgs

    image = f"{IMAGE['repository']}:{IMAGE['tag']}"
    service = MetadataService(
        "metadata-service",
        MetadataServiceArgs(
            image=image,
            database_secret="db",
            nats_url="nats://nats:4222",
            auth_secret="metaflow-auth",
            log_roots=("s3://flows/metaflow",),
        ),
    )

    def check(outputs: list) -> None:
        chart, values, url = outputs
        assert Path(chart) == helm.chart_dir("metadata-service")
        assert values["image"] == IMAGE and values["replicaCount"] == 2
        assert values["database"]["existingSecret"] == "db"
        assert values["auth"] == {"existingSecret": "metaflow-auth", "insecureNoAuth": False}
        assert values["logs"] == {"roots": ["s3://flows/metaflow"]}
        assert url == "http://metadata-service.default.svc.cluster.local:8080"

    done = pulumi.Output.all(service.release.chart, service.release.values, service.service_url)
    pulumi.runtime.test(lambda: done.apply(check))()
    with pytest.raises(StackError, match="SQLite allows one replica"):
        MetadataService("broken", MetadataServiceArgs(image=image, auth_secret="metaflow-auth"))


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_needs_a_key_or_the_opt_out() -> None:
    import pulumi
    from components.metadata_service import MetadataService, MetadataServiceArgs

    image = f"{IMAGE['repository']}:{IMAGE['tag']}"
    with pytest.raises(StackError, match=r"set auth\.existingSecret"):
        MetadataService("keyless", MetadataServiceArgs(image=image, replicas=1))
    service = MetadataService("open", MetadataServiceArgs(image=image, replicas=1, insecure_no_auth=True))

    def check(values: dict) -> None:
        assert values["auth"] == {"existingSecret": "", "insecureNoAuth": True}

    pulumi.runtime.test(lambda: service.release.values.apply(check))()


@pytest.mark.docker
@pytest.mark.slow
def test_kind_cluster_runs_the_chart_and_records_a_flow(docker_engine, tmp_path: Path) -> None:
    need_kind_cluster()
    built = run_cli("stack", "images", "build", "metadata-service")
    assert built.returncode == 0, built.stderr[-3000:]
    image = last_line(built)
    subprocess.run(["kind", "load", "docker-image", image], check=True)  # the cluster: KIND_CLUSTER_NAME
    repository, _, tag = image.rpartition(":")
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "replicaCount": 1,
        "auth": {"existingSecret": "metadata-auth"},
    }
    key = "kind-test-key"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "metadata-auth"},
        "stringData": {"auth-key": key},
    }
    manifests = tmp_path / "metadata-service.yaml"
    manifests.write_text(
        yaml.safe_dump(secret) + "---\n" + helm.render("metadata-service", values, "metadata").to_yaml()
    )
    subprocess.run(["kubectl", "apply", "-f", str(manifests)], check=True)
    forward = None
    try:
        subprocess.run(["kubectl", "rollout", "status", "deployment/metadata", "--timeout=300s"], check=True)
        port = free_port()
        forward = subprocess.Popen(["kubectl", "port-forward", "svc/metadata", f"{port}:8080"])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the port-forward never answered"
            time.sleep(1)
        assert httpx.get(f"{url}/flows").status_code == 401  # the key the chart took from the Secret is enforced
        keyed = {"METAFLOW_SERVICE_AUTH_KEY": key}
        done = run_flow(tmp_path, "run", "--width", "3", "--run-id-file", "run-id", service_url=url, env=keyed)
        assert done.returncode == 0, done.stderr[-3000:]
        run = (tmp_path / "run-id").read_text()
        summary = httpx.get(f"{url}/flows/FanFlow/runs/{run}/summary", headers={"x-api-key": key}).json()
        assert summary["status"] == "completed"
        assert {step["step_name"]: step["completed"] for step in summary["steps"]}["work"] == 3
    finally:
        if forward is not None:
            forward.terminate()
        subprocess.run(["kubectl", "delete", "-f", str(manifests)], check=False)
