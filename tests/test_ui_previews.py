"""Previews of artifact values (``metaflow_stack.datastore.previews``): plain data of
every pickle protocol is shown, while a small pickle can neither name code,
allocate without end, nor make the preview itself fail."""

from __future__ import annotations

import pickle

import pytest
from conftest import refuse_unpickling

from metaflow_stack.datastore.previews import MAX_INT_DIGITS, NotPlainData, plain_loads, render


class _Allocates:
    """Pickles as ``bytearray(n)``: 30-odd bytes that would ask for ``n`` bytes of memory."""

    def __init__(self, reduce_to: tuple) -> None:
        self.reduce_to = reduce_to

    def __reduce__(self) -> tuple:
        return self.reduce_to


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_of_every_protocol_is_shown(protocol: int) -> None:
    value = [bytearray(b"ab\xff"), {1, 2}, frozenset({3}), b"x\x00", "é", 1.5, None, (True,)]
    assert plain_loads(pickle.dumps(value, protocol=protocol)) == value


@pytest.mark.parametrize(
    "reduce_to",
    [
        (bytearray, (100_000_000,)),
        (set, (range(10**12),)),
        (frozenset, (range(10**12),)),
    ],
    ids=["bytearray(n)", "set(range)", "frozenset(range)"],
)
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_cannot_make_the_preview_allocate(reduce_to: tuple, protocol: int) -> None:
    data = pickle.dumps(_Allocates(reduce_to), protocol=protocol)
    assert len(data) < 100
    with pytest.raises(NotPlainData):
        plain_loads(data)


def test_a_huge_integer_is_described_not_printed() -> None:
    huge = plain_loads(pickle.dumps(10**5000))  # str() of it raises past 4,300 digits
    assert render(huge) == "<int of 16,610 bits>"
    shown = -(10 ** (MAX_INT_DIGITS // 2))
    assert render(plain_loads(pickle.dumps(shown))) == str(shown)


def test_code_is_refused_before_it_is_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    data = pickle.dumps(_Allocates((eval, ("1 + 1",))))  # eval: a builtin no library replaces (Ray wraps print)
    refuse_unpickling(monkeypatch, "the preview")  # only the plain-data unpickler may read it
    with pytest.raises(NotPlainData, match=r"builtins\.eval"):
        plain_loads(data)


def test_a_seven_byte_pickle_cannot_grow_the_memo() -> None:
    import struct
    import tracemalloc

    data = b"Nr" + struct.pack("<I", 2**31) + b"."  # None, kept in memo slot 2**31
    tracemalloc.start()
    try:
        assert plain_loads(data) is None
        assert tracemalloc.get_traced_memory()[1] < 10 * 1024 * 1024
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("opcode", "refusal"),
    [(pickle.MEMOIZE, "memoized values"), (pickle.NONE, "pickle opcodes")],
    ids=["MEMOIZE", "NONE"],
)
def test_millions_of_one_byte_opcodes_are_refused_within_the_budget(opcode: bytes, refusal: str) -> None:
    """8 MiB of one-byte opcodes, 8 KiB as stored: memoizing one value for each took 3 s and 685 MB."""
    import tracemalloc

    data = pickle.NONE + opcode * (8 * 2**20 - 2) + pickle.STOP
    tracemalloc.start()
    try:
        with pytest.raises(NotPlainData, match=f"more than [0-9,]+ {refusal}"):
            plain_loads(data)
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "value",
    [
        [float(n) for n in range(50_000)] + [f"item {n}" for n in range(50_000)],
        list(range(600_000)),  # (under a MB of pickle: a preview's)
        {f"user{n}": f"label{n % 10}" for n in range(150_000)},  # (protocol 4 memoizes each string)
    ],
    ids=["mixed", "numbers", "strings"],
)
def test_what_a_previews_megabyte_of_pickle_holds_is_within_the_budget(value: object) -> None:
    for protocol in (2, 4):
        assert plain_loads(pickle.dumps(value, protocol=protocol)) == value


def _shared(depth: int) -> tuple:
    """A tuple holding the one before it twice, ``depth`` times over: 2**depth tuples for its hash to visit."""
    shared: tuple = ()
    for _ in range(depth):
        shared = (shared, shared)
    return shared


def _as_dict(pairs: list) -> bytes:
    """A protocol 2 pickle of the dict of ``pairs`` (key, value, key, value...), made without the dict: made
    here, it would hash the keys, which is what the test is about (fewer than 1,000 items: one batch)."""
    listed = pickle.dumps(pairs, protocol=2)
    assert listed.startswith(b"\x80\x02]q\x00(") and listed.endswith(b"e.") and len(pairs) < 1000
    return b"\x80\x02}q\x00(" + listed[6:-2] + b"u."


@pytest.mark.parametrize(
    ("pairs", "refusal"),
    [
        ([_shared(40), 1], "a tuple of more than"),  # 150 bytes: one hash visits 2**40 tuples
        ([x for n in range(400) for x in ((_shared(17), n), n)], "keys that take more than"),  # each under it
    ],
    ids=["one-key", "many-keys"],
)
def test_keys_that_take_hours_to_hash_are_refused_within_the_budget(pairs: list, refusal: str) -> None:
    """A dict's key (or a set's item) is hashed in one C call, which no opcode budget interrupts, and Python
    caches no tuple's hash: a key of tuples sharing tuples took hours to hash, and many keys each a little
    under a bound as long together."""
    import time

    started = time.monotonic()
    with pytest.raises(NotPlainData, match=refusal):
        plain_loads(_as_dict(pairs))
    assert time.monotonic() - started < 5


def test_tuples_as_keys_are_within_the_budget() -> None:
    value = {(n, (n, f"k{n}")): n for n in range(20_000)} | {frozenset({(1, 2), (3, 4)}): "set"}
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        assert plain_loads(pickle.dumps(value, protocol=protocol)) == value


def test_a_slow_codec_cannot_rebuild_a_bytearray() -> None:
    data = pickle.dumps(_Allocates((bytearray, ("x" * 1000, "punycode"))), protocol=2)
    with pytest.raises(NotPlainData, match="punycode"):
        plain_loads(data)


def test_shared_references_render_within_bounds() -> None:
    import collections
    import time

    nested: list = []
    for _ in range(40):  # 2**40 paths through 40 levels of the same two references
        nested = [nested, nested]
    value = plain_loads(pickle.dumps([collections.OrderedDict(a=nested), slice(nested, nested, None)]))
    started = time.monotonic()
    text = render(value)
    assert time.monotonic() - started < 1 and len(text) <= 4000
    assert text.startswith("[OrderedDict({'a': [[") and "slice(" in text


def test_a_preview_of_long_strings_shared_four_levels_deep_stops_early() -> None:
    """20 items a level, four levels, of 400-character strings: the bounded repr made 64 MB to show 4,000
    characters (0.6 s of a server's time for each preview of a pickle of a few KB). It stops a few times
    past its limit now and shows the value shallower."""
    import tracemalloc

    level: object = "x" * 400
    for _ in range(4):
        level = (level,) * 20
    value = plain_loads(pickle.dumps(level))
    tracemalloc.start()
    try:
        text = render(value)
        assert tracemalloc.get_traced_memory()[1] < 2 * 1024 * 1024  # (64 MB before)
    finally:
        tracemalloc.stop()
    assert len(text) == 4000 and text.startswith("((((") and text.endswith("...")
    config = {f"section{i}": {f"key{j}": "v" * 100 for j in range(8)} for i in range(8)}  # 8 KB of plain config
    assert render(config) == repr(config)[:3997] + "..."  # (shown as deep as before: only a few times the limit)
