"""Where a task's log files are, and ranged reads of them.

Metaflow keeps a task attempt's output in its datastore beside the artifacts:
``<ds-root>/<flow>/<run>/<step>/<task>/<attempt>.<source>_<stream>.log``, one
file per log source (``runtime``: what the local runtime captured, ``task``:
what ``mflog`` wrote inside a remote job). The task's ``ds-type`` and
``ds-root`` metadata say where that root is. The service reads only byte
ranges of these files, so answering "the last 100 lines" costs the same on a
1 KB log as on a 1 GB one.

A client chooses the ``ds-root`` it records, so the service reads only under
roots its operator allowed (``--log-root``): a local folder or an
``s3://bucket/prefix``. Anything else is refused, never opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from metaflow.mflog import LOG_SOURCES

from metaflow_stack.errors import DatastoreError

STREAMS = ("stdout", "stderr")


class LogFile(Protocol):
    """One log source of one attempt: its size and byte ranges (absent files are empty)."""

    source: str

    def size(self) -> int: ...

    def read(self, start: int, end: int) -> bytes: ...


@dataclass
class ReadMeter:
    """Bytes fetched from the datastore for one request: what bounded reads bound."""

    bytes_read: int = 0


@dataclass
class _LocalFile:
    source: str
    path: Path
    meter: ReadMeter

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _unavailable(str(self.path), exc) from None

    def read(self, start: int, end: int) -> bytes:
        try:
            with self.path.open("rb") as handle:
                handle.seek(start)
                data = handle.read(end - start)
        except OSError as exc:
            raise _unavailable(str(self.path), exc) from None
        self.meter.bytes_read += len(data)
        return data


@dataclass
class _S3File:
    source: str
    bucket: str
    key: str
    client: object
    meter: ReadMeter
    _size: int | None = field(default=None, repr=False)

    def size(self) -> int:
        if self._size is None:
            from botocore.exceptions import ClientError

            try:
                self._size = self.client.head_object(Bucket=self.bucket, Key=self.key)["ContentLength"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise _unavailable(f"s3://{self.bucket}/{self.key}", exc) from None
                self._size = 0
        return self._size

    def read(self, start: int, end: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}")["Body"]
            data = body.read()
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable(f"s3://{self.bucket}/{self.key}", exc) from None
        self.meter.bytes_read += len(data)
        return data


def _unavailable(where: str, exc: Exception) -> DatastoreError:
    return DatastoreError("datastore_unavailable", f"cannot read {where}: {exc}")


class LogFiles:
    """Opens task log files under the allowed datastore roots."""

    def __init__(self, roots: tuple[str, ...] = ()) -> None:
        self.local_roots = [Path(r).resolve() for r in roots if not r.startswith("s3://")]
        self.s3_roots = [r.rstrip("/") + "/" for r in roots if r.startswith("s3://")]
        self._s3_client: object | None = None

    @property
    def roots(self) -> list[str]:
        return [str(r) for r in self.local_roots] + self.s3_roots

    def open(
        self, ds_type: str, ds_root: str, components: tuple[str, ...], attempt: int, stream: str, meter: ReadMeter
    ) -> list[LogFile]:
        """The attempt's log files for ``stream``, one per source, in Metaflow's source order."""
        names = [f"{attempt}.{source}_{stream}.log" for source in LOG_SOURCES]
        if ds_type == "local":
            # Resolved, links included, before the check: nothing outside a root is opened.
            paths = [Path(ds_root, *components, n).resolve() for n in names]
            if not all(any(p.is_relative_to(root) for root in self.local_roots) for p in paths):
                raise self._refused(ds_root)
            return [_LocalFile(s, p, meter) for s, p in zip(LOG_SOURCES, paths, strict=True)]
        if ds_type == "s3":
            prefix = "/".join((ds_root.rstrip("/"), *components)) + "/"
            if ".." in components or not any(prefix.startswith(root) for root in self.s3_roots):
                raise self._refused(ds_root)
            bucket, _, key = prefix.removeprefix("s3://").partition("/")
            client = self._s3()
            return [_S3File(s, bucket, key + n, client, meter) for s, n in zip(LOG_SOURCES, names, strict=True)]
        raise DatastoreError("not_implemented", f"logs in {ds_type!r} datastores cannot be read by this service")

    def _refused(self, ds_root: str) -> DatastoreError:
        return DatastoreError(
            "log_root_not_allowed",
            f"this service does not read logs under {ds_root}",
            f"its operator can allow it with --log-root {ds_root}",
            {"allowed": self.roots},
        )

    def _s3(self) -> object:
        if self._s3_client is None:
            self._s3_client = s3_client()
        return self._s3_client


def s3_client() -> object:
    """A boto3 client on Metaflow's S3 endpoint setting (an S3-compatible store when set)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("METAFLOW_S3_ENDPOINT_URL") or None,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30),
    )
