"""Who holds a run's data keys, and the one decision that releases one: the same code in the launcher's process
(``LocalKeeper``, development and single machines) and in the key-release service (``service``), which moves
the keys and the verifier off the machine that launches enclaves.

**Keys are derived, not stored.** A keeper holds one master secret, from
which HKDF-SHA256 derives (one extract, then an expand per purpose with a
length-prefixed context) a run's data key for the flow, the run and a
**scope**: ``direct`` for unattested development enclaves,
``sgx:<policy>@<digest>`` (``tdx:`` for a TDX VM) for TEEs that passed that
policy as it reads now. So a key never depends on which replica answers or on a restart,
nothing grows with the number of runs, an enclave that passed a lenient
policy never holds the key of a step held to a strict one, and editing a
policy gives new keys (steps that read each other's sealed values share a
policy). The same secret gives the keeper's Ed25519 **signing key**: every
envelope is signed, and an enclave opens only envelopes signed by the keeper
its manifest names (``keyrelease``).

**Nonces are the keeper's.** ``nonce`` is a time, random bytes and an HMAC
of both under the master secret, accepted for ``NONCE_TTL_S``: the keeper
knows it made it and that it is fresh without keeping a list, so a quote
made for an earlier launch is refused after that window, and within it a
replay gains nothing (the envelope opens only with the key pair of the
enclave that made the quote).

``release`` then does what trust needs, in order: the nonce is the
keeper's and fresh; the evidence is judged (``attest.verify`` against the
keeper's own policy and collateral, never the caller's); the data key of the
flow, run and scope goes to the enclave's public key, bound to the attempt
and signed (``keyrelease.envelope_for``). Its answer carries the
verification the task records.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from pydantic import BaseModel, StringConstraints

from metaflow_stack.confidential.attest import (
    MAX_QUOTE_BYTES,
    AttestationRefused,
    TaskIdentity,
    Verification,
    binding,
    cache_name,
    collateral_for,
    pccs_url_of,
    quote_kind,
    verify,
)
from metaflow_stack.confidential.dstack_app import MAX_APP_COMPOSE_BYTES, MAX_EVENT_LOG_BYTES
from metaflow_stack.confidential.keyrelease import envelope_for, public_hex
from metaflow_stack.confidential.policy import Policy
from metaflow_stack.errors import InvalidInput, StackError
from metaflow_stack.http_answers import AnswerTooLarge, AnswerTooSlow, whole
from metaflow_stack.local_secrets import made_once

#: Seconds a keeper's nonce is accepted: an enclave starts and quotes well within it.
NONCE_TTL_S = 600
#: A policy's name: a file stem the keeper knows (``prod`` for ``policies/prod.toml``).
POLICY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
_HEX64 = r"^[0-9a-f]{64}$"
_HEX_BYTES = r"^(?:[0-9a-fA-F]{2})*$"
_SALT = b"metaflow-stack key keeper v1"
#: The variable a launcher reads the key-release service's key from (else ``METAFLOW_STACK_AUTH_KEY``).
KEY_RELEASE_KEY = "METAFLOW_STACK_KEY_RELEASE_AUTH_KEY"

Hex64 = Annotated[str, StringConstraints(pattern=_HEX64)]


class ReleaseRequest(BaseModel):
    """An enclave's evidence for one attempt, as its launcher forwards it: what the keeper judges."""

    identity: TaskIdentity
    #: The keeper's nonce the enclave bound into its quote.
    nonce: Hex64
    #: The enclave's X25519 public key (hex), the one the key is released to.
    enclave_key: Hex64
    #: The digest of the work the enclave was ordered (``inside.TaskOrder.work``).
    work: Hex64
    #: What the TEE is: an unattested Gramine enclave, an SGX enclave, or a TDX confidential VM (dstack).
    mode: Literal["direct", "sgx", "tdx"]
    #: The policy an attested TEE is held to, by name; the keeper reads its own copy.
    policy: Annotated[str, StringConstraints(pattern=POLICY_NAME)] | None = None
    #: The quote (hex); none in direct mode.
    quote: Annotated[str, StringConstraints(pattern=_HEX_BYTES, max_length=2 * MAX_QUOTE_BYTES)] | None = None
    #: A TDX VM's event log (dstack's JSON), which names its app once it replays to the quote's RTMR3.
    event_log: Annotated[str, StringConstraints(max_length=MAX_EVENT_LOG_BYTES)] | None = None
    #: A TDX VM's app compose (dstack's, as its guest agent gives it), read once its hash is the event log's.
    app_compose: Annotated[str, StringConstraints(max_length=MAX_APP_COMPOSE_BYTES)] | None = None


