"""The key-release service's image, Helm chart and Nomad job: the chart rendered by Helm's engine and validated
against Kubernetes 1.30, the job parsed as HCL2 with its variables checked, both offline (a real cluster and a
real Nomad agent run in the GitHub ``clusters`` job); and the image built and judging evidence in Docker as
a non-root user, its master key and API key mounted and given at run time, never in a layer."""

from __future__ import annotations

import httpx
import pytest
from conftest import PROJECT, TEST_LABELS, free_port, wait_ready

from metaflow_stack.deploy import helm, nomad
from metaflow_stack.errors import StackError

IMAGE = {"repository": "registry.example/metaflow-stack/key-release", "tag": "0123456789abcdef"}
PROD = '[sgx]\nmr_enclave = ["' + "33" * 32 + '"]\n\n[tcb]\nallowed_statuses = ["UpToDate"]\n'
VALUES = {
    "image": IMAGE,
    "auth": {"existingSecret": "key-release-auth"},
    "masterKey": {"existingSecret": "key-release-master"},
    "policies": {"inline": {"prod": PROD}},
}


def _container(release: helm.Release) -> dict:
    deployment = next(m for m in release.manifests if m["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_chart_mounts_the_master_key_and_the_policies_and_takes_the_key_from_a_secret() -> None:
    release = helm.render("key-release", VALUES, "key-release")
    kinds = {m["kind"]: m for m in release.manifests}
    assert set(kinds) == {"ConfigMap", "Deployment", "Service"}
    assert kinds["ConfigMap"]["data"] == {"prod.toml": PROD}  # a policy named prod, as written
    container = _container(release)
    assert container["args"] == ["--policies", "/etc/metaflow-stack/policies",
                                 "--master-key-file", "/etc/metaflow-stack/master/master-key"]  # fmt: skip
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env == {"METAFLOW_STACK_KEY_RELEASE_AUTH_KEY": {"secretKeyRef": {"name": "key-release-auth",
                                                                            "key": "auth-key"}}}  # fmt: skip
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["master"]["secret"] == {"secretName": "key-release-master", "defaultMode": 0o400,
                                           "items": [{"key": "master-key", "path": "master-key"}]}  # fmt: skip
    assert volumes["policies"]["configMap"] == {"name": "key-release-policies"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")} == {"/ready", "/health"}
    assert "METAFLOW_STACK_KEY_RELEASE_URL=http://key-release.default.svc.cluster.local:8325" in release.notes
    direct = helm.render("key-release", {**VALUES, "allowDirect": True, "pccsUrl": "https://pccs.example"}, "kr")
    assert _container(direct)["args"][-1] == "--allow-direct" and "Development clusters only" in direct.notes
    existing = helm.render("key-release", {**VALUES, "policies": {"existingConfigMap": "our-policies"}}, "kr")
    assert "ConfigMap" not in {m["kind"] for m in existing.manifests}
    assert '"name": "our-policies"' in str(existing.manifests).replace("'", '"')


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"auth": {}}, "will not start without an API key: set auth.existingSecret"),
        ({"masterKey": {}}, "needs its master key: set masterKey.existingSecret"),
        ({"policies": {}}, "set policies.inline (NAME: TOML) or policies.existingConfigMap"),
        ({"policies": {"inline": {"../etc": PROD}}}, "invalid propertyName '../etc'"),
        ({"pccsUrl": "ftp://x"}, "pccsUrl"),
    ],
)
def test_a_chart_that_would_not_keep_keys_safe_is_refused_naming_the_value(changes: dict, says: str) -> None:
    with pytest.raises(StackError) as refused:
        helm.render("key-release", {**VALUES, **changes}, "key-release")
    assert says in refused.value.message


def _task(job: nomad.NomadJob) -> dict:
    import hcl2

    (group,) = hcl2.loads(job.hcl)["job"][0]['"key-release"']["group"]
    return group['"service"']["task"][0]['"service"']


