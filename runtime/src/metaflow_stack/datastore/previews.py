"""Safe previews of artifact values: plain data only, never code.

An artifact is a pickle, and unpickling runs whatever the pickle names, so
the UI server never unpickles with the standard loader. ``plain_loads``
accepts only pickles made of plain data (numbers, strings, bytes, lists,
tuples, dicts, sets, booleans, None, dates and decimals): any other class a
pickle names is refused before it is looked up, so no constructor, reducer
or ``__setstate__`` of the artifact's code runs. Values bigger than
``MAX_PREVIEW_BYTES`` as stored are not read at all. Everything else is
described by its recorded type and size only.

Plain classes can still be asked to allocate: ``bytearray(10**9)`` is a
29-byte pickle. So the constructors a pickle reaches are wrapped to build
only from values the pickle itself holds (a ``bytearray`` from bytes, never
from a count), and an integer is shown by its size once its digits would
pass ``MAX_INT_DIGITS`` (Python refuses to print it at all past 4,300).
Reading is bounded too: most opcodes are one byte, so 8 MiB of pickle (a
few KB of gzip) is millions of them, and ``plain_loads`` stops at
``MAX_PICKLE_OPS`` opcodes or ``MAX_PICKLE_MEMO`` memoized values.
"""

from __future__ import annotations

import collections
import io
import pickle
import reprlib
import types
from collections.abc import Callable
from typing import Any

#: Stored (compressed) size above which a value is not read for a preview.
MAX_PREVIEW_BYTES = 1024 * 1024
#: Decompressed size above which reading stops (a small blob can inflate).
MAX_PICKLE_BYTES = 8 * 1024 * 1024

#: Classes a plain-data pickle may name: constructors of values, none with side effects.
_PLAIN = {
    ("builtins", "complex"),
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


def _bytearray(source: bytes | str = b"", encoding: str = "latin-1") -> bytearray:
    """``bytearray`` as pickles of protocols 0-4 rebuild it (from its bytes or latin-1 text), never
    ``bytearray(n)``, nor through a codec that is slow by design (``punycode`` is quadratic)."""
    if isinstance(source, str):
        return bytearray(_latin1(source, encoding))
    if isinstance(source, bytes | bytearray):
        return bytearray(source)
    raise NotPlainData(f"bytearray from a {type(source).__name__}")


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocols 0-2 rebuild ``bytes`` with it: latin-1 text, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise NotPlainData(f"_codecs.encode to {encoding!r}")
    return text.encode("latin-1")


def _items_of(kind: type[set] | type[frozenset]) -> Any:
    """``set``/``frozenset`` as protocols 0-3 rebuild them, from the list the pickle holds: never from a
    ``range`` (``set(range(10**10))`` would allocate without end)."""

    def build(items: list | tuple = ()) -> set | frozenset:
        if not isinstance(items, list | tuple):
            raise NotPlainData(f"{kind.__name__} from a {type(items).__name__}")
        return kind(items)

    return build


#: Constructors a pickle may reach only through a guard.
_GUARDED = {
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "set"): _items_of(set),
    ("builtins", "frozenset"): _items_of(frozenset),
    ("_codecs", "encode"): _latin1,
}


