"""What an attested enclave must be for its results to be trusted: a policy file, in TOML.

    [sgx]                      # an SGX enclave (Gramine): at least one of mr_enclave, mr_signer
    mr_enclave = ["33d8...fbb"]
    mr_signer = ["815f...0e6"]
    isv_prod_id = 0
    min_isv_svn = 1

    [tdx]                      # a TDX confidential VM (Phala Cloud / dstack): mr_td (its firmware), the OS
    mr_td = ["91eb...18b7"]    # image (rt_mr1: kernel, rt_mr2: command line and root file system), and the
    rt_mr1 = ["0084...9378"]   # app: the step's docker compose as its launcher prints it, with the script
    rt_mr2 = ["d833...3132"]   # Phala runs before it (both read from the app compose the replayed event log
    docker_compose = ["5f0e...c1"]     # measures), or the whole app's dstack compose hash, or an rt_mr3
    pre_launch_script = ["e3b0...55"]  # (which dstack extends with each CVM's own instance id); with an app
    kms_ca_pubkey = ["3059...a1"]      # pinned, the KMSes that may give the VM its disk key ([]: none may)

    [tcb]
    allowed_statuses = ["UpToDate", "SWHardeningNeeded"]
    allowed_advisories = ["INTEL-SA-00615"]
    allow_debug = false        # never true in production: a debug enclave's memory is readable

A measurement list allows any of its values; a TEE kind the policy has no
table for is refused. Every field is checked when the file is read, and a
mistake names it (``policy.sgx.mr_enclave[0]: ...``), so a policy that does
not say what its author meant never reaches a verification.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from metaflow_stack.errors import InvalidInput

#: The TCB statuses Intel's collateral assigns a platform, best first (a policy may allow any but the last).
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)

Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$", to_lower=True)]
Hex48 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{96}$", to_lower=True)]


def _public_key(text: str) -> str:
    """``text`` once it is a public key in DER (SubjectPublicKeyInfo) that ``cryptography`` reads: a KMS's
    secp256k1 signing key as Phala shows it (compressed), or a key pasted in another encoding, is refused here
    rather than never matching."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:
        load_der_public_key(bytes.fromhex(text))
    except (ValueError, UnsupportedAlgorithm):  # DER it cannot read; a key type or curve it does not know
        raise ValueError("is not a public key in DER (SubjectPublicKeyInfo)") from None
    return text


#: A public key in DER (SubjectPublicKeyInfo), as hex: a P-256 key's is 91 bytes.
DerHex = Annotated[
    str,
    StringConstraints(pattern=r"^(?:[0-9a-fA-F]{2}){32,1024}$", to_lower=True),
    AfterValidator(_public_key),
]
Advisory = Annotated[str, StringConstraints(pattern=r"^INTEL-SA-\d{5}$")]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SgxPolicy(_Table):
    """An SGX enclave's identity: its code (MRENCLAVE) or its signer (MRSIGNER), product and version."""

    mr_enclave: list[Hex32] = Field(default_factory=list, max_length=256)
    mr_signer: list[Hex32] = Field(default_factory=list, max_length=256)
    isv_prod_id: int | None = Field(None, ge=0, le=0xFFFF)
    min_isv_svn: int = Field(0, ge=0, le=0xFFFF)


class TdxPolicy(_Table):
    """A TDX VM's identity: its initial image (MRTD) and the runtime measurements that must match."""

    mr_td: list[Hex48] = Field(min_length=1, max_length=256)
    rt_mr0: list[Hex48] = Field(default_factory=list, max_length=256)
    rt_mr1: list[Hex48] = Field(default_factory=list, max_length=256)
    rt_mr2: list[Hex48] = Field(default_factory=list, max_length=256)
    rt_mr3: list[Hex48] = Field(default_factory=list, max_length=256)
    #: The dstack apps allowed (their compose hashes, as the CVM's event log records them in RTMR3): what
    #: the VM runs (the image, its command, the values the compose fixes), as MRENCLAVE is for SGX.
    compose_hash: list[Hex32] = Field(default_factory=list, max_length=256)
    #: The same app pinned by its parts, read from the app compose whose hash the event log records: the
    #: docker compose file the step's launcher made (SHA-256, as it prints it), so no hash is taken from
    #: Phala's API on trust; and the pre-launch script Phala runs before it (SHA-256 of its text; of the empty
    #: text when there is none), which could do anything in the VM.
    docker_compose: list[Hex32] = Field(default_factory=list, max_length=256)
    pre_launch_script: list[Hex32] = Field(default_factory=list, max_length=256)
    #: The KMSes allowed to give the VM its disk key, by their root CA's public key (DER, hex), as the event
    #: log's ``key-provider`` event records the one that did: dstack takes the key from any KMS it is pointed
    #: at unless the app compose pins one, and the disk holds the containers' layers, ``/tmp`` and swap.
    #: Needed with an app pinned (``[]``: only a key made inside the VM); ``None``: not given.
    kms_ca_pubkey: list[DerHex] | None = Field(None, max_length=256)


class TcbPolicy(_Table):
    """Which platform states are acceptable, and which advisories a non-current one may carry."""

    allowed_statuses: list[Literal[TCB_STATUSES[:-1]]] = Field(default_factory=lambda: ["UpToDate"])  # type: ignore[valid-type]
    allowed_advisories: list[Advisory] = Field(default_factory=list, max_length=1024)
    allow_debug: bool = False


