"""The request bodies the service accepts, as pydantic models: the schema is the check.

Shaped after what Metaflow's ``ServiceMetadataProvider`` sends (and the
reference service reads): fields the client sends that the service does not
use are ignored, numbers sent where text is stored are kept as text, and
anything else of the wrong type (a dict as ``user_name``, a string as
``tags``) is a 400 naming the field, before any row is written.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

#: Text stored in a 255-character column (names, types, ids): longer is refused, not truncated.
Name = Annotated[str, Field(max_length=255)]


#: A metadatum's value: Metaflow sends text, booleans (``attempt_ok``) and lists (``foreach-stack``);
#: each is stored as its text, as the service always has, and read back the same way.
AnyValue = Annotated[str, BeforeValidator(lambda value: value if isinstance(value, str) else str(value))]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class Created(_Body):
    """A flow, run, step or task's owner and tags."""

    user_name: Name | None = None
    tags: list[str] | None = None
    system_tags: list[str] | None = None


class RunBody(Created):
    #: A client-chosen run id (never a number: numbers are the service's).
    run_number: Name | None = None


class TaskBody(Created):
    #: A client-chosen task id (never a number: numbers are the service's).
    task_id: Name | None = None


class RunHeartbeat(_Body):
    #: Sent by this project's client when the run's process ends, whatever its outcome.
    ended: bool = False


class TagMutation(_Body):
    tags_to_add: list[str] = []
    tags_to_remove: list[str] = []


class Metadatum(_Body):
    field_name: Name = " "
    value: AnyValue = " "
    type: Name = " "
    user_name: Name | None = None
    tags: list[str] | None = None
    system_tags: list[str] | None = None


class ArtifactBody(_Body):
    name: Name = " "
    location: str = " "
    ds_type: Name = " "
    sha: Name = " "
    type: Name = " "
    content_type: Name = " "
    attempt_id: int = Field(default=0, ge=0, le=2**31 - 1)
    size: int | None = Field(default=None, ge=0, le=2**63 - 1)
    python_type: Name | None = None
    user_name: Name | None = " "
    tags: list[str] | None = None
    system_tags: list[str] | None = None
