"""Releasing a run's data key to an attested enclave, and to nothing else.

The enclave makes an X25519 key pair when it starts and puts its public key
in the quote's ``report_data`` (``attest.binding``), so a verified quote
vouches for that key. Only after ``attest.verify`` accepts the quote is the
data key released: encrypted to that public key (an ephemeral X25519
exchange, HKDF-SHA256, AES-256-GCM with the binding as associated data).
The host that carries the envelope into the enclave cannot open it; an
envelope made for one attempt does not open in another.

The keeper signs each envelope with its Ed25519 key (over the envelope and
the binding), and the enclave opens only an envelope that signature
verifies under the keeper's public key, which is fixed in the enclave's
manifest and so in its measurement: the host could otherwise make an
envelope of its own, to a key of its choosing, for the enclave to seal with.

The signed part names the key's scope (``direct``, ``sgx:<policy>@<digest>``):
the enclave takes only a key of the mode and policy it was measured with,
so a launcher cannot have it seal with a key another policy (or direct
mode) releases.

Layout: the keeper's signature (64 bytes), the scope's length (2) and the
scope, the ephemeral public key (32), the nonce (12), the encrypted data key
(32 + 16).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from metaflow_stack.confidential.attest import AttestationRefused
from metaflow_stack.confidential.seal import SealedError

_INFO = b"metaflow-stack key release v1"
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def _wrapping_key(shared: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(shared)


class EnclaveKey:
    """The enclave's key pair: made inside it, its private half never leaves."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(*_RAW).hex()

    def open(self, signed: bytes, bound: bytes, keeper_public: str, scopes: Callable[[str], bool]) -> bytes:
        """The data key in ``signed`` (a signed envelope); ``SealedError`` when the keeper whose public key
        (hex) the enclave was measured with did not sign it for this binding, its key is of a scope the
        enclave does not accept (``scopes``: its measured mode and policy), or it was not made for this key."""
        if len(signed) < 64 + 2 or len(signed) != 64 + 2 + int.from_bytes(signed[64:66], "big") + 32 + 12 + 48:
            raise SealedError("the key envelope is not one the key-release service makes")
        signature, envelope = signed[:64], signed[64:]
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(keeper_public)).verify(signature, envelope + bound)
        except (InvalidSignature, ValueError):
            raise SealedError("the key envelope was not signed by the enclave's key keeper") from None
        length = int.from_bytes(envelope[:2], "big")
        scope, sealed = envelope[2 : 2 + length].decode(errors="replace"), envelope[2 + length :]
        if not scopes(scope):  # a key of another mode or policy than this enclave was measured with
            raise SealedError(f"the key envelope holds a key of scope {scope!r}, which this enclave does not take")
        ephemeral = X25519PublicKey.from_public_bytes(sealed[:32])
        try:
            key = _wrapping_key(self._private.exchange(ephemeral))
            return AESGCM(key).decrypt(sealed[32:44], sealed[44:], bound)
        except (InvalidTag, ValueError):
            raise SealedError("the key envelope was made for another enclave or attempt") from None


def envelope_for(data_key: bytes, enclave_public: str, bound: bytes, signer: Ed25519PrivateKey, scope: str) -> bytes:
    """``data_key`` (of ``scope``) encrypted to the enclave's public key (hex), bound to ``bound``, signed by
    the keeper with its scope, so the enclave can tell which key it is handed."""
    ephemeral = X25519PrivateKey.generate()
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(enclave_public)))
    except ValueError:  # not 32 bytes, or a low-order point that would make every shared secret zero
        raise AttestationRefused("enclave_key", "is not a usable X25519 public key (64 hex digits)") from None
    nonce = os.urandom(12)
    named = scope.encode()
    envelope = len(named).to_bytes(2, "big") + named + ephemeral.public_key().public_bytes(*_RAW) + nonce
    envelope += AESGCM(_wrapping_key(shared)).encrypt(nonce, data_key, bound)
    return signer.sign(envelope + bound) + envelope


def public_hex(signer: Ed25519PrivateKey) -> str:
    """A keeper's public key as the enclave's manifest carries it."""
    return signer.public_key().public_bytes(*_RAW).hex()
