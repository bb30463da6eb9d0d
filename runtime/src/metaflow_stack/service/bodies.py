"""The request bodies the service accepts, as pydantic models: the schema is the check.

Shaped after what Metaflow's ``ServiceMetadataProvider`` sends (and the
reference service reads): fields the client sends that the service does not
use are ignored, numbers sent where text is stored are kept as text, and
anything else of the wrong type (a dict as ``user_name``, a string as
``tags``) is a 400 naming the field, before any row is written.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

#: Text stored in a 255-character column (names, types, ids): longer is refused, not truncated.
Name = Annotated[str, Field(max_length=255)]
#: A tag: Metaflow itself refuses user tags over 500 characters, and its system tags are shorter.
Tag = Annotated[str, Field(max_length=1024)]
#: The tags of one object, or one change to them: Metaflow allows 50 user tags and adds a few of its own.
Tags = Annotated[list[Tag], Field(max_length=1000)]
#: The rows of one request (metadata or artifacts of one task): Metaflow sends tens, a wide task hundreds.
#: Rows cost memory many times their bytes while they are written: 150,000 small ones took 670 MB.
MAX_ROWS = 10_000
T = TypeVar("T")
#: The rows of one request, ``MAX_ROWS`` at most.
Rows = Annotated[list[T], Field(max_length=MAX_ROWS)]


#: A metadatum's value: Metaflow sends text, booleans (``attempt_ok``) and lists (``foreach-stack``);
#: each is stored as its text, as the service always has, and read back the same way.
AnyValue = Annotated[
    str, BeforeValidator(lambda value: value if isinstance(value, str) else str(value)), Field(max_length=1 << 20)
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class Created(_Body):
    """A flow, run, step or task's owner and tags."""

    user_name: Name | None = None
    tags: Tags | None = None
    system_tags: Tags | None = None


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
    tags_to_add: Tags = []
    tags_to_remove: Tags = []


class Metadatum(_Body):
    field_name: Name = " "
    value: AnyValue = " "
    type: Name = " "
    user_name: Name | None = None
    tags: Tags | None = None
    system_tags: Tags | None = None


class ArtifactBody(_Body):
    name: Name = " "
    #: Where the value is (an S3 URL, a path): S3's own keys stop at 1,024 bytes.
    location: Annotated[str, Field(max_length=4096)] = " "
    ds_type: Name = " "
    sha: Name = " "
    type: Name = " "
    content_type: Name = " "
    attempt_id: int = Field(default=0, ge=0, le=2**31 - 1)
    size: int | None = Field(default=None, ge=0, le=2**63 - 1)
    python_type: Name | None = None
    user_name: Name | None = " "
    tags: Tags | None = None
    system_tags: Tags | None = None
