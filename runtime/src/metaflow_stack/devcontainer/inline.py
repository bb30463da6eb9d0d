"""``@devcontainer(image=..., features={...})``: the decorator's arguments as a devcontainer.json, so
they take the same road as a file of the user's (the Dev Containers CLI builds the features).

The file is written in the stack's state folder, under a name that hashes everything in it (the
image, the options, each local feature's files), whole or not at all: concurrent task processes
that write the same configuration find it there, or race to an identical rename.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from metaflow_stack.devcontainer.image import BASE_VARIABLE
from metaflow_stack.devcontainer.spec import load_feature
from metaflow_stack.errors import StackError

_LOCAL = ("./", "../", "/")


def _local_features(features: dict[str, dict], flow_dir: Path) -> dict[str, Path]:
    """Local feature folders by the reference the user wrote, checked."""
    found = {}
    for ref in features:
        if ref.startswith(_LOCAL):
            folder = (flow_dir / ref).resolve()
            if not (folder / "devcontainer-feature.json").is_file():
                raise StackError(
                    f"features: {ref!r} has no devcontainer-feature.json at {folder}",
                    fix="name a feature folder relative to the flow's file, or a published feature's id",
                )
            found[ref] = folder
    return found


def _digest(config: dict, folders: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def write(image: str | None, features: dict[str, dict], flow_dir: Path, cache: Path) -> Path:
    """The devcontainer.json for ``image`` (default: the stack's base image) with ``features``."""
    if not isinstance(features, dict) or not all(isinstance(v, dict) for v in features.values()):
        raise StackError(
            f"features={features!r} is not a mapping of feature to options",
            fix='write features={"./my-feature": {}, "<published feature id>": {"option": "value"}}',
        )
    local = _local_features(features, flow_dir)
    config = {
        "image": image or f"${{localEnv:{BASE_VARIABLE}}}",
        "features": {(f"./{local[ref].name}" if ref in local else ref): options for ref, options in features.items()},
    }
    target = cache / _digest(config, list(local.values()))
    path = target / ".devcontainer" / "devcontainer.json"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".inline-", dir=cache))
    try:
        (staging / ".devcontainer").mkdir()
        for folder in local.values():
            load_feature(folder)
            shutil.copytree(folder, staging / ".devcontainer" / folder.name)
        (staging / ".devcontainer" / "devcontainer.json").write_text(json.dumps(config, indent=2))
        try:
            staging.rename(target)
        except OSError:
            if not path.is_file():  # another task process wrote the same one first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
