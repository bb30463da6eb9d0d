"""``metaflow stack ci report``: many backends' JUnit results as one report, and as a GitHub check run.

Thin glue over ``metaflow_stack.ci``. GitHub's own variables fill the
defaults inside a workflow (``GITHUB_STEP_SUMMARY``, ``GITHUB_REPOSITORY``,
``GITHUB_SHA``, ``GITHUB_API_URL``, ``GITHUB_TOKEN``), so a job needs only
the files and, to post a check run, its name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from metaflow._vendor import click

from metaflow_extensions.stack.cmd.cli_errors import friendly as _friendly
from metaflow_stack.errors import StackError


@click.group(help="Flow tests across backends in CI: one report of many jobs' results.")
def ci() -> None:
    pass


def _write(path: Path, text: str, append: bool = False, private: bool = False) -> None:
    """Write ``text`` to ``path`` (``private``: whole, mode 0600, its folder made), a failure in one line."""
    from metaflow_stack.local_secrets import keep

    try:
        if private:
            keep(path, text)
            return
        with path.open("a" if append else "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        fix = "name a file in a folder that exists and you may write"
        raise StackError(f"{path} cannot be written: {exc.strerror}", fix=fix) from None


def _github(name: str, given: str | None) -> str:
    value = given or os.environ.get(name, "")
    if not value:
        raise StackError(f"posting a check run needs {name}", fix=f"set {name} (a workflow sets it) or pass its option")
    return value


@ci.command(
    help="Merge JUnit files (one per backend or job) into a test x backend table with every failure, "
    "print it as Markdown (and add it to the job's summary), and post it as a GitHub check run."
)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--backend", help="The backend of cases that name none (default: each file's name).")
@click.option("--ui-url", envvar="METAFLOW_STACK_UI_URL", help="The UI's address, to link each failed run.")
@click.option("--title", default="Flow tests", show_default=True, help="The report's heading.")
@click.option("--junit-out", type=click.Path(dir_okay=False), help="Also write one JUnit file holding them all.")
@click.option("--check-run", "check_name", help="Post the report as a GitHub check run of this name.")
@click.option("--requests-out", type=click.Path(dir_okay=False), help="Write the check run's requests as JSON.")
@click.option("--repository", help="owner/name (default: GITHUB_REPOSITORY).")
@click.option("--sha", help="The commit the check run is on (default: GITHUB_SHA).")
@click.option("--details-url", help="A link for the check run (for example the workflow run's page).")
@_friendly
def report(
    files: tuple[str, ...],
    backend: str | None,
    ui_url: str | None,
    title: str,
    junit_out: str | None,
    check_name: str | None,
    requests_out: str | None,
    repository: str | None,
    sha: str | None,
    details_url: str | None,
) -> None:
    from metaflow_stack.ci import check_runs, results
    from metaflow_stack.ci import report as reports

    paths = [Path(f) for f in files]
    outcomes = results.read(paths, backend)
    text = reports.markdown(outcomes, ui_url, title)
    click.echo(text, nl=False)
    if summary := os.environ.get("GITHUB_STEP_SUMMARY"):
        _write(Path(summary), text, append=True)
    if junit_out:
        results.merge(paths, Path(junit_out), backend)
    if not (check_name or requests_out):
        return
    run = check_runs.check_run(
        outcomes,
        name=check_name or title,
        head_sha=_github("GITHUB_SHA", sha),
        ui_url=ui_url,
        details_url=details_url,
    )
    if requests_out:
        _write(Path(requests_out), json.dumps({"create": run.create, "updates": run.updates}, indent=2))
    if check_name:
        check_id = check_runs.post(
            run,
            repository=_github("GITHUB_REPOSITORY", repository),
            token=_github("GITHUB_TOKEN", None),
            api_url=os.environ.get("GITHUB_API_URL") or "https://api.github.com",
        )
        click.echo(f"check run {check_id} posted with {len(run.updates) + 1} request(s)", err=True)


@ci.command(
    name="argo-check",
    help="Compile flows for Argo Workflows with no cluster (Metaflow's own `argo-workflows create --only-json`) "
    "and check each WorkflowTemplate against Argo's API schema. Needs an S3 datastore for the code package.",
)
@click.argument("flows", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Also write each template as FLOW.json here (mode 0600: a template holds the run's Metaflow settings).",
)
@_friendly
def argo_check(flows: tuple[str, ...], out: str | None) -> None:
    from metaflow_stack.ci import argo_compile

    for flow in flows:
        template = argo_compile.compile_flow(Path(flow).resolve())
        argo_compile.validate(template)
        if out:
            _write(Path(out) / f"{Path(flow).stem}.json", json.dumps(template, indent=2), private=True)
        count = len(template.get("spec", {}).get("templates", []))
        click.echo(f"{flow}: WorkflowTemplate {template['metadata']['name']}, {count} templates, valid")
