"""Attestation verified before a confidential step's results are trusted.

A quote is the TEE's signed statement of what runs in it (measurements)
and of 64 bytes the code inside chose (``report_data``). Trusting one takes
three checks, in this order, each refusal naming what failed:

1. **The quote is genuine**: its signature chain and the platform's TCB,
   checked by ``dcap-qvl`` (Intel's DCAP verification, in Rust) against
   collateral: a file given offline, a cached copy, or fetched from a PCCS.
   A tampered byte, a collateral outside its validity window and a revoked
   platform all stop here.
2. **It is the enclave the policy allows** (``policy``): a TCB status and
   advisories the policy accepts, no debug enclave, and measurements
   (MRENCLAVE/MRSIGNER and ISV SVN for SGX; MRTD and RTMRs for TDX) on its
   lists. The measurements are read from the verified report, never from
   the unverified bytes. A dstack CVM's app (its compose hash) is read from
   its event log only once that log replays to the verified RTMR3; its
   parts (``app_parts``) from the app compose that hash is of.
3. **It speaks for this task**: ``report_data`` must equal ``binding()`` of
   the flow, run, step, task, attempt, the code package's digest, the
   launcher's fresh nonce, the enclave's own public key and the work it
   ran (its command and variables). A quote from another task, another
   attempt, other code, other work, or an earlier launch (a replay) is
   refused.

Only then is a ``Verification`` returned, recorded in the task's metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from metaflow_stack.confidential.dstack_app import app_of
from metaflow_stack.confidential.policy import Policy
from metaflow_stack.confidential.refusal import AttestationRefused, allowed

#: The PCCS asked for collateral when none is given (Phala's public one; Intel's PCS also works).
DEFAULT_PCCS_URL = "https://pccs.phala.network"
#: Seconds a PCCS has to answer for collateral: a PCCS that hangs must not hold a verification forever.
COLLATERAL_TIMEOUT_S = 30
#: Bytes a quote may have (an SGX quote is about 4.6 KB, a TDX one about 5 KB, with certificates).
MAX_QUOTE_BYTES = 64 * 1024
#: TD attributes' DEBUG bit (bit 0), and SGX attributes' DEBUG flag (bit 1).
_TD_DEBUG = 0x01
_SGX_DEBUG = 0x02


class Verification(BaseModel):
    """What was verified, as recorded in the task's metadata and shown by the UI and the agent."""

    tee: Literal["sgx", "tdx"]
    status: str
    advisory_ids: list[str]
    measurements: dict[str, str | int]
    report_data: str
    policy_digest: str
    verified_at: int


_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,254}$"  # flows and steps: Python identifiers, as Metaflow names them
_ID = r"^[^\s/\x00-\x1f\x7f]{1,255}$"  # runs and tasks: Metaflow's ids (``ids``)


class TaskIdentity(BaseModel):
    """Which attempt of which task, running which code: what a quote must answer for."""

    flow: Annotated[str, StringConstraints(pattern=_NAME)]
    run: Annotated[str, StringConstraints(pattern=_ID)]
    step: Annotated[str, StringConstraints(pattern=_NAME)]
    task: Annotated[str, StringConstraints(pattern=_ID)]
    attempt: int = Field(ge=0, le=99)
    code_digest: str = Field(min_length=1, max_length=128)
    #: A resumed run's first run of its chain of resumes, whose data key it takes (``lineage``); None for a run
    #: that is no resume.
    lineage: Annotated[str, StringConstraints(pattern=_ID)] | None = None


def binding(identity: TaskIdentity, nonce: str, enclave_key: str = "", work: str = "") -> bytes:
    """The 64 bytes a confidential task puts in its quote's ``report_data``: SHA-512 of the task's identity
    and code, the launcher's nonce, the enclave's public key (hex) and the digest of the work it was ordered
    to do (the command and variables it ran), so the quote answers for this attempt of this task doing
    exactly that, and the key a data key is released to is the enclave's own."""
    bound = {**identity.model_dump(exclude_none=True), "nonce": nonce, "enclave_key": enclave_key, "work": work}
    return hashlib.sha512(json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()).digest()


