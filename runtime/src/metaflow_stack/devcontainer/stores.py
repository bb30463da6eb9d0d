"""What a step's container needs to reach the run's datastore and metadata, wherever they live.

* A local datastore is mounted at its own path (see ``launch``): no network needed.
* An S3 datastore is reached over the network (``network="bridge"``) with the host's S3 settings
  and AWS credentials (the variables, and the AWS SDK's files mounted read-only: ``aws_files``).
* Local metadata beside an S3 datastore is the host's ``.metaflow`` folder, mounted at its path.
* A metadata service is reached at its URL, which must be an address a container can reach: a
  service on the host's loopback is not (it binds 127.0.0.1 by default, for safety).

Credentials travel as the container's environment, never in an image or a log line.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from urllib.parse import urlparse

from metaflow_stack.engines import Mount, flow_mounts
from metaflow_stack.errors import StackError

#: The task's working folder in a container (a fresh one on the container's ``/tmp``).
WORKDIR = "/tmp/metaflow"

DATASTORES = ("local", "s3")
#: AWS variables a step in a container needs to read and write S3 as the host does.
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)
#: Metaflow settings (whatever set them: variables or config files) the step inside needs.
S3_SETTINGS = ("S3_ENDPOINT_URL", "S3_VERIFY_CERTIFICATE", "DATASTORE_SYSROOT_S3", "DATATOOLS_S3ROOT")
SERVICE_SETTINGS = ("SERVICE_URL", "SERVICE_AUTH_KEY", "SERVICE_HEADERS")
AWS_DIR = "/mf/aws"
#: The variables naming the AWS SDK's files, and each file's name in ``~/.aws`` and in ``AWS_DIR``.
AWS_FILES = {"AWS_CONFIG_FILE": "config", "AWS_SHARED_CREDENTIALS_FILE": "credentials"}


def check(datastore: str, network: str, metadata: str | None = None) -> None:
    """Refuse a combination a sandboxed step could not work in (``metadata``: when it is known)."""
    if datastore not in DATASTORES:
        raise StackError(
            f"@devcontainer runs with the {' or '.join(DATASTORES)} datastore, not {datastore}",
            fix="run with --datastore local or --datastore s3",
        )
    if datastore != "local" and network == "none":
        raise StackError(
            f"an {datastore} datastore is reached over the network, and this step has none",
            fix='use @devcontainer(network="bridge")',
        )
    if metadata == "service":
        if network == "none":
            raise StackError(
                "the metadata service is reached over the network, and this step has none",
                fix='use @devcontainer(network="bridge")',
            )
        from metaflow.metaflow_config import SERVICE_URL

        host = urlparse(SERVICE_URL or "").hostname or ""
        if host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
            raise StackError(
                f"the metadata service at {SERVICE_URL} is on this machine's loopback, which a container cannot reach",
                fix="serve it where containers reach it (metaflow service serve --host <the Docker bridge's address>)"
                " and point METAFLOW_SERVICE_URL there",
            )


def check_remote(backend: str, datastore: str, metadata: str | None) -> None:
    """A workspace on another machine reaches the run's stores over the network: S3 and the service."""
    if datastore != "s3" or metadata not in (None, "service"):
        raise StackError(
            f"a {backend} workspace runs on another machine, where this machine's local datastore and metadata are not",
            fix="run with --datastore s3 --metadata service",
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def environment(datastore: str, metadata: str) -> dict[str, str]:
    """The variables the step inside needs for ``datastore`` and ``metadata``."""
    from metaflow import metaflow_config

    names = (S3_SETTINGS if datastore == "s3" else ()) + (SERVICE_SETTINGS if metadata == "service" else ())
    env = {}
    for name in names:
        value = getattr(metaflow_config, name, None)
        if value not in (None, "", {}):
            env[f"METAFLOW_{name}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    if datastore == "s3":
        env.update({name: os.environ[name] for name in AWS_VARIABLES if name in os.environ})
        env.update(aws_files()[1])
    return env


def aws_files() -> tuple[list[Mount], dict[str, str]]:
    """The AWS SDK's files as the host's SDK reads them, mounted read-only at ``AWS_DIR``, and the variables
    that name them there.

    With neither ``AWS_CONFIG_FILE`` nor ``AWS_SHARED_CREDENTIALS_FILE`` set, the ``~/.aws`` folder they
    default to. With either set, exactly the two files (the one not named at its default), each alone:
    the folder a named file sits in may hold anything (``AWS_CONFIG_FILE=~/aws.conf``: the whole home)."""
    default = Path.home() / ".aws"
    if not any(os.environ.get(name) for name in AWS_FILES):
        if not default.is_dir():
            return [], {}
        return [Mount(str(default), AWS_DIR, read_only=True)], {name: f"{AWS_DIR}/{f}" for name, f in AWS_FILES.items()}
    found, env = [], {}
    for name, file in AWS_FILES.items():
        source = Path(os.path.expanduser(os.environ.get(name) or default / file)).absolute()
        if source.is_file():
            found.append(Mount(str(source), f"{AWS_DIR}/{file}", read_only=True))
            env[name] = f"{AWS_DIR}/{file}"
    return found, env


def mounts(datastore: str, metadata: str, local_root: str | None, flow: str) -> list[Mount]:
    """Host paths the step inside needs: AWS's files (read-only), local metadata's root (``flow``'s folder
    writable: ``flow_mounts``)."""
    found = []
    if datastore == "s3":
        found += aws_files()[0]
    if metadata == "local" and local_root:
        found += flow_mounts(local_root, flow)
    return found


def container_stores(flow_datastore, metadata: str, env: dict[str, str]) -> list[Mount]:
    """Mounts (and variables, added to ``env``) that reach the run's datastore and metadata from a container
    on this machine: a local datastore at its own path, local metadata at its own, AWS's settings.

    Local metadata is named to the container by its folder (``METAFLOW_DATASTORE_SYSROOT_LOCAL``) even
    beside a local datastore, and local cards are mounted where Metaflow looks for them, below the task's
    working folder (``WORKDIR/.metaflow/mf.cards``): Metaflow finds both from the working folder (the
    task's card process does), and a container's holds neither, so its cards were rendered into the
    container's ``/tmp`` and lost. (``METAFLOW_CARD_LOCALROOT`` cannot name them: with it set, Metaflow's
    card command keeps the datastore's root, and the cards land where this machine's client never looks.)
    """
    from metaflow.plugins.cards.card_datastore import CardDatastore
    from metaflow.plugins.datastores.local_storage import LocalStorage

    datastore, local_root, flow = flow_datastore.TYPE, None, flow_datastore.flow_name
    found = []
    if datastore == "local":
        root = flow_datastore.datastore_root
        found += flow_mounts(root, flow)
        cards = CardDatastore.get_storage_root("local")  # where this machine's client reads them
        if cards is not None:
            found += flow_mounts(cards, flow, f"{WORKDIR}/.metaflow/{os.path.basename(cards)}")
    if metadata == "local":
        local_root = LocalStorage.get_datastore_root_from_config(lambda *_: None, create_on_absent=True)
        env["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = os.path.dirname(local_root)  # Metaflow adds ".metaflow"
        if any(mount.source == local_root for mount in found):
            local_root = None  # mounted already, as the datastore
    return found + mounts(datastore, metadata, local_root, flow)
