"""One family of errors for every user-facing failure.

Each error carries the one-line fix the user should apply, so CLIs print
``error: <message>`` and ``fix: <fix>`` without a traceback and decorators
fail with the same words.
"""

from __future__ import annotations


class StackError(Exception):
    """A failure the user can act on; ``fix`` says how, ``code`` is stable for programs.

    This is the one family below every edge: servers answer it as a JSON
    error whose status follows the code (``api_errors``), CLIs print it as
    one line (or one JSON object with ``--json``), never as a traceback.
    """

    code = "stack_error"

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} (fix: {self.fix})"

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        """The error as one JSON object, as ``--json`` commands print it."""
        return {"error": {"code": self.code, "message": self.message, "fix": self.fix}}


class InvalidInput(StackError):
    """A value the user gave that cannot be used; ``field`` names the parameter, field or path segment."""

    code = "bad_parameter"

    def __init__(self, field: str, message: str, fix: str | None = None) -> None:
        super().__init__(f"{field}: {message}", fix)
        self.field = field


class DatastoreError(StackError):
    """A datastore that cannot be read here: unreachable, outside the allowed roots, or of a kind not read."""

    def __init__(self, code: str, message: str, fix: str | None = None, details: dict | None = None) -> None:
        super().__init__(message, fix)
        self.code = code
        self.details = details


class UnknownImageError(StackError):
    """A capability or image name that the catalog does not know."""

    code = "unknown_image"


class DockerUnavailableError(StackError):
    """No Docker engine answers, so nothing can be built or launched."""

    code = "docker_unavailable"


class ImageBuildError(StackError):
    """A build step failed; ``step`` and ``log_tail`` say where and why, or ``said``: the ``error:`` and
    ``fix:`` lines the step printed, when it ran the runtime (``trampolines.exits_in_one_line``)."""

    code = "image_build_failed"

    def __init__(self, image: str, step: str, log_tail: str, said: tuple[str, str] | None = None) -> None:
        if said is None:
            super().__init__(
                f"building {image} failed at: {step}\n{log_tail}",
                fix="correct the failing step above and run the build again",
            )
        else:  # the step ran the runtime, which said what is wrong and its fix in its one-line form
            super().__init__(f"building {image}: {said[0]}", fix=said[1])
        self.image = image
        self.step = step
        self.log_tail = log_tail


class RegistryError(StackError):
    """The configured image registry cannot be reached or refused a request."""

    code = "registry_error"


class ToolMissingError(StackError):
    """A command-line tool the operation needs is not installed."""

    code = "tool_missing"
