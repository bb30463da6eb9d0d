"""The options every ``metaflow ... serve`` command shares for who may reach it (``http_guard``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metaflow._vendor import click

#: A TCP port, 0 letting the system pick one where a command can say which it got: anything else is refused by
#: click in one line naming the option (Python's own error, past 65535, came from deep in a server's start).
PORT = click.IntRange(0, 65535)
#: A port that must be named (a registry's, or a Nomad agent's first of three).
FIXED_PORT = click.IntRange(1, 65535)


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