class Released(BaseModel):
    """The data key's signed envelope (hex) for the enclave, and the verification the task records."""

    envelope: str
    verification: dict[str, Any]


class KeeperKey(BaseModel):
    """The keeper's Ed25519 public key (hex): what an enclave's manifest pins."""

    public_key: str


class Keeper(Protocol):
    """What a launcher asks of whoever holds the keys (``LocalKeeper`` here, ``RemoteKeeper`` a service)."""

    def public_key(self) -> str: ...

    def nonce(self) -> str: ...

    def release(self, request: ReleaseRequest) -> Released: ...


def policy_name(policy: str) -> str:
    """The name a keeper knows a policy by: the file stem of the decorator's ``policy``."""
    return Path(policy).stem


class Keyring:
    """The keeper's decisions over one master secret (see the module's docstring).

    ``policies`` gives the named policy (``InvalidInput``/``AttestationRefused`` if it has none of that
    name); ``collateral`` (a file) or ``pccs_url`` say where collateral comes from, kept in ``cache``;
    ``allow_direct`` lets unattested (``gramine-direct``) enclaves have their scope's key."""

    def __init__(
        self,
        master: bytes,
        policies: Callable[[str], Policy],
        allow_direct: bool,
        collateral: str | None = None,
        pccs_url: str | None = None,
        cache: Path | None = None,
    ) -> None:
        if len(master) < 32:
            raise ValueError("a master secret has at least 32 bytes")
        self._policies, self.allow_direct = policies, allow_direct
        self._collateral, self._pccs_url, self._cache = collateral, pccs_url, cache
        # HKDF-Extract once; every key below is an Expand of it for its own purpose.
        self._prk = hmac.new(_SALT, master, hashlib.sha256).digest()
        self._nonce_key = self._expand(b"nonce")
        self.signer = Ed25519PrivateKey.from_private_bytes(self._expand(b"signing key"))

    def _expand(self, purpose: bytes, *context: str) -> bytes:
        info = b"".join(len(part).to_bytes(4, "big") + part for part in (purpose, *(c.encode() for c in context)))
        return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(self._prk)

    def data_key(self, flow: str, run: str, scope: str) -> bytes:
        """The data key of ``flow``'s ``run`` for ``scope`` (``direct`` or ``sgx:<policy>@<digest>``)."""
        return self._expand(b"data key", flow, run, scope)

    def public_key(self) -> str:
        return public_hex(self.signer)

    def nonce(self, now: float | None = None) -> str:
        stamp = int(time.time() if now is None else now).to_bytes(8, "big") + os.urandom(8)
        return (stamp + self._mac(stamp)).hex()

    def _mac(self, stamp: bytes) -> bytes:
        return hmac.new(self._nonce_key, stamp, hashlib.sha256).digest()[:16]

    def _check_nonce(self, nonce: str, now: float) -> None:
        raw = bytes.fromhex(nonce)
        if not hmac.compare_digest(raw[16:], self._mac(raw[:16])):
            raise AttestationRefused("nonce", "was not made by this key keeper", fix="ask it for a nonce first")
        age = now - int.from_bytes(raw[:8], "big")
        if not -60 <= age <= NONCE_TTL_S:
            raise AttestationRefused("nonce", f"is {int(age)} s old; a nonce is accepted for {NONCE_TTL_S} s")

    def check(self, request: ReleaseRequest, now: float | None = None) -> Policy | None:
        """The checks that cost nothing (the nonce, the mode, the policy): the policy an SGX request is held
        to, or ``AttestationRefused`` naming what is wrong. ``release`` runs them too."""
        self._check_nonce(request.nonce, time.time() if now is None else now)
        if request.mode == "direct":
            if not self.allow_direct:
                raise AttestationRefused(
                    "mode", "direct: this keeper releases no key to an unattested enclave", fix='mode="sgx"'
                )
            return None
        if request.policy is None:
            fix = 'policy="policies/prod.toml"'
            raise AttestationRefused("policy", f"an {request.mode.upper()} step needs one", fix=fix)
        if not request.quote:
            raise AttestationRefused("quote", "the TEE gave none", fix="run where SGX or TDX and DCAP are available")
        kind = quote_kind(bytes.fromhex(request.quote))
        if kind != request.mode:  # a key is scoped by the TEE kind the request says: hold the quote to it
            raise AttestationRefused("mode", f"{request.mode}, and the quote is a {kind.upper()} TEE's")
        return self._policies(request.policy)

    def release(self, request: ReleaseRequest, now: float | None = None) -> Released:
        """The data key for the enclave ``request`` speaks for, or ``AttestationRefused`` naming the check."""
        moment = time.time() if now is None else now
        policy = self.check(request, moment)
        identity = request.identity
        bound = binding(identity, request.nonce, request.enclave_key, request.work)
        if policy is None:
            verification: dict[str, Any] = {
                "attested": False, "mode": "direct", "why": "gramine-direct gives no quote (development only)",
            }  # fmt: skip
            scope = "direct"
        else:
            judged = self._verify(request, policy, bound, int(moment))
            verification = {"attested": True, "mode": request.mode, "policy": request.policy, **judged.model_dump()}
            scope = f"{request.mode}:{request.policy}@{policy.digest[:16]}"
        key = self.data_key(identity.flow, identity.lineage or identity.run, scope)  # a resume: its chain's key
        envelope = envelope_for(key, request.enclave_key, bound, self.signer, scope)
        return Released(envelope=envelope.hex(), verification=verification)

    def _verify(self, request: ReleaseRequest, policy: Policy, bound: bytes, now: int) -> Verification:
        quote = bytes.fromhex(request.quote or "")
        app = {"event_log": request.event_log, "app_compose": request.app_compose}
        collateral = collateral_for(quote, self._collateral, self._pccs_url, self._cache)
        try:
            return verify(quote, collateral, policy, bound, now=now, **app)
        except AttestationRefused as exc:
            if exc.field != "collateral" or self._collateral or self._cache is None:
                raise
            # The cached copy outlived its window (about a month): fetch fresh collateral once, then judge again.
            (self._cache / cache_name(quote, pccs_url_of(self._pccs_url))).unlink(missing_ok=True)
            fresh = collateral_for(quote, None, self._pccs_url, self._cache)
            return verify(quote, fresh, policy, bound, now=now, **app)


