"""``metaflow ide``: what an editor asks of the runtime, as JSON (``graph``), or kept open (``serve``).

Thin glue over ``metaflow_stack.ide``; the VS Code extension calls nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from metaflow._vendor import click

from metaflow_extensions.stack.cmd.cli_errors import errors_as_json, friendly
from metaflow_stack.errors import InvalidInput


@click.group()
def cli() -> None:
    pass


@cli.group(help="What an editor asks: a flow's graph from its source, the runs, and a run launched.")
def ide() -> None:
    pass


@ide.command(help="Print the flow's graph (steps, next steps, lines, decorators, parameters) as JSON.")
@click.argument("flow_file", type=click.Path(dir_okay=False))
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the source from stdin (an unsaved buffer).")
@click.option("--json", "as_json", is_flag=True, help="One line of JSON, errors too.")
@friendly
def graph(flow_file: str, from_stdin: bool, as_json: bool) -> None:
    from metaflow_stack.ide.graph import flow_graph

    with errors_as_json(as_json):
        try:
            source = sys.stdin.read() if from_stdin else Path(flow_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(flow_file, f"cannot be read: {exc}", fix="name a Python file") from None
        found = flow_graph(source, flow_file)
    print(json.dumps(found) if as_json else json.dumps(found, indent=2))


@ide.command(help="Answer JSON-line requests on stdin until it closes (an editor's helper process).")
def serve() -> None:
    from metaflow_stack.ide.serve import serve as serving

    serving()


@ide.command(help="Run the flow with Metaflow's Runner, printing JSON lines: started (the run), output, finished.")
@click.argument("flow_file", type=click.Path(dir_okay=False))
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="A parameter's value, as text.")
@click.option("--backend", default="local", show_default=True, help="Where the steps run (see `backends`).")
@friendly
def launch(flow_file: str, params: tuple[str, ...], backend: str) -> None:
    from metaflow_stack.ide.launch import launch as launching

    given = {}
    for pair in params:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidInput("--param", f"{pair!r} is not NAME=VALUE", fix="--param alpha=0.5")
        given[name] = value
    with errors_as_json(True):
        sys.exit(launching(flow_file, given, backend))
