"""``metaflow devcontainer generate``: capture a step's environment as a devcontainer.json.

Thin glue over ``metaflow_stack.devcontainer.generate``; the ``devcontainer step`` trampoline a
flow's tasks run through is a flow command, in ``plugins/devcontainer``.
"""

from __future__ import annotations

from pathlib import Path

from metaflow._vendor import click

from metaflow_extensions.stack.cmd.cli_errors import friendly


@click.group()
def cli() -> None:
    pass


@cli.group(help="Development Container configurations for @devcontainer steps.")
def devcontainer() -> None:
    pass


@devcontainer.command(help="Write a devcontainer.json (and its Dockerfile or feature) from a step's settings.")
@click.argument("flow_file", type=click.Path())
@click.option(
    "--step",
    help="The step to capture [default: every step with @pypi, @conda, @environment or @devcontainer].",
)
@click.option(
    "--out",
    type=click.Path(),
    help="The folder to write [default: .devcontainer/<flow>-<step> next to the flow; one step only].",
)
@click.option("--force", is_flag=True, help="Replace a folder that exists.")
@friendly
def generate(flow_file: str, step: str | None, out: str | None, force: bool) -> None:
    from metaflow_stack.devcontainer.generate import environments, write
    from metaflow_stack.errors import StackError

    found = environments(Path(flow_file), step)
    if out is not None and len(found) > 1:
        raise StackError(f"--out names one folder and {len(found)} steps were found", fix="add --step")
    for env in found:
        folder = Path(out) if out else Path(flow_file).parent / ".devcontainer" / f"{env.flow}-{env.step}".lower()
        path = write(env, folder, force)
        click.echo(f"{env.flow}.{env.step}: wrote {path} (from {', '.join(env.sources) or 'the base image'})")