def master_secret(path: Path, make: bool = False) -> bytes:
    """The keeper's master secret at ``path``: 64 hex digits (``openssl rand -hex 32``, a mounted Secret); with
    ``make``, made there once (0600) when there is none. A path given by a user is never made up: a mistyped
    one would seal with a key nobody keeps. Every data key derives from it: lose it and sealed values stay
    sealed."""
    try:
        if make:
            text, _ = made_once(path, lambda: os.urandom(32).hex().encode())
        else:
            text = path.read_bytes()
    except OSError as exc:
        fix = "give --master-key-file a file of 64 hex digits (openssl rand -hex 32)"
        raise InvalidInput("master_key", f"{path} cannot be read: {exc.strerror}", fix=fix) from None
    try:
        master = bytes.fromhex(text.decode().strip())
    except ValueError:
        master = b""
    if len(master) != 32:
        raise InvalidInput("master_key", f"{path} does not hold 64 hex digits", fix="openssl rand -hex 32 > FILE")
    return master


def local_keeper(
    state_dir: Path, policy: Policy | None, policy_file: str | None, collateral: str | None, pccs_url: str | None
) -> Keyring:
    """The launcher's own keeper, when no key-release service is configured: the master secret in this
    machine's state folder, the decorator's ``policy`` under its file's name, direct mode allowed. The
    launching machine is then trusted with the keys (docs/confidential.md)."""
    folder = state_dir / "confidential"

    def policies(name: str) -> Policy:
        if policy is None or policy_file is None or policy_name(policy_file) != name:
            raise AttestationRefused("policy", f"{name} is not the step's policy")
        return policy

    master = master_secret(folder / "keeper" / "master.key", make=True)
    return Keyring(master, policies, True, collateral, pccs_url, folder / "collateral")


