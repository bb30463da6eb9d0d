"""``metaflow function``: serve bound functions.

Thin glue over ``metaflow_stack.serving``; errors print ``error:``/``fix:``
lines and exit 1, as ``metaflow stack`` does.
"""

from __future__ import annotations

from metaflow._vendor import click

from metaflow_extensions.stack.cmd.cli_errors import friendly


@click.group()
def cli() -> None:
    pass


@cli.group(help="Serve functions bound with JsonFunction.")
def function() -> None:
    pass


@function.command(help="Serve REF (a reference JSON file, a bundle folder or an s3:// bundle) over HTTP.")
@click.argument("ref")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; loopback unless told.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="Function worker processes.")
@click.option("--backend", default="local", show_default=True, type=click.Choice(["inprocess", "local", "ray"]))
@friendly
def serve(ref: str, host: str, port: int, workers: int, backend: str) -> None:
    import uvicorn

    from metaflow_stack.serving import ServeOptions, create_app

    app = create_app(ref, ServeOptions(backend=backend, workers=workers))
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)


@function.command(name="build-image", help="Build the image serving REF, in the environment it was bound in.")
@click.argument("ref")
@click.option("--kind", default="fastapi", show_default=True, type=click.Choice(["fastapi"]))
@friendly
def build_image(ref: str, kind: str) -> None:
    from rich.console import Console

    from metaflow_stack.serving.image import build_image as build

    click.echo(build(ref, kind, Console(stderr=True)))
