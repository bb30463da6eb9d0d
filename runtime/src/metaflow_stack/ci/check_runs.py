"""The outcomes as a GitHub check run: its requests, checked against GitHub's API description, and posted.

GitHub's limits on a check run (REST API, "Create a check run" and "Update
a check run"): the summary and the text at most 65,535 bytes each (GitHub
counts UTF-8 bytes: "summary exceeds a maximum bytesize of 65535"), at most
50 annotations per request (an update appends its annotations to the run's),
an annotation's message and raw details at most 64 KB, its title 255
characters. A report cuts its texts to fit, in bytes, and sends its
annotations in chunks: the create request carries the first 50, each update
the next.

Every request body is validated before it is sent against githubkit's
models of these two endpoints, which are generated from GitHub's published
OpenAPI description (REST API version ``API_VERSION``); those models let
unknown fields through, so unknown fields are refused here too.

A request GitHub answers with a 5xx or a rate limit is sent again, up to
``RETRIES`` times, after the wait GitHub asks for (``Retry-After``, else
until ``x-ratelimit-reset``) or a short backoff, never longer than
``MAX_WAIT_S``; a longer wait fails at once, saying to wait and rerun. A
request answered with a 5xx may have been done all the same (a proxy's 502
after GitHub took it), so before sending it again the client looks: a create
for a check run of this commit with the report's ``external_id`` (a fresh
one per report), an update for the run's annotation count having reached
what the update makes it. Sending again what was done would show the check
run, or an update's annotations, twice.
"""

from __future__ import annotations

import datetime
import functools
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from metaflow_stack.ci import schemas
from metaflow_stack.ci.report import backends, counts, failure_section, first_lines, plain, run_links, table
from metaflow_stack.ci.results import Outcome
from metaflow_stack.deploy import require
from metaflow_stack.errors import StackError

API_VERSION = "2022-11-28"
#: The most UTF-8 bytes of a check run's summary, and of its text.
MAX_TEXT = 65_535
ANNOTATIONS_PER_REQUEST = 50
MAX_ANNOTATION_BYTES = 64 * 1024
MAX_TITLE = 255
#: How many times a request answered with a 5xx or a rate limit is sent again, and the longest wait before one.
RETRIES = 3
MAX_WAIT_S = 60.0
#: Of GitHub's answer to a refused request, how many of its ``errors`` are shown, and how much of each.
_ERRORS_SHOWN = 5
_ERROR_CHARS = 200
_CUT = "\n\n… (cut to fit GitHub's limit: the whole report is in the workflow run's summary)"
_NOT_GITHUB = (
    "check GITHUB_API_URL: it must be GitHub's REST API (https://api.github.com, or https://HOST/api/v3 on "
    "GitHub Enterprise Server), not a web page or a proxy's"
)


