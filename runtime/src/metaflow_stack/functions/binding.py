"""Bind a function to a finished Metaflow task: ``@json_function`` and ``JsonFunction``.

Binding stores the function's module files as one blob in the task's own
datastore, records the task's artifacts by content key (nothing is copied or
unpickled), derives input and output schemas from the type hints, and
captures the environment. The result is a ``FunctionReference``.
"""

from __future__ import annotations

import datetime
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaflow_stack.functions import schema
from metaflow_stack.functions.errors import BindError

if TYPE_CHECKING:
    from metaflow import Task

    from metaflow_stack.functions.reference import ArtifactRef, CodePackageRef, FunctionReference

# pydantic-based modules (reference, environment, store) are imported where they
# are used: this module is imported with every ``import metaflow``.

#: Attribute ``@json_function`` sets on the function it marks.
MARK = "__metaflow_stack_function__"
_CODE_SUFFIXES = (".py",)


def json_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn(data, params) -> result`` as a JSON function.

    The function itself is returned unchanged (it stays importable and
    callable by its module path); binding it to a task with ``JsonFunction``
    makes it relocatable.
    """
    schema.derive(fn)  # fail at definition time on a wrong signature
    setattr(fn, MARK, "json")
    return fn


def _module_files(fn: Callable[..., Any]) -> tuple[str, dict[str, Path]]:
    """The importable module name of ``fn`` and the files that make it importable."""
    if "<locals>" in fn.__qualname__:
        raise BindError(
            f"{fn.__qualname__} is defined inside another function, so it cannot be imported elsewhere",
            fix="define it at the top level of a module",
        )
    module = inspect.getmodule(fn)
    source = inspect.getsourcefile(fn) if module is not None else None
    if module is None or source is None:
        raise BindError(f"{fn.__qualname__} has no source file; define it in a module (a .py file)")
    name = module.__name__
    if name == "__main__":
        name = Path(source).stem
    top = name.split(".")[0]
    top_module = sys.modules.get(top)
    if top != name and top_module is not None and hasattr(top_module, "__path__"):
        package = Path(next(iter(top_module.__path__)))
        files = {
            f"{top}/{path.relative_to(package).as_posix()}": path
            for path in package.rglob("*")
            if path.suffix in _CODE_SUFFIXES and "__pycache__" not in path.parts
        }
        return name, files
    return name, {f"{name}.py": Path(source)}


def _task_metadata(task: Task) -> tuple[str, str, int]:
    meta = task.metadata_dict
    try:
        return meta["ds-type"], meta["ds-root"], int(meta.get("attempt", 0))
    except KeyError as exc:
        raise BindError(f"task {task.pathspec} has no {exc.args[0]} metadata; was it run by Metaflow 2.x?") from exc


def _artifacts(task: Task, ds_type: str, ds_root: str, attempt: int) -> dict[str, ArtifactRef]:
    from metaflow.datastore import FlowDataStore
    from metaflow.plugins import DATASTORES

    from metaflow_stack.functions.reference import ArtifactRef

    flow, run, step, task_id = task.path_components
    storage = next(d for d in DATASTORES if ds_type == d.TYPE)
    task_store = FlowDataStore(flow, storage_impl=storage, ds_root=ds_root).get_task_datastore(
        run, step, task_id, attempt=attempt, mode="r"
    )
    names = [name for name, _ in task_store.items() if not name.startswith("_")]
    sizes = dict(task_store.get_artifact_sizes(names))
    info = task_store._info  # per-artifact type and encoding, as Metaflow recorded them in data.json
    return {
        name: ArtifactRef(
            key=key,
            size=sizes.get(name),
            type=info.get(name, {}).get("type"),
            encoding=info.get(name, {}).get("encoding", "pickle-v2"),
        )
        for name, key in task_store.items()
        if name in names
    }


def _code_package(task: Task) -> CodePackageRef | None:
    from metaflow_stack.functions.reference import CodePackageRef

    raw = task.metadata_dict.get("code-package")
    if not raw:
        return None
    sha = json.loads(raw).get("sha")
    return CodePackageRef(key=sha, sha=sha) if sha else None


def bind(
    fn: Callable[..., Any], task: Task | str, *, codec: str = "json", name: str | None = None
) -> FunctionReference:
    """A reference for ``fn`` bound to ``task``."""
    from metaflow import Task as ClientTask
    from metaflow.metaflow_version import get_version

    from metaflow_stack.functions import environment
    from metaflow_stack.functions.reference import BlobStoreRef, CodeRef, FunctionReference, TaskRef
    from metaflow_stack.functions.store import BlobStore, pack_files

    if isinstance(task, str):
        task = ClientTask(task)
    # Metaflow records each attempt's outcome as metadata: no artifact is unpickled to check it.
    if task.metadata_dict.get("attempt_ok") != "True":
        raise BindError(
            f"task {task.pathspec} did not finish successfully",
            fix="bind to a task whose run succeeded (task.successful is True)",
        )
    input_schema, output_schema = schema.derive(fn)
    ds_type, ds_root, attempt = _task_metadata(task)
    flow = task.path_components[0]
    store = BlobStoreRef(type=ds_type, root=ds_root, prefix=f"{flow}/data")
    module, files = _module_files(fn)
    (archive_key,) = BlobStore.of(store).save([pack_files(files)])
    return FunctionReference(
        name=name or fn.__name__,
        function=CodeRef(module=module, qualname=fn.__qualname__, archive=archive_key, files=sorted(files)),
        task=TaskRef(
            pathspec=task.pathspec,
            attempt=attempt,
            store=store,
            artifacts=_artifacts(task, ds_type, ds_root, attempt),
            code_package=_code_package(task),
        ),
        environment=environment.from_task(task) or environment.capture(),
        store=store,
        input_schema=input_schema,
        output_schema=output_schema,
        codec=codec,
        metaflow_version=get_version(),
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


class JsonFunction:
    """A JSON function bound to the artifacts of a Metaflow task.

    ``JsonFunction(predict, task=Task("Flow/run/step/id")).reference`` is a
    JSON document that ``function_from_json`` loads anywhere.
    """

    def __init__(self, fn: Callable[..., Any], task: Task | str, *, codec: str = "json", name: str | None = None):
        self._fn = fn
        self._task = task
        self._codec = codec
        self._name = name
        self._bound: FunctionReference | None = None

    @property
    def bound(self) -> FunctionReference:
        """The reference as a model (bound on first access)."""
        if self._bound is None:
            self._bound = bind(self._fn, self._task, codec=self._codec, name=self._name)
        return self._bound

    @property
    def reference(self) -> str:
        """The reference as JSON."""
        return self.bound.to_json()

    def export(self, destination: str, *, include_artifacts: bool = True) -> str:
        """Write a self-contained bundle to a directory or ``s3://`` URL; return its location."""
        from metaflow_stack.functions.bundle import export

        return export(self.bound, destination, include_artifacts=include_artifacts)
