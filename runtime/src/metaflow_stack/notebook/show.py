"""A run's values in a notebook: found by name, loaded only when asked for, shown bounded.

Whatever the value, what reaches the front end is bounded: a DataFrame is
one page of rows (its shape said, the next page one option away), an array
numpy's own summary, a figure or an image one picture no larger than
``MAX_IMAGE_SIDE``, a model its ``repr`` and parameters, a dict or a list a
collapsible tree cut at ``MAX_ITEMS`` per level and ``MAX_DEPTH`` levels,
anything else its ``repr`` cut at ``MAX_REPR`` characters with its full
length said. A stored value bigger than ``MAX_LOAD_BYTES`` is not even
loaded unless asked (``--full``). Types are recognised by their class
names, so no library is imported to show a value that does not need it.

Values load through Metaflow's Client, which unpickles them in this
kernel, as ``Task(...)[name].data`` would: only for runs whose code you
would run. Cards are shown in a sandboxed frame (scripts, no access to the
notebook's origin).
"""

from __future__ import annotations

import array
import base64
import collections
import dataclasses
import html
import io
import itertools
import json
import math
import sys
import types
from collections.abc import ItemsView, KeysView, ValuesView
from typing import Any

from IPython.core.error import UsageError

from metaflow_stack.datastore.previews import render

MAX_REPR = 10_000
#: Rows of a DataFrame on one page.
PAGE_ROWS = 50
#: Items of a dict or list (per level), levels of nesting, and items in all, in the tree view.
MAX_ITEMS, MAX_DEPTH, MAX_NODES = 50, 6, 2_000
#: Columns of a DataFrame shown at most; items at each end of an array's axes.
MAX_COLUMNS, EDGE = 50, 4
#: Longest side of a displayed image or figure, in pixels.
MAX_IMAGE_SIDE = 1600
#: Image files (bytes artifacts) shown as pictures up to this size.
MAX_IMAGE_BYTES = 8 * 1024 * 1024
#: Size as Metaflow records it (the pickle's length) above which a value is loaded only with ``--full``.
MAX_LOAD_BYTES = 256 * 1024 * 1024
#: Parameters of a model listed at most.
MAX_PARAMETERS = 50
#: Characters of one table cell.
MAX_CELL = 200
#: Levels of a value written from its fields (a dataclass in a dataclass) before one is shown as ``Name(...)``.
MAX_FIELD_DEPTH = 3


