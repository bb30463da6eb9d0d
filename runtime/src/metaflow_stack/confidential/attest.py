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
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from metaflow_stack.confidential.policy import Policy
from metaflow_stack.errors import StackError

#: The PCCS asked for collateral when none is given (Phala's public one; Intel's PCS also works).
DEFAULT_PCCS_URL = "https://pccs.phala.network"
#: Seconds a PCCS has to answer for collateral: a PCCS that hangs must not hold a verification forever.
COLLATERAL_TIMEOUT_S = 30
#: Bytes a quote may have (an SGX quote is about 4.6 KB, a TDX one about 5 KB, with certificates).
MAX_QUOTE_BYTES = 64 * 1024
#: dstack's runtime events (extended into RTMR3), the one naming the app's compose, and a log's size at most.
DSTACK_EVENT_TYPE = 0x08000001
COMPOSE_HASH_EVENT = "compose-hash"
MAX_EVENT_LOG_BYTES = 256 * 1024
#: Bytes a CVM's app compose may have (the step's compose and Phala's pre-launch script: a few KiB).
MAX_APP_COMPOSE_BYTES = 256 * 1024
#: The runner that runs the docker compose file and nothing else (``bash`` would run ``bash_script``).
COMPOSE_RUNNER = "docker-compose"
#: The fields of dstack's app compose (``dstack-types``' ``AppCompose``, and what Phala stores beside it)
#: that run nothing in the VM and send nothing of the task out: a pinned app may have any values of them.
#: The code it runs is checked (``runner``, ``docker_compose_file``, ``pre_launch_script``, and no
#: ``bash_script`` or ``init_script``), and what it shows (no ``public_logs``, no ``public_sysinfo``). Any
#: other field is refused: a newer dstack's field may run code this list does not know of.
_INERT_APP_FIELDS = frozenset({
    "manifest_version", "name", "features", "public_tcbinfo", "kms_enabled", "gateway_enabled", "tproxy_enabled",
    "local_key_provider_enabled", "key_provider", "key_provider_id", "allowed_envs", "no_instance_id",
    "secure_time", "storage_fs", "swap_size", "docker_config", "salt", "version", "snapshotter",
    "event_log_version", "port_policy",
})  # fmt: skip
_CHECKED_APP_FIELDS = frozenset({"runner", "docker_compose_file", "pre_launch_script", "bash_script", "init_script",
                                 "public_logs", "public_sysinfo"})  # fmt: skip
#: TD attributes' DEBUG bit (bit 0), and SGX attributes' DEBUG flag (bit 1).
_TD_DEBUG = 0x01
_SGX_DEBUG = 0x02


class AttestationRefused(StackError):
    """Evidence that does not let the task's results be trusted; ``field`` names the check that failed."""

    code = "attestation_refused"

    def __init__(self, field: str, message: str, fix: str | None = None) -> None:
        super().__init__(f"{field}: {message}", fix)
        self.field = field

    @property
    def details(self) -> dict[str, str]:
        """What an HTTP answer names (``api_errors``): the check that failed."""
        return {"field": self.field}


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
    return f"{hashlib.sha256(pccs_url.encode()).hexdigest()[:12]}-{parsed.quote_type()}-{parsed.fmspc()}.json"


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


def _allowed(field: str, value: str, allowed: list[str]) -> None:
    if allowed and value.lower() not in allowed:
        raise AttestationRefused(field, f"{value} is not one the policy allows")


def _check_sgx(policy: Policy, measured: dict[str, Any]) -> dict[str, str | int]:
    rules = policy.sgx
    if rules is None:
        raise AttestationRefused("tee", "an SGX enclave, and the policy has no [sgx] table")
    flags = int.from_bytes(bytes.fromhex(measured["attributes"])[:8], "little")
    if flags & _SGX_DEBUG and not policy.tcb.allow_debug:
        raise AttestationRefused("debug", "a debug enclave (its memory can be read from outside)")
    _allowed("sgx.mr_enclave", measured["mr_enclave"], rules.mr_enclave)
    _allowed("sgx.mr_signer", measured["mr_signer"], rules.mr_signer)
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
        _allowed(f"tdx.{name}", measured[name], getattr(rules, name))
    found: dict[str, str | int] = {name: measured[name] for name in names}
    if rules.compose_hash or rules.docker_compose:
        pinned = "compose_hash" if rules.compose_hash else "docker_compose"
        if not event_log:
            raise AttestationRefused("tdx.event_log", f"is needed to know the app (the policy pins {pinned})")
        events = app_events(event_log, measured["rt_mr3"])
        if COMPOSE_HASH_EVENT not in events:
            raise AttestationRefused("tdx.compose_hash", "the event log names none (not a dstack app)")
        found["compose_hash"] = events[COMPOSE_HASH_EVENT]
    if rules.compose_hash:
        _allowed("tdx.compose_hash", events[COMPOSE_HASH_EVENT], rules.compose_hash)
    if rules.docker_compose:
        if not app_compose:
            raise AttestationRefused("tdx.app_compose", "is needed to know the app (the policy pins docker_compose)")
        parts = app_parts(app_compose, events[COMPOSE_HASH_EVENT])
        _allowed("tdx.docker_compose", parts["docker_compose"], rules.docker_compose)
        _allowed("tdx.pre_launch_script", parts["pre_launch_script"], rules.pre_launch_script)
        found |= parts
    return found


