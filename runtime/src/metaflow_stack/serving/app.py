"""An ASGI app that serves one bound function: ``create_app(reference)``.

A thin adapter in front of ``function_from_json``: the function (and its
model) loads once at start-up, requests are decoded by the codec their
``Content-Type`` names, validated against the reference's input schema (a 422
naming the field before the function runs), and answered in the codec the
``Accept`` header asks for. Every error is JSON ``{code, message, details}``;
a function that raises gives a 500 with an error id, its traceback only in the
server log. The OpenAPI document carries the function's own schemas.
Concurrent single calls are batched adaptively (``serving.batching``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from metaflow_stack import api_errors
from metaflow_stack.api_errors import ApiError, error_response
from metaflow_stack.functions import codecs
from metaflow_stack.functions.backends import Function, function_from_json
from metaflow_stack.functions.bundle import resolve_reference
from metaflow_stack.functions.errors import (
    CallTimeoutError,
    FunctionError,
    InvalidInputError,
    RemoteFunctionError,
)
from metaflow_stack.http_guard import BodyLimitMiddleware, Guard, GuardMiddleware
from metaflow_stack.serving.batching import AdaptiveBatcher

log = logging.getLogger("metaflow_stack.serving")

#: Content types the server reads and writes, and the codec behind each.
CONTENT_TYPES = {"application/json": "json", "application/msgpack": "msgpack", "application/avro": "avro"}


@dataclass(frozen=True)
class ServeOptions:
    """How the server runs the function and what it accepts."""

    backend: str = "local"
    workers: int = 1
    max_body_bytes: int = 10 * 1024 * 1024
    #: Requests in flight; as many again may wait for a slot, and past that a request is answered 503 before its
    #: body is read, so a server holds at most twice this many bodies.
    max_concurrency: int = 64
    #: Concurrent ``/invoke`` requests share one call to the function, up to this many; 1 turns it off.
    max_batch_size: int = 32
    #: Seconds a call to the function may take per input (a batch of n: n times it): past it the worker running
    #: it is stopped and its requests are answered 504, so a hung call holds no slot for good. ``None``: no bound.
    #: ``inprocess`` has none: its calls run in the server's own threads, which nothing can stop.
    call_timeout: float | None = 60.0


def _openapi_schemas(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """Move a JSON Schema's ``$defs`` into OpenAPI components and point its refs there."""
    schema = dict(schema)
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = definition

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" else rewrite(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name in list(components):
        components[name] = rewrite(components[name])
    return rewrite(schema)


#: Paths answered without the key: the probes an orchestrator sends.
OPEN_PATHS = frozenset({"/health", "/ready"})


