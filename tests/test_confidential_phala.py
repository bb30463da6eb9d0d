"""``@confidential(backend="phala")``'s client of Phala Cloud: a task's dstack app provisioned, committed with
its variables encrypted to the CVM's key (as dstack decrypts them inside), watched, attested and deleted,
against a double of Phala Cloud's API that checks each request as the service would (``tests/phala_double``,
written from Phala's SDK); mistakes and refusals in one line naming the fix. Against Phala Cloud itself
only where its API key is configured (the GitHub workflow's ``phala`` job)."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from conftest import PROJECT, need
from devservers import free_port

from metaflow_stack.confidential.phala import PhalaCloud, PhalaError, Provisioned, compose_for, encrypt_env
from metaflow_stack.errors import InvalidInput

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def phala() -> Iterator[tuple[str, str]]:
    """The double's API prefix and its key, served from 127.0.0.1 while the module runs."""
    import sys

    sys.path.insert(0, str(PROJECT / "tests" / "phala_double"))
    from server import create_app

    key, port = secrets.token_hex(16), free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(key), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/api/v1", key
    server.should_exit = True
    thread.join(timeout=10)


def test_a_task_is_deployed_watched_attested_and_deleted(phala: tuple[str, str]) -> None:
    base, key = phala
    cloud = PhalaCloud(api_key=key, base_url=base)
    env = {"METAFLOW_CODE_URL": "s3://bucket/ScoreFlow/data/ab/abc", "AWS_SECRET_ACCESS_KEY": "never in the clear"}
    compose = compose_for("metaflow-stack-base:1", ["python", "-u", "score_flow.py", "step", "score"], list(env))
    provisioned = cloud.provision("scoreflow-12-score-3", compose, list(env))
    cvm = cloud.commit(provisioned, env)
    seen = httpx.get(f"{base.removesuffix('/api/v1')}/_double/cvms/{cvm}").json()
    assert seen["env"] == env  # what the CVM decrypts at boot: exactly the variables, encrypted to its key
    assert '"/var/run/dstack.sock:/var/run/dstack.sock"' in seen["compose"]  # the task can ask for its quote
    assert cloud.commit(provisioned, env) == cvm  # committing again is the same CVM
    assert cloud.wait(cvm, {"running"}, timeout_s=10, every_s=0.01) == "running"
    assert cloud.attestation(cvm)["tcb_info"]["mrtd"].startswith("91eb2b44")
    cloud.delete(cvm)
    with pytest.raises(PhalaError, match=r"GET /cvms/.*/state: 404 CVM not found"):
        cloud.state(cvm)
    other = Provisioned(provisioned.app_id, "0" * 64, provisioned.env_public_key)
    with pytest.raises(PhalaError, match="409 compose hash differs"):
        cloud.commit(other, env)
    cloud.close()


def test_keys_and_variables_are_refused_naming_the_fix(phala: tuple[str, str], monkeypatch) -> None:
    base, _ = phala
    monkeypatch.delenv("PHALA_CLOUD_API_KEY", raising=False)
    with pytest.raises(PhalaError) as missing:
        PhalaCloud(base_url=base)
    assert (
        missing.value.message == "PHALA_CLOUD_API_KEY is not set" and "export PHALA_CLOUD_API_KEY" in missing.value.fix
    )
    with pytest.raises(PhalaError, match="Phala Cloud refused the API key"):
        PhalaCloud(api_key="wrong", base_url=base).provision("scoreflow-1", "{}", [])
    with pytest.raises(PhalaError, match="Phala Cloud is unreachable"):
        PhalaCloud(api_key="k", base_url="http://127.0.0.1:9/api/v1").state("1")
    with pytest.raises(InvalidInput, match=r"^env\.1BAD: is not a variable name dstack accepts"):
        encrypt_env({"1BAD": "x"}, "00" * 32)
    with pytest.raises(PhalaError, match="not an X25519 public key"):
        encrypt_env({"GOOD": "x"}, "zz")


def test_on_phala_cloud_itself() -> None:
    """A tiny dstack app on a real CVM: provisioned, committed, running, attested, deleted."""
    need("phala-cloud", bool(os.environ.get("PHALA_CLOUD_API_KEY")), "set PHALA_CLOUD_API_KEY (the phala job's secret)")
    cloud = PhalaCloud()
    compose = compose_for("busybox:1.36", ["sh", "-c", "echo confidential; sleep 60"], ["GREETING"])
    cvm = cloud.commit(
        cloud.provision(f"mfstack-test-{secrets.token_hex(3)}", compose, ["GREETING"]), {"GREETING": "hi"}
    )
    try:
        assert cloud.wait(cvm, {"running"}, timeout_s=900, every_s=10) == "running"
        assert cloud.attestation(cvm)["is_online"] is True
    finally:
        cloud.delete(cvm)
