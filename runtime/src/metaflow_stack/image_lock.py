"""The image lock: the digest each catalog image was released as, shipped inside the runtime.

The release workflow publishes every image, writes this lock into the
runtime and only then builds the wheel, so an installed runtime pulls
exactly what was released with it: by digest, never by tag. A tag can be
moved to other content by anyone who can push; a digest names the content,
and the engine checks what it pulls against it.

An entry is used only where it applies. In a checkout, the images' sources
are here and every image's tag is the hash of them: the lock is used when
its reference equals the one the sources hash to, so a changed tree (or
another base image) builds instead of pulling an image of other sources. An
installed wheel has no sources, and its lock is the only way to its images.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metaflow_stack import settings
from metaflow_stack.deploy import write_atomically
from metaflow_stack.errors import RegistryError, StackError

#: Where a release writes the lock: beside this module, so the wheel carries it.
SHIPPED = Path(__file__).with_name("images.lock.json")
#: The OIDC issuer of GitHub Actions' keyless signing certificates.
GITHUB_ACTIONS_ISSUER = "https://token.actions.githubusercontent.com"


class Signer(BaseModel):
    """Who signed the released images (cosign keyless): the workflow's identity and its OIDC issuer."""

    model_config = ConfigDict(extra="forbid")

    identity: str = Field(min_length=1)
    issuer: str = Field(min_length=1)


class LockedImage(BaseModel):
    """One released image: its registry-less reference (as built here) and the digest it was published as."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(pattern=r"^[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")

    @property
    def repository(self) -> str:
        return self.ref.rsplit(":", 1)[0]


class ImageLock(BaseModel):
    """The whole lock: one registry, every released image, and who signed them (when they were signed)."""

    model_config = ConfigDict(extra="forbid")

    registry: str = Field(min_length=1)
    images: dict[str, LockedImage]
    signer: Signer | None = None

    def remote(self, image: LockedImage) -> str:
        """The pull reference of ``image``: by digest."""
        return f"{self.registry}/{image.repository}@{image.digest}"


def path() -> Path:
    """The lock in use: ``METAFLOW_STACK_IMAGE_LOCK`` when set, else the one shipped with the runtime."""
    return settings.load().image_lock or SHIPPED


def load() -> ImageLock | None:
    """The lock, or ``None`` when the runtime ships none (a checkout between releases).

    A lock named by ``METAFLOW_STACK_IMAGE_LOCK`` must be there: without it
    the runtime would quietly pull by tag or build, the opposite of asking
    for a lock.
    """
    where = path()
    named = settings.load().image_lock is not None
    try:
        text = where.read_text()
    except FileNotFoundError:
        if not named:
            return None
        raise StackError(
            f"METAFLOW_STACK_IMAGE_LOCK names {where}, which does not exist",
            fix="point it at the lock `metaflow stack images publish --lock` wrote, or unset it",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StackError(
            f"the image lock {where} cannot be read: {exc}", fix="restore the lock the release shipped"
        ) from None
    try:
        return ImageLock.model_validate_json(text)
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "the file"
        raise StackError(
            f"the image lock {where} is not valid: {field}: {problem['msg']}",
            fix="restore the lock the release shipped, or unset METAFLOW_STACK_IMAGE_LOCK",
        ) from None


def write(lock: ImageLock, where: Path) -> Path:
    """Write ``lock`` whole, or not at all."""
    return write_atomically(where, json.dumps(lock.model_dump(exclude_none=True), indent=2, sort_keys=True) + "\n")


#: cosign's exit statuses for an image it holds no signature of the signer on: none at all (10), none that
#: verifies (12), one without a certificate (13) (its ``cmd/cosign/errors/exit_codes.go``). Any other failure
#: means it could not check.
_NOT_SIGNED = frozenset({10, 12, 13})


def _cosign_error(stderr: str) -> str:
    """cosign's error on one line: its ``Error:`` line and the lines it continues on (several signatures'
    errors), without the log line repeating it after; else the last line it wrote."""
    lines = stderr.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Error: ")), None)
    if start is None:
        return lines[-1] if lines else "no reason given"
    said = [lines[start].removeprefix("Error: ")]
    said += [line.strip() for line in lines[start + 1 :] if line.startswith((" ", "\t"))]
    return " ".join(said)


def verify_signature(lock: ImageLock, image: LockedImage) -> bool:
    """Check ``image``'s signature with cosign against the lock's signer; ``False`` when cosign is not here.

    Raises when cosign is here and cannot show the image was signed by the
    signer: either it was not (never use the image), or cosign could not
    check (the registry or Sigstore out of reach: the image is not used
    either, and the fix says what to reach).
    """
    cosign = shutil.which("cosign")
    if lock.signer is None or cosign is None:
        return False
    remote = lock.remote(image)
    command = [cosign, "verify", "--output", "json", remote]
    command += ["--certificate-identity", lock.signer.identity, "--certificate-oidc-issuer", lock.signer.issuer]
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason, refused = str(exc), False
    else:
        if result.returncode == 0:
            return True
        reason, refused = _cosign_error(result.stderr), result.returncode in _NOT_SIGNED
    if refused:
        raise RegistryError(
            f"{remote} is not signed by {lock.signer.identity}: {reason}",
            fix="do not use this image; report it to the project, or build the images from their sources "
            "(`metaflow stack images build base`, then the others)",
        )
    raise RegistryError(
        f"the signature of {remote} could not be checked: {reason}",
        fix="let this machine reach the registry and Sigstore (Rekor, TUF), or log in to the registry "
        "(`docker login`); the image is not used until its signature checks",
    )