class Shown:
    """A value as displayed: a MIME bundle (IPython asks ``_repr_mimebundle_``), ``text/plain`` always in it."""

    def __init__(self, bundle: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.bundle = bundle
        self.metadata = metadata or {}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.bundle, self.metadata

    def __repr__(self) -> str:
        return self.bundle["text/plain"]


def find(run: Any, name: str) -> Any:
    """``name``'s artifact (Metaflow's ``DataArtifact``) in ``run``: from the last step that has it."""
    for step in run:
        for task in step:
            if name in task:
                return task[name]
    raise UsageError(f"no step of {run.pathspec} has an artifact {name!r}")


def task_of(pathspec: str) -> Any:
    """The task ``pathspec`` (Flow/run/step/task), whatever the kernel's namespace."""
    from metaflow import Task
    from metaflow.exception import MetaflowInvalidPathspec, MetaflowNotFound

    try:
        return Task(pathspec, _namespace_check=False)
    except (MetaflowNotFound, MetaflowInvalidPathspec):
        raise UsageError(f"no task {pathspec} (a task is Flow/run/step/task)") from None


def task_artifact(pathspec: str, name: str) -> Any:
    """``name``'s artifact in the task ``pathspec``."""
    task = task_of(pathspec)
    if name not in task:
        raise UsageError(f"{pathspec} has no artifact {name!r}")
    return task[name]


def artifact(found: Any, name: str, how: str, page: int = 1, full: bool = False) -> Shown:
    """A stored artifact shown: loaded unless it is bigger than ``MAX_LOAD_BYTES`` and ``full`` is not set
    (``how``: the words of the magic that shows it, to name the options that load it or page it)."""
    size = getattr(found, "size", None)
    if isinstance(size, int) and size > MAX_LOAD_BYTES and not full:
        text = f"{name}: {_bytes(size)} stored, not loaded (fix: %mf_show {how} --full loads it)"
        return Shown({"text/plain": text, "text/html": f"<p>{html.escape(text)}</p>"})
    data = found.data
    shown = value(data, name, page, how)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and "matplotlib.Figure" in kinds(data):
        pyplot.close(data)  # an unpickled figure joins pyplot's, and the inline backend would draw it again
    return shown


def value(data: Any, name: str, page: int = 1, how: str | None = None) -> Shown:
    """What to display for ``data``, bounded; ``page`` picks a DataFrame's page of rows (``how``: the words
    that show it again, for the next page's hint)."""
    names = kinds(data)
    for kind, renderer in _BY_TYPE:
        if kind in names:
            return renderer(data, name, page, how or name)
    if isinstance(data, bytes | bytearray) and _image_type(data):
        return _image_bytes(bytes(data), name)
    if isinstance(data, bytes | bytearray | memoryview):  # cut before anything is copied
        return Shown({"text/plain": f"{name}: {_bytes(len(data))}\n{_cut(repr(bytes(data[: MAX_REPR // 4])))}"})
    if not isinstance(data, type) and _has(data, "named_parameters", "state_dict"):
        return _torch_module(data, name)
    if not isinstance(data, type) and _has(data, "get_params", "fit"):
        return _estimator(data, name)
    if _is_model_dump(data):
        return _tree(_dumped(data), name)
    if isinstance(data, dict | list | tuple | set | frozenset):
        return _tree(data, name)
    if isinstance(data, str):  # its text, cut (nothing copied but the part shown)
        return Shown({"text/plain": _cut(data)})
    if isinstance(data, int | collections.deque | array.array | KeysView | ValuesView | ItemsView):
        return Shown({"text/plain": render(data, MAX_REPR)})  # bounded by reprlib, never copied whole
    if _fields(data) is not None:
        return Shown({"text/plain": _text(data, MAX_REPR)})
    return Shown({"text/plain": _cut(repr(data))})  # its class's own repr: what it says of itself


def _has(data: Any, *methods: str) -> bool:
    return all(callable(getattr(data, method, None)) for method in methods)


def cards(task: Any) -> Shown:
    """The task's Metaflow cards, each in a sandboxed frame (its scripts run, away from the notebook)."""
    from metaflow.cards import get_cards

    found = list(get_cards(task))
    if not found:
        raise UsageError(f"{task.pathspec} has no cards (fix: add @card to its step)")
    frames = []
    for card in found:
        label = html.escape(f"{card.type} card" + (f" {card.id}" if card.id else ""))
        frames.append(f"<p><b>{label}</b> of {html.escape(task.pathspec)}</p>{_card_frame(task, card)}")
    return Shown({"text/plain": f"{len(found)} card(s) of {task.pathspec}", "text/html": "".join(frames)})


def _card_frame(task: Any, card: Any) -> str:
    """The card's page in a sandboxed frame, read as the UI reads it (``datastore.cards``: at most
    ``MAX_CARD_BYTES``) from the datastore the task ran on (a cloned task's: its origin's), under the UI's
    policy (its own inline scripts and styles, inline images; no network); why not, when it cannot be read."""
    from metaflow_stack.datastore.blobs import Blobs
    from metaflow_stack.datastore.cards import CARD_POLICY, Cards
    from metaflow_stack.errors import StackError

    owner = task_of(card.origin_pathspec) if card.origin_pathspec else task
    root = owner.metadata_dict.get("ds-root")
    try:
        body = Cards(Blobs((root,) if root else ())).read(*owner.pathspec.split("/"), card.path.rsplit("/", 1)[-1])
    except StackError as exc:
        return f"<p>(not shown: {html.escape(exc.message)})</p>"
    policy = "; ".join(part for part in CARD_POLICY.split("; ") if not part.startswith("sandbox"))  # (a header's)
    page = f'<meta http-equiv="Content-Security-Policy" content="{policy}">' + body.decode("utf-8", errors="replace")
    return (
        '<iframe sandbox="allow-scripts" style="width:100%;height:600px;border:1px solid #ccc" '
        f'srcdoc="{html.escape(page, quote=True)}"></iframe>'
    )


def kinds(data: Any) -> set[str]:
    """``package.Class`` of each of ``data``'s classes (its MRO): types told apart without importing their
    library (by top-level package, as libraries move classes between their modules)."""
    return {f"{cls.__module__.partition('.')[0]}.{cls.__qualname__}" for cls in type(data).__mro__}


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REPR else f"{text[:MAX_REPR]}\n... ({len(text):,} characters in all)"


def _bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    return ""


def _fields(data: Any) -> list[tuple[str, Any]] | None:
    """The fields a value's repr is written from, when its class writes it so (a ``SimpleNamespace``, a
    dataclass); None for any other value."""
    if isinstance(data, types.SimpleNamespace):
        return list(vars(data).items())
    if dataclasses.is_dataclass(data) and not isinstance(data, type) and data.__dataclass_params__.repr:
        return [(field.name, getattr(data, field.name, None)) for field in dataclasses.fields(data) if field.repr]
    return None


def _text(data: Any, limit: int, depth: int = 0) -> str:
    """``data`` as text of at most ``limit`` characters, made without writing it whole: the bounded renderer,
    and a value written from its fields by the same renderer field by field (their built-in repr writes each
    shared, nested value in full: an 857-byte pickle took 6 s and 600 MiB), until ``limit`` is reached."""
    fields = _fields(data)
    if fields is None:
        return render(data, limit)
    if depth >= MAX_FIELD_DEPTH:
        return f"{type(data).__qualname__}(...)"
    text = f"{type(data).__qualname__}("
    for index, (key, item) in enumerate(fields):
        if len(text) >= limit:
            break
        text += f"{', ' if index else ''}{key}={_text(item, MAX_CELL, depth + 1)}"
    text += ")"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(key: Any) -> str:
    """A dict key or a column name as a label: text as it is, anything else rendered; both cut."""
    return key[:MAX_CELL] if isinstance(key, str) else _text(key, MAX_CELL)


def _cell(item: Any) -> str:
    return html.escape(_text(item, MAX_CELL))


def _table(
    name: str, how: str, title: str, columns: list[Any], rows: list[tuple], total: int, page: int, index: int = 0
) -> Shown:
    """A page of rows as an HTML table, with where it is in the whole and how to see the next page (``how``:
    the words that show it again); the first ``MAX_COLUMNS`` columns (``index`` of them the row labels)."""
    pages = max(1, math.ceil(total / PAGE_ROWS))
    first = (page - 1) * PAGE_ROWS
    where = f"rows {first + 1:,}-{first + len(rows):,} of {total:,}, page {page:,} of {pages:,}" if rows else ""
    if len(columns) > MAX_COLUMNS:
        where += f", the first {MAX_COLUMNS - index} of {len(columns) - index:,} columns"
        columns, rows = columns[:MAX_COLUMNS], [row[:MAX_COLUMNS] for row in rows]
    more = f"; next: %mf_show {how} --page {page + 1}" if page < pages else ""
    head = "".join(f"<th>{html.escape(_label(column))}</th>" for column in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(item)}</td>" for item in row) + "</tr>" for row in rows)
    caption = f"{name}: {title}" + (f" ({where}{more})" if where else " (no rows on this page)")
    text = caption + "\n" + "\n".join("  ".join(_text(item, 40) for item in row) for row in rows[:10])
    return Shown(
        {
            "text/plain": text,
            "text/html": f"<p><b>{html.escape(name)}</b>: {html.escape(title)}"
            f"{html.escape(f' ({where}{more})' if where else ' (no rows on this page)')}</p>"
            f'<table class="dataframe"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>',
        }
    )


def _page_bounds(total: int, page: int) -> tuple[int, int]:
    start = (max(page, 1) - 1) * PAGE_ROWS
    return min(start, total), min(start + PAGE_ROWS, total)


def _pandas(data: Any, name: str, page: int, how: str) -> Shown:
    frame = data.to_frame() if data.ndim == 1 else data
    start, stop = _page_bounds(len(frame), page)
    window = frame.iloc[start:stop, :MAX_COLUMNS]
    columns = [frame.index.name or "", *frame.columns]  # (labelled by the table: only those it shows)
    rows = [tuple(row) for row in window.itertuples(index=True, name=None)]
    title = f"{type(data).__name__}, {' x '.join(f'{n:,}' for n in data.shape)}"
    return _table(name, how, title, columns, rows, len(frame), page, index=1)


def _polars(data: Any, name: str, page: int, how: str) -> Shown:
    frame = data.to_frame() if type(data).__name__ == "Series" else data
    start, stop = _page_bounds(frame.height, page)
    rows = frame.select(frame.columns[:MAX_COLUMNS]).slice(start, stop - start).rows()
    title = f"polars {type(data).__name__}, {' x '.join(f'{n:,}' for n in frame.shape)}"
    return _table(name, how, title, list(frame.columns), rows, frame.height, page)


def _numpy(data: Any, name: str, page: int, how: str) -> Shown:
    import numpy

    title = f"{name}: ndarray {data.dtype} {tuple(data.shape)}, {_bytes(data.nbytes)}"
    # numpy summarises an axis only when it is longer than twice the corner: many short axes would print
    # whole, so such an array is shown by its first corner
    printed = math.prod(2 * EDGE if n > 2 * EDGE else n for n in data.shape) if data.size > 200 else data.size
    if printed > 10_000:
        side = max(1, math.floor(1_000 ** (1 / data.ndim)))  # a corner of at most 1,000 items
        data = data[tuple(slice(0, side) for _ in data.shape)]
        title += f", its first {side} along each axis"
    # and numpy summarises counts, not characters: wide rows or long strings are cut too
    # an object array's items by the bounded renderer (numpy writes each one's repr whole)
    bounded = {"object": lambda item: _text(item, MAX_CELL)}
    body = _cut(numpy.array2string(data, threshold=200, edgeitems=EDGE, max_line_width=120, formatter=bounded))
    page_html = f"<p><b>{html.escape(title)}</b></p><pre>{html.escape(body)}</pre>"
    return Shown({"text/plain": f"{title}\n{body}", "text/html": page_html})


def _png(png: bytes, title: str, mime: str = "image/png") -> Shown:
    return Shown({"text/plain": title, mime: base64.b64encode(png).decode()})


def _matplotlib(data: Any, name: str, page: int, how: str) -> Shown:
    width, height = data.get_size_inches()
    dpi = min(float(data.dpi), MAX_IMAGE_SIDE / max(width, height, 1e-6))
    buffer = io.BytesIO()
    data.savefig(buffer, format="png", dpi=dpi)
    return _png(buffer.getvalue(), f"{name}: matplotlib figure, {width:g} x {height:g} in")


def _plotly(data: Any, name: str, page: int, how: str) -> Shown:
    """Plotly's own MIME type (JupyterLab, Notebook 7 and VS Code draw it), and HTML loading plotly.js from its
    CDN for nbconvert; a figure whose JSON passes ``MAX_IMAGE_BYTES`` is described, not sent."""
    import plotly.io

    title = f"{name}: plotly figure, {len(data.data)} trace(s)"
    spec = plotly.io.to_json(data, validate=False)
    if len(spec) > MAX_IMAGE_BYTES:
        return Shown({"text/plain": f"{title}, {_bytes(len(spec))} of JSON (not shown: larger than the limit)"})
    page_html = plotly.io.to_html(data, include_plotlyjs="cdn", full_html=False, validate=False)
    return Shown({"text/plain": title, "application/vnd.plotly.v1+json": json.loads(spec), "text/html": page_html})


def _pil(data: Any, name: str, page: int, how: str) -> Shown:
    title = f"{name}: image {data.width} x {data.height} ({data.mode})"
    scale = MAX_IMAGE_SIDE / max(data.width, data.height, 1)
    picture = (
        data.resize((max(1, round(data.width * scale)), max(1, round(data.height * scale)))) if scale < 1 else data
    )
    if picture.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        picture = picture.convert("RGBA")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return _png(buffer.getvalue(), title)


_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def _image_type(data: bytes | bytearray) -> str | None:
    return next((mime for magic, mime in _MAGIC.items() if data.startswith(magic)), None)


def _image_bytes(data: bytes, name: str) -> Shown:
    mime = _image_type(data) or "image/png"
    title = f"{name}: {mime.split('/')[1].upper()} file, {_bytes(len(data))}"
    if len(data) > MAX_IMAGE_BYTES:
        return Shown({"text/plain": f"{title} (not shown: larger than {_bytes(MAX_IMAGE_BYTES)})"})
    return _png(data, title, mime)


def _parameters_table(title: str, text: str, rows: list[tuple[str, ...]], columns: tuple[str, ...], more: int) -> Shown:
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    cells = ("".join(f"<td><code>{html.escape(cell)}</code></td>" for cell in row) for row in rows)
    body = "".join(f"<tr>{row}</tr>" for row in cells)
    tail = f"<p>... and {more:,} more</p>" if more else ""
    listed = "\n".join("  ".join(row) for row in rows) + (f"\n... and {more:,} more" if more else "")
    return Shown(
        {
            "text/plain": f"{title}\n{text}\n{listed}",
            "text/html": f"<p><b>{html.escape(title)}</b></p><pre>{html.escape(text)}</pre>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{tail}",
        }
    )


def _estimator(data: Any, name: str) -> Shown:
    """A scikit-learn-style model: its ``repr``, its parameters, and what fitting learnt (names ending in _)."""
    params = sorted(data.get_params(deep=False).items())
    rows = [(key, _text(param, MAX_CELL)) for key, param in params[:MAX_PARAMETERS]]
    learnt = sorted(key for key in getattr(data, "__dict__", {}) if key.endswith("_") and not key.startswith("_"))
    fitted = f"fitted: {', '.join(learnt[:MAX_PARAMETERS])}" if learnt else "not fitted"
    title = f"{name}: {type(data).__module__.split('.')[0]} {type(data).__name__} ({fitted})"
    return _parameters_table(title, _cut(repr(data)), rows, ("parameter", "value"), len(params) - len(rows))


def _torch_module(data: Any, name: str) -> Shown:
    """A PyTorch module: its structure (``repr``), its parameter count and each parameter's shape."""
    named = list(data.named_parameters())
    count = sum(int(param.numel()) for _, param in named)
    rows = [
        (key, str(tuple(param.shape)), str(param.dtype).removeprefix("torch."), str(bool(param.requires_grad)))
        for key, param in named[:MAX_PARAMETERS]
    ]
    text = _cut(repr(data))
    title = f"{name}: torch {type(data).__name__}, {count:,} parameters"
    return _parameters_table(title, text, rows, ("parameter", "shape", "dtype", "trained"), len(named) - len(rows))


def _is_model_dump(data: Any) -> bool:
    return callable(getattr(data, "model_dump", None)) and "pydantic.BaseModel" in kinds(data)


def _bounded(data: Any, budget: list[int], depth: int = 0) -> Any:
    """A JSON value of ``data``: ``MAX_ITEMS`` per level, ``MAX_DEPTH`` levels, ``MAX_NODES`` in all (a small
    value can hold one list many times over); what is left out is counted in place."""
    budget[0] -= 1
    if isinstance(data, str):
        return data if len(data) <= MAX_CELL else f"{data[:MAX_CELL]}... ({len(data):,} characters)"
    if isinstance(data, int) and not isinstance(data, bool) and data.bit_length() > 64:
        return render(data, MAX_CELL)  # JSON readers lose precision past 64 bits; a huge one is described
    if isinstance(data, float) and not math.isfinite(data):
        return repr(data)
    if isinstance(data, bool | int | float) or data is None:
        return data
    if depth >= MAX_DEPTH or budget[0] <= 0:
        return f"({type(data).__name__}, not expanded)"
    if isinstance(data, dict):
        items = itertools.islice(data.items(), MAX_ITEMS)
        shown = {_label(key): _bounded(item, budget, depth + 1) for key, item in items}
        if len(data) > MAX_ITEMS:
            shown["..."] = f"{len(data) - MAX_ITEMS:,} more"
        return shown
    if isinstance(data, list | tuple | set | frozenset):
        # A small set of text or numbers in order, as written (anything else in the set's own order: ordering
        # it would render every item, and a render costs up to a fifth of a second)
        plain = isinstance(data, set | frozenset) and len(data) <= MAX_ITEMS
        plain = plain and all(isinstance(item, str | int | float) for item in data)
        ordered = sorted(data, key=_label) if plain else data
        shown_list = [_bounded(item, budget, depth + 1) for item in itertools.islice(ordered, MAX_ITEMS)]
        if len(data) > MAX_ITEMS:
            shown_list.append(f"... {len(data) - MAX_ITEMS:,} more")
        return shown_list
    if _is_model_dump(data):
        return _bounded(_dumped(data), budget, depth)
    return _text(data, MAX_CELL)


def _dumped(data: Any) -> Any:
    """A pydantic model as JSON data (its ``repr`` when a field will not serialise)."""
    try:
        return data.model_dump(mode="json")
    except Exception:  # a field type pydantic cannot write as JSON
        return _text(data, MAX_CELL)


def _details(data: Any, label: str, open_: bool = False) -> str:
    """The bounded JSON value as nested ``<details>`` (for front ends without a JSON viewer, and nbconvert)."""
    if isinstance(data, dict | list):
        items = data.items() if isinstance(data, dict) else enumerate(data)
        inner = "".join(f"<li>{_details(item, str(key))}</li>" for key, item in items)
        kind = f"{{{len(data)}}}" if isinstance(data, dict) else f"[{len(data)}]"
        opened = " open" if open_ else ""
        return (
            f"<details{opened}><summary>{html.escape(label)} {kind}</summary>"
            f'<ul style="list-style:none">{inner}</ul></details>'
        )
    return f"{html.escape(label)}: <code>{html.escape(json.dumps(data))}</code>"


def _tree(data: Any, name: str) -> Shown:
    shown = _bounded(data, [MAX_NODES])
    text = _cut(json.dumps(shown, indent=1))
    return Shown(
        {"text/plain": text, "application/json": shown, "text/html": _details(shown, name, open_=True)},
        {"application/json": {"expanded": False, "root": name}},
    )


#: Renderers by the package and name of a class in the value's MRO (nothing imported to find out).
_BY_TYPE = [
    ("pandas.DataFrame", _pandas),
    ("pandas.Series", _pandas),
    ("polars.DataFrame", _polars),
    ("polars.Series", _polars),
    ("numpy.ndarray", _numpy),
    ("matplotlib.Figure", _matplotlib),
    ("plotly.BaseFigure", _plotly),
    ("PIL.Image", _pil),
]