def new_nonce() -> str:
    """A launcher's fresh nonce for one attempt (never reused: that is what makes a replay detectable)."""
    return os.urandom(32).hex()


def collateral_for(
    quote: bytes, given: str | Path | None = None, pccs_url: str | None = None, cache: Path | None = None
) -> Any:
    """The collateral ``quote`` is verified against: the JSON file ``given``, else a cached copy for the
    quote's platform (FMSPC), else fetched from ``pccs_url`` and cached; ``AttestationRefused`` naming
    ``collateral`` when none can be had."""
    import dcap_qvl

    if given is not None:
        try:
            return dcap_qvl.QuoteCollateralV3.from_json(Path(given).read_text())
        except (OSError, ValueError) as exc:
            raise AttestationRefused("collateral", f"{given} cannot be used: {_first_line(exc)}") from None
    url = pccs_url_of(pccs_url)
    cached = (cache / cache_name(quote, url)) if cache is not None else None
    if cached is not None and cached.is_file():
        with contextlib.suppress(OSError, ValueError):  # an unreadable copy is fetched again
            return dcap_qvl.QuoteCollateralV3.from_json(cached.read_text())

    async def fetch() -> Any:  # dcap-qvl's fetch is a coroutine of its own event loop's
        return await asyncio.wait_for(dcap_qvl.get_collateral(url, quote), COLLATERAL_TIMEOUT_S)

    try:
        collateral = asyncio.run(fetch())
    except Exception as exc:  # the PCCS's own errors: unreachable, unknown platform, too slow
        reason = f"no answer in {COLLATERAL_TIMEOUT_S} s" if isinstance(exc, TimeoutError) else _first_line(exc)
        raise AttestationRefused(
            "collateral",
            f"cannot be fetched from {url}: {reason}",
            fix="give collateral= a file, or reach a PCCS",
        ) from None
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staged = cached.with_name(f".{cached.name}.{os.urandom(8).hex()}")  # threads of one process share a pid
        staged.write_text(collateral.to_json())
        staged.replace(cached)  # whole, or not there
    return collateral


def pccs_url_of(given: str | None) -> str:
    """The PCCS collateral is fetched from: ``given``, else ``METAFLOW_STACK_PCCS_URL``, else Phala's."""
    return given or os.environ.get("METAFLOW_STACK_PCCS_URL") or DEFAULT_PCCS_URL


def cache_name(quote: bytes, pccs_url: str) -> str:
    """Where collateral for ``quote`` from ``pccs_url`` is cached: per PCCS, TEE kind and platform (FMSPC)."""
    parsed = _parsed(quote)
    try:
        platform = parsed.fmspc()  # (read from the quote's certificates, which parsing the quote did not check)
    except ValueError as exc:
        raise AttestationRefused("quote", f"names no platform: {_first_line(exc)}") from None
    return f"{hashlib.sha256(pccs_url.encode()).hexdigest()[:12]}-{parsed.quote_type()}-{platform}.json"


def quote_kind(quote: bytes) -> str:
    """``sgx`` or ``tdx``: the kind of TEE ``quote`` says it is from (read, not yet verified)."""
    return str(_parsed(quote).quote_type()).lower()


def _first_line(exc: Exception) -> str:
    text = str(exc).removeprefix("Verification failed: ").strip()
    return (text.splitlines() or [type(exc).__name__])[0]


def _parsed(quote: bytes) -> Any:
    import dcap_qvl

    if not quote or len(quote) > MAX_QUOTE_BYTES:
        raise AttestationRefused("quote", f"is {len(quote):,} bytes, not a quote")
    try:
        return dcap_qvl.parse_quote(quote)
    except ValueError as exc:
        raise AttestationRefused("quote", f"cannot be read: {_first_line(exc)}") from None


