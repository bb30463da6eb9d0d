"""``metaflow confidential key-release``: the key-release service of ``@confidential`` steps.

Thin glue over ``metaflow_stack.confidential.service``: read the master
secret and the policy folder, refuse in one line what cannot serve, and
serve. Launchers find it through ``STACK_KEY_RELEASE_URL``.
"""

from __future__ import annotations

from pathlib import Path

from metaflow._vendor import click

from metaflow_extensions.stack.cmd.cli_errors import friendly
from metaflow_extensions.stack.cmd.server_options import PORT, exposure_options, listening, serve_on


@click.group()
def cli() -> None:
    pass


@cli.group(help="Trusted Execution Environments: the services @confidential steps rely on.")
def confidential() -> None:
    pass


@confidential.command(
    name="key-release",
    help="Serve run data keys to attested enclaves only (point STACK_KEY_RELEASE_URL at it).",
)
@click.option("--host", default="127.0.0.1", show_default=True, envvar="METAFLOW_STACK_KEY_RELEASE_HOST")
@click.option("--port", default=8325, show_default=True, type=PORT)
@click.option(
    "--policies",
    type=click.Path(file_okay=False),
    required=True,
    envvar="METAFLOW_STACK_KEY_RELEASE_POLICIES",
    help="The folder of policies (NAME.toml); a step's policy='policies/NAME.toml' is held to this NAME.toml.",
)
@click.option(
    "--master-key-file",
    type=click.Path(dir_okay=False),
    envvar="METAFLOW_STACK_KEY_RELEASE_MASTER_KEY_FILE",
    help="A file of 64 hex digits every data key derives from (a mounted Secret; it must exist) [default: one "
    "made once in the state folder]. Keep it: without it no sealed value opens again.",
)
@click.option(
    "--allow-direct",
    is_flag=True,
    help="Also release keys to unattested gramine-direct enclaves (development only: no TEE protects them).",
)
@click.option("--collateral", type=click.Path(dir_okay=False), help="A DCAP collateral file (offline verification).")
@click.option("--pccs-url", envvar="METAFLOW_STACK_PCCS_URL", help="The PCCS collateral is fetched from.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"]))
@exposure_options
@friendly
def key_release(
    host: str,
    port: int,
    policies: str,
    master_key_file: str | None,
    allow_direct: bool,
    collateral: str | None,
    pccs_url: str | None,
    log_level: str,
    allowed_hosts: tuple[str, ...],
    insecure: bool,
) -> None:
    import logging

    from metaflow_stack import settings
    from metaflow_stack.confidential.keyring import KEY_RELEASE_KEY, master_secret
    from metaflow_stack.confidential.service import OPEN_PATHS, KeyReleaseConfig, create_app
    from metaflow_stack.errors import StackError
    from metaflow_stack.http_guard import Guard, check_exposure, configured_key

    key = configured_key(KEY_RELEASE_KEY)
    check_exposure(host, key, insecure)
    folder = Path(policies)
    if not folder.is_dir():
        raise StackError(f"no policy folder at {folder}", fix="--policies DIR holding NAME.toml policy files")
    state = settings.load().state_dir / "confidential" / "key-release"
    config = KeyReleaseConfig(
        # A file the user names must be there; only the default one is made (once).
        master=master_secret(
            Path(master_key_file) if master_key_file else state / "master.key", make=not master_key_file
        ),
        policies=folder,
        allow_direct=allow_direct,
        collateral=collateral,
        pccs_url=pccs_url,
        cache=state / "collateral",
    )
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    listener, url = listening(host, port)
    click.echo(f"key release on {url} (policies: {policies})", err=True)
    app = create_app(config, Guard(host, key, allowed_hosts, open_paths=OPEN_PATHS))
    serve_on(listener, host, app, log_level=log_level, timeout_graceful_shutdown=5, access_log=False)
