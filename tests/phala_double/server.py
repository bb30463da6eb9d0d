"""A double of Phala Cloud's CVM API, for the tests on machines without a Phala account (the GitHub workflow's
``phala`` job runs against Phala Cloud itself when its API key is configured).

It follows the API as Phala's SDK (phala-cloud 0.2.0) speaks it and checks every request the way the
service would refuse it:

- every route wants ``X-API-Key`` (401 otherwise) and an ``X-Phala-Version`` it knows (400 otherwise);
- ``POST /cvms/provision``: ``name`` (5 to 63 characters, a hostname), ``instance_type``, and
  ``compose_file`` with ``docker_compose_file`` and ``allowed_envs``; builds the app compose around it as
  Phala's backend does (``runner``, ``manifest_version``, ``kms_enabled`` and a ``pre_launch_script``
  added: ``PRE_LAUNCH_SCRIPT``, a stand-in for Phala's, whose text is not published); answers ``app_id``,
  the ``compose_hash`` (SHA-256 of that app compose's bytes, as dstack hashes its ``app-compose.json``),
  ``app_env_encrypt_pubkey``, an X25519 key of the
  double's own for that app, ``kms_id`` and ``kms_info`` (its ``k256_pubkey``);
- ``GET /kms/{kms}/pubkey/{app_id}``: the app's variable key as dstack's KMS signs it (secp256k1 over the
  Keccak-256 of ``dstack-env-encrypt-pubkey:``, the app id, the timestamp as 8 bytes big-endian and the key:
  ``signature_v1``; the legacy ``signature`` without the timestamp), with the double's own KMS key;
- ``POST /cvms``: ``app_id`` and ``compose_hash`` of a provision, ``encrypted_env`` (hex), ``env_keys``.
  The same app and compose again is the same CVM; another compose for the app is ``409`` with
  ``error_code`` ``ERR-03-007`` (``CVM_APP_ID_CONFLICT``). The API cannot read the variables: the double
  does what dstack does at the CVM's boot (the first 32 bytes the sender's X25519 key, the shared secret
  the AES-256-GCM key, the next 12 the nonce; JSON ``{"env": [{key, value}]}``; variables outside
  ``allowed_envs`` dropped) and keeps the result (or ``null``: the CVM would not boot) for the test;
- ``GET /cvms/{id}/state``: ``starting``, then ``running`` from the next look on (a CVM runs on after
  its container ends, until deleted); ``GET /cvms/{id}/attestation``: ``is_online``,
  ``app_certificates`` and ``tcb_info`` (the public TDX sample's measurements); ``DELETE /cvms/{id}``;
  an unknown id is 404. Where these name a CVM, ``app_`` and its app's id name it too.

With ``engine`` (a python-on-whales client), a committed CVM also *runs*: its compose's ``task`` service as a
container of that engine, as dstack would start it (the image pulled, ``$$`` and ``${NAME}`` interpolated from
the decrypted variables as Compose does, ``restart: no``), with a double of dstack's guest agent on the
socket it mounts (``/var/run/dstack.sock``): ``POST /GetQuote`` answers the public TDX sample quote (its
signature covers other report data: a verifier refuses it) and an event log whose runtime events (app id,
compose hash, instance id, and the key provider: the double's KMS, by its root CA key) replay to an RTMR3 of
their own; the report data each call asked for is kept.
``POST /Info`` answers as dstack's does, ``tcb_info`` a JSON text holding the app compose's very bytes.
Deleting the CVM removes its container and socket.

What the CVM would have booted with is readable at ``GET /_double/cvms/{id}`` (the double's own routes;
``GET /_double/cvms`` lists the CVMs);
``GET /_double/kms`` is the KMS's signing key and its root CA key (``ca_pubkey``: what users pin) and
``POST /_double/kms`` turns the answers into an attack: ``foreign`` (a key of the API's own, signed by a
key of its own), ``stale`` (a signature ten minutes old), ``swapped`` (the provision hands another key than
the KMS signed),
``legacy`` (an old KMS: the signature without a timestamp) or ``honest``; ``POST /_double/app-deletes``
``refused`` has a DELETE naming a CVM by its app answer 404, as an API that does not take the name would
(``taken``, the default, deletes it).
"""

