"""The key-release service (``metaflow confidential key-release``, image ``key-release``): the keys and the
verifier of ``@confidential`` steps, off the machines that launch enclaves.

A launcher configured with ``STACK_KEY_RELEASE_URL`` asks it for its public
key (which the enclave's manifest pins) and a nonce, orders its task into the
enclave with them, and forwards the enclave's evidence; the service judges
it with its own policies (a folder of ``<name>.toml``, read at each request
so an edit needs no restart) and its own collateral, and answers with the
run's data key encrypted to the enclave's key and signed (``keyring``). The
launcher carries that envelope but can neither open it nor make one the
enclave would accept, so it holds no data key (what it can still do is in
docs/confidential.md's threat model).

Like every stack server: 127.0.0.1 by default and a key when exposed
(``http_guard``), JSON errors naming the field (``api_errors``), bodies
bounded, and verification (CPU, and a PCCS fetch on a cold cache) off the
event loop with a bounded number at once (the cheap checks first; a request
that waits too long for its turn is a 503), so a flood of quotes cannot
stall ``/health``. Each decision is logged with the task it was for (never a key)
and counted in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel

from metaflow_stack import api_errors
from metaflow_stack.api_errors import ApiError
from metaflow_stack.confidential.attest import MAX_QUOTE_BYTES, AttestationRefused
from metaflow_stack.confidential.dstack_app import MAX_APP_COMPOSE_BYTES, MAX_EVENT_LOG_BYTES
from metaflow_stack.confidential.keyring import NONCE_TTL_S, KeeperKey, Keyring, Released, ReleaseRequest
from metaflow_stack.confidential.policy import Policy, load_policy
from metaflow_stack.errors import StackError
from metaflow_stack.http_guard import BodyLimitMiddleware, BusyLimitMiddleware, Guard, GuardMiddleware

#: Answered without the key: the orchestrator's probes.
OPEN_PATHS = frozenset({"/health", "/ready"})
#: A release request's bytes at most: a hex quote (128 KiB), a TDX VM's event log and app compose (256 KiB
#: each, which JSON may escape to twice that), and the rest.
MAX_BODY_BYTES = 2 * MAX_QUOTE_BYTES + 2 * MAX_EVENT_LOG_BYTES + 2 * MAX_APP_COMPOSE_BYTES + 32 * 1024
#: Seconds a release waits for a verification slot before it is answered 503 (the launcher asks again).
SLOT_WAIT_S = 30.0
#: Release requests in flight per verification slot, at most; one more is answered 503 before it is read.
WAITING_PER_SLOT = 8
RELEASES = frozenset({"/v1/releases"})
_log = logging.getLogger("metaflow_stack.key_release")


@dataclass(frozen=True)
class KeyReleaseConfig:
    """What the service decides with: its master secret, its policies, where collateral comes from."""

    master: bytes
    policies: Path
    allow_direct: bool = False
    collateral: str | None = None
    pccs_url: str | None = None
    cache: Path | None = None
    #: Verifications running at once; more wait their turn.
    max_concurrency: int = 8


class Nonce(BaseModel):
    nonce: str
    expires_in_s: int


class PolicyListing(BaseModel):
    name: str
    digest: str | None = None
    #: Why the file cannot be used (the service answers 503 for it until it is mended).
    error: str | None = None
    #: What the policy lets through that its author may not mean.
    warning: str | None = None


def _warning(policy: Policy) -> str | None:
    if policy.sgx is not None and not policy.sgx.mr_enclave:
        return ("pins only mr_signer: whoever holds the signing key (the launching machine) signs enclaves it "
                "passes, with the keeper key, trust list and code it chooses; pin mr_enclave")  # fmt: skip
    return None


def policy_reader(folder: Path) -> Any:
    """The named policy from ``folder`` (``<name>.toml``), read now; refused naming ``policy`` if absent."""

    def policy(name: str) -> Policy:
        path = folder / f"{name}.toml"
        if not path.is_file():
            raise AttestationRefused(
                "policy", f"the key-release service has no policy named {name!r}", fix=f"add {name}.toml to its folder"
            )
        try:
            policy = load_policy(path)
        except StackError as exc:  # the service's own file, not the caller's mistake
            raise ApiError(
                503, "policy_unreadable", f"the service's policy {name}: {exc.message}", fix=exc.fix
            ) from None
        warning = _warning(policy)
        if warning:
            _log.warning("policy %s %s", name, warning)
        return policy

    return policy


def create_app(config: KeyReleaseConfig, guard: Guard | None = None) -> FastAPI:
    """The service for ``config``, behind ``guard`` (by default: loopback names only, no key)."""
    keyring = Keyring(
        config.master, policy_reader(config.policies), config.allow_direct,
        config.collateral, config.pccs_url, config.cache,
    )  # fmt: skip
    registry = CollectorRegistry()
    decisions = Counter(
        "key_release_decisions", "Release requests by mode and outcome (the refused check)", ["mode", "outcome"],
        registry=registry,
    )  # fmt: skip
    slots = asyncio.Semaphore(config.max_concurrency)
    app = FastAPI(title="Metaflow Stack key release", description=__doc__.split("\n\n")[0], version="1")
    api_errors.install(app, "the key-release service")
    app.add_middleware(GuardMiddleware, guard=guard or Guard(open_paths=OPEN_PATHS))
    # Releases waiting for a slot hold their bodies (a MiB each, at most): past these many, one more is turned
    # away before it is read (300 waiting on a PCCS that never answered held 540 MB for 30 s).
    app.add_middleware(BusyLimitMiddleware, limit=WAITING_PER_SLOT * config.max_concurrency, paths=RELEASES)
    app.add_middleware(BodyLimitMiddleware, limit=MAX_BODY_BYTES)  # outermost: before anything reads the body

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, str]:
        """Ready when its policy folder can be read (a Secret or ConfigMap mounted late is not)."""
        if not config.policies.is_dir():
            raise ApiError(503, "service_unavailable", f"the policy folder {config.policies} is not there")
        return {"status": "ready"}

    @app.get("/v1/keeper")
    def keeper() -> KeeperKey:
        """The service's Ed25519 public key: launchers pin it in the enclave's manifest, and the enclave opens
        only envelopes it signed."""
        return KeeperKey(public_key=keyring.public_key())

    @app.post("/v1/nonces")
    def nonce() -> Nonce:
        """A fresh nonce for one attempt: the enclave binds it into its quote."""
        return Nonce(nonce=keyring.nonce(), expires_in_s=NONCE_TTL_S)

    @app.post("/v1/releases")
    async def release(request: ReleaseRequest) -> Released:
        """The run's data key for the enclave this evidence speaks for, encrypted to its key; a 403 naming
        the check that failed otherwise."""
        task = "/".join((request.identity.flow, request.identity.run, request.identity.step, request.identity.task))
        try:
            keyring.check(request)  # what costs nothing is refused before it waits for a slot
            try:
                await asyncio.wait_for(slots.acquire(), SLOT_WAIT_S)
            except TimeoutError:
                raise ApiError(503, "busy", f"every verification slot stayed busy for {SLOT_WAIT_S:.0f} s") from None
            try:
                released = await asyncio.to_thread(keyring.release, request)
            finally:
                slots.release()
        except AttestationRefused as exc:
            decisions.labels(request.mode, exc.field).inc()
            _log.warning("refused %s attempt %s: %s", task, request.identity.attempt, exc.message)
            raise
        decisions.labels(request.mode, "released").inc()
        _log.info("released %s attempt %s (%s)", task, request.identity.attempt, request.policy or request.mode)
        return released

    @app.get("/v1/policies")
    def policies() -> list[PolicyListing]:
        """The policies this service holds enclaves to, with their digests (what a verification records)."""
        listed = []
        for path in sorted(config.policies.glob("*.toml"))[:1000]:
            try:
                policy = load_policy(path)
                listed.append(PolicyListing(name=path.stem, digest=policy.digest, warning=_warning(policy)))
            except StackError as exc:
                listed.append(PolicyListing(name=path.stem, error=exc.message))
        return listed

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