class KeeperUnavailable(StackError):
    """The key-release service did not answer (or failed): nothing was judged, so the attempt may be retried."""

    code = "keeper_unavailable"


def service_key(url: str) -> str | None:
    """The key a launcher sends to the key-release service at ``url``: its own variable; else, for a
    service on this machine (never sent to another host), the key of the stack's when the stack's runs and
    listens on ``url``'s port (``stack up --with key-release``: ``local_service``), or
    ``METAFLOW_STACK_AUTH_KEY`` (one started by hand)."""
    from urllib.parse import urlsplit

    from metaflow_stack.confidential.local_service import LocalKeyRelease
    from metaflow_stack.http_guard import KEY_VARIABLE, is_loopback

    own, where = os.environ.get(KEY_RELEASE_KEY), urlsplit(url)
    if own or not is_loopback(where.hostname or ""):
        return own or None
    try:
        port = where.port
    except ValueError:  # (no port a service could listen on: the request says so in its own words)
        port = None
    stacks = LocalKeyRelease()
    if port is not None and stacks.key_path.is_file() and stacks.daemon.listens_on(port):
        return stacks.key_path.read_text().strip() or None
    return os.environ.get(KEY_VARIABLE) or None


class RemoteKeeper:
    """The key-release service (``metaflow confidential key-release``) as a launcher's keeper: the same
    questions over HTTP. Its refusals (403) are raised as the ``AttestationRefused`` they name, and so is an
    answer that says the request itself is wrong (401, 400: final too); a service that cannot answer
    (unreachable, 429, 5xx) is asked again (three tries, backing off), then ``KeeperUnavailable``, which
    fails the attempt so ``@retry`` may try again."""

    #: Seconds to wait for an answer: longer than a verification that fetches collateral twice (30 s each).
    TIMEOUT_S = 120.0
    TRIES = 3

    def __init__(self, url: str, key: str | None) -> None:
        import httpx

        headers = {"x-api-key": key} if key else {}
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=self.TIMEOUT_S)
        self.url = url
        self._public: str | None = None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        why = ""
        for attempt in range(self.TRIES):
            if attempt:
                time.sleep(2**attempt)
            request, deadline = self._client.build_request(method, path, json=body), time.monotonic() + self.TIMEOUT_S
            try:  # (its answers are small: a key, a nonce, an envelope)
                answer = whole(self._client.send(request, stream=True), 1 << 20, deadline)
            except (httpx.HTTPError, AnswerTooLarge, AnswerTooSlow) as exc:
                why = f"cannot be reached: {exc}" if isinstance(exc, httpx.HTTPError) else f"answered {exc}"
                continue
            try:
                found = answer.json()
            except ValueError:
                found = None
            if answer.status_code == 200 and isinstance(found, dict):
                return found
            if answer.status_code == 403 and isinstance(found, dict):
                details = found.get("details") if isinstance(found.get("details"), dict) else {}
                field = str(details.get("field") or "key_release")
                message = str(found.get("message")).removeprefix(f"{field}: ")  # the same words, not named twice
                raise AttestationRefused(field, message, fix=found.get("fix"))
            message = found.get("message") if isinstance(found, dict) else None
            why = f"answered {answer.status_code}: {message or answer.text[:200]}"
            if answer.status_code < 500 and answer.status_code != 429:  # the request is wrong (a key, a body):
                raise AttestationRefused(  # asking again, or retrying the task, would meet the same answer
                    "key_release", f"the key-release service at {self.url} {why}",
                    fix="check its URL and key (METAFLOW_STACK_KEY_RELEASE_AUTH_KEY)",
                )  # fmt: skip
        raise KeeperUnavailable(f"the key-release service at {self.url} {why}",
                                fix="check it runs and its key (METAFLOW_STACK_KEY_RELEASE_AUTH_KEY)")  # fmt: skip

    def public_key(self) -> str:
        if self._public is None:
            self._public = KeeperKey.model_validate(self._call("GET", "/v1/keeper")).public_key
        return self._public

    def nonce(self) -> str:
        return str(self._call("POST", "/v1/nonces")["nonce"])

    def release(self, request: ReleaseRequest) -> Released:
        return Released.model_validate(self._call("POST", "/v1/releases", request.model_dump()))

    def close(self) -> None:
        self._client.close()
