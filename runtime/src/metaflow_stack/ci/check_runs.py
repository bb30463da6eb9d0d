"""The outcomes as a GitHub check run: its requests, checked against GitHub's API description, and posted.

GitHub's limits on a check run (REST API, "Create a check run" and "Update
a check run"): the summary and the text at most 65,535 characters each, at
most 50 annotations per request (an update appends its annotations to the
run's), an annotation's message and raw details at most 64 KB, its title 255
characters. A report cuts its texts to fit and sends its annotations in
chunks: the create request carries the first 50, each update the next.

Every request body is validated before it is sent against githubkit's
models of these two endpoints, which are generated from GitHub's published
OpenAPI description (REST API version ``API_VERSION``); those models let
unknown fields through, so unknown fields are refused here too.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from metaflow_stack.ci import schemas
from metaflow_stack.ci.report import backends, counts, failure_section, first_lines, run_links, table
from metaflow_stack.ci.results import Outcome
from metaflow_stack.deploy import require
from metaflow_stack.errors import StackError

API_VERSION = "2022-11-28"
MAX_TEXT = 65_535
ANNOTATIONS_PER_REQUEST = 50
MAX_ANNOTATION_BYTES = 64 * 1024
MAX_TITLE = 255
_CUT = "\n\n… (cut to fit GitHub's limit: the whole report is in the workflow run's summary)"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_CUT)] + _CUT


def _clip_bytes(text: str, limit: int = MAX_ANNOTATION_BYTES) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[: limit - 64].decode(errors="ignore") + "\n… (cut)"


@dataclass(frozen=True)
class CheckRun:
    """The requests of one check run: the create request, then an update per further 50 annotations."""

    create: dict[str, Any]
    updates: list[dict[str, Any]] = field(default_factory=list)


def annotation(outcome: Outcome, ui_url: str | None) -> dict[str, Any]:
    """A failure pointed at its flow file (the failed step's line where the plugin found it)."""
    line = outcome.line or 1
    message = "\n".join([first_lines(outcome.message + "\n" + outcome.details), *run_links(outcome, ui_url)])
    return {
        "path": outcome.path,
        "start_line": line,
        "end_line": line,
        "annotation_level": "failure",
        "title": _clip(f"{outcome.test} on {outcome.backend}", MAX_TITLE),
        "message": _clip_bytes(message or "failed"),
        "raw_details": _clip_bytes(outcome.details or outcome.message),
    }


def _text(outcomes: Sequence[Outcome], ui_url: str | None) -> str:
    """The failures, backend by backend."""
    parts = []
    for backend in backends(outcomes):
        failed = [o for o in outcomes if o.backend == backend and o.status == "failed"]
        if failed:
            parts.append(f"## {backend}: {len(failed)} failed")
            parts += [failure_section(o, ui_url) for o in failed]
    return "\n\n".join(parts) or "No failures."


def check_run(
    outcomes: Sequence[Outcome],
    *,
    name: str,
    head_sha: str,
    ui_url: str | None = None,
    details_url: str | None = None,
) -> CheckRun:
    """The requests that report ``outcomes`` as one completed check run, each validated."""
    failed = [o for o in outcomes if o.status == "failed"]
    conclusion = "failure" if failed else "success" if any(o.status == "passed" for o in outcomes) else "neutral"
    output = {
        "title": _clip(f"{counts(outcomes)} on {len(backends(outcomes))} backend(s)", MAX_TITLE),
        "summary": _clip(table(outcomes), MAX_TEXT),
    }
    notes = [annotation(o, ui_url) for o in failed if o.path]
    create: dict[str, Any] = {
        "name": name,
        "head_sha": head_sha,
        "status": "completed",
        "conclusion": conclusion,
        "completed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "output": {**output, "text": _clip(_text(outcomes, ui_url), MAX_TEXT)},
    }
    if details_url:
        create["details_url"] = details_url
    if notes:
        create["output"]["annotations"] = notes[:ANNOTATIONS_PER_REQUEST]
    updates = [  # each with the whole output again: an update replaces what it names
        {"output": {**create["output"], "annotations": notes[start : start + ANNOTATIONS_PER_REQUEST]}}
        for start in range(ANNOTATIONS_PER_REQUEST, len(notes), ANNOTATIONS_PER_REQUEST)
    ]
    run = CheckRun(create, updates)
    validate(run.create, update=False)
    for body in run.updates:
        validate(body, update=True)
    return run


def _models(update: bool) -> tuple[type, ...]:
    models = require("githubkit_schemas.v2022_11_28.models", extra="ci")
    if update:  # the schema's anyOf: with a conclusion, or with a status that is not "completed"
        return tuple(getattr(models, f"ReposOwnerRepoCheckRunsCheckRunIdPatchBodyAnyof{i}") for i in (0, 1))
    return tuple(getattr(models, f"ReposOwnerRepoCheckRunsPostBodyOneof{i}") for i in (0, 1))


def validate(body: dict[str, Any], *, update: bool) -> None:
    """Refuse ``body`` unless it is a create (or update) check-run request as GitHub's API describes it."""
    schemas.validate(body, _models(update), "GitHub's check-run request")


def post(run: CheckRun, *, repository: str, token: str, api_url: str = "https://api.github.com") -> int:
    """Create the check run and append its further annotations; its id."""
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": API_VERSION,
    }
    base = f"{api_url.rstrip('/')}/repos/{repository}/check-runs"
    try:
        with httpx.Client(headers=headers, timeout=30) as client:
            created = _answer(client.post(base, json=run.create), "creating the check run")
            check_id = int(created["id"])
            for body in run.updates:
                _answer(client.patch(f"{base}/{check_id}", json=body), f"adding annotations to check run {check_id}")
    except httpx.HTTPError as exc:
        raise StackError(
            f"GitHub's API at {api_url} did not answer: {exc}", fix="check GITHUB_API_URL and the network"
        ) from None
    return check_id


#: The fix for each refusal GitHub documents for these endpoints.
_FIXES = {
    401: "the token is not valid: pass GITHUB_TOKEN from the workflow (`secrets.GITHUB_TOKEN`)",
    403: "give the token `checks: write` (in a workflow: `permissions: checks: write`); a fork's pull "
    "request never gets it",
    404: "check --repository (owner/name) and that the token can see it",
    422: "check --sha: the commit must be in the repository",
}


def _answer(response: httpx.Response, doing: str) -> dict[str, Any]:
    if response.is_success:
        return response.json()
    try:
        reason = str(response.json().get("message", ""))
    except ValueError:
        reason = response.text[:200]
    raise StackError(
        f"{doing} failed: GitHub answered {response.status_code} {reason}".rstrip(),
        fix=_FIXES.get(response.status_code, "try again later: GitHub's API could not take the request"),
    )
