"""The framing between a caller and a worker process over a pair of pipes.

A frame is a 5-byte header (one kind byte, a big-endian length) and that many
payload bytes. Reads block in the kernel until data arrives: nobody spins.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

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


def read_frame(stream: BinaryIO) -> tuple[int, bytes]:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        raise ChannelClosed
    kind, length = HEADER.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        raise ChannelClosed
    return kind, payload
