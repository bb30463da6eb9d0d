"""The frames of Nomad's log endpoint (``GET /v1/client/fs/logs/:alloc_id``), decoded as they arrive.

The endpoint writes JSON objects one after another (a Go ``json.Encoder`` of
``api/fs.go``'s ``StreamFrame``): ``Data`` (base64 bytes of the log), ``Offset``
and ``File`` (where they are), ``FileEvent`` (``file deleted``, ``file
truncated``); an empty object is a heartbeat, sent each second (bytes may still be on their way).
python-nomad reads the whole body before it returns, so it cannot follow a
running task: these decoders take the body chunk by chunk instead.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

#: The most a decoder holds while a frame is incomplete: Nomad sends at most 64 KiB of data a frame
#: (about 87 KB of JSON), so more is a stream gone wrong, not a slow one.
MAX_PENDING = 1 << 20
#: The longest line held whole: a log written with no newline is passed on in pieces of this size.
MAX_LINE = 64 << 10


@dataclass(frozen=True)
class Frame:
    """One frame: some bytes of a log, or news about its file, or nothing (a heartbeat)."""

    data: bytes = b""
    offset: int = 0
    file: str = ""
    event: str = ""

    @property
    def heartbeat(self) -> bool:
        return not (self.data or self.offset or self.file or self.event)


class FrameDecoder:
    """Frames out of the body's chunks, however the chunks cut them."""

    def __init__(self) -> None:
        self._pending = ""
        self._decoder = json.JSONDecoder()

    def feed(self, chunk: bytes) -> list[Frame]:
        """The frames ``chunk`` completes; ``ValueError`` for a stream that is not Nomad's frames."""
        self._pending += chunk.decode("ascii", errors="replace")  # JSON of base64: ASCII only
        frames = []
        while True:
            text = self._pending.lstrip()
            if not text:
                self._pending = ""
                break
            try:
                value, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                if len(text) > MAX_PENDING:
                    raise ValueError(f"no whole log frame in {len(text)} bytes") from None
                self._pending = text
                break
            self._pending = text[end:]
            frames.append(_frame(value))
        return frames


def _frame(value: object) -> Frame:
    if not isinstance(value, dict):
        raise ValueError(f"a log frame is a JSON object, not {type(value).__name__}")
    try:
        data = base64.b64decode(value.get("Data") or "", validate=True)
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"a log frame's Data is not base64: {exc}") from None
    return Frame(data, int(value.get("Offset") or 0), str(value.get("File") or ""), str(value.get("FileEvent") or ""))


def skipped(before: str, after: str) -> bool:
    """Whether a log's frames went from file ``before`` to file ``after`` past files never read. Nomad names a
    log's files ``<task>.<kind>.<n>`` and its stream goes on to the next one still there, so a gap in ``n``
    is files deleted (rotated out, ``LogConfig.MaxFiles``) before they were read."""
    numbers = [name.rpartition(".")[2] for name in (before, after)]
    return all(n.isdigit() for n in numbers) and int(numbers[1]) > int(numbers[0]) + 1


class Lines:
    """A log's bytes as whole lines: a line cut between frames is held until its end arrives (at most
    ``MAX_LINE`` bytes of it), ``flush`` gives what is left when the log ends."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        *whole, self._partial = (self._partial + data).split(b"\n")
        while len(self._partial) > MAX_LINE:
            whole.append(self._partial[:MAX_LINE])
            self._partial = self._partial[MAX_LINE:]
        return [line.decode("utf-8", errors="replace") for line in whole]

    def flush(self) -> list[str]:
        rest, self._partial = self._partial, b""
        return [rest.decode("utf-8", errors="replace")] if rest else []
