"""What of this machine a task run elsewhere (a pod, a container, a Nomad job) takes, and what it must not:
the run's Metaflow settings go; what names this machine (its paths, its files, its profile) stays."""

from __future__ import annotations

import json
import os

#: Variables of a task's environment that describe the runtime's machine, not the one a pod or container is.
MACHINE_VARIABLES = frozenset(
    {"PATH", "HOME", "PWD", "OLDPWD", "SHELL", "TMPDIR", "HOSTNAME", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    | {"LD_LIBRARY_PATH", "LD_PRELOAD", "CONDA_PREFIX", "SSH_AUTH_SOCK", "XDG_RUNTIME_DIR", "DISPLAY", "TERM"}
    | {"TMP", "TEMP", "KUBECONFIG"}
)

#: Variables naming a file of the runtime's machine: kept only where this machine has that file too.
MACHINE_FILES = frozenset(
    {"SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "AWS_CA_BUNDLE", "METAFLOW_HOME"}
    | {"AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "GOOGLE_APPLICATION_CREDENTIALS"}
)

#: Variables that are the stack's own, not Metaflow's settings: nothing elsewhere gets them.
NOT_SETTINGS = ("METAFLOW_STACK_",)
#: Variables that name this machine's Metaflow configuration rather than hold it.
PROFILE_VARIABLES = frozenset({"METAFLOW_PROFILE", "METAFLOW_HOME"})


def metaflow_settings() -> dict[str, str]:
    """The run's Metaflow settings, which a pod or job needs before it imports Metaflow (Metaflow reads them once,
    at import: a task's own variables come too late for its S3 endpoint, say): the configuration
    profile's values and this process's ``METAFLOW_*`` variables over them, less the stack's own (its
    keys and the pool's settings: the pods need none of them) and those naming a file or profile of this
    machine (the pods have no ``config_<profile>.json``: its values are here already)."""
    from metaflow.metaflow_config_funcs import METAFLOW_CONFIG

    settings = {**METAFLOW_CONFIG, **{k: v for k, v in os.environ.items() if k.startswith("METAFLOW_")}}
    return {
        name: value if isinstance(value, str) else json.dumps(value)
        for name, value in settings.items()
        if not name.startswith(NOT_SETTINGS) and name not in MACHINE_FILES and name not in PROFILE_VARIABLES
    }
