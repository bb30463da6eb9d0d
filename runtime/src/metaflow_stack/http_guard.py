"""Who may talk to a stack server: this machine by default, key holders when exposed, never a web page.

The same checks run before any route of every server (the metadata service,
the UI, a function server):

- **Host.** A web page can point a name of its own at 127.0.0.1 (DNS
  rebinding) and then read a loopback server as if it were its own site; the
  request then carries that name in ``Host``. A server bound to loopback
  answers only to loopback names; one bound to an address, to that address
  and loopback; one bound to every interface, to any name. ``allowed_hosts``
  adds names (a proxy's, a cluster's).
- **Origin.** Browsers send ``Origin`` on cross-site requests; one that is
  not an accepted host is refused, so a page elsewhere cannot use a visitor's
  session either.
- **Key.** With a key, every request but the open probes carries it, as
  ``x-api-key`` (what Metaflow's client sends) or, for the UI's pages, the
  ``SameSite=Strict`` cookie its sign-in link sets. Keys are compared in
  constant time and never logged.

A server bound beyond loopback without a key refuses to start unless told
``--insecure-no-auth`` (``check_exposure``).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from metaflow_stack.api_errors import error_response
from metaflow_stack.errors import StackError

#: The variable every server reads its key from, unless a server-specific one is set.
KEY_VARIABLE = "METAFLOW_STACK_AUTH_KEY"
#: The UI's session cookie: the key, set by its sign-in link.
SESSION_COOKIE = "metaflow_stack_key"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: Bind addresses meaning every interface.
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or a name) is this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def configured_key(*variables: str) -> str | None:
    """The first non-empty key among ``variables`` and ``METAFLOW_STACK_AUTH_KEY``."""
    for name in (*variables, KEY_VARIABLE):
        if os.environ.get(name):
            return os.environ[name]
    return None


def check_exposure(host: str, key: str | None, insecure: bool) -> None:
    """Refuse to serve beyond loopback without a key, unless the user said so explicitly."""
    if key or insecure or is_loopback(host):
        return
    raise StackError(
        f"listening on {host} would let anyone who reaches it read and write without a key",
        fix=f"set {KEY_VARIABLE} (a long random string) or pass --insecure-no-auth",
    )


def _split(value: str) -> tuple[str, int | None]:
    """The name in a ``Host`` header or an origin's netloc, and its port; ``("", None)`` if malformed."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


@dataclass(frozen=True)
class Guard:
    """The checks for one server: where it is bound, its key, and extra names it answers to."""

    bind: str = "127.0.0.1"
    key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    #: Paths answered without the key: liveness and readiness probes.
    open_paths: frozenset[str] = field(default_factory=frozenset)
    #: Whether the key may come as the UI's session cookie.
    cookie: bool = False

    def __post_init__(self) -> None:
        # Every name this server answers to, worked out once rather than on each request.
        own = {h.lower() for h in self.allowed_hosts}
        if self.bind not in WILDCARDS:
            own.add(self.bind.lower().strip("[]"))
        object.__setattr__(self, "_names", frozenset(own | LOOPBACK_NAMES))
        object.__setattr__(self, "_any_name", self.bind in WILDCARDS and not self.allowed_hosts)

    def accepts_host(self, name: str) -> bool:
        # On every interface with no names listed, any name: the key guards it.
        return name in self._names or (self._any_name and bool(name))

    def refusal(self, path: str, headers: Any) -> tuple[int, str, str] | None:
        """Why a request may not go on (status, code, message), or None."""
        if path in self.open_paths and "origin" not in headers:
            return None  # probes (an orchestrator's, by the pod's address) reveal nothing and change nothing
        host, port = _split(headers.get("host", ""))
        if not self.accepts_host(host):
            return 403, "forbidden_host", f"this server does not answer to the host name {host or '(none)'!r}"
        origin = headers.get("origin")
        if origin == "null":
            return 403, "forbidden_origin", "requests from opaque origins (sandboxed pages, files) are refused"
        if origin:
            origin_host, origin_port = _split(origin.partition("://")[2])
            # On loopback every local program is the same site, so the page must also be this server's port.
            same_port = not is_loopback(self.bind) or origin_port == port
            if not (self.accepts_host(origin_host) and same_port):
                return 403, "forbidden_origin", f"requests from pages at {origin} are refused"
        if self.key and path not in self.open_paths and not self._keyed(headers):
            return 401, "unauthorized", "missing or wrong key (send it as the x-api-key header)"
        return None

    def _keyed(self, headers: Any) -> bool:
        given = headers.get("x-api-key")
        if given is None and self.cookie:
            given = _cookie(headers.get("cookie", ""), SESSION_COOKIE)
        return given is not None and hmac.compare_digest(given.encode(), (self.key or "").encode())


def _cookie(header: str, name: str) -> str | None:
    """One cookie's value, read pair by pair: another program's malformed cookie on the same host must
    not hide this one (``http.cookies`` gives up on the whole header)."""
    for pair in header.split(";"):
        key, _, value = pair.strip().partition("=")
        if key == name:
            return value
    return None


class BodyLimitMiddleware:
    """Refuses a request body over ``limit`` bytes as JSON (413), declared or streamed (chunked), before a
    handler reads it whole: a server's memory per request stays bounded whatever the client sends."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = error_response(
            413, "payload_too_large", f"body: over {self.limit:,} bytes", details={"parameter": "body"}
        )
        if declared.isascii() and declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        seen, started = 0, False

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(413, f"the body is over {self.limit:,} bytes")
            return message

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if started:  # the app answered before it read the whole body: nothing more can be said
                raise
            await too_large(scope, receive, send)


class BusyLimitMiddleware:
    """Answers a request to one of ``paths`` 503 (JSON) before its body is read while ``limit`` such requests
    are in flight (reading, waiting or served): the bodies a server holds stay bounded however many clients
    pile on, where each would otherwise be read whole, then wait."""

    def __init__(self, app: Any, limit: int, paths: frozenset[str]) -> None:
        self.app, self.limit, self.paths = app, limit, paths
        self.active = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            busy = error_response(503, "busy", f"{self.limit} requests are in flight; try again shortly")
            await busy(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class _TooLarge(HTTPException):
    """A streamed body went over the limit, raised from ``receive``: FastAPI lets an ``HTTPException`` from
    there through to the app's handler (its own 413), and ``BodyLimitMiddleware`` answers any that is not."""


class GuardMiddleware:
    """Runs ``Guard`` before the app (pure ASGI, so streams pass through untouched)."""

    def __init__(self, app: Any, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refused = self.guard.refusal(scope["path"], Headers(scope=scope))
            if refused is not None:
                await error_response(*refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)
