"""Who holds ``@confidential``'s keys: the keyring's decisions (keys derived per flow, run and policy; nonces
it made and checks; evidence judged with its own policy, on the public SGX quote), and the key-release
service that makes them off the launching machine: a real ``metaflow confidential key-release`` over HTTP,
with a flow whose launcher never holds a key, and hostile requests answered as JSON naming the field."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from confidential_samples import IDENTITY, PINNED, SAMPLES, SGX_POLICY, flow_env, tiny_flow
from conftest import (
    DEAD_ENGINE_ENV,
    PROJECT,
    VENV_BIN,
    free_port,
    fuzz_finds_nothing,
    run_cli,
    wait_ready,
)

from metaflow_stack.confidential.attest import AttestationRefused, binding
from metaflow_stack.confidential.keyrelease import EnclaveKey
from metaflow_stack.confidential.keyring import (
    NONCE_TTL_S,
    KeeperUnavailable,
    Keyring,
    ReleaseRequest,
    RemoteKeeper,
    master_secret,
)
from metaflow_stack.confidential.policy import parse_policy
from metaflow_stack.confidential.seal import Sealed, SealedError
from metaflow_stack.errors import InvalidInput

pytest.importorskip("dcap_qvl", reason="pip install 'metaflow-stack[confidential]'")


def _keyring(master: bytes = b"m" * 32, allow_direct: bool = True, policy: str = SGX_POLICY) -> Keyring:
    def policies(name: str):
        if name != "prod":
            raise AttestationRefused("policy", f"no policy named {name!r}")
        return parse_policy(policy)

    return Keyring(master, policies, allow_direct, collateral=str(SAMPLES / "sgx_quote_collateral.json"))


def _request(nonce: str, enclave: EnclaveKey, mode: str = "direct", **changes: object) -> ReleaseRequest:
    return ReleaseRequest(identity=IDENTITY, nonce=nonce, enclave_key=enclave.public, work="a" * 64, mode=mode,
                          **changes)  # fmt: skip


def test_data_keys_are_derived_per_flow_run_and_scope_and_survive_a_restart() -> None:
    keyring = _keyring()
    key = keyring.data_key("ScoreFlow", "12", "sgx:prod@ab")
    assert len(key) == 32 and key == _keyring().data_key("ScoreFlow", "12", "sgx:prod@ab")  # another replica
    others = [("ScoreFlow", "13", "sgx:prod@ab"), ("ScoreFlow", "12", "direct"), ("ScoreFlow", "12", "sgx:dev@ab"),
              ("OtherFlow", "12", "sgx:prod@ab"), ("ScoreFlow", "12", "sgx:prod@cd"),  # the policy edited
              ("ScoreFlow1", "2", "sgx:prod@ab")]  # fmt: skip
    assert all(keyring.data_key(*other) != key for other in others)
    assert _keyring(master=b"n" * 32).data_key("ScoreFlow", "12", "sgx:prod@ab") != key
    assert keyring.public_key() == _keyring().public_key() != _keyring(master=b"n" * 32).public_key()


def test_a_direct_enclave_gets_the_direct_key_only_where_allowed() -> None:
    keyring, enclave = _keyring(), EnclaveKey()
    request = _request(keyring.nonce(), enclave)
    released = keyring.release(request)
    bound = binding(IDENTITY, request.nonce, enclave.public, request.work)
    opened = enclave.open(bytes.fromhex(released.envelope), bound, keyring.public_key(), lambda s: s == "direct")
    assert opened == keyring.data_key("ScoreFlow", "12", "direct")
    assert released.verification == {"attested": False, "mode": "direct",
                                     "why": "gramine-direct gives no quote (development only)"}  # fmt: skip
    strict = _keyring(allow_direct=False)
    with pytest.raises(AttestationRefused, match=r"^mode: direct: this keeper releases no key to an unattested"):
        strict.release(_request(strict.nonce(), enclave))


@pytest.mark.parametrize(
    ("case", "field", "says"),
    [
        ("forged", "nonce", "was not made by this key keeper"),
        ("another keeper's", "nonce", "was not made by this key keeper"),
        ("stale", "nonce", f"s old; a nonce is accepted for {NONCE_TTL_S} s"),
        ("no quote", "quote", "the TEE gave none"),
        ("no policy", "policy", "an SGX step needs one"),
        ("a TDX VM's claim on an SGX quote", "mode", "tdx, and the quote is a SGX TEE's"),
        ("unknown policy", "policy", "no policy named 'dev'"),
        ("wrong measurement", "sgx.mr_enclave", "is not one the policy allows"),
        ("expired collateral", "collateral", "is outside its validity window"),
        ("not this task's quote", "report_data", "does not bind this task"),
    ],
)
def test_every_release_that_should_not_happen_is_refused_naming_the_check(case: str, field: str, says: str) -> None:
    """The public quote is genuine and its collateral valid at ``PINNED``; it binds another program's data,
    so with every other check passed it is refused at the binding, never released."""
    policy = SGX_POLICY.replace("33d8736db756", "00d8736db756") if case == "wrong measurement" else SGX_POLICY
    keyring, now = _keyring(policy=policy), PINNED
    nonce = keyring.nonce(now=PINNED)
    changes: dict[str, object] = {"mode": "sgx", "policy": "prod", "quote": (SAMPLES / "sgx_quote").read_bytes().hex()}
    if case == "forged":
        nonce = nonce[:-2] + ("00" if nonce[-2:] != "00" else "11")
    elif case == "another keeper's":
        nonce = _keyring(master=b"x" * 32).nonce(now=PINNED)
    elif case == "stale":
        now = PINNED + NONCE_TTL_S + 5
    elif case == "no quote":
        changes["quote"] = None
    elif case == "no policy":
        changes["policy"] = None
    elif case.startswith("a TDX VM's claim"):
        changes["mode"] = "tdx"
    elif case == "unknown policy":
        changes["policy"] = "dev"
    elif case == "expired collateral":
        nonce, now = keyring.nonce(), time.time()
    with pytest.raises(AttestationRefused) as refused:
        keyring.release(_request(nonce, EnclaveKey(), **changes), now=now)
    assert refused.value.field == field and says in refused.value.message, refused.value.message


def test_a_master_secret_is_made_once_as_hex_and_a_wrong_one_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"master_key: .* cannot be read: No such file"):
        master_secret(tmp_path / "master.key")  # a file a user names is never made up
    first = master_secret(tmp_path / "master.key", make=True)
    assert len(first) == 32 and master_secret(tmp_path / "master.key") == first
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "master.key").read_text() == first.hex()  # what `openssl rand -hex 32` gives
    (tmp_path / "short.key").write_text("abcd")
    with pytest.raises(InvalidInput, match=r"master_key: .* does not hold 64 hex digits"):
        master_secret(tmp_path / "short.key")


# -- the service ----------------------------------------------------------------------------------------------


def _serve(folder: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (folder / f"key-release-{port}.log").open("wb")
    server = subprocess.Popen(
        [str(VENV_BIN / "metaflow"), "confidential", "key-release", "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "METAFLOW_STACK_STATE_DIR": str(folder / "state"),
                                                   **(env or {})},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(url, 60):
        server.kill()  # never left running behind a failed test
        server.wait(timeout=30)
        pytest.fail((folder / f"key-release-{port}.log").read_text()[-3000:])
    return server, url


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A key-release service with the ``prod`` policy and a master key file, direct mode allowed."""
    folder = tmp_path_factory.mktemp("key-release")
    (folder / "policies").mkdir()
    (folder / "policies" / "prod.toml").write_text(SGX_POLICY)
    (folder / "master.key").write_text("ab" * 32)
    server, url = _serve(folder, "--policies", str(folder / "policies"), "--master-key-file",
                         str(folder / "master.key"), "--allow-direct",
                         "--collateral", str(SAMPLES / "sgx_quote_collateral.json"))  # fmt: skip
    try:
        yield url, folder
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_service_releases_to_the_enclave_it_judged_and_names_every_refusal(service: tuple[str, Path]) -> None:
    url, folder = service
    keeper, enclave = RemoteKeeper(url, None), EnclaveKey()
    request = _request(keeper.nonce(), enclave)
    released = keeper.release(request)
    master = bytes.fromhex((folder / "master.key").read_text())
    bound = binding(IDENTITY, request.nonce, enclave.public, request.work)
    service_keyring = Keyring(master, lambda name: None, True)
    assert keeper.public_key() == service_keyring.public_key()
    expected = service_keyring.data_key("ScoreFlow", "12", "direct")
    assert enclave.open(bytes.fromhex(released.envelope), bound, keeper.public_key(), lambda s: True) == expected
    with pytest.raises(SealedError, match="made for another enclave or attempt"):  # the launcher cannot open it
        EnclaveKey().open(bytes.fromhex(released.envelope), bound, keeper.public_key(), lambda s: True)
    quote = (SAMPLES / "sgx_quote").read_bytes().hex()
    with pytest.raises(AttestationRefused, match=r"^collateral: is outside its validity window") as refused:
        keeper.release(_request(keeper.nonce(), enclave, mode="sgx", policy="prod", quote=quote))
    assert refused.value.field == "collateral"  # judged with the service's own policy and collateral
    with pytest.raises(AttestationRefused, match="no policy named 'lenient'"):
        keeper.release(_request(keeper.nonce(), enclave, mode="sgx", policy="lenient", quote=quote))
    answer = httpx.post(f"{url}/v1/releases", json={**request.model_dump(), "nonce": "f" * 64}).json()
    assert answer["code"] == "attestation_refused" and answer["details"] == {"field": "nonce"}
    assert httpx.get(f"{url}/v1/policies").json()[0]["name"] == "prod"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'key_release_decisions_total{mode="direct",outcome="released"} 1.0' in metrics
    assert 'key_release_decisions_total{mode="sgx",outcome="collateral"} 1.0' in metrics
    log = "".join(p.read_text() for p in folder.glob("key-release-*.log"))
    assert "released ScoreFlow/12/score/3 attempt 0" in log and "ab" * 32 not in log  # decisions, never keys


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ("{", "body"),
        ("[" * 10_000 + "]" * 10_000, "body"),
        ({"quote": "abc"}, "quote"),
        ({"identity": None}, "identity"),
        ({"identity": {**IDENTITY.model_dump(), "run": "../etc"}}, "identity.run"),
        ({"identity": {**IDENTITY.model_dump(), "attempt": 10**9}}, "identity.attempt"),
        ({"mode": "sev"}, "mode"),
        ({"policy": "../../etc/passwd"}, "policy"),
        ({"quote": "zz"}, "quote"),
        ({"enclave_key": "00" * 40}, "enclave_key"),
    ],
)
def test_a_malformed_request_is_json_naming_the_field(service: tuple[str, Path], changes: object, names: str) -> None:
    url, _ = service
    if isinstance(changes, str):
        answer = httpx.post(f"{url}/v1/releases", content=changes, headers={"content-type": "application/json"})
    else:
        answer = httpx.post(f"{url}/v1/releases", json={**_request("0" * 64, EnclaveKey()).model_dump(), **changes})
    assert answer.status_code == 400 and answer.headers["content-type"] == "application/json", answer.text
    assert answer.json()["details"]["parameter"] == names, answer.json()


