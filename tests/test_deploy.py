"""`metaflow function deploy` for clusters: the Helm chart and the Nomad job, rendered and validated offline.

A real cluster runs them where one exists: the kind and Nomad tests at the end
run when `kind` / `nomad` are on PATH (the GitHub workflow installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import FIRST_CALL_S, free_port, last_line, need, need_kind_cluster, run_cli

from metaflow_stack.deploy import helm, nomad
from metaflow_stack.errors import StackError
from metaflow_stack.local_secrets import stack_key
from metaflow_stack.serving.deploy import function_key_path

IMAGE = "registry.example/metaflow-stack/function-fastapi-predict:0123456789abcdef"
#: The server's key from a Secret, or the explicit opt-out: the chart refuses neither.
KEYED = {"existingSecret": "fn-auth"}
OPEN = {"insecureNoAuth": True}
FLOWER = {"sepal_length": 6.9, "sepal_width": 3.1, "petal_length": 5.4, "petal_width": 2.1}


@pytest.fixture(scope="module")
def reference_file(train_task, tmp_path_factory) -> Path:
    import iris_functions
    from metaflow import JsonFunction

    path = tmp_path_factory.mktemp("deploy") / "predict.json"
    path.write_text(JsonFunction(iris_functions.predict_typed, task=train_task).reference)
    return path


def _deploy(reference_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("function", "deploy", str(reference_file), *args)


def test_kubernetes_target_renders_a_validated_release(reference_file: Path, tmp_path: Path) -> None:
    keyless = _deploy(reference_file, "--target", "kubernetes", "--image", IMAGE, "--output", str(tmp_path))
    assert keyless.returncode == 1 and "--auth-secret NAME" in keyless.stderr and "--insecure-no-auth" in keyless.stderr
    result = _deploy(
        reference_file,
        *("--target", "kubernetes", "--image", IMAGE, "--output", str(tmp_path), "--replicas", "3"),
        *("--auth-secret", "function-key"),
    )
    assert result.returncode == 0, result.stderr
    assert last_line(result) == str(tmp_path / "kubernetes.yaml")
    assert "kubectl apply" in result.stderr
    manifests = {m["kind"]: m for m in yaml.safe_load_all((tmp_path / "kubernetes.yaml").read_text())}
    assert set(manifests) == {"Deployment", "Service", "ServiceAccount"}  # the helm test pod is a hook, not applied
    deployment = manifests["Deployment"]
    assert deployment["metadata"]["name"] == "function-predict-typed"
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == IMAGE
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = {e["name"]: e.get("value") or e["valueFrom"] for e in container["env"]}
    assert env["METAFLOW_STACK_SERVE_MAX_BATCH_SIZE"] == "32"
    assert env["METAFLOW_STACK_SERVE_AUTH_KEY"] == {"secretKeyRef": {"name": "function-key", "key": "auth-key"}}
    values = yaml.safe_load((tmp_path / "values.yaml").read_text())
    assert values["image"] == {"repository": IMAGE.rsplit(":", 1)[0], "tag": IMAGE.rsplit(":", 1)[1]}


def test_every_template_of_the_chart_validates_and_lints_clean() -> None:
    import helm_python

    values = {
        "image": {"repository": "r/function-fastapi-x", "tag": "t"},
        "function": "x",
        "auth": KEYED,
        "autoscaling": {"enabled": True},
        "podDisruptionBudget": {"enabled": True},
        "env": {"LOG_LEVEL": "debug"},
    }
    release = helm.render("function-server", values, "fn-x", "ml")
    kinds = sorted(m["kind"] for m in release.manifests)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert [h["kind"] for h in release.hooks] == ["Pod"]
    assert "port-forward svc/fn-x" in release.notes
    report = helm_python.lint(helm.chart_dir("function-server"), values, strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report


def _server(release: helm.Release) -> dict:
    (deployment,) = (m for m in release.manifests if m["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_server_key_comes_from_its_secret_and_the_probes_need_none() -> None:
    values = {"image": {"repository": "r", "tag": "t"}, "function": "x", "auth": KEYED}
    release = helm.render("function-server", values, "fn-x")
    container = _server(release)
    env = _env(container)
    assert env["METAFLOW_STACK_SERVE_AUTH_KEY"] == {"secretKeyRef": {"name": "fn-auth", "key": "auth-key"}}
    assert "METAFLOW_STACK_INSECURE_NO_AUTH" not in env
    probes = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes <= {"/health", "/ready"}  # open without the key
    (ready,) = release.hooks
    assert "/ready'" in ready["spec"]["containers"][0]["command"][-1]  # `helm test` needs no key either
    assert '-H "x-api-key: $KEY"' in release.notes and "Secret fn-auth" in release.notes


def test_insecure_no_auth_serves_the_function_without_a_key_only_when_asked() -> None:
    values = {"image": {"repository": "r", "tag": "t"}, "function": "x", "auth": OPEN}
    release = helm.render("function-server", values, "fn-x")
    env = _env(_server(release))
    assert env["METAFLOW_STACK_INSECURE_NO_AUTH"] == "1"
    assert "METAFLOW_STACK_SERVE_AUTH_KEY" not in env
    assert "anyone who reaches it may call the function" in release.notes


def test_a_server_with_neither_a_key_nor_the_opt_out_is_refused_naming_both() -> None:
    with pytest.raises(StackError) as refused:
        helm.render("function-server", {"image": {"repository": "r", "tag": "t"}, "function": "x"}, "fn-x")
    assert "without an API key: set auth.existingSecret" in refused.value.message
    assert "or auth.insecureNoAuth=true" in refused.value.message


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"function": "x"}, "/image/repository"),  # the chart's values.schema.json
        ({"function": "x", "image": {"repository": "r", "tag": "t"}, "replicaCount": "two"}, "/replicaCount"),
        ({"function": "x", "image": {"repository": "r", "tag": "t"}, "auth": {"insecureNoAuth": 1}}, "/auth"),
        # passes the values schema, but a Deployment's cpu request must be a quantity: Kubernetes' schema says so
        (
            {
                "function": "x",
                "image": {"repository": "r", "tag": "t"},
                "auth": KEYED,
                "resources": {"requests": {"cpu": [1]}},
            },
            "resources.requests.cpu",
        ),
    ],
)
def test_invalid_values_are_refused_naming_the_field(values: dict, named: str) -> None:
    with pytest.raises(StackError) as refused:
        helm.render("function-server", values, "fn-x")
    assert named in refused.value.message


def test_a_bad_kubernetes_deploy_writes_nothing(reference_file: Path, tmp_path: Path) -> None:
    result = _deploy(
        reference_file,
        *("--target", "kubernetes", "--image", "no-tag-here", "--output", str(tmp_path / "out")),
        *("--auth-secret", "function-key"),
    )
    assert result.returncode == 1
    assert "names no tag" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_nomad_target_renders_a_checked_job(reference_file: Path, tmp_path: Path) -> None:
    import hcl2

    result = _deploy(reference_file, "--target", "nomad", "--image", IMAGE, "--output", str(tmp_path), "--cpu", "2")
    assert result.returncode == 0, result.stderr
    job_file = Path(last_line(result))
    job = hcl2.loads(job_file.read_text())
    assert list(job["job"][0]) == ['"function-predict-typed"']  # the job ID is the deployment's name
    variables = hcl2.loads((tmp_path / "function-server.vars.hcl").read_text())
    assert variables["image"] == json.dumps(IMAGE) and variables["cpu"] == 2000
    assert f"-var-file={tmp_path / 'function-server.vars.hcl'}" in result.stderr
    # Its key comes from Nomad Variables, where the next step puts a key of its own (never the stack's, which
    # guards this machine's services), kept here for its callers.
    said = " ".join(result.stderr.split())
    key_file = function_key_path("function-predict-typed")
    assert f'nomad var put nomad/jobs/function-predict-typed auth_key="$(cat {key_file})"' in said
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_text()) >= 32
    assert key_file.read_text().strip() != stack_key()[0]
    assert variables["insecure_no_auth"] is False


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"image": "i", "name": "n", "function": "f", "instances": "two"},
            "'instances' of function-server.nomad.hcl must be a number",
        ),
        ({"image": "i", "name": "n", "function": "f", "replicas": 2}, "declares no variable 'replicas'"),
        ({"function": "f"}, "needs variable(s) image, name"),
        (
            {"image": "i", "name": "n", "function": "f", "insecure_no_auth": "yes"},
            "'insecure_no_auth' of function-server.nomad.hcl must be a bool",
        ),
        ({"image": "i", "name": "bad name!", "function": "f"}, "is not a Nomad job ID"),
    ],
)
def test_nomad_variables_are_checked_against_the_job(variables: dict, message: str) -> None:
    with pytest.raises(StackError) as refused:
        nomad.render("function-server", variables)
    assert message in refused.value.message


def _server_template(job: nomad.NomadJob) -> str:
    import hcl2

    (task,) = hcl2.loads(job.hcl)["job"][0]['"n"']["group"][0]['"server"']["task"]
    return task['"server"']["template"][0]["data"]


def test_the_nomad_job_reads_its_key_from_nomad_variables_unless_told_insecure() -> None:
    job = nomad.render("function-server", {"image": "i", "name": "n", "function": "f"})
    assert "insecure_no_auth" not in job.var_file()  # false unless asked: a key is required
    data = _server_template(job)
    keyed = data.split(" : ", 1)[1]  # the template used unless insecure_no_auth
    assert '{{- with nomadVar "nomad/jobs/${var.name}" }}' in keyed
    assert "{{- with .auth_key.Value }}METAFLOW_STACK_SERVE_AUTH_KEY={{ . }}" in keyed
    # No key: the template fails, naming the variable to fill and the opt-out, rather than start keyless.
    assert '{{ sprig_fail "nomad/jobs/${var.name} holds no auth_key: put one there, or run the job with ' in keyed
    assert data.startswith('${var.insecure_no_auth ? "METAFLOW_STACK_INSECURE_NO_AUTH=1\\n"')
    opted_out = nomad.render("function-server", {"image": "i", "name": "n", "function": "f", "insecure_no_auth": True})
    assert "insecure_no_auth = true" in opted_out.var_file()


def test_a_template_sequence_in_a_value_stays_literal() -> None:
    job = nomad.render("function-server", {"image": "i", "name": "n", "function": "${attr.kernel.name}"})
    assert 'function = "$${attr.kernel.name}"' in job.var_file()


def test_nomad_apply_without_an_agent_names_nomad_addr(reference_file: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NOMAD_ADDR"}
    result = run_cli(
        "function",
        "deploy",
        str(reference_file),
        "--target",
        "nomad",
        "--image",
        IMAGE,
        "--output",
        str(tmp_path),
        "--apply",
        env=env,
    )
    assert result.returncode == 1
    assert "error: NOMAD_ADDR is not set" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_installs_the_chart_with_validated_values() -> None:
    import pulumi
    from components.function_server import FunctionServer, FunctionServerArgs

    args = FunctionServerArgs(image=IMAGE, function="predict", replicas=2, auth_secret="fn-auth")
    server = FunctionServer("function-predict", args)

    def check(outputs: list) -> None:
        chart, values, namespace, url = outputs
        assert Path(chart) == helm.chart_dir("function-server")
        assert values["image"]["tag"] == "0123456789abcdef" and values["replicaCount"] == 2
        assert values["auth"] == {"existingSecret": "fn-auth", "insecureNoAuth": False}
        assert namespace == "default"
        assert url == "http://function-predict.default.svc.cluster.local"

    done = pulumi.Output.all(server.release.chart, server.release.values, server.release.namespace, server.service_url)
    pulumi.runtime.test(lambda: done.apply(check))()

    with pytest.raises(StackError, match="names no tag"):
        FunctionServer("broken", FunctionServerArgs(image="no-tag", function="predict"))


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_needs_a_key_or_the_opt_out() -> None:
    import pulumi
    from components.function_server import FunctionServer, FunctionServerArgs

    with pytest.raises(StackError, match=r"set auth\.existingSecret"):
        FunctionServer("keyless", FunctionServerArgs(image=IMAGE, function="predict"))
    server = FunctionServer("open", FunctionServerArgs(image=IMAGE, function="predict", insecure_no_auth=True))

    def check(values: dict) -> None:
        assert values["auth"] == {"existingSecret": "", "insecureNoAuth": True}

    pulumi.runtime.test(lambda: server.release.values.apply(check))()


# -- real clusters: run where the tools are (the GitHub workflow installs kind and Nomad) --


@pytest.mark.docker
@pytest.mark.slow
def test_nomad_agent_runs_the_deployed_server(docker_engine, reference_file: Path, tmp_path: Path) -> None:
    need(
        "nomad",
        bool(shutil.which("nomad") and os.environ.get("NOMAD_ADDR")),
        "no Nomad agent (nomad on PATH, NOMAD_ADDR)",
    )
    import nomad as python_nomad

    result = _deploy(reference_file, "--target", "nomad", "--output", str(tmp_path), "--apply", "--name", "function-it")
    assert result.returncode == 0, result.stderr
    check = subprocess.run(
        ["nomad", "job", "validate", f"-var-file={tmp_path / 'function-server.vars.hcl'}", last_line(result)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    client = python_nomad.Nomad(address=os.environ["NOMAD_ADDR"])
    try:
        deadline = time.monotonic() + 300
        url = None
        while url is None and time.monotonic() < deadline:
            for allocation in client.job.get_allocations("function-it"):
                if allocation["ClientStatus"] == "running":
                    detail = client.allocation.get_allocation(allocation["ID"])
                    port = detail["AllocatedResources"]["Shared"]["Ports"][0]
                    url = f"http://{port['HostIP']}:{port['Value']}"
            time.sleep(2)
        assert url, "the allocation never ran"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert httpx.post(f"{url}/invoke", json=FLOWER).status_code == 401  # deploy gave it a key of its own
        keyed = {"x-api-key": function_key_path("function-it").read_text()}
        assert httpx.post(f"{url}/invoke", json=FLOWER, timeout=FIRST_CALL_S, headers=keyed).json() == {"prediction": 2}
    finally:
        client.job.deregister_job("function-it", purge=True)


@pytest.mark.docker
@pytest.mark.slow
def test_kind_cluster_runs_the_deployed_server(docker_engine, reference_file: Path, tmp_path: Path) -> None:
    need_kind_cluster()
    built = run_cli("function", "build-image", str(reference_file))
    assert built.returncode == 0, built.stderr[-3000:]
    image = last_line(built)
    subprocess.run(["kind", "load", "docker-image", image], check=True)
    key = uuid.uuid4().hex
    secret = ["kubectl", "create", "secret", "generic", "function-key", f"--from-literal=auth-key={key}"]
    subprocess.run(["kubectl", "delete", "secret", "function-key", "--ignore-not-found"], check=True)
    subprocess.run(secret, check=True)
    result = _deploy(
        reference_file,
        *("--target", "kubernetes", "--image", image, "--output", str(tmp_path), "--apply"),
        *("--auth-secret", "function-key"),
    )
    assert result.returncode == 0, result.stderr
    name = "function-predict-typed"
    try:
        subprocess.run(["kubectl", "rollout", "status", f"deployment/{name}", "--timeout=300s"], check=True)
        port = free_port()
        forward = subprocess.Popen(["kubectl", "port-forward", f"svc/{name}", f"{port}:80"])
        try:
            answer = None
            deadline = time.monotonic() + 60
            while answer is None and time.monotonic() < deadline:
                try:
                    answer = httpx.post(f"http://127.0.0.1:{port}/invoke", json=FLOWER, headers={"x-api-key": key})
                except httpx.HTTPError:
                    time.sleep(1)
            assert answer is not None, "the port-forward never answered"
            assert answer.json() == {"prediction": 2}
        finally:
            forward.terminate()
    finally:
        subprocess.run(["kubectl", "delete", "-f", str(tmp_path / "kubernetes.yaml")], check=False)


#: Each chart's smallest values that render (its Secrets named, as a real release has them).
SMALLEST = {
    "function-server": {"function": "x", "auth": {"existingSecret": "s"}},
    "key-release": {"auth": {"existingSecret": "s"}, "masterKey": {"existingSecret": "m"},
                    "policies": {"existingConfigMap": "p"}},
    "metadata-service": {"replicaCount": 1, "auth": {"existingSecret": "s"}},
    "ui": {"auth": {"existingSecret": "s"}, "metadataService": {"url": "http://metadata:8080"}},
    "worker-pool": {"pool": {"prefix": "mf-pool:1:s:", "flowFile": "/f.py", "size": 1},
                    "redis": {"existingSecret": "s"}, "resources": {}},
}  # fmt: skip
#: A value that, pasted into a template unquoted, closes its string and adds keys to the pod.
ESCAPE = '"\n      hostPID: true\n      automountServiceAccountToken: true\n      x: "'


@pytest.mark.parametrize("chart", SMALLEST)
def test_no_value_writes_yaml_into_a_chart(chart: str) -> None:
    """An image reference comes from a flow (``@kubernetes(image=...)``, ``@worker_pool(image=...)``) and went
    into the pod spec unquoted: a ``"`` and a newline in it gave the pod ``hostPID`` and the service
    account's token. Image references and variable names now have their grammar in each chart's schema,
    and every string is quoted where it is written (a Secret's name too, which Kubernetes judges itself)."""
    smallest = {**SMALLEST[chart], "image": {"repository": "registry.example:5000/metaflow-stack/x", "tag": "t-1.0"}}
    release = helm.render(chart, smallest, "x")  # (a registry's port, a path, a tag of dots and dashes: fine)
    pinned = f"[::1]:5000/metaflow-stack/x@sha256:{'c' * 64}"  # (by digest alone, as docs/cluster.md deploys)
    digested = helm.render(chart, {**SMALLEST[chart], "image": helm.image_values(pinned)}, "x")
    (deployment,) = (m for m in digested.manifests if m["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == pinned
    bad = [{"image": {"repository": "r/x", "tag": "t" + ESCAPE}}, {"image": {"repository": "r/x" + ESCAPE, "tag": "t"}},
           {"image": {"repository": "R/X", "tag": "t"}}, {"env": {"A" + ESCAPE: "v"}},
           {"image": {"repository": "r/x", "tag": ""}},
           {"image": {"repository": "r/x", "digest": "sha256:" + ESCAPE}}]  # fmt: skip
    for values in bad:
        with pytest.raises(StackError, match="refused the values"):
            helm.render(chart, {**smallest, **values}, "x")
    holder = "redis" if chart == "worker-pool" else "auth"
    release = helm.render(chart, {**smallest, holder: {**smallest[holder], "existingSecret": "s" + ESCAPE}}, "x")
    (deployment,) = (m for m in release.manifests if m["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert "hostPID" not in pod and pod.get("automountServiceAccountToken") is not True
    given = [e["valueFrom"].get("secretKeyRef", {}) for e in pod["containers"][0]["env"] if "valueFrom" in e]
    assert "s" + ESCAPE in [ref.get("name") for ref in given]
