"""Blobs (code archives, artifacts, code packages) in Metaflow's content-addressed store.

Everything a reference points at is a blob keyed by the sha1 of its bytes, in
the same format and through the same storage classes Metaflow uses for
artifacts, so the local datastore and S3 work alike and a task's artifacts are
read where they already are. An exported bundle is one more such store, under
``blobs/`` next to its ``reference.json``.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from metaflow_stack.functions.errors import FunctionError

if TYPE_CHECKING:
    from metaflow_stack.functions.reference import BlobStoreRef


def storage_for(location: str):
    """Metaflow's storage implementation for a local path or an ``s3://`` URL."""
    from metaflow.plugins import DATASTORES

    ds_type = "s3" if location.startswith("s3://") else "local"
    if ds_type == "s3":
        _credentials_for(location)
    impl = next(d for d in DATASTORES if ds_type == d.TYPE)
    return impl(location)


def _credentials_for(location: str) -> None:
    """Metaflow's S3 client retries an error without AWS credentials for minutes, saying nothing: say it at
    once. Only for Metaflow's default client provider (boto3's own chain); another provider has its own."""
    from metaflow.metaflow_config import DEFAULT_AWS_CLIENT_PROVIDER

    if DEFAULT_AWS_CLIENT_PROVIDER != "boto3":
        return
    import boto3

    if boto3.Session().get_credentials() is None:
        raise FunctionError(
            f"no AWS credentials to read {location}",
            fix="set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where a role provides them",
        )


class BlobStore:
    """Reads and writes blobs of one content-addressed store."""

    def __init__(self, root: str, prefix: str) -> None:
        from metaflow.datastore.content_addressed_store import ContentAddressedStore

        self.root = root
        self.prefix = prefix
        self._cas = ContentAddressedStore(prefix, storage_for(root))

    @classmethod
    def of(cls, ref: BlobStoreRef, base: str | None = None) -> BlobStore:
        """The store a reference names; ``base`` is the bundle's location for 'bundle' stores."""
        if ref.type == "bundle":
            if base is None:
                raise FunctionError("this reference points into a bundle but was not loaded from one")
            return cls(base, ref.prefix)
        return cls(ref.root, ref.prefix)

    def load(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The blobs for ``keys``; a missing one is an error naming it."""
        wanted = list(dict.fromkeys(keys))
        try:
            found = dict(self._cas.load_blobs(wanted))
        except Exception as exc:  # storage backends raise their own types for missing objects
            raise FunctionError(f"cannot read blobs {wanted} from {self.root}/{self.prefix}: {exc}") from exc
        missing = [k for k in wanted if k not in found]
        if missing:
            raise FunctionError(f"blobs {missing} are missing from {self.root}/{self.prefix}")
        return found

    def save(self, blobs: list[bytes]) -> list[str]:
        """Store ``blobs`` (deduplicated by content) and return their keys, in order."""
        return [result.key for result in self._cas.save_blobs(blobs, len_hint=len(blobs))]


def pack_files(files: dict[str, Path]) -> bytes:
    """A reproducible tar.gz of ``files`` (archive name -> path): sorted, no times or owners."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as archive:
        for name in sorted(files):
            data = files[name].read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    # gzip stores a timestamp in its header: zero it so equal files give equal bytes
    packed = bytearray(buffer.getvalue())
    packed[4:8] = b"\0\0\0\0"
    return bytes(packed)


def unpack(archive: bytes, dest: Path, *, skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Extract a tar.gz into ``dest`` (no paths outside it, no links); return the member names."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if not m.name.lstrip("./").startswith(skip_prefixes)]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python before 3.11.4 (Debian bookworm's 3.11.2) has no extraction filters
            root = dest.resolve()
            for member in members:
                target = (dest / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
                    raise FunctionError(f"refusing archive member {member.name!r}: a link or a path outside")
            tar.extractall(dest, members=members)
        return [m.name for m in members if m.isfile()]
