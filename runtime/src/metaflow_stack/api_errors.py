"""One JSON error shape for every HTTP server in the stack: ``{code, message, fix, details}``.

Library code raises the ``StackError`` family (``errors``); this module is
the HTTP edge that maps it, by its ``code``, to a status. ``ApiError`` is for
the few errors that only exist at that edge (a route's own 404, a 503 while
the database is down). ``install`` makes FastAPI answer these, unknown
routes, wrong methods and malformed requests in that shape, so no client
ever parses an HTML page or a bare string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metaflow_stack.errors import InvalidInput, StackError

if TYPE_CHECKING:  # FastAPI only where a server is installed: the errors themselves need nothing
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

#: The status each stable code answers with; a code not listed is a server-side failure (500).
STATUS = {
    "bad_parameter": 400,
    "unregistered": 400,
    "integrity_error": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "attestation_refused": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "payload_too_large": 413,
    "bad_artifact": 422,
    "system_tag": 422,
    "log_root_not_allowed": 403,
    "service_error": 502,
    "datastore_unavailable": 502,
    "not_implemented": 501,
    "service_too_old": 502,
    "service_unavailable": 503,
    "broker_unavailable": 503,
    "database_unavailable": 503,
}


class ApiError(StackError):
    """An error answered as ``status`` with a stable ``code`` and a sentence."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, fix: str | None = None) -> None:
        super().__init__(message, fix)
        self.status, self.code, self.details = status, code, details


def bad_parameter(name: str, message: str) -> InvalidInput:
    """A 400 naming the query parameter, path segment or body field at fault."""
    return InvalidInput(name, message)


def error_response(status: int, code: str, message: str, details: Any = None, fix: str | None = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    return JSONResponse({"code": code, "message": message, "fix": fix, "details": details}, status_code=status)


def stack_error_response(exc: StackError) -> JSONResponse:
    """``exc`` as its JSON error: the status its code maps to, the field it names."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.fix)
    details = {"parameter": exc.field} if isinstance(exc, InvalidInput) else getattr(exc, "details", None)
    return error_response(STATUS.get(exc.code, 500), exc.code, exc.message, details, exc.fix)


def install(app: FastAPI, name: str) -> None:
    """Answer the ``StackError`` family, unknown routes and validation failures as JSON; and any other
    exception (a bug) as a JSON 500 saying that ``name`` ("the metadata service") failed, its traceback in
    the log (Starlette raises it on to the server, which logs it), never in the answer."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", f"{name} failed; see its log")

    @app.exception_handler(StackError)
    async def stack_error(request: Request, exc: StackError) -> JSONResponse:
        return stack_error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {400: "bad_parameter", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "error"
        )
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        # A body that cannot be read (too deep, too large) is the body's fault: named so.
        details = {"parameter": "body"} if exc.status_code in (400, 413) else None
        return error_response(exc.status_code, code, message, details)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = tuple(first.get("loc", ()))
        # A field inside the body is named by its path ("0.size"); the body as a whole is "body" (and a body
        # that is not JSON at all, whose "path" is the character where parsing stopped).
        name = ".".join(str(p) for p in where if p not in ("body", "query", "path")) or ".".join(map(str, where[:1]))
        if first.get("type") == "json_invalid":
            name = "body"
        return error_response(
            400, "bad_parameter", f"{name or 'request'}: {first.get('msg', 'invalid')}", {"parameter": name}
        )