def test_the_services_own_policy_files_are_listed_with_what_is_wrong_with_them(tmp_path: Path) -> None:
    """A policy file that does not parse is the service's fault (503 for the requests held to it, named in the
    listing), not the caller's; one that pins only mr_signer is listed with a warning."""
    from fastapi.testclient import TestClient

    from metaflow_stack.confidential.service import KeyReleaseConfig, create_app

    (tmp_path / "weak.toml").write_text('[sgx]\nmr_signer = ["' + "ab" * 32 + '"]\nisv_prod_id = 1\n')
    (tmp_path / "broken.toml").write_text('[sgx]\nmr_enclave = ["x"]\n')
    app = create_app(KeyReleaseConfig(master=b"m" * 32, policies=tmp_path))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        listed = {p["name"]: p for p in client.get("/v1/policies").json()}
        assert "String should match pattern" in listed["broken"]["error"] and listed["broken"]["digest"] is None
        assert listed["weak"]["warning"].startswith("pins only mr_signer") and len(listed["weak"]["digest"]) == 64
        nonce = client.post("/v1/nonces").json()["nonce"]
        quote = (SAMPLES / "sgx_quote").read_bytes().hex()
        body = _request(nonce, EnclaveKey(), mode="sgx", policy="broken", quote=quote).model_dump()
        answer = client.post("/v1/releases", json=body)
        assert answer.status_code == 503 and answer.json()["code"] == "policy_unreadable"


