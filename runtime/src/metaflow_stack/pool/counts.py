"""What a pool is doing, as a small JSON file the pool rewrites and the runtime's progress display reads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Counts:
    """Tasks of one pool: waiting for a worker, running, and ended (exit 0, or not)."""

    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0

    def write(self, path: Path) -> None:
        """Replace ``path`` atomically: a reader sees the old counts or the new, never half."""
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(asdict(self)))
        os.replace(partial, path)

    @classmethod
    def read(cls, path: Path) -> Counts:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return cls()