def _clip(text: str, limit: int, note: str = " … (cut)") -> str:
    """``text`` in at most ``limit`` UTF-8 bytes (GitHub measures its limits in bytes), ending with ``note``
    when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - len(note.encode())].decode(errors="ignore") + note


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
        "message": _clip(message or "failed", MAX_ANNOTATION_BYTES),
        "raw_details": _clip(outcome.details or outcome.message, MAX_ANNOTATION_BYTES),
    }


def _text(outcomes: Sequence[Outcome], ui_url: str | None) -> str:
    """The failures, backend by backend."""
    parts = []
    for backend in backends(outcomes):
        failed = [o for o in outcomes if o.backend == backend and o.status == "failed"]
        if failed:
            parts.append(f"## {plain(backend)}: {len(failed)} failed")
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
        "summary": _clip(table(outcomes), MAX_TEXT, _CUT),
    }
    notes = [annotation(o, ui_url) for o in failed if o.path]
    create: dict[str, Any] = {
        "name": name,
        "head_sha": head_sha,
        "external_id": uuid.uuid4().hex,  # (how a create that GitHub did behind a 5xx is found again)
        "status": "completed",
        "conclusion": conclusion,
        "completed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "output": {**output, "text": _clip(_text(outcomes, ui_url), MAX_TEXT, _CUT)},
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


def post(
    run: CheckRun,
    *,
    repository: str,
    token: str,
    api_url: str = "https://api.github.com",
    wait: Callable[[float], None] = time.sleep,
) -> int:
    """Create the check run and append its further annotations; its id. ``wait`` sleeps before a retry."""
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": API_VERSION,
    }
    repo = f"{api_url.rstrip('/')}/repos/{repository}"
    base, create = f"{repo}/check-runs", run.create
    try:
        with httpx.Client(headers=headers, timeout=30) as client:
            made = functools.partial(_made, client, repo, create)
            created = _send(client, "POST", base, create, "creating the check run", wait, made)
            check_id = created.get("id")
            if not isinstance(check_id, int):
                raise StackError(f"creating the check run: {api_url} answered without the run's id", fix=_NOT_GITHUB)
            noted = len(create["output"].get("annotations", ()))
            for body in run.updates:
                noted += len(body["output"]["annotations"])
                doing = f"adding annotations to check run {check_id}"
                done = functools.partial(_annotated, client, f"{base}/{check_id}", noted)
                _send(client, "PATCH", f"{base}/{check_id}", body, doing, wait, done)
    except httpx.HTTPError as exc:
        raise StackError(
            f"GitHub's API at {api_url} did not answer: {exc}", fix="check GITHUB_API_URL and the network"
        ) from None
    return check_id


def _send(
    client: httpx.Client,
    method: str,
    url: str,
    body: dict[str, Any],
    doing: str,
    wait: Callable[[float], None],
    done: Callable[[], dict[str, Any] | None],
) -> dict[str, Any]:
    """``body`` sent, and sent again while GitHub answers that it may take it later; its answer. After a 5xx,
    ``done`` first looks for what the request would have made, and gives it (not sent again) where found."""
    for attempt in range(RETRIES + 1):
        response = client.request(method, url, json=body)
        delay = _retry_delay(response, attempt)
        if delay is None or attempt == RETRIES:
            break
        wait(delay)
        if response.status_code >= 500 and (made := done()) is not None:
            return made
    return _answer(response, doing)


def _found(client: httpx.Client, url: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """GitHub's JSON object at ``url``; ``None`` where it gives none (a failed look is no answer: the request
    is sent again, as it was before any look)."""
    try:
        response = client.get(url, params=params)
        data = response.json() if response.is_success else None
    except (httpx.HTTPError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _made(client: httpx.Client, repo: str, create: dict[str, Any]) -> dict[str, Any] | None:
    """The check run ``create`` made, if GitHub made it: one of its commit's runs of its name with its
    ``external_id`` ("List check runs for a Git reference")."""
    if not create.get("external_id"):
        return None
    params = {"check_name": create["name"], "filter": "all", "per_page": 100}
    listed = _found(client, f"{repo}/commits/{create['head_sha']}/check-runs", params) or {}
    runs = listed.get("check_runs")
    for found in runs if isinstance(runs, list) else []:
        if isinstance(found, dict) and found.get("external_id") == create["external_id"]:
            return found
    return None


def _annotated(client: httpx.Client, url: str, count: int) -> dict[str, Any] | None:
    """The check run at ``url`` if it holds ``count`` annotations already (the update was done)."""
    found = _found(client, url) or {}
    output = found.get("output")
    noted = output.get("annotations_count") if isinstance(output, dict) else None
    return found if isinstance(noted, int) and noted >= count else None


def _message(response: httpx.Response) -> tuple[str, dict[str, Any] | None]:
    """GitHub's reason for ``response`` (its message, then its errors' messages, bounded) and its JSON object
    (``None`` when it has none)."""
    try:
        data = response.json()
    except ValueError:
        return re.sub(r"\s+", " ", response.text[:_ERROR_CHARS]).strip(), None
    if not isinstance(data, dict):
        return "", None
    reasons = [str(data.get("message") or "")]
    errors = data.get("errors")
    for error in errors[:_ERRORS_SHOWN] if isinstance(errors, list) else []:
        if isinstance(error, dict):  # GitHub's error object: a message, else what it names
            error = error.get("message") or " ".join(str(error[k]) for k in ("resource", "field", "code") if k in error)
        reasons.append(str(error)[:_ERROR_CHARS])
    return ": ".join(r for r in reasons if r), data


def _rate_limited(response: httpx.Response, message: str) -> bool:
    """Whether GitHub refused ``response``'s request for a rate limit (primary or secondary), per its docs."""
    if response.status_code not in (403, 429):
        return False
    headers = response.headers
    return "rate limit" in message.lower() or headers.get("x-ratelimit-remaining") == "0" or "retry-after" in headers


def _retry_delay(response: httpx.Response, attempt: int) -> float | None:
    """How long to wait before sending ``response``'s request again; ``None`` when it should not be."""
    if not (response.status_code >= 500 or _rate_limited(response, _message(response)[0])):
        return None
    headers = response.headers
    if (after := headers.get("retry-after", "")).isdecimal():
        delay = float(after)
    elif headers.get("x-ratelimit-remaining") == "0" and (reset := headers.get("x-ratelimit-reset", "")).isdecimal():
        delay = max(0.0, float(reset) - time.time())
    elif response.status_code >= 500:
        delay = float(2**attempt)
    else:  # a secondary rate limit that names no wait: GitHub asks for at least a minute
        delay = 60.0
    return delay if delay <= MAX_WAIT_S else None


#: The fix for each refusal GitHub documents for these endpoints.
_FIXES = {
    401: "the token is not valid: pass GITHUB_TOKEN from the workflow (`secrets.GITHUB_TOKEN`)",
    403: "give the token `checks: write` (in a workflow: `permissions: checks: write`); a fork's pull "
    "request never gets it",
    404: "check --repository (owner/name) and that the token can see it",
}
_RATE_LIMITED = (
    "GitHub's rate limit for this token was reached: wait until it resets (a secondary limit: a few minutes; "
    "the answer's x-ratelimit-reset says when), then rerun the job"
)
_BAD_SHA = "check --sha: the commit must be in the repository"
_REFUSED = "GitHub refused the request as invalid: write it with --requests-out and report it"


def _answer(response: httpx.Response, doing: str) -> dict[str, Any]:
    """``response``'s JSON object when GitHub did what was asked; else one line with GitHub's reason and a fix."""
    reason, data = _message(response)
    if response.is_success:
        if data is None:
            kind = response.headers.get("content-type") or "no content type"
            raise StackError(
                f"{doing}: {response.url.host} answered {response.status_code} with {kind}, not GitHub's JSON",
                fix=_NOT_GITHUB,
            )
        return data
    if _rate_limited(response, reason):
        fix = _RATE_LIMITED
    elif response.status_code == 422:
        fix = _BAD_SHA if re.search(r"\bsha\b|head_sha", reason, re.IGNORECASE) else _REFUSED
    else:
        fix = _FIXES.get(response.status_code, "try again later: GitHub's API could not take the request")
    raise StackError(f"{doing} failed: GitHub answered {response.status_code} {reason}".rstrip(), fix=fix)
