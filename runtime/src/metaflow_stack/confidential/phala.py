"""Phala Cloud, for ``@confidential(backend="phala")``: a step's task as a dstack app in an Intel TDX
confidential VM (CVM), deployed, watched, attested and deleted through Phala Cloud's API.

The API as Phala's own SDK speaks it (``X-API-Key``, ``X-Phala-Version``):
``POST /cvms/provision`` (a compose file and the variables it may receive:
an app id, the compose's hash and the key to encrypt variables to), then
``POST /cvms`` to commit it with the variables encrypted (idempotent for the
same app and compose; another compose is a conflict), ``GET /cvms/{id}/state``
until it runs and ends, ``GET /cvms/{id}/attestation``, ``DELETE /cvms/{id}``.

Variables are encrypted to the key the provision answers, as dstack
decrypts them inside the CVM (an ephemeral X25519 exchange whose shared
secret is the AES-256-GCM key; the ephemeral public key, the nonce and the
ciphertext, as hex). That key is not yet checked against the KMS's
signature (``/kms/{kms}/pubkey/{app_id}``): until it is, whoever answers
the API could substitute it, and the backend that runs steps on Phala waits
for that check.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from metaflow_stack.errors import InvalidInput, StackError

#: Phala Cloud's API, and the version of it these requests are written to.
API = "https://cloud-api.phala.com/api/v1"
VERSION = "2026-05-22"  # the SDK's default version of the API
KEY_FIX = "create an API key in Phala Cloud's dashboard and export PHALA_CLOUD_API_KEY"
#: Names a dstack app's variables may have (what dstack accepts inside the CVM).
_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


class PhalaError(StackError):
    code = "phala_error"


@dataclass(frozen=True)
class Provisioned:
    """A CVM provisioned but not yet committed: its app, the compose's hash, the key for its variables."""

    app_id: str
    compose_hash: str
    env_public_key: str


def encrypt_env(env: dict[str, str], public_key_hex: str) -> str:
    """``env`` encrypted to a CVM's X25519 key, as dstack decrypts it: hex of the ephemeral public key (32
    bytes), the nonce (12) and the AES-256-GCM ciphertext of ``{"env": [{"key", "value"}...]}``."""
    for name in env:
        if not name or name[0].isdigit() or set(name) - _NAME_CHARS or len(name) > 255:
            raise InvalidInput(f"env.{name}", "is not a variable name dstack accepts")
    try:
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex.removeprefix("0x")))
    except ValueError:
        raise PhalaError("the CVM's environment key is not an X25519 public key") from None
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(peer)
    nonce = os.urandom(12)
    plain = json.dumps({"env": [{"key": k, "value": v} for k, v in env.items()]}).encode()
    public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return (public + nonce + AESGCM(shared).encrypt(nonce, plain, None)).hex()


def compose_for(image: str, command: list[str], env_keys: list[str]) -> str:
    """The dstack app of one task: ``image`` running ``command`` with ``env_keys`` from the encrypted
    variables, dstack's socket mounted (the task asks it for its quote). JSON, which is YAML."""
    service = {
        "image": image,
        "command": command,
        "environment": {key: f"${{{key}}}" for key in env_keys},
        "volumes": ["/var/run/dstack.sock:/var/run/dstack.sock"],
        "restart": "no",
    }
    return json.dumps({"services": {"task": service}}, indent=2)


class PhalaCloud:
    """Phala Cloud's API for one launcher: the key from ``PHALA_CLOUD_API_KEY`` unless given."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout_s: float = 30) -> None:
        key = api_key or os.environ.get("PHALA_CLOUD_API_KEY")
        if not key:
            raise PhalaError("PHALA_CLOUD_API_KEY is not set", fix=KEY_FIX)
        base = base_url or os.environ.get("PHALA_CLOUD_API_PREFIX") or API
        headers = {"X-API-Key": key, "X-Phala-Version": VERSION, "Content-Type": "application/json"}
        self._http = httpx.Client(base_url=base.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise PhalaError(
                f"Phala Cloud is unreachable: {exc}", fix="check the network, or PHALA_CLOUD_API_PREFIX"
            ) from None
        if response.status_code in (401, 403):
            raise PhalaError("Phala Cloud refused the API key", fix=KEY_FIX)
        if response.status_code >= 400:
            raise PhalaError(f"{method} {path}: {response.status_code} {_detail(response)}")
        return response.json() if response.content else None

    def provision(self, name: str, compose: str, env_keys: list[str], instance_type: str = "tdx.small") -> Provisioned:
        body = {
            "name": name,
            "instance_type": instance_type,
            "compose_file": {"docker_compose_file": compose, "allowed_envs": env_keys, "name": name},
        }
        found = self._call("POST", "/cvms/provision", body)
        return Provisioned(found["app_id"], found["compose_hash"], found["app_env_encrypt_pubkey"])

    def commit(self, provisioned: Provisioned, env: dict[str, str]) -> str:
        """Start the provisioned CVM with ``env`` encrypted to it; its id."""
        body = {
            "app_id": provisioned.app_id,
            "compose_hash": provisioned.compose_hash,
            "encrypted_env": encrypt_env(env, provisioned.env_public_key),
            "env_keys": list(env),
        }
        return str(self._call("POST", "/cvms", body)["id"])

    def state(self, cvm: str) -> str:
        return str(self._call("GET", f"/cvms/{cvm}/state")["status"])

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
        return self._call("GET", f"/cvms/{cvm}/attestation")

    def delete(self, cvm: str) -> None:
        self._call("DELETE", f"/cvms/{cvm}")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body.get("error_code") or body)[:300]
    return str(body)[:300]
