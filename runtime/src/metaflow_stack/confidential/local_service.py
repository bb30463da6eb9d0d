"""The local stack's key-release service, as ``just up --with key-release`` starts it.

``metaflow confidential key-release`` as a background process on 127.0.0.1,
keyed with a key of its own, never the stack's (``key_path``; given in its
environment, on no command line),
its master key made once in the state folder (mode 0600), its policies the
``NAME.toml`` files of the state folder's ``key-release/policies`` (empty at
first: add the policies the flows name), and unattested ``gramine-direct``
enclaves allowed, as fits a developer's machine. ``down`` stops it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from metaflow_stack.confidential.keyring import KEY_RELEASE_KEY, master_secret
from metaflow_stack.daemon import Daemon
from metaflow_stack.errors import StackError
from metaflow_stack.local_secrets import secret, state_dir

DEFAULT_PORT = 8325
#: Where ``stack up`` is told another port (``--key-release-port``).
PORT_VARIABLE = "METAFLOW_STACK_KEY_RELEASE_PORT"
#: Seconds the service has to answer once started.
START_TIMEOUT_S = 30.0


class LocalKeyRelease:
    """Starts and stops the local stack's key-release service."""

    def __init__(self, home: Path | None = None, port: int = DEFAULT_PORT) -> None:
        self.home = home or state_dir() / "key-release"
        self.port = port
        self.daemon = Daemon(self.home, "key-release")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def policies(self) -> Path:
        return self.home / "policies"

    @property
    def key_path(self) -> Path:
        """The service's own key (0600), made once: never the stack's, which every task of a run on the
        stack's metadata service holds (on other machines too), and which would then open a service that
        releases data keys without attestation (``--allow-direct``) to whoever sends it."""
        return self.home / "auth-key"

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        """Start the service (or find this folder's running) on 127.0.0.1, keyed with its own key
        (``key_path``); never taking whatever else answers on the port for it."""
        self.policies.mkdir(parents=True, exist_ok=True)
        master_secret(self.home / "master.key", make=True)  # made once here; the service only reads it
        key, _ = secret(self.key_path)
        command = [sys.executable, "-m", "metaflow.cmd.main_cli", "confidential", "key-release",
                   "--port", str(self.port), "--policies", str(self.policies),
                   "--master-key-file", str(self.home / "master.key"), "--allow-direct"]  # fmt: skip
        if self.daemon.start(
            command,
            self.answers,
            START_TIMEOUT_S,
            ports=(self.port,),
            port_fix=f"choose another with --key-release-port ({PORT_VARIABLE}), or stop what listens there",
            stop_fix="stop it first (`metaflow stack down`)",
            env={KEY_RELEASE_KEY: key},
        ):
            return
        raise StackError(
            f"the key-release service did not answer on {self.url}",
            fix=f"see {self.home / 'key-release.log'}; is port {self.port} taken? set {PORT_VARIABLE}",
        )

    def stop(self) -> bool:
        """Stop what ``start`` started; whether something was running."""
        return self.daemon.stop()
