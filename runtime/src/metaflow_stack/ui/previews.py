"""Safe previews of artifact values: plain data only, never code.

An artifact is a pickle, and unpickling runs whatever the pickle names, so
the UI server never unpickles with the standard loader. ``plain_loads``
accepts only pickles made of plain data (numbers, strings, bytes, lists,
tuples, dicts, sets, booleans, None, dates and decimals): any other class a
pickle names is refused before it is looked up, so no constructor, reducer
or ``__setstate__`` of the artifact's code runs. Values bigger than
``MAX_PREVIEW_BYTES`` as stored are not read at all. Everything else is
described by its recorded type and size only.
"""

from __future__ import annotations

import io
import pickle
import reprlib
from typing import Any

#: Stored (compressed) size above which a value is not read for a preview.
MAX_PREVIEW_BYTES = 1024 * 1024
#: Decompressed size above which reading stops (a small blob can inflate).
MAX_PICKLE_BYTES = 8 * 1024 * 1024

#: Classes a plain-data pickle may name: constructors of values, none with side effects.
_PLAIN = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("builtins", "range"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("datetime", "datetime"),
    ("datetime", "date"),
    ("datetime", "time"),
    ("datetime", "timedelta"),
    ("datetime", "timezone"),
    ("decimal", "Decimal"),
    ("uuid", "UUID"),
}


class NotPlainData(Exception):
    """The pickle names a class outside the plain-data set."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        raise NotPlainData(f"{module}.{name}")


def plain_loads(data: bytes) -> Any:
    """The value of a plain-data pickle; ``NotPlainData`` naming the first other class it needs."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except NotPlainData:
        raise
    except Exception as exc:  # a truncated or corrupt pickle: not a value we can show
        raise NotPlainData(f"an unreadable pickle ({type(exc).__name__})") from None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 4, 400, 200, 200
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 20


def render(value: Any, limit: int = 4000) -> str:
    """A bounded repr: long containers and strings are elided with ``...``."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
