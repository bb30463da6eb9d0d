"""The options every ``metaflow ... serve`` command shares for who may reach it (``http_guard``)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from metaflow._vendor import click

#: A TCP port, 0 letting the system pick one where a command can say which it got: anything else is refused by
#: click in one line naming the option (Python's own error, past 65535, came from deep in a server's start).
PORT = click.IntRange(0, 65535)
#: A port that must be named (a registry's, or a Nomad agent's first of three).
FIXED_PORT = click.IntRange(1, 65535)


def listening(host: str, port: int) -> tuple[socket.socket, str]:
    """A socket bound to ``host``:``port`` (0: a free port), and the URL a user opens to reach it: bound here, so
    the port is known before the server starts and a busy one is one line naming the fix."""
    from metaflow_stack.errors import StackError
    from metaflow_stack.http_guard import WILDCARDS

    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # (as uvicorn binds: a server started again takes its port while the last one's connections wait out
    # TIME_WAIT; a port another process listens on is still refused)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise StackError(
            f"cannot listen on {host}:{port}: {exc.strerror}", fix="pick another --port (0: any free one)"
        ) from None
    # On every interface (in a container, say), the link to print is the one this machine opens.
    shown = "127.0.0.1" if host in WILDCARDS else host
    return listener, f"http://{shown if ':' not in shown else f'[{shown}]'}:{listener.getsockname()[1]}/"


def serve_on(listener: socket.socket, host: str, app: Any, server: type | None = None, **options: Any) -> None:
    """Run ``app`` under uvicorn (``server``, a ``uvicorn.Server`` class) on ``listener`` from ``listening``,
    with uvicorn's ``options`` (uvicorn says no address for a socket it is given: the command says its URL)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=listener.getsockname()[1], **options)
    (server or uvicorn.Server)(config).run(sockets=[listener])


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
