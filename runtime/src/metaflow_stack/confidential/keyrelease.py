"""Releasing a run's data key to an attested enclave, and to nothing else.

The enclave makes an X25519 key pair when it starts and puts its public key
in the quote's ``report_data`` (``attest.binding``), so a verified quote
vouches for that key. Only after ``attest.verify`` accepts the quote is the
data key released: encrypted to that public key (an ephemeral X25519
exchange, HKDF-SHA256, AES-256-GCM with the binding as associated data).
The host that carries the envelope into the enclave cannot open it; an
envelope made for one attempt does not open in another.

Layout: the ephemeral public key (32 bytes), the nonce (12), the encrypted
data key (32 + 16).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from metaflow_stack.confidential.attest import AttestationRefused, TaskIdentity, Verification, binding, verify
from metaflow_stack.confidential.policy import Policy
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

    def open(self, envelope: bytes, bound: bytes) -> bytes:
        """The data key in ``envelope``; ``SealedError`` when it was not made for this key and binding."""
        if len(envelope) != 32 + 12 + 48:
            raise SealedError("the key envelope is not one the key-release service makes")
        ephemeral = X25519PublicKey.from_public_bytes(envelope[:32])
        key = _wrapping_key(self._private.exchange(ephemeral))
        try:
            return AESGCM(key).decrypt(envelope[32:44], envelope[44:], bound)
        except InvalidTag:
            raise SealedError("the key envelope was made for another enclave or attempt") from None


def envelope_for(data_key: bytes, enclave_public: str, bound: bytes) -> bytes:
    """``data_key`` encrypted to the enclave's public key (hex), bound to ``bound``."""
    ephemeral = X25519PrivateKey.generate()
    try:
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(enclave_public))
    except ValueError:
        raise AttestationRefused("enclave_key", "is not an X25519 public key (64 hex digits)") from None
    nonce = os.urandom(12)
    sealed = AESGCM(_wrapping_key(ephemeral.exchange(peer))).encrypt(nonce, data_key, bound)
    return ephemeral.public_key().public_bytes(*_RAW) + nonce + sealed


def release(
    quote: bytes,
    collateral: object,
    policy: Policy,
    identity: TaskIdentity,
    nonce: str,
    enclave_public: str,
    data_key: bytes,
    work: str = "",
    now: int | None = None,
) -> tuple[bytes, Verification]:
    """The data key's envelope for the enclave whose ``quote`` passes ``policy`` and binds this attempt
    (``identity``, the launcher's ``nonce``, the ``work`` ordered) to ``enclave_public``, with the
    verification; nothing is released otherwise (``AttestationRefused`` says why)."""
    bound = binding(identity, nonce, enclave_public, work)
    verified = verify(quote, collateral, policy, bound, now=now)
    return envelope_for(data_key, enclave_public, bound), verified