from __future__ import annotations

import hashlib
import http.server
import itertools
import json
import os
import re
import secrets
import socketserver
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eth_keys import keys
from eth_utils import keccak
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

VERSIONS = {"2025-10-28", "2026-01-21", "2026-05-22"}  # what Phala's SDK lists as supported
_NAME = re.compile(r"^[a-z]([a-z0-9-]{3,61})[a-z0-9]$")
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
STATES = ("starting", "running")  # a CVM runs on after its container ends, until it is deleted
#: The public TDX sample's MRTD (tests/data/attestation/tdx_quote).
KMS_ID = "kms_double"
ATTACKS = ("honest", "foreign", "stale", "swapped", "legacy")
TDX_MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"


#: The public TDX sample quote the guest agent answers.
TDX_QUOTE = Path(__file__).parent.parent / "data" / "attestation" / "tdx_quote"
#: dstack's runtime event type.
RUNTIME_EVENT = 0x08000001
#: The label of every container the double starts.
LABEL = "metaflow-stack.test.phala-double"
#: What the double's backend adds to every app compose as the script dstack runs before the compose.
PRE_LAUNCH_SCRIPT = "#!/bin/bash\necho 'Running the double's pre-launch script'\n"


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class GuestAgent:
    """A double of dstack's guest agent for one CVM, on a Unix socket: ``POST /GetQuote``, as dstack-sdk asks."""

    def __init__(self, app_id: str, app_compose: str, instance_id: str, kms_ca_pubkey: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="dstack-"))
        os.chmod(self.folder, 0o755)
        self.socket = self.folder / "dstack.sock"
        self.asked: list[str] = []
        compose_hash = hashlib.sha256(app_compose.encode()).hexdigest()
        # Where the disk key came from, as dstack-util records it: its KeyProviderInfo as compact JSON.
        provider = json.dumps({"name": "kms", "id": kms_ca_pubkey}, separators=(",", ":"))
        events = [("app-id", app_id), ("compose-hash", compose_hash), ("instance-id", instance_id),
                  ("key-provider", provider.encode().hex())]  # fmt: skip
        log = [{"imr": 3, "event_type": RUNTIME_EVENT, "digest": "", "event": n, "event_payload": p} for n, p in events]
        tcb = {"mrtd": TDX_MRTD, "rtmr0": "0" * 96, "rtmr1": "0" * 96, "rtmr2": "0" * 96, "rtmr3": "0" * 96,
               "mr_aggregated": "", "os_image_hash": "", "compose_hash": compose_hash, "device_id": "",
               "app_compose": app_compose, "event_log": log}  # fmt: skip
        info = {"app_id": app_id, "instance_id": instance_id, "app_cert": "", "tcb_info": json.dumps(tcb, indent=2),
                "app_name": "", "device_id": "", "key_provider_info": provider,
                "compose_hash": compose_hash}  # fmt: skip
        agent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                if self.path == "/Info":
                    self._answer(info)
                    return
                if self.path != "/GetQuote" or not re.fullmatch(r"(?:[0-9a-f]{2}){1,64}", body.get("report_data", "")):
                    self.send_response(400)
                    self.end_headers()
                    return
                agent.asked.append(body["report_data"])
                self._answer({"quote": TDX_QUOTE.read_bytes().hex(), "event_log": json.dumps(log),
                              "report_data": body["report_data"], "vm_config": ""})  # fmt: skip

            def _answer(self, found: dict[str, Any]) -> None:
                answer = json.dumps(found).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

            def address_string(self) -> str:
                return "dstack.sock"

        self.server = _UnixServer(str(self.socket), Handler)
        os.chmod(self.socket, 0o666)  # the task runs as the image's user
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.socket.unlink(missing_ok=True)
        self.folder.rmdir()


