"""``@confidential(backend="phala")`` running a flow's step: the step's dstack app provisioned on a double of
Phala Cloud that runs each committed CVM's task as a container of the local engine, with a double of dstack's
guest agent on the socket the compose mounts (``tests/phala_double``). The task fetches its code package from
a real S3 server (moto, on the Docker bridge), checks it against the digest its compose fixes before unpacking
it, asks dstack for
a quote bound to its attempt and puts its evidence in the datastore; the launcher judges it there. The
agent's quote is the public TDX sample, genuine but bound to other data and checked against collateral that
has expired, so the keeper refuses it: the task gets no key, the step's code never runs, the run fails with
the refusal in one line, and the CVM is deleted. A quote a real TDX VM makes for the task is the GitHub
workflow's ``phala`` job's (a Phala Cloud account)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from confidential_samples import SAMPLES, flow_env
from devservers import phala_double

from metaflow_stack.confidential.dstack_app import app_parts

pytest.importorskip("dstack_sdk")

FLOW = """from metaflow import FlowSpec, confidential, step, timeout


class CvmFlow(FlowSpec):
    @step
    def start(self):
        self.records = [1, 2, 3]
        self.next(self.score)

    @confidential(backend="phala", policy="tdx.toml", collateral="tdx_quote_collateral.json")
    @timeout(minutes=20)
    @step
    def score(self):
        print("the step's code ran")
        self.total = sum(self.records)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CvmFlow()
"""
TDX_MR_TD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"


def test_a_step_runs_in_a_cvm_and_its_evidence_is_judged_before_its_code_runs(
    tmp_path: Path, docker_engine, bridge_s3: str, local_registry: str
) -> None:
    import boto3

    (tmp_path / "cvm_flow.py").write_text(FLOW)
    (tmp_path / "tdx.toml").write_text(f'[tdx]\nmr_td = ["{TDX_MR_TD}"]\nrt_mr3 = ["{"0" * 96}"]\n')
    shutil.copy(SAMPLES / "tdx_quote_collateral.json", tmp_path)
    root = f"s3://sandbox/phala-{uuid.uuid4().hex[:8]}"
    with phala_double(docker_engine) as (base, key):
        double = base.removesuffix("/api/v1") + "/_double"
        left = _left_behind(base, key, tmp_path / "state")
        kms = httpx.get(f"{double}/kms").json()
        env = flow_env(
            tmp_path, METAFLOW_S3_ENDPOINT_URL=bridge_s3, PHALA_CLOUD_API_KEY=key, PHALA_CLOUD_API_PREFIX=base,
            METAFLOW_STACK_PHALA_KMS_SIGNER=kms["k256_pubkey"],
        )  # fmt: skip
        done = subprocess.run(
            [sys.executable, "cvm_flow.py", "--datastore", "s3", "--datastore-root", root, "run"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        (cvm,) = httpx.get(f"{double}/deleted").json()  # the step's one CVM, deleted once its evidence was refused
        assert httpx.get(f"{double}/cvms").json() == []  # and the one left behind, deleted at the run's start
    said = done.stdout + done.stderr  # the task's lines, the trampoline's among them, as Metaflow's runtime shows them
    assert f"deleted CVM(s) {left}: their launchers were killed outright" in said, said[-5000:]
    assert "1800 s to boot, 1200 s to run" in said  # the step's @timeout, once booted: a pod's deadline
    assert done.returncode != 0 and "error: collateral: is outside its validity window" in said, said[-5000:]
    assert "the step's code ran" not in done.stdout + done.stderr + cvm["logs"]
    # The CVM asked dstack for one quote, over 64 bytes binding its attempt (never what the host chose).
    assert len(cvm["asked"]) == 1 and len(bytes.fromhex(cvm["asked"][0])) == 64, cvm["logs"]
    # The compose fixes what a policy pins; the order and the datastore's credentials came encrypted.
    service = json.loads(cvm["compose"])["services"]["task"]
    assert service["environment"]["METAFLOW_STACK_CONFIDENTIAL_MODE"] == "tdx"
    assert len(service["environment"]["METAFLOW_STACK_CONFIDENTIAL_KEEPER"]) == 64
    assert service["environment"]["METAFLOW_STACK_CONFIDENTIAL_STEP"] == "score"
    assert json.loads(cvm["env"]["METAFLOW_STACK_CONFIDENTIAL_SETTINGS"])["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert service["image"].startswith(f"{local_registry}/metaflow-stack/confidential@sha256:")  # its content
    order = json.loads(cvm["env"]["METAFLOW_STACK_CONFIDENTIAL_ORDER"])
    assert order["identity"]["step"] == "score" and cvm["env"]["MF_TASK_ID"] == order["identity"]["task"]
    # Its evidence, and the refusal, went through the run's datastore: the only thing it shares with here.
    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=bridge_s3)
    found = {
        o["Key"].rsplit("/", 1)[-1]: o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    }
    evidence = json.loads(s3.get_object(Bucket=bucket, Key=found["evidence.json"])["Body"].read())
    assert evidence["quote"] == (SAMPLES / "tdx_quote").read_bytes().hex() and "compose-hash" in evidence["event_log"]
    # With it, the app compose dstack measured (the guest agent's bytes, Phala's additions around the step's
    # docker compose): what a policy's docker_compose is checked against, the digest the launcher printed.
    app_compose = evidence["app_compose"]
    events = {entry["event"]: entry["event_payload"] for entry in json.loads(evidence["event_log"])}
    assert hashlib.sha256(app_compose.encode()).hexdigest() == events["compose-hash"]
    digest = hashlib.sha256(cvm["compose"].encode()).hexdigest()
    assert json.loads(app_compose)["docker_compose_file"] == cvm["compose"] and f"docker compose {digest}" in said
    assert app_parts(app_compose, events["compose-hash"])["docker_compose"] == digest
    # And where its disk key came from, as dstack records it: the KMS, by its root CA key (what a policy pins).
    assert json.loads(bytes.fromhex(events["key-provider"])) == {"name": "kms", "id": kms["ca_pubkey"]}
    assert b"collateral" in s3.get_object(Bucket=bucket, Key=found["refused.txt"])["Body"].read()
    assert "key.envelope" not in found


def _left_behind(base: str, key: str, state: Path) -> str:
    """A CVM committed on the double and noted in ``state`` by a launcher that is gone (a process that noted
    it and ended, as one killed outright does); its name. Its variables do not decrypt: it never boots, so
    the double runs nothing for it."""
    from metaflow_stack.confidential.phala import VERSION, PhalaCloud, compose_for

    name = "leftflow-1-start-1-0"
    with httpx.Client(base_url=base, headers={"X-API-Key": key, "X-Phala-Version": VERSION}) as api:
        cloud = PhalaCloud(api_key=key, base_url=base)
        provisioned = cloud.provision(name, compose_for("busybox:1.36", ["true"], []), [])
        cloud.close()
        body = {"app_id": provisioned.app_id, "compose_hash": provisioned.compose_hash, "encrypted_env": "00"}
        cvm = api.post("/cvms", json=body | {"env_keys": []}).json()["id"]
    note = "import sys; from pathlib import Path; from metaflow_stack.confidential.ledger import Ledger; "
    note += "Ledger(Path(sys.argv[1])).launched(*sys.argv[2:])"
    subprocess.run(
        [sys.executable, "-c", note, str(state), base, provisioned.app_id, cvm, name], check=True, timeout=60
    )
    return name
