"""Reading a server's answer with a bound on its size and on the time it takes, for the clients of services
the stack does not run (Nomad, Phala Cloud, a key-release service elsewhere).

httpx's timeouts are per read: a server (or a proxy in front of it) that
sends a byte now and then holds the caller for as long as it likes, and
one that sends without end fills its memory. ``whole`` reads a streamed
answer to a limit and a deadline, and gives it back as a complete
``httpx.Response``, so callers read its status, text and JSON as before.
"""

from __future__ import annotations

import time

import httpx

#: Headers that no longer describe the body once it is read (decoded).
_ENCODING = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class AnswerTooLarge(Exception):
    """The answer went past its limit of bytes."""


class AnswerTooSlow(Exception):
    """The answer was not whole by its deadline."""


def whole(response: httpx.Response, limit: int, deadline: float | None = None) -> httpx.Response:
    """The streamed ``response`` read (decoded) and closed: at most ``limit`` bytes (``AnswerTooLarge``), whole
    by ``deadline`` (``time.monotonic()``; ``AnswerTooSlow``); httpx's own errors pass through."""
    body = bytearray()
    try:
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise AnswerTooLarge(f"over {limit >> 20} MB" if limit >= 1 << 20 else f"over {limit} bytes")
            if deadline is not None and time.monotonic() > deadline:
                raise AnswerTooSlow("not whole in time")
    finally:
        response.close()
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _ENCODING]
    return httpx.Response(response.status_code, headers=headers, content=bytes(body), request=response.request)
