"""The metadata service's HTTP API: ``create_app(config)``.

Every route Metaflow's ``ServiceMetadataProvider`` calls, answering as service
2.5.x does (same paths, shapes and ``METADATA_SERVICE_VERSION`` header), so
the stock client works unchanged. What is new is opt-in: query parameters on
collections (``pages``), run summaries and failures, bounded task logs
(``logs``), the event stream; the
``/ping`` response advertises them in ``X-Capabilities``.

Errors are JSON ``{code, message, details}``: 400 naming the bad parameter,
404 for unknown routes and objects, 401 without the configured key, 413 for
oversize bodies, 503 (with ``Retry-After``) while the database is unreachable.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import fastapi
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import generate_latest
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from metaflow_stack import api_errors
from metaflow_stack.api_errors import error_response
from metaflow_stack.datastore.log_files import LogFiles
from metaflow_stack.http_guard import Guard, GuardMiddleware
from metaflow_stack.ids import is_number
from metaflow_stack.service import bodies, pages
from metaflow_stack.service.bodies import ArtifactBody, Created, Metadatum, RunBody, RunHeartbeat, TagMutation, TaskBody
from metaflow_stack.service.database import connect, migrate
from metaflow_stack.service.event_bus import DEFAULT_RETENTION_S
from metaflow_stack.service.events import EventHub
from metaflow_stack.service.logs import TaskLogs
from metaflow_stack.service.metrics import registry_for
from metaflow_stack.service.store import Store
from metaflow_stack.service.streams import Subscription

#: The reference service version whose behaviour this one keeps; clients gate features on it.
SERVICE_VERSION = "2.5.1"
VERSION_HEADER = "METADATA_SERVICE_VERSION"
CAPABILITIES = (
    "pagination",
    "filters",
    "summary",
    "failures",
    "run-tasks",
    "artifact-search",
    "logs",
    "events",
    "run-end",
)

T = TypeVar("T")
#: An attempt number as Metaflow counts them (a column of 32 bits).
Attempt = Annotated[int, fastapi.Path(ge=0, le=2**31 - 1)]
#: The largest event sequence number a 64-bit column holds.
MAX_SEQ = 2**63 - 1

#: A request body checked against its model (``bodies``) before the route runs: a 400 names the field.
Body = Annotated[T, fastapi.Body()]


async def _subscribe(request: Request) -> Subscription:
    """Validates ``/events``' parameters before the stream starts, so mistakes are a 400."""
    return await request.app.state.hub.subscribe(request)


EventSubscription = Annotated[Subscription, Depends(_subscribe)]

#: Routes open without the auth key: liveness and readiness probes.
_OPEN = frozenset({"/healthcheck"})


@dataclass(frozen=True)
class ServiceConfig:
    """How the service stores, authenticates and publishes."""

    database_url: str
    read_database_url: str | None = None
    #: When set, every request but ``/healthcheck`` needs ``x-api-key: <auth_key>``.
    auth_key: str | None = None
    #: The address the service is bound to, and other names it answers to (``http_guard``).
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    #: ``nats://...`` publishes events to NATS JetStream; None keeps them in this process.
    nats_url: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    #: A run or task whose heartbeat is older than this is no longer running.
    heartbeat_cutoff_s: int = 360
    migrate: bool = True
    #: Datastore roots (folders, ``s3://bucket/prefix``) whose task logs the service may read.
    log_roots: tuple[str, ...] = ()
    #: Published events older than this are pruned from the log and the JetStream stream.
    event_retention_s: float = DEFAULT_RETENTION_S
    #: The time run and task statuses are judged at (tests move it instead of sleeping).
    clock: Callable[[], float] = time.time


