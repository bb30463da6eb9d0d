"""A double of Phala Cloud's CVM API, for the tests on machines without a Phala account (the GitHub workflow's
``phala`` job runs against Phala Cloud itself when its API key is configured).

It follows the API as Phala's SDK (phala-cloud 0.2.0) speaks it and checks every request the way the
service would refuse it:

- every route wants ``X-API-Key`` (401 otherwise) and an ``X-Phala-Version`` it knows (400 otherwise);
- ``POST /cvms/provision``: ``name`` (5 to 63 characters, a hostname), ``instance_type``, and
  ``compose_file`` with ``docker_compose_file`` and ``allowed_envs``; answers ``app_id``, the compose's
  ``compose_hash`` (SHA-256 of the compose as given) and ``app_env_encrypt_pubkey``, an X25519 key of the
  double's own for that app;
- ``POST /cvms``: ``app_id`` and ``compose_hash`` of a provision, ``encrypted_env`` (hex), ``env_keys``.
  The same app and compose again is the same CVM; another compose for the app is ``409`` with
  ``error_code`` ``ERR-03-007`` (``CVM_APP_ID_CONFLICT``). The API cannot read the variables: the double
  does what dstack does at the CVM's boot (the first 32 bytes the sender's X25519 key, the shared secret
  the AES-256-GCM key, the next 12 the nonce; JSON ``{"env": [{key, value}]}``; variables outside
  ``allowed_envs`` dropped) and keeps the result (or ``null``: the CVM would not boot) for the test;
- ``GET /cvms/{id}/state``: ``starting``, then ``running`` from the next look on (a CVM runs on after
  its container ends, until deleted); ``GET /cvms/{id}/attestation``: ``is_online``,
  ``app_certificates`` and ``tcb_info`` (the public TDX sample's measurements); ``DELETE /cvms/{id}``;
  an unknown id is 404.

What the CVM would have booted with is readable at ``GET /_double/cvms/{id}`` (the double's own route).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

VERSIONS = {"2025-10-28", "2026-01-21", "2026-05-22"}  # what Phala's SDK lists as supported
_NAME = re.compile(r"^[a-z]([a-z0-9-]{3,61})[a-z0-9]$")
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
STATES = ("starting", "running")  # a CVM runs on after its container ends, until it is deleted
#: The public TDX sample's MRTD (tests/data/attestation/tdx_quote).
TDX_MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"message": message, **({"error_code": code} if code else {})}, status_code=status)


def create_app(api_key: str) -> FastAPI:
    app = FastAPI()
    apps: dict[str, dict[str, Any]] = {}
    cvms: dict[str, dict[str, Any]] = {}

    @app.middleware("http")
    async def authenticated(request: Request, call_next):
        if request.url.path.startswith("/_double/"):
            return await call_next(request)
        if request.headers.get("x-api-key") != api_key:
            return _error(401, "Invalid API key")
        if request.headers.get("x-phala-version") not in VERSIONS:
            return _error(400, f"unsupported X-Phala-Version {request.headers.get('x-phala-version')!r}")
        return await call_next(request)

    @app.post("/api/v1/cvms/provision")
    async def provision(request: Request) -> Response:
        body = await request.json()
        compose = body.get("compose_file") or {}
        if not isinstance(body.get("name"), str) or not _NAME.match(body["name"]):
            return _error(400, "name: 5 to 63 characters, lowercase letters, digits and hyphens")
        if not isinstance(compose.get("docker_compose_file"), str) or not isinstance(compose.get("allowed_envs"), list):
            return _error(400, "compose_file: docker_compose_file and allowed_envs are required")
        key = X25519PrivateKey.generate()
        app_id = secrets.token_hex(20)
        apps[app_id] = {
            "key": key,
            "compose_hash": hashlib.sha256(compose["docker_compose_file"].encode()).hexdigest(),
            "allowed": set(compose["allowed_envs"]),
            "compose": compose["docker_compose_file"],
        }
        return JSONResponse({
            "app_id": app_id,
            "compose_hash": apps[app_id]["compose_hash"],
            "app_env_encrypt_pubkey": key.public_key().public_bytes(*_RAW).hex(),
            "instance_type": body.get("instance_type") or "tdx.small",
        })  # fmt: skip

    @app.post("/api/v1/cvms")
    async def commit(request: Request) -> Response:
        body = await request.json()
        found = apps.get(body.get("app_id", ""))
        if found is None:
            return _error(404, "app not provisioned")
        existing = next((cvm for cvm in cvms.values() if cvm["app_id"] == body["app_id"]), None)
        if body.get("compose_hash") != found["compose_hash"]:
            return _error(409, "compose hash differs for this app", "ERR-03-007")
        if existing is not None:
            return JSONResponse({"id": existing["id"], "name": existing["id"], "status": existing["status"]})
        if not isinstance(body.get("encrypted_env"), str) or not isinstance(body.get("env_keys"), list):
            return _error(400, "encrypted_env (hex) and env_keys are required")
        # What dstack does at boot inside the CVM (the API itself cannot decrypt): decrypt, keep the allowed.
        try:
            blob = bytes.fromhex(body["encrypted_env"])
            peer = X25519PublicKey.from_public_bytes(blob[:32])
            plain = AESGCM(found["key"].exchange(peer)).decrypt(blob[32:44], blob[44:], None)
            booted = {item["key"]: item["value"] for item in json.loads(plain)["env"]}
            env = {key: value for key, value in booted.items() if key in found["allowed"]}
        except (KeyError, ValueError, TypeError, InvalidTag):
            env = None  # the CVM would fail to boot
        cvm_id = str(len(cvms) + 1)
        cvms[cvm_id] = {"id": cvm_id, "app_id": body["app_id"], "env": env, "looks": 0, "status": STATES[0]}
        return JSONResponse({"id": cvm_id, "name": cvm_id, "status": STATES[0]})

    def _cvm(cvm_id: str) -> dict[str, Any] | None:
        return cvms.get(cvm_id)

    @app.get("/api/v1/cvms/{cvm_id}/state")
    def state(cvm_id: str) -> Response:
        cvm = _cvm(cvm_id)
        if cvm is None:
            return _error(404, "CVM not found")
        cvm["status"] = STATES[min(cvm["looks"], len(STATES) - 1)]
        cvm["looks"] += 1
        return JSONResponse({"id": cvm_id, "instance_id": cvm_id, "name": cvm_id, "status": cvm["status"]})

    @app.get("/api/v1/cvms/{cvm_id}/attestation")
    def attestation(cvm_id: str) -> Response:
        if _cvm(cvm_id) is None:
            return _error(404, "CVM not found")
        tcb = {"mrtd": TDX_MRTD, "rtmr0": "0" * 96, "rtmr1": "0" * 96, "rtmr2": "0" * 96, "rtmr3": "0" * 96,
               "event_log": []}  # fmt: skip
        return JSONResponse({"name": cvm_id, "is_online": True, "is_public": False, "error": None,
                             "app_certificates": [], "tcb_info": tcb})  # fmt: skip

    @app.delete("/api/v1/cvms/{cvm_id}")
    def delete(cvm_id: str) -> Response:
        if cvms.pop(cvm_id, None) is None:
            return _error(404, "CVM not found")
        return Response(status_code=204)

    @app.get("/_double/cvms/{cvm_id}")
    def seen(cvm_id: str) -> Response:
        cvm = _cvm(cvm_id)
        return JSONResponse({"env": cvm["env"], "compose": apps[cvm["app_id"]]["compose"]} if cvm else None)

    return app
