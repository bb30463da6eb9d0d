"""devcontainer.json, read and checked: the fields of the Development Container specification a
``@devcontainer`` step acts on, with the types and rules the specification's reference gives them.

The file is JSON with comments and trailing commas (JSONC), as every devcontainer tool reads it.
Fields the step does not act on (``customizations``, ``forwardPorts``, ...) are kept and ignored;
fields it cannot honour in a sandbox (Docker Compose, ``privileged``, ``capAdd``) are refused by
name. The specification publishes its JSON Schema only in its own repository, not in any package a
runtime can depend on, so the rules are written here as pydantic models of the fields used; an
error names the file, the field and the rule it breaks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import json5
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, model_validator

from metaflow_stack.errors import StackError

REFERENCE = "https://containers.dev/implementors/json_reference/"
FEATURE_REFERENCE = "https://containers.dev/implementors/features/"
#: The names the Dev Containers CLI accepts for a configuration file.
FILE_NAMES = ("devcontainer.json", ".devcontainer.json")
#: Lifecycle commands in the order the specification runs them. ``initializeCommand`` runs on the
#: host; the others run in the container before the step. ``postAttachCommand`` needs an attached
#: tool, which a step does not have, so it is never run.
IN_CONTAINER_COMMANDS = ("onCreateCommand", "updateContentCommand", "postCreateCommand", "postStartCommand")

NonEmpty = Annotated[str, StringConstraints(min_length=1)]
#: A lifecycle command: a shell string, an argument list, or named commands of either form.
Command = NonEmpty | list[NonEmpty] | dict[str, NonEmpty | list[NonEmpty]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)


class Build(_Strict):
    """``build``: an image built from a Dockerfile, relative to the configuration file."""

    dockerfile: NonEmpty
    context: NonEmpty = "."
    args: dict[str, str] = Field(default_factory=dict)
    target: NonEmpty | None = None


class MountSpec(_Strict):
    """A ``mounts`` entry in object form (the string form is Docker's ``--mount`` syntax)."""

    type: Literal["bind", "volume"]
    source: NonEmpty | None = None
    target: NonEmpty


class DevcontainerConfig(_Strict):
    """The fields of devcontainer.json a ``@devcontainer`` step uses."""

    name: str | None = None
    image: NonEmpty | None = None
    build: Build | None = None
    features: dict[NonEmpty, dict[str, Any] | str | bool] = Field(default_factory=dict)
    # camelCase: the specification's own names
    containerEnv: dict[str, str] = Field(default_factory=dict)
    remoteEnv: dict[str, str | None] = Field(default_factory=dict)
    remoteUser: NonEmpty | None = None
    containerUser: NonEmpty | None = None
    updateRemoteUserUID: bool = True
    mounts: list[NonEmpty | MountSpec] = Field(default_factory=list)
    runArgs: list[str] = Field(default_factory=list)
    initializeCommand: Command | None = None
    onCreateCommand: Command | None = None
    updateContentCommand: Command | None = None
    postCreateCommand: Command | None = None
    postStartCommand: Command | None = None
    postAttachCommand: Command | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DevcontainerConfig:
        extra = self.model_extra or {}
        for field in ("dockerComposeFile", "privileged", "capAdd", "securityOpt"):
            if field in extra:
                raise ValueError(f"{field} is not supported: a @devcontainer step runs one sandboxed container")
        if (self.image is None) == (self.build is None):
            raise ValueError("give exactly one of image or build.dockerfile")
        return self


def workspace_folder(config_path: Path) -> Path:
    """The folder the configuration belongs to: above ``.devcontainer/``, else the file's own folder."""
    folder = config_path.parent
    for candidate in (folder, *folder.parents):
        if candidate.name == ".devcontainer":
            return candidate.parent
    return folder


_VARIABLE = re.compile(r"\$\{(localEnv|env):([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}|\$\{(localWorkspaceFolder)\}")


def substitute(value: str, workspace: Path) -> str:
    """Resolve the specification's host variables: ``${localEnv:NAME[:default]}``, ``${localWorkspaceFolder}``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(4):
            return str(workspace)
        return os.environ.get(match.group(2), match.group(3) or "")

    return _VARIABLE.sub(replace, value)


#: What pydantic adds to an error's location for the branch of a union it tried: not a field.
_BRANCH = re.compile(r"^(constrained-str|str|bool|int|MountSpec|Build|(list|dict)\[.*)$")


def _location(error: dict[str, Any]) -> str:
    """A field path the way a user writes it: ``build.args.X``, ``mounts[2].target``."""
    parts: list[str] = []
    for item in error["loc"]:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not _BRANCH.match(item):
            parts.append(f".{item}" if parts else item)
    return "".join(parts)


def _explain(exc: ValidationError) -> str:
    """The most specific error: where a value fits no form of a union, the form it came closest to."""
    error = max(exc.errors(), key=lambda e: len(_location(e)))
    where, message = _location(error), error["msg"].removeprefix("Value error, ")
    return f"{where + ': ' if where else ''}{message} (rule: {error['type']})"


def load(path: str | os.PathLike[str]) -> tuple[DevcontainerConfig, str]:
    """The checked configuration at ``path`` and a digest of its text (it names built images)."""
    path = Path(path)
    if not path.is_file():
        raise StackError(f"{path}: no such devcontainer.json", fix="give config= the path of a devcontainer.json")
    try:
        text = path.read_text(encoding="utf-8")
        data = json5.loads(text)
    except UnicodeDecodeError:
        raise StackError(f"{path}: not UTF-8 text", fix="save the devcontainer.json as UTF-8") from None
    except ValueError as exc:
        where = str(exc).replace("<string>:", "line ")
        raise StackError(f"{path}: not valid JSON with comments: {where}", fix="correct the syntax there") from None
    except RecursionError:  # json5's parser recurses per level, and gives up some 70 levels down
        raise StackError(f"{path}: nested too deeply to read", fix="flatten the deepest objects or lists") from None
    if not isinstance(data, dict):
        raise StackError(f"{path}: the top level must be an object", fix="wrap the settings in { }")
    try:
        config = DevcontainerConfig.model_validate(data)
    except ValidationError as exc:
        raise StackError(
            f"{path}: {_explain(exc)}",
            fix=f"correct that field (the specification: {REFERENCE})",
        ) from None
    for ref in config.features:
        if ref.startswith(("./", "../")):
            folder = (path.parent / ref).resolve()
            if not (folder / "devcontainer-feature.json").is_file():
                raise StackError(
                    f"{path}: features: {ref!r} has no {folder / 'devcontainer-feature.json'}",
                    fix="a local feature is a folder next to the file, with devcontainer-feature.json and install.sh",
                )
            load_feature(folder)
    return config, hashlib.sha256(text.encode()).hexdigest()[:16]


#: A lifecycle command as an image's label records it: checked for its form only (the tool that wrote it
#: checked the rest, and an empty one is skipped).
RecordedCommand = str | list[str] | dict[str, str | list[str]]


class RecordedSettings(_Strict):
    """One entry of an image's ``devcontainer.metadata`` label (a feature's settings, or a configuration's,
    as the Dev Containers CLI recorded them): the fields a step acts on."""

    remoteEnv: dict[str, str | None] | None = None
    onCreateCommand: RecordedCommand | None = None
    updateContentCommand: RecordedCommand | None = None
    postCreateCommand: RecordedCommand | None = None
    postStartCommand: RecordedCommand | None = None


def recorded_settings(label: str, where: str) -> list[dict[str, Any]]:
    """The entries of a ``devcontainer.metadata`` label (a JSON list of objects, or one object), checked: a
    label written wrong by whatever built the image is one line naming ``where`` (the image), not a
    traceback in every task."""
    try:
        entries = json.loads(label)
        entries = entries if isinstance(entries, list) else [entries]
        TypeAdapter(list[RecordedSettings]).validate_python(entries)
    except (ValueError, RecursionError) as exc:  # (pydantic's ValidationError is a ValueError)
        detail = _explain(exc) if isinstance(exc, ValidationError) else str(exc)
        raise StackError(
            f"{where}: its devcontainer.metadata label is not a list of settings: {detail}",
            fix="rebuild the image with the Dev Containers CLI, or build it without that label",
        ) from None
    return entries


class FeatureOption(_Strict):
    """One option of a feature: a string or a boolean, with its default."""

    type: Literal["string", "boolean"]
    default: str | bool
    description: str | None = None
    proposals: list[str] | None = None
    enum: list[str] | None = None

    @model_validator(mode="after")
    def _default_fits(self) -> FeatureOption:
        if isinstance(self.default, bool) != (self.type == "boolean"):
            raise ValueError(f"default {self.default!r} is not a {self.type}")
        return self


class FeatureManifest(_Strict):
    """devcontainer-feature.json: the fields the specification requires and the ones tools act on."""

    id: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    version: Annotated[str, StringConstraints(pattern=r"^\d+\.\d+\.\d+([-+].*)?$")]
    name: str | None = None
    description: str | None = None
    options: dict[str, FeatureOption] = Field(default_factory=dict)
    containerEnv: dict[str, str] = Field(default_factory=dict)
    installsAfter: list[str] = Field(default_factory=list)
    dependsOn: dict[str, dict[str, Any]] = Field(default_factory=dict)
    onCreateCommand: Command | None = None
    updateContentCommand: Command | None = None
    postCreateCommand: Command | None = None
    postStartCommand: Command | None = None


def load_feature(folder: str | os.PathLike[str]) -> FeatureManifest:
    """The checked manifest of the feature in ``folder``: its id names the folder, ``install.sh`` runs it."""
    folder = Path(folder)
    path = folder / "devcontainer-feature.json"
    try:
        manifest = FeatureManifest.model_validate(json5.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        detail = _explain(exc) if isinstance(exc, ValidationError) else str(exc)
        raise StackError(f"{path}: {detail}", fix=f"correct it (the specification: {FEATURE_REFERENCE})") from None
    if manifest.id != folder.name:
        raise StackError(f"{path}: id {manifest.id!r} is not the folder's name {folder.name!r}", fix="rename one")
    if not (folder / "install.sh").is_file():
        raise StackError(f"{folder}: no install.sh", fix="a feature runs its install.sh at build time: add it")
    return manifest