class Policy(_Table):
    sgx: SgxPolicy | None = None
    tdx: TdxPolicy | None = None
    tcb: TcbPolicy = Field(default_factory=TcbPolicy)
    #: The policy's content hash, recorded with every verification (which policy said yes).
    digest: str = Field("", exclude=True)


#: Bytes a policy file may have (a few hundred measurements).
MAX_POLICY_BYTES = 1024 * 1024


def parse_policy(text: str, where: str = "policy") -> Policy:
    """The policy ``text`` says; ``InvalidInput`` naming the first field that is wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(where, f"is not TOML ({exc})", fix="see docs/confidential.md for a policy") from None
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        raise InvalidInput(field, first["msg"].removeprefix("Value error, "), fix=_fix(first["loc"])) from None
    if policy.sgx is None and policy.tdx is None:
        raise InvalidInput(where, "allows no enclave", fix="add an [sgx] or a [tdx] table")
    if policy.sgx is not None and not (policy.sgx.mr_enclave or policy.sgx.mr_signer):
        raise InvalidInput(f"{where}.sgx", "pins neither mr_enclave nor mr_signer", fix="list the enclave's MRENCLAVE")
    if policy.sgx is not None and not policy.sgx.mr_enclave and policy.sgx.isv_prod_id is None:
        raise InvalidInput(
            f"{where}.sgx.isv_prod_id",
            "is needed when only mr_signer is pinned (else any enclave by that signer passes)",
            fix="pin mr_enclave, or the product: isv_prod_id = 1",
        )
    if policy.tdx is not None:
        _check_app(policy.tdx, f"{where}.tdx")
    return policy.model_copy(update={"digest": hashlib.sha256(text.encode()).hexdigest()})


def _check_app(tdx: TdxPolicy, where: str) -> None:
    """A ``[tdx]`` table pins an app, and the OS image whose guest agent records it."""
    if not (tdx.compose_hash or tdx.docker_compose or tdx.rt_mr3):
        raise InvalidInput(
            f"{where}.docker_compose",
            "is needed (or compose_hash, or rt_mr3): else any app on that VM image passes",
            fix="list the step's docker compose digest (its launcher prints it)",
        )
    if tdx.pre_launch_script and not tdx.docker_compose:
        raise InvalidInput(
            f"{where}.docker_compose",
            "is needed with pre_launch_script: the script is checked only in an app pinned by its docker compose",
            fix="list the step's docker compose digest (its launcher prints it), or pin compose_hash alone",
        )
    if tdx.docker_compose and not tdx.pre_launch_script:
        raise InvalidInput(
            f"{where}.pre_launch_script",
            "is needed with docker_compose: the script Phala runs in the VM before the compose",
            fix="list its SHA-256 (a refusal names the one the VM ran; e3b0c442...b855 when there is none)",
        )
    if (tdx.compose_hash or tdx.docker_compose) and not (tdx.rt_mr1 and tdx.rt_mr2):
        raise InvalidInput(
            f"{where}.rt_mr1",
            "and rt_mr2 are needed with an app pinned: the kernel and root file system whose agent records it",
            fix="pin the dstack OS image's rt_mr1 and rt_mr2 (a dev image, or another kernel, could record any)",
        )
    if tdx.kms_ca_pubkey is not None and not (tdx.compose_hash or tdx.docker_compose):
        raise InvalidInput(
            f"{where}.kms_ca_pubkey",
            "is checked only in an app pinned by docker_compose or compose_hash (rt_mr3 fixes it with the rest)",
            fix="pin the app's docker_compose, or leave kms_ca_pubkey out",
        )
    if (tdx.compose_hash or tdx.docker_compose) and tdx.kms_ca_pubkey is None:
        raise InvalidInput(
            f"{where}.kms_ca_pubkey",
            "is needed with an app pinned: the KMSes that may give the VM its disk key (dstack takes any)",
            fix="list the KMS's root CA public key (DER, hex: Phala's ca_pubkey), or [] to allow only a key "
            "made inside the VM",
        )


def _fix(location: tuple) -> str:
    name = str(next((p for p in reversed(location) if isinstance(p, str)), ""))
    if name in ("mr_enclave", "mr_signer", "compose_hash", "docker_compose", "pre_launch_script"):
        return "a 32-byte measurement as 64 hex digits"
    if name == "kms_ca_pubkey":
        return "a public key in DER (SubjectPublicKeyInfo) as hex digits"
    if name.startswith(("mr_td", "rt_mr")):
        return "a 48-byte measurement as 96 hex digits"
    if name == "allowed_statuses":
        return f"one of {', '.join(TCB_STATUSES[:-1])}"
    if name == "allowed_advisories":
        return "an Intel advisory id like INTEL-SA-00615"
    return "see docs/confidential.md for a policy"


def load_policy(path: str | Path) -> Policy:
    """The policy in the file at ``path``; a missing, unreadable or oversized file is refused naming it."""
    file = Path(path)
    try:
        with file.open("rb") as stream:
            data = stream.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        raise InvalidInput(
            "policy", f"{file} does not exist", fix="policy='policies/prod.toml', a file in the flow's folder"
        ) from None
    except OSError as exc:
        raise InvalidInput("policy", f"{file} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise InvalidInput("policy", f"{file} is larger than {MAX_POLICY_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("policy", f"{file} is not UTF-8 text") from None
    return parse_policy(text, "policy")
