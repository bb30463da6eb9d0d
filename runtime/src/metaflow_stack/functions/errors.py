"""Errors a bound function's caller can meet, each naming what went wrong where."""

from __future__ import annotations

from metaflow_stack.errors import StackError


class FunctionError(StackError):
    """Base of every error raised while binding, loading or calling a function."""

    code = "function_error"


class BindError(FunctionError):
    """The function or task cannot be bound (unfinished task, unimportable function, ...)."""

    code = "bind_error"


class InvalidInputError(FunctionError, TypeError):
    """The input does not match the function's input schema; ``field`` names where."""

    code = "invalid_input"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid input at {field}: {message}", fix="send input that matches the function's schema")
        self.field = field


class ArtifactNotFoundError(FunctionError, AttributeError):
    """The function asked for an artifact the bound task does not have."""

    code = "artifact_not_found"

    def __init__(self, task: str, artifact: str, available: list[str]) -> None:
        super().__init__(
            f"task {task} has no artifact {artifact!r}; it has: {', '.join(sorted(available)) or 'none'}",
            fix="bind the function to a task that produced this artifact",
        )
        self.task = task
        self.artifact = artifact


class RemoteFunctionError(FunctionError):
    """The function raised; ``remote_traceback`` is its traceback where it ran."""

    code = "function_raised"

    def __init__(self, exc_type: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{exc_type}: {message}\n\nRemote traceback:\n{remote_traceback}")
        self.exc_type = exc_type
        self.remote_message = message
        self.remote_traceback = remote_traceback


class WorkerCrashedError(FunctionError):
    """The worker process died during a call; the next call starts a new one."""

    code = "worker_crashed"


class CallTimeoutError(FunctionError):
    """A call outlasted the backend's ``call_timeout`` (per input): the worker running it was stopped, since a
    thread cannot be, so a hung call holds nothing; the next call starts a new worker."""

    code = "call_timeout"

    def __init__(self, seconds: float, worker: str) -> None:
        super().__init__(
            f"the function did not answer within {seconds:g}s; its {worker} was stopped",
            fix="the next call starts a new one; allow more time (call_timeout) or check the function for a hang",
        )


class UnsupportedReferenceError(FunctionError):
    """The reference's format version is not one this runtime reads."""

    code = "unsupported_reference"


class EnvironmentBuildError(FunctionError):
    """The captured environment could not be recreated."""

    code = "environment_build_failed"