class PlainUnpickler(pickle._Unpickler):
    """An unpickler of plain data only (subclasses admit more in ``find_class``).

    The pure-Python unpickler: its memo is a dict (the C one grows an array to the largest memo index a
    pickle names, so seven bytes, LONG_BINPUT 2**32-1, would ask for tens of GiB), and its opcodes can be
    guarded: ``BUILD`` sets state on an instance only, never on a class, function or module (a pickle that
    pushes a class it may name and then "builds" it would rewrite that class for the whole process)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocols 0-2 name Python 2's module
        if (module, name) in _GUARDED:
            return _GUARDED[module, name]
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        raise NotPlainData(f"{module}.{name}")

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) > 1 else None  # the state is on top, what it is set on below
        if isinstance(target, type | types.FunctionType | types.BuiltinFunctionType | types.ModuleType):
            raise NotPlainData(f"state set on {getattr(target, '__name__', 'a class')} itself")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


#: Opcodes and memo entries a preview reads at most: 8 million one-byte ``MEMOIZE`` opcodes (an 8 KiB gzip
#: blob) took 3 s and 685 MB to read, 500,000 memo entries about 43 MB. What a preview's megabyte of pickle
#: holds is within both: a list of 600,000 numbers (600,000 opcodes), a dict of 150,000 short strings to
#: strings (Metaflow's protocol 4 memoizes every string: 300,000 memo entries).
MAX_PICKLE_OPS = 2_000_000
MAX_PICKLE_MEMO = 500_000


def _budgeted(handler: Callable[[Any], None]) -> Callable[[_BudgetedUnpickler], None]:
    """``handler``, run only while the unpickler is within its budget."""

    def step(self: _BudgetedUnpickler) -> None:
        self.ops += 1
        if self.ops > MAX_PICKLE_OPS:
            raise NotPlainData(f"more than {MAX_PICKLE_OPS:,} pickle opcodes")
        if len(self.memo) > MAX_PICKLE_MEMO:
            raise NotPlainData(f"more than {MAX_PICKLE_MEMO:,} memoized values")
        handler(self)

    return step


def _sized(handler: Callable[[Any], None]) -> Callable[[_BudgetedUnpickler], None]:
    """``handler``, which makes a tuple, then the tuple's size counted as its hash walks it (every item, a
    tuple shared twice counted twice: Python caches no tuple's hash), refused past ``MAX_PICKLE_OPS``: forty
    tuples each holding the one before twice are 150 bytes of pickle, and as a dict's key (or a set's item)
    hashing it once visits 2**40 tuples, in one C call no opcode budget interrupts. Each hash is charged
    (``_hashing``), so many keys each under the bound are bounded too."""

    def step(self: _BudgetedUnpickler) -> None:
        handler(self)
        made = self.stack[-1]
        size = 1 + sum(self.sizes.get(id(item), 1) if type(item) is tuple else 1 for item in made)
        if size > MAX_PICKLE_OPS:
            raise NotPlainData(f"a tuple of more than {MAX_PICKLE_OPS:,} values, shared ones counted each time")
        self.sizes[id(made)] = size
        self.made.append(made)  # (alive while its id is a key: an id is reused only once its object is gone)

    return step


#: What a preview's keys may cost to hash, all together, in values visited (``_sized``): a dict of 100,000 keys
#: each a tuple of 2,000,000 values (one shared tuple and a number) is a few MB of pickle and would take hours.
MAX_HASHED = 4 * MAX_PICKLE_OPS


def _hashing(keys: Callable[[Any], Any]) -> Callable[[Callable[[Any], None]], Callable[[_BudgetedUnpickler], None]]:
    """A handler that hashes the values ``keys`` finds on the unpickler's stack (a dict's keys, a set's items),
    charged to ``MAX_HASHED`` before it runs."""

    def wrap(handler: Callable[[Any], None]) -> Callable[[_BudgetedUnpickler], None]:
        def step(self: _BudgetedUnpickler) -> None:
            self.hashed += sum(self.sizes.get(id(key), 1) if type(key) is tuple else 1 for key in keys(self))
            if self.hashed > MAX_HASHED:
                raise NotPlainData(f"keys that take more than {MAX_HASHED:,} values to hash")
            handler(self)

        return step

    return wrap


def _reduced_items(self: _BudgetedUnpickler) -> Any:
    """The items a ``REDUCE`` of ``set``/``frozenset`` (protocols 0-3) hashes; none for another call."""
    func, args = self.stack[-2], self.stack[-1]
    builds = func in (_GUARDED["builtins", "set"], _GUARDED["builtins", "frozenset"])
    return args[0] if builds and isinstance(args, tuple) and args and isinstance(args[0], list | tuple) else ()


#: The opcodes that make a tuple from what the pickle holds, and those that hash values (and where those are).
_TUPLES = (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)
_HASHING = {
    pickle.DICT: lambda self: self.stack[0::2],  # (the items since the mark: key, value, ...)
    pickle.SETITEMS: lambda self: self.stack[0::2],
    pickle.SETITEM: lambda self: self.stack[-2:-1],
    pickle.ADDITEMS: lambda self: self.stack,
    pickle.FROZENSET: lambda self: self.stack,
    pickle.REDUCE: _reduced_items,
}


def _budgeted_dispatch(plain: dict[int, Callable[[Any], None]]) -> dict[int, Callable[[Any], None]]:
    """``plain``'s handlers, each within the opcode budget, those making tuples sized, those hashing charged."""
    table = dict(plain)
    table.update({code[0]: _sized(table[code[0]]) for code in _TUPLES})
    table.update({code[0]: _hashing(keys)(table[code[0]]) for code, keys in _HASHING.items()})
    return {code: _budgeted(handler) for code, handler in table.items()}


class _BudgetedUnpickler(PlainUnpickler):
    """The plain-data unpickler, stopped at ``MAX_PICKLE_OPS`` opcodes or ``MAX_PICKLE_MEMO`` memo entries, at
    a tuple that size or at keys that cost ``MAX_HASHED`` to hash (``_sized``): what a preview needs, not what
    an enclave reading a step's whole inputs does."""

    dispatch = _budgeted_dispatch(PlainUnpickler.dispatch)

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.ops = self.hashed = 0
        self.sizes: dict[int, int] = {}
        self.made: list[tuple] = []


