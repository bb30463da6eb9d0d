"""A release, end to end against a real Distribution registry: publish, lock, pull by digest, refuse a moved tag.

What ``.github/workflows/release.yml`` does on GitHub (buildx for two
platforms, SBOM, provenance, cosign keyless signing and verification) runs
here through the engine's own BuildKit for this machine's platform. No
Sigstore is reachable here and cosign is not installed, so signatures are
checked by the cosign double (``tests/cosign_double``: cosign's signature
specification, a private Fulcio as its trust root), over signatures pushed
to the registry as cosign lays them out (``sigstore_signing``); the real
cosign checks the real signatures in the GitHub jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import TEST_LABELS, VENV_BIN, need, registry_manifest, run_cli
from sigstore_signing import Fulcio, sign, signature_tag

from metaflow_stack import builders, image_lock, images
from metaflow_stack.ci.plugin import required
from metaflow_stack.deploy import write_atomically
from metaflow_stack.errors import RegistryError

pytestmark = [pytest.mark.docker, pytest.mark.slow]

_SIGNER = "https://github.com/example/metaflow-stack/.github/workflows/release.yml@refs/tags/v1.0.0"
_FORK = "https://github.com/someone/metaflow-stack/.github/workflows/release.yml@refs/tags/v1.0.0"
COSIGN_DOUBLE = Path(__file__).resolve().parent / "cosign_double"


@pytest.fixture
def lock_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "images.lock.json"
    monkeypatch.setenv("METAFLOW_STACK_IMAGE_LOCK", str(path))
    return path


@pytest.fixture
def kept_base(docker_engine, base_image: str) -> Iterator[str]:
    """The base image under a second name, so a test may remove its own name and it is given back after."""
    kept = "stack-test/kept-base:original"
    docker_engine.image.tag(base_image, kept)
    yield kept
    docker_engine.image.tag(kept, base_image)
    docker_engine.image.remove(kept)


@pytest.fixture
def fulcio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fulcio:
    """The cosign double first on PATH, trusting a private Fulcio of the test's own (``SIGSTORE_ROOT_FILE``)."""
    issuer = Fulcio()
    root = tmp_path / "fulcio-root.pem"
    root.write_bytes(issuer.root_pem())
    monkeypatch.setenv("PATH", os.pathsep.join((str(COSIGN_DOUBLE), str(VENV_BIN), os.environ["PATH"])))
    monkeypatch.setenv("SIGSTORE_ROOT_FILE", str(root))
    return issuer


def _move_tag(docker_engine, base_image: str, published: str) -> str:
    """Push other content under the published tag, as anyone who can push could; the other image's id."""
    tamperer = docker_engine.container.create(
        base_image, ["sh", "-c", "echo tampered > /tmp/tampered"], labels=TEST_LABELS
    )
    docker_engine.container.start(tamperer, attach=True)
    tampered = docker_engine.container.commit(tamperer, tag=published)
    docker_engine.container.remove(tamperer)
    docker_engine.image.push(published, quiet=True)
    docker_engine.image.remove(published)
    return tampered.id


def test_a_release_is_pulled_by_digest_and_a_moved_tag_is_refused(
    docker_engine, base_image: str, local_registry: str, lock_path: Path, kept_base: str
) -> None:
    repository, tag = base_image.rsplit(":", 1)
    published = f"{local_registry}/{base_image}"
    publish = ("stack", "images", "publish", "base", "--registry", local_registry, "--lock", str(lock_path))

    result = run_cli(*publish, "--signed-by", _SIGNER)
    assert result.returncode == 0, result.stderr
    lock = image_lock.load()
    assert lock is not None and set(lock.images) == {"base"}
    released = lock.images["base"]
    assert released.ref == base_image
    assert lock.signer == image_lock.Signer(identity=_SIGNER, issuer=image_lock.GITHUB_ACTIONS_ISSUER)
    assert result.stdout.strip().splitlines()[-1] == f"base\t{local_registry}/{repository}@{released.digest}"
    assert registry_manifest(local_registry, repository, tag).headers["Docker-Content-Digest"] == released.digest
    released_id = docker_engine.image.inspect(published).id
    docker_engine.image.remove(published)

    # The tag is moved to other content, and the released manifest deleted: the tag is refused, never
    # pulled instead, and nothing is built in its place. (Before any pull of it: once pulled, the engine
    # keeps a released manifest by its digest, as it may: a digest names one content for good.)
    tampered_id = _move_tag(docker_engine, base_image, published)
    assert registry_manifest(local_registry, repository, tag).headers["Docker-Content-Digest"] != released.digest
    assert registry_manifest(local_registry, repository, released.digest, method="DELETE").status_code == 202
    docker_engine.image.remove(base_image)
    with pytest.raises(RegistryError, match=f"the released image .*@{released.digest} cannot be pulled"):
        images.resolve("base")
    assert not docker_engine.image.exists(base_image)

    # Released again (the same sources give the same digest), then the tag moved again: the runtime pulls
    # what was released, not what the tag holds.
    assert run_cli(*publish).returncode == 0
    assert image_lock.load() == lock.model_copy(update={"signer": None})
    docker_engine.image.remove(published)
    _move_tag(docker_engine, base_image=kept_base, published=published)
    assert images.resolve("base") == base_image
    assert docker_engine.image.inspect(base_image).id == released_id != tampered_id
    look = ["sh", "-c", "test -e /tmp/tampered && echo tampered || echo released"]
    assert docker_engine.run(base_image, look, remove=True).strip() == "released"

    docker_engine.image.remove(base_image)
    pulled = run_cli("stack", "images", "pull", "base")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().splitlines()[-1] == base_image
    assert f"by digest {released.digest}" in pulled.stderr
    assert "the lock names no signer" in pulled.stderr
    docker_engine.image.remove(tampered_id, force=True)


