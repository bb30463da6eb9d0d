"""The catalog maps capabilities to images with reproducible, content-derived tags."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from metaflow_stack import catalog
from metaflow_stack.errors import UnknownImageError

PROJECT = Path(__file__).resolve().parents[1]


def _tag(entry: catalog.ImageEntry, base: str = "python:3.11-slim") -> str:
    with catalog.staged_context(entry) as context:
        return catalog.tag_for(context, base)


def test_capability_and_image_name_resolve_to_the_same_entry() -> None:
    assert catalog.get("core") is catalog.get("base")


def test_unknown_name_lists_the_known_images_and_capabilities() -> None:
    with pytest.raises(UnknownImageError) as error:
        catalog.get("no-such-image")
    message = str(error.value)
    assert "'no-such-image'" in message
    assert "images: base" in message
    assert "core" in message


def _copy_of_the_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The images and runtime sources copied to another path, which the catalog then reads."""
    checkout = tmp_path / "checkout"
    shutil.copytree(PROJECT / "images", checkout / "images")
    shutil.copytree(
        PROJECT / "runtime", checkout / "runtime", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    monkeypatch.setenv("METAFLOW_STACK_IMAGES_DIR", str(checkout / "images"))
    return checkout


def test_same_sources_give_the_same_tag_at_another_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = _tag(catalog.get("base"))
    _copy_of_the_tree(tmp_path, monkeypatch)  # another machine's checkout, in effect
    assert _tag(catalog.get("base")) == here


def test_tag_changes_with_the_base_image() -> None:
    entry = catalog.get("base")
    assert _tag(entry, "python:3.11-slim") != _tag(entry, "local/python:3.11-bookworm")


def test_staged_context_holds_the_dockerfile_and_runtime_sources_only() -> None:
    with catalog.staged_context(catalog.get("base")) as context:
        files = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert "Dockerfile" in files
    assert "runtime/requirements.lock" in files
    assert "runtime/src/metaflow_stack/catalog.py" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


def test_tag_changes_when_a_runtime_source_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = _copy_of_the_tree(tmp_path, monkeypatch)
    entry = catalog.get("base")
    before = _tag(entry)
    with (checkout / "runtime/src/metaflow_stack/catalog.py").open("a") as source:
        source.write("\n# changed\n")
    assert _tag(entry) != before


def test_staging_copies_a_link_as_a_link_and_never_its_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As Docker sends a context: a link to a private file or a folder outside the tree stays a link."""
    checkout = _copy_of_the_tree(tmp_path, monkeypatch)
    secret = tmp_path / "secret.txt"
    secret.write_text("kept-out-of-the-image")
    secret.chmod(0o600)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key.pem").write_text("kept-out-of-the-image")
    package = checkout / "runtime/src/metaflow_stack"
    (package / "leak.txt").symlink_to(secret)
    (package / "linked").symlink_to(outside)
    with catalog.staged_context(catalog.get("base")) as context:
        staged = context / "runtime/src/metaflow_stack"
        assert os.readlink(staged / "leak.txt") == str(secret)
        assert os.readlink(staged / "linked") == str(outside)
        copied = [p for p in context.rglob("*") if p.is_file() and not p.is_symlink()]
        assert not [p for p in copied if b"kept-out-of-the-image" in p.read_bytes()]


def test_a_link_moved_to_another_target_of_the_same_bytes_changes_the_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image holds the link, not its target's bytes: the tag follows where it points."""
    package = _copy_of_the_tree(tmp_path, monkeypatch) / "runtime/src/metaflow_stack"
    for name in ("one.txt", "two.txt"):
        (package / name).write_text("the same bytes")
    link = package / "linked.txt"
    link.symlink_to("one.txt")
    before = _tag(catalog.get("base"))
    link.unlink()
    link.symlink_to("two.txt")
    assert _tag(catalog.get("base")) != before


def test_staged_files_get_the_modes_the_tag_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COPY keeps every mode bit and the tag hashes the executable one: staging leaves no other bit to differ.
    A private source (0600), or an entrypoint made under a umask of 077 (0700), stages as 0644 or 0755."""
    checkout = _copy_of_the_tree(tmp_path, monkeypatch)
    source = checkout / "runtime/src/metaflow_stack/catalog.py"
    script = checkout / "runtime/src/metaflow_stack/entrypoint.sh"
    script.write_text("#!/bin/sh\n")
    source.chmod(0o644)
    script.chmod(0o755)
    readable = _tag(catalog.get("base"))
    source.chmod(0o600)
    script.chmod(0o700)
    (checkout / "runtime/src/metaflow_stack").chmod(0o700)
    with catalog.staged_context(catalog.get("base")) as context:
        staged = context / "runtime/src/metaflow_stack"
        modes = {
            p.name: stat.S_IMODE(p.stat().st_mode) for p in (staged, staged / "catalog.py", staged / "entrypoint.sh")
        }
        assert catalog.tag_for(context, "python:3.11-slim") == readable
    assert modes == {"metaflow_stack": 0o755, "catalog.py": 0o644, "entrypoint.sh": 0o755}


def test_a_type_checkers_cache_leaves_the_tag_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = _copy_of_the_tree(tmp_path, monkeypatch)
    before = _tag(catalog.get("base"))
    cache = checkout / "runtime/src/.mypy_cache/3.11"
    cache.mkdir(parents=True)
    (cache / "catalog.meta.json").write_text("{}")
    assert _tag(catalog.get("base")) == before


def test_images_dir_without_a_base_image_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAFLOW_STACK_IMAGES_DIR", str(tmp_path))
    with pytest.raises(Exception, match="holds no images/base/Dockerfile"):
        catalog.images_root()


def test_a_runtime_installed_outside_a_checkout_is_told_the_ways_to_have_images(tmp_path: Path) -> None:
    """An installed runtime with no image sources (and no lock entry for the image asked for) cannot build it,
    and a registry setting does not help (the tag is computed from the sources): the fix names what does."""
    import subprocess
    import sys

    shutil.copytree(PROJECT / "runtime" / "src" / "metaflow_stack", tmp_path / "site" / "metaflow_stack")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "METAFLOW_STACK_REGISTRY": "127.0.0.1:5000"}
    env.pop("METAFLOW_STACK_IMAGES_DIR", None)
    script = "\n".join(
        [
            "from metaflow_stack import catalog",
            "try:",
            " catalog.images_root()",
            "except Exception as e:",
            " print(e.fix)",
        ]
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "install a released runtime" in done.stdout and "METAFLOW_STACK_IMAGES_DIR" in done.stdout
    assert "METAFLOW_STACK_REGISTRY" not in done.stdout


def _dockerfiles() -> dict[str, str]:
    """Every image's Dockerfile but the local stand-in for the public Python base."""
    return {
        path.parent.name: path.read_text()
        for path in sorted((PROJECT / "images").glob("*/Dockerfile"))
        if path.parent.name != "python-base"
    }


def test_every_image_builds_from_the_stack_base() -> None:
    dockerfiles = _dockerfiles()
    assert {"base", "function", *catalog.names()} == set(dockerfiles)
    for name in catalog.names():  # directly, or through another catalog image that does (gramine's)
        chain = [name]
        while (below := catalog.get(chain[-1]).base) is not None:
            assert below not in chain, chain
            chain.append(below)
        assert chain[-1] == catalog.STACK_BASE, chain
    for name, text in dockerfiles.items():
        if name != catalog.STACK_BASE:
            below = catalog.get(name).base if name in catalog.names() else catalog.STACK_BASE
            assert f"ARG BASE_IMAGE=metaflow-stack/{below}\nFROM ${{BASE_IMAGE}}" in text, name


def test_the_install_preamble_is_written_once() -> None:
    # Only the base makes the environment and installs uv; the others add to it with the base's uv.
    for name, text in _dockerfiles().items():
        preamble = ("python3 -m venv", "pip install --no-cache-dir", "UV_VERSION", "SHELL [")
        assert all(line in text for line in preamble) == (name == catalog.STACK_BASE), name
        assert any(line in text for line in preamble) == (name == catalog.STACK_BASE), name


def _pins(lock: str) -> dict[str, str]:
    lines = (PROJECT / "runtime" / lock).read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith(" "))


