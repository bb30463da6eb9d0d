"""``metaflow notebook export``: a notebook's flow (``%%flow``/``%%step`` cells, or tags) as a flow file;
``metaflow notebook import``: a flow file as such a notebook.

Thin glue over ``metaflow_stack.notebook.export`` and ``.importer``; ``--check``
runs the written file with Metaflow's ``Runner``, as ``python FILE run`` would.
"""

from __future__ import annotations

from pathlib import Path

from metaflow._vendor import click

from metaflow_extensions.stack.cmd.cli_errors import friendly as _friendly
from metaflow_stack.errors import InvalidInput, StackError


@click.group()
def cli() -> None:
    pass


def _elsewhere(source: str, output: str) -> Path:
    """``output``, refused when it is ``source`` itself (the file would be replaced by what it was read into)."""
    if Path(output).exists() and Path(output).samefile(source):  # (through a link, or another spelling)
        raise InvalidInput("--output", f"{output} is the file being read", fix="name another file to write (-o)")
    return Path(output)


@cli.group(help="Metaflow flows written across a notebook's cells.")
def notebook() -> None:
    pass


@notebook.command(help="Write the flow a notebook's cells declare as a standalone flow file.")
@click.argument("notebook_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The flow file to write.")
@click.option("--check", is_flag=True, help="Run the written flow once (`python FILE run`) and fail if the run does.")
@_friendly
def export(notebook_file: str, output: str, check: bool) -> None:
    from metaflow_stack.notebook import export as exporting

    target = _elsewhere(notebook_file, output)
    written = exporting.write(exporting.from_notebook(Path(notebook_file)), target)
    click.echo(str(written))
    if check:
        from metaflow import Runner

        with Runner(str(written), show_output=True, cwd=str(written.parent)) as runner:
            try:
                run = runner.run().run
            except RuntimeError as exc:  # Metaflow refused to start the run: its last line says why
                reason = (str(exc).strip().splitlines() or ["no reason given"])[-1]
                raise StackError(f"{written} did not run: {reason}", fix="correct the notebook's cells") from None
        if not run.successful:
            fix = f"in {written.parent}, `metaflow agent failures {run.pathspec}` lists what failed"
            raise StackError(f"{run.pathspec} failed", fix=fix)
        click.echo(run.pathspec)


@notebook.command(name="import", help="Write a flow file as a notebook: a %%flow cell and one %%step cell per step.")
@click.argument("flow_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The notebook to write.")
@_friendly
def import_(flow_file: str, output: str) -> None:
    from metaflow_stack.notebook import importer

    click.echo(str(importer.write(Path(flow_file), _elsewhere(flow_file, output))))
