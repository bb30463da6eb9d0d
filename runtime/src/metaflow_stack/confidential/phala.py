"""Phala Cloud, for ``@confidential(backend="phala")``: a step's task as a dstack app in an Intel TDX
confidential VM (CVM), deployed, watched, attested and deleted through Phala Cloud's API.

The API as Phala's own SDK speaks it (``X-API-Key``, ``X-Phala-Version``):
``POST /cvms/provision`` (a compose file and the variables it may receive:
an app id, the compose's hash and the key to encrypt variables to), then
``POST /cvms`` to commit it with the variables encrypted (idempotent for the
same app and compose; another compose is a conflict), ``GET /cvms/{id}/state``
until it runs and ends, ``GET /cvms/{id}/attestation``, ``DELETE /cvms/{id}``.

Variables are encrypted (with dstack's own SDK, as dstack decrypts them
inside the CVM) only to a key the KMS that holds the app's keys has signed,
freshly, for that app: ``GET /kms/{kms}/pubkey/{app_id}``, the signature
recovered to the KMS's secp256k1 key and held to the one pinned
(``STACK_PHALA_KMS_SIGNER``). Whoever answers the API (a proxy, a
compromised account) could otherwise hand its own key and read every
variable.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import httpx
from dstack_sdk import EnvVar, encrypt_env_vars_sync, verify_env_encrypt_public_key
from dstack_sdk.verify_env_encrypt_public_key import verify_env_encrypt_public_key_legacy

from metaflow_stack import settings
from metaflow_stack.errors import InvalidInput, StackError
from metaflow_stack.http_answers import AnswerTooLarge, AnswerTooSlow, whole

#: Phala Cloud's API, and the version of it these requests are written to.
API = "https://cloud-api.phala.com/api/v1"
VERSION = "2026-05-22"  # the SDK's default version of the API
KEY_FIX = "create an API key in Phala Cloud's dashboard and export PHALA_CLOUD_API_KEY"
#: The most of one answer read: a CVM's attestation, its quote and event log, is well under it.
MAX_ANSWER = 32 << 20
#: Seconds one answer has to arrive whole (the client's own timeout is per read).
ANSWER_S = 120.0
#: Names a dstack app's variables may have (what dstack accepts inside the CVM).
_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
#: A secp256k1 public key, compressed, as dstack's SDK recovers a KMS signer.
_SIGNER = re.compile(r"^0x0[23][0-9a-f]{64}$")
#: What a KMS or app id is (it goes into a path of the API).
_KMS_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: The off-chain KMS Phala Cloud runs, when a provision names none.
DEFAULT_KMS = "phala"
#: How the API names a CVM by its app (``app_`` and the app id).
APP_PREFIX = "app_"
#: What ``PhalaCloud._call`` answers for a 404 it was told to expect (a DELETE's success has no body either).
MISSING = object()


class PhalaError(StackError):
    code = "phala_error"


@dataclass(frozen=True)
class Provisioned:
    """A CVM provisioned but not yet committed: its app, the compose's hash, the key for its variables, and
    the KMS that holds the app's keys (and signs that one)."""

    app_id: str
    compose_hash: str
    env_public_key: str
    kms: str = DEFAULT_KMS
    #: The KMS's signing key as the provision names it: never trusted, only shown when none is pinned.
    kms_named: str = ""


def encrypt_env(env: dict[str, str], public_key_hex: str) -> str:
    """``env`` encrypted to a CVM's X25519 key by dstack's SDK (as dstack decrypts it at the CVM's boot);
    names dstack would not accept are refused first, naming the variable."""
    for name in env:
        if not name or name[0].isdigit() or set(name) - _NAME_CHARS or len(name) > 255:
            raise InvalidInput(f"env.{name}", "is not a variable name dstack accepts")
    try:
        return encrypt_env_vars_sync([EnvVar(key, value) for key, value in env.items()], public_key_hex)
    except ValueError:
        raise PhalaError("the CVM's environment key is not an X25519 public key") from None


def kms_signer(pinned: str) -> str:
    """``pinned`` as dstack's SDK writes a recovered signer (``0x``, compressed, lower case), or why not."""
    signer = pinned.strip().lower()
    signer = signer if signer.startswith("0x") else f"0x{signer}"
    if not _SIGNER.match(signer):
        raise InvalidInput(
            "STACK_PHALA_KMS_SIGNER", f"{pinned!r} is not a compressed secp256k1 key (66 hex digits, 02 or 03 first)"
        )
    return signer


def compose_for(image: str, command: list[str], env_keys: list[str], fixed: dict[str, str] | None = None) -> str:
    """The dstack app of one task: ``image`` running ``command`` with the ``fixed`` variables (in the compose,
    so in its hash: what a policy pins) and ``env_keys`` from the encrypted ones, dstack's socket mounted
    (the task asks it for its quote). Compose interpolates ``${NAME}``: a ``$`` of the command or of a fixed
    value is written ``$$``, so it reaches the container as written. JSON, which is YAML."""
    literal = {key: value.replace("$", "$$") for key, value in (fixed or {}).items()}
    service = {
        "image": image,
        "command": [part.replace("$", "$$") for part in command],
        "environment": literal | {key: f"${{{key}}}" for key in env_keys},
        "volumes": ["/var/run/dstack.sock:/var/run/dstack.sock"],
        "restart": "no",
    }
    return json.dumps({"services": {"task": service}}, indent=2, sort_keys=True)


