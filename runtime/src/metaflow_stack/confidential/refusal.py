"""Why evidence is not trusted: one error, naming the check, for the quote, the policy and a dstack app alike."""

from __future__ import annotations

from metaflow_stack.errors import StackError


class AttestationRefused(StackError):
    """Evidence that does not let the task's results be trusted; ``field`` names the check that failed."""

    code = "attestation_refused"

    def __init__(self, field: str, message: str, fix: str | None = None) -> None:
        super().__init__(f"{field}: {message}", fix)
        self.field = field

    @property
    def details(self) -> dict[str, str]:
        """What an HTTP answer names (``api_errors``): the check that failed."""
        return {"field": self.field}


def allowed(field: str, value: str, listed: list[str]) -> None:
    """Refuse ``value`` of ``field`` unless the policy's ``listed`` values name it (an empty list allows any)."""
    if listed and value.lower() not in listed:
        raise AttestationRefused(field, f"{value} is not one the policy allows")
