"""Published images round-trip through a real Distribution registry on 127.0.0.1."""

from __future__ import annotations

import http.server
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import json_stdout, run_cli
from rich.console import Console

from metaflow_stack import builders, images, registry, settings
from metaflow_stack.errors import RegistryError, StackError

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_push_delete_pull_run_round_trip(docker_engine, base_image: str, local_registry: str) -> None:
    repository, tag = base_image.rsplit(":", 1)

    pushed = images.push_image("base")
    assert pushed == f"{local_registry}/{base_image}"
    assert tag in registry.tags(local_registry, repository)

    # The tag alone (force: a stopped container of another test may still name the image; its layers stay
    # either way, under the pushed tag).
    docker_engine.image.remove(base_image, force=True)
    assert not docker_engine.image.exists(base_image)

    assert images.resolve("base") == base_image  # pulled, not rebuilt
    assert docker_engine.image.exists(base_image)
    output = docker_engine.run(base_image, ["python", "-c", "import metaflow_stack; print('ok')"], remove=True)
    assert output.strip() == "ok"


def test_registry_answers_on_loopback_only(local_registry: str) -> None:
    host, _ = local_registry.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert registry.ping(local_registry)


def test_a_port_another_server_answers_on_is_refused_not_taken_for_ours(tmp_path: Path) -> None:
    """Anything answering the registry API there (another user's registry) would get every push, serve every
    pull: a registry counts as ours only when our own process serves it."""

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

    server = http.server.HTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        with pytest.raises(StackError) as error:
            registry.LocalRegistry(home=tmp_path, port=port).start()
    finally:
        server.shutdown()
    assert error.value.message.startswith(f"port {port} is in use by something else")
    assert "--port" in (error.value.fix or "")


def test_doctor_reports_the_configured_registry(local_registry: str) -> None:
    result = run_cli("stack", "doctor", "--json")
    checks = {c["name"]: c for c in json_stdout(result)}
    assert checks["Image registry"]["ok"] is True
    assert local_registry in checks["Image registry"]["detail"]


def test_pulling_an_unpublished_image_names_the_fix(local_registry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAFLOW_STACK_IMAGE_NAMESPACE", "never-published")
    result = run_cli("stack", "images", "pull", "base")
    assert result.returncode == 1
    assert "is not published" in result.stderr
    assert "fix: build it with `metaflow stack images build base --push`" in result.stderr


def _wrap_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Make the stack's docker client a wrapper that runs ``script`` (shell; the real client, the one builds
    reach BuildKit through, is ``"$REAL"``): another process's move, made at a known point."""
    how = builders.route()
    classic = how.startswith("classic:")
    real = how.removeprefix("classic:") if classic else shutil.which(settings.load().docker_client or "docker")
    wrapper = tmp_path / "docker"
    wrapper.write_text(f'#!/bin/sh\nREAL="{real}"\n{script}')
    wrapper.chmod(0o755)
    monkeypatch.setenv("METAFLOW_STACK_DOCKER_CLIENT", str(wrapper))


@pytest.fixture
def small_image(docker_engine, tmp_path: Path) -> Iterator[str]:
    """An image of one small layer of its own (FROM scratch: nothing to pull)."""
    context = tmp_path / "small"
    context.mkdir()
    (context / "hello.txt").write_text(uuid.uuid4().hex)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /\n")
    tag = f"stack-test/small:{uuid.uuid4().hex[:8]}"
    builders.build(builders.BuildRequest(context=context, tag=tag), Console(quiet=True))
    yield tag
    docker_engine.image.remove(tag, force=True)


def test_a_registry_setting_docker_cannot_name_is_one_line_naming_the_setting(
    small_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METAFLOW_STACK_REGISTRY", "127.0.0.1:5000/MyTeam")
    with pytest.raises(RegistryError) as error:
        images.push_reference(small_image)
    assert error.value.message.startswith("METAFLOW_STACK_REGISTRY is '127.0.0.1:5000/MyTeam'")
    assert "lowercase" in error.value.message and "METAFLOW_STACK_REGISTRY" in (error.value.fix or "")


def test_a_push_whose_registry_name_another_push_took_off_meanwhile_succeeds(
    docker_engine, small_image: str, local_registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes push one image: the other one's cleanup takes the registry name off as this push ends.
    Here the other process is the real client, run by a wrapper right after the push it wraps."""
    _wrap_the_client(
        tmp_path,
        monkeypatch,
        '"$REAL" "$@" || exit $?\n'
        'if [ "$1 $2" = "image push" ]; then for last; do :; done; "$REAL" image rm "$last" >/dev/null; fi\n',
    )
    assert images.push_reference(small_image) == f"{local_registry}/{small_image}"
    repository, tag = small_image.rsplit(":", 1)
    assert tag in registry.tags(local_registry, repository)
    assert docker_engine.image.exists(small_image)


def test_a_source_edited_while_the_base_is_pulled_builds_under_its_own_tag(
    docker_engine, small_image: str, local_registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tag names what the build sent: sources edited during the base's pull (minutes, at times) are built
    under the tag of the edit, never under the tag of what was there before. The edit is made by a wrapper
    around the real client as the pull starts."""
    project = tmp_path / "project"
    (project / "images/base").mkdir(parents=True)
    (project / "images/base/Dockerfile").write_text("FROM scratch\nCOPY runtime/ /runtime/\n")
    source = project / "runtime/src/pkg/mod.py"
    source.parent.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "requirements.lock"):
        (project / "runtime" / name).write_text(name)
    source.write_text("before\n")
    base = f"{local_registry}/{small_image}"
    docker_engine.image.tag(small_image, base)
    docker_engine.image.push(base, quiet=True)
    docker_engine.image.remove(base)
    _wrap_the_client(
        tmp_path, monkeypatch, f'if [ "$1 $2" = "image pull" ]; then echo edited > {source}; fi\nexec "$REAL" "$@"\n'
    )
    namespace = f"stack-test-{uuid.uuid4().hex[:8]}"
    for name, value in (("IMAGES_DIR", project / "images"), ("BASE_IMAGE", base), ("IMAGE_NAMESPACE", namespace)):
        monkeypatch.setenv(f"METAFLOW_STACK_{name}", str(value))
    built = images.build("base", console=Console(quiet=True))
    try:
        assert source.read_text() == "edited\n", "the pull ran, and the edit with it"
        assert built == images._plan("base", docker_engine)[2]
        container = docker_engine.container.create(built, ["none"])
        try:
            docker_engine.container.copy((container, "/runtime/src/pkg/mod.py"), tmp_path / "built.py")
        finally:
            container.remove()
        assert (tmp_path / "built.py").read_text() == "edited\n"
    finally:
        docker_engine.image.remove([built, base], force=True)