def test_where_cosign_is_an_image_its_signer_did_not_sign_is_never_pulled(
    docker_engine, base_image: str, local_registry: str, lock_path: Path, kept_base: str
) -> None:
    """A lock that names its signer, and an image in the registry nobody signed (as a registry that serves
    an attacker's image under the released digest would hold none either): cosign cannot show the signer
    signed it, so the image is not pulled and nothing is built in its place. Online cosign says there is no
    signature; offline it cannot reach Sigstore's trust root, and the image is not used either. (cosign
    is not on these machines; the GitHub test job installs it.)"""
    need("cosign", shutil.which("cosign") is not None, "cosign is not installed")
    publish = ("stack", "images", "publish", "base", "--registry", local_registry, "--lock", str(lock_path))
    assert run_cli(*publish, "--signed-by", _SIGNER).returncode == 0
    docker_engine.image.remove(f"{local_registry}/{base_image}")
    docker_engine.image.remove(base_image)
    with pytest.raises(RegistryError) as refused:
        images.resolve("base")
    said = refused.value.message
    if "cosign" in required():  # (where CI installed it, online: cosign must have found no signature)
        assert f"is not signed by {_SIGNER}" in said, said
    else:
        assert f"is not signed by {_SIGNER}" in said or "could not be checked" in said, said
    assert not docker_engine.image.exists(base_image)


def test_a_released_image_is_pulled_only_once_its_signers_signature_verifies(
    docker_engine, base_image: str, local_registry: str, lock_path: Path, kept_base: str, fulcio: Fulcio
) -> None:
    """With cosign here (the double), a lock that names its signer: the image is pulled by digest only once
    cosign shows the release workflow signed that digest. Unsigned, signed by another identity (a fork's
    workflow), or signed for another digest: refused in one line with cosign's reasons, nothing pulled. With
    Sigstore out of reach (no trust root): not used either. Signed by the workflow (beside the others):
    pulled, "signature verified"."""
    publish = ("stack", "images", "publish", "base", "--registry", local_registry, "--lock", str(lock_path))
    assert run_cli(*publish, "--signed-by", _SIGNER).returncode == 0
    released = image_lock.load().images["base"]
    released_id = docker_engine.image.inspect(f"{local_registry}/{base_image}").id
    docker_engine.image.remove(f"{local_registry}/{base_image}")
    docker_engine.image.remove(base_image)
    other = "sha256:" + "0" * 64  # (content the workflow also signed: its signature replayed for this image)
    issuer = image_lock.GITHUB_ACTIONS_ISSUER

    def refused(*words: str) -> None:
        with pytest.raises(RegistryError) as refusal:
            images.resolve("base")
        assert all(word in refusal.value.message for word in words), refusal.value.message
        assert "\n" not in refusal.value.message and "error during command execution" not in refusal.value.message
        assert not docker_engine.image.exists(base_image)

    try:
        refused(f"is not signed by {_SIGNER}: no signatures found")
        sign(fulcio, local_registry, released.repository, released.digest, _FORK, issuer)
        refused(f"is not signed by {_SIGNER}", "none of the expected identities matched", _FORK)
        sign(fulcio, local_registry, released.repository, other, _SIGNER, issuer)
        replayed = registry_manifest(local_registry, released.repository, signature_tag(other), method="GET").json()
        httpx.put(
            f"http://{local_registry}/v2/{released.repository}/manifests/{signature_tag(released.digest)}",
            content=json.dumps(replayed),
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        ).raise_for_status()
        refused(f"is not signed by {_SIGNER}", f"the payload names {other}")
        sign(fulcio, local_registry, released.repository, released.digest, _FORK, issuer)
        refused(f"the payload names {other}", "none of the expected identities matched")  # (each one's reason)

        sign(fulcio, local_registry, released.repository, released.digest, _SIGNER, issuer)
        with pytest.MonkeyPatch.context() as offline:
            offline.delenv("SIGSTORE_ROOT_FILE")
            refused("could not be checked", "TUF")
        pulled = run_cli("stack", "images", "pull", "base")
        assert pulled.returncode == 0, pulled.stderr
        assert f"by digest {released.digest} (signature verified)" in pulled.stderr
        assert docker_engine.image.inspect(base_image).id == released_id
    finally:  # (the registry is the session's: the next signing starts from no signature)
        for digest in (released.digest, other):
            found = registry_manifest(local_registry, released.repository, signature_tag(digest))
            if found.status_code == 200:
                reference = found.headers["Docker-Content-Digest"]
                registry_manifest(local_registry, released.repository, reference, method="DELETE")