def create_app(config: ServiceConfig) -> FastAPI:
    """The service for ``config``: migrates the schema and starts the event relay on start-up."""
    database = connect(config.database_url, config.read_database_url)
    hub = EventHub(database, config.nats_url, config.event_retention_s)
    store = Store(database, on_commit=hub.wake)
    queries = pages.Queries(database, config.heartbeat_cutoff_s, store, config.clock)
    logs = TaskLogs(store, LogFiles(config.log_roots))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.migrate:
            migrate(database)
        await hub.start()
        yield
        await hub.stop()
        database.dispose()

    app = FastAPI(
        title="Metaflow Stack metadata service",
        version=SERVICE_VERSION,
        lifespan=lifespan,
    )
    app.router.max_body_size = config.max_body_bytes
    guard = Guard(config.host, config.auth_key, config.allowed_hosts, open_paths=_OPEN)
    app.add_middleware(GuardMiddleware, guard=guard)  # inside the headers middleware: refusals carry them too
    app.state.store, app.state.hub, app.state.queries = store, hub, queries
    registry = registry_for(hub)
    api_errors.install(app, "the metadata service")

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeoutError)
    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        response = error_response(503, "database_unavailable", "the database is unreachable; nothing was written")
        response.headers["Retry-After"] = "1"
        return response

    @app.middleware("http")
    async def headers_and_limits(request: Request, call_next: Any) -> Response:
        declared = request.headers.get("content-length", "")
        if is_number(declared) and int(declared) > config.max_body_bytes:
            # Refused before reading, as JSON; FastAPI's own limit still cuts off a chunked body.
            response: Response = error_response(413, "payload_too_large", f"body over {config.max_body_bytes} bytes")
        else:
            response = await call_next(request)
        response.headers[VERSION_HEADER] = SERVICE_VERSION
        return response

    # -- admin --------------------------------------------------------------

    @app.get("/ping")
    def ping() -> Response:
        return Response("pong", media_type="text/plain", headers={"X-Capabilities": ",".join(CAPABILITIES)})

    @app.get("/version")
    def version() -> Response:
        return Response(SERVICE_VERSION, media_type="text/plain")

    @app.get("/healthcheck")
    def healthcheck() -> dict[str, Any]:
        return {"status": "UP", "database": queries.ping(), "events": hub.describe()}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/admin/parked-events")
    def parked_events(
        after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> dict[str, Any]:
        """Events the broker refused, oldest first, each with the broker's answer; page with ``after``."""
        parked = hub.parked_events(after, limit)
        return {"events": parked, "next_after": parked[-1]["seq"] if len(parked) == limit else None}

    # -- flows and runs -----------------------------------------------------

    @app.get("/flows")
    def flows(request: Request) -> Response:
        return queries.collection(request, "flows", store.list_all, None)

    @app.get("/flows/{flow_id}")
    def get_flow(flow_id: str) -> dict[str, Any]:
        return store.get_flow(flow_id)

    @app.post("/flows/{flow_id}")
    def create_flow(flow_id: str, body: Body[Created] = None) -> dict[str, Any]:
        return store.create_flow(flow_id, body or Created())

    @app.get("/flows/{flow_id}/runs")
    def runs(request: Request, flow_id: str) -> Response:
        return queries.collection(request, "runs", store.list_all, flow_id)

    @app.post("/flows/{flow_id}/run")
    def create_run(flow_id: str, body: Body[RunBody] = None) -> dict[str, Any]:
        return store.create_run(flow_id, body or RunBody())

    @app.get("/flows/{flow_id}/runs/{run}")
    def get_run(flow_id: str, run: str) -> dict[str, Any]:
        return store.get_run(flow_id, run)

    @app.post("/flows/{flow_id}/runs/{run}/heartbeat")
    def run_heartbeat(flow_id: str, run: str, body: Body[RunHeartbeat] = None) -> dict[str, Any]:
        return store.run_heartbeat(flow_id, run, body or RunHeartbeat())

    @app.patch("/flows/{flow_id}/runs/{run}/tag/mutate")
    def mutate_tags(flow_id: str, run: str, body: Body[TagMutation] = None) -> dict[str, Any]:
        return store.mutate_tags(flow_id, run, body or TagMutation())

    @app.get("/flows/{flow_id}/runs/{run}/metadata")
    def run_metadata(request: Request, flow_id: str, run: str) -> Response:
        return queries.collection(request, "run-metadata", store.list_all, flow_id, run)

    @app.get("/flows/{flow_id}/runs/{run}/summary")
    def summary(flow_id: str, run: str) -> dict[str, Any]:
        return queries.summary(flow_id, run)

    @app.get("/flows/{flow_id}/runs/{run}/failures")
    def failures(request: Request, flow_id: str, run: str) -> Response:
        return queries.failures(request, flow_id, run)

    @app.get("/flows/{flow_id}/runs/{run}/tasks")
    def run_tasks(request: Request, flow_id: str, run: str) -> Response:
        return queries.run_tasks(request, flow_id, run)

    @app.get("/flows/{flow_id}/runs/{run}/artifacts")
    def run_artifacts(request: Request, flow_id: str, run: str) -> Response:
        return queries.artifacts(request, flow_id, run)

    @app.get("/flows/{flow_id}/artifacts")
    def flow_artifacts(request: Request, flow_id: str) -> Response:
        return queries.artifacts(request, flow_id, None)

    # -- steps --------------------------------------------------------------

    @app.get("/flows/{flow_id}/runs/{run}/steps")
    def steps(flow_id: str, run: str) -> list[dict[str, Any]]:
        return store.list_all("steps", flow_id, run)

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}")
    def get_step(flow_id: str, run: str, step_name: str) -> dict[str, Any]:
        return store.get_step(flow_id, run, step_name)

    @app.post("/flows/{flow_id}/runs/{run}/steps/{step_name}/step")
    def create_step(flow_id: str, run: str, step_name: str, body: Body[Created] = None) -> dict[str, Any]:
        return store.create_step(flow_id, run, step_name, body or Created())

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/artifacts")
    def step_artifacts(request: Request, flow_id: str, run: str, step_name: str) -> Response:
        return queries.artifacts(request, flow_id, run, step_name)

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/filtered_tasks")
    def filtered_tasks(
        flow_id: str, run: str, step_name: str, metadata_field_name: str | None = None, pattern: str | None = None
    ) -> list[str]:
        return store.filtered_tasks(flow_id, run, step_name, metadata_field_name, pattern)

    # -- tasks --------------------------------------------------------------

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks")
    def tasks(request: Request, flow_id: str, run: str, step_name: str) -> Response:
        return queries.step_tasks(request, flow_id, run, step_name)

    @app.post("/flows/{flow_id}/runs/{run}/steps/{step_name}/task")
    def create_task(flow_id: str, run: str, step_name: str, body: Body[TaskBody] = None) -> dict[str, Any]:
        return store.create_task(flow_id, run, step_name, body or TaskBody())

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}")
    def get_task(flow_id: str, run: str, step_name: str, task: str) -> dict[str, Any]:
        return store.get_task(flow_id, run, step_name, task)

    @app.post("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}/heartbeat")
    def task_heartbeat(flow_id: str, run: str, step_name: str, task: str) -> dict[str, Any]:
        return store.task_heartbeat(flow_id, run, step_name, task)

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}/metadata")
    def task_metadata(flow_id: str, run: str, step_name: str, task: str) -> list[dict[str, Any]]:
        return store.task_metadata(flow_id, run, step_name, task)

    @app.post("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}/metadata")
    def add_metadata(
        flow_id: str, run: str, step_name: str, task: str, body: Body[bodies.Rows[Metadatum]]
    ) -> dict[str, int]:
        return store.add_metadata(flow_id, run, step_name, task, body)

    @app.post("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}/artifact")
    def add_artifacts(
        flow_id: str, run: str, step_name: str, task: str, body: Body[bodies.Rows[ArtifactBody]]
    ) -> dict[str, int]:
        return store.add_artifacts(flow_id, run, step_name, task, body)

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}/artifacts")
    def task_artifacts(request: Request, flow_id: str, run: str, step_name: str, task: str) -> Response:
        return queries.artifacts(request, flow_id, run, step_name, task)

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}/attempt/{attempt}/artifacts")
    def attempt_artifacts(flow_id: str, run: str, step_name: str, task: str, attempt: Attempt) -> list[dict[str, Any]]:
        return store.artifacts(flow_id, run, step_name, task, attempt)

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}/artifacts/{name}")
    def get_artifact(flow_id: str, run: str, step_name: str, task: str, name: str) -> dict[str, Any]:
        return store.artifact(flow_id, run, step_name, task, name, None)

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}/artifacts/{name}/attempt/{attempt}")
    def get_artifact_attempt(flow_id: str, run: str, step_name: str, task: str, name: str, attempt: Attempt) -> dict:
        return store.artifact(flow_id, run, step_name, task, name, attempt)

    @app.get("/flows/{flow_id}/runs/{run}/steps/{step_name}/tasks/{task}/logs/{stream}")
    def task_logs(request: Request, flow_id: str, run: str, step_name: str, task: str, stream: str) -> Response:
        return logs.answer(request, flow_id, run, step_name, task, stream)

    # -- events -------------------------------------------------------------

    @app.get("/events", response_class=StreamingResponse)
    async def events(request: Request, subscription: EventSubscription) -> StreamingResponse:
        return StreamingResponse(
            hub.events(request, subscription),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app
