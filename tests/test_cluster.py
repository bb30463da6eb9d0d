"""The stack on a kind cluster (`metaflow stack cluster up`): the Pulumi program's dev stack under Pulumi's
own offline test mode (every Kubernetes object it declares checked against the API's schema), the kind
configuration, the Metaflow profile, and the whole bring-up with the flow suite on Kubernetes and Argo
Workflows where kind and Pulumi's CLI are installed (the GitHub workflow's k8s-integration job)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import PULUMI_PROGRAM, VENV_BIN, need, run_cli

from metaflow_stack.cluster import kind, profile, stack
from metaflow_stack.deploy import helm
from metaflow_stack.errors import StackError

SERVICE_IMAGE = "metaflow-stack/metadata-service:0123456789abcdef"
UI_IMAGE = "metaflow-stack/ui:0123456789abcdef"
TASK_IMAGE = "metaflow-stack/base:0123456789abcdef"
#: The core Kubernetes kinds the component declares itself (third-party charts render in the cluster).
_CORE = (
    "kubernetes:core/v1:Namespace",
    "kubernetes:core/v1:Secret",
    "kubernetes:core/v1:Service",
    "kubernetes:networking.k8s.io/v1:NetworkPolicy",
)


def _revealed(value):
    """Inputs as the engine got them, with Pulumi's secret wrappers (``{<sig>: <secret sig>, "value": ...}``)
    taken off: the provider marks every Secret's data secret."""
    from pulumi.runtime.rpc import _special_sig_key

    if isinstance(value, dict):
        if _special_sig_key in value:
            return _revealed(value["value"])
        return {k: _revealed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revealed(v) for v in value]
    return value


def _dev_stack():
    import pulumi
    from components.dev_stack import DevStack, DevStackArgs

    dev = DevStack(
        "dev",
        DevStackArgs(
            service_image=SERVICE_IMAGE,
            ui_image=UI_IMAGE,
            task_image=TASK_IMAGE,
            db_password="pw",
            s3_secret_key="sk",
            s3_task_secret_key="tsk",
            auth_key="ak",
        ),
    )
    done = pulumi.Output.all(dev.ui.url, dev.service.service_url, *(s.id for s in dev.node_ports))
    pulumi.runtime.test(lambda: done.apply(lambda _: None))()
    return dev


def test_the_dev_stack_declares_each_service_pinned_and_valid(pulumi_offline: list) -> None:
    from components import dev_stack

    dev = _dev_stack()
    by_type: dict[str, list] = {}
    for resource in pulumi_offline:
        by_type.setdefault(resource.typ, []).append(_revealed(resource.inputs))

    releases = {r["name"]: r for r in by_type["kubernetes:helm.sh/v3:Release"]}
    for chart, repo, version in (dev_stack.ARGO, dev_stack.MINIO, dev_stack.CLOUDNATIVE_PG, dev_stack.NATS):
        assert releases[chart]["chart"] == chart and releases[chart]["version"] == version
        assert releases[chart]["repositoryOpts"]["repo"] == repo and releases[chart]["namespace"] == "metaflow"
    argo = releases["argo-workflows"]["values"]
    assert argo["crds"] == {"install": True, "full": False} and argo["server"] == {"enabled": False}
    assert argo["controller"]["workflowNamespaces"] == ["metaflow"]
    assert argo["workflow"]["serviceAccount"] == {"create": True, "name": "argo-workflow"}
    minio = releases["minio"]["values"]
    assert minio["existingSecret"] == "minio-root" and minio["service"]["nodePort"] == kind.NODE_PORTS["s3"]
    assert releases["nats"]["values"]["config"]["jetstream"]["enabled"] is True
    assert releases["metadata-service"]["values"]["database"] == {"existingSecret": "metaflow-db-url"}
    assert releases["metadata-service"]["values"]["nats"] == {"url": "nats://nats.metaflow.svc.cluster.local:4222"}
    assert releases["metaflow-ui"]["values"]["metadataService"]["url"] == dev.outputs["service_internal_url"]

    (database,) = by_type["kubernetes:postgresql.cnpg.io/v1:Cluster"]
    initdb = database["spec"]["bootstrap"]["initdb"]
    assert initdb == {"database": "metaflow", "owner": "metaflow", "secret": {"name": "metaflow-db-owner"}}

    secrets = {r["metadata"]["name"]: r for r in by_type["kubernetes:core/v1:Secret"]}
    task = secrets["metaflow-task"]["stringData"]
    assert task["AWS_ENDPOINT_URL_S3"] == dev.outputs["s3_internal_endpoint"]
    assert json.loads(task["METAFLOW_SERVICE_HEADERS"]) == {"x-api-key": "ak"}
    assert database["metadata"]["annotations"] == {"pulumi.com/waitFor": "condition=Ready"}
    assert dev.outputs["task_image"] == TASK_IMAGE
    assert secrets["metaflow-db-owner"]["stringData"]["username"] == "metaflow"
    url = secrets["metaflow-db-url"]["stringData"]["database-url"]
    assert url == "postgresql://metaflow:pw@metaflow-db-rw.metaflow.svc:5432/metaflow"

    node_ports = {r["metadata"]["name"]: r["spec"] for r in by_type["kubernetes:core/v1:Service"]}
    assert node_ports["metadata-service-node-port"]["ports"][0]["nodePort"] == kind.NODE_PORTS["metadata-service"]
    ui_pods = {"app.kubernetes.io/name": "ui", "app.kubernetes.io/instance": "metaflow-ui"}
    assert node_ports["ui-node-port"]["selector"] == ui_pods

    declared = [manifest for typ in _CORE for manifest in by_type.get(typ, [])]
    for manifest in declared:
        helm.validate_manifest(manifest)
    policies = by_type["kubernetes:networking.k8s.io/v1:NetworkPolicy"]
    assert len(declared) == 1 + len(secrets) + len(node_ports) + len(policies)