def _interpolated(text: str, env: dict[str, str]) -> str:
    """``text`` as Compose interpolates it: ``$$`` a ``$``, ``${NAME}`` the variable's value (empty if unset)."""
    return re.sub(r"\$\$|\$\{(\w+)\}", lambda m: "$" if m[0] == "$$" else env.get(m[1], ""), text)


def _start(engine: Any, compose: str, env: dict[str, str], agent: GuestAgent, name: str) -> str:
    """The compose's ``task`` service started as dstack would: its container's id."""
    service = json.loads(compose)["services"]["task"]
    variables = {key: _interpolated(str(value), env) for key, value in service.get("environment", {}).items()}
    command = [_interpolated(part, env) for part in service["command"]]
    if not engine.image.exists(service["image"]):
        engine.image.pull(service["image"], quiet=True)
    container = engine.run(
        service["image"], command, detach=True, envs=variables, name=name, labels={LABEL: "true"},
        volumes=[(str(agent.socket), "/var/run/dstack.sock")],
    )  # fmt: skip
    return container.id


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"message": message, **({"error_code": code} if code else {})}, status_code=status)


def _signed(kms: keys.PrivateKey, app_id: str, public_key: bytes, timestamp: int) -> dict[str, Any]:
    """``public_key`` as dstack's KMS signs it for ``app_id`` (``GetAppEnvEncryptPubKey``)."""
    prefix, app = b"dstack-env-encrypt-pubkey:", bytes.fromhex(app_id)
    return {
        "public_key": public_key.hex(),
        "signature": kms.sign_msg_hash(keccak(prefix + app + public_key)).to_bytes().hex(),
        "timestamp": timestamp,
        "signature_v1": kms.sign_msg_hash(keccak(prefix + app + timestamp.to_bytes(8, "big") + public_key))
        .to_bytes()
        .hex(),
    }


