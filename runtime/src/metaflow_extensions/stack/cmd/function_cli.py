"""``metaflow function``: serve bound functions.

Thin glue over ``metaflow_stack.serving``; errors print ``error:``/``fix:``
lines and exit 1, as ``metaflow stack`` does.
"""

from __future__ import annotations

from metaflow._vendor import click

from metaflow_extensions.stack.cmd.cli_errors import friendly
from metaflow_extensions.stack.cmd.numbers import FiniteRange
from metaflow_extensions.stack.cmd.server_options import FIXED_PORT, PORT, exposure_options, listening, serve_on
from metaflow_stack.functions import MAX_CALL_TIMEOUT


@click.group()
def cli() -> None:
    pass


@cli.group(help="Serve functions bound with JsonFunction.")
def function() -> None:
    pass


@function.command(help="Serve REF (a reference JSON file, a bundle folder or an s3:// bundle) over HTTP.")
@click.argument("ref")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; loopback unless told.")
@click.option("--port", default=8000, show_default=True, type=PORT)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Function worker processes.")
@click.option("--backend", default="local", show_default=True, type=click.Choice(["inprocess", "local", "ray"]))
@click.option(
    "--max-concurrency",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    envvar="METAFLOW_STACK_SERVE_MAX_CONCURRENCY",
    help="Requests in flight; as many again may wait for a slot, and one more is answered 503 at once.",
)
@click.option(
    "--max-batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    envvar="METAFLOW_STACK_SERVE_MAX_BATCH_SIZE",
    help="Concurrent requests one call to the function may take together; 1 turns batching off.",
)
@click.option(
    "--call-timeout",
    type=FiniteRange(0, MAX_CALL_TIMEOUT),
    envvar="METAFLOW_STACK_SERVE_CALL_TIMEOUT",
    help="Seconds a call to the function may take per input; past it its worker is stopped and the request "
    "answered 504. "
    "0: no bound.  [default: 60; none with --backend inprocess, whose calls cannot be stopped]",
)
@exposure_options
@friendly
def serve(
    ref: str,
    host: str,
    port: int,
    workers: int,
    backend: str,
    max_concurrency: int,
    max_batch_size: int,
    call_timeout: float | None,
    allowed_hosts: tuple[str, ...],
    insecure: bool,
) -> None:

    from metaflow_stack.errors import StackError
    from metaflow_stack.http_guard import Guard, check_exposure, configured_key
    from metaflow_stack.serving.app import OPEN_PATHS, ServeOptions, create_app

    if backend == "inprocess" and call_timeout:
        raise StackError(
            "--backend inprocess runs calls in the server's own threads, which --call-timeout cannot stop",
            fix="use --backend local (the default), or leave out --call-timeout",
        )
    key = configured_key("METAFLOW_STACK_SERVE_AUTH_KEY")
    check_exposure(host, key, insecure)
    options = ServeOptions(
        backend,
        workers,
        max_concurrency=max_concurrency,
        max_batch_size=max_batch_size,
        call_timeout=ServeOptions.call_timeout if call_timeout is None else call_timeout or None,
    )
    listener, url = listening(host, port)  # (first: a port in use is said before the function loads)
    click.echo(f"function server on {url}", err=True)
    app = create_app(ref, options, Guard(host, key, allowed_hosts, open_paths=OPEN_PATHS))
    # No access log: a line per request is work on every call of a hot path; /metrics counts them instead.
    serve_on(listener, host, app, log_level="info", timeout_graceful_shutdown=30, access_log=False)


@function.command(name="build-image", help="Build the image running REF, in the environment it was bound in.")
@click.argument("ref")
@click.option(
    "--kind",
    default="fastapi",
    show_default=True,
    type=click.Choice(["fastapi", "ray"]),
    help="fastapi: an HTTP server (function-fastapi); ray: a Ray Data batch runner (function-ray).",
)
@click.option("--push", is_flag=True, help="Also push it to the configured registry (METAFLOW_STACK_REGISTRY).")
@friendly
def build_image(ref: str, kind: str, push: bool) -> None:
    from rich.console import Console

    from metaflow_stack.serving.image import build_image as build

    click.echo(build(ref, kind, push=push, console=Console(stderr=True)))


@function.command(help="Deploy REF's server: run it here (docker), or render it for a cluster (kubernetes, nomad).")
@click.argument("ref")
@click.option("--target", default="docker", show_default=True, type=click.Choice(["docker", "kubernetes", "nomad"]))
@click.option("--image", help="Deploy this image instead of building REF's function-fastapi image.")
@click.option("--name", help="Container, release or job name  [default: function-<function name>]")
@click.option("--namespace", default="default", show_default=True, help="Kubernetes or Nomad namespace.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(0))
@click.option("--cpu", default=0.5, show_default=True, type=FiniteRange(0.01), help="CPUs per replica.")
@click.option("--memory", default=1024, show_default=True, type=click.IntRange(64), help="MiB per replica.")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--port", default=8000, show_default=True, type=FIXED_PORT, help="docker: host port, on 127.0.0.1.")
@click.option("--output", type=click.Path(file_okay=False), help="kubernetes, nomad: where the rendered files go.")
@click.option("--apply", is_flag=True, help="kubernetes: kubectl apply; nomad: register with NOMAD_ADDR.")
@click.option("--auth-secret", help="kubernetes: the Secret whose auth-key holds the server's key.")
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="kubernetes, nomad: serve without a key (anyone who reaches the server may call it).",
)
@friendly
def deploy(
    ref: str,
    target: str,
    image: str | None,
    name: str | None,
    namespace: str,
    replicas: int,
    cpu: float,
    memory: int,
    max_batch_size: int,
    port: int,
    output: str | None,
    apply: bool,
    auth_secret: str | None,
    insecure_no_auth: bool,
) -> None:
    from pathlib import Path

    from rich.console import Console

    from metaflow_stack.serving.deploy import DeployOptions
    from metaflow_stack.serving.deploy import deploy as run_deploy

    where = Path(output) if output else None
    options = DeployOptions(
        target,
        image,
        name,
        namespace,
        replicas,
        cpu,
        memory,
        max_batch_size,
        port,
        where,
        apply,
        auth_secret=auth_secret,
        insecure_no_auth=insecure_no_auth,
    )
    console = Console(stderr=True)
    done = run_deploy(ref, options, console)
    console.print(f"next: {done.next_step}")
    click.echo(done.url or done.files[0])


@function.command(help="Run REF over a .jsonl or .parquet file with Ray Data; rerunning resumes where it stopped.")
@click.argument("ref")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder of part-NNNNN.jsonl results.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1), help="Actors in the pool.")
@click.option("--num-cpus", default=1.0, show_default=True, type=FiniteRange(0), help="CPUs per actor.")
@click.option("--num-gpus", default=0.0, show_default=True, type=FiniteRange(0), help="GPUs per actor.")
@click.option("--shard-size", default=10_000, show_default=True, type=click.IntRange(1), help="Records per part.")
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
