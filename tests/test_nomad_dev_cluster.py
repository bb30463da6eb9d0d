"""The dev Nomad cluster of ``just nomad-up``: its ACLs set up for flows, and a flows' token that holds only
the policy in ``infra/nomad/dev/metaflow.policy.hcl``.

Here the setup runs against the double in ``tests/nomad_double`` started with its ACLs not yet bootstrapped
(it enforces each endpoint's capability as Nomad's API docs list it); where ``nomad`` is on PATH (the GitHub
workflow's ``clusters`` job) ``metaflow stack nomad up`` starts a real dev agent with ``agent.hcl`` and a job
runs on it with the flows' token.
"""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from devservers import free_port, nomad_double
from nomad_jobs import run_job

from metaflow_stack.engines.nomad.client import NomadClient, Settings
from metaflow_stack.engines.nomad.jobspec import Placement
from metaflow_stack.errors import StackError
from metaflow_stack.nomad.dev_cluster import NAMESPACE, LocalNomad, configure, policy_rules


@pytest.fixture
def fresh_agent() -> Iterator[str]:
    """A Nomad API with ACLs on and not yet bootstrapped, as a dev agent with ``agent.hcl`` starts."""
    with nomad_double("--acl-bootstrap") as address:
        yield address


def test_setup_hands_flows_a_token_for_their_namespace_alone(fresh_agent: str, tmp_path: Path) -> None:
    cluster = configure(fresh_agent, tmp_path)
    token = cluster.token_file.read_text()
    for name in ("token", "management-token"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert token not in cluster.exports() and str(cluster.token_file) in cluster.exports()
    assert f"NOMAD_NAMESPACE={NAMESPACE}" in cluster.exports()

    again = configure(fresh_agent, tmp_path)  # a second `up` keeps what the agent still accepts
    assert again == cluster and again.token_file.read_text() == token

    flows = Settings(address=fresh_agent, token=token, namespace=NAMESPACE)
    with NomadClient(flows) as client:
        assert client.jobs("mf-") == []
        assert client.nodes(resources=True)[0]["NodeResources"]  # (so a job no node could hold fails at once)
        client.put_variable("nomad/jobs/metaflow-some-flow", {"KEY": "kept"})  # a deployed flow's credentials
        with pytest.raises(StackError):
            client.variable("nomad/jobs/metaflow-some-flow")  # which only that job's runs read
        with pytest.raises(StackError):
            client.put_variable("nomad/other", {"KEY": "x"})
    elsewhere = Settings(address=fresh_agent, token=token)  # the default namespace is not the flows'
    with NomadClient(elsewhere) as client, pytest.raises(StackError) as refused:
        client.jobs("mf-")
    assert "Permission denied" in refused.value.message and "NOMAD_TOKEN" in refused.value.fix
    with NomadClient(flows) as client, pytest.raises(StackError):
        client.create_token("more", ["metaflow"])  # a flows' token hands out no tokens


@pytest.mark.docker
def test_a_job_runs_with_the_flows_token(fresh_agent: str, tmp_path: Path, base_image: str) -> None:
    cluster = configure(fresh_agent, tmp_path)
    flows = Settings(address=fresh_agent, token=cluster.token_file.read_text(), namespace=NAMESPACE)
    ending, lines = run_job(
        flows, Placement(image=base_image, memory=64, namespace=NAMESPACE), "echo placed; sleep 2"
    )  # (see test_nomad_client)
    assert ending.code == 0 and ("stdout", "placed") in lines


def test_an_agent_set_up_elsewhere_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    with nomad_double("--token", "someone-elses") as address:
        with pytest.raises(StackError) as refused:
            configure(address, tmp_path)
        assert "ACLs were set up elsewhere" in refused.value.message and "another port" in refused.value.fix
        assert not (tmp_path / "token").exists()
    with nomad_double() as address, pytest.raises(StackError) as refused:
        configure(address, tmp_path)
    assert "without ACLs answers" in refused.value.message and "another port" in refused.value.fix


def test_the_policy_is_written_once_for_any_namespace() -> None:
    assert 'namespace "ml-prod" {' in policy_rules("ml-prod") and "read-logs" in policy_rules("ml-prod")
    with pytest.raises(StackError, match="not a Nomad namespace name"):
        policy_rules('x" { policy = "write" } namespace "y')


def test_the_dev_agent_keeps_the_images_its_tasks_ran() -> None:
    """Nomad's docker driver removes an image no task uses any more; the dev agent's steps run the stack's base
    image, which with no registry exists on this machine alone, so the agent must keep it."""
    import hcl2

    from metaflow_stack.nomad.dev_cluster import dev_folder

    config = hcl2.loads((dev_folder() / "agent.hcl").read_text())
    plugins = {name.strip('"'): body for plugin in config["plugin"] for name, body in plugin.items()}
    assert plugins["docker"]["config"][0]["gc"][0]["image"] is False


def test_nomad_up_without_nomad_names_the_install(tmp_path: Path) -> None:
    if shutil.which("nomad"):
        pytest.skip("nomad is on PATH here: the real agent test below runs instead")
    env = {"METAFLOW_STACK_STATE_DIR": str(tmp_path), "METAFLOW_STACK_NOMAD_PORT": str(free_port())}
    done = run_cli("stack", "nomad", "up", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "nomad is not installed" in done.stderr and "developer.hashicorp.com/nomad/install" in done.stderr


@pytest.mark.docker
def test_nomad_up_starts_a_real_agent_that_runs_a_job_with_the_flows_token(tmp_path: Path, base_image: str) -> None:
    if not shutil.which("nomad"):
        pytest.skip("nomad not on PATH (the GitHub workflow's clusters job installs it)")
    local = LocalNomad(home=tmp_path, port=_three_free_ports())
    try:
        cluster = local.start()
        flows = Settings(address=cluster.address, token=cluster.token_file.read_text(), namespace=NAMESPACE)
        ending, lines = run_job(
            flows, Placement(image=base_image, memory=64, namespace=NAMESPACE), "echo placed; sleep 2"
        )  # (see test_nomad_client)
        assert ending.code == 0 and ("stdout", "placed") in lines
    finally:
        assert local.stop()
    assert not local.answers() and not (tmp_path / "token").exists()


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_applies_the_same_policy_and_the_service_job() -> None:
    import pulumi
    from components.nomad_stack import NomadStack, NomadStackArgs

    stack = NomadStack(
        "metaflow-nomad",
        NomadStackArgs(
            namespace="ml",
            service_image="registry.example/metaflow-stack/metadata-service:1",
            service_auth_key=pulumi.Output.secret("a-key"),
            service_variables={"instances": 1, "log_roots": ["s3://flows/metaflow"]},
        ),
    )
    assert stack.service is not None and stack.service_secrets is not None

    def check(outputs: list) -> None:
        namespace, rules, jobspec, variables, secrets = outputs
        assert namespace == "ml" and rules == policy_rules("ml")
        assert secrets == ["nomad/jobs/metadata-service", "default", {"auth_key": "a-key"}]
        assert 'job "metadata-service"' in jobspec and "nomadVar" in jobspec
        assert variables["namespace"] == "default" and variables["instances"] == "1"
        assert variables["log_roots"] == '["s3://flows/metaflow"]' and variables["image"].endswith(":1")

    done = pulumi.Output.all(
        stack.namespace.name,
        stack.policy.rules_hcl,
        stack.service.jobspec,
        stack.service.hcl2,
        pulumi.Output.all(stack.service_secrets.path, stack.service_secrets.namespace, stack.service_secrets.items),
    ).apply(lambda o: [*o[:3], o[3]["vars"], o[4]])
    pulumi.runtime.test(lambda: done.apply(check))()


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_refuses_a_service_without_a_key_or_a_bad_variable() -> None:
    from components.nomad_stack import NomadStack, NomadStackArgs

    with pytest.raises(StackError, match="needs service_auth_key"):
        NomadStack("keyless", NomadStackArgs(service_image="i:1"))
    with pytest.raises(StackError, match="must be a number"):
        NomadStack("bad", NomadStackArgs(service_image="i:1", service_variables={"instances": "two"}))
    with pytest.raises(StackError, match="flows' namespace"):
        NomadStack("shared", NomadStackArgs(service_image="i:1", service_variables={"namespace": "metaflow"}))


@pytest.mark.usefixtures("pulumi_offline")
def test_the_pulumi_component_keeps_raw_exec_out_and_the_keyless_service_startable() -> None:
    import pulumi
    from components.nomad_stack import NomadStack, NomadStackArgs

    stack = NomadStack("open", NomadStackArgs(service_image="i:1", service_variables={"insecure_no_auth": True}))
    assert stack.service_secrets is not None  # the job's template waits until its variable exists

    def check(outputs: list) -> None:
        capabilities, items = outputs
        assert capabilities["enabled_task_drivers"] == ["docker", "exec"]
        assert items == {"insecure_no_auth": "true"}

    done = pulumi.Output.all(stack.namespace.capabilities, stack.service_secrets.items)
    pulumi.runtime.test(lambda: done.apply(check))()


def _three_free_ports() -> int:
    """A port whose next two are free as well (the agent's HTTP, RPC and Serf, TCP and UDP)."""
    import socket

    for _ in range(50):
        first = free_port()
        try:
            for port in (first, first + 1, first + 2):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as probe:
                        probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no three free ports in a row on 127.0.0.1")
