"""``metaflow ui``: the Metaflow Stack UI on this machine, on a local datastore or the metadata service.

Thin glue over ``metaflow_stack.ui``: pick the source, bind a socket on
127.0.0.1 (so the port is known, and a busy port is one line, before the
server starts), print the URL, open a browser when one is there, serve.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import quote

from metaflow._vendor import click

from metaflow_extensions.stack.cmd.cli_errors import friendly
from metaflow_extensions.stack.cmd.server_options import PORT, exposure_options, listening, serve_on


@click.group()
def cli() -> None:
    pass


@cli.command(help="Serve the Metaflow Stack UI: runs, live DAGs, timelines, logs and artifacts.")
@click.option("--port", default=8324, show_default=True, type=PORT, help="0 picks a free port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 exposes your runs).")
@click.option(
    "--datastore-root",
    "datastore_roots",
    multiple=True,
    help="The local datastore (.metaflow folder) to show [default: the one Metaflow would use here]; with "
    "--service-url, the datastore roots (folders or s3://bucket/prefix) whose values may be previewed (repeat).",
)
@click.option(
    "--service-url",
    help="Show the runs this project's metadata service records (and follow its event stream) instead.",
)
@click.option("--no-browser", is_flag=True, help="Only print the URL.")
@click.option("--log-level", default="warning", show_default=True, type=click.Choice(["debug", "info", "warning"]))
@exposure_options
@friendly
def ui(
    port: int,
    host: str,
    datastore_roots: tuple[str, ...],
    service_url: str | None,
    no_browser: bool,
    log_level: str,
    allowed_hosts: tuple[str, ...],
    insecure: bool,
) -> None:
    from metaflow_stack.http_guard import Guard, check_exposure, configured_key
    from metaflow_stack.ui.app import OPEN_PATHS, SIGN_IN, create_app

    key = configured_key("METAFLOW_STACK_UI_AUTH_KEY")
    check_exposure(host, key, insecure)
    source, where = _source(datastore_roots, service_url)
    listener, url = listening(host, port)
    click.echo(f"Metaflow Stack UI on {url} ({where})", err=True)
    if key:
        # The key is shown only to a person at a terminal: a container's or a service's output is collected
        # into logs, which must never hold it.
        shown = quote(key) if sys.stderr.isatty() else "<your key>"
        click.echo(f"sign in (once per browser): {url.rstrip('/')}{SIGN_IN}?key={shown}", err=True)
    # Not with a key: the link would be on the browser's command line, which every user here can read.
    if not no_browser and not key and _has_display():
        import webbrowser

        webbrowser.open(url)
    guard = Guard(host, key, allowed_hosts, open_paths=OPEN_PATHS, cookie=True)
    # No access log: it would print the sign-in link's query, the key, at --log-level info.
    app = create_app(source, guard=guard)
    serve_on(listener, host, app, log_level=log_level, timeout_graceful_shutdown=2, access_log=False)


def _source(datastore_roots: tuple[str, ...], service_url: str | None) -> tuple[object, str]:
    """The UI's source and a few words saying where it reads."""
    from metaflow_stack.agent.source import AgentError
    from metaflow_stack.errors import StackError

    if service_url:
        from metaflow_stack.ui.service_runs import ServiceRuns

        source = ServiceRuns(service_url, datastore_roots, os.environ.get("METAFLOW_SERVICE_AUTH_KEY") or None)
        try:
            source.check()
        except AgentError as exc:
            raise StackError(exc.message, fix=exc.fix) from None
        roots = ", ".join(datastore_roots) or "none: no previews"
        return source, f"metadata service: {service_url}; values read from: {roots}"
    from metaflow_stack.ui.local_runs import LocalRuns

    if len(datastore_roots) > 1:
        raise StackError("one --datastore-root at a time without --service-url", fix="pass one .metaflow folder")
    root = Path(datastore_roots[0]) if datastore_roots else _configured_root()
    if not root.is_dir():
        raise StackError(
            f"no Metaflow datastore at {root}",
            fix="run a flow here first (python flow.py run), or pass --datastore-root DIR",
        )
    return LocalRuns(root.resolve()), f"datastore: {root.resolve()}"


def _configured_root() -> Path:
    from metaflow.plugins.datastores.local_storage import LocalStorage

    found = LocalStorage.get_datastore_root_from_config(lambda *args, **kwargs: None, create_on_absent=False)
    return Path(found) if found else Path.cwd() / ".metaflow"


def _has_display() -> bool:
    """A desktop to open a browser on (macOS, Windows, or an X/Wayland session)."""
    return (
        os.name == "nt"
        or os.uname().sysname == "Darwin"
        or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    )
