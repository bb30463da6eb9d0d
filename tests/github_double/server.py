"""A double of GitHub's check-runs REST endpoints, for testing what ``metaflow stack ci report`` posts.

It speaks the documented protocol ("Create a check run", "Update a check
run", REST API version 2022-11-28): a bearer token, GitHub's media type and
version headers, bodies that must validate against githubkit's models of
those endpoints (generated from GitHub's OpenAPI description) with no field
the description does not name, a summary and a text of at most 65,535 UTF-8
bytes, annotations appended by updates. Every request it accepts or refuses
is recorded, one JSON line each, for the test to read.

It also answers the two reads a client makes to find out whether a request
answered with a 5xx was done all the same: "Get a check run" and "List check
runs for a Git reference" (``check_name`` and ``filter``).

What GitHub (or a proxy in front of it) answers now and then is set up with
``POST /_double/answers``, outside GitHub's API: a list of answers (status,
body, headers) given, in order, to the next creates and updates instead of
theirs: a 502 page, a secondary rate limit, a 200 that is not JSON. An
answer with ``"done": true`` is given after the request was carried out (a
proxy's 502 after GitHub took it); one with a ``"method"`` goes to the next
request of that method only.

    python server.py --port P --token T --record requests.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from githubkit_schemas.v2022_11_28 import models
from pydantic import BaseModel, ValidationError

_CREATE = (models.ReposOwnerRepoCheckRunsPostBodyOneof0, models.ReposOwnerRepoCheckRunsPostBodyOneof1)
_UPDATE = (
    models.ReposOwnerRepoCheckRunsCheckRunIdPatchBodyAnyof0,
    models.ReposOwnerRepoCheckRunsCheckRunIdPatchBodyAnyof1,
)


def _paths(value: Any, where: str = "") -> set[str]:
    """Every key path in a JSON value (list items share their list's path)."""
    if isinstance(value, dict):
        return set().union(*(_paths(v, f"{where}{k}.") | {f"{where}{k}"} for k, v in value.items()))
    if isinstance(value, list):
        return set().union(set(), *(_paths(v, where) for v in value))
    return set()


def _valid(body: Any, choices: tuple[type[BaseModel], ...]) -> str | None:
    """Why ``body`` is not one of ``choices`` (``None`` when it is)."""
    reasons = []
    for model in choices:
        try:
            parsed = model.model_validate(body)
        except ValidationError as exc:
            reasons.append(str(exc.errors()[0]))
            continue
        # The models drop what they do not know: whatever did not survive the round trip is unknown.
        kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
        extra = (_paths(body) - _paths(kept)) | set(parsed.model_extra or {})  # the top level keeps extras
        return f"unknown fields: {sorted(extra)}" if extra else None
    return "; ".join(reasons)


def _over_limits(body: Any) -> list[dict[str, str]]:
    """GitHub's errors for an output text over its limit, which it counts in UTF-8 bytes."""
    output = body.get("output") if isinstance(body, dict) else None
    return [
        {
            "resource": "CheckRun",
            "code": "custom",
            "field": name,
            "message": f"{name} exceeds a maximum bytesize of 65535",
        }
        for name in ("summary", "text")
        if isinstance(output, dict) and len(str(output.get(name, "")).encode()) > 65_535
    ]


def app(token: str, record: Path) -> FastAPI:
    api = FastAPI()
    runs: dict[int, dict[str, Any]] = {}
    canned: list[dict[str, Any]] = []

    @api.post("/_double/answers")
    async def set_answers(request: Request) -> JSONResponse:
        canned[:] = await request.json()
        return JSONResponse({"answers": len(canned)})

    def write(request: Request, body: Any, status: int, problems: list[Any]) -> None:
        with record.open("a") as out:
            entry = {"method": request.method, "path": request.url.path, "body": body, "status": status}
            out.write(json.dumps({**entry, "problems": problems}) + "\n")

    def canned_answer(given: dict[str, Any]) -> Response:
        return Response(given.get("body", ""), given["status"], headers=given.get("headers", {}))

    def view(run: dict[str, Any]) -> dict[str, Any]:
        """A check run as GitHub shows it: its output's annotations counted, not listed."""
        output = {k: v for k, v in run.get("output", {}).items() if k != "annotations"}
        return {k: v for k, v in run.items() if k not in ("output", "annotations")} | {
            "output": output | {"annotations_count": len(run["annotations"])}
        }

    def authorised(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {token}"

    async def answer(request: Request, choices: tuple[type[BaseModel], ...], check_id: int | None) -> Response:
        body = await request.json()
        given = next((a for a in canned if a.get("method", request.method) == request.method), None)
        if given is not None:
            canned.remove(given)
        if given is not None and not given.get("done"):
            write(request, body, given["status"], ["canned"])
            return canned_answer(given)
        problems = []
        if not authorised(request):
            status, message = 401, "Bad credentials"
        else:
            if request.headers.get("accept") != "application/vnd.github+json":
                problems.append("accept")
            if request.headers.get("x-github-api-version") != "2022-11-28":
                problems.append("x-github-api-version")
            if why := _valid(body, choices):
                problems.append(why)
            problems += _over_limits(body)
            status, message = (422, "Validation Failed") if problems else (201 if check_id is None else 200, "")
            if not problems and check_id is not None and check_id not in runs:
                status, message = 404, "Not Found"
        if given is not None:  # done, then answered as the proxy did
            write(request, body, given["status"], [*problems, "done, then canned"])
        else:
            write(request, body, status, problems)
        if status >= 300:
            return canned_answer(given) if given else JSONResponse({"message": message, "errors": problems}, status)
        created = check_id is None
        if check_id is None:
            check_id = len(runs) + 1
            runs[check_id] = {"id": check_id, **body, "annotations": []}
        runs[check_id]["annotations"] += body.get("output", {}).get("annotations", [])
        return canned_answer(given) if given else JSONResponse(view(runs[check_id]), 201 if created else 200)

    @api.post("/repos/{owner}/{repo}/check-runs")
    async def create(owner: str, repo: str, request: Request) -> Response:
        return await answer(request, _CREATE, None)

    @api.patch("/repos/{owner}/{repo}/check-runs/{check_id}")
    async def update(owner: str, repo: str, check_id: int, request: Request) -> Response:
        return await answer(request, _UPDATE, check_id)

    @api.get("/repos/{owner}/{repo}/check-runs/{check_id}")
    async def get(owner: str, repo: str, check_id: int, request: Request) -> Response:
        status = 401 if not authorised(request) else 200 if check_id in runs else 404
        write(request, None, status, [])
        return JSONResponse(view(runs[check_id]) if status == 200 else {"message": "Not Found"}, status)

    @api.get("/repos/{owner}/{repo}/commits/{ref}/check-runs")
    async def listed(owner: str, repo: str, ref: str, request: Request) -> Response:
        if not authorised(request):
            write(request, None, 401, [])
            return JSONResponse({"message": "Bad credentials"}, 401)
        name, latest = request.query_params.get("check_name"), request.query_params.get("filter", "latest") == "latest"
        found = [r for r in runs.values() if r["head_sha"] == ref and name in (None, r["name"])]
        if latest:  # the most recent run of each name
            found = list({r["name"]: r for r in found}.values())
        write(request, None, 200, [])
        return JSONResponse({"total_count": len(found), "check_runs": [view(r) for r in found]})

    return api


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--record", type=Path, required=True)
    options = parser.parse_args()
    uvicorn.run(app(options.token, options.record), host="127.0.0.1", port=options.port, log_level="warning")