def test_tasks_reach_s3_as_a_user_kept_to_the_bucket_not_as_minios_root(pulumi_offline: list) -> None:
    """The task Secret holds the tasks' own MinIO user, made by MinIO's chart (its ``users``, the password read
    from that same Secret) with a policy (its ``policies``) on the bucket's objects alone; MinIO's root account
    stays in ``minio-root``, and the chart's default admin (``console``, a published password) is not made."""
    from components import dev_stack

    _dev_stack()
    by_type: dict[str, list] = {}
    for resource in pulumi_offline:
        by_type.setdefault(resource.typ, []).append(_revealed(resource.inputs))
    secrets = {r["metadata"]["name"]: r["stringData"] for r in by_type["kubernetes:core/v1:Secret"]}
    task = secrets[dev_stack.TASK_SECRET]
    assert task["AWS_ACCESS_KEY_ID"] == "metaflow-task" and task["AWS_SECRET_ACCESS_KEY"] == "tsk"
    assert secrets["minio-root"]["rootUser"] not in task.values() and "sk" not in task.values()

    minio = {r["name"]: r for r in by_type["kubernetes:helm.sh/v3:Release"]}["minio"]["values"]
    (user,) = minio["users"]
    assert user == {
        "accessKey": "metaflow-task",
        "existingSecret": dev_stack.TASK_SECRET,
        "existingSecretKey": "AWS_SECRET_ACCESS_KEY",
        "policy": dev_stack.TASK_S3_POLICY,
    }
    (policy,) = [p for p in minio["policies"] if p["name"] == user["policy"]]
    resources = {resource for statement in policy["statements"] for resource in statement["resources"]}
    assert resources == {"arn:aws:s3:::metaflow", "arn:aws:s3:::metaflow/*"}
    actions = {action for statement in policy["statements"] for action in statement["actions"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    assert all(action.startswith("s3:") and "*" not in action for action in actions)
    assert not actions & {"s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy"}


def test_nats_takes_clients_from_the_metadata_service_pods_alone(pulumi_offline: list) -> None:
    """A NetworkPolicy isolates NATS's pods (the chart's selector labels for the release ``nats``): its client
    port takes connections from the pods of the metadata-service chart as rendered here, and from nothing else
    (a task's pod among them), so no task reads the runs' events or publishes forged ones."""
    _dev_stack()
    policies = [_revealed(r.inputs) for r in pulumi_offline if r.typ.endswith("networking.k8s.io/v1:NetworkPolicy")]
    (policy,) = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "nats"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "nats",
        "app.kubernetes.io/instance": "nats",
    }
    assert spec["policyTypes"] == ["Ingress"] and policy["metadata"]["namespace"] == "metaflow"
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": 4222}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # (no namespaceSelector, no ipBlock: pods of this namespace only)
    service = {r.inputs["name"]: r.inputs for r in pulumi_offline if r.typ.endswith("helm.sh/v3:Release")}
    rendered = helm.render("metadata-service", _revealed(service["metadata-service"]["values"]), "metadata-service")
    (deployment,) = [m for m in rendered.manifests if m["kind"] == "Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= pod_labels.items()


def test_the_programs_outputs_have_one_name_each_whatever_is_configured(pulumi_offline: list, monkeypatch) -> None:
    """With the dev stack and the separate service, UI and function server all configured, no output is
    exported twice: `cluster config` writes the dev stack's own ``service_url`` and ``ui_url`` into the profile,
    never a function server's or another UI's URL that a later export put in their place."""
    import pulumi
    import stack_program

    exported: list[tuple[str, object]] = []
    monkeypatch.setattr(pulumi, "export", lambda name, value: exported.append((name, value)))
    settings = {
        "dev-stack:serviceImage": SERVICE_IMAGE,
        "dev-stack:uiImage": UI_IMAGE,
        "dev-stack:taskImage": TASK_IMAGE,
        "metadata-service:image": SERVICE_IMAGE,
        "metadata-service:authSecret": "service-auth",
        "metadata-service:replicas": "1",
        "metadata-service:namespace": "served",
        "ui:image": UI_IMAGE,
        "ui:authSecret": "ui-auth",
        "function:image": "registry.example/metaflow-stack/function-fastapi-predict:0123456789abcdef",
        "function:name": "predict",
        "function:authSecret": "fn-auth",
        "function:namespace": "served",
    }
    secrets = {"dbPassword": "pw", "s3SecretKey": "sk", "s3TaskSecretKey": "tsk", "authKey": "ak"}
    config = {**settings, **{f"dev-stack:{key}": value for key, value in secrets.items()}}
    pulumi.runtime.set_all_config(config, [f"dev-stack:{key}" for key in secrets])
    try:
        pulumi.runtime.test(stack_program.main)()
    finally:
        pulumi.runtime.set_all_config({}, [])
    names = [name for name, _ in exported]
    assert len(names) == len(set(names)), sorted(names)
    outputs = dict(exported)
    assert outputs["service_url"] == f"http://127.0.0.1:{kind.NODE_PORTS['metadata-service']}"
    assert outputs["ui_url"] == f"http://127.0.0.1:{kind.NODE_PORTS['ui']}"
    assert {"metadata_service_url", "metaflow_ui_url", "function_service_url"} <= set(outputs)


def test_pulumi_up_in_the_program_folder_reads_a_project_pulumi_accepts_and_runs_the_dev_stack(
    pulumi_offline: list,
) -> None:
    """What `pulumi up` in ``infra/pulumi`` reads before and as it runs the program. The project file, held to
    Pulumi's rules for it (``Project.Validate``, pulumi/pulumi ``sdk/go/common/workspace/project.go``: a key
    outside the project's namespace declares no type and no default, only a value; a typed ``function:image``
    made every `pulumi up` fail). The requirements its pip toolchain installs from that folder: the runtime
    from this repository, which no package index has. Then the program itself with the dev stack's settings,
    as the engine would run it (the same program `metaflow stack cluster up` runs inline)."""
    import pulumi
    import yaml

    project = yaml.safe_load((PULUMI_PROGRAM / "Pulumi.yaml").read_text())
    assert project["name"] and project["runtime"]["name"] == "python"
    for key, declared in (project.get("config") or {}).items():
        if not isinstance(declared, dict):  # (`key: value`, Pulumi's short form of a value)
            continue
        assert not ("default" in declared and "value" in declared), key
        if ":" in key and not key.startswith(f"{project['name']}:"):
            assert "type" not in declared and "default" not in declared and "value" in declared, key

    lines = (PULUMI_PROGRAM / "requirements.txt").read_text().splitlines()
    local = [line for line in lines if line.startswith(".")]
    assert not [line for line in lines if line.startswith("metaflow-stack")]  # (an index's, not ours)
    (runtime,) = local
    folder, extras = runtime.rstrip("]").split("[")
    pyproject = tomllib.loads((PULUMI_PROGRAM / folder / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "metaflow-stack"
    assert set(extras.split(",")) <= set(pyproject["project"]["optional-dependencies"])

    import stack_program

    settings = {"serviceImage": SERVICE_IMAGE, "uiImage": UI_IMAGE, "taskImage": TASK_IMAGE}
    secrets = {"dbPassword": "pw", "s3SecretKey": "sk", "s3TaskSecretKey": "tsk", "authKey": "ak"}
    config = {f"dev-stack:{key}": value for key, value in {**settings, **secrets}.items()}
    pulumi.runtime.set_all_config(config, [f"dev-stack:{key}" for key in secrets])
    try:
        pulumi.runtime.test(stack_program.main)()
    finally:
        pulumi.runtime.set_all_config({}, [])
    releases = {r.inputs["name"]: r.inputs for r in pulumi_offline if r.typ == "kubernetes:helm.sh/v3:Release"}
    assert {"argo-workflows", "minio", "cloudnative-pg", "nats", "metadata-service", "metaflow-ui"} <= set(releases)
    assert releases["metadata-service"]["namespace"] == "metaflow"


def _of_the_api(manifest: dict) -> bool:
    """Whether ``manifest`` is of one of the Kubernetes API's own kinds (the core group, or a ``*.k8s.io`` one)."""
    group = manifest["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def test_the_dev_stacks_third_party_charts_render_to_valid_objects(pulumi_offline: list, tmp_path: Path) -> None:
    """The preview-equivalent for the charts the stack installs and does not write (Argo Workflows, MinIO,
    CloudNativePG, NATS): each rendered by Helm from its repository at its pinned version, with the values the
    program gives it, and every object of the Kubernetes API's own kinds valid by its schema, strictly
    (custom resources are the charts' own, their definitions among the objects checked); and the PostgreSQL
    cluster the program declares, valid by CloudNativePG's definition of it. MinIO's chart makes the tasks' user
    with its policy, from the task Secret; NATS's pods carry the labels the NetworkPolicy isolates. Neither Helm
    nor the charts' repositories are reachable here: the GitHub k8s-integration job runs it."""
    import jsonschema
    import yaml
    from components import dev_stack

    need("helm", shutil.which("helm") is not None, "the Helm CLI is not installed")
    _dev_stack()
    pinned = {chart: (repo, version) for chart, repo, version in (dev_stack.ARGO, dev_stack.MINIO)}
    pinned |= {chart: (repo, version) for chart, repo, version in (dev_stack.CLOUDNATIVE_PG, dev_stack.NATS)}
    releases = [_revealed(r.inputs) for r in pulumi_offline if r.typ == "kubernetes:helm.sh/v3:Release"]
    third_party = [r for r in releases if r["chart"] in pinned]
    assert {r["chart"] for r in third_party} == set(pinned)
    (nats_clients,) = [_revealed(r.inputs) for r in pulumi_offline if r.typ.endswith(":NetworkPolicy")]
    definitions: dict[tuple[str, str], dict] = {}  # (the custom resources' definitions the charts bring)
    for release in third_party:
        repo, version = pinned[release["chart"]]
        values = tmp_path / f"{release['name']}.json"
        values.write_text(json.dumps(release.get("values") or {}))
        command = ["helm", "template", release["name"], release["chart"], "--repo", repo, "--version", version]
        command += ["--namespace", release["namespace"], "--include-crds", "-f", str(values)]
        rendered = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert rendered.returncode == 0, rendered.stderr[-3000:]
        objects = [o for o in yaml.safe_load_all(rendered.stdout) if o]
        own = [o for o in objects if _of_the_api(o)]
        assert own, f"{release['chart']} rendered no Kubernetes objects"
        for manifest in own:
            helm.validate_manifest(manifest, where=f"{release['chart']} {version}: ")
        crds = [o["spec"] for o in objects if o["kind"] == "CustomResourceDefinition"]
        definitions.update({(crd["group"], crd["names"]["kind"]): crd for crd in crds})
        if release["chart"] == "nats":
            (server,) = [o for o in objects if o["kind"] == "StatefulSet"]
            isolated = nats_clients["spec"]["podSelector"]["matchLabels"]
            assert isolated.items() <= server["spec"]["template"]["metadata"]["labels"].items()
        if release["chart"] == "minio":
            (scripts,) = [o for o in objects if o["kind"] == "ConfigMap" and "add-user" in o.get("data", {})]
            assert "/config/secrets/metaflow-task/AWS_SECRET_ACCESS_KEY" in scripts["data"]["add-user"]
            assert "console" not in scripts["data"]["add-user"].split("# Create the users")[1]
            policy = json.loads(scripts["data"]["policy_0.json"])
            assert {r for st in policy["Statement"] for r in st["Resource"]} == {
                "arn:aws:s3:::metaflow",
                "arn:aws:s3:::metaflow/*",
            }
    # The PostgreSQL cluster the program declares itself, against CloudNativePG's own definition of it.
    (database,) = [r for r in pulumi_offline if r.typ == "kubernetes:postgresql.cnpg.io/v1:Cluster"]
    (served,) = [v for v in definitions["postgresql.cnpg.io", "Cluster"]["versions"] if v["name"] == "v1"]
    jsonschema.validate(_revealed(database.inputs)["spec"], served["schema"]["openAPIV3Schema"]["properties"]["spec"])


def test_kind_publishes_the_node_ports_on_loopback_only() -> None:
    config = json.loads(kind.config())
    (node,) = config["nodes"]
    published = {(m["containerPort"], m["hostPort"], m["listenAddress"]) for m in node["extraPortMappings"]}
    assert published == {(port, port, "127.0.0.1") for port in kind.NODE_PORTS.values()}


#: The dev stack's outputs, as `cluster up` gets them.
_OUTPUTS = {
    "namespace": "metaflow",
    "service_url": "http://127.0.0.1:30080",
    "service_internal_url": "http://metadata-service.metaflow.svc.cluster.local:8080",
    "ui_url": "http://127.0.0.1:30324",
    "s3_endpoint": "http://127.0.0.1:30900",
    "datastore_root": "s3://metaflow/metaflow",
    "task_secret": "metaflow-task",
    "service_account": "argo-workflow",
    "task_image": TASK_IMAGE,
    "s3_access_key": "metaflow",
}


def test_the_profile_reaches_the_stack_and_keeps_its_secrets_private(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("METAFLOW_HOME", str(tmp_path / "home"))
    exports = profile.write(_OUTPUTS, "key", "secret", tmp_path / "state", "stack-cluster")
    written = tmp_path / "home" / "config_stack-cluster.json"
    settings = json.loads(written.read_text())
    assert settings["METAFLOW_DATATOOLS_CLIENT_PARAMS"] == {"endpoint_url": "http://127.0.0.1:30900"}
    assert "METAFLOW_S3_ENDPOINT_URL" not in settings  # tasks would get it verbatim
    assert settings["METAFLOW_SERVICE_INTERNAL_URL"].endswith(".svc.cluster.local:8080")
    assert settings["METAFLOW_KUBERNETES_SECRETS"] == "metaflow-task"
    assert settings["METAFLOW_ARGO_WORKFLOWS_ENV_VARS_TO_SKIP"] == "METAFLOW_SERVICE_HEADERS"
    assert settings["METAFLOW_KUBERNETES_CONTAINER_IMAGE"] == TASK_IMAGE
    sizes = [settings[f"METAFLOW_KUBERNETES_{part}"] for part in ("CPU", "MEMORY", "DISK")]
    assert sizes == ["0.25", "512", "2048"]  # a dev node's share, not Metaflow's 1 CPU, 4 GB, 10 GB
    aws = configparser.ConfigParser()
    aws.read(exports["AWS_CONFIG_FILE"])
    assert aws["default"]["aws_secret_access_key"] == "secret"
    for path in (written, Path(exports["AWS_CONFIG_FILE"])):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert exports["METAFLOW_PROFILE"] == "stack-cluster"


def test_cluster_down_removes_every_profile_and_the_aws_config_that_reached_the_cluster(
    tmp_path: Path, monkeypatch
) -> None:
    """The profiles ``up`` wrote (the default and one of ``--profile``) hold the service's key and the AWS config
    file holds S3's: ``down`` deletes them with the cluster, says so, and leaves the user's other profiles."""
    from metaflow_stack.cluster import dev

    home, state = tmp_path / "home", tmp_path / "state"
    monkeypatch.setenv("METAFLOW_HOME", str(home))
    monkeypatch.setenv("METAFLOW_STACK_STATE_DIR", str(state))
    monkeypatch.setattr(kind, "delete", lambda: True)
    monkeypatch.setattr(stack, "forget", lambda: None)
    written = [profile.write(_OUTPUTS, "key", "secret", state / "cluster", name) for name in (profile.PROFILE, "other")]
    aws = Path(written[0]["AWS_CONFIG_FILE"])
    mine = home / "config_mine.json"
    mine.write_text("{}")
    said: list[str] = []
    dev.down(said.append)
    assert sorted(home.iterdir()) == [mine]
    assert not aws.exists()
    assert said[0] == f"deleted the kind cluster {kind.CLUSTER}"
    removed = {home / f"config_{profile.PROFILE}.json", home / "config_other.json", aws}
    assert set(said[1:]) == {f"removed {path}" for path in removed}


def test_cluster_commands_name_what_is_missing_or_wrong() -> None:
    for args, expected in (
        (("--namespace", "kube-system"), "error: --namespace: 'kube-system' is not a namespace the stack can take"),
        (("--namespace", "Not_A_Label"), "is not a namespace the stack can take"),
        (("--profile", "a[/b]"), "Invalid value for '--profile'"),
    ):
        result = run_cli("stack", "cluster", "up", *args)
        assert result.returncode != 0 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    if shutil.which("kind") is None:
        for command in ("up", "down"):
            result = run_cli("stack", "cluster", command)
            assert result.returncode == 1
            assert "error: kind is not installed" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("stack", "cluster", "config")
    assert result.returncode == 1
    assert "error: no dev stack is up on this machine" in result.stderr


#: What conftest sets for the session's S3 server.
SESSION_S3 = frozenset(
    {
        "METAFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
    }
)


#: A double of Pulumi's CLI for ``config set``: what it was given on its command line, and on its standard input
#: (which the CLI reads for the value when it is not a terminal: ``pkg/cmd/pulumi/config/config_set.go``).
PULUMI_CONFIG_SET = """#!/bin/sh
printf '%s\n' "$*" > "$PULUMI_DOUBLE_SAID/argv"
cat > "$PULUMI_DOUBLE_SAID/stdin"
"""


def test_the_stacks_secrets_reach_pulumi_on_its_input_never_its_command_line(tmp_path: Path) -> None:
    """Pulumi's Automation API passes every config value on the CLI's command line, which any user of the
    machine reads (``ps``); the dev stack's passwords and key go on its standard input instead."""
    from types import SimpleNamespace

    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "pulumi").write_text(PULUMI_CONFIG_SET)
    (bin_folder / "pulumi").chmod(0o755)
    env = {"PATH": f"{bin_folder}:{os.environ['PATH']}", "PULUMI_DOUBLE_SAID": str(tmp_path)}
    workspace = SimpleNamespace(env_vars=env, work_dir=str(tmp_path))
    stack._set_secret(workspace, "dev-stack:dbPassword", "s3cret-value")
    assert (tmp_path / "argv").read_text().split() == [
        "config",
        "set",
        "--secret",
        "--stack",
        "dev",
        "dev-stack:dbPassword",
    ]
    assert (tmp_path / "stdin").read_text() == "s3cret-value"
    (bin_folder / "pulumi").write_text("#!/bin/sh\necho 'error: passphrase must be set' >&2\nexit 255\n")
    with pytest.raises(StackError, match="pulumi could not keep the stack's secret dev-stack:dbPassword: error: pass"):
        stack._set_secret(workspace, "dev-stack:dbPassword", "s3cret-value")


def test_up_gives_pulumi_the_secrets_through_its_input_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """``up`` sets the plain values through the Automation API and every secret through ``_set_secret``."""
    from types import SimpleNamespace

    import pulumi.automation as auto

    configured, kept = {}, {}

    class Stack:
        workspace = SimpleNamespace(env_vars={}, work_dir=".")

        def set_all_config(self, values):
            configured.update(values)

        def up(self, **options):
            return SimpleNamespace(summary=SimpleNamespace(resource_changes={"same": 3}), outputs={})

    monkeypatch.setattr(stack, "require", lambda: auto)
    monkeypatch.setattr(stack, "_stack", Stack)
    monkeypatch.setattr(stack, "_set_secret", lambda workspace, key, value: kept.update({key: value}))
    said = []
    assert stack.up({"dev-stack:namespace": "metaflow"}, {"dev-stack:authKey": "k3y"}, said.append) == {}
    assert list(configured) == ["dev-stack:namespace"] and kept == {"dev-stack:authKey": "k3y"}
    assert said == ["the stack's resources: 3 unchanged"]


def test_up_says_what_it_did_to_the_stacks_resources_in_one_line() -> None:
    """Pulumi's counts by operation, in words (its rarer operations in its own names), nothing said for
    none: the line the kind test reads to hold that a second ``up`` changes nothing."""
    assert stack.changes({"same": 20}) == "the stack's resources: 20 unchanged"
    counts = {"create": 3, "same": 17, "update": 0, "create-replacement": 1, "replace": 1}
    assert stack.changes(counts) == "the stack's resources: 3 created, 17 unchanged, 1 create-replacement, 1 replaced"
    assert stack.changes({}) == "the stack's resources: none"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(2900)
def test_the_dev_stack_on_kind_runs_the_flow_suite_on_kubernetes_and_argo(docker_engine, tmp_path: Path) -> None:
    need("kind", shutil.which("kind") is not None, "kind is not installed")
    need("pulumi", shutil.which("pulumi") is not None, "the Pulumi CLI is not installed")
    # Opt-in: GitHub's runners have kind and Pulumi in every job, and this one brings a whole cluster up.
    need("kind-stack", os.environ.get("STACK_TEST_KIND_STACK") == "1", "set STACK_TEST_KIND_STACK=1 to run it")
    # Not the session's own S3 (conftest's moto endpoint and credentials): Metaflow would hand its endpoint to
    # every pod, and boto would sign with its credentials before the stack's.
    env = {name: value for name, value in os.environ.items() if name not in SESSION_S3}
    env |= {"METAFLOW_HOME": str(tmp_path / "home"), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    command = [str(VENV_BIN / "metaflow"), "stack", "cluster", "up"]
    up = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    assert up.returncode == 0, (up.stdout + up.stderr)[-6000:]
    exports = dict(item.split("=", 1) for item in up.stdout.strip().splitlines()[-1].removeprefix("export ").split(" "))
    # Up again on the same cluster: the secrets are kept and every resource is as declared, so nothing changes.
    written = sorted((tmp_path / "home").glob("config_*.json"))
    assert written, "up wrote no Metaflow profile"
    profiles = {path: path.read_text() for path in written}
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    assert re.search(r"^the stack's resources: \d+ unchanged$", again.stderr, re.MULTILINE), again.stderr[-6000:]
    assert again.stdout == up.stdout and {path: path.read_text() for path in written} == profiles
    # `cluster config` alone (another shell, a profile lost): the same profile again from the stack's outputs,
    # and the same line to eval.
    for path in written:
        path.unlink()
    command = [str(VENV_BIN / "metaflow"), "stack", "cluster", "config"]
    config = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert config.returncode == 0, (config.stdout + config.stderr)[-6000:]
    assert config.stdout.strip().splitlines()[-1] == up.stdout.strip().splitlines()[-1]
    assert {path: path.read_text() for path in written} == profiles
    suite = Path(__file__).resolve().parent / "flow_suite"
    command = [sys.executable, "-m", "pytest", "-c", str(suite / "pytest.ini"), str(suite), "-p", "no:cacheprovider"]
    command += ["--backend=kubernetes,argo", f"--basetemp={tmp_path / 'runs'}", "-q"]
    command += [f"--junit-xml={os.environ.get('STACK_FLOW_SUITE_JUNIT', tmp_path / 'k8s.xml')}"]
    environment = {**env, **{k: v.strip("'") for k, v in exports.items()}, "STACK_TEST_REQUIRE": "kubernetes,argo"}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    # Down once it passed (a failed bring-up is kept for the job's logs): the cluster and all it held go.
    down = subprocess.run(
        [str(VENV_BIN / "metaflow"), "stack", "cluster", "down"], capture_output=True, text=True, env=env
    )
    assert down.returncode == 0 and f"deleted the kind cluster {kind.CLUSTER}" in down.stdout + down.stderr
    assert not kind.exists()