def test_a_lock_for_other_sources_is_not_used(
    docker_engine, base_image: str, local_registry: str, lock_path: Path
) -> None:
    stale = image_lock.LockedImage(ref=f"{base_image.rsplit(':', 1)[0]}:0000000000000000", digest="sha256:" + "0" * 64)
    image_lock.write(image_lock.ImageLock(registry=local_registry, images={"base": stale}), lock_path)
    assert images.resolve("base") == base_image  # the sources here hash to another tag: the lock does not apply


def test_a_lock_is_written_with_the_mode_any_new_file_gets(tmp_path: Path) -> None:
    """0666 less the umask, as ``open`` gives: not a temporary file's 0600, which keeps it from everyone else."""
    lock = image_lock.ImageLock(registry="registry.example", images={})
    previous = os.umask(0o027)
    try:
        written = image_lock.write(lock, tmp_path / "images.lock.json")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["images.lock.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_other(tmp_path: Path) -> None:
    kept = write_atomically(tmp_path / "images.lock.json", "the released lock\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(kept, "a lone surrogate: \ud800")
    assert kept.read_text() == "the released lock\n"
    assert [p.name for p in tmp_path.iterdir()] == ["images.lock.json"]


def test_a_broken_lock_is_one_line_naming_the_field(lock_path: Path) -> None:
    lock_path.write_text(json.dumps({"registry": "r.example", "images": {"base": {"ref": "a/b:c", "digest": "md5:1"}}}))
    result = run_cli("stack", "images", "pull", "base")
    assert result.returncode == 1
    assert f"error: the image lock {lock_path} is not valid: images.base.digest:" in result.stderr
    assert "fix: restore the lock the release shipped, or unset METAFLOW_STACK_IMAGE_LOCK" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_named_lock_that_is_missing_is_an_error(lock_path: Path) -> None:
    result = run_cli("stack", "images", "pull", "base")
    assert result.returncode == 1
    assert f"error: METAFLOW_STACK_IMAGE_LOCK names {lock_path}, which does not exist" in result.stderr


def test_publishing_names_what_is_missing(docker_engine, lock_path: Path) -> None:
    result = run_cli("stack", "images", "publish", "base", env={"METAFLOW_STACK_REGISTRY": ""})
    assert result.returncode == 1
    assert "error: no registry to publish to" in result.stderr
    assert "fix: pass --registry or set METAFLOW_STACK_REGISTRY" in result.stderr
    unset = {"METAFLOW_STACK_IMAGE_LOCK": ""}
    nowhere = run_cli("stack", "images", "publish", "base", "--registry=127.0.0.1:1", env=unset)
    assert nowhere.returncode == 1
    assert "error: no place to write the image lock" in nowhere.stderr
    if builders.route() != "buildx":
        several = run_cli("stack", "images", "publish", "base", "--registry=127.0.0.1:1", "--platform", "linux/arm64")
        assert several.returncode == 1
        assert "linux/arm64 needs the buildx plugin" in several.stderr
    assert not lock_path.exists()