class PhalaCloud:
    """Phala Cloud's API for one launcher: the key from ``PHALA_CLOUD_API_KEY`` unless given."""

    def __init__(
        self, api_key: str | None = None, base_url: str | None = None, timeout_s: float = 30, signer: str | None = None
    ) -> None:
        """``signer``: the KMS signing key a CVM's variable key must be signed by (else ``STACK_PHALA_KMS_SIGNER``;
        checked when variables are encrypted, so a client that only watches or deletes needs none)."""
        self._signer = signer if signer is not None else settings.load().phala_kms_signer
        key = api_key or os.environ.get("PHALA_CLOUD_API_KEY")
        if not key:
            raise PhalaError("PHALA_CLOUD_API_KEY is not set", fix=KEY_FIX)
        #: The API's prefix: a CVM's id means something only on the API that made it.
        self.base = (base_url or os.environ.get("PHALA_CLOUD_API_PREFIX") or API).rstrip("/")
        headers = {"X-API-Key": key, "X-Phala-Version": VERSION, "Content-Type": "application/json"}
        self._http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def again(self) -> PhalaCloud:
        """The same API, key and signer on a client of its own: a forked child must not use its parent's
        connections."""
        return PhalaCloud(self._http.headers["X-API-Key"], self.base, signer=self._signer)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, missing_ok: bool = False) -> Any:
        """The API's answer (JSON, or None when it has no body); with ``missing_ok``, ``MISSING`` for a 404.
        Read to ``MAX_ANSWER`` and a deadline; an answer that is not JSON (a proxy's page) is a
        ``PhalaError`` like any other failed call."""
        unreachable = "check the network, or PHALA_CLOUD_API_PREFIX"
        deadline = time.monotonic() + ANSWER_S
        try:
            response = whole(self._http.send(self._http.build_request(method, path, json=body), stream=True),
                             MAX_ANSWER, deadline)  # fmt: skip
        except httpx.HTTPError as exc:
            raise PhalaError(f"Phala Cloud is unreachable: {exc}", fix=unreachable) from None
        except (AnswerTooLarge, AnswerTooSlow) as exc:
            raise PhalaError(f"{method} {path}: Phala Cloud's answer is {exc}", fix=unreachable) from None
        if response.status_code in (401, 403):
            raise PhalaError("Phala Cloud refused the API key", fix=KEY_FIX)
        if response.status_code == 404 and missing_ok:
            return MISSING
        if response.status_code >= 400:
            raise PhalaError(f"{method} {path}: {response.status_code} {_detail(response)}")
        try:
            return response.json() if response.content else None
        except ValueError:
            raise PhalaError(f"{method} {path}: answered {response.text[:80]!r}, not JSON", fix=unreachable) from None

    def _field(self, method: str, path: str, name: str, body: dict[str, Any] | None = None) -> Any:
        """Field ``name`` of the API's answer, a ``PhalaError`` if the answer has none."""
        found = self._call(method, path, body)
        if not isinstance(found, dict) or found.get(name) is None:
            raise PhalaError(f"{method} {path}: the answer has no {name}", fix="check PHALA_CLOUD_API_PREFIX")
        return found[name]

    def provision(
        self, name: str, compose: str, env_keys: list[str], instance_type: str = "tdx.small", app: str | None = None
    ) -> Provisioned:
        """Provision the CVM ``name`` of the dstack app ``app`` (its compose's name, so in its hash: the same for
        every CVM of that app; ``name`` unless given), its logs and system information kept private."""
        compose_file = {
            "name": app or name, "docker_compose_file": compose, "allowed_envs": env_keys,
            "public_logs": False, "public_sysinfo": False,
        }  # fmt: skip
        body = {"name": name, "instance_type": instance_type, "compose_file": compose_file}
        found = self._call("POST", "/cvms/provision", body)
        wanted = ("app_id", "compose_hash", "app_env_encrypt_pubkey")
        if not isinstance(found, dict) or any(not isinstance(found.get(name), str) for name in wanted):
            raise PhalaError(f"POST /cvms/provision: the answer has no {', '.join(wanted)}")
        kms = found.get("kms_info") if isinstance(found.get("kms_info"), dict) else {}
        named_kms = str(found.get("kms_id") or kms.get("slug") or kms.get("id") or DEFAULT_KMS)
        return Provisioned(
            found["app_id"], found["compose_hash"], found["app_env_encrypt_pubkey"], named_kms,
            str(kms.get("k256_pubkey") or ""),
        )  # fmt: skip

    def checked_env_key(self, provisioned: Provisioned) -> str:
        """The CVM's variable key, once its KMS has signed it for this app, freshly (``signature_v1``: five
        minutes at most; a KMS too old to give one, its replayable signature, with a warning) and the signer
        is the pinned KMS; ``PhalaError`` naming what does not hold, before anything is encrypted to it."""
        if not self._signer:
            named = provisioned.kms_named and f" (Phala Cloud names {provisioned.kms_named} for KMS {provisioned.kms})"
            raise PhalaError(
                f"no KMS signer is pinned, so the CVM's variable key cannot be checked{named}",
                fix="check the KMS's k256 key in Phala's trust center or the DstackKms contract, "
                "then export METAFLOW_STACK_PHALA_KMS_SIGNER=<it>",
            )
        pinned = kms_signer(self._signer)
        if not _KMS_ID.match(provisioned.kms) or not _KMS_ID.match(provisioned.app_id):
            raise PhalaError(f"the provision names KMS {provisioned.kms!r} and app {provisioned.app_id!r}: not ids")
        signed = self._call("GET", f"/kms/{provisioned.kms}/pubkey/{provisioned.app_id}")
        try:
            public_key = bytes.fromhex(str(signed["public_key"]).removeprefix("0x"))
            if signed.get("signature_v1") and isinstance(signed.get("timestamp"), int):
                signature = bytes.fromhex(str(signed["signature_v1"]).removeprefix("0x"))
                signer = verify_env_encrypt_public_key(public_key, signature, provisioned.app_id, signed["timestamp"])
            else:
                signature = bytes.fromhex(str(signed["signature"]).removeprefix("0x"))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    signer = verify_env_encrypt_public_key_legacy(public_key, signature, provisioned.app_id)
                warnings.warn(f"KMS {provisioned.kms} signs without a timestamp (replayable)", stacklevel=2)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise PhalaError(f"KMS {provisioned.kms} answered no signed key for app {provisioned.app_id}") from None
        if signer is None:
            raise PhalaError(
                f"the variable key of app {provisioned.app_id} carries no valid, fresh KMS signature",
                fix="check this machine's clock, and that PHALA_CLOUD_API_PREFIX is Phala Cloud's",
            )
        if signer != pinned:
            raise PhalaError(
                f"the variable key of app {provisioned.app_id} is signed by {signer}, not the pinned KMS {pinned}",
                fix="deploy with the KMS you pinned, or pin another only after checking it (STACK_PHALA_KMS_SIGNER)",
            )
        if public_key.hex() != provisioned.env_public_key.lower().removeprefix("0x"):
            raise PhalaError(f"the provision's variable key for app {provisioned.app_id} is not the one the KMS signed")
        return public_key.hex()

    def commit(self, provisioned: Provisioned, env: dict[str, str], key: str | None = None) -> str:
        """Start the provisioned CVM with ``env`` encrypted to its checked key (``key``, from
        ``checked_env_key``, else checked now); its id."""
        body = {
            "app_id": provisioned.app_id,
            "compose_hash": provisioned.compose_hash,
            "encrypted_env": encrypt_env(env, key or self.checked_env_key(provisioned)),
            "env_keys": list(env),
        }
        return str(self._field("POST", "/cvms", "id", body))

    def state(self, cvm: str) -> str:
        return str(self._field("GET", f"/cvms/{cvm}/state", "status"))

    def wait(self, cvm: str, statuses: set[str], timeout_s: float, every_s: float = 2.0) -> str:
        """The CVM's status once it is one of ``statuses``; ``PhalaError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.state(cvm)
            if status in statuses:
                return status
            if time.monotonic() > deadline:
                raise PhalaError(f"CVM {cvm} is still {status} after {timeout_s:.0f} s")
            time.sleep(every_s)

    def attestation(self, cvm: str) -> dict[str, Any]:
        found = self._call("GET", f"/cvms/{cvm}/attestation")
        if not isinstance(found, dict):
            raise PhalaError(f"GET /cvms/{cvm}/attestation: the answer is no object")
        return found

    @staticmethod
    def by_app(app_id: str) -> str:
        """The id that names the CVM of the provisioned app ``app_id`` in the API's ``/cvms/{id}`` paths
        (``app_`` and the app id, as Phala's SDK writes it): what a launcher has before its commit answers."""
        if not _KMS_ID.match(app_id):
            raise PhalaError(f"the provision names app {app_id!r}: not an id")
        return f"{APP_PREFIX}{app_id}"

    def delete(self, cvm: str, missing_ok: bool = False) -> bool:
        """Delete ``cvm``: whether there was one to delete (with ``missing_ok``, one already gone, 404, is no
        error). A CVM named by its app (``by_app``) is looked up first: there, 404 means the app has no CVM
        (yet: a commit may still be making it), and a delete that then answers 404 is an error (the API did
        not take the name), never taken for a CVM already gone."""
        if cvm.startswith(APP_PREFIX):
            if not self.exists(cvm):
                return False
            missing_ok = False
        return self._call("DELETE", f"/cvms/{cvm}", missing_ok=missing_ok) is not MISSING

    def exists(self, cvm: str) -> bool:
        """Whether the API knows ``cvm`` (404 on its state: it does not)."""
        return self._call("GET", f"/cvms/{cvm}/state", missing_ok=True) is not MISSING


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body.get("error_code") or body)[:300]
    return str(body)[:300]
