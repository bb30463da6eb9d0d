"""Windows of a task's log: the first or last lines, grepped, bounded in bytes, from a cursor.

The reading behind the service's logs route and the agent's local logs:
both log sources (``runtime`` and ``task``) merged by their mflog
timestamps, files read in 64 KiB ranges, a ``head``/``tail`` read stopping
once it has its lines and a ``grep`` scan after 256 MiB per source (a
cursor then continues the scan). Free of server dependencies.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from metaflow.mflog import LOG_SOURCES

from metaflow_stack.datastore.cursors import decode_cursor
from metaflow_stack.datastore.log_files import LogFile
from metaflow_stack.errors import InvalidInput
from metaflow_stack.ids import is_number
from metaflow_stack.patterns import compile_pattern

if TYPE_CHECKING:
    from starlette.requests import Request

DEFAULT_LINES = 1000
MAX_LINES = 10_000
DEFAULT_MAX_BYTES = 1024 * 1024
#: The highest attempt a request may name (Metaflow's own retries stop far below it).
MAX_ATTEMPT = 1000
MAX_MAX_BYTES = 16 * 1024 * 1024
#: How far one ``grep`` request scans each source before it answers with a cursor.
GREP_SCAN_BYTES = 256 * 1024 * 1024
_CHUNK = 64 * 1024
#: A line longer than this is read as several: waiting for its end, the read held and copied all of it for
#: each range read (a 64 MiB log with no newline took 13 s and 320 MB).
MAX_LINE = 1024 * 1024
#: Where an mflog line's header must end: ``[![MFLOG|0|``, a timestamp, ``Z|``, a source, ``|``, a uuid, ``]``.
_HEADER_MAX = 256
_ACCEPTED = ("head", "tail", "grep", "max_bytes", "attempt", "_cursor")


@dataclass(frozen=True)
class LogQuery:
    """What window of a log a request asks for."""

    lines: int = DEFAULT_LINES
    from_end: bool = False
    #: An RE2 pattern over bytes (``patterns``): linear in the text, whatever the user wrote.
    grep: Any = None
    max_bytes: int = DEFAULT_MAX_BYTES
    attempt: int | None = None
    cursor: list[int] | None = None

    @classmethod
    def parse(cls, request: Request) -> LogQuery:
        given = dict(request.query_params)
        unknown = sorted(set(given) - set(_ACCEPTED))
        if unknown:
            raise InvalidInput(unknown[0], f"unknown parameter here; this route accepts {', '.join(_ACCEPTED)}")
        if "head" in given and "tail" in given:
            raise InvalidInput("tail", "ask for head or tail, not both")
        if "tail" in given and "_cursor" in given:
            raise InvalidInput("_cursor", "a cursor continues forwards; use it with head, not tail")
        attempt = _integer(given, "attempt", 0, MAX_ATTEMPT, None)
        cursor = log_cursor(given["_cursor"], attempt) if "_cursor" in given else None
        return cls(
            lines=_integer(given, "tail" if "tail" in given else "head", 1, MAX_LINES, DEFAULT_LINES),
            from_end="tail" in given,
            grep=compile_pattern(given["grep"]) if "grep" in given else None,
            max_bytes=_integer(given, "max_bytes", 1, MAX_MAX_BYTES, DEFAULT_MAX_BYTES),
            attempt=attempt if attempt is not None else (cursor[0] if cursor else None),
            cursor=cursor,
        )

    @cached_property
    def skim(self) -> Any:
        """``grep`` when a range with no match anywhere in it can be skipped unparsed (no anchors, no lookbehind)."""
        if self.grep is None or any(token in self.grep.pattern for token in (b"^", b"$", b"\\A", b"\\Z", b"(?<")):
            return None
        return self.grep

    @property
    def scan_budget(self) -> int:
        """Bytes one source may be read for this request (mflog headers cost about 80 bytes a line)."""
        return GREP_SCAN_BYTES if self.grep is not None else 2 * self.max_bytes + _CHUNK


def log_cursor(text: str, attempt: int | None = None) -> list[int]:
    """The ``[attempt, offset per log source]`` of a cursor a log window issued, of ``attempt`` where one is
    asked for; ``InvalidInput`` naming ``_cursor`` for anything else, so no offset of another shape, sign or
    attempt ever reaches a file."""
    cursor = decode_cursor(text)
    shaped = len(cursor) == 1 + len(LOG_SOURCES) and all(type(v) is int and v >= 0 for v in cursor)  # no bools
    if not shaped or cursor[0] > MAX_ATTEMPT:
        raise InvalidInput("_cursor", "not a log cursor", "drop it to read from the start of the log")
    if attempt is not None and attempt != cursor[0]:
        raise InvalidInput("_cursor", f"belongs to attempt {cursor[0]}, not {attempt}")
    return cursor


def _integer(given: dict[str, str], name: str, low: int, high: int, default: int | None) -> int | None:
    if name not in given:
        return default
    value = given[name]
    if not is_number(value) or not low <= int(value) <= high:
        raise InvalidInput(name, f"must be an integer from {low} to {high}")
    return int(value)


@dataclass(slots=True)
class _Line:
    ts: bytes | None
    source: int
    text: bytes
    #: The file offset just after this line: where a cursor resumes.
    end: int


def _split(body: bytes, start: int) -> Iterator[tuple[bytes, int]]:
    """The lines of ``body`` (which begins at file offset ``start``), each with its end offset."""
    offset = 0
    while offset < len(body):
        newline = body.find(b"\n", offset)
        stop = len(body) if newline < 0 else newline + 1
        yield body[offset : stop if newline < 0 else newline], start + stop
        offset = stop


def mflog_line(raw: bytes) -> tuple[bytes | None, bytes]:
    """The timestamp and text of a line mflog wrote (``None`` and the line for any other), as Metaflow's
    ``LINE_PARSER`` reads them, in one pass over at most ``_HEADER_MAX`` bytes: that regex's lazy groups
    backtrack on a header that does not close, cubic in the line (one 3 KB line held the service 10 s)."""
    at = 2 if raw.startswith(b"[![MFLOG|0|") else 0
    if not raw.startswith(b"[MFLOG|0|", at):
        return None, raw
    at += 9
    zulu = raw.find(b"Z|", at + 1, _HEADER_MAX)  # (each field one byte at least, as the regex's ``.+?``)
    bar = raw.find(b"|", zulu + 3, _HEADER_MAX) if zulu > 0 else -1
    close = raw.find(b"]", bar + 2, _HEADER_MAX) if bar > 0 else -1
    if close < 0:
        return None, raw
    return raw[at:zulu], raw[close + 1 :]


def _lines(body: bytes, start: int, source: int, match: Any) -> list[_Line]:
    """The (matching) lines of ``body``; a line mflog did not write keeps its text and no timestamp."""
    found = []
    for raw, end in _split(body, start):
        ts, text = mflog_line(raw)
        line = _Line(ts, source, text, end)
        if match is None or match.search(line.text):
            found.append(line)
    return found


def _forward(file: LogFile, source: int, start: int, size: int, query: LogQuery) -> tuple[list[_Line], int]:
    """Up to ``query.lines`` (matching) lines from ``start``, and the offset the scan got to."""
    found: list[_Line] = []
    scanned, read_to, pending = start, start, b""
    while read_to < size and read_to - start < query.scan_budget:
        pending += file.read(read_to, min(size, read_to + _CHUNK))
        read_to = scanned + len(pending)
        cut = len(pending) if read_to == size else pending.rfind(b"\n") + 1
        if cut == 0 and len(pending) < MAX_LINE and read_to - start < query.scan_budget:
            continue
        body, pending = pending[: cut or len(pending)], pending[cut or len(pending) :]
        body_start, scanned = scanned, scanned + len(body)
        if query.skim is not None and not query.skim.search(body):
            continue
        for line in _lines(body, body_start, source, query.grep):
            found.append(line)
            if len(found) == query.lines:
                return found, line.end
    return found, scanned


def _backward(file: LogFile, source: int, size: int, query: LogQuery) -> tuple[list[_Line], bool]:
    """The last ``query.lines`` (matching) lines, and whether the scan got them all or reached the start."""
    found: list[_Line] = []
    top, pending = size, b""
    while len(found) < query.lines and top > 0 and size - top < query.scan_budget:
        start = max(0, top - _CHUNK)
        pending = file.read(start, top) + pending
        top = start
        first = 0 if top == 0 else pending.find(b"\n") + 1
        if first == 0 and len(pending) < MAX_LINE and top > 0 and size - top < query.scan_budget:
            continue
        body, pending = pending[first:], pending[:first]
        if query.skim is not None and not query.skim.search(body):
            continue
        wanted = query.lines - len(found)
        found = _lines(body, top + first, source, query.grep)[-wanted:] + found
    return found, len(found) == query.lines or (top == 0 and not pending)


def _fill_times(lines: list[_Line]) -> list[_Line]:
    """Lines without a timestamp take their neighbour's, so merging keeps them where they were."""
    known = next((line.ts for line in lines if line.ts is not None), b"")
    for line in lines:
        line.ts = known = line.ts if line.ts is not None else known
    return lines


