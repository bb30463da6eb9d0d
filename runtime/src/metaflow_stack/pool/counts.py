"""What a pool is doing, as a small record the pool rewrites in place and the runtime's progress display
reads.

The record is rewritten where it is (one ``pwrite``), not replaced by a new file: a file made and renamed
into place costs the file system a journal transaction each time, about half a millisecond of CPU on the
ext4 of the project's machines, and a pool rewrites its counts twice an item, in the loop that hands items
out. A reader that catches a write halfway finds the record's checksum wrong and reads it again.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import zlib
from dataclasses import astuple, dataclass
from pathlib import Path

#: The four counts, then the CRC-32 of their bytes.
BODY = struct.Struct("<4q")
RECORD_BYTES = BODY.size + 4
#: Reads of a record caught mid-write before the counts are given up for this look.
READ_TRIES = 3


@dataclass
class Counts:
    """Tasks of one pool: waiting for a worker, running, and ended (exit 0, or not)."""

    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other), strict=True)))

    def ended(self) -> Counts:
        """What a pool that died had done: the attempts it held (running or waiting) failed with it."""
        return Counts(done=self.done, failed=self.failed + self.running + self.queued)

    def record(self) -> bytes:
        body = BODY.pack(*astuple(self))
        return body + zlib.crc32(body).to_bytes(4, "little")

    @classmethod
    def read(cls, path: Path) -> Counts | None:
        """The counts at ``path``, or None where there are none to read: a file of a sandboxed pool's folder
        may be anything its tasks put there, so only a regular file is read, never waited on, and only a
        record whose checksum holds."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            for _ in range(READ_TRIES):
                data = os.pread(fd, RECORD_BYTES, 0)
                body = data[: BODY.size]
                if len(data) == RECORD_BYTES and zlib.crc32(body).to_bytes(4, "little") == data[BODY.size :]:
                    return cls(*BODY.unpack(body))
            return None
        except OSError:
            return None
        finally:
            os.close(fd)


class CountsFile:
    """The pool's end of its counts: the file made once, the record rewritten in place. Where it cannot be
    (a full disk, a folder gone), the old counts stay: the display is no reason to stop a pool or lose a
    task's status."""

    def __init__(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:  # (readable by all: a contained pool's server may be another user than the runtime reading it)
            self.fd: int | None = os.open(path, flags, 0o644)
        except OSError:
            self.fd = None

    def write(self, counts: Counts) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(self.fd, counts.record(), 0)
