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


#: How many files of a log Nomad keeps when the job does not say (``LogConfig.MaxFiles``).
KEPT_FILES = 10


class Position:
    """Where a reader of a log is, as Nomad names it: a file (``<task>.<kind>.<n>``) and the offset in it, with
    the size of each file it read to the end. Nomad counts an ``origin=start`` offset across the files it
    still keeps, its newest ``kept`` (``LogConfig.MaxFiles``), and deletes the oldest as a new one begins,
    so the bytes read are not where to resume once a file has gone."""

    def __init__(self, kept: int = KEPT_FILES) -> None:
        self.kept, self.file, self.offset = kept, "", 0
        self.sizes: dict[int, int] = {}

    def advance(self, frame: Frame) -> bool:
        """Take ``frame`` in; whether it comes after files never read (rotated out first: Nomad's stream goes
        on to the next file still there, so a gap in ``n`` is files deleted unread)."""
        before, after = _number(self.file), _number(frame.file)
        if after is None:
            return False
        self.file, self.offset = frame.file, frame.offset  # (Nomad's Offset: where the frame's bytes end)
        self.sizes[after] = frame.offset
        return bool(frame.data) and before is not None and after > before + 1

    def resumed(self) -> int:
        """The ``origin=start`` offset of this position: the files still kept before this one (its newest
        being this one, as for a reader that had caught up), then the offset in it."""
        number = _number(self.file)
        if number is None:
            return self.offset
        earlier = range(max(0, number - self.kept + 1), number)
        return sum(self.sizes.get(n, 0) for n in earlier) + self.offset


def _number(file: str) -> int | None:
    number = file.rpartition(".")[2]
    return int(number) if number.isdigit() else None


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
