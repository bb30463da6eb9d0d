"""Images build through BuildKit, run as a non-root user, and fail cleanly."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import pytest
from conftest import json_stdout, last_line, run_cli
from rich.console import Console

from metaflow_stack import builders, settings
from metaflow_stack.errors import ImageBuildError, StackError

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _in_image(docker, image: str, script: str) -> str:
    return docker.run(image, ["sh", "-c", script], remove=True)


def test_base_image_runs_python_311_metaflow_and_the_runtime(docker_engine, base_image: str) -> None:
    output = _in_image(
        docker_engine,
        base_image,
        "python -c 'import sys, metaflow, metaflow_stack; print(sys.version_info[:2], metaflow_stack.__version__)'"
        " && uv --version",
    )
    assert "(3, 11)" in output
    assert "uv " in output


def test_base_image_runs_as_a_non_root_user(docker_engine, base_image: str) -> None:
    assert _in_image(docker_engine, base_image, "id -u") != "0"
    assert docker_engine.image.inspect(base_image).config.user == "1000:1000"


def test_base_image_carries_oci_labels(docker_engine, base_image: str) -> None:
    labels = docker_engine.image.inspect(base_image).config.labels
    assert labels["org.opencontainers.image.title"] == "metaflow-stack base"
    assert labels["org.opencontainers.image.base.name"]
    assert labels["org.opencontainers.image.version"]


def test_ca_bundle_reaches_the_build_and_never_lands_in_the_image(
    docker_engine, base_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment's bundle when it names one; otherwise one made here, so the check runs everywhere.
    bundle = settings.load().ca_bundle
    if bundle is None:
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(f"-----BEGIN CERTIFICATE-----\n{uuid.uuid4().hex * 8}\n-----END CERTIFICATE-----\n")
        monkeypatch.setenv("METAFLOW_STACK_CA_BUNDLE", str(bundle))
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        f"RUN --mount=type=secret,id={builders.CA_SECRET_ID},uid=1000 "
        f"sha256sum /run/secrets/{builders.CA_SECRET_ID} | cut -d' ' -f1 > /tmp/seen\n"
    )
    tag = f"metaflow-stack/test-ca:{uuid.uuid4().hex[:8]}"
    builders.build(builders.BuildRequest(context=context, tag=tag), Console(quiet=True))
    try:
        assert _in_image(docker_engine, tag, "cat /tmp/seen").strip() == digest, "the build saw the bundle"
        size = bundle.stat().st_size
        find_same_size = f"find / -xdev -type f -size {size}c -exec sha256sum {{}} + 2>/dev/null || true"
        same_size = _in_image(docker_engine, tag, f"ls /run/secrets 2>/dev/null; {find_same_size}")
        assert digest not in same_size and builders.CA_SECRET_ID not in same_size
        for image in (tag, base_image):
            env = docker_engine.image.inspect(image).config.env
            assert not [e for e in env if e.startswith(("PIP_CERT", "SSL_CERT_FILE"))]
    finally:
        docker_engine.image.remove(tag, force=True)


@pytest.mark.parametrize("name", ["DOCKER_HOST", "buildx_config", "HOME", "PATH"])
def test_a_private_build_arg_named_as_the_clients_own_variable_is_refused(name: str, tmp_path: Path) -> None:
    """A private arg reaches the build through the client's environment, so one named ``DOCKER_HOST`` would
    also send the build to another engine: refused, naming it, before any client runs."""
    (tmp_path / "Dockerfile").write_text(f"FROM scratch\nARG {name}\n")
    request = builders.BuildRequest(context=tmp_path, tag="metaflow-stack/test-refused:x", build_args={name: "v"},
                                    private_args=(name,))  # fmt: skip
    with pytest.raises(StackError, match=f"the build arg {name} would also set the docker client's own {name}"):
        builders.build(request, Console(quiet=True))


def test_a_private_build_arg_reaches_the_build_but_never_the_clients_command_line(
    docker_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any local user reads a running client's ``/proc/<pid>/cmdline``: a private arg's value goes in its
    environment, never there. The client is the real one, behind a wrapper that logs that file and execs it."""
    how = builders.route()
    real = (
        how.removeprefix("classic:")
        if how.startswith("classic:")
        else shutil.which(settings.load().docker_client or "docker")
    )
    seen = tmp_path / "cmdlines"
    wrapper = tmp_path / "docker"
    wrapper.write_text(f"#!/bin/sh\ntr '\\0' '\\n' < /proc/$$/cmdline >> {seen}\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("METAFLOW_STACK_DOCKER_CLIENT", str(wrapper))
    secret = f"https://alice:{uuid.uuid4().hex}@pypi.example/simple"
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\nARG PIP_INDEX_URL\nLABEL seen=${PIP_INDEX_URL}\n")
    tag = f"metaflow-stack/test-private-arg:{uuid.uuid4().hex[:8]}"
    request = builders.BuildRequest(
        context=context, tag=tag, build_args={"PIP_INDEX_URL": secret}, private_args=("PIP_INDEX_URL",)
    )
    builders.build(request, Console(quiet=True))
    try:
        assert docker_engine.image.inspect(tag).config.labels["seen"] == secret, "the build got the value"
        argv = seen.read_text().splitlines()
        assert not [arg for arg in argv if secret in arg]
        assert "PIP_INDEX_URL" in argv  # by its name alone
    finally:
        docker_engine.image.remove(tag, force=True)


def test_rebuilding_unchanged_sources_is_a_no_op(base_image: str) -> None:
    result = run_cli("stack", "images", "build", "base")
    assert result.returncode == 0, result.stderr
    assert last_line(result) == base_image
    assert "is up to date" in result.stderr


def test_images_list_shows_the_built_base(base_image: str) -> None:
    result = run_cli("stack", "images", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = {info["name"]: info for info in json_stdout(result)}
    assert listed["base"]["ref"] == base_image
    assert listed["base"]["present"] is True


def test_failed_build_names_the_step_shows_the_log_and_tags_nothing(
    docker_engine, base_image: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo preparing\nRUN echo 'about to fail' && exit 3\n")
    tag = f"metaflow-stack/test-broken:{uuid.uuid4().hex[:8]}"
    with pytest.raises(ImageBuildError) as error:
        builders.build(builders.BuildRequest(context=tmp_path, tag=tag), Console(quiet=True))
    assert "exit 3" in error.value.step
    assert "about to fail" in error.value.log_tail
    assert not docker_engine.image.exists(tag)


def test_a_failed_step_that_said_error_and_fix_becomes_that_one_line(
    docker_engine, base_image: str, tmp_path: Path
) -> None:
    """What a build step running the runtime prints on the way out (``error:``, ``fix:``) is the error;
    another step's lines of that shape are not."""
    said = "printf 'error: %s\\nfix: %s\\n'"
    (tmp_path / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN {said} 'an earlier step' 'not this one'\n"
        f"RUN {said} 'the wheels did not install' 'pin another version' && exit 202\n"
    )
    with pytest.raises(ImageBuildError) as error:
        builders.build(builders.BuildRequest(context=tmp_path, tag="metaflow-stack/test-said:x"), Console(quiet=True))
    assert error.value.message == "building metaflow-stack/test-said:x: the wheels did not install"
    assert error.value.fix == "pin another version" and "exit 202" in error.value.step


def test_unknown_image_is_one_line_naming_the_known_ones() -> None:
    result = run_cli("stack", "images", "build", "nope")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: unknown image or capability 'nope'" in result.stderr
    assert "images: base" in result.stderr


def test_a_pushed_images_digest_is_found_in_the_short_form_docker_records_for_docker_hub() -> None:
    """A push to Docker Hub names the repository in full (``docker.io/org/name``); the engine records its
    digest as ``org/name@sha256:...`` (``library/`` dropped too): the pushed image is named by its digest
    there as anywhere, and a digest of another registry or repository is never taken for it."""
    from metaflow_stack.images import _same_repository

    assert _same_repository("org/metaflow-stack/base@sha256:ab", "docker.io/org/metaflow-stack/base")
    assert _same_repository("python@sha256:ab", "docker.io/library/python")
    assert _same_repository("127.0.0.1:5000/metaflow-stack/base@sha256:ab", "127.0.0.1:5000/metaflow-stack/base")
    assert not _same_repository("127.0.0.1:5000/metaflow-stack/base@sha256:ab", "127.0.0.1:5001/metaflow-stack/base")
    assert not _same_repository("org/base@sha256:ab", "docker.io/org/base-other")
