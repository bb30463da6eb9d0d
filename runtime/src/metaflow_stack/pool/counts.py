"""What a pool is doing, as a small JSON file the pool rewrites and the runtime's progress display reads."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

#: More than any counts file holds.
MAX_BYTES = 4096


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

    def write(self, path: Path) -> None:
        """Replace ``path`` atomically: a reader sees the old counts or the new, never half. Where it cannot
        (a full disk), the old counts stay: the display is no reason to stop a pool or lose a task's status."""
        partial = path.with_name(path.name + ".partial")
        try:
            partial.write_text(json.dumps(asdict(self)))
            os.replace(partial, path)
        except OSError:
            with contextlib.suppress(OSError):
                partial.unlink()

    @classmethod
    def read(cls, path: Path) -> Counts:
        """The counts at ``path``, or none: a file of a sandboxed pool's folder may be anything its tasks
        put there, so only a small regular file is read, and never waited on."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            return cls()
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return cls()
            return cls(**{key: int(value) for key, value in json.loads(os.read(fd, MAX_BYTES)).items()})
        except (OSError, ValueError, TypeError, AttributeError):
            return cls()
        finally:
            os.close(fd)
