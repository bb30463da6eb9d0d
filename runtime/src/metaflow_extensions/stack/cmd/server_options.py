"""The options every ``metaflow ... serve`` command shares for who may reach it (``http_guard``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metaflow._vendor import click


def exposure_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--allowed-host`` (repeatable) and ``--insecure-no-auth``, passed as ``allowed_hosts`` and ``insecure``."""
    command = click.option(
        "--insecure-no-auth",
        "insecure",
        is_flag=True,
        envvar="METAFLOW_STACK_INSECURE_NO_AUTH",
        help="Serve beyond loopback without a key: anyone who reaches the port may read and write.",
    )(command)
    return click.option(
        "--allowed-host",
        "allowed_hosts",
        multiple=True,
        envvar="METAFLOW_STACK_ALLOWED_HOSTS",
        help="Another host name clients use to reach this server (a proxy's, a cluster's); repeat it, or list "
        "them separated by spaces in the variable. Other names are refused (DNS rebinding).",
    )(command)
