"""A task's Metaflow cards: the HTML reports ``@card`` stored beside the datastore.

Metaflow writes them under the datastore root, apart from the artifacts:
``<root>/mf.cards/<flow>/runs/<run>/steps/<step>/tasks/<task>/cards/<type>[-<id>]-<hash>.html``
(cards from Metaflow before steps were in the path lack ``steps/<step>``).
They are read only from the roots a reader may read, as regular files and
never through a link (``blobs.open_local``: a task could plant one to the
UI's own files), and nothing here ever renders one. A card is a page with
its own scripts, written by the flow, so the UI serves it under a
Content-Security-Policy sandbox (an opaque origin: it cannot call the UI's
API or read its storage) with no network access, and the front end frames
it sandboxed too.
"""

from __future__ import annotations

import re
from typing import Any

from metaflow_stack.datastore.blobs import Blobs, list_local, open_local, s3_location
from metaflow_stack.errors import DatastoreError

#: Cards bigger than this are not served (Metaflow's default card is about 1 MiB with its scripts).
MAX_CARD_BYTES = 32 * 1024 * 1024
#: What a card may do in the browser: run its own inline scripts and styles, show inline images; nothing else.
CARD_POLICY = (
    "sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:"
)
_FILE = re.compile(r"^(?P<type>[A-Za-z0-9_]+)(?:-(?P<id>[A-Za-z0-9_]+))?-(?P<hash>[A-Za-z0-9]+)\.html$")
_CARDS = "mf.cards"


def _folders(flow: str, run: str, step: str, task: str) -> list[str]:
    """Where the task's cards live under a root: with the step in the path, then without (older cards)."""
    for part in (flow, run, step, task):
        if not part or "/" in part or part.startswith("."):
            raise DatastoreError("bad_parameter", f"{flow}/{run}/{step}/{task} is not a task pathspec")
    return [
        f"{_CARDS}/{flow}/runs/{run}/steps/{step}/tasks/{task}/cards",
        f"{_CARDS}/{flow}/runs/{run}/tasks/{task}/cards",
    ]


class Cards:
    """Lists and reads cards under the roots ``blobs`` may read."""

    def __init__(self, blobs: Blobs) -> None:
        self.blobs = blobs

    def _names(self, root: str, folder: str) -> list[str]:
        if not root.startswith("s3://"):
            return list_local(root, *folder.split("/"))
        bucket, key = s3_location(root, folder + "/")
        try:
            listed = self.blobs.s3().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1000)
        except Exception as exc:  # botocore's errors: unreachable store, refused credentials
            raise DatastoreError("datastore_unavailable", f"cannot list s3://{bucket}/{key}: {exc}") from None
        return sorted(item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", []))

    def list(self, flow: str, run: str, step: str, task: str) -> list[dict[str, Any]]:
        """The task's cards: file name, card type, id (when given) and hash; none when there are none."""
        for root in self.blobs.roots:
            for folder in _folders(flow, run, step, task):
                found = [(name, _FILE.match(name)) for name in self._names(root, folder)]
                cards = [{"file": name, **m.groupdict()} for name, m in found if m]
                if cards:
                    return cards
        return []

    def read(self, flow: str, run: str, step: str, task: str, file: str) -> bytes:
        """The HTML of one card the listing named."""
        if not _FILE.match(file):
            raise DatastoreError("bad_parameter", f"{file} is not a card file name")
        for root in self.blobs.roots:
            for folder in _folders(flow, run, step, task):
                if file not in self._names(root, folder):
                    continue
                body = self._read(root, f"{folder}/{file}")
                if len(body) > MAX_CARD_BYTES:
                    raise DatastoreError("too_large", f"card {file} is larger than {MAX_CARD_BYTES // 2**20} MiB")
                return body
        raise DatastoreError("not_found", f"card {file} of {flow}/{run}/{step}/{task} does not exist")

    def _read(self, root: str, key: str) -> bytes:
        if not root.startswith("s3://"):
            with open_local(root, *key.split("/")) as stream:
                if stream is None:  # replaced by a link, or gone, since it was listed
                    raise DatastoreError("not_found", f"card {key} is not a file")
                return stream.read(MAX_CARD_BYTES + 1)
        bucket, full = s3_location(root, key)
        try:
            found = self.blobs.s3().get_object(Bucket=bucket, Key=full, Range=f"bytes=0-{MAX_CARD_BYTES}")
        except Exception as exc:  # botocore's errors
            raise DatastoreError("datastore_unavailable", f"cannot read s3://{bucket}/{full}: {exc}") from None
        return found["Body"].read()