def app_parts(app_compose: str, compose_hash: str) -> dict[str, str]:
    """The digests (SHA-256) of the docker compose file and the pre-launch script (of the empty text when
    there is none) of ``app_compose``, dstack's app compose as the CVM's guest agent gives it, once its own
    SHA-256 is ``compose_hash`` (the one its event log measures: dstack hashes the file's raw bytes); refused
    naming the field when the app could run anything else, or would publish the task's logs or system."""
    raw = app_compose.encode()
    if len(raw) > MAX_APP_COMPOSE_BYTES:
        raise AttestationRefused("tdx.app_compose", f"is larger than {MAX_APP_COMPOSE_BYTES // 1024} KiB")
    if not hmac.compare_digest(hashlib.sha256(raw).hexdigest(), compose_hash.lower()):
        raise AttestationRefused("tdx.app_compose", "is not the one the event log measures (its hash differs)")
    try:
        app = json.loads(app_compose)
    except ValueError:
        raise AttestationRefused("tdx.app_compose", "is not JSON (dstack's app compose is)") from None
    if not isinstance(app, dict):
        raise AttestationRefused("tdx.app_compose", "is not a JSON object (dstack's app compose is)")
    unknown = sorted(set(app) - _INERT_APP_FIELDS - _CHECKED_APP_FIELDS)
    if unknown:
        raise AttestationRefused(f"tdx.app_compose.{unknown[0]}", "is not a field known to run nothing",
                                 fix="pin the app's compose_hash instead, having read its app compose")  # fmt: skip
    if app.get("runner") != COMPOSE_RUNNER:
        raise AttestationRefused("tdx.app_compose.runner", f"is {app.get('runner')!r}, not {COMPOSE_RUNNER!r}")
    for name in ("bash_script", "init_script"):
        if app.get(name):
            raise AttestationRefused(f"tdx.app_compose.{name}", "runs code besides the step's compose")
    for name in ("public_logs", "public_sysinfo"):
        if app.get(name) is not False and name in app:
            raise AttestationRefused(f"tdx.app_compose.{name}", "is not false: the task's would be public")
    compose, script = app.get("docker_compose_file"), app.get("pre_launch_script") or ""
    if not isinstance(compose, str) or not isinstance(script, str):
        raise AttestationRefused("tdx.app_compose", "names no docker compose file and script as text")
    return {
        "docker_compose": hashlib.sha256(compose.encode()).hexdigest(),
        "pre_launch_script": hashlib.sha256(script.encode()).hexdigest(),
    }


def runtime_event_digest(name: str, payload: bytes) -> bytes:
    """dstack's digest of a runtime event: SHA-384 of its type (4 bytes, little-endian), ``:``, its name,
    ``:``, its payload (so the payload, not a digest the log states, is what RTMR3 holds)."""
    return hashlib.sha384(DSTACK_EVENT_TYPE.to_bytes(4, "little") + b":" + name.encode() + b":" + payload).digest()


def replay_rtmr(digests: list[bytes]) -> str:
    """An RTMR after extending it, from zero, with each of ``digests`` in order (TDX's extend: SHA-384 of the
    register and the digest)."""
    register = bytes(48)
    for digest in digests:
        register = hashlib.sha384(register + digest).digest()
    return register.hex()


def app_events(event_log: str, rt_mr3: str) -> dict[str, str]:
    """dstack's runtime events of a CVM's event log (JSON, as dstack's ``GetQuote`` gives it), as
    ``{name: payload hex}`` (``compose-hash``, ``app-id``, ``instance-id``...), once their digests, each
    recomputed from its payload, replay to ``rt_mr3``, the verified quote's: a log that was edited, or is
    another CVM's, replays to another value. An event named twice is refused (which one would count?)."""
    if len(event_log) > MAX_EVENT_LOG_BYTES:
        raise AttestationRefused("tdx.event_log", f"is larger than {MAX_EVENT_LOG_BYTES // 1024} KiB")
    try:
        entries = json.loads(event_log)
        runtime = [e for e in entries if e.get("event_type") == DSTACK_EVENT_TYPE]
        events = [(str(e["event"]), bytes.fromhex(str(e["event_payload"]))) for e in runtime]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise AttestationRefused("tdx.event_log", "is not dstack's event log") from None
    if not hmac.compare_digest(replay_rtmr([runtime_event_digest(n, p) for n, p in events]), rt_mr3.lower()):
        raise AttestationRefused("tdx.event_log", "does not replay to the quote's rt_mr3 (edited, or another VM's)")
    twice = sorted(name for name, count in Counter(name for name, _ in events).items() if count > 1)
    if twice:
        raise AttestationRefused("tdx.event_log", f"names {twice[0]} twice")
    return {name: payload.hex() for name, payload in events}