def plain_loads(data: bytes) -> Any:
    """The value of a plain-data pickle, within a preview's budget; ``NotPlainData`` naming the first other
    class it needs, or the budget it is past."""
    try:
        return _BudgetedUnpickler(data).load()
    except NotPlainData:
        raise
    except Exception as exc:  # a truncated or corrupt pickle: not a value we can show
        raise NotPlainData(f"an unreadable pickle ({type(exc).__name__})") from None


#: Digits an integer is shown with at most; a longer one is described by its size.
MAX_INT_DIGITS = 200


class _BoundedRepr(reprlib.Repr):
    """``reprlib`` bounds the containers it knows; every plain type that can hold others is bounded here
    too (otherwise it falls back to the built-in ``repr``, unbounded on shared, nested references)."""

    def repr_int(self, x: int, level: int) -> str:
        # Counting bits, not digits: converting a huge int to text is the slow part.
        if x.bit_length() > MAX_INT_DIGITS * 3.33:
            return f"<int of {x.bit_length():,} bits>"
        return super().repr_int(x, level)

    def repr_OrderedDict(self, x: Any, level: int) -> str:
        return f"OrderedDict({self.repr_dict(dict(x), level)})"

    def repr_slice(self, x: slice, level: int) -> str:
        parts = ", ".join(self.repr1(part, level - 1) for part in (x.start, x.stop, x.step))
        return f"slice({parts})"


_REPR = _BoundedRepr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 4, 400, 200, 200
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 20


#: A value rendered whole (opened on demand): characters and values visited at most.
MAX_FULL_CHARS = 4_000_000
MAX_FULL_NODES = 400_000


class _Spent(Exception):
    """The whole value is beyond the budget (shared references can make a small pickle render huge)."""


class _FullRepr(_BoundedRepr):
    """Every item, up to a budget of values visited and characters made, checked before each value: the
    work stops at the budget, whatever the value's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 50, MAX_FULL_CHARS, 10_000, 10_000
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = 1_000_000
        self.nodes = self.chars = 0

    def repr1(self, x: Any, level: int) -> str:
        self.nodes += 1
        if self.nodes > MAX_FULL_NODES or self.chars > MAX_FULL_CHARS:
            raise _Spent
        text = super().repr1(x, level)
        self.chars += len(text)
        return text


class _Budgeted(_BoundedRepr):
    """The bounded repr, given up once its leaves (what holds no other value) have made ``budget``
    characters: 20 items a level, four levels deep, of 400-character strings is 64 MB made to show 4,000
    (0.6 s a preview). A container's text is its leaves' joined, so the work is bounded by the budget times
    the depth, and an ordinary nested value (a config of dicts) is shown as deep as before."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        for name in ("maxlevel", "maxstring", "maxother", "maxlong", "maxdict", "maxlist", "maxtuple", "maxset"):
            setattr(self, name, getattr(_REPR, name))
        self.maxfrozenset = self.maxdeque = _REPR.maxdeque
        self.left = budget

    def repr1(self, x: Any, level: int) -> str:
        text = super().repr1(x, level)
        if not isinstance(x, _CONTAINERS):
            self.left -= len(text)
            if self.left < 0:
                raise _Spent
        return text


#: The values whose text is their items' (what ``_Budgeted`` does not count again).
_CONTAINERS = (list, tuple, dict, set, frozenset, collections.deque, collections.OrderedDict, slice)


#: What a preview whose bounded repr is past its budget shows: fewer levels, items and characters, at most
#: 8**3 strings of 100 characters whatever the value.
_SHALLOW = _BoundedRepr()
_SHALLOW.maxlevel, _SHALLOW.maxstring, _SHALLOW.maxother, _SHALLOW.maxlong = 3, 100, 100, 100
_SHALLOW.maxdict = _SHALLOW.maxlist = _SHALLOW.maxtuple = _SHALLOW.maxset = _SHALLOW.maxfrozenset = 8
_SHALLOW.maxdeque = 8


#: Characters of the bounded repr a whole value past its budget shows instead.
_FULL_FALLBACK_CHARS = 64_000


def render(value: Any, limit: int = 4000, full: bool = False) -> str:
    """A bounded repr: long containers and strings are elided with ``...``; ``full``: every item, up to
    ``MAX_FULL_CHARS`` and ``MAX_FULL_NODES`` (past them, the bounded repr, saying so). The bounded repr
    stops making text a few times past ``limit``, and shows the value shallower then."""
    if full:
        try:
            return _FullRepr().repr(value)
        except _Spent:
            note = f"# too large to show whole (over {MAX_FULL_CHARS:,} characters or {MAX_FULL_NODES:,} values)\n"
            return note + render(value, _FULL_FALLBACK_CHARS)
    try:
        text = _Budgeted(max(4 * limit, 16_000)).repr(value)
    except _Spent:
        text = _SHALLOW.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
