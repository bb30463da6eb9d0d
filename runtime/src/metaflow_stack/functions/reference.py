"""The function reference: a small, versioned JSON document that says everything
needed to run a bound function elsewhere.

It names the function (module, qualified name, code archive), the environment
it needs (Python version and exact package pins), the bound task's artifacts
(by content key, loaded lazily) and where those blobs live: the task's own
datastore, or a bundle next to the reference after an export. Its JSON Schema
is published as ``docs/function-reference.schema.json``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metaflow_stack.functions.errors import UnsupportedReferenceError

FORMAT = "metaflow-stack.function-reference"
VERSION = 1
SUPPORTED_VERSIONS = (1,)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlobStoreRef(_Model):
    """A content-addressed store of blobs (Metaflow's own format)."""

    type: Literal["local", "s3", "bundle"] = Field(
        description="'local' or 's3': a Metaflow datastore; 'bundle': relative to the reference's location"
    )
    root: str = Field("", description="datastore root for 'local' and 's3'; empty for 'bundle'")
    prefix: str = Field(description="path of the store under the root, e.g. 'TrainFlow/data' or 'blobs'")


class ArtifactRef(_Model):
    """One artifact of the bound task."""

    key: str = Field(description="content key (sha1 of the serialized bytes) in the blob store")
    size: int | None = Field(None, description="serialized size in bytes")
    type: str | None = Field(None, description="Python type as Metaflow recorded it")
    encoding: str = Field("pickle-v4", description="Metaflow's serialization encoding")


class CodePackageRef(_Model):
    """The flow's Metaflow code package, whose user files join the function's path."""

    key: str = Field(description="content key of the code package tarball in the blob store")
    sha: str = Field(description="Metaflow's code package sha")


class TaskRef(_Model):
    """The Metaflow task the function is bound to."""

    pathspec: str = Field(description="Flow/run/step/task")
    attempt: int = 0
    store: BlobStoreRef = Field(description="where the artifacts and the code package are")
    artifacts: dict[str, ArtifactRef]
    code_package: CodePackageRef | None = None


class CodeRef(_Model):
    """Where the function's code is and how to import it."""

    module: str = Field(description="module to import")
    qualname: str = Field(description="qualified name of the function in the module")
    archive: str = Field(description="content key of a tar.gz of the module's files")
    files: list[str] = Field(description="files in the archive, relative to its root (which goes on sys.path)")


class EnvironmentRef(_Model):
    """The environment the function runs in."""

    python: str = Field(description="Python version, e.g. 3.11.7")
    platform: str = Field(description="platform the packages were resolved on, e.g. linux-x86_64")
    source: Literal["binding-environment", "task-environment"]
    packages: list[str] = Field(description="exact pins, name==version, sorted")
    omitted: list[str] = Field(
        default_factory=list, description="installed packages that no index can provide (local or editable installs)"
    )
    digest: str = Field(description="sha256 of the Python minor version and the pins; names the cached environment")


class FunctionReference(_Model):
    """A bound function, ready to run anywhere its environment can be recreated."""

    format: Literal["metaflow-stack.function-reference"] = FORMAT
    version: int = VERSION
    name: str
    kind: Literal["json"] = "json"
    function: CodeRef
    task: TaskRef
    environment: EnvironmentRef
    store: BlobStoreRef = Field(description="where the function's code archive is")
    input_schema: dict[str, Any] = Field(description="JSON Schema of the function's input, from its type hints")
    output_schema: dict[str, Any] = Field(description="JSON Schema of the function's output, from its type hints")
    codec: str = Field("json", description="default wire codec")
    metaflow_version: str
    created_at: str

    def to_json(self) -> str:
        """The reference as indented, human-readable JSON."""
        return self.model_dump_json(indent=2)

    @property
    def digest(self) -> str:
        """A stable id of the reference's content."""
        canonical = json.dumps(self.model_dump(exclude={"created_at"}), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse(document: str | bytes | dict[str, Any]) -> FunctionReference:
    """Read a reference, refusing versions this runtime does not know."""
    try:
        data = json.loads(document) if isinstance(document, str | bytes) else document
    except ValueError as exc:  # (not JSON; or bytes that are not text at all)
        raise UnsupportedReferenceError(
            f"the reference is neither JSON nor an existing bundle path ({exc})",
            fix="pass the JSON from JsonFunction(...).reference, a file holding it, or a bundle folder or s3:// URL",
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UnsupportedReferenceError(
            "this is not a Metaflow Stack function reference (its 'format' is not " + repr(FORMAT) + ")",
            fix="pass the JSON from JsonFunction(...).reference or an exported bundle",
        )
    version = data.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedReferenceError(
            f"function reference version {version!r} is not supported; supported versions: "
            + ", ".join(map(str, SUPPORTED_VERSIONS)),
            fix="upgrade metaflow-stack, or re-export the function with this version",
        )
    try:
        return FunctionReference.model_validate(data)
    except ValidationError as exc:
        raise UnsupportedReferenceError(f"malformed function reference: {exc}") from exc


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of the reference document."""
    schema = FunctionReference.model_json_schema()
    schema["$id"] = "function-reference.schema.json"
    schema["title"] = "Metaflow Stack function reference"
    return schema
