"""The one place settings are read, the way Metaflow reads its own.

Each setting ``X`` comes from ``METAFLOW_STACK_X`` in the environment, then
the project's ``.metaflow/config.json``, then ``$METAFLOW_HOME/config.json``,
then the default here. Settings are read on every call rather than frozen at
import, so a long-lived process (a server, a test session) sees changes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from metaflow_stack.errors import RegistryError, StackError

#: The public Python base image, used whenever a registry can serve it: Debian bookworm, the release of the
#: local base made without a registry, so both give every image the same system (glibc 2.36, which function
#: images' wheels are chosen for), and one Gramine's package repository publishes for.
PUBLIC_BASE_IMAGE = "python:3.11-slim-bookworm"
#: The Python (major.minor) of every stack image, the one above and the local base alike (Debian bookworm's).
IMAGE_PYTHON = "3.11"

#: What Docker takes as the front of an image reference: a host (a name, an IPv4 address or a bracketed IPv6
#: one) with an optional port, then repository path components, which must be lowercase.
_REGISTRY = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)"
    r"(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)

#: Environment variables that may name a CA bundle, in order of preference.
CA_BUNDLE_VARIABLES = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


@dataclass(frozen=True)
class Settings:
    """A snapshot of every Metaflow Stack setting."""

    registry: str
    image_namespace: str
    base_image: str
    ca_bundle: Path | None
    images_dir: Path | None
    state_dir: Path
    docker_client: str
    #: The image lock to pull released images by (``image_lock``); ``None``: the one shipped with the runtime.
    image_lock: Path | None = None
    #: The key-release service ``@confidential`` launchers ask (``confidential.service``); empty: they keep
    #: the keys and judge evidence themselves.
    key_release_url: str = ""
    #: The secp256k1 key (compressed, hex) of the KMS whose signature a Phala CVM's variable key must carry
    #: (``confidential.phala``); empty: nothing is encrypted to a CVM.
    phala_kms_signer: str = ""
    #: How many times a Ray started in this process (``ray_start``) is started before a busy machine is
    #: reported (each try waits Ray's fixed 30 seconds for its node), as configured: read by ``at_least_one``
    #: where it is used, so a bad value fails only what uses it, not ``import metaflow``.
    ray_start_tries: str = "3"
    #: The image Gramine ``@confidential`` steps' own images build FROM (``confidential.step_image``); empty:
    #: the catalog's ``gramine`` image, found, pulled or built.
    gramine_image: str = ""

    def as_metaflow_config(self) -> dict[str, str]:
        """The settings as ``STACK_*`` names for ``metaflow.metaflow_config``."""
        return {
            "STACK_REGISTRY": self.registry,
            "STACK_IMAGE_NAMESPACE": self.image_namespace,
            "STACK_BASE_IMAGE": self.base_image,
            "STACK_CA_BUNDLE": str(self.ca_bundle or ""),
            "STACK_IMAGES_DIR": str(self.images_dir or ""),
            "STACK_STATE_DIR": str(self.state_dir),
            "STACK_DOCKER_CLIENT": self.docker_client,
            "STACK_IMAGE_LOCK": str(self.image_lock or ""),
            "STACK_KEY_RELEASE_URL": self.key_release_url,
            "STACK_PHALA_KMS_SIGNER": self.phala_kms_signer,
            "STACK_RAY_START_TRIES": self.ray_start_tries,
            "STACK_GRAMINE_IMAGE": self.gramine_image,
        }


def _ca_bundle(configured: str) -> Path | None:
    """The CA bundle to hand to builds: configured, else named by the environment."""
    candidates = [configured] if configured else [os.environ.get(v, "") for v in CA_BUNDLE_VARIABLES]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def load() -> Settings:
    """Read every setting now."""
    # Imported here: importing metaflow loads the extension's config module,
    # which calls this function, so this module must not import metaflow first.
    from metaflow.metaflow_config_funcs import from_conf

    images_dir = from_conf("STACK_IMAGES_DIR", "")
    image_lock = from_conf("STACK_IMAGE_LOCK", "")
    state_dir = from_conf("STACK_STATE_DIR", "") or str(Path.home() / ".cache" / "metaflow-stack")
    return Settings(
        registry=from_conf("STACK_REGISTRY", "").rstrip("/"),
        image_namespace=from_conf("STACK_IMAGE_NAMESPACE", "metaflow-stack"),
        base_image=from_conf("STACK_BASE_IMAGE", ""),
        ca_bundle=_ca_bundle(from_conf("STACK_CA_BUNDLE", "")),
        images_dir=Path(images_dir) if images_dir else None,
        state_dir=Path(state_dir),
        docker_client=from_conf("STACK_DOCKER_CLIENT", ""),
        image_lock=Path(image_lock) if image_lock else None,
        key_release_url=from_conf("STACK_KEY_RELEASE_URL", ""),
        phala_kms_signer=from_conf("STACK_PHALA_KMS_SIGNER", ""),
        ray_start_tries=str(from_conf("STACK_RAY_START_TRIES", "3")),
        gramine_image=from_conf("STACK_GRAMINE_IMAGE", ""),
    )


def at_least_one(name: str, value: str) -> int:
    """Setting ``name``'s ``value`` as a whole number of at least one, else a ``StackError`` naming it."""
    text = value.strip()
    if text.isascii() and text.isdigit() and int(text) >= 1:
        return int(text)
    raise StackError(
        f"METAFLOW_{name} is {value!r}, not a whole number of at least one", fix=f"set METAFLOW_{name} to 1 or more"
    )


def port_number(name: str, value: str) -> int:
    """Setting ``name``'s ``value`` as a TCP port (1 to 65535), else a ``StackError`` naming it: read inside a
    flow, a bad one must not end it with a traceback."""
    text = value.strip()
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    raise StackError(f"METAFLOW_{name} is {value!r}, not a port number", fix=f"set METAFLOW_{name} to 1 to 65535")


def checked_registry(registry: str, setting: str) -> str:
    """``registry`` when Docker can put it in front of an image's name; else one line naming ``setting``."""
    if not _REGISTRY.fullmatch(registry):
        raise RegistryError(
            f"{setting} is {registry!r}, which is not a registry Docker can name: host[:port][/path], "
            "the path in lowercase",
            fix=f"set {setting} to an address such as 127.0.0.1:5000 or registry.example.com/team",
        )
    return registry
