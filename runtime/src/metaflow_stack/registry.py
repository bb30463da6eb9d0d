"""A local image registry (CNCF Distribution) on 127.0.0.1, and registry health checks.

The registry runs as a plain process from the Distribution binary
(``registry``, or ``docker-registry`` as Debian packages it) with a config file
written here, so it works on a machine no registry serves; its storage lives
under the state directory and survives restarts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx

from metaflow_stack.daemon import Daemon
from metaflow_stack.errors import RegistryError, ToolMissingError
from metaflow_stack.local_secrets import state_dir

_BINARIES = ("registry", "docker-registry")
_LOOPBACK_HOSTS = ("127.", "localhost", "[::1]")

_CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {host}:{port}
"""


def _base_url(registry: str) -> str:
    scheme = "http" if registry.startswith(_LOOPBACK_HOSTS) else "https"
    return f"{scheme}://{registry}"


def ping(registry: str, timeout: float = 3.0) -> bool:
    """Whether a registry answers the Distribution API at ``registry`` (host:port)."""
    try:
        response = httpx.get(f"{_base_url(registry)}/v2/", timeout=timeout)
    except (httpx.HTTPError, httpx.InvalidURL):  # (a malformed setting is no registry either)
        return False
    return response.status_code in (200, 401)


def tags(registry: str, repository: str) -> list[str]:
    """The tags a registry holds for ``repository``."""
    response = httpx.get(f"{_base_url(registry)}/v2/{repository}/tags/list", timeout=10)
    if response.status_code == 404:
        return []
    response.raise_for_status()
    return sorted(response.json().get("tags") or [])


@dataclass(frozen=True)
class LocalRegistry:
    """A Distribution registry process bound to ``host:port``, its files under ``home``."""

    home: Path
    host: str = "127.0.0.1"
    port: int = 5000

    @classmethod
    def default(cls) -> LocalRegistry:
        """The registry ``just registry`` starts: 127.0.0.1:5000 under the state directory."""
        return cls(home=state_dir() / "registry")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def daemon(self) -> Daemon:
        return Daemon(self.home, "registry")

    def start(self, wait_seconds: float = 15.0) -> str:
        """Start the registry unless this folder's runs already, on this address; return its address.

        A registry answering on the port counts as this one only when this folder's process serves it
        (``daemon``): anything else there (another user's registry, say) would be handed every image
        pushed, and serve every pull; the port is refused instead.
        """
        binary = next((b for b in map(shutil.which, _BINARIES) if b), None)
        if binary is None:
            raise ToolMissingError(
                "the Distribution registry binary is not installed",
                fix="install it (`sudo apt-get install docker-registry` on Debian), "
                "or point METAFLOW_STACK_REGISTRY at an existing registry",
            )
        (self.home / "storage").mkdir(parents=True, exist_ok=True, mode=0o700)
        config = self.home / "config.yml"
        text = _CONFIG.format(storage=self.home / "storage", host=self.host, port=self.port)
        if self.daemon.start(
            [binary, "serve", str(config)],
            lambda: ping(self.address, timeout=0.5),
            wait_seconds,
            ports=(self.port,),
            port_fix=f"choose another port (`metaflow stack registry up --port N`), or stop what serves {self.address}",
            stop_fix="stop it first (`metaflow stack registry down`)",
            config=(config, text),
        ):
            return self.address
        raise RegistryError(
            f"the registry did not start on {self.address}; see {self.home / 'registry.log'}",
            fix=f"free port {self.port} or choose another with --port",
        )

    def stop(self) -> bool:
        """Stop the registry this object started; return whether one was running."""
        return self.daemon.stop()