def test_the_nomad_job_keeps_its_keys_in_nomad_variables_and_writes_each_policy() -> None:
    job = nomad.render("key-release", {"image": "r/key-release:abc", "policies": {"prod": PROD}})
    assert 'policies = {"prod" = "[sgx]\\nmr_enclave = [\\"' in job.var_file()
    assert "master_key" not in job.var_file() and "auth_key" not in job.var_file()
    task = _task(job)
    master, service_env = task["template"]
    assert master["destination"] == '"secrets/master-key"' and master["perms"] == '"400"' and master["uid"] == 1000
    assert '{{ sprig_fail "nomad/jobs/${var.name} holds no master_key: put one there' in master["data"]
    assert "{{- with .auth_key.Value }}METAFLOW_STACK_KEY_RELEASE_AUTH_KEY={{ . }}" in service_env["data"]
    (policies,) = task["dynamic"]
    content = policies['"template"']["content"][0]
    assert policies['"template"']["for_each"] == "${var.policies}"
    assert content["destination"] == '"local/policies/${template.key}.toml"' and content["data"] == "${template.value}"
    assert '"--master-key-file", "/secrets/master-key"' in task["config"][0]["args"]
    with pytest.raises(StackError, match="needs variable"):
        nomad.render("key-release", {"image": "r/x:1"})
    with pytest.raises(StackError, match=r"'policies' of key-release\.nomad\.hcl must be a map"):
        nomad.render("key-release", {"image": "r/x:1", "policies": ["prod"]})


@pytest.mark.docker
@pytest.mark.slow
def test_the_image_judges_evidence_as_a_non_root_user_with_keys_given_at_run_time(docker_engine, tmp_path) -> None:
    from metaflow_stack import images
    from metaflow_stack.confidential.keyring import ReleaseRequest, RemoteKeeper
    from metaflow_stack.engines import JobSpec, Mount, get_engine

    image = images.build("key-release")
    config = docker_engine.image.inspect(image).config
    assert config.user == "1000:1000" and not [e for e in config.env if "KEY" in e]  # keys come at run time
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "prod.toml").write_text(PROD)
    (tmp_path / "master").mkdir()
    (tmp_path / "master" / "master-key").write_text("cd" * 32)
    for path in (tmp_path / "policies", tmp_path / "master"):  # the image's uid 1000 reads them
        path.chmod(0o755)
        for file in path.iterdir():
            file.chmod(0o644)
    engine, port = get_engine("docker"), free_port()
    keyless = engine.launch(JobSpec(image=image, command=[], labels=TEST_LABELS))
    try:
        assert keyless.wait(timeout=120) == 1  # beyond its container's loopback without a key: refused
        assert "METAFLOW_STACK_AUTH_KEY" in "\n".join(keyless.logs())
    finally:
        keyless.kill()
    job = engine.launch(
        JobSpec(
            image=image,
            command=[],
            env={"METAFLOW_STACK_KEY_RELEASE_AUTH_KEY": "t3st"},
            mounts=[
                Mount(str(tmp_path / "policies"), "/etc/metaflow-stack/policies"),
                Mount(str(tmp_path / "master"), "/etc/metaflow-stack/master"),
            ],
            ports={8325: port},
            labels=TEST_LABELS,
        )
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_ready(url, 120), "the key-release container never answered:\n" + "\n".join(job.logs())
        keeper = RemoteKeeper(url, "t3st")
        quote = (PROJECT / "tests" / "data" / "attestation" / "sgx_quote").read_bytes().hex()
        request = ReleaseRequest(
            identity={"flow": "F", "run": "1", "step": "s", "task": "2", "attempt": 0, "code_digest": "c"},
            nonce=keeper.nonce(), enclave_key="ab" * 32, work="0" * 64, mode="sgx", policy="prod", quote=quote,
        )  # fmt: skip
        answer = httpx.post(f"{url}/v1/releases", json=request.model_dump(), headers={"x-api-key": "t3st"}, timeout=60)
        # Judged in the container with its own policy: the sample is not of the enclave prod pins (nor, without a
        # PCCS here, is there collateral): refused, never released.
        assert answer.status_code == 403 and answer.json()["details"]["field"] in ("collateral", "sgx.mr_enclave")
        assert httpx.get(f"{url}/v1/policies", headers={"x-api-key": "t3st"}).json()[0]["name"] == "prod"
        logs = "\n".join(job.logs())
        assert "cd" * 32 not in logs and "t3st" not in logs
    finally:
        job.kill()
