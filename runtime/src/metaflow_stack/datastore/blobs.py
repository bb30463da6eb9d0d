"""Artifact values, and bounded previews of them, from the datastore roots a reader may read.

Metaflow stores each value once, content-addressed: ``<root>/<flow>/data/
<sha[:2]>/<sha>``, a gzip-compressed pickle (raw when its ``_meta`` file
says ``cas_raw``). A run's metadata names its root, but a client chooses
what it records, so only roots the operator allowed are read by the UI, and
only the configured one by the editor's helper (local
folders, or ``s3://bucket/prefix`` through boto3). Reads stop at
``MAX_PICKLE_BYTES`` decompressed, so a small blob cannot inflate without
bound.

A task writes the files under a local root, so it could plant links there:
below the root (the operator's, links and all) no link is followed, and only
regular files are listed or read (``open_local``, ``list_local``), never a
FIFO or a device. Otherwise a link to the UI's own key or a file of the
machine would be served as a value or a card.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import stat
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from metaflow_stack.datastore.log_files import s3_client
from metaflow_stack.datastore.previews import MAX_PICKLE_BYTES, MAX_PREVIEW_BYTES, NotPlainData, plain_loads, render
from metaflow_stack.errors import DatastoreError

#: A value's ``_meta`` file is a few dozen bytes of JSON; more is not read.
_META_BYTES = 64 * 1024
#: Opens each folder below a root, and then the file, without following a link (nor waiting on a FIFO).
_BELOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FOLDER = _BELOW | os.O_DIRECTORY
#: What opening a path that is missing, or is a link where a folder or file should be, fails with.
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def s3_location(root: str, *parts: str) -> tuple[str, str]:
    """The bucket and key of ``parts`` under an ``s3://bucket/prefix`` root."""
    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    return bucket, "/".join(p for p in (prefix.strip("/"), *parts) if p)


def _open_below(root: str, parts: tuple[str, ...], last: int) -> int | None:
    """A descriptor of ``parts`` under ``root``, the last opened with ``last``: each part is opened in the
    folder opened before it, never through a link, so there is no check that a swapped folder could race;
    None when a part is missing or is a link."""
    if any(part in ("", ".", "..") or "/" in part for part in parts):
        raise DatastoreError("bad_parameter", f"{'/'.join(parts)} is not a path below a datastore root")
    try:
        folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for index, part in enumerate(parts):
            try:
                opened = os.open(part, last if index == len(parts) - 1 else _FOLDER, dir_fd=folder)
            finally:
                os.close(folder)
            folder = opened
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise DatastoreError("datastore_unavailable", f"cannot read {root}/{'/'.join(parts)}: {exc.strerror}") from None
    return folder


@contextmanager
def open_local(root: str, *parts: str) -> Iterator[BinaryIO | None]:
    """The regular file at ``parts`` under the local ``root``, read-only; None when there is none (or a
    link, a FIFO, a device or a folder is there instead)."""
    found = _open_below(root, parts, _BELOW)
    if found is None:
        yield None
        return
    with os.fdopen(found, "rb") as stream:
        yield stream if stat.S_ISREG(os.fstat(found).st_mode) else None


def list_local(root: str, *parts: str) -> list[str]:
    """The names of the regular files (not links) in the folder at ``parts`` under the local ``root``, sorted;
    none when there is no such folder."""
    found = _open_below(root, parts, _FOLDER)
    if found is None:
        return []
    try:
        with os.scandir(found) as entries:
            return sorted(entry.name for entry in entries if entry.is_file(follow_symlinks=False))
    finally:
        os.close(found)


class Blobs:
    """Reads artifact blobs by hash under ``roots``."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots
        self.reads = 0
        self._s3: Any = None

    def read(self, flow: str, sha: str, limit: int = MAX_PICKLE_BYTES) -> bytes:
        """The pickle of ``sha`` in ``flow``'s store under the first root that has it; past ``limit`` bytes
        decompressed, ``limit + 1`` of them (more is never read)."""
        if not sha.isalnum() or "/" in flow or flow.startswith("."):
            raise DatastoreError("bad_parameter", f"artifact {flow}/{sha} is not a flow and a content hash")
        for root in self.roots:
            if root.startswith("s3://"):
                found = self._s3_read(root, flow, sha, limit)
            else:
                found = self._local_read(root, flow, sha, limit)
            if found is not None:
                self.reads += 1
                return found
        raise DatastoreError("not_found", f"the value {sha} of {flow} is in none of {', '.join(self.roots)}")

    def preview(self, flow: str, sha: str, size: int | None, full: bool = False) -> str:
        """A bounded rendering of a plain-data value, or why it is not shown; ``full``: the whole value
        (opened on demand), up to the read cap."""
        if size is not None and size > MAX_PREVIEW_BYTES and not full:
            return f"(not previewed: {size:,} bytes stored)"
        try:
            data = self.read(flow, sha)
        except DatastoreError as exc:  # shown on that artifact: the rest of the page still renders
            return f"(not readable: {exc.message})"
        if len(data) > MAX_PICKLE_BYTES:
            return "(not previewed: larger than 8 MiB)"
        try:
            return render(plain_loads(data), full=full)
        except NotPlainData as exc:
            return f"(not previewed: needs {exc})"

    @staticmethod
    def _local_read(root: str, flow: str, sha: str, limit: int) -> bytes | None:
        folder = (flow, "data", sha[:2])
        try:
            with open_local(root, *folder, sha) as stream:
                if stream is None:
                    return None
                with open_local(root, *folder, f"{sha}_meta") as meta:
                    described = json.loads(meta.read(_META_BYTES)) if meta else {}
                raw = isinstance(described, dict) and bool(described.get("cas_raw"))
                with stream if raw else gzip.GzipFile(fileobj=stream) as value:
                    return value.read(limit + 1)
        except (OSError, EOFError, ValueError, zlib.error) as exc:  # a damaged value: gzip, JSON and reads say why
            # Named by its kind only: gzip's own message quotes the bytes it could not read.
            kind = type(exc)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{kind.__module__}.{kind.__name__}"
            raise DatastoreError("bad_artifact", f"the value {sha} of {flow} cannot be read: {reason}") from None

    def s3(self) -> Any:
        """The S3 client for ``s3://`` roots, made on first use."""
        if self._s3 is None:
            self._s3 = s3_client()
        return self._s3

    def _s3_read(self, root: str, flow: str, sha: str, limit: int) -> bytes | None:
        bucket, key = s3_location(root, flow, "data", sha[:2], sha)
        try:  # never more than the cap: a compressed value is no bigger than its pickle
            ranged = self.s3().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")
            body = ranged["Body"].read()
        except self.s3().exceptions.NoSuchKey:
            return None
        except Exception as exc:  # botocore's errors: unreachable store, refused credentials
            raise DatastoreError("datastore_unavailable", f"cannot read s3://{bucket}/{key}: {exc}") from None
        if body[:2] != b"\x1f\x8b":  # stored raw
            return body
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(body)) as stream:
                return stream.read(limit + 1)
        except EOFError:  # the range cut a value bigger than the limit
            return b"\0" * (limit + 1)
