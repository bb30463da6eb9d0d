"""``metaflow service``: run and migrate the metadata service.

Thin glue over ``metaflow_stack.service``. Options also read
``METAFLOW_STACK_SERVICE_*`` variables, so a container or a job spec sets
them without a command line; the auth key is only ever read that way or from
a prompt-free option, never logged.
"""

from __future__ import annotations

from metaflow._vendor import click

from metaflow_extensions.stack.cmd.cli_errors import friendly
from metaflow_extensions.stack.cmd.numbers import FiniteRange
from metaflow_extensions.stack.cmd.server_options import PORT, exposure_options, listening, serve_on


def _default_database() -> str:
    from metaflow_stack.settings import load

    return str(load().state_dir / "metadata.db")


@click.group()
def cli() -> None:
    pass


@cli.group(help="The metadata service: Metaflow's REST API with pages, filters and events.")
def service() -> None:
    pass


_database = click.option(
    "--database",
    envvar="METAFLOW_STACK_SERVICE_DATABASE",
    help="A SQLite file path or postgresql://user:pass@host/db [default: metadata.db in the stack's state folder].",
)


@service.command(help="Serve the metadata service (point METAFLOW_SERVICE_URL at it).")
@_database
@click.option("--read-database", envvar="METAFLOW_STACK_SERVICE_READ_DATABASE", help="A read replica for reads.")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="METAFLOW_STACK_SERVICE_HOST")
@click.option("--port", default=8080, show_default=True, type=PORT, envvar="METAFLOW_STACK_SERVICE_PORT")
@click.option(
    "--nats-url",
    envvar="METAFLOW_STACK_SERVICE_NATS_URL",
    help="Publish events to NATS JetStream (nats://host:4222); without it events stay in this process.",
)
@click.option(
    "--heartbeat-cutoff",
    default=360,
    show_default=True,
    type=click.IntRange(1),
    envvar="METAFLOW_STACK_SERVICE_HEARTBEAT_CUTOFF",
    help="Seconds without a heartbeat after which a run or task is no longer running.",
)
@click.option(
    "--log-root",
    "log_roots",
    multiple=True,
    envvar="METAFLOW_STACK_SERVICE_LOG_ROOTS",
    help="A datastore root (folder or s3://bucket/prefix) whose task logs the logs route may read; "
    "repeat it, or list roots separated by spaces in the variable. Without one, logs are not served.",
)
@click.option(
    "--event-retention-days",
    default=30.0,
    show_default=True,
    type=FiniteRange(min=0.001, max=36_500),
    envvar="METAFLOW_STACK_SERVICE_EVENT_RETENTION_DAYS",
    help="Published events older than this leave the event log and the JetStream stream (replay reaches this far).",
)
@click.option("--log-level", default="warning", show_default=True, type=click.Choice(["debug", "info", "warning"]))
@exposure_options
@friendly
def serve(
    database: str | None,
    read_database: str | None,
    host: str,
    port: int,
    nats_url: str | None,
    heartbeat_cutoff: int,
    log_roots: tuple[str, ...],
    event_retention_days: float,
    log_level: str,
    allowed_hosts: tuple[str, ...],
    insecure: bool,
) -> None:
    import uvicorn

    from metaflow_stack.http_guard import check_exposure, configured_key
    from metaflow_stack.service.app import ServiceConfig, create_app

    key = configured_key("METAFLOW_STACK_SERVICE_AUTH_KEY")
    check_exposure(host, key, insecure)
    url = database or _default_database()
    _migrate(url)  # here, so an unreachable database is one line, not a server's traceback
    config = ServiceConfig(
        database_url=url,
        read_database_url=read_database,
        auth_key=key,
        host=host,
        allowed_hosts=allowed_hosts,
        nats_url=nats_url,
        heartbeat_cutoff_s=heartbeat_cutoff,
        migrate=False,
        log_roots=log_roots,
        event_retention_s=event_retention_days * 86400,
    )
    app = create_app(config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # Event streams never end by themselves; ending them lets in-flight requests finish promptly.
            app.state.hub.close_streams()
            super().handle_exit(sig, frame)

    listener, address = listening(host, port)
    click.echo(f"metadata service on {address} (database: {_redacted(url)})", err=True)
    serve_on(listener, host, app, Server, log_level=log_level, timeout_graceful_shutdown=10)


@service.command(help="Create or upgrade the service's schema, then exit.")
@_database
@friendly
def migrate(database: str | None) -> None:
    url = database or _default_database()
    _migrate(url)
    click.echo(f"schema up to date: {_redacted(url)}", err=True)


def _migrate(url: str) -> None:
    from sqlalchemy.exc import DBAPIError

    from metaflow_stack.errors import StackError
    from metaflow_stack.service.database import connect
    from metaflow_stack.service.database import migrate as run_migrations

    try:
        db = connect(url)
    except ImportError as exc:  # (a driver SQLAlchemy knows, not installed here)
        raise StackError(
            f"no driver here for the database URL {_redacted(url)} ({exc.name or exc})",
            fix="use postgresql:// (psycopg, installed) or a SQLite file path",
        ) from None
    except (ValueError, TypeError) as exc:  # (SQLAlchemy's words for a URL it cannot use)
        raise StackError(
            f"cannot use the database URL {_redacted(url)}: {str(exc).splitlines()[0]}",
            fix="give a SQLite file path or postgresql://user:password@host:5432/database",
        ) from None
    try:
        run_migrations(db)
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise StackError(
            f"cannot use the database {_redacted(url)}: {reason}",
            fix="check --database (METAFLOW_STACK_SERVICE_DATABASE) and that the database server runs",
        ) from None
    finally:
        db.dispose()


def _redacted(url: str) -> str:
    """``url`` with its password hidden; one that does not parse, by its scheme alone (it may hold one)."""
    from sqlalchemy.engine import make_url

    from metaflow_stack.service.database import normalize_url

    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except (ValueError, TypeError):
        return f"{url.partition('://')[0]}://..." if "://" in url else "(a path)"
