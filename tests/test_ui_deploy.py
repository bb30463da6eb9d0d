"""The UI's image, Helm chart and Pulumi component: the chart rendered by
Helm's engine and validated against Kubernetes 1.30, the component under
Pulumi's mocks, both offline; and the image built and serving a real run
from a mounted datastore, in Docker."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from conftest import TEST_LABEL, free_port
from service_servers import run_flow

from metaflow_stack.deploy import helm
from metaflow_stack.errors import StackError

IMAGE = {"repository": "registry.example/metaflow-stack/ui", "tag": "0123456789abcdef"}
SERVICE = "http://metadata.default.svc.cluster.local:8080"


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_chart_points_the_ui_at_the_service_and_its_datastore() -> None:
    values = {
        "image": IMAGE,
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
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["METAFLOW_SERVICE_AUTH_KEY"] == {"secretKeyRef": {"name": "metaflow-auth", "key": "auth-key"}}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert kinds["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert kinds["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/ui")
    assert kinds["Service"]["spec"]["type"] == "ClusterIP"
    assert [h["kind"] for h in release.hooks] == ["Pod"]
    assert "kubectl port-forward" in release.notes and "s3://flows/metaflow" in release.notes


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": IMAGE}, "metadataService"),
        ({"image": IMAGE, "metadataService": {"url": "metadata:8080"}}, "url"),
        ({"image": IMAGE, "metadataService": {"url": SERVICE}, "datastoreRoots": ["/data/metaflow"]}, "datastoreRoots"),
        ({"image": {"repository": "", "tag": "x"}, "metadataService": {"url": SERVICE}}, "repository"),
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
    ui = Ui("metaflow-ui", UiArgs(image=image, service_url=SERVICE, datastore_roots=("s3://flows/metaflow",)))

    def check(outputs: list) -> None:
        chart, values, url = outputs
        assert chart.endswith("infra/helm/ui")
        assert values["image"] == IMAGE and values["replicaCount"] == 1
        assert values["metadataService"]["url"] == SERVICE
        assert values["datastoreRoots"] == ["s3://flows/metaflow"]
        assert url == "http://metaflow-ui.default.svc.cluster.local:8324"

    done = pulumi.Output.all(ui.release.chart, ui.release.values, ui.url)
    pulumi.runtime.test(lambda: done.apply(check))()
    with pytest.raises(StackError, match="datastoreRoots"):
        Ui("broken", UiArgs(image=image, service_url=SERVICE, datastore_roots=("/local/folder",)))


@pytest.mark.docker
@pytest.mark.slow
def test_the_image_serves_a_mounted_datastore_as_a_non_root_user(docker_engine, tmp_path) -> None:
    from metaflow_stack import images
    from metaflow_stack.engines import JobSpec, Mount, get_engine

    done = run_flow(tmp_path, "run", "--run-id-file", "run-id", service_url=None, flow="branch_foreach_flow.py")
    assert done.returncode == 0, done.stderr[-3000:]
    run = f"BranchForeachFlow/{(tmp_path / 'run-id').read_text()}"
    datastore = tmp_path / ".metaflow"
    subprocess.run(["chmod", "-R", "a+rX", str(datastore)], check=True)  # the image's uid 1000 reads it

    image = images.build("ui")
    assert docker_engine.image.inspect(image).config.user == "1000:1000"
    port = free_port()
    job = get_engine("docker").launch(
        JobSpec(
            image=image,
            command=["--datastore-root", "/data"],
            mounts=[Mount(str(datastore), "/data", read_only=True)],
            ports={8324: port},
            labels={TEST_LABEL: "true"},
        )
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not answers(f"{url}/api/source"):
            if time.monotonic() > deadline:
                pytest.fail("the UI container never answered:\n" + "\n".join(job.logs()))
            time.sleep(0.3)
        runs = httpx.get(f"{url}/api/runs").json()["runs"]
        assert [(r["pathspec"], r["status"]) for r in runs] == [(run, "completed")]
        page = httpx.get(f"{url}/api/runs/{run}").json()
        assert len(page["graph"]["steps"]) == 9 and page["graph"]["parameters"] == {"alpha": "0.5"}
        front = httpx.get(f"{url}/{run}")
        assert front.status_code == 200 and 'id="root"' in front.text  # the built front end ships in the image
    finally:
        job.kill()
