"""The framing between a caller and a worker process over a pair of pipes.

A frame is a 5-byte header (one kind byte, a big-endian length) and that many
payload bytes. Reads block in the kernel until data arrives: nobody spins.
"""

from __future__ import annotations

import json
import struct
import traceback
from typing import BinaryIO

from metaflow_stack.functions.errors import RemoteFunctionError

HEADER = struct.Struct(">BI")

# Requests
CALL = 1
BATCH = 2
# Responses
OK = 0
RAISED = 3  # payload: JSON {"type", "message", "traceback"}
READY = 4  # sent once the function is loaded
LOAD_FAILED = 5  # payload: JSON {"type", "message", "traceback"}


class ChannelClosed(EOFError):
    """The other end went away mid-frame or before one."""


def write_frame(stream: BinaryIO, kind: int, payload: bytes) -> None:
    stream.write(HEADER.pack(kind, len(payload)) + payload)
    stream.flush()


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    """Exactly ``size`` bytes: a pipe hands out large payloads in pieces."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        got = stream.readinto(view[filled:])
        if not got:
            raise ChannelClosed
        filled += got
    return bytes(buffer)


def read_frame(stream: BinaryIO) -> tuple[int, bytes]:
    kind, length = HEADER.unpack(_read_exact(stream, HEADER.size))
    return kind, _read_exact(stream, length)


def error_payload(exc: BaseException) -> bytes:
    """A raised exception as the payload of a RAISED or LOAD_FAILED frame (call inside ``except``)."""
    return json.dumps({"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}).encode()


def remote_error(payload: bytes) -> RemoteFunctionError:
    """The caller-side error for a RAISED payload."""
    error = json.loads(payload)
    return RemoteFunctionError(error["type"], error["message"], error["traceback"])
