"""What the editor's runs sidebar, DAG overlay and card preview read: the agent's bounded queries, and
values and cards through the datastore layer.

Listings come from ``metaflow_stack.agent`` (one request each on the
metadata service, small metadata files on a local datastore; never an
unpickle). A value is previewed with the datastore's plain-data reader
(``Blobs.preview``) from the datastore root Metaflow is configured with here,
the one its runs write to. The connection is made on the first question,
so an editor can start its helper before the service is up, and made again
after the service was unreachable.
"""

from __future__ import annotations

import getpass
import os
from typing import Any

from metaflow_stack.agent.models import ArtifactInfo
from metaflow_stack.agent.queries import MAX_ARTIFACTS, Queries, connect
from metaflow_stack.agent.source import AgentError, pathspec_parts
from metaflow_stack.datastore.blobs import Blobs
from metaflow_stack.datastore.cards import Cards


def _datastore_root(queries: Queries) -> str | None:
    """Where values are: the local datastore the queries read, else the root Metaflow writes to here."""
    root = getattr(queries.source, "root", None)
    if root is not None:
        return str(root)
    from metaflow.metaflow_config import DATASTORE_SYSROOT_S3, DEFAULT_DATASTORE
    from metaflow.plugins.datastores.local_storage import LocalStorage

    if DEFAULT_DATASTORE == "s3":
        return DATASTORE_SYSROOT_S3
    return LocalStorage.get_datastore_root_from_config(lambda *args, **kwargs: None, create_on_absent=False)


class Browser:
    """The sidebar's questions, on the configured service or the local datastore."""

    def __init__(self) -> None:
        self._queries: Queries | None = None
        self._blobs: Blobs | None = None

    @property
    def queries(self) -> Queries:
        if self._queries is None:
            self._queries = connect()
            root = _datastore_root(self._queries)
            self._blobs = Blobs((root,) if root else ())
        return self._queries

    @property
    def blobs(self) -> Blobs:
        self.queries  # noqa: B018 (connects, which chooses the root)
        assert self._blobs is not None
        return self._blobs

    def forget(self) -> None:
        """Connect again on the next question (the service came up, or the configuration changed)."""
        if self._queries is not None:
            self._queries.close()
        self._queries = self._blobs = None

    def profile(self) -> dict[str, Any]:
        """What the status bar shows: where runs are read from, the Metaflow profile, and who "mine" is."""
        from metaflow.util import get_username

        queries = self.queries
        root = getattr(queries.source, "root", None)
        return {
            "metadata": "local" if root is not None else "service",
            "where": str(root) if root is not None else queries.source.url,
            "profile": os.environ.get("METAFLOW_PROFILE") or None,
            "user": get_username() or getpass.getuser(),
            "datastore": self.blobs.roots[0] if self.blobs.roots else None,
        }

    def _artifact(self, task: str, name: str) -> ArtifactInfo:
        cursor = None
        while True:  # a task's artifacts, page after page, until the one named
            page = self.queries.artifact_info(task, limit=MAX_ARTIFACTS, cursor=cursor)
            found = next((artifact for artifact in page.artifacts if artifact.name == name), None)
            if found is not None and found.sha is not None:
                return found
            if found is not None or not (cursor := page.next_cursor):
                raise AgentError("not_found", f"artifact {name} of {task} does not exist")

    def preview(self, task: str, name: str, full: bool = False) -> dict[str, Any]:
        """A bounded rendering of one artifact (plain data only: nothing is unpickled but builtins), or the
        whole value up to the datastore's read cap when ``full``."""
        artifact = self._artifact(task, name)
        flow = pathspec_parts(task, 4, "task")[0]
        text = self.blobs.preview(flow, artifact.sha or "", artifact.size, full=full)
        return {**artifact.model_dump(), "preview": text}

    def cards(self, task: str) -> list[dict[str, Any]]:
        """The task's cards (type, id, file), newest Metaflow layout first."""
        return Cards(self.blobs).list(*pathspec_parts(task, 4, "task"))

    def card(self, task: str, file: str) -> str:
        """One card's HTML, as ``@card`` wrote it (the editor frames it sandboxed)."""
        return Cards(self.blobs).read(*pathspec_parts(task, 4, "task"), file).decode("utf-8", errors="replace")
