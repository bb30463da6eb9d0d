"""The UI's image, Helm chart and Pulumi component: the chart rendered by
Helm's engine and validated against Kubernetes 1.30, the component under
Pulumi's mocks, both offline; and the image built and serving a real run
from a mounted datastore, in Docker."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from conftest import TEST_LABELS, free_port
from service_servers import run_flow

from metaflow_stack.deploy import helm
from metaflow_stack.errors import StackError

IMAGE = {"repository": "registry.example/metaflow-stack/ui", "tag": "0123456789abcdef"}
SERVICE = "http://metadata.default.svc.cluster.local:8080"
#: The UI's own key from a Secret (not the service's, ``metadataService.auth``), or the explicit opt-out.
KEYED = {"existingSecret": "ui-auth"}
OPEN = {"insecureNoAuth": True}


def _deployment(release: helm.Release) -> dict:
    return next(m for m in release.manifests if m["kind"] == "Deployment")


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_chart_points_the_ui_at_the_service_and_its_datastore() -> None:
    values = {
        "image": IMAGE,
        "auth": KEYED,
        "metadataService": {"url": SERVICE, "auth": {"existingSecret": "metaflow-auth"}},
        "datastoreRoots": ["s3://flows/metaflow", "s3://archive/mf"],
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/ui"}},
    }
    release = helm.render("ui", values, "metaflow-ui")
    kinds = {m["kind"]: m for m in release.manifests}
    assert set(kinds) == {"Deployment", "Service", "ServiceAccount"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        "--service-url",
        SERVICE,
        "--datastore-root",
        "s3://flows/metaflow",
        "--datastore-root",
        "s3://archive/mf",
    ]
    assert _env(container)["METAFLOW_SERVICE_AUTH_KEY"] == {
        "secretKeyRef": {"name": "metaflow-auth", "key": "auth-key"}
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert kinds["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert kinds["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/ui")
    assert kinds["Service"]["spec"]["type"] == "ClusterIP"
    assert [h["kind"] for h in release.hooks] == ["Pod"]
    assert "kubectl port-forward" in release.notes and "s3://flows/metaflow" in release.notes


def test_the_ui_key_comes_from_its_own_secret_and_the_probes_need_none() -> None:
    values = {"image": IMAGE, "auth": KEYED, "metadataService": {"url": SERVICE}}
    release = helm.render("ui", values, "metaflow-ui")
    container = _deployment(release)["spec"]["template"]["spec"]["containers"][0]
    env = _env(container)
    assert env["METAFLOW_STACK_UI_AUTH_KEY"] == {"secretKeyRef": {"name": "ui-auth", "key": "auth-key"}}
    assert "METAFLOW_STACK_INSECURE_NO_AUTH" not in env and "METAFLOW_SERVICE_AUTH_KEY" not in env
    probes = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"/health"}  # the API needs the key; /health does not
    (ping,) = release.hooks  # `helm test` calls the API with the key from the same Secret
    assert _env(ping["spec"]["containers"][0])["METAFLOW_STACK_UI_AUTH_KEY"] == env["METAFLOW_STACK_UI_AUTH_KEY"]
    assert "/sign-in?key=<the key in Secret ui-auth>" in release.notes


def test_insecure_no_auth_serves_the_ui_without_a_key_only_when_asked() -> None:
    release = helm.render("ui", {"image": IMAGE, "auth": OPEN, "metadataService": {"url": SERVICE}}, "metaflow-ui")
    env = _env(_deployment(release)["spec"]["template"]["spec"]["containers"][0])
    assert env["METAFLOW_STACK_INSECURE_NO_AUTH"] == "1"
    assert "METAFLOW_STACK_UI_AUTH_KEY" not in env
    assert "env" not in release.hooks[0]["spec"]["containers"][0]
    assert "It has no key of its own" in release.notes


def test_a_ui_with_neither_a_key_nor_the_opt_out_is_refused_naming_both() -> None:
    with pytest.raises(StackError) as refused:
        helm.render("ui", {"image": IMAGE, "metadataService": {"url": SERVICE}}, "metaflow-ui")
    assert "without its own API key: set auth.existingSecret" in refused.value.message
    assert "or auth.insecureNoAuth=true" in refused.value.message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": IMAGE}, "metadataService"),
        ({"image": IMAGE, "metadataService": {"url": "metadata:8080"}}, "url"),
        ({"image": IMAGE, "metadataService": {"url": SERVICE}, "datastoreRoots": ["/data/metaflow"]}, "datastoreRoots"),
        ({"image": {"repository": "", "tag": "x"}, "metadataService": {"url": SERVICE}}, "repository"),
        ({"image": IMAGE, "metadataService": {"url": SERVICE}, "auth": {"insecureNoAuth": "yes"}}, "insecureNoAuth"),
    ],
)
def test_wrong_values_are_refused_naming_the_problem(values: dict, message: str) -> None:
    with pytest.raises(StackError, match=message):
        helm.render("ui", values, "metaflow-ui")


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_installs_the_chart() -> None:
    import pulumi
    from components.ui import Ui, UiArgs

    image = f"{IMAGE['repository']}:{IMAGE['tag']}"
    args = UiArgs(
        image=image,
        service_url=SERVICE,
        datastore_roots=("s3://flows/metaflow",),
        auth_secret="ui-auth",
        service_auth_secret="metaflow-auth",
    )
    ui = Ui("metaflow-ui", args)

    def check(outputs: list) -> None:
        chart, values, url = outputs
        assert chart.endswith("infra/helm/ui")
        assert values["image"] == IMAGE and values["replicaCount"] == 1
        assert values["auth"] == {"existingSecret": "ui-auth", "insecureNoAuth": False}
        assert values["metadataService"] == {"url": SERVICE, "auth": {"existingSecret": "metaflow-auth"}}
        assert values["datastoreRoots"] == ["s3://flows/metaflow"]
        assert url == "http://metaflow-ui.default.svc.cluster.local:8324"

    done = pulumi.Output.all(ui.release.chart, ui.release.values, ui.url)
    pulumi.runtime.test(lambda: done.apply(check))()
    with pytest.raises(StackError, match="datastoreRoots"):
        Ui(
            "broken",
            UiArgs(image=image, service_url=SERVICE, datastore_roots=("/local/folder",), auth_secret="ui-auth"),
        )


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_needs_the_ui_key_or_the_opt_out() -> None:
    import pulumi
    from components.ui import Ui, UiArgs

    image = f"{IMAGE['repository']}:{IMAGE['tag']}"
    with pytest.raises(StackError, match=r"set auth\.existingSecret"):
        Ui("keyless", UiArgs(image=image, service_url=SERVICE))
    ui = Ui("open", UiArgs(image=image, service_url=SERVICE, insecure_no_auth=True))

    def check(values: dict) -> None:
        assert values["auth"] == {"existingSecret": "", "insecureNoAuth": True}

    pulumi.runtime.test(lambda: ui.release.values.apply(check))()


@pytest.fixture(scope="module")
def ui_image(docker_engine) -> str:
    from metaflow_stack import images

    return images.build("ui")


@pytest.mark.docker
@pytest.mark.slow
def test_the_image_will_not_serve_without_a_key(ui_image: str) -> None:
    from metaflow_stack.engines import JobSpec, get_engine

    # It listens beyond its container's loopback: without a key (or an explicit opt-out) it will not start.
    keyless = get_engine("docker").launch(JobSpec(image=ui_image, command=[], labels=TEST_LABELS))
    try:
        assert keyless.wait(timeout=120) == 1
        assert "METAFLOW_STACK_AUTH_KEY" in "\n".join(keyless.logs())
    finally:
        keyless.kill()


@pytest.mark.docker
@pytest.mark.slow
def test_the_image_serves_a_mounted_datastore_to_key_holders_as_a_non_root_user(
    docker_engine, ui_image: str, tmp_path
) -> None:
    from metaflow_stack.engines import JobSpec, Mount, get_engine

    done = run_flow(tmp_path, "run", "--run-id-file", "run-id", service_url=None, flow="branch_foreach_flow.py")
    assert done.returncode == 0, done.stderr[-3000:]
    run = f"BranchForeachFlow/{(tmp_path / 'run-id').read_text()}"
    datastore = tmp_path / ".metaflow"
    subprocess.run(["chmod", "-R", "a+rX", str(datastore)], check=True)  # the image's uid 1000 reads it

    assert docker_engine.image.inspect(ui_image).config.user == "1000:1000"
    port = free_port()
    job = get_engine("docker").launch(
        JobSpec(
            image=ui_image,
            command=["--datastore-root", "/data"],
            env={"METAFLOW_STACK_UI_AUTH_KEY": "t3st"},
            mounts=[Mount(str(datastore), "/data", read_only=True)],
            ports={8324: port},
            labels=TEST_LABELS,
        )
    )
    try:
        url, keyed = f"http://127.0.0.1:{port}", {"x-api-key": "t3st"}
        deadline = time.monotonic() + 120
        while not answers(f"{url}/health"):  # open, for the probes
            if time.monotonic() > deadline:
                pytest.fail("the UI container never answered:\n" + "\n".join(job.logs()))
            time.sleep(0.3)
        assert httpx.get(f"{url}/api/runs").status_code == 401
        runs = httpx.get(f"{url}/api/runs", headers=keyed).json()["runs"]
        assert [(r["pathspec"], r["status"]) for r in runs] == [(run, "completed")]
        page = httpx.get(f"{url}/api/runs/{run}", headers=keyed).json()
        assert len(page["graph"]["steps"]) == 9 and page["graph"]["parameters"] == {"alpha": "0.5"}
        front = httpx.get(f"{url}/{run}", headers=keyed)
        assert front.status_code == 200 and 'id="root"' in front.text  # the built front end ships in the image
    finally:
        job.kill()