def _merge(per_source: list[tuple[list[_Line], bool]], count: int, from_end: bool) -> list[_Line]:
    """Up to ``count`` lines of all sources in time order, from the start or the end.

    A source whose scan stopped early (``False``) may have more lines beyond
    the ones read; merging stops once its read lines run out, so no line is
    placed before one it should follow.
    """
    lists = [lines[::-1] if from_end else lines for lines, _ in per_source]
    remaining = [len(lines) for lines in lists]
    merged: list[_Line] = []
    for line in heapq.merge(*lists, key=lambda line: (line.ts, line.source), reverse=from_end):
        merged.append(line)
        remaining[line.source] -= 1
        if len(merged) == count or (remaining[line.source] == 0 and not per_source[line.source][1]):
            break
    return merged[::-1] if from_end else merged


def _cap(lines: list[_Line], max_bytes: int, from_end: bool) -> tuple[list[_Line], bool]:
    """At most ``max_bytes`` of text, keeping the lines nearest the window's anchor."""
    kept, total = [], 0
    for line in reversed(lines) if from_end else lines:
        if total + len(line.text) > max_bytes:
            if not kept:  # one line longer than the limit: its beginning
                line.text = line.text[:max_bytes]
                kept.append(line)
            return (kept[::-1] if from_end else kept), True
        kept.append(line)
        total += len(line.text)
    return (kept[::-1] if from_end else kept), False