def verify(
    quote: bytes,
    collateral: Any,
    policy: Policy,
    expected: bytes,
    now: int | None = None,
    event_log: str | None = None,
    app_compose: str | None = None,
) -> Verification:
    """``quote`` checked against ``collateral`` at ``now`` (epoch seconds; default: this moment), then
    ``policy`` (a TDX quote's app read from ``event_log`` and ``app_compose``, dstack's), then bound to
    ``expected`` (``binding()``); ``AttestationRefused`` naming the first failure."""
    import dcap_qvl

    _parsed(quote)
    moment = int(time.time()) if now is None else now
    try:
        verified = json.loads(dcap_qvl.verify(quote, collateral, moment).to_json())
    except ValueError as exc:
        reason = _first_line(exc)
        if reason.startswith("CrlExpired") or "expired" in reason.lower():
            raise AttestationRefused("collateral", f"is outside its validity window ({reason.split(' ')[0]})",
                                     fix="fetch fresh collateral from the PCCS") from None  # fmt: skip
        raise AttestationRefused("quote", f"is not genuine: {reason}") from None
    report = verified["report"]
    if "SgxEnclave" in report:
        tee, measured = "sgx", report["SgxEnclave"]
    else:
        tee, measured = "tdx", next(iter(report.values()))
    status, advisories = verified["status"], verified.get("advisory_ids") or []
    _check_tcb(policy, status, advisories)
    if tee == "sgx":
        measurements = _check_sgx(policy, measured)
    else:
        measurements = _check_tdx(policy, measured, event_log, app_compose)
    found = bytes.fromhex(measured["report_data"])
    if not hmac.compare_digest(found, expected):
        raise AttestationRefused(
            "report_data", "does not bind this task (a quote made for another task or attempt, or replayed)"
        )
    return Verification(
        tee=tee,
        status=status,
        advisory_ids=advisories,
        measurements=measurements,
        report_data=found.hex(),
        policy_digest=policy.digest,
        verified_at=moment,
    )


def _check_tcb(policy: Policy, status: str, advisories: list[str]) -> None:
    if status not in policy.tcb.allowed_statuses:
        raise AttestationRefused(
            "tcb.status", f"{status} is not allowed (the policy allows {', '.join(policy.tcb.allowed_statuses)})"
        )
    unexpected = sorted(set(advisories) - set(policy.tcb.allowed_advisories))
    if unexpected:
        raise AttestationRefused("tcb.advisories", f"{', '.join(unexpected)} not allowed by the policy")


def _check_sgx(policy: Policy, measured: dict[str, Any]) -> dict[str, str | int]:
    rules = policy.sgx
    if rules is None:
        raise AttestationRefused("tee", "an SGX enclave, and the policy has no [sgx] table")
    flags = int.from_bytes(bytes.fromhex(measured["attributes"])[:8], "little")
    if flags & _SGX_DEBUG and not policy.tcb.allow_debug:
        raise AttestationRefused("debug", "a debug enclave (its memory can be read from outside)")
    allowed("sgx.mr_enclave", measured["mr_enclave"], rules.mr_enclave)
    allowed("sgx.mr_signer", measured["mr_signer"], rules.mr_signer)
    if rules.isv_prod_id is not None and measured["isv_prod_id"] != rules.isv_prod_id:
        raise AttestationRefused("sgx.isv_prod_id", f"{measured['isv_prod_id']} is not {rules.isv_prod_id}")
    if measured["isv_svn"] < rules.min_isv_svn:
        raise AttestationRefused("sgx.isv_svn", f"{measured['isv_svn']} is below {rules.min_isv_svn}")
    return {k: measured[k] for k in ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn")}


def _check_tdx(
    policy: Policy, measured: dict[str, Any], event_log: str | None, app_compose: str | None
) -> dict[str, str | int]:
    rules = policy.tdx
    if rules is None:
        raise AttestationRefused("tee", "a TDX VM, and the policy has no [tdx] table")
    if (
        int.from_bytes(bytes.fromhex(measured["td_attributes"])[:1], "little") & _TD_DEBUG
        and not policy.tcb.allow_debug
    ):
        raise AttestationRefused("debug", "a debug TD (its memory can be read from outside)")
    names = ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3")
    for name in names:
        allowed(f"tdx.{name}", measured[name], getattr(rules, name))
    found: dict[str, str | int] = {name: measured[name] for name in names}
    return found | app_of(rules, measured["rt_mr3"], event_log, app_compose)