def create_app(reference: Any, options: ServeOptions | None = None, guard: Guard | None = None) -> FastAPI:
    """The app serving ``reference`` (JSON, a bundle location, or a parsed reference), behind ``guard``
    (by default: loopback names only, no key)."""
    options = options or ServeOptions()
    ref, _ = resolve_reference(reference)  # read here for the schemas; loaded again at start-up
    registry = CollectorRegistry()
    requests = Counter("function_requests", "Requests by route and status", ["route", "status"], registry=registry)
    latency = Histogram("function_request_seconds", "Request latency by route", ["route"], registry=registry)
    batch_sizes = Histogram(
        "function_batch_size",
        "Inputs per call to the function (adaptive batching)",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        registry=registry,
    )
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loaded once per server process, in a thread so start-up stays responsive to health checks;
        # every artifact too, so /ready means the first call is as fast as the second.
        state["function"] = await asyncio.to_thread(
            function_from_json,
            reference,
            options.backend,
            workers=options.workers,
            preload=True,
            call_timeout=None if options.backend == "inprocess" else options.call_timeout,
        )
        state["codecs"] = {
            name: (codecs.create(name, ref.input_schema), codecs.create(name, ref.output_schema))
            for name in CONTENT_TYPES.values()
        }
        state["slots"] = asyncio.Semaphore(options.max_concurrency)
        state["active"] = 0  # requests past the busy check: reading, waiting for a slot, or in one
        # Inputs are validated in the handler, so the batcher calls the backend directly (a batch of one
        # at most with --max-batch-size 1: it also decides where a call runs, on the loop or in a thread).
        batcher = AdaptiveBatcher(state["function"], options.workers, options.max_batch_size, batch_sizes.observe)
        state["call"] = batcher.call
        # Everything loaded so far (Metaflow, the model and its libraries) lives as long as the server: out
        # of the collector's way, so a full collection walks only what requests allocate. Walking it all
        # stalled every request in flight: a p99 four times a plain app's at 64 concurrent, now below it.
        gc.collect()
        gc.freeze()
        yield
        await batcher.close()
        function: Function = state.pop("function")
        await asyncio.to_thread(function.close)

    app = FastAPI(
        title=f"{ref.name} (Metaflow Stack function)",
        description=f"Bound to task {ref.task.pathspec}.",
        version=ref.digest[:12],
        lifespan=lifespan,
    )

    api_errors.install(app, "the function server")
    app.add_middleware(GuardMiddleware, guard=guard or Guard(open_paths=OPEN_PATHS))
    # Outermost: a body over the limit, declared or streamed (chunked), is refused before anything holds it.
    app.add_middleware(BodyLimitMiddleware, limit=options.max_body_bytes)

    def codec_for(request: Request, header: str, default: str = "application/json") -> str:
        """The media type ``header`` (``content-type``: one; ``accept``: the first of its list this server
        speaks, ``*/*`` meaning ``default``) names, of those in ``CONTENT_TYPES``."""
        named = request.headers.get(header) or default
        ranges = [part.split(";")[0].strip().lower() for part in named.split(",")] if header == "accept" else []
        for media in ranges or [named.split(";")[0].strip().lower()]:
            media = default if media in ("", "*/*") else media
            if media in CONTENT_TYPES:
                return media
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{header}: unsupported media type {named[:100]!r}",
            {"field": header, "supported": sorted(CONTENT_TYPES)},
        )

    def readable(decoder: codecs.Codec, media: str) -> None:
        """Refuse a codec that cannot bound this function's input, before its body is read."""
        if getattr(decoder, "open_schema", False):  # (Avro of values that may nest without end)
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content-type: this function's input may nest without end, which {media} cannot bound; "
                "send application/json or application/msgpack",
                {"field": "content-type", "supported": ["application/json", "application/msgpack"]},
            )

    def decoded(decoder: codecs.Codec, media: str, data: bytes, batch: bool) -> Any:
        """The body's value: JSON values only, whatever the codec could carry."""
        try:
            value = decoder.decode_batch(data) if batch else decoder.decode(data)
        except Exception as exc:  # each codec raises its own parse errors
            raise ApiError(400, "malformed_body", f"the body is not valid {media}: {exc}") from None
        if media != "application/json":
            try:  # msgpack carries bytes and keys that are not strings: no input of a JSON Schema holds them
                orjson.dumps(value)
            except TypeError as exc:
                raise ApiError(422, "invalid_input", f"input: not a JSON value: {exc}", {"field": "input"}) from None
        return value

    async def invoke(request: Request, route: str, batch: bool) -> Response:
        started = time.perf_counter()
        status, active = 500, False
        try:
            if state["active"] >= 2 * options.max_concurrency:  # before its body is read: memory stays bounded
                raise ApiError(
                    503,
                    "service_unavailable",
                    f"busy: {options.max_concurrency} calls in flight and as many waiting; try again shortly",
                )
            state["active"] += 1
            active = True
            media = codec_for(request, "content-type")
            answer_media = codec_for(request, "accept", default=media)
            decoder = state["codecs"][CONTENT_TYPES[media]][0]
            encoder = state["codecs"][CONTENT_TYPES[answer_media]][1]
            readable(decoder, media)
            value = decoded(decoder, media, await request.body(), batch)
            if batch and not isinstance(value, list):
                raise ApiError(422, "invalid_input", "a batch body must be an array", {"field": "input"})
            function: Function = state["function"]
            async with state["slots"]:
                try:
                    if batch:
                        result = await function.abatch(value)
                    else:
                        function.validate(value)
                        result = await state["call"](value)
                except InvalidInputError as exc:
                    raise ApiError(422, "invalid_input", exc.message, {"field": exc.field}) from None
                except RemoteFunctionError as exc:
                    error_id = uuid.uuid4().hex[:16]
                    log.error("function %s raised (error id %s)\n%s", ref.name, error_id, exc.remote_traceback)
                    raise ApiError(
                        500, "function_raised", f"the function raised {exc.exc_type}", {"error_id": error_id}
                    ) from None
                except CallTimeoutError as exc:
                    log.error("function %s: %s", ref.name, exc.message)
                    raise ApiError(504, exc.code, exc.message) from None
                except FunctionError as exc:
                    error_id = uuid.uuid4().hex[:16]
                    log.error("function %s failed (error id %s): %s", ref.name, error_id, exc)
                    raise ApiError(503, exc.code, exc.message, {"error_id": error_id}) from None
            payload = encoder.encode_batch(result) if batch else encoder.encode(result)
            status = 200
            return Response(payload, media_type=answer_media)
        except ApiError as exc:
            status = exc.status
            raise
        except HTTPException as exc:  # (a streamed body over the limit: the body-limit middleware answers it)
            status = exc.status_code
            raise
        except ClientDisconnect:  # (the client went away mid-body: counted as nginx counts it)
            status = 499
            raise
        finally:
            if active:
                state["active"] -= 1
            requests.labels(route, str(status)).inc()
            latency.labels(route).observe(time.perf_counter() - started)

    components: dict[str, Any] = {}
    input_schema = _openapi_schemas(ref.input_schema or {}, components)
    output_schema = _openapi_schemas(ref.output_schema or {}, components)
    error_schema = {
        "type": "object",
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}},
        "required": ["code", "message"],
    }
    components["Error"] = error_schema
    errors = {
        str(code): {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code, text in (
            (400, "malformed body"),
            (413, "body too large"),
            (415, "unsupported content type, or answer type"),
            (422, "input does not match the schema"),
            (500, "the function raised, or the server failed"),
            (503, "busy (try again shortly), or the function's worker failed"),
            (504, "the call outlasted the server's call timeout"),
        )
    }

    def documented(schema: dict[str, Any]) -> dict[str, Any]:
        return {media: {"schema": schema} for media in CONTENT_TYPES}

    @app.post(
        "/invoke",
        summary=f"Call {ref.name} on one input",
        openapi_extra={"requestBody": {"required": True, "content": documented(input_schema)}},
        responses={200: {"description": "the function's result", "content": documented(output_schema)}, **errors},
    )
    async def invoke_one(request: Request) -> Response:
        return await invoke(request, "/invoke", batch=False)

    @app.post(
        "/invoke/batch",
        summary=f"Call {ref.name} on an array of inputs",
        openapi_extra={
            "requestBody": {"required": True, "content": documented({"type": "array", "items": input_schema})}
        },
        responses={
            200: {
                "description": "one result per input, in order",
                "content": documented({"type": "array", "items": output_schema}),
            },
            **errors,
        },
    )
    async def invoke_batch(request: Request) -> Response:
        return await invoke(request, "/invoke/batch", batch=True)

    @app.get("/health", summary="Liveness: the server process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the function is loaded", responses={503: errors["500"]})
    async def ready() -> Response:
        if "function" not in state:
            return error_response(503, "not_ready", "the function is still loading")
        return JSONResponse({"status": "ready", "function": ref.name, "backend": options.backend})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=PROMETHEUS_CONTENT_TYPE)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = default_openapi()
            document.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
