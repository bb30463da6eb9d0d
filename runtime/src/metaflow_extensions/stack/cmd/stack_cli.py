"""``metaflow stack``: images, the local registry, the dev Nomad and kind clusters, CI reports, the doctor and the
local stack.

Thin glue: every command calls the runtime and prints its result. A
``StackError`` becomes two lines (``error:`` and ``fix:``) and exit code 1,
never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from metaflow._vendor import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from metaflow_extensions.stack.cmd.ci_cli import ci
from metaflow_extensions.stack.cmd.cli_errors import friendly as _friendly
from metaflow_extensions.stack.cmd.server_options import FIXED_PORT
from metaflow_stack.errors import StackError

_out = Console()
_err = Console(stderr=True)


@click.group()
def cli() -> None:
    pass


@cli.group(help="Metaflow Stack: images, registry, local stack and environment checks.")
def stack() -> None:
    pass


stack.add_command(ci)


@stack.command(help="Show what this machine has for each capability, and how to fix what it lacks.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option(
    "--require",
    default="",
    help="Comma-separated check names that must pass (exit 1 otherwise), e.g. 'Docker engine,BuildKit'.",
)
@_friendly
def doctor(as_json: bool, require: str) -> None:
    from metaflow_stack.doctor import run_checks

    checks = run_checks()
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        table = Table(title="metaflow stack doctor")
        for column in ("check", "status", "found", "needed for", "fix"):
            table.add_column(column, overflow="fold")
        for c in checks:
            status = "[green]ok[/]" if c.ok else "[yellow]missing[/]"
            table.add_row(c.name, status, escape(c.detail), escape(c.needed_for), escape(c.fix))
        _out.print(table)
    wanted = {name.strip() for name in require.split(",") if name.strip()}
    unknown = wanted - {c.name for c in checks}
    if unknown:
        raise StackError(
            f"unknown check(s): {', '.join(sorted(unknown))}",
            fix=f"choose from: {', '.join(c.name for c in checks)}",
        )
    failing = [c.name for c in checks if c.name in wanted and not c.ok]
    if failing:
        raise StackError(f"required check(s) failing: {', '.join(failing)}", fix="apply the fixes in the table")


@stack.group(help="List, build, push and pull the images capabilities run in.")
def images() -> None:
    pass


def _names(names: tuple[str, ...]) -> list[str]:
    from metaflow_stack import catalog

    return [catalog.get(n).name for n in names] if names else catalog.names()


@images.command(name="list", help="List the catalog's images and whether each is built here.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@_friendly
def list_images(as_json: bool) -> None:
    from metaflow_stack import images as runtime_images

    infos = runtime_images.listing()
    if as_json:
        click.echo(json.dumps([info.__dict__ for info in infos], indent=2))
        return
    table = Table(title="images")
    for column in ("image", "reference", "built", "base", "description"):
        table.add_column(column, overflow="fold")
    for info in infos:
        table.add_row(info.name, info.ref, "yes" if info.present else "no", info.base, escape(info.description))
    _out.print(table)


@images.command(help="Build images (all when none are named); skipped when the tag is already built.")
@click.argument("names", nargs=-1)
@click.option("--push", is_flag=True, help="Push each image to the configured registry after building it.")
@click.option("--force", is_flag=True, help="Build even when an image with the same tag exists.")
@_friendly
def build(names: tuple[str, ...], push: bool, force: bool) -> None:
    from metaflow_stack import images as runtime_images

    for name in _names(names):
        if not names and not runtime_images.builds_here(name):  # all: those this platform builds
            _err.print(f"skipped {name}: it builds for other platforms only")
            continue
        click.echo(runtime_images.build(name, push=push, force=force, console=_err))


@images.command(help="Push built images to the configured registry (METAFLOW_STACK_REGISTRY).")
@click.argument("names", nargs=-1)
@_friendly
def push(names: tuple[str, ...]) -> None:
    from metaflow_stack import images as runtime_images

    for name in _names(names):
        click.echo(runtime_images.push_image(name, console=_err))


@images.command(
    help="Release images (all when none are named, each after its base): build and push each to a registry "
    "and write the image lock of their digests, which the runtime then pulls them by."
)
@click.argument("names", nargs=-1)
@click.option("--registry", help="Registry and path to push to (default: METAFLOW_STACK_REGISTRY).")
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False),
    help="Where to write the image lock (default: METAFLOW_STACK_IMAGE_LOCK). A release writes "
    "runtime/src/metaflow_stack/images.lock.json, which its wheel ships.",
)
@click.option(
    "--platform", "platforms", multiple=True, help="A platform to build for (repeat; needs buildx). Default: this one."
)
@click.option("--signed-by", help="The identity that signs the images (cosign keyless), recorded for verification.")
@click.option("--issuer", help="The OIDC issuer of --signed-by (default: GitHub Actions').")
@_friendly
def publish(
    names: tuple[str, ...],
    registry: str | None,
    lock_path: str | None,
    platforms: tuple[str, ...],
    signed_by: str | None,
    issuer: str | None,
) -> None:
    from metaflow_stack import image_lock, settings
    from metaflow_stack import images as runtime_images

    registry = (registry or settings.load().registry).rstrip("/")
    if not registry:
        raise StackError("no registry to publish to", fix="pass --registry or set METAFLOW_STACK_REGISTRY")
    if issuer and not signed_by:
        raise StackError("--issuer names the issuer of --signed-by, which is missing", fix="pass --signed-by too")
    signer = None
    if signed_by:
        signer = image_lock.Signer(identity=signed_by, issuer=issuer or image_lock.GITHUB_ACTIONS_ISSUER)
    where = Path(lock_path) if lock_path else settings.load().image_lock
    if where is None:
        raise StackError(
            "no place to write the image lock",
            fix="pass --lock PATH (then set METAFLOW_STACK_IMAGE_LOCK=PATH to pull by it), or set "
            "METAFLOW_STACK_IMAGE_LOCK",
        )
    lock = runtime_images.publish(_names(names), registry, where, platforms=platforms, signer=signer, console=_err)
    for name, released in lock.images.items():
        click.echo(f"{name}\t{lock.remote(released)}")


@images.command(help="Pull published images: released ones by their digest, others from the configured registry.")
@click.argument("names", nargs=-1)
@_friendly
def pull(names: tuple[str, ...]) -> None:
    from metaflow_stack import images as runtime_images

    for name in _names(names):
        click.echo(runtime_images.pull_image(name, console=_err))


@images.command(help="Build the local Debian and Python base images (for machines no registry serves).")
@_friendly
def bootstrap() -> None:
    from metaflow_stack import base_images
    from metaflow_stack.engines.docker import require_engine

    base_images.bootstrap(require_engine(), _err)
    click.echo(base_images.LOCAL_PYTHON)


@stack.group(help="A local image registry (CNCF Distribution) on 127.0.0.1.")
def registry() -> None:
    pass


@registry.command(name="up", help="Start the local registry unless it already answers.")
@click.option("--port", default=5000, show_default=True, type=FIXED_PORT, help="Port on 127.0.0.1.")
@_friendly
def registry_up(port: int) -> None:
    from metaflow_stack.registry import LocalRegistry

    local = LocalRegistry.default()
    address = LocalRegistry(home=local.home, port=port).start()
    click.echo(address)
    _err.print(f"export METAFLOW_STACK_REGISTRY={address} to publish and pull images there", highlight=False)


@registry.command(name="down", help="Stop the local registry started by `registry up`.")
@_friendly
def registry_down() -> None:
    from metaflow_stack.registry import LocalRegistry

    stopped = LocalRegistry.default().stop()
    _err.print("registry stopped" if stopped else "no local registry was running")


@stack.group(help="A local Nomad cluster for @nomad: a dev agent on 127.0.0.1 with ACLs, a namespace and a token.")
def nomad() -> None:
    pass


_NOMAD_PORT = click.option(
    "--port",
    default=4646,  # (dev_cluster.DEFAULT_PORT: that module is imported only when a command runs)
    show_default=True,
    type=click.IntRange(1, 65533),  # (and the two after it)
    envvar="METAFLOW_STACK_NOMAD_PORT",
    help="HTTP port of the agent on 127.0.0.1 (its RPC and Serf ports follow it).",
)


@nomad.command(name="up", help="Start the dev agent (unless it answers) and set it up for flows.")
@_NOMAD_PORT
@_friendly
def nomad_up(port: int) -> None:
    from metaflow_stack.nomad.dev_cluster import LocalNomad

    local = LocalNomad(port=port)
    cluster = local.start()
    _err.print(
        f"Nomad on {cluster.address} (ACLs on): flows run in the namespace {cluster.namespace!r} with a token "
        f"that holds its policy alone; the management token is in {local.home / 'management-token'} (mode 600)",
        highlight=False,
    )
    _out.print(cluster.exports(), highlight=False, soft_wrap=True)


@nomad.command(name="down", help="Stop the dev agent started by `nomad up` (its jobs and tokens end with it).")
@_NOMAD_PORT
@_friendly
def nomad_down(port: int) -> None:
    from metaflow_stack.nomad.dev_cluster import LocalNomad

    _err.print("Nomad agent stopped" if LocalNomad(port=port).stop() else "no dev Nomad agent was running")


@stack.group(
    help="The stack on a local kind cluster: Argo Workflows, S3, PostgreSQL, NATS, the metadata service and "
    "the UI, installed by infra/pulumi's program, and the Metaflow profile that reaches them."
)
def cluster() -> None:
    pass


def _profile_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
        raise click.BadParameter("letters, digits, '.', '_' and '-' only (a file name: config_<profile>.json)")
    return value


_PROFILE = click.option(
    "--profile",
    default="stack-cluster",
    show_default=True,
    callback=_profile_name,
    help="The Metaflow profile to write (METAFLOW_PROFILE).",
)


def _print_exports(exports: dict[str, str]) -> None:
    import shlex

    line = "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items())
    _out.print(line, markup=False, highlight=False, soft_wrap=True)


@cluster.command(name="up", help="Make the kind cluster, install the stack on it, and write the Metaflow profile.")
@click.option("--namespace", default="metaflow", show_default=True, help="The namespace of the stack and its runs.")
@_PROFILE
@_friendly
def cluster_up(namespace: str, profile: str) -> None:
    from metaflow_stack.cluster import dev

    exports = dev.up(lambda line: _err.print(line, markup=False, highlight=False), namespace, profile)
    _err.print(f"the stack is up; runs use it with the profile {profile!r}: eval the line below", markup=False)
    _print_exports(exports)


@cluster.command(name="config", help="Write the Metaflow profile of the stack that is up again; print its line.")
@_PROFILE
@_friendly
def cluster_config(profile: str) -> None:
    from metaflow_stack.cluster import dev

    _print_exports(dev.config(profile))


@cluster.command(name="down", help="Delete the kind cluster and all the stack made on it.")
@_friendly
def cluster_down() -> None:
    from metaflow_stack.cluster import dev

    dev.down(lambda line: _err.print(line, markup=False, highlight=False))


@stack.command(
    help="Bring up the local stack (the metadata service: SQLite, or PostgreSQL and NATS with Docker) "
    "and run the hello demo recorded by it."
)
@click.option("--no-docker", is_flag=True, help="Run on the embedded defaults even when Docker answers.")
@click.option(
    "--service-port",
    default=8080,
    show_default=True,
    type=FIXED_PORT,
    envvar="METAFLOW_STACK_SERVICE_PORT",
    help="Port of the metadata service on 127.0.0.1.",
)
@click.option(
    "--log-root",
    "log_roots",
    multiple=True,
    envvar="METAFLOW_STACK_SERVICE_LOG_ROOTS",
    help="Another datastore root (folder or s3://bucket/prefix) whose task logs the service may serve; "
    "the demo's is always served.",
)
@click.option(
    "--with",
    "extras",
    multiple=True,
    type=click.Choice(["redis", "key-release"]),
    help="Also start redis (the queue of @worker_pool(backend='redis')) or key-release (the keys of @confidential "
    "steps, for attested and, on this machine, direct-mode enclaves), on 127.0.0.1 with the stack's secrets; repeat.",
)
@click.option(
    "--redis-port",
    default=6379,
    show_default=True,
    type=FIXED_PORT,
    envvar="METAFLOW_STACK_REDIS_PORT",
    help="Port of the stack's Redis on 127.0.0.1 (with --with redis).",
)
@click.option(
    "--key-release-port",
    default=8325,
    show_default=True,
    type=FIXED_PORT,
    envvar="METAFLOW_STACK_KEY_RELEASE_PORT",
    help="Port of the stack's key-release service on 127.0.0.1 (with --with key-release).",
)
@_friendly
def up(
    no_docker: bool,
    service_port: int,
    log_roots: tuple[str, ...],
    extras: tuple[str, ...],
    redis_port: int,
    key_release_port: int,
) -> None:
    from metaflow_stack import demo
    from metaflow_stack.local_secrets import stack_key, stack_key_path
    from metaflow_stack.service.local import LocalService

    key, made = stack_key()
    if made:  # shown this once; afterwards only the file names it
        _err.print(f"the stack's key, kept in {stack_key_path()} (mode 600): {key}", highlight=False)
    roots = (str(demo.demo_datastore()), *(str(Path(r).resolve()) if "://" not in r else r for r in log_roots))
    service = LocalService(port=service_port, log_roots=roots, auth_key=key).start(_err, use_docker=not no_docker)
    _err.print(f"metadata service on {service.url}: {service.storage}, events {service.events}", highlight=False)
    result = demo.run(_err, use_docker=not no_docker, service_url=service.url, auth_key=key)
    _out.print(f"[green]ok[/] {result.pathspec} ran in {result.where}: {result.message}", highlight=False)
    if "redis" in extras:
        from metaflow_stack.pool.local_redis import LocalRedis
        from metaflow_stack.pool.redis_queue import URL_VARIABLE

        local_redis = LocalRedis(port=redis_port)
        local_redis.start()
        _err.print(f"redis on 127.0.0.1:{redis_port} for @worker_pool(backend='redis')", highlight=False)
        _out.print(
            f'for worker pools: export {URL_VARIABLE}="{local_redis.shell_url()}"', highlight=False, soft_wrap=True
        )
    if "key-release" in extras:
        from metaflow_stack.confidential.keyring import KEY_RELEASE_KEY
        from metaflow_stack.confidential.local_service import LocalKeyRelease

        key_release = LocalKeyRelease(port=key_release_port)
        key_release.start()
        _err.print(f"key release on {key_release.url}; policies: {key_release.policies}/NAME.toml", highlight=False)
        _out.print(
            f'for @confidential: export METAFLOW_STACK_KEY_RELEASE_URL={key_release.url} {KEY_RELEASE_KEY}="$(cat '
            f'{key_release.key_path})"',
            highlight=False,
            soft_wrap=True,
        )
    _out.print(
        f"point Metaflow at the service: export METAFLOW_DEFAULT_METADATA=service METAFLOW_SERVICE_URL={service.url} "
        f'METAFLOW_SERVICE_AUTH_KEY="$(cat {stack_key_path()})"',
        highlight=False,
        soft_wrap=True,
    )


@stack.command(help="Stop what `up` and `registry up` started; other runs' steps and deployed servers keep running.")
@click.option("--purge", is_flag=True, help="Also delete the metadata service's data (database and broker volumes).")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Also remove every other container the stack launched (running @devcontainer steps, function servers).",
)
@click.option("--yes", is_flag=True, help="Do not ask before removing with --all.")
@_friendly
def down(purge: bool, everything: bool, yes: bool) -> None:
    from metaflow_stack.confidential.local_service import LocalKeyRelease
    from metaflow_stack.engines import OWNER_LABEL, STACK_UP, get_engine
    from metaflow_stack.errors import DockerUnavailableError
    from metaflow_stack.pool.local_redis import LocalRedis
    from metaflow_stack.registry import LocalRegistry
    from metaflow_stack.service.local import FOLDER_LABEL, LocalService

    if everything and not yes:
        click.confirm(
            "Remove every container the stack launched, including running steps and deployed servers?", abort=True
        )
    service = LocalService()
    stops = {
        "metadata service stopped" + (" and its data deleted" if purge else " (its data is kept)"): (
            lambda: service.stop(purge=purge)
        ),
        "registry stopped": LocalRegistry.default().stop,
        "redis stopped": LocalRedis().stop,
        "key release stopped (its master key is kept)": LocalKeyRelease().stop,
    }
    for stopped, stop in stops.items():
        try:
            if stop():
                _err.print(stopped)
        except StackError as left:  # (what stays, named with its fix: down goes on with the rest)
            _err.print(f"[yellow]note:[/] {escape(str(left))}", highlight=False)
    try:
        # (what `up` of this state folder left: another folder's stack is another user's, or another checkout's)
        removed = get_engine("docker").cleanup(
            None if everything else {OWNER_LABEL: STACK_UP, FOLDER_LABEL: service.folder}
        )
    except DockerUnavailableError:
        removed = 0
    _err.print(f"removed {removed} container(s) " + ("the stack launched" if everything else "`up` left behind"))
