"""A dstack CVM's app, read from its evidence: the runtime events of its event log (once they replay to the
verified quote's RTMR3) and the app compose whose hash one of them records.

dstack hashes the raw bytes of ``app-compose.json`` into its ``compose-hash``
runtime event, and its guest agent hands the same bytes (``Info``:
``tcb_info.app_compose``). Phala builds that file around the docker compose
it is sent (its runner, manifest version, key settings and a pre-launch
script), so its hash cannot be known before provisioning. A policy pins it
whole (``compose_hash``) or by its parts (``docker_compose``, the digest the
step's launcher prints, and ``pre_launch_script``), once the app compose is
held to rules that leave it nothing else to run and no way to show the
task: ``app_parts``. Another runtime event, ``key-provider``, records where
the VM's disk key came from: a KMS the policy names, or the VM itself
(``_disk_key``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections import Counter
from typing import Any

from metaflow_stack.confidential.cvm_variables import ENCRYPTED
from metaflow_stack.confidential.policy import TdxPolicy
from metaflow_stack.confidential.refusal import AttestationRefused, allowed

#: dstack's runtime events (extended into RTMR3), the one naming the app's compose, and a log's size at most.
DSTACK_EVENT_TYPE = 0x08000001
COMPOSE_HASH_EVENT = "compose-hash"
#: dstack's runtime event recording where the VM's disk key came from, and the id it may give: empty (no
#: key provider, the host's TPM) or a key or measurement as hex, as long as a policy's ``kms_ca_pubkey``.
KEY_PROVIDER_EVENT = "key-provider"
_PROVIDER_ID = re.compile(r"(?:[0-9a-fA-F]{2}){0,1024}")
MAX_EVENT_LOG_BYTES = 256 * 1024
#: Bytes a CVM's app compose may have (the step's compose and Phala's pre-launch script: a few KiB).
MAX_APP_COMPOSE_BYTES = 256 * 1024
#: The runner that runs the docker compose file and nothing else (``bash`` would run ``bash_script``).
COMPOSE_RUNNER = "docker-compose"
#: Where the VM's disk key may come from: dstack's KMS, or a random key made inside the VM (``none``). A host's
#: key provider (``local``: any SGX enclave the host runs; ``tpm``: the host's) would give the host the disk,
#: where the containers' layers, ``/tmp`` and swap hold the task's data.
KEY_PROVIDERS = ("kms", "none")
#: The fields of dstack's app compose (``dstack-types``' ``AppCompose``, and what Phala stores beside it) that
#: run nothing in the VM and show nothing of the task: a pinned app may have any values of them. The others it
#: may have are checked in ``app_parts`` (``key_provider_id``, the KMS the VM takes its disk key from, is
#: not: the ``key-provider`` event records the one it did, and ``_disk_key`` checks that); any field besides
#: is refused, since a newer dstack's field may run code this list does not know of.
_INERT_FIELDS = frozenset({
    "manifest_version", "name", "features", "public_tcbinfo", "gateway_enabled", "tproxy_enabled",
    "no_instance_id", "secure_time", "storage_fs", "swap_size", "docker_config", "salt", "version",
    "snapshotter", "event_log_version", "port_policy",
})  # fmt: skip
_CHECKED_FIELDS = frozenset({
    "runner", "docker_compose_file", "pre_launch_script", "bash_script", "init_script", "public_logs",
    "public_sysinfo", "allowed_envs", "key_provider", "kms_enabled", "local_key_provider_enabled",
    "key_provider_id",
})  # fmt: skip


def app_of(rules: TdxPolicy, rt_mr3: str, event_log: str | None, app_compose: str | None) -> dict[str, str]:
    """What a TDX quote's app is, held to ``rules``' app pins (``compose_hash``; ``docker_compose`` and
    ``pre_launch_script``; ``kms_ca_pubkey``): its compose hash and where its disk key came from, from
    ``event_log`` replayed to ``rt_mr3``, and the digests of ``app_compose``'s parts; nothing when the rules
    pin no app (``rt_mr3`` pinned alone)."""
    if not (rules.compose_hash or rules.docker_compose):
        return {}
    pinned = "compose_hash" if rules.compose_hash else "docker_compose"
    if not event_log:
        raise AttestationRefused("tdx.event_log", f"is needed to know the app (the policy pins {pinned})")
    events = app_events(event_log, rt_mr3)
    if COMPOSE_HASH_EVENT not in events:
        raise AttestationRefused("tdx.compose_hash", "the event log names none (not a dstack app)")
    found = {"compose_hash": events[COMPOSE_HASH_EVENT]}
    allowed("tdx.compose_hash", found["compose_hash"], rules.compose_hash)
    found["disk_key"] = _disk_key(events, rules.kms_ca_pubkey or [])
    if rules.docker_compose:
        if not app_compose:
            raise AttestationRefused("tdx.app_compose", "is needed to know the app (the policy pins docker_compose)")
        found |= app_parts(app_compose, found["compose_hash"])
        allowed("tdx.docker_compose", found["docker_compose"], rules.docker_compose)
        allowed("tdx.pre_launch_script", found["pre_launch_script"], rules.pre_launch_script)
    return found


def _disk_key(events: dict[str, str], kms_ca_pubkeys: list[str]) -> str:
    """Where the VM's disk key came from, as its ``key-provider`` event records it (dstack's
    ``KeyProviderInfo``, compact JSON of ``name`` and ``id``): ``none`` (made inside the VM), or ``kms:`` and
    the root CA public key of a KMS in ``kms_ca_pubkeys``; a host's key provider, another KMS, or a record
    dstack would not write (another field, which a newer dstack may give a meaning), is refused."""
    if KEY_PROVIDER_EVENT not in events:
        raise AttestationRefused("tdx.key_provider", "the event log names none (dstack records where the disk key "
                                 "came from)", fix="use a dstack OS image that records it: pin its rt_mr1 and "
                                 "rt_mr2")  # fmt: skip
    try:
        provider = json.loads(bytes.fromhex(events[KEY_PROVIDER_EVENT]), object_pairs_hook=_once_each)
        name, key = provider["name"], provider["id"]
    except (AttributeError, KeyError, TypeError, ValueError):  # (not an object: no ``name`` to read)
        provider, name, key = None, None, None
    well_formed = (
        isinstance(provider, dict) and set(provider) == {"name", "id"} and isinstance(name, str)
        and isinstance(key, str) and _PROVIDER_ID.fullmatch(key)
    )  # fmt: skip
    if not well_formed or (name == "none" and key) or (name == "kms" and not key):
        raise AttestationRefused("tdx.key_provider", "is not dstack's record of a key provider")
    if name == "none":
        return "none"
    if name != "kms":
        raise AttestationRefused("tdx.key_provider", f"is {name[:32]!r}: the VM's disk key came from its host",
                                 fix="deploy the app with key_provider kms or none")  # fmt: skip
    if not kms_ca_pubkeys:
        raise AttestationRefused("tdx.kms_ca_pubkey", f"{key} gave the VM's disk key, and the policy allows no KMS",
                                 fix="list that KMS's root CA public key in kms_ca_pubkey if you trust it")  # fmt: skip
    allowed("tdx.kms_ca_pubkey", key, kms_ca_pubkeys)
    return f"kms:{key.lower()}"


def app_parts(app_compose: str, compose_hash: str) -> dict[str, str]:
    """The digests (SHA-256) of the docker compose file and the pre-launch script (of the empty text when
    there is none) of ``app_compose``, dstack's app compose as the CVM's guest agent gives it, once its own
    SHA-256 is ``compose_hash`` (the one its event log measures); refused naming the field when the app could
    run anything else, take variables its launcher never sends, keep its disk key with the host, or publish
    the task's logs or system information."""
    raw = _utf8(app_compose, "tdx.app_compose")
    if len(raw) > MAX_APP_COMPOSE_BYTES:
        raise AttestationRefused("tdx.app_compose", f"is larger than {MAX_APP_COMPOSE_BYTES // 1024} KiB")
    if not hmac.compare_digest(hashlib.sha256(raw).hexdigest(), compose_hash.lower()):
        raise AttestationRefused("tdx.app_compose", "is not the one the event log measures (its hash differs)")
    try:
        app = json.loads(app_compose, object_pairs_hook=_once_each)
    except ValueError as exc:
        why = str(exc) if isinstance(exc, _Twice) else "is not JSON (dstack's app compose is)"
        raise AttestationRefused("tdx.app_compose", why) from None
    if not isinstance(app, dict):
        raise AttestationRefused("tdx.app_compose", "is not a JSON object (dstack's app compose is)")
    unknown = sorted(set(app) - _INERT_FIELDS - _CHECKED_FIELDS)
    if unknown:
        raise AttestationRefused(f"tdx.app_compose.{unknown[0]}", "is not a field known to run nothing",
                                 fix="pin the app's compose_hash instead, having read its app compose")  # fmt: skip
    _check_what_runs(app)
    _check_what_enters(app)
    fields = {"docker_compose": "docker_compose_file", "pre_launch_script": "pre_launch_script"}
    return {
        name: hashlib.sha256(_utf8(app.get(field, ""), f"tdx.app_compose.{field}")).hexdigest()
        for name, field in fields.items()
    }


