"""What a ``@devcontainer`` step may do: its network, file system, processes and size.

Secure by default: no network, a read-only root file system (``/tmp`` is a
private tmpfs), every Linux capability dropped, no privilege escalation, at
most 512 processes, and the host user's uid (so files the step writes into
the datastore belong to whoever ran the flow). What each setting does and
does not protect against is in docs/devcontainer.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from metaflow_stack.errors import StackError

NETWORKS = ("none", "bridge")
_MEMORY = re.compile(r"^\d+(\.\d+)?[bkmg]?$", re.IGNORECASE)


@dataclass(frozen=True)
class SandboxPolicy:
    """The limits one step's container runs under."""

    network: str = "none"
    read_only: bool = True
    cpu: float | None = None
    memory: str | None = None
    pids: int = 512

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise StackError(
                f"@devcontainer network={self.network!r} is not one of {', '.join(NETWORKS)}",
                fix='use network="none" (no network at all) or network="bridge" (the engine\'s default network)',
            )
        if self.cpu is not None and not 0 < self.cpu <= (os.cpu_count() or 1) * 4:
            raise StackError(f"@devcontainer cpu={self.cpu} is out of range", fix="give a number of CPUs, e.g. cpu=1")
        if self.memory is not None and not _MEMORY.match(self.memory):
            raise StackError(
                f"@devcontainer memory={self.memory!r} is not a size", fix='give bytes or a size like "512m" or "2g"'
            )
        if self.pids < 16:
            raise StackError(f"@devcontainer pids={self.pids} is too few to run Python", fix="allow at least 16")
