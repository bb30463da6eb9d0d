"""The local Nomad cluster of ``just nomad-up``: a dev agent with ACLs on, a namespace for flows, a token.

``nomad agent -dev`` with ``infra/nomad/dev/agent.hcl`` runs as a background
process of this machine's stack (on 127.0.0.1, its state in memory). ``up``
then bootstraps the agent's ACLs, applies the ``metaflow`` namespace and the
policy in ``infra/nomad/dev/metaflow.policy.hcl``, and creates a client token
holding that policy alone: flows run with the least a ``@nomad`` run needs,
so the dev cluster proves the policy every production cluster is given.
Both tokens are kept in the state folder (mode 0600) and never printed; the
line to export reads the flows' token from its file. Run against the agent
it started before, ``up`` keeps the tokens it still accepts: running it twice
changes nothing; an agent it did not start is refused, never handed a token.
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaflow_stack.daemon import Daemon
from metaflow_stack.deploy import infra_root
from metaflow_stack.engines.nomad.client import NomadClient, Settings, Unavailable
from metaflow_stack.engines.nomad.jobspec import namespace_name
from metaflow_stack.errors import StackError, ToolMissingError
from metaflow_stack.local_secrets import keep, state_dir

#: The namespace flows run in, and the policy that lets them (named alike).
NAMESPACE = POLICY = "metaflow"
DEFAULT_PORT = 4646
#: Seconds a starting agent has to elect itself leader, and then to have a client node ready for docker jobs.
START_TIMEOUT_S = NODE_TIMEOUT_S = 60.0
#: Seconds a new leader has to take the ACL bootstrap.
BOOTSTRAP_S = 15.0
#: Seconds a stopping agent has to stop its tasks before it is killed.
STOP_GRACE_S = 30.0
INSTALL_FIX = (
    "install Nomad (https://developer.hashicorp.com/nomad/install) so that `nomad` is on PATH, then run `just nomad-up`"
)


@dataclass(frozen=True)
class DevCluster:
    """Where the cluster answers, and the token file flows use."""

    address: str
    namespace: str
    token_file: Path

    def exports(self) -> str:
        """The shell line that points Nomad's CLI and ``@nomad`` at the cluster (the token read from its file)."""
        token = shlex.quote(str(self.token_file))
        return f'export NOMAD_ADDR={self.address} NOMAD_NAMESPACE={self.namespace} NOMAD_TOKEN="$(cat {token})"'


def dev_folder() -> Path:
    """``infra/nomad/dev``: the agent's configuration and the flows' policy."""
    return infra_root() / "nomad" / "dev"


def policy_rules(namespace: str = NAMESPACE) -> str:
    """The rules of ``metaflow.policy.hcl``, for ``namespace``: one file says what a run may do, wherever."""
    namespace_name(namespace)
    rules = (dev_folder() / "metaflow.policy.hcl").read_text(encoding="utf-8")
    label = f'namespace "{NAMESPACE}"'
    if rules.count(label) != 1:
        raise StackError(f"metaflow.policy.hcl must hold one {label} block", fix="restore the file from the checkout")
    return rules.replace(label, f'namespace "{namespace}"')