@pytest.mark.parametrize(
    "extra", ["requirements-service.lock", "requirements-ui.lock", "requirements-key-release.lock"]
)
def test_an_extras_lock_keeps_every_version_of_the_core_lock(extra: str) -> None:
    # The service, UI and key-release images add their extra's lock to the base's environment: nothing may move.
    core, added = _pins("requirements.lock"), _pins(extra)
    assert len(core) > 20
    assert {name: added.get(name) for name in core} == core


def test_an_image_on_the_base_changes_tag_with_the_base(
    docker_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metaflow_stack import images

    checkout = _copy_of_the_tree(tmp_path, monkeypatch)
    _, base_before, service_before = images._plan("metadata-service", docker_engine, probe_registry=False)
    assert base_before == images._plan(catalog.STACK_BASE, docker_engine, probe_registry=False)[2]
    with (checkout / "runtime/src/metaflow_stack/catalog.py").open("a") as source:
        source.write("\n# changed\n")
    _, base_after, service_after = images._plan("metadata-service", docker_engine, probe_registry=False)
    assert base_after != base_before and service_after != service_before


def test_an_image_built_for_some_platforms_is_published_for_those_alone() -> None:
    from metaflow_stack.images import platforms_for

    both = ("linux/amd64", "linux/arm64")
    assert platforms_for(catalog.get("gramine"), both) == ("linux/amd64",)  # Gramine is built for x86-64 alone
    assert platforms_for(catalog.get("gramine"), ("linux/arm64",)) == ()
    assert platforms_for(catalog.get("confidential"), both) == both
