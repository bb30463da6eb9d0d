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


@function.command(help="Run REF over a .jsonl or .parquet file with Ray Data; rerunning resumes where it stopped.")
@click.argument("ref")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder of part-NNNNN.jsonl results.")
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--concurrency", default=1, show_default=True, type=int, help="Actors in the pool.")
@click.option("--num-cpus", default=1.0, show_default=True, type=float, help="CPUs per actor.")
@click.option("--num-gpus", default=0.0, show_default=True, type=float, help="GPUs per actor.")
@click.option("--shard-size", default=10_000, show_default=True, type=int, help="Records per output part.")
@friendly
def batch(
    ref: str,
    input_path: str,
    output: str,
    batch_size: int,
    concurrency: int,
    num_cpus: float,
    num_gpus: float,
    shard_size: int,
) -> None:
    from pathlib import Path

    from metaflow_stack.serving.batch import BatchOptions, run_batch

    options = BatchOptions(batch_size, concurrency, num_cpus, num_gpus, shard_size)
    counts = run_batch(ref, Path(input_path), Path(output), options)
    click.echo(f"{counts['done']} shard(s) written, {counts['skipped']} already done, in {output}")