@dataclass
class _Window:
    lines: list[_Line]
    truncated: bool
    offsets: list[int]
    more: bool


def read_window(files: list[LogFile], query: LogQuery) -> _Window:
    """The window ``query`` asks for, over ``files`` (one per log source)."""
    sizes = [file.size() for file in files]
    if query.from_end:
        scans = [_backward(file, i, sizes[i], query) for i, file in enumerate(files)]
        per_source = [(_fill_times(lines), complete) for lines, complete in scans]
        lines, cut = _cap(_merge(per_source, query.lines, True), query.max_bytes, True)
        truncated = cut or not all(complete for _, complete in per_source)
        return _Window(lines, truncated, sizes, more=False)
    resume = query.cursor[1:] if query.cursor else [0] * len(files)
    starts = [min(offset, size) for offset, size in zip(resume, sizes, strict=True)]
    scans = [_forward(file, i, starts[i], sizes[i], query) for i, file in enumerate(files)]
    per_source = [(_fill_times(lines), scanned >= sizes[i]) for i, (lines, scanned) in enumerate(scans)]
    merged = _merge(per_source, query.lines, False)
    lines, truncated = _cap(merged, query.max_bytes, False)
    offsets = []
    for i, (found, scanned) in enumerate(scans):
        mine = [line.end for line in lines if line.source == i]
        # A source all of whose lines were returned resumes where its scan stopped.
        offsets.append(scanned if len(mine) == len(found) else (mine[-1] if mine else starts[i]))
    return _Window(lines, truncated, offsets, more=any(o < size for o, size in zip(offsets, sizes, strict=True)))


def rendered(lines: list[_Line]) -> list[dict[str, Any]]:
    """Lines as the logs route answers them: ``ts`` (mflog's UTC stamp), ``source``, ``text``."""
    return [
        {
            "ts": line.ts.decode() + "Z" if line.ts else None,
            "source": LOG_SOURCES[line.source],
            "text": line.text.decode(errors="replace"),
        }
        for line in lines
    ]