def create_app(api_key: str, engine: Any = None) -> FastAPI:
    """The double; with ``engine``, committed CVMs run their task (see the module's docstring)."""
    app = FastAPI()
    apps: dict[str, dict[str, Any]] = {}
    cvms: dict[str, dict[str, Any]] = {}
    deleted: list[dict[str, Any]] = []  # running CVMs once deleted: what their agent was asked, their logs
    numbers = itertools.count(1)  # a CVM's id, never reused (a deleted one's taken again named a live one)
    kms = keys.PrivateKey(secrets.token_bytes(32))
    # The KMS's root CA key (P-256), which a CVM's key-provider event names as DER SubjectPublicKeyInfo.
    kms_ca_pubkey = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        .hex()
    )
    attack = {"now": "honest", "key": X25519PrivateKey.generate(), "kms": keys.PrivateKey(secrets.token_bytes(32))}
    attack["app_deletes"] = "taken"  # or "refused": a DELETE naming a CVM by its app answers 404

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
        # dstack hashes the whole app compose (its name, settings and Phala's additions), not the docker compose
        extra = {"runner": "docker-compose", "manifest_version": 2, "kms_enabled": True}
        app_compose = json.dumps(compose | extra | {"pre_launch_script": PRE_LAUNCH_SCRIPT}, indent=4)
        apps[app_id] = {
            "key": key,
            "app_compose": app_compose,
            "compose_hash": hashlib.sha256(app_compose.encode()).hexdigest(),
            "allowed": set(compose["allowed_envs"]),
            "compose": compose["docker_compose_file"],
        }
        handed = attack["key"] if attack["now"] in ("foreign", "swapped") else key
        return JSONResponse({
            "app_id": app_id,
            "compose_hash": apps[app_id]["compose_hash"],
            "app_env_encrypt_pubkey": handed.public_key().public_bytes(*_RAW).hex(),
            "instance_type": body.get("instance_type") or "tdx.small",
            "kms_id": KMS_ID,
            "kms_info": {"id": KMS_ID, "k256_pubkey": "0x" + kms.public_key.to_compressed_bytes().hex()},
        })  # fmt: skip

    @app.get("/api/v1/kms/{kms_id}/pubkey/{app_id}")
    def env_key(kms_id: str, app_id: str) -> Response:
        found = apps.get(app_id)
        if kms_id != KMS_ID or found is None:
            return _error(404, "app not found in this KMS")
        now, key, signer = int(time.time()), found["key"], kms
        if attack["now"] == "foreign":
            key, signer = attack["key"], attack["kms"]
        signed = _signed(signer, app_id, key.public_key().public_bytes(*_RAW), now - 600 * (attack["now"] == "stale"))
        if attack["now"] == "legacy":
            del signed["timestamp"], signed["signature_v1"]
        return JSONResponse(signed)

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
        cvm_id = str(next(numbers))
        cvms[cvm_id] = {"id": cvm_id, "app_id": body["app_id"], "env": env, "looks": 0, "status": STATES[0]}
        if engine is not None and env is not None:
            agent = GuestAgent(body["app_id"], found["app_compose"], secrets.token_hex(20), kms_ca_pubkey)
            name = f"phala-double-{secrets.token_hex(4)}"
            cvms[cvm_id] |= {"agent": agent, "container": _start(engine, found["compose"], env, agent, name)}
        return JSONResponse({"id": cvm_id, "name": cvm_id, "status": STATES[0]})

    def _id(cvm_id: str) -> str:
        """The CVM's own id for ``cvm_id``: its id, or ``app_`` and its app's id (as Phala's SDK names one)."""
        app_id = cvm_id.removeprefix("app_") if cvm_id.startswith("app_") else None
        return next((cvm["id"] for cvm in cvms.values() if cvm["app_id"] == app_id), cvm_id)

    def _cvm(cvm_id: str) -> dict[str, Any] | None:
        return cvms.get(_id(cvm_id))

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
        if cvm_id.startswith("app_") and attack["app_deletes"] == "refused":
            return _error(404, "CVM not found")
        cvm = cvms.pop(_id(cvm_id), None)
        if cvm is None:
            return _error(404, "CVM not found")
        if "container" in cvm:
            deleted.append({"id": cvm_id, "asked": cvm["agent"].asked, "env": cvm["env"],
                            "compose": apps[cvm["app_id"]]["compose"],
                            "logs": engine.container.logs(cvm["container"])[-20000:]})  # fmt: skip
            engine.container.remove(cvm["container"], force=True)
            cvm["agent"].close()
        return Response(status_code=204)

    @app.get("/_double/deleted")
    def every_deleted() -> Response:
        return JSONResponse(deleted)

    @app.get("/_double/kms")
    def kms_key() -> Response:
        return JSONResponse(
            {"k256_pubkey": "0x" + kms.public_key.to_compressed_bytes().hex(), "ca_pubkey": kms_ca_pubkey}
        )

    @app.post("/_double/app-deletes")
    async def set_app_deletes(request: Request) -> Response:
        chosen = (await request.json()).get("app_deletes")
        if chosen not in ("taken", "refused"):
            return _error(400, "app_deletes: taken or refused")
        attack["app_deletes"] = chosen
        return JSONResponse({"app_deletes": chosen})

    @app.post("/_double/kms")
    async def set_attack(request: Request) -> Response:
        chosen = (await request.json()).get("attack")
        if chosen not in ATTACKS:
            return _error(400, f"attack: one of {', '.join(ATTACKS)}")
        attack["now"] = chosen
        return JSONResponse({"attack": chosen})

    @app.get("/_double/cvms")
    def every_cvm() -> Response:
        return JSONResponse(sorted(cvms))

    @app.get("/_double/cvms/{cvm_id}")
    def seen(cvm_id: str) -> Response:
        cvm = _cvm(cvm_id)
        return JSONResponse({"env": cvm["env"], "compose": apps[cvm["app_id"]]["compose"]} if cvm else None)

    return app
