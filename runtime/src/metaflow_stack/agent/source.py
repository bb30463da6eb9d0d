"""What the agent's queries read from: the ``Source`` interface and what its implementations share.

``Queries`` (``queries``) checks and bounds parameters and asks a source;
the sources (``service_source``, ``local_source``) answer. Both sides
import this module and neither imports the other, so the package has no
import cycle. ``AgentError`` is the family's error: a stable ``code``
(``not_found``, ``bad_parameter``, ``service_unavailable``,
``service_too_old``), a message naming the path or parameter, and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from metaflow_stack.agent.models import ArtifactInfo, FlowInfo, LogWindow, RunInfo, RunSummary, TaskInfo
from metaflow_stack.errors import StackError
from metaflow_stack.ids import PATHSPEC_KINDS, check_id

STATUSES = ("running", "completed", "failed", "killed")


class AgentError(StackError):
    """A query that cannot be answered, said in a way an agent can act on."""

    def __init__(self, code: str, message: str, fix: str | None = None) -> None:
        super().__init__(message, fix)
        self.code = code


def pathspec_parts(pathspec: str, parts: int, what: str) -> list[str]:
    pieces = pathspec.strip("/").split("/")
    if len(pieces) != parts or not all(pieces) or ".." in pieces:
        shape = "/".join(("Flow", "run", "step", "task")[:parts])
        raise AgentError("bad_parameter", f"{what} {pathspec!r} is not a pathspec like {shape}")
    for kind, piece in zip(PATHSPEC_KINDS, pieces, strict=False):
        check_id(kind, piece)
    return pieces


@dataclass(frozen=True)
class ArtifactScope:
    """Where to look for artifacts: a flow, a run, a step of a run, or one task."""

    flow: str
    run: str | None = None
    step: str | None = None
    task: str | None = None


class Source(Protocol):
    """Where answers come from; parameters arrive checked and bounded, ids split from pathspecs.

    Listing methods return one page and the cursor of the next (None on the last).
    """

    def flows(self, limit: int, cursor: str | None) -> tuple[list[FlowInfo], str | None]: ...

    def runs(
        self,
        flow: str,
        status: str | None,
        low: int | None,
        high: int | None,
        tags: list[str],
        user: str | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[RunInfo], str | None]: ...

    def summary(self, flow: str, run: str) -> RunSummary: ...

    def failures(self, flow: str, run: str, limit: int, cursor: str | None) -> tuple[list, str | None]: ...

    def tasks(
        self, flow: str, run: str, step: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[TaskInfo], str | None]: ...

    def artifacts(
        self, scope: ArtifactScope, filters: dict[str, Any], limit: int, cursor: str | None
    ) -> tuple[list[ArtifactInfo], str | None]: ...

    def logs(self, parts: list[str], stream: str, window: dict[str, Any]) -> LogWindow: ...

    def close(self) -> None: ...
