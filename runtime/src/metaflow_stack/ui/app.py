"""The UI's HTTP server: a JSON API over a run source, a live feed, and the built front end.

Everything is read on request from the source (a local datastore,
``LocalRuns``, or the metadata service, ``ServiceRuns``); nothing is copied,
and the local source remembers only what Metaflow never rewrites, so the UI
is never behind. ``/api/events`` streams the pathspecs of runs as they
change (the front end refetches what it shows), opening with ``*`` (every
run: what changed before the page subscribed reached no one). Artifact
values are only ever rendered through ``previews`` (plain data, bounded);
the server never runs an artifact's code. Unknown API paths and bad parameters answer JSON errors;
any other path serves the front end, which shows its own not-found page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse
from starlette.staticfiles import StaticFiles

from metaflow_stack import __version__
from metaflow_stack.agent.queries import MAX_RUNS, Queries
from metaflow_stack.agent.source import AgentError, pathspec_parts
from metaflow_stack.api_errors import ApiError, install
from metaflow_stack.datastore.cards import CARD_POLICY, Cards
from metaflow_stack.datastore.cursors import decode_offset, encode_cursor
from metaflow_stack.datastore.previews import MAX_PREVIEW_BYTES
from metaflow_stack.errors import StackError
from metaflow_stack.http_guard import SESSION_COOKIE, Guard, GuardMiddleware
from metaflow_stack.ui.changes import EVERY_RUN, Changes
from metaflow_stack.ui.compare import all_flows, all_tasks, compare
from metaflow_stack.ui.lineage import lineage
from metaflow_stack.ui.local_runs import LocalRuns
from metaflow_stack.ui.service_runs import ServiceRuns

#: Where the UI reads: a local datastore, or the metadata service.
UiSource = LocalRuns | ServiceRuns

#: Where the built front end lands (``ui/`` builds into it; the wheel ships it).
STATIC = Path(__file__).parent / "static"
#: Artifacts up to this stored size get their preview in the task's answer; larger ones on request.
INLINE_PREVIEW_BYTES = 16 * 1024

_NOT_BUILT = """<!doctype html><title>Metaflow Stack UI</title>
<p>The UI's web assets are not built in this installation. Run <code>just ui</code> (needs Node 20)
or install a released <code>metaflow-stack</code> wheel. The JSON API is served under <code>/api</code>.</p>"""


def _runs_of_flows(
    queries: Queries, flows: list[str], filters: dict[str, Any], limit: int, cursor: str | None
) -> dict[str, Any]:
    """Runs of several flows merged newest first; the cursor is the offset into that order."""
    offset = decode_offset(cursor)
    wanted = min(offset + limit + 1, MAX_RUNS)
    merged = [run for flow in flows for run in queries.list_runs(flow, limit=wanted, **filters).runs]
    merged.sort(key=lambda run: run.started_at, reverse=True)
    more = len(merged) > offset + limit
    return {
        "runs": merged[offset : offset + limit],
        "next_cursor": encode_cursor([offset + limit]) if more else None,
    }


#: Open without the key: where the printed link trades it for the session cookie.
SIGN_IN = "/sign-in"
#: Paths answered without the key: the sign-in link and the liveness probe.
OPEN_PATHS = frozenset({SIGN_IN, "/health"})


def create_app(source: UiSource, static: Path = STATIC, live: bool = True, guard: Guard | None = None) -> FastAPI:
    """The UI on ``source``; ``live`` follows its changes and feeds ``/api/events``. ``guard`` says who may
    read it (by default: loopback names only, no key); with a key, a browser signs in once through
    ``/sign-in?key=...`` and then sends it as a ``SameSite=Strict`` cookie."""
    guard = guard or Guard(open_paths=OPEN_PATHS, cookie=True)
    queries = Queries(source)
    changes = Changes()
    cards = Cards(source.blobs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        follower = asyncio.create_task(source.follow(changes, stop)) if live else None
        try:
            yield
        finally:
            stop.set()
            if follower is not None:
                await asyncio.wait({follower}, timeout=1)
                follower.cancel()  # a stream waiting on its next event does not see stop
                with contextlib.suppress(asyncio.CancelledError):
                    await follower

    app = FastAPI(title="Metaflow Stack UI", version=__version__, lifespan=lifespan, docs_url="/api/docs")
    install(app, "the UI")
    app.add_middleware(GuardMiddleware, guard=guard)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(SIGN_IN, include_in_schema=False)
    def sign_in(request: Request, key: str = "") -> Response:
        """Trades the key in the link ``metaflow ui`` printed for a session cookie, then opens the UI."""
        if not guard.key or not hmac.compare_digest(key.encode(), guard.key.encode()):
            raise ApiError(401, "unauthorized", "wrong or missing key", fix="open the link `metaflow ui` printed")
        response = RedirectResponse("/", status_code=303)
        secure = request.url.scheme == "https"
        response.set_cookie(SESSION_COOKIE, key, httponly=True, samesite="strict", secure=secure)
        return response

    @app.get("/api/source")
    def describe() -> dict[str, Any]:
        return {**source.describe(), "version": __version__, "live": live}

    @app.get("/api/flows")
    def flows() -> list[str]:
        return all_flows(queries)

    @app.get("/api/runs")
    def runs(
        flow: str | None = None,
        status: str | None = None,
        user: str | None = None,
        tag: Annotated[list[str], Query()] = [],  # noqa: B006 (FastAPI copies defaults)
        since: str | None = None,
        until: str | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """Runs newest first, of one flow or of every flow, filtered; ``next_cursor`` for the next page."""

        def listed() -> dict[str, Any]:
            filters = {"status": status, "user": user, "tags": tag, "since": since, "until": until}
            names = [flow] if flow else all_flows(queries)
            if len(names) == 1:
                page = queries.list_runs(names[0], limit=limit, cursor=cursor, **filters)
                return {"runs": page.runs, "next_cursor": page.next_cursor}
            return _runs_of_flows(queries, names, filters, limit, cursor)

        return listed()

    @app.get("/api/runs/{flow}/{run}")
    def run_page(flow: str, run: str) -> dict[str, Any]:
        """Everything the run page draws: summary, graph (or why not), parameters and every task."""

        def gathered() -> dict[str, Any]:
            summary = queries.run_summary(f"{flow}/{run}")
            tasks = all_tasks(queries, f"{flow}/{run}")
            try:
                graph, graph_error = source.graph(flow, run), None
            except StackError as exc:
                graph, graph_error = None, exc.to_dict()
            return {"summary": summary, "graph": graph, "graph_error": graph_error, "tasks": tasks}

        return gathered()

    @app.get("/api/compare")
    def compare_runs(a: str, b: str) -> dict[str, Any]:
        """Run ``a`` (the baseline) against run ``b``: parameters, results, metric and timing deltas."""
        return compare(queries, source, a, b)

    @app.get("/api/tasks/{flow}/{run}/{step}/{task}")
    def task_page(flow: str, run: str, step: str, task: str) -> dict[str, Any]:
        """A task's attempts, metadata and artifacts; small plain-data values come previewed."""

        def gathered() -> dict[str, Any]:
            parts = pathspec_parts(f"{flow}/{run}/{step}/{task}", 4, "task")
            detail = source.task_detail(parts)
            listed = queries.artifact_info("/".join(parts), limit=1000).artifacts
            artifacts = []
            for artifact in listed:
                small = artifact.size is not None and artifact.size <= INLINE_PREVIEW_BYTES
                preview = source.blobs.preview(flow, artifact.sha, artifact.size) if small and artifact.sha else None
                artifacts.append({**artifact.model_dump(), "preview": preview})
            try:
                listed_cards, cards_error = cards.list(*parts), None
            except StackError as exc:  # shown where the cards would be: the rest of the page still renders
                listed_cards, cards_error = [], exc.to_dict()
            return {**detail, "artifacts": artifacts, "cards": listed_cards, "cards_error": cards_error}

        return gathered()

    @app.get("/api/artifacts/{flow}/{run}/{step}/{task}/{name}")
    def artifact_preview(flow: str, run: str, step: str, task: str, name: str) -> dict[str, Any]:
        """One artifact's preview (plain data up to 1 MiB stored; otherwise why not)."""

        def previewed() -> dict[str, Any]:
            found = [a for a in queries.artifact_info(f"{flow}/{run}/{step}/{task}", limit=1000).artifacts]
            artifact = next((a for a in found if a.name == name), None)
            if artifact is None or artifact.sha is None:
                raise AgentError("not_found", f"artifact {name} of {flow}/{run}/{step}/{task} does not exist")
            return {
                **artifact.model_dump(),
                "preview": source.blobs.preview(flow, artifact.sha, artifact.size),
                "limit_bytes": MAX_PREVIEW_BYTES,
            }

        return previewed()

    @app.get("/api/cards/{flow}/{run}/{step}/{task}/{file}", response_class=HTMLResponse)
    def card(flow: str, run: str, step: str, task: str, file: str) -> Response:
        """One card's HTML, sandboxed: its scripts run in an opaque origin with no network."""
        body = cards.read(flow, run, step, task, file)
        headers = {"Content-Security-Policy": CARD_POLICY, "X-Content-Type-Options": "nosniff"}
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/api/lineage/{flow}/{run}/{step}/{task}/{name}")
    def artifact_lineage(flow: str, run: str, step: str, task: str, name: str) -> dict[str, Any]:
        """Where the artifact's value was produced and carried in its run's DAG, and other runs holding it."""
        return lineage(queries, source, f"{flow}/{run}/{step}/{task}", name)

    @app.get("/api/logs/{flow}/{run}/{step}/{task}/{stream}")
    def logs(
        flow: str,
        run: str,
        step: str,
        task: str,
        stream: str,
        tail: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        attempt: int | None = None,
        cursor: str | None = None,
    ) -> Any:
        """The last ``tail`` lines, or with ``cursor`` the lines after it (following a running task)."""
        pathspec = f"{flow}/{run}/{step}/{task}"
        if cursor:
            return queries.logs(pathspec, stream, head=tail, cursor=cursor, attempt=attempt)
        return queries.logs(pathspec, stream, tail=tail, attempt=attempt, max_bytes=1024 * 1024)

    @app.get("/api/events", response_class=EventSourceResponse)
    async def events() -> AsyncIterator[dict[str, list[str]]]:
        """``{"runs": ["Flow/123", ...]}`` whenever those runs change. The first event, ``{"runs": ["*"]}``,
        says the stream is subscribed: a page refetches then what it shows, since whatever changed between
        its first fetch and this moment (or while it was reconnecting) was published to no one."""
        async with changes.subscribe() as feed:
            yield {"runs": [EVERY_RUN]}
            while True:
                yield {"runs": await feed.next()}

    @app.get("/api/{rest:path}", include_in_schema=False)
    def unknown_api(rest: str) -> None:
        raise ApiError(404, "not_found", f"no API route /api/{rest}")

    index = static / "index.html"
    if (static / "assets").is_dir():
        app.mount("/assets", StaticFiles(directory=static / "assets"), name="assets")

    @app.get("/{rest:path}", include_in_schema=False, response_model=None)
    def front_end(rest: str) -> FileResponse | HTMLResponse:
        """The single-page front end for every other path (it routes, and shows its own 404)."""
        return FileResponse(index) if index.is_file() else HTMLResponse(_NOT_BUILT)

    return app