def _check_what_runs(app: dict[str, Any]) -> None:
    """The compose under dstack's compose runner, and a pre-launch script (text): nothing else runs; and no
    log or system information is published."""
    if app.get("runner") != COMPOSE_RUNNER:
        raise AttestationRefused("tdx.app_compose.runner", f"is {app.get('runner')!r}, not {COMPOSE_RUNNER!r}")
    for name in ("bash_script", "init_script"):
        if app.get(name):
            raise AttestationRefused(f"tdx.app_compose.{name}", "runs code besides the step's compose")
    for name in ("docker_compose_file", "pre_launch_script"):
        if not isinstance(app.get(name, ""), str) or (name == "docker_compose_file" and name not in app):
            raise AttestationRefused(f"tdx.app_compose.{name}", "is not text")
    for name in ("public_logs", "public_sysinfo"):
        if name in app and app[name] is not False:
            raise AttestationRefused(f"tdx.app_compose.{name}", "is not false: the task's would be public")


def _check_what_enters(app: dict[str, Any]) -> None:
    """Only the variables a step's CVM is sent reach it (dstack gives them to the root script that starts the
    compose), and its disk key comes from the KMS or from inside it (``KEY_PROVIDERS``)."""
    names = app.get("allowed_envs", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise AttestationRefused("tdx.app_compose.allowed_envs", "is not a list of names")
    extra = sorted(set(names) - ENCRYPTED)
    if extra:
        raise AttestationRefused("tdx.app_compose.allowed_envs", f"names {extra[0]}, which no step's CVM is sent")
    # As dstack reads it: the provider named, else the KMS when enabled, else the host's local one when
    # enabled, else none (a key made in the VM).
    provider = app.get("key_provider")
    if provider is None:
        provider = "kms" if app.get("kms_enabled") else "local" if app.get("local_key_provider_enabled") else "none"
    if provider not in KEY_PROVIDERS:
        raise AttestationRefused("tdx.app_compose.key_provider",
                                 f"is {provider!r}: the VM's disk key would come from its host")  # fmt: skip


class _Twice(ValueError):
    pass


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: parsers that keep another of two could read another app."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _Twice(f"gives {key} twice")
        found[key] = value
    return found


def _utf8(text: str, field: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate: JSON can escape one, UTF-8 cannot hold it
        raise AttestationRefused(field, "is not UTF-8 text") from None


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
