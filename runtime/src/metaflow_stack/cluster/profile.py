"""The Metaflow profile that reaches the dev stack, and the S3 credentials this machine uses there.

Metaflow reads a profile from ``$METAFLOW_HOME/config_<name>.json`` when
``METAFLOW_PROFILE=<name>``: the S3 datastore in the stack's bucket (reached
here through the published port, ``METAFLOW_DATATOOLS_CLIENT_PARAMS``), the
metadata service (here at its published port, in the cluster at its own
name) with its key, the namespace, service account and Secret Metaflow's
Kubernetes and Argo Workflows tasks run with. The S3 credentials go to an
AWS config file of their own (``AWS_CONFIG_FILE``), as boto reads them. Both
files hold secrets: mode 0600. Each profile written is recorded in the state
folder, so that ``remove`` (at ``cluster down``) deletes every one of them with
the AWS config file: none is left holding the key of a cluster that is gone.
"""

from __future__ import annotations

import configparser
import io
import json
import os
from pathlib import Path
from typing import Any

from metaflow_stack.local_secrets import keep

PROFILE = "stack-cluster"
#: The state folder's record of the profiles written (one path a line): ``--profile`` may name any.
_WRITTEN = "profiles"
_AWS_CONFIG = "aws_config"


def settings(outputs: dict[str, Any], auth_key: str) -> dict[str, Any]:
    """The profile's settings from the stack's outputs."""
    root = outputs["datastore_root"]
    return {
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": root,
        "METAFLOW_DATATOOLS_S3ROOT": f"{root}/data",
        # This machine's S3 endpoint only: Metaflow would give tasks METAFLOW_S3_ENDPOINT_URL as it is, and
        # they reach S3 by the cluster's DNS (AWS_ENDPOINT_URL_S3 in the task Secret).
        "METAFLOW_DATATOOLS_CLIENT_PARAMS": {"endpoint_url": outputs["s3_endpoint"]},
        "METAFLOW_DEFAULT_METADATA": "service",
        "METAFLOW_SERVICE_URL": outputs["service_url"],
        "METAFLOW_SERVICE_INTERNAL_URL": outputs["service_internal_url"],
        "METAFLOW_SERVICE_AUTH_KEY": auth_key,
        "METAFLOW_KUBERNETES_NAMESPACE": outputs["namespace"],
        "METAFLOW_KUBERNETES_SECRETS": outputs["task_secret"],
        # The task Secret carries the service's key as Metaflow's headers: a deployed flow's template
        # leaves its own copy (which Metaflow would write in plain) out.
        "METAFLOW_ARGO_WORKFLOWS_ENV_VARS_TO_SKIP": "METAFLOW_SERVICE_HEADERS",
        "METAFLOW_KUBERNETES_SERVICE_ACCOUNT": outputs["service_account"],
        # Tasks run in the stack's base image (Metaflow, the runtime, boto3), loaded into the cluster.
        "METAFLOW_KUBERNETES_CONTAINER_IMAGE": outputs["task_image"],
        # What a task asks of the one kind node when its step names no size (Metaflow's own defaults, 1 CPU,
        # 4 GB and 10 GB of disk, would leave room for one or two tasks beside the stack); requests, not
        # limits (Metaflow's Burstable QoS), so a step that needs more still gets what the node has free.
        "METAFLOW_KUBERNETES_CPU": "0.25",
        "METAFLOW_KUBERNETES_MEMORY": "512",
        "METAFLOW_KUBERNETES_DISK": "2048",
        "METAFLOW_UI_URL": outputs["ui_url"],
    }


def metaflow_home() -> Path:
    """Where Metaflow looks for profiles (``METAFLOW_HOME``, else ``~/.metaflowconfig``)."""
    return Path(os.path.expanduser(os.environ.get("METAFLOW_HOME", "~/.metaflowconfig")))


def write(outputs: dict[str, Any], auth_key: str, secret_key: str, state: Path, name: str) -> dict[str, str]:
    """Write the profile and the AWS config file; the variables that select both.

    Those variables replace the shell's own AWS configuration (``AWS_CONFIG_FILE``, and no shared
    credentials file): where they are exported, S3 is the stack's.
    """
    access_key = outputs["s3_access_key"]
    profile = (metaflow_home() / f"config_{name}.json").absolute()
    written = _written(state)
    if profile not in written:  # recorded first: a profile is never there unrecorded
        keep(state / _WRITTEN, "".join(f"{path}\n" for path in [*written, profile]))
    keep(profile, json.dumps(settings(outputs, auth_key), indent=2) + "\n")
    aws = state / _AWS_CONFIG
    config = configparser.ConfigParser()
    config["default"] = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key, "region": "us-east-1"}
    text = io.StringIO()
    config.write(text)
    keep(aws, text.getvalue())
    return {"METAFLOW_PROFILE": name, "AWS_CONFIG_FILE": str(aws), "AWS_SHARED_CREDENTIALS_FILE": ""}


def _written(state: Path) -> list[Path]:
    record = state / _WRITTEN
    return [Path(line) for line in record.read_text().splitlines() if line] if record.exists() else []


def remove(state: Path) -> list[Path]:
    """Delete every profile written for the stack, the default one, and the AWS config file (they hold its
    key and S3's); the files that were there."""
    candidates = dict.fromkeys([*_written(state), metaflow_home() / f"config_{PROFILE}.json", state / _AWS_CONFIG])
    removed = [path for path in candidates if path.exists()]
    for path in removed:
        path.unlink()
    (state / _WRITTEN).unlink(missing_ok=True)
    return removed
