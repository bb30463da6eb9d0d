"""Gramine, driven for one task: where it is installed, the enclave signing key the runtime manages, and a
task's manifest prepared (rendered, checked, expanded by ``gramine-manifest``, signed for SGX) and run.

``mode="direct"`` runs the manifest under ``gramine-direct``: an ordinary
process, no SGX, no quote (development only; docs/confidential.md says what
it does not protect). ``mode="sgx"`` signs it and runs ``gramine-sgx``; the
enclave's MRENCLAVE is read back from its signature with
``gramine-sgx-sigstruct-view`` and recorded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from metaflow_stack.confidential import manifest
from metaflow_stack.errors import StackError, ToolMissingError
from metaflow_stack.local_secrets import made_once

MODES = ("direct", "sgx")
INSTALL_FIX = "install Gramine (https://gramine.readthedocs.io/en/stable/installation.html)"
#: What SGX requires of an enclave signing key: RSA-3072 with public exponent 3.
_KEY_BITS, _KEY_EXPONENT = 3072, 3


@dataclass(frozen=True)
class Prepared:
    """A task's enclave, ready to run: its folder, the manifest's stem, and its MRENCLAVE (SGX only)."""

    folder: Path
    stem: str
    mr_enclave: str | None


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ToolMissingError(f"{name} is not installed", fix=INSTALL_FIX)
    return found


def runtimedir() -> str:
    """Gramine's glibc runtime folder, as its own ``gramine-manifest`` renders ``gramine.runtimedir()`` (into a
    manifest: the tool parses what it renders as TOML, and prints it back as TOML)."""
    template = 'runtimedir = "{{ gramine.runtimedir() }}"'
    rendered = _run([tool("gramine-manifest"), "--no-check", "-c", template], "gramine-manifest")
    return tomllib.loads(rendered)["runtimedir"]


def signing_key(state_dir: Path) -> Path:
    """The enclave signing key the runtime manages (made once, readable by this user only)."""
    path = state_dir / "confidential" / "enclave-key.pem"

    def make() -> bytes:
        key = rsa.generate_private_key(public_exponent=_KEY_EXPONENT, key_size=_KEY_BITS)
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )

    made_once(path, make)
    return path


def mr_signer(key_path: Path) -> str:
    """MRSIGNER for enclaves signed with the key: SHA-256 of its modulus, 384 bytes little-endian (SGX's
    SIGSTRUCT layout): what a policy pins to allow every enclave this runtime signs."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != _KEY_BITS or key.public_key().public_numbers().e != 3:
        raise StackError(f"{key_path} is not an SGX signing key (RSA-3072, e=3)", fix="remove it: a new one is made")
    modulus = key.public_key().public_numbers().n
    return hashlib.sha256(modulus.to_bytes(_KEY_BITS // 8, "little")).hexdigest()


def prepare(
    inputs: manifest.ManifestInputs,
    folder: Path,
    mode: str,
    key: Path | None,
    stem: str = "task",
    template: Path | None = None,
) -> Prepared:
    """The task's manifest in ``folder``: rendered (from ``template``, else the project's) and checked here,
    then checked and expanded by ``gramine-manifest`` (which hashes every trusted directory), and for SGX
    signed with ``key``."""
    if mode not in MODES:
        raise StackError(f"mode={mode!r} is not one of {', '.join(MODES)}", fix='mode="direct" or mode="sgx"')
    text = manifest.render(inputs, template)
    manifest.check(text, mode)
    rendered = folder / f"{stem}.manifest.toml"
    rendered.write_text(text)
    _run([tool("gramine-manifest"), "--check", str(rendered), str(folder / f"{stem}.manifest")], "gramine-manifest")
    if mode == "direct":
        return Prepared(folder, stem, None)
    if key is None:
        raise StackError("an SGX enclave needs a signing key", fix="the runtime makes one under its state folder")
    signature = folder / f"{stem}.sig"
    _run(
        [tool("gramine-sgx-sign"), "--manifest", str(folder / f"{stem}.manifest"), "--output",
         str(folder / f"{stem}.manifest.sgx"), "--key", str(key), "--sigfile", str(signature)],
        "gramine-sgx-sign",
    )  # fmt: skip
    view = _run([tool("gramine-sgx-sigstruct-view"), "--output-format", "json", str(signature)], "sigstruct-view")
    return Prepared(folder, stem, json.loads(view)["mr_enclave"])


def command(prepared: Prepared, mode: str, here: bool = True) -> list[str]:
    """How the prepared enclave is started (in its folder): the manifest fixes the task's own command.
    ``here``: with this machine's Gramine (found on PATH now), else an image's (found on its PATH)."""
    name = "gramine-direct" if mode == "direct" else "gramine-sgx"
    return [tool(name) if here else name, prepared.stem]


def _run(args: list[str], what: str) -> str:
    return run(args, f"{what} failed", fix="see the manifest beside the task's logs")


def run(args: list[str], failed: str, fix: str, env: dict[str, str] | None = None) -> str:
    """``args``' output; when it fails, ``failed`` and its last line of output, with ``fix``."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StackError(f"{failed}: {tail[0]}", fix=fix)
    return done.stdout
