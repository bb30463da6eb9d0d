"""The client side: Metaflow's service metadata provider, using what the service offers.

Registered by the extension under Metaflow's own name ``service``, so
``METAFLOW_DEFAULT_METADATA=service`` picks it with no other change. It asks
``/ping`` once for ``X-Capabilities`` and then:

- lists runs and tasks in cursor pages (bounded responses, however many
  there are) and narrows runs by tag on the server;
- records why a task failed as an ``exception`` metadatum (type and message,
  from the exception being raised), so failures can be listed without
  unpickling the ``_exception`` artifact;
- records each artifact's size and Python type (from the attempt's
  ``data.json``, already written), so artifacts can be searched by them;
- tells the service when the run's runtime exits, so a failed or interrupted
  run is final at once instead of after the heartbeat cutoff.

Against a service without these capabilities every call is the stock one.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import traceback
from typing import Any

from metaflow.metadata_provider import MetaDatum
from metaflow.metaflow_config import SERVICE_HEADERS
from metaflow.plugins.metadata_providers.service import ServiceMetadataProvider

from metaflow_stack.datastore.type_names import type_name

#: Rows per page when listing; the service's maximum.
PAGE_SIZE = 1000
#: Listings that may be large enough to page.
_PAGED = {("flow", "run"), ("step", "task")}


class StackServiceMetadataProvider(ServiceMetadataProvider):
    TYPE = "service"

    _capabilities: frozenset[str] | None = None

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        """What the service at ``METAFLOW_SERVICE_URL`` advertises (none for a stock service)."""
        if cls._capabilities is None:
            try:
                response = cls._session.get(os.path.join(cls.INFO, "ping"), headers=SERVICE_HEADERS.copy(), timeout=10)
                header = response.headers.get("X-Capabilities", "") if response.ok else ""
            except Exception:
                header = ""
            cls._capabilities = frozenset(c.strip() for c in header.split(",") if c.strip())
        return cls._capabilities

    # -- reads --------------------------------------------------------------

    @classmethod
    def _get_object_internal(cls, obj_type, obj_order, sub_type, sub_order, filters, attempt, *args):
        if (obj_type, sub_type) not in _PAGED or "pagination" not in cls.capabilities():
            return super()._get_object_internal(obj_type, obj_order, sub_type, sub_order, filters, attempt, *args)
        url = cls._obj_path(*args[:obj_order]) + f"/{sub_type}s"
        query: dict[str, str] = {"_limit": str(PAGE_SIZE)}
        if obj_type == "flow" and filters and "filters" in cls.capabilities():
            # Narrow on the server (user and system tags together); the exact test stays below.
            query["_tags:all"] = ",".join(str(v) for v in filters.values())
        found: list[dict[str, Any]] = []
        while True:
            response, _ = cls._request(None, f"{url}?{_encode(query)}", "GET", return_raw_resp=True)
            if response.status_code == 404:
                return None
            if response.status_code >= 300:
                # Let the stock path raise its usual error for anything else.
                return super()._get_object_internal(obj_type, obj_order, sub_type, sub_order, filters, attempt, *args)
            found.extend(response.json())
            cursor = response.headers.get("X-Next-Cursor")
            if not cursor:
                return cls._apply_filter(found, filters)
            query["_cursor"] = cursor

    # -- writes -------------------------------------------------------------

    def register_metadata(self, run_id, step_name, task_id, metadata):
        failing = [m for m in metadata if m.field == "attempt_ok" and m.value == "False"]
        raised = sys.exc_info()[1]
        if failing and raised is not None and "failures" in self.capabilities():
            # attempt_ok is written in a `finally` while the task's exception propagates.
            detail = {
                "type": _qualified_name(type(raised)),
                "message": str(raised)[:4000],
                "traceback": _traceback_tail(raised),
            }
            metadata = [
                *metadata,
                MetaDatum(field="exception", value=json.dumps(detail), type="exception", tags=failing[0].tags),
            ]
        super().register_metadata(run_id, step_name, task_id, metadata)

    def register_data_artifacts(self, run_id, step_name, task_id, attempt_id, artifacts):
        if "artifact-search" not in self.capabilities() or not artifacts:
            return super().register_data_artifacts(run_id, step_name, task_id, attempt_id, artifacts)
        info = _artifact_info(self, run_id, step_name, task_id, attempt_id, artifacts[0])
        url = self._obj_path(self._flow_name, run_id, step_name, task_id) + "/artifact"
        data = self._artifacts_to_json(run_id, step_name, task_id, attempt_id, artifacts)
        for row in data:
            details = info.get(row["name"], {})
            row["size"] = details.get("size")
            row["python_type"] = type_name(details.get("type"))
        self._request(self._monitor, url, "POST", data)

    def start_run_heartbeat(self, flow_id, run_id):
        super().start_run_heartbeat(flow_id, run_id)
        if "run-end" in self.capabilities():
            atexit.register(self._end_run, flow_id, run_id)

    def _end_run(self, flow_id: str, run_id: str) -> None:
        """The runtime is exiting: the run is over, whatever its ``end`` step did."""
        with contextlib.suppress(Exception):  # best effort: without it the heartbeat cutoff decides
            self._request(None, self._obj_path(flow_id, run_id) + "/heartbeat", "POST", {"ended": True})


def _encode(query: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode(query, safe=":,")


def _qualified_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _artifact_info(provider: Any, run_id, step_name, task_id, attempt_id, sample) -> dict[str, dict]:
    """Size and type of each artifact, from the attempt's ``data.json`` (no artifact is read)."""
    try:
        from metaflow.datastore import FlowDataStore
        from metaflow.plugins import DATASTORES

        storage = next(d for d in DATASTORES if sample.ds_type == d.TYPE)
        flow_datastore = FlowDataStore(
            provider._flow_name,
            provider._environment,
            event_logger=provider._event_logger,
            monitor=provider._monitor,
            storage_impl=storage,
            ds_root=sample.ds_root,
        )
        task = flow_datastore.get_task_datastore(
            run_id, step_name, task_id, attempt=attempt_id, mode="r", allow_not_done=True
        )
        return dict(task._info)
    except Exception:
        return {}  # never fail a task over search metadata


def _traceback_tail(raised: BaseException, lines: int = 20) -> list[str]:
    """The last lines of the exception's traceback, each at most 300 characters."""
    text = "".join(traceback.format_exception(raised)).rstrip("\n").splitlines()
    return [line[:300] for line in text[-lines:]]
