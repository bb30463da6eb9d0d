"""What the agent queries answer: small, JSON-serializable, explicit about their bounds.

Every list says whether more exists (``truncated``), how to get it
(``next_cursor``) and which requested bounds were lowered to the maximum
(``clamped``), so an agent never mistakes a window for the whole.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field, ValidationError


class Clamp(BaseModel):
    """A requested bound above the maximum, and the one used instead."""

    parameter: str
    requested: int
    used: int


class Bounded(BaseModel):
    truncated: bool = Field(description="more results exist beyond these")
    next_cursor: str | None = Field(None, description="pass as cursor to get the next ones")
    clamped: list[Clamp] = Field(default_factory=list)


class FlowInfo(BaseModel):
    name: str
    created_at: int = Field(description="epoch milliseconds: when its first run was recorded")


class FlowList(Bounded):
    flows: list[FlowInfo]


class RunInfo(BaseModel):
    pathspec: str
    status: str = Field(description="running, completed, failed or killed")
    user: str | None
    tags: list[str]
    system_tags: list[str]
    started_at: int = Field(description="epoch milliseconds")
    finished_at: int | None = Field(description="epoch milliseconds; null while running")


class RunList(Bounded):
    runs: list[RunInfo]


class Failure(BaseModel):
    pathspec: str
    step_name: str
    attempt: int | None
    finished_at: int | None
    type: str | None = Field(description="the exception's qualified class name, when recorded")
    message: str | None
    traceback: list[str] = Field(default_factory=list, description="the last lines of the traceback, when recorded")


class FailureList(Bounded):
    run: str
    failures: list[Failure]


class StepCounts(BaseModel):
    step_name: str
    total: int
    running: int
    completed: int
    failed: int
    killed: int


class RunSummary(BaseModel):
    pathspec: str
    status: str
    started_at: int
    finished_at: int | None
    duration_ms: int
    steps: list[StepCounts]
    first_failure: Failure | None


class ArtifactInfo(BaseModel):
    pathspec: str = Field(description="the task holding the artifact")
    name: str
    attempt: int
    size: int | None = Field(description="bytes as stored (compressed pickle), when recorded")
    python_type: str | None = Field(description="the value's type, when recorded; never read by unpickling")
    sha: str | None = Field(None, description="content hash: equal hashes hold equal values, in any run")


class ArtifactList(Bounded):
    artifacts: list[ArtifactInfo]


class ConfidentialInfo(BaseModel):
    """How a ``@confidential`` task's evidence was judged: what its launcher recorded before its code ran."""

    attested: bool = Field(description="true only when a quote passed the policy (SGX); false in direct mode")
    mode: str = Field(description="sgx, tdx (a Phala CVM) or direct")
    tee: str | None = Field(None, description="sgx or tdx, when attested")
    status: str | None = Field(None, description="the platform's TCB status, as Intel's collateral gives it")
    advisory_ids: list[str] = Field(default_factory=list)
    policy: str | None = Field(None, description="the name of the policy the key-release service held it to")
    policy_digest: str | None = Field(None, description="SHA-256 of the policy that accepted it")
    measurements: dict[str, str | int] = Field(default_factory=dict, description="mr_enclave, mr_signer, isv_svn...")
    mr_enclave: str | None = Field(None, description="the enclave the launcher prepared (SGX)")
    image: str | None = Field(None, description="the step's own image the enclave ran in (container=True)")
    verified_at: int | None = Field(None, description="epoch seconds")
    why: str | None = Field(None, description="why it is unattested")

    @classmethod
    def recorded(cls, value: Any) -> ConfidentialInfo | None:
        """The verification in a stored metadatum's value (its JSON text, or the object), or None when it is
        not one (a value anyone with write access could have recorded is read, never trusted to parse)."""
        if isinstance(value, str):
            if len(value) > 64 * 1024:
                return None
            try:
                value = json.loads(value)
            except ValueError:
                return None
        try:
            return cls.model_validate(value) if isinstance(value, dict) else None
        except ValidationError:
            return None


class TaskInfo(BaseModel):
    pathspec: str
    step_name: str
    attempt: int = Field(description="the latest attempt")
    status: str = Field(description="running, completed, failed or killed")
    started_at: int = Field(description="epoch milliseconds")
    finished_at: int | None = Field(description="epoch milliseconds; null while running")
    foreach: list[str] = Field(
        default_factory=list, description='the foreach items leading to the task, outermost first: "items=3"'
    )
    confidential: ConfidentialInfo | None = Field(
        None, description="a @confidential task's verification (its latest attempt's); null for other tasks"
    )


class TaskList(Bounded):
    run: str
    tasks: list[TaskInfo]


class LogLine(BaseModel):
    ts: str | None
    source: str
    text: str


class LogWindow(Bounded):
    pathspec: str
    stream: str
    attempt: int
    lines: list[LogLine]
    size: int = Field(description="bytes of the whole log")
    bytes_read: int = Field(description="bytes read from the datastore to answer")