class LocalNomad:
    """Starts and stops the dev agent on ``port``, and sets it up for flows; its pid file and tokens are kept
    in a folder of that port's."""

    def __init__(self, home: Path | None = None, port: int = DEFAULT_PORT) -> None:
        self.home = home or state_dir() / "nomad" / str(port)
        self.port = port
        self.daemon = Daemon(self.home, "nomad")

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answers(self) -> bool:
        """Whether an agent answers here with a leader elected."""
        try:
            with NomadClient(Settings(address=self.address)) as client:
                return bool(client.leader())
        except StackError:
            return False

    def start(self) -> DevCluster:
        """Start the agent unless this folder's runs already, then set it up (``configure``). An agent of
        anyone else's on these ports is refused, never handed our tokens."""
        binary = shutil.which("nomad")
        if binary is None:
            raise ToolMissingError("nomad is not installed", fix=INSTALL_FIX)
        ports = self.home / "ports.hcl"
        http, rpc, serf = self.port, self.port + 1, self.port + 2
        text = f"ports {{\n  http = {http}\n  rpc  = {rpc}\n  serf = {serf}\n}}\n"
        command = [binary, "agent", "-dev", "-config", str(dev_folder() / "agent.hcl"), "-config", str(ports)]
        if not self.daemon.start(
            command,
            self.answers,
            START_TIMEOUT_S,
            ports=(http, rpc, serf),
            port_fix="choose other ports with --port (METAFLOW_STACK_NOMAD_PORT; the two after it are taken too), "
            "or stop what listens there",
            stop_fix=f"stop it first (`metaflow stack nomad down --port {self.port}`)",
            config=(ports, text),
            umask=0o022,  # its tasks' containers read the alloc dirs it makes (hashicorp/nomad#2723)
        ):
            raise StackError(
                f"the Nomad agent did not answer on {self.address}",
                fix=f"see {self.daemon.log}; are ports {self.port}-{self.port + 2} taken? "
                "set METAFLOW_STACK_NOMAD_PORT",
            )
        return configure(self.address, self.home)

    def stop(self) -> bool:
        """Stop what ``start`` started, forgetting its tokens (a dev agent's ACLs end with it)."""
        stopped = self.daemon.stop(grace_s=STOP_GRACE_S)
        if stopped:
            for name in ("management-token", "token"):
                (self.home / name).unlink(missing_ok=True)
        return stopped


def configure(address: str, home: Path) -> DevCluster:
    """Bootstrap the ACLs of the agent at ``address`` (or use the management token kept in ``home``), apply
    the namespace and the policy, keep a client token holding only that policy, and wait until a client node
    takes docker jobs (a job sent earlier would find no node)."""
    management = _kept_token(address, home / "management-token") or _bootstrap(address)
    keep(home / "management-token", management)
    with NomadClient(Settings(address=address, token=management)) as admin:
        admin.put_namespace(NAMESPACE, "Metaflow runs (@nomad)")
        admin.put_policy(POLICY, policy_rules(), "What a @nomad run needs in its namespace")
        if _kept_token(address, home / "token") is None:
            keep(home / "token", str(admin.create_token("metaflow-flows", [POLICY])["SecretID"]))
        deadline = time.monotonic() + NODE_TIMEOUT_S
        while not any(_takes_docker(node) for node in admin.nodes()):
            if time.monotonic() > deadline:
                raise StackError(
                    f"no client node of the Nomad agent at {address} takes docker jobs",
                    fix="is Docker running, and may the agent's user reach it? see the agent's log",
                )
            time.sleep(0.5)
    return DevCluster(address, NAMESPACE, home / "token")


def _bootstrap(address: str) -> str:
    """The first management token of the agent at ``address`` (asked again for a while when it answers 5xx:
    a leader just elected may not take it yet)."""
    deadline = time.monotonic() + BOOTSTRAP_S
    with NomadClient(Settings(address=address)) as client:
        try:
            while True:
                try:
                    return str(client.bootstrap_acl()["SecretID"])
                except Unavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        except Unavailable:
            raise
        except (StackError, KeyError) as exc:
            if "ACL support disabled" in str(exc):
                said = f"a Nomad agent without ACLs answers at {address}"
            else:
                said = f"the Nomad agent at {address} will not hand out its first token: its ACLs were set up elsewhere"
            raise StackError(
                said, fix="stop that agent, or start the dev cluster on another port (METAFLOW_STACK_NOMAD_PORT)"
            ) from None


def _takes_docker(node: dict[str, Any]) -> bool:
    docker = (node.get("Drivers") or {}).get("docker") or {}
    return node.get("Status") == "ready" and bool(docker.get("Healthy"))


def _kept_token(address: str, path: Path) -> str | None:
    """The token kept at ``path``, while the agent at ``address`` still accepts it."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    try:
        with NomadClient(Settings(address=address, token=secret)) as client:
            client.token_self()
    except StackError:
        return None
    return secret
