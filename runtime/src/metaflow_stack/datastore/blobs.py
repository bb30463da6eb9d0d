"""Artifact values, and bounded previews of them, from the datastore roots a reader may read.

Metaflow stores each value once, content-addressed: ``<root>/<flow>/data/
<sha[:2]>/<sha>``, a gzip-compressed pickle (raw when its ``_meta`` file
says ``cas_raw``). A run's metadata names its root, but a client chooses
what it records, so only roots the operator allowed are read by the UI, and
only the configured one by the editor's helper (local
folders, or ``s3://bucket/prefix`` through boto3). Reads stop at
``MAX_PICKLE_BYTES`` decompressed, so a small blob cannot inflate without
bound.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

from metaflow_stack.datastore.log_files import s3_client
from metaflow_stack.datastore.previews import MAX_PICKLE_BYTES, MAX_PREVIEW_BYTES, NotPlainData, plain_loads, render
from metaflow_stack.errors import DatastoreError


def s3_location(root: str, *parts: str) -> tuple[str, str]:
    """The bucket and key of ``parts`` under an ``s3://bucket/prefix`` root."""
    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    return bucket, "/".join(p for p in (prefix.strip("/"), *parts) if p)


class Blobs:
    """Reads artifact blobs by hash under ``roots``."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots
        self.reads = 0
        self._s3: Any = None

    def read(self, flow: str, sha: str) -> bytes:
        """The pickle of ``sha`` in ``flow``'s store under the first root that has it."""
        if not sha.isalnum() or "/" in flow or flow.startswith("."):
            raise DatastoreError("bad_parameter", f"artifact {flow}/{sha} is not a flow and a content hash")
        for root in self.roots:
            found = self._s3_read(root, flow, sha) if root.startswith("s3://") else self._local_read(root, flow, sha)
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
    def _local_read(root: str, flow: str, sha: str) -> bytes | None:
        path = Path(root, flow, "data", sha[:2], sha)
        if not path.is_file():
            return None
        meta = path.with_name(f"{sha}_meta")
        try:
            described = json.loads(meta.read_text()) if meta.is_file() else {}
            raw = isinstance(described, dict) and bool(described.get("cas_raw"))
            with path.open("rb") if raw else gzip.open(path) as stream:
                return stream.read(MAX_PICKLE_BYTES + 1)
        except (OSError, EOFError, ValueError) as exc:  # a damaged value: gzip, JSON and reads each say why
            raise DatastoreError("bad_artifact", f"the value {sha} of {flow} cannot be read: {exc}") from None

    def s3(self) -> Any:
        """The S3 client for ``s3://`` roots, made on first use."""
        if self._s3 is None:
            self._s3 = s3_client()
        return self._s3

    def _s3_read(self, root: str, flow: str, sha: str) -> bytes | None:
        bucket, key = s3_location(root, flow, "data", sha[:2], sha)
        try:  # never more than the cap: a compressed value is no bigger than its pickle
            ranged = self.s3().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MAX_PICKLE_BYTES}")
            body = ranged["Body"].read()
        except self.s3().exceptions.NoSuchKey:
            return None
        except Exception as exc:  # botocore's errors: unreachable store, refused credentials
            raise DatastoreError("datastore_unavailable", f"cannot read s3://{bucket}/{key}: {exc}") from None
        if body[:2] != b"\x1f\x8b":  # stored raw
            return body
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(body)) as stream:
                return stream.read(MAX_PICKLE_BYTES + 1)
        except EOFError:  # the range cut a value bigger than any preview
            return b"\0" * (MAX_PICKLE_BYTES + 1)