def test_a_body_over_the_limit_is_refused_before_it_is_read_declared_or_streamed(service: tuple[str, Path]) -> None:
    url, _ = service
    from metaflow_stack.confidential.dstack_app import MAX_EVENT_LOG_BYTES
    from metaflow_stack.confidential.service import MAX_BODY_BYTES

    declared = httpx.post(f"{url}/v1/releases", content=b"x" * (MAX_BODY_BYTES + 1))
    assert declared.status_code == 413 and declared.json()["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
        for _ in range(MAX_BODY_BYTES // 10_000 + 1):
            yield b"x" * 10_000

    streamed = httpx.post(f"{url}/v1/releases", content=chunks())
    assert streamed.status_code == 413 and streamed.json()["code"] == "payload_too_large"
    # A TDX VM's request with the largest event log taken is within the limit: judged, not refused for its size.
    tdx = {
        **_request("0" * 64, EnclaveKey()).model_dump(),
        "mode": "tdx",
        "event_log": "[" + " " * (MAX_EVENT_LOG_BYTES - 2) + "]",
    }
    judged = httpx.post(f"{url}/v1/releases", json={**tdx, "quote": (SAMPLES / "tdx_quote").read_bytes().hex()})
    assert judged.status_code == 403 and judged.json()["details"]["field"] == "nonce", judged.text


def test_a_pccs_that_never_answers_does_not_stall_the_service(tmp_path: Path) -> None:
    """Quotes whose collateral must be fetched from a PCCS that accepts and never answers: each waits in a
    worker thread, so the probes and new nonces answer at once meanwhile."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "prod.toml").write_text(SGX_POLICY)
    pccs = f"http://127.0.0.1:{silent.getsockname()[1]}"
    server, url = _serve(tmp_path, "--policies", str(tmp_path / "policies"), "--pccs-url", pccs)
    pool = concurrent.futures.ThreadPoolExecutor(16)
    try:
        keeper = RemoteKeeper(url, None)
        quote = (SAMPLES / "sgx_quote").read_bytes().hex()
        requests = [_request(keeper.nonce(), EnclaveKey(), mode="sgx", policy="prod", quote=quote) for _ in range(16)]
        pending = [pool.submit(httpx.post, f"{url}/v1/releases", json=r.model_dump(), timeout=90) for r in requests]
        time.sleep(1)
        assert not any(p.done() for p in pending)  # all waiting on the silent PCCS
        started = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200 and keeper.nonce()
        assert time.monotonic() - started < 1.0
    finally:
        server.kill()
        server.wait(timeout=30)
        pool.shutdown(wait=True, cancel_futures=True)
        silent.close()


def test_the_service_refuses_to_serve_beyond_loopback_without_a_key_and_checks_it(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    done = run_cli("confidential", "key-release", "--policies", str(tmp_path / "policies"), "--host", "0.0.0.0")
    assert done.returncode == 1 and "would let anyone who reaches it read and write without a key" in done.stderr
    assert "Traceback" not in done.stderr
    server, url = _serve(tmp_path, "--policies", str(tmp_path / "policies"),
                         env={"METAFLOW_STACK_KEY_RELEASE_AUTH_KEY": "k" * 32})  # fmt: skip
    try:
        assert httpx.post(f"{url}/v1/nonces").status_code == 401
        assert len(RemoteKeeper(url, "k" * 32).nonce()) == 64
        with pytest.raises(AttestationRefused, match="answered 401: missing or wrong key") as refused:
            RemoteKeeper(url, "wrong").nonce()  # final: a retry would send the same key
        assert refused.value.field == "key_release"
        rebound = httpx.post(f"{url}/v1/nonces", headers={"host": "evil.example", "x-api-key": "k" * 32})
        assert rebound.status_code == 403 and rebound.json()["code"] == "forbidden_host"
    finally:
        server.terminate()
        server.wait(timeout=30)
    with pytest.raises(KeeperUnavailable, match="cannot be reached"):  # gone: nothing judged, retryable
        RemoteKeeper(url, None).nonce()


@pytest.mark.parametrize("answer", ["endless", "dribbled"])
def test_a_keeper_that_answers_without_end_is_one_line_in_bounded_memory(answer: str) -> None:
    """Something other than the key-release service at its URL (or a broken proxy) may answer without end,
    or a byte now and then: the launcher stops at 1 MiB, or at its deadline, and says so in one retryable
    line, instead of reading on (a launcher holds no key, so this is all such a peer can do to it)."""
    import http.server
    import threading

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"nonce": "')
            try:
                while True:  # until the launcher hangs up
                    self.wfile.write(b"a" * (1 << 16) if answer == "endless" else b"a")
                    time.sleep(0 if answer == "endless" else 0.05)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    keeper = RemoteKeeper(f"http://127.0.0.1:{server.server_address[1]}", None)
    keeper.TRIES, keeper.TIMEOUT_S = 1, 1.0  # one try, and a deadline the dribble passes (each read answers)
    try:
        started = time.monotonic()
        with pytest.raises(KeeperUnavailable, match="over 1 MB" if answer == "endless" else "not whole in time"):
            keeper.nonce()
        assert time.monotonic() - started < 10
    finally:
        keeper.close()
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(service: tuple[str, Path], tmp_path: Path) -> None:
    report = fuzz_finds_nothing(service[0], tmp_path, examples=30)
    assert "Tested: 7" in report  # every operation


# -- a flow whose launcher holds no key --------------------------------------------------------------------


def _run_flow(root: Path, url: str, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = flow_env(root, METAFLOW_STACK_KEY_RELEASE_URL=url)
    if key:
        env["METAFLOW_STACK_KEY_RELEASE_AUTH_KEY"] = key
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_up_with_key_release_keeps_the_keys_a_flows_launcher_no_longer_holds(tmp_path: Path) -> None:
    """`just up --with key-release`, then the example flow with the lines it prints: sealed under the service's
    key (its master key in the stack's state folder, mode 0600), none kept by the launcher; `down` stops it."""
    stack = tmp_path / "stack"
    env = {**DEAD_ENGINE_ENV, "METAFLOW_STACK_STATE_DIR": str(stack), "METAFLOW_STACK_SERVICE_PORT": str(free_port()),
           "METAFLOW_STACK_KEY_RELEASE_PORT": str(free_port())}  # fmt: skip
    up = run_cli("stack", "up", "--with", "key-release", env=env)
    try:
        assert up.returncode == 0, up.stderr
        export = next(line for line in up.stdout.splitlines() if "METAFLOW_STACK_KEY_RELEASE_URL" in line)
        url = export.split("METAFLOW_STACK_KEY_RELEASE_URL=")[1].split()[0]
        key = (stack / "key-release" / "auth-key").read_text()
        assert f'METAFLOW_STACK_KEY_RELEASE_AUTH_KEY="$(cat {stack / "key-release" / "auth-key"})"' in export
        assert key not in up.stdout and oct((stack / "key-release" / "auth-key").stat().st_mode & 0o777) == "0o600"
        assert httpx.post(f"{url}/v1/nonces").status_code == 401  # keyed
        # with a key of its own: not the stack's, which every task of a run on the stack's service holds
        stacks = {"x-api-key": (stack / "auth-key").read_text()}
        assert httpx.post(f"{url}/v1/nonces", headers=stacks).status_code == 401
        flows = tmp_path / "flows"
        (flows / ".metaflow").mkdir(parents=True)
        shutil.copy(PROJECT / "examples" / "confidential_inference.py", flows)
        done = _run_flow(flows, url, "confidential_inference.py", "run", "--patients", "8", key=key)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        down = run_cli("stack", "down", env=env)
    assert "key release stopped (its master key is kept)" in down.stderr
    assert not (flows / "state" / "confidential" / "keeper").exists()  # no master secret, no data key here
    script = """import json
from metaflow import Flow, namespace
namespace(None)
run = Flow("ConfidentialInferenceFlow").latest_run
sealed = run["score"].task["predictions"].data
print(json.dumps([run.id, type(sealed).__name__, sealed.where, sealed.blob.hex()]))
"""
    local = {**os.environ, "METAFLOW_DEFAULT_METADATA": "local"}
    listed = subprocess.run([sys.executable, "-c", script], cwd=flows, capture_output=True, text=True, env=local)
    run_id, kind, where, blob = json.loads(listed.stdout.splitlines()[-1])
    master_file = stack / "key-release" / "master.key"
    assert kind == "Sealed" and master_file.stat().st_mode & 0o777 == 0o600
    master = bytes.fromhex(master_file.read_text())
    data_key = Keyring(master, lambda name: None, True).data_key("ConfidentialInferenceFlow", run_id, "direct")
    assert len(pickle.loads(Sealed(bytes.fromhex(blob), where).open(data_key))) == 8  # under the service's key


@pytest.mark.slow
def test_a_service_that_allows_no_direct_enclave_stops_the_task_before_its_code_runs(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    server, url = _serve(tmp_path, "--policies", str(tmp_path / "policies"))
    (tmp_path / ".metaflow").mkdir()
    tiny_flow(tmp_path, "@confidential", body='print("the step\'s code ran")')
    try:
        done = _run_flow(tmp_path, url, "tiny_flow.py", "run")
    finally:
        server.terminate()
        server.wait(timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "mode: direct: this keeper releases no key to an unattested enclave" in output
    assert "the step's code ran" not in output


def test_a_launcher_sends_the_stacks_key_release_its_own_key_and_no_other_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without METAFLOW_STACK_KEY_RELEASE_AUTH_KEY, a launcher sends the key `up` made for the stack's
    key-release service only where that service runs and listens (whatever its port); anything else on
    this machine (a service started by hand, or what took the port after `down`) gets the key it was
    started with (METAFLOW_STACK_AUTH_KEY); a service elsewhere, nothing unless told; a URL whose port is
    no port, no traceback."""
    from metaflow_stack.confidential.keyring import service_key
    from metaflow_stack.confidential.local_service import LocalKeyRelease
    from metaflow_stack.daemon import port_taken

    monkeypatch.setenv("METAFLOW_STACK_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("METAFLOW_STACK_KEY_RELEASE_AUTH_KEY", raising=False)
    monkeypatch.setenv("METAFLOW_STACK_AUTH_KEY", "by-hand")
    stacks, port, other = LocalKeyRelease(), free_port(), free_port()
    stacks.key_path.parent.mkdir(parents=True)
    stacks.key_path.write_text("the-services-own\n")
    listening = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]  # (its process, as up's)
    assert stacks.daemon.start(listening, lambda: port_taken(port), 30, ports=(port,), port_fix="", stop_fix="")
    try:
        assert service_key(f"http://127.0.0.1:{port}") == "the-services-own"
        assert service_key(f"http://127.0.0.1:{other}") == "by-hand"
    finally:
        assert stacks.daemon.stop()
    assert service_key(f"http://127.0.0.1:{port}") == "by-hand"
    assert service_key("http://127.0.0.1:99999") == "by-hand"
    assert service_key("http://keeper.example:8325") is None
    monkeypatch.setenv("METAFLOW_STACK_KEY_RELEASE_AUTH_KEY", "told")
    assert service_key("http://keeper.example:8325") == service_key(f"http://127.0.0.1:{port}") == "told"
