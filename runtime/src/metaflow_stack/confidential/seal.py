"""Sealed artifacts: a confidential step's values encrypted before they leave the enclave.

Envelope encryption with AES-GCM (the ``cryptography`` library):
* each artifact gets its own random 256-bit key, which encrypts the value,
  authenticated with the artifact's name and task (its "where"), so a
  sealed value moved to another artifact or task does not open;
* that key is wrapped (AES-GCM again) by the run's **data key**, which the
  key-release service hands only to an enclave whose quote passed the
  policy (``attest``). Outside such an enclave there is no data key, and
  reading a sealed value says so instead of returning ciphertext.

Layout: ``MFSEAL1`` magic, then the wrapped key's nonce (12 bytes) and
wrapped key (48), then the value's nonce (12) and ciphertext (the value,
plus its 16-byte tag).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from metaflow_stack.errors import StackError

MAGIC = b"MFSEAL1\x00"
_NONCE = 12
_WRAPPED = 32 + 16
_HEADER = len(MAGIC) + _NONCE + _WRAPPED + _NONCE


class SealedError(StackError):
    """A sealed value that cannot be opened here: no data key, the wrong one, or damaged bytes."""

    code = "sealed"


def new_data_key() -> bytes:
    """A run's data key (256 bits), kept by the key-release service, never stored beside the artifacts."""
    return AESGCM.generate_key(bit_length=256)


def is_sealed(blob: bytes) -> bool:
    return blob.startswith(MAGIC)


def seal(value: bytes, data_key: bytes, where: str) -> bytes:
    """``value`` encrypted under a fresh key wrapped by ``data_key``; ``where`` (``Flow/run/step/task/name``)
    authenticated with it."""
    key = AESGCM.generate_key(bit_length=256)
    wrap_nonce, nonce = os.urandom(_NONCE), os.urandom(_NONCE)
    wrapped = AESGCM(data_key).encrypt(wrap_nonce, key, MAGIC + where.encode())
    return MAGIC + wrap_nonce + wrapped + nonce + AESGCM(key).encrypt(nonce, value, where.encode())


def unseal(blob: bytes, data_key: bytes | None, where: str) -> bytes:
    """The value sealed in ``blob`` at ``where``; ``SealedError`` saying why it does not open (never the
    ciphertext as if it were the value)."""
    if not is_sealed(blob) or len(blob) < _HEADER + 16:
        raise SealedError(f"{where} is not a sealed value")
    if data_key is None:
        raise SealedError(
            f"{where} is sealed: its data key is released only to an attested enclave",
            fix="read it inside a @confidential step, or ask the key-release service with an attested quote",
        )
    offset = len(MAGIC)
    wrap_nonce, wrapped = blob[offset : offset + _NONCE], blob[offset + _NONCE : offset + _NONCE + _WRAPPED]
    nonce, ciphertext = blob[_HEADER - _NONCE : _HEADER], blob[_HEADER:]
    try:
        key = AESGCM(data_key).decrypt(wrap_nonce, wrapped, MAGIC + where.encode())
    except InvalidTag:
        raise SealedError(
            f"{where}: this data key does not open it (another run's key, or another value's place)"
        ) from None
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, where.encode())
    except InvalidTag:
        raise SealedError(f"{where}: the sealed value was altered") from None


class Sealed:
    """A sealed artifact as it is stored: what a reader outside an attested enclave gets back. It is not the
    value, and says so when used as one; ``open`` with the run's data key inside an enclave gives it."""

    __slots__ = ("blob", "where")

    def __init__(self, blob: bytes, where: str) -> None:
        if not isinstance(blob, bytes) or not isinstance(where, str):
            raise SealedError("a sealed value is its bytes and its place: this one was made of something else")
        self.blob, self.where = blob, where

    def __reduce__(self) -> tuple:
        # Rebuilt by its constructor (which checks both fields), never by setting state on it.
        return Sealed, (self.blob, self.where)

    def open(self, data_key: bytes | None) -> bytes:
        return unseal(self.blob, data_key, self.where)

    def __repr__(self) -> str:
        return f"<sealed artifact {self.where}: opens only in an attested enclave with the run's data key>"

    def __getattr__(self, name: str) -> object:  # used as the value it hides: a clear error, not ciphertext
        if name.startswith("__"):
            raise AttributeError(name)
        raise SealedError(
            f"{self.where} is sealed: its data key is released only to an attested enclave",
            fix="read it in a @confidential step: metaflow_stack.confidential.unsealed(self, NAME)",
        )
