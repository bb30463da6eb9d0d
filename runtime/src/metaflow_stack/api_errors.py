"""One JSON error shape for every HTTP server in the stack: ``{code, message, details}``.

Handlers raise ``ApiError``; ``install`` makes FastAPI answer it, unknown
routes, wrong methods and malformed requests in that shape, so no client ever
parses an HTML page or a bare string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # FastAPI only where a server is installed: ApiError itself needs nothing
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error answered as ``status`` with a stable ``code`` and a sentence."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def bad_parameter(name: str, message: str) -> ApiError:
    """A 400 naming the query parameter, path segment or body field at fault."""
    return ApiError(400, "bad_parameter", f"{name}: {message}", {"parameter": name})


def error_response(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    return JSONResponse({"code": code, "message": message, "details": details}, status_code=status)


def install(app: FastAPI) -> None:
    """Answer ``ApiError``, unknown routes and validation failures as JSON."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "error")
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        name = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return error_response(
            400, "bad_parameter", f"{name or 'request'}: {first.get('msg', 'invalid')}", {"parameter": name}
        )
