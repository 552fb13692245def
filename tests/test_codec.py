"""Tests of pheap.codec: cells, blobs, refs, pickling policy, hostile input and stable hashing.

Round trips are judged bit-exactly (``same``): a float compares by its IEEE bits, so NaN payloads
and -0.0 count, and every value must come back with exactly the type it went in as.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pheap import codec as C
from pheap.codec import (
    MAX_DEPTH,
    StableHasher,
    blob_length,
    blob_refs,
    cell,
    decode,
    encode,
    from_cell,
    is_blob_cell,
    is_ref_cell,
    ref_cell,
    ref_offset,
)
from pheap.errors import (
    CorruptHeapError,
    InvalidPointerError,
    PheapError,
    UnpicklingNotAllowedError,
)

M64 = (1 << 64) - 1
KEY = bytes(range(32))

# ---------------------------------------------------------------------------------------------
# Helpers and strategies.
# ---------------------------------------------------------------------------------------------


def bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def from_bits(b: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", b))[0]


def key(v: Any) -> object:
    """A hashable, NaN-free picture of ``v`` that tells apart what must round-trip exactly:
    type, float bits, item order; frozensets as sets of pictures."""
    t = type(v)
    if t is float:
        return ("float", bits(v))
    if t is complex:
        return ("complex", bits(v.real), bits(v.imag))
    if t is tuple:
        return ("tuple", tuple(key(x) for x in v))
    if t is frozenset:
        return ("frozenset", frozenset(key(x) for x in v))
    return (t.__qualname__, v)


def same(a: object, b: object) -> bool:
    return key(a) == key(b)


BOUNDARY_INTS = [
    0, 1, -1, 127, 128, -128, -129, 255, 256, 2**31, 2**62 - 1, 2**62, -(2**62), -(2**62) - 1,
    2**63 - 1, 2**63, -(2**63), 2**64 - 1, 2**64, -(2**64), 2**1000, -(2**1000) - 7,
]  # fmt: skip


def boundary_int(i: int) -> int:
    return BOUNDARY_INTS[i]


chars = st.one_of(st.characters(codec=None), st.characters(categories=["Cs"]))
texts = st.one_of(
    st.text(max_size=10),  # short: mostly inline, some 8+ UTF-8 bytes
    st.text(chars, max_size=12),  # surrogates and non-BMP
    st.text(chars, min_size=100, max_size=300),  # varint lengths of two bytes
)
binaries = st.one_of(st.binary(max_size=10), st.binary(min_size=120, max_size=300))
ints = st.one_of(
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.integers(0, len(BOUNDARY_INTS) - 1).map(boundary_int),  # sampled_from: a huge repr
    st.integers(-(2**62) - 4, -(2**62) + 4),
    st.integers(2**62 - 4, 2**62 + 4),
)
floats = st.one_of(st.floats(), st.integers(0, M64).map(from_bits))  # every bit pattern
complexes = st.builds(complex, floats, floats)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, complexes, texts, binaries)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(tuple),
        st.frozensets(inner, max_size=5),
    ),
    max_leaves=25,
)


class Shared:
    """Stands in for a shared object of the object layer: it lives at ``off`` in the heap."""

    def __init__(self, off: int) -> None:
        self.off = off

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shared) and other.off == self.off

    def __hash__(self) -> int:
        return self.off


def ref_of(v: object) -> int | None:
    return ref_cell(v.off) if isinstance(v, Shared) else None


class Color(enum.IntEnum):
    RED = 1


class Name(str):
    pass


class Folded(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.lower() == other.lower()

    def __hash__(self) -> int:
        return hash(self.lower())


class Point(tuple):
    pass


SIDE_EFFECTS: list[str] = []


def _record(what: str) -> str:
    SIDE_EFFECTS.append(what)
    return what


class Boom:
    """Unpickling this appends to SIDE_EFFECTS: proof of whether pickle ran."""

    def __reduce__(self):
        return (_record, ("unpickled",))


# ---------------------------------------------------------------------------------------------
# Cells.
# ---------------------------------------------------------------------------------------------


class TestCells:
    def test_small_int_limits(self):
        assert cell(2**62 - 1) is not None and cell(2**62) is None
        assert cell(-(2**62)) is not None and cell(-(2**62) - 1) is None
        for v in (0, 1, -1, 2**62 - 1, -(2**62)):
            c = cell(v)
            assert 0 < c <= M64 and c & 1 == 1
            assert from_cell(c) == v and type(from_cell(c)) is int

    @given(st.integers(-(2**62), 2**62 - 1))
    def test_small_ints_round_trip(self, v):
        c = cell(v)
        assert c == (v << 1 | 1) & M64  # the documented encoding
        assert from_cell(c) == v

    @given(ints)
    def test_ints_outside_have_no_cell(self, v):
        assert (cell(v) is None) == (not -(2**62) <= v < 2**62)

    def test_constants(self):
        cells = [cell(None), cell(False), cell(True)]
        assert cells == [C.NONE_CELL, C.FALSE_CELL, C.TRUE_CELL]
        assert len(set(cells)) == 3 and all(c & 7 == 2 and c & 0x18 == 0 for c in cells)
        assert [from_cell(c) for c in cells] == [None, False, True]
        assert type(from_cell(C.TRUE_CELL)) is bool
        assert cell(True) != cell(1) and cell(False) != cell(0)  # bool is not an int here
        assert [(c >> 8) & 0xFF for c in cells] == [0, 1, 2]  # the data byte of the brief

    @pytest.mark.parametrize(
        "s, inline",
        [
            ("", True),
            ("abcdefg", True),
            ("abcdefgh", False),
            ("ééé", True),  # 6 bytes
            ("ééé" + "x", True),  # 7 bytes
            ("éééé", False),  # 4 chars, 8 bytes
            ("€€", True),
            ("😀", True),  # non-BMP: 4 bytes
            ("😀😀", False),
            ("\ud800", True),  # lone surrogate, 3 bytes with surrogatepass
            ("\ud800\udc00a", True),  # a surrogate pair kept as two surrogates: 7 bytes
            ("\ud800\udc00ab", False),
        ],
    )
    def test_short_str_boundary(self, s, inline):
        n = len(s.encode("utf-8", "surrogatepass"))
        assert inline == (n <= 7)
        c = cell(s)
        if inline:
            assert c & 7 == 2 and c & 0x18 == 1 << 3 and (c >> 5) & 7 == n
            assert from_cell(c) == s
            assert c >> 8 == int.from_bytes(s.encode("utf-8", "surrogatepass"), "little")
        else:
            assert c is None

    @pytest.mark.parametrize("n", range(10))
    def test_short_bytes_boundary(self, n):
        b = bytes(range(200, 200 + n))
        for v in (b, bytearray(b), memoryview(b)):
            c = cell(v)
            if n <= 7:
                assert c == cell(b) and c & 0x18 == 2 << 3 and (c >> 5) & 7 == n
                assert from_cell(c) == b and type(from_cell(c)) is bytes
            else:
                assert c is None

    @given(st.one_of(texts, binaries, st.integers(-(2**62), 2**62 - 1)))
    def test_canonical_equal_values_equal_cells(self, v):
        # An equal value built separately (a different object) has the same cell.
        if type(v) is str:
            twin = "".join(list(v))
        elif type(v) is bytes:
            twin = bytes(bytearray(v))
        else:
            twin = int(str(v))
        assert cell(v) == cell(twin)
        if cell(v) is not None:
            assert same(from_cell(cell(v)), v)

    @given(st.one_of(scalars, scalars), st.one_of(scalars, scalars))
    def test_distinct_values_distinct_cells(self, a, b):
        ca, cb = cell(a), cell(b)
        if ca is not None and cb is not None:
            assert (ca == cb) == same(a, b)

    def test_types_kept_apart(self):
        assert cell("a") != cell(b"a") and cell("") != cell(b"") != cell(None)
        assert cell(0) != cell(None) and cell(0) != cell("")

    def test_subclasses_and_others_have_no_cell(self):
        for v in (Color.RED, Name("a"), 1.0, 0j, (), frozenset(), [], object(), Shared(8)):
            assert cell(v) is None

    @given(st.integers(0, M64))
    @example(C.NONE_CELL | 3 << 8)
    @example(2 | 3 << 3)
    def test_from_cell_any_word_is_canonical_or_refused(self, c):
        try:
            v = from_cell(c)
        except CorruptHeapError:
            return
        assert cell(v) == c  # exactly one word per value

    @given(st.integers(0, (1 << 61) - 1).map(lambda x: x << 3 | 2))
    def test_from_cell_immediates_are_canonical_or_refused(self, c):
        try:
            v = from_cell(c)
        except CorruptHeapError:
            return
        assert cell(v) == c

    @pytest.mark.parametrize(
        "c, words",
        [
            (0, "empty"),
            (8, "blob offset"),
            (4096, "blob offset"),
            (ref_cell(4096), "shared object"),
            (6, "reserved"),
            (6 | 1 << 8, "reserved"),
            (2 | 3 << 3, "reserved"),  # kind 3
            (C.NONE_CELL | 3 << 8, "immediate"),  # constant 3 does not exist
            (2 | 1 << 3 | 1 << 5 | 0x4241 << 8, "canonical"),  # length 1, two data bytes
            (2 | 1 << 3 | 1 << 5 | 0xFF << 8, "canonical"),  # bad UTF-8
            (2 | 2 << 3 | 0 << 5 | 1 << 8, "past its length"),
            (-1, "64-bit"),
            (-6, "64-bit"),
            (2**64 + 1, "64-bit"),
            (2**64 + 2, "64-bit"),
        ],
    )
    def test_from_cell_refuses(self, c, words):
        with pytest.raises(CorruptHeapError, match=words) as ei:
            from_cell(c)
        assert isinstance(ei.value, ValueError)

    def test_blob_and_ref_cells(self):
        assert is_blob_cell(8) and is_blob_cell(1 << 40) and not is_blob_cell(0)
        assert not is_blob_cell(cell(1)) and not is_blob_cell(cell("a"))
        r = ref_cell(4096)
        assert r == 4096 | 4 and is_ref_cell(r) and not is_blob_cell(r) and ref_offset(r) == 4096
        assert not is_ref_cell(4096) and not is_ref_cell(cell(None)) and not is_ref_cell(cell(2))

    @given(st.integers(1, (1 << 61) - 1).map(lambda x: x << 3))
    def test_ref_cells_round_trip(self, off):
        r = ref_cell(off)
        assert is_ref_cell(r) and ref_offset(r) == off and not is_blob_cell(r)
        with pytest.raises(CorruptHeapError):
            from_cell(r)

    @pytest.mark.parametrize("off", [0, 4, 7, -8, 2**64, 8.0, "8", None])
    def test_ref_cell_refuses(self, off):
        with pytest.raises(InvalidPointerError):
            ref_cell(off)

    @pytest.mark.parametrize("c", [0, 4, 8, 3, cell(None), 2**64 + 4, -4])
    def test_ref_offset_refuses(self, c):
        with pytest.raises(InvalidPointerError):
            ref_offset(c)

    def test_immediate_memos_are_bounded_and_right(self, monkeypatch):
        monkeypatch.setattr(C, "IMM_CACHE_SIZE", 8)
        words = [f"w{i}" for i in range(100)] + [f"é{i}" for i in range(100)]
        cells = [cell(w) for w in words] * 2
        assert [from_cell(c) for c in cells] == words * 2
        assert [cell(w) for w in words] == cells[: len(words)]
        assert len(C._str_cells) <= 8 and len(C._imm_values) <= 8 + 3
        assert from_cell(C.NONE_CELL) is None and from_cell(C.TRUE_CELL) is True


# ---------------------------------------------------------------------------------------------
# Blobs: round trips and the exact bytes.
# ---------------------------------------------------------------------------------------------


class TestRoundTrip:
    @settings(max_examples=300)
    @given(values)
    def test_every_value_via_blob_and_cell(self, v):
        blob = encode(v)
        assert type(blob) is bytes
        assert same(decode(blob), v)
        assert blob_length(blob) == len(blob)
        assert blob_refs(blob) == []
        c = cell(v)
        if c is not None:
            assert same(from_cell(c), v)

    @given(values, st.binary(max_size=20))
    def test_any_buffer_type_and_slack(self, v, slack):
        blob = encode(v)
        padded = blob + slack  # a block is rounded up by the allocator
        for buf in (padded, bytearray(padded), memoryview(padded)):
            assert same(decode(buf), v)
            assert blob_length(buf) == len(blob)

    @given(values)
    def test_encoding_is_a_function_of_the_value(self, v):
        assert encode(v) == encode(pickle.loads(pickle.dumps(v)))  # a copy, same bytes

    @pytest.mark.parametrize("v", BOUNDARY_INTS)
    def test_boundary_ints(self, v):
        blob = encode(v)
        assert blob[0] == C.BLOB_INT and decode(blob) == v
        n = blob[1]
        assert n == len(blob) - 2 == ((v if v >= 0 else ~v).bit_length() >> 3) + 1

    @pytest.mark.parametrize("n", [0, 1, 7, 8, 127, 128, 16383, 16384, 100_000])
    def test_lengths_across_varint_sizes(self, n):
        for v in (b"\xab" * n, "é" * n, "a" * n):
            blob = encode(v)
            assert decode(blob) == v and blob_length(blob) == len(blob)
            slack = blob + b"\x00" * (2 * len(blob))  # a misread length would still fit
            assert decode(slack) == v and blob_length(slack) == len(blob)

    def test_floats_bit_exact(self):
        payload_nan = from_bits(0x7FF0000000000001)  # signalling NaN with a payload
        for x in (0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, payload_nan, 5e-324, 1e308):
            assert bits(decode(encode(x))) == bits(x)
            z = complex(x, -x)
            w = decode(encode(z))
            assert (bits(w.real), bits(w.imag)) == (bits(z.real), bits(z.imag))

    def test_bytes_likes_come_back_as_bytes(self):
        import array

        a = array.array("I", [1, 2])
        assert decode(encode(bytearray(b"xyz"))) == b"xyz"
        assert decode(encode(memoryview(b"xyz"))) == b"xyz"
        assert decode(encode(memoryview(a))) == a.tobytes()  # the raw bytes, C order
        assert decode(encode(memoryview(b"abcdef")[::2])) == b"ace"  # not contiguous
        assert decode(encode(memoryview(b"abcdef").cast("B", (2, 3)))) == b"abcdef"
        assert cell(memoryview(b"abcdef")[::2]) == cell(b"ace")
        assert decode(encode((bytearray(b"a" * 20),))) == (b"a" * 20,)

    def test_values_with_cells_have_blobs_too(self):
        for v in (None, True, False, 0, -5, "a", b"", "", 2**62 - 1):
            blob = encode(v)
            assert same(decode(blob), v)
        assert encode(None)[0] == C.BLOB_CELL and encode(5)[0] == C.BLOB_INT
        assert encode("a")[0] == C.BLOB_STR and encode(b"a")[0] == C.BLOB_BYTES

    def test_exact_bytes(self):
        """Pins the format of the module docstring's table."""
        le = lambda c: c.to_bytes(8, "little")  # noqa: E731
        assert C.NONE_CELL == 0x22 and C.FALSE_CELL == 0x122 and C.TRUE_CELL == 0x222
        assert cell("ab") == 0x6261 << 8 | 2 << 5 | 1 << 3 | 2
        assert cell(b"\x01") == 1 << 8 | 1 << 5 | 2 << 3 | 2
        assert encode("abc") == b"\x01\x03abc"
        assert encode(b"x" * 200) == b"\x02\xc8\x01" + b"x" * 200
        assert encode(0) == b"\x03\x01\x00" and encode(-1) == b"\x03\x01\xff"
        assert encode(128) == b"\x03\x02\x80\x00" and encode(-129) == b"\x03\x02\x7f\xff"
        assert encode(1.5) == b"\x04" + struct.pack("<d", 1.5)
        assert encode(1 - 2j) == b"\x07" + struct.pack("<dd", 1, -2)
        assert encode((None, 7, "a")) == b"\x05\x03" + b"\x00" + le(0x22) + b"\x03\x01\x07\x01\x01a"
        assert encode(frozenset({"b", "a"})) == b"\x08\x02\x01\x01a\x01\x01b"
        assert encode(True) == b"\x00" + le(0x222)
        assert encode(()) == b"\x05\x00"
        data = pickle.dumps([1], protocol=5)
        assert encode([1], allow_pickle=True) == bytes((6, len(data))) + data

    def test_tuple_items_as_cells_are_read(self):
        """The encoder writes small ints and short str as nested blobs, but CELL items for them
        (the brief's form) are valid and read the same."""
        le = lambda c: c.to_bytes(8, "little")  # noqa: E731
        blob = b"\x05\x04" + b"".join(b"\x00" + le(cell(v)) for v in (5, -3, "ab", b"z"))
        assert decode(blob) == (5, -3, "ab", b"z") and blob_length(blob) == len(blob)
        assert decode(b"\x00" + le(cell(-(2**62)))) == -(2**62)  # a CELL at top level too

    def test_tuples_are_compact(self):
        assert len(encode(tuple(range(100)))) == 2 + 100 * 3  # not 100 * 9
        assert len(encode(("abc",) * 10)) == 2 + 10 * 5

    def test_nesting_up_to_max_depth(self):
        v: object = 1
        for _ in range(MAX_DEPTH):
            v = (v, "x")
        assert decode(encode(v)) == v
        with pytest.raises(ValueError, match="MAX_DEPTH"):
            encode((v,))
        fs: object = 1
        for _ in range(MAX_DEPTH):
            fs = frozenset({fs})
        assert decode(encode(fs)) == fs
        with pytest.raises(ValueError, match="MAX_DEPTH"):
            encode((fs,))

    def test_frozenset_bytes_do_not_depend_on_the_process(self):
        v = frozenset({"alpha", "beta", "gamma", b"delta", ("eps", 1), 2.5, 10**30})
        code = (
            "import sys; from pheap.codec import encode; "
            "v = frozenset({'alpha', 'beta', 'gamma', b'delta', ('eps', 1), 2.5, 10**30}); "
            "sys.stdout.write(encode(v).hex())"
        )
        for seed in ("1", "2", "12345"):
            out = run_child(code, seed)
            assert bytes.fromhex(out) == encode(v)

    def test_unsupported_types_named(self):
        for v, name in ((Color.RED, "Color"), (Point((1,)), "Point"), ([1], "list"), ({}, "dict")):
            with pytest.raises(TypeError, match=name) as ei:
                encode(v)
            assert "allow_pickle" in str(ei.value)
            with pytest.raises(TypeError, match=name):
                encode((1, ("x", v)))
        assert not isinstance(ei.value, PheapError)  # a plain TypeError, like json's


# ---------------------------------------------------------------------------------------------
# Refs to shared objects inside blobs.
# ---------------------------------------------------------------------------------------------


class TestRefs:
    def test_ref_and_deref_hooks(self):
        asked: list[object] = []

        def ref(v):
            asked.append(v)
            return ref_of(v)

        a, b, c = Shared(4096), Shared(8192), Shared(1 << 40)
        v = (1, a, ("x", b, (None, c)), "tail", 2.5)
        blob = encode(v, ref=ref)
        assert asked == [a, b, c]  # only for what is not a native value
        assert blob_refs(blob) == [4096, 8192, 1 << 40]
        seen: list[int] = []

        def deref(off):
            seen.append(off)
            return {4096: a, 8192: b, 1 << 40: c}[off]

        out = decode(blob, deref=deref)
        assert out == v and out[1] is a and out[2][1] is b and out[2][2][1] is c
        assert seen == [4096, 8192, 1 << 40]

    def test_refs_in_frozensets(self):
        v = frozenset({Shared(64), ("k", Shared(128)), 3})
        blob = encode(v, ref=ref_of)
        assert sorted(blob_refs(blob)) == [64, 128]
        assert decode(blob, deref=Shared) == v

    def test_top_level_ref(self):
        blob = encode(Shared(4096), ref=ref_of)
        assert blob == b"\x00" + ref_cell(4096).to_bytes(8, "little")
        assert blob_refs(blob) == [4096] and decode(blob, deref=Shared) == Shared(4096)

    def test_decode_without_deref(self):
        blob = encode((1, Shared(4096)), ref=ref_of)
        with pytest.raises(TypeError, match="deref"):
            decode(blob)

    def test_ref_hook_saying_none_falls_through(self):
        with pytest.raises(TypeError, match="Shared"):
            encode((1, Shared(8)), ref=lambda v: None)
        blob = encode((1, Shared(8)), ref=lambda v: None, allow_pickle=True)
        assert blob_refs(blob) == [] and decode(blob, allow_pickle=True) == (1, Shared(8))

    @pytest.mark.parametrize("bad", [4096, 4, 1, cell(None), 2**64 + 4, "x"])
    def test_ref_hook_must_give_a_ref_cell(self, bad):
        with pytest.raises(ValueError, match="ref cell"):
            encode((Shared(8),), ref=lambda v: bad)

    @pytest.mark.parametrize(
        "c, words",
        [
            (0, "empty cell.*self-contained"),
            (8, "blob offset.*self-contained"),
            (4096, "blob offset.*self-contained"),
            (4, "ref to offset 0"),
            (6, "reserved tag"),
            (2 | 3 << 3, "reserved kind"),
        ],
    )
    def test_cells_that_cannot_be_items(self, c, words):
        """A blob-offset cell never sits inside a blob (blobs are self-contained), nor does the
        empty cell, a ref to offset 0 or a reserved tag."""
        blob = b"\x05\x01\x00" + c.to_bytes(8, "little")
        for f in (lambda b: decode(b, deref=Shared), blob_length, blob_refs):
            with pytest.raises(CorruptHeapError, match=words):
                f(blob)


# ---------------------------------------------------------------------------------------------
# Pickling policy.
# ---------------------------------------------------------------------------------------------


class TestPickle:
    def test_refused_on_encode_by_default(self):
        with pytest.raises(TypeError, match="Boom.*allow_pickle=True"):
            encode(Boom())

    def test_allowed_round_trips_keep_types(self):
        for v in ([1, "a"], {"k": (1, 2)}, {3}, Color.RED, Name("n"), Point((1, 2))):
            out = decode(encode(v, allow_pickle=True), allow_pickle=True)
            assert out == v and type(out) is type(v)
        v = (1, [2, 3], ("x", {4: 5}))
        assert decode(encode(v, allow_pickle=True), allow_pickle=True) == v

    @pytest.mark.parametrize(
        "nest", [lambda x: x, lambda x: (1, ("a", x)), lambda x: frozenset({x})]
    )
    def test_refused_on_decode_without_calling_pickle(self, nest, monkeypatch):
        blob = encode(nest(Boom()), allow_pickle=True)
        SIDE_EFFECTS.clear()

        def trap(*args, **kwargs):
            raise AssertionError("pickle was called")

        with monkeypatch.context() as m:
            for name in ("loads", "load", "Unpickler", "_loads"):
                if hasattr(pickle, name):
                    m.setattr(pickle, name, trap)
            with pytest.raises(UnpicklingNotAllowedError, match="allow_pickle") as ei:
                decode(blob)
            assert isinstance(ei.value, TypeError) and isinstance(ei.value, PheapError)
            assert blob_length(blob) == len(blob)  # walking a pickle never unpickles it
            assert blob_refs(blob) == []
        assert SIDE_EFFECTS == []
        # The payload does have an effect when unpickled: the test above could have failed.
        decode(blob, allow_pickle=True)
        assert SIDE_EFFECTS == ["unpickled"]

    def test_damaged_pickle_is_corruption(self):
        good = encode([1, 2, 3], allow_pickle=True)
        data = good[2:]
        for cut in (data[:1], data[:-1], b"\x80\x05garbage."):
            blob = bytes((C.BLOB_PICKLE, len(cut))) + cut
            with pytest.raises(CorruptHeapError):
                decode(blob, allow_pickle=True)

    def test_error_pickles(self):
        e = UnpicklingNotAllowedError("m")
        assert type(pickle.loads(pickle.dumps(e))) is UnpicklingNotAllowedError


# ---------------------------------------------------------------------------------------------
# Hostile input: damage raises pheap errors, nothing else; bounded time and memory.
# ---------------------------------------------------------------------------------------------

PHEAP_ERRORS = (CorruptHeapError, UnpicklingNotAllowedError)


def deref_marker(off: int) -> object:
    return ("ref", off)


def check_hostile(buf: bytes) -> None:
    """Decode, blob_length and blob_refs either work, consistently, or raise a pheap error."""
    try:
        v = decode(buf, deref=deref_marker)
    except PHEAP_ERRORS:
        v = ok = None
    else:
        ok = True
    try:
        n = blob_length(buf)
        refs = blob_refs(buf)
    except PHEAP_ERRORS:
        assert ok is None  # decode checks more than the walk: never less
        return
    assert 1 <= n <= len(buf)
    if ok:
        assert blob_length(buf[:n]) == n
        assert same(decode(buf[:n], deref=deref_marker), v)
        assert len(refs) == repr(v).count("('ref',")


class TestHostile:
    @settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=64))
    def test_random_bytes(self, buf):
        check_hostile(buf)

    @settings(max_examples=500)
    @given(st.sampled_from(range(C.BLOB_TAGS)), st.binary(max_size=40))
    def test_random_bytes_after_a_known_tag(self, tag, rest):
        check_hostile(bytes((tag,)) + rest)

    @settings(max_examples=300)
    @given(values)
    def test_every_truncation_is_corruption(self, v):
        blob = encode(v)
        for n in range(len(blob)):
            for f in (decode, blob_length, blob_refs):
                with pytest.raises(CorruptHeapError):
                    f(blob[:n])

    @settings(max_examples=500)
    @given(values, st.data())
    def test_mutations(self, v, data):
        blob = bytearray(encode(v, ref=ref_of))
        for _ in range(data.draw(st.integers(1, 3))):
            kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
            i = data.draw(st.integers(0, max(0, len(blob) - 1)))
            if kind == "flip" and blob:
                blob[i] ^= 1 << data.draw(st.integers(0, 7))
            elif kind == "set" and blob:
                blob[i] = data.draw(st.integers(0, 255))
            elif kind == "insert":
                blob[i:i] = data.draw(st.binary(min_size=1, max_size=4))
            elif blob:
                del blob[i]
        check_hostile(bytes(blob))

    def test_empty(self):
        for f in (decode, blob_length, blob_refs):
            with pytest.raises(CorruptHeapError, match="truncated"):
                f(b"")

    @pytest.mark.parametrize("tag", [9, 10, 0x7F, 0x80, 0xFF])
    def test_unknown_tags(self, tag):
        for f in (decode, blob_length, blob_refs):
            with pytest.raises(CorruptHeapError, match=f"unknown tag {tag}"):
                f(bytes((tag, 1, 2, 3)))

    @pytest.mark.parametrize(
        "buf, words",
        [
            (b"\x03\x00", "zero bytes"),
            (b"\x03\x02\x01\x00", "non-minimal INT"),
            (b"\x03\x02\x80\xff", "non-minimal INT"),
            (b"\x01\x81\x00" + b"a", "non-minimal varint"),
            (b"\x01" + b"\xff" * 9 + b"\x01", "varint longer"),
            (b"\x01\x02\xff\xfe", "UTF-8"),
            (b"\x05\x01\x01\x01\xc3", "UTF-8"),  # inside a tuple (the inlined path)
            (b"\x01\x05abc", "runs past"),
            (b"\x05\x03\x03\x01\x00", "truncated"),
            (b"\x04\x00\x00", "truncated"),
            (b"\x07" + b"\x00" * 15, "truncated"),
            (b"\x00\x22\x00", "truncated"),
        ],
    )
    def test_specific_damage(self, buf, words):
        with pytest.raises(CorruptHeapError, match=words):
            decode(buf)

    @pytest.mark.parametrize(
        "buf",
        [
            b"\x01" + b"\xff" * 8 + b"\x3f" + b"abc",  # str of 2**63 - 1 bytes
            b"\x02\xff\xff\xff\xff\x0f" + b"x" * 10,  # bytes of 4 GiB
            b"\x03\xff\xff\xff\xff\x0f" + b"\x01" * 10,  # int of 4 GiB
            b"\x06\xff\xff\xff\x7f" + b"\x80" * 10,  # pickle of 256 MiB
            b"\x05\xff\xff\xff\xff\x0f" + b"\x03\x01\x01" * 10,  # tuple of 4 G items
            b"\x08\xff\xff\xff\xff\x0f" + b"\x03\x01\x01" * 10,
        ],
    )
    def test_forged_lengths_allocate_nothing_big(self, buf):
        tracemalloc.start()
        try:
            for f in (lambda b: decode(b, allow_pickle=True), blob_length, blob_refs):
                with pytest.raises(CorruptHeapError):
                    f(buf)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024, peak

    @settings(max_examples=100, deadline=None)
    @given(st.binary(min_size=100, max_size=2000))
    def test_memory_bounded_by_input(self, buf):
        """Whatever decodes takes a bounded multiple of its input (Python objects are bigger
        than their bytes: a 2-byte empty tuple item becomes an 8-byte pointer)."""
        buf = b"\x05\xff\xff\x03" + buf  # a big tuple header so the garbage gets read as items
        tracemalloc.start()
        try:
            try:
                decode(buf, deref=deref_marker)
            except PHEAP_ERRORS:
                pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * len(buf) + 64 * 1024, (peak, len(buf))

    @pytest.mark.parametrize("tag", [C.BLOB_TUPLE, C.BLOB_FROZENSET])
    def test_nesting_bomb(self, tag):
        bomb = bytes((tag, 1)) * 200_000 + b"\x03\x01\x00"
        for f in (decode, blob_length, blob_refs):
            with pytest.raises(CorruptHeapError, match="nested deeper"):
                f(bomb)
        ok = bytes((C.BLOB_TUPLE, 1)) * MAX_DEPTH + b"\x03\x01\x00"
        assert blob_length(ok) == len(ok) and blob_refs(ok) == []
        v = decode(ok)
        for _ in range(MAX_DEPTH):
            v = v[0]
        assert v == 0
        with pytest.raises(CorruptHeapError, match="nested deeper"):
            decode(bytes((C.BLOB_TUPLE, 1)) * (MAX_DEPTH + 1) + b"\x03\x01\x00")

    def test_frozenset_of_unhashable_pickle(self):
        item = encode([1], allow_pickle=True)
        with pytest.raises(CorruptHeapError, match="frozenset"):
            decode(b"\x08\x01" + item, allow_pickle=True)

    def test_buffer_of_wrong_format(self):
        import array

        for mv in (memoryview(array.array("Q", [1])), memoryview(b"\x01\x01a!").cast("B", (2, 2))):
            for f in (decode, blob_length, blob_refs):
                with pytest.raises(TypeError, match="format"):
                    f(mv)

    def test_mmap_buffer(self):
        import mmap

        blob = encode((1, "x" * 200, 2.5))
        with mmap.mmap(-1, 4096) as mm:
            mm[: len(blob)] = blob
            assert decode(mm) == (1, "x" * 200, 2.5) and blob_length(mm) == len(blob)
            with memoryview(mm) as mv:
                assert decode(mv[: len(blob) + 10]) == (1, "x" * 200, 2.5)
            # An error kept alive (a saved exception, sys.last_value) must not keep the mapping
            # exported: the heap could be neither grown nor closed.
            kept = []
            bad_utf8 = encode(("x", "é")).replace("é".encode(), b"\xc3\x00")
            for f, data in (
                (decode, blob[:-1]),
                (decode, bad_utf8),
                (partial(decode, deref=lambda off: 1 // 0), encode((Shared(8),), ref=ref_of)),
                (blob_length, blob[:-1]),
                (blob_refs, blob[:-1]),
            ):
                mm[: len(data)] = data
                with pytest.raises((CorruptHeapError, ZeroDivisionError)) as ei:
                    f(memoryview(mm)[: len(data)])
                kept.append(ei.value)
        assert mm.closed and len(kept) == 5  # closing with exports would have raised BufferError
        # (A caller's own frame holding the view would pin it too: hence partial, no lambda.)


# ---------------------------------------------------------------------------------------------
# Stable hashing.
# ---------------------------------------------------------------------------------------------

hashables = values  # every value the codec stores natively is hashable


def twins(v: Any) -> st.SearchStrategy:
    """Values equal to ``v`` of other types where Python has them (1 == 1.0 == True == 1+0j)."""
    t = type(v)
    options = [st.just(v)]
    if t in (int, bool) or (t is float and v.is_integer()):
        n = int(v)
        if float(n) == n:
            options.append(st.just(float(n)))
        options.append(st.just(complex(n, 0)))
        options.append(st.just(n))
        if n in (0, 1):
            options.append(st.just(bool(n)))
    elif t is float:
        options.append(st.just(complex(v, 0)))
    elif t is complex and v.imag == 0:
        options.append(st.just(v.real))
    elif t is tuple:
        options.append(st.tuples(*[twins(x) for x in v]))
    elif t is frozenset:
        items = sorted(v, key=encode)  # iteration order can vary between equal frozensets
        options.append(st.tuples(*[twins(x) for x in items]).map(frozenset))
    elif t is str:
        options.append(st.just(Name(v)))  # a subclass keeping str's __eq__ and __hash__
    return st.one_of(options)


class TestHasher:
    def test_key_checks(self):
        for k in (b"", b"x" * 15, b"x" * 65):
            with pytest.raises(ValueError, match="bytes"):
                StableHasher(k)
        with pytest.raises(TypeError):
            StableHasher("x" * 32)  # type: ignore[arg-type]
        StableHasher(bytearray(16))
        StableHasher(memoryview(b"x" * 64))

    def test_documented_scheme(self):
        """The hash is keyed BLAKE2b over a type byte and canonical bytes (format: stored hashes
        must not change)."""
        h = StableHasher(KEY)

        def b2(data: bytes) -> int:
            d = hashlib.blake2b(data, digest_size=8, key=KEY, person=b"pheap.codec.v1")
            return int.from_bytes(d.digest(), "little")

        assert h(None) == b2(b"\x00")
        assert (
            h(1) == b2(b"\x01\x01") and h(-1) == b2(b"\x01\xff") and h(128) == b2(b"\x01\x80\x00")
        )
        assert h(1.5) == b2(b"\x02" + struct.pack("<d", 1.5))
        assert h(1 + 2j) == b2(b"\x03" + struct.pack("<dd", 1, 2))
        assert h("abc") == b2(b"\x04abc")
        assert h(b"abc") == b2(b"\x05abc")
        le = lambda x: x.to_bytes(8, "little")  # noqa: E731
        assert h((1, "a")) == b2(b"\x06" + le(h(1)) + le(h("a")))
        assert h(frozenset({1, "a"})) == b2(b"\x07" + le((h(1) + h("a")) & M64) + le(2))

    def test_equal_across_types(self):
        h = StableHasher(KEY)
        assert h(1) == h(1.0) == h(True) == h(1 + 0j) == h(Color.RED)
        assert h(0) == h(0.0) == h(-0.0) == h(False) == h(0j) == h(-0.0 - 0j)
        assert h((1, "a")) == h((1.0, "a")) == h((True, Name("a")))
        assert h(frozenset({1, 2})) == h(frozenset({1.0, 2 + 0j}))
        assert h(2**53) == h(float(2**53)) and h(2.5) == h(2.5 + 0j)
        assert h(float("nan")) == h(from_bits(0x7FF0000000000001)) == h(complex(math.nan, 0))
        assert h(complex(0.0, 1)) == h(complex(-0.0, 1))

    @given(hashables.flatmap(lambda v: st.tuples(st.just(v), twins(v))))
    def test_equal_values_hash_equal(self, pair):
        a, b = pair
        assume(a == b)  # NaN inside is not equal to itself: no promise there
        h = StableHasher(KEY)
        assert h(a) == h(b)

    @given(hashables, hashables)
    def test_unequal_pairs(self, a, b):
        h = StableHasher(KEY)
        ha, hb = h(a), h(b)
        assert 0 <= ha <= M64
        if a == b:
            assert ha == hb
        elif not (has_nan(a) or has_nan(b)):
            assert ha != hb  # 64-bit: a collision here would be a bug, not bad luck

    def test_types_with_same_content_differ(self):
        h = StableHasher(KEY)
        distinct = ["a", b"a", ("a",), frozenset({"a"}), "", b"", (), frozenset(), None, 0, "0",
                    1.5, "1.5", (1, 2), (2, 1), ((1,), 2), (1, (2,))]  # fmt: skip
        assert len({h(v) for v in distinct}) == len(distinct)

    def test_surrogates_are_hashed_exactly(self):
        h = StableHasher(KEY)
        lone = ["\ud800", "\udc00", "\udfff", "?", "\ufffd", "\ud800\udc00", "\U00010000"]
        assert len({h(s) for s in lone}) == len(lone)

    def test_different_keys(self):
        h1, h2 = StableHasher(KEY), StableHasher(KEY[::-1])
        for v in ("a", b"a", 1, None, (1, "a"), 1.5, frozenset({1})):
            assert h1(v) != h2(v)

    def test_no_collisions_on_many_keys(self):
        h = StableHasher(KEY)
        vals = (
            [f"key:{i}" for i in range(5000)] + list(range(5000)) + [i + 0.5 for i in range(5000)]
        )
        assert len({h(v) for v in vals}) == len(vals)
        low = {h(v) & 1023 for v in range(5000)}
        assert len(low) > 1000  # low bits well spread, even for consecutive ints

    @pytest.mark.parametrize("v", [[1], {}, set(), bytearray(b"x"), (1, [2]), (1, 2)])
    def test_unhashables(self, v):
        h = StableHasher(KEY)
        try:
            hash(v)
        except TypeError:
            with pytest.raises(TypeError, match="unhashable"):
                h(v)
        else:
            h(v)

    @pytest.mark.parametrize(
        "v", [object(), memoryview(b"x"), Folded("A"), Shared(8), (1, Folded("a"))]
    )
    def test_no_stable_hash(self, v):
        with pytest.raises(TypeError, match="no stable hash"):
            StableHasher(KEY)(v)

    def test_subclass_with_own_eq_is_refused_even_when_its_base_is_cached(self):
        h = StableHasher(KEY)
        h("a")
        with pytest.raises(TypeError, match="no stable hash"):
            h(Folded("A"))

    def test_depth(self):
        v: object = 1
        for _ in range(MAX_DEPTH):
            v = (v,)
        StableHasher(KEY)(v)
        with pytest.raises(ValueError, match="MAX_DEPTH"):
            StableHasher(KEY)((v,))

    @given(st.lists(hashables, max_size=10))
    def test_cache_gives_the_cold_answer(self, vs):
        warm = StableHasher(KEY)
        first = [warm(v) for v in vs]
        again = [warm(v) for v in vs]
        cold = [StableHasher(KEY)(v) for v in vs]
        assert first == again == cold

    def test_cache_is_bounded(self, monkeypatch):
        monkeypatch.setattr(C, "HASH_CACHE_SIZE", 16)
        h, cold = StableHasher(KEY), StableHasher(KEY)
        vals = [f"s{i}" for i in range(100)] + [b"b%d" % i for i in range(100)] + list(range(100))
        for _ in range(2):
            assert [h(v) for v in vals] == [StableHasher(KEY)(v) for v in vals]
        assert max(len(h._strs), len(h._bytes), len(h._ints)) <= 16
        big = "x" * (C.HASH_CACHE_MAX_LEN + 1)
        n = len(h._strs)
        assert h(big) == cold(big) and len(h._strs) == n  # too long to be remembered

    def test_stable_across_processes(self):
        sample = [None, True, False, 0, 1, -1, 2**62, -(2**100), 1.5, -0.0, math.inf, math.nan,
                  1 - 2j, "", "a", "héllo wörld", "\ud800", "😀" * 40, b"", b"\x00\xff",
                  (1, "a", (None, b"x")), frozenset({"a", "b", 3}), ()]  # fmt: skip
        h = StableHasher(KEY)
        mine = [h(v) for v in sample]
        code = (
            "import json, math, sys; from pheap.codec import StableHasher; "
            f"sample = [None, True, False, 0, 1, -1, 2**62, -(2**100), 1.5, -0.0, math.inf, "
            f"math.nan, 1 - 2j, '', 'a', 'héllo wörld', '\\ud800', '😀' * 40, b'', b'\\x00\\xff', "
            f"(1, 'a', (None, b'x')), frozenset({{'a', 'b', 3}}), ()]; "
            f"h = StableHasher(bytes.fromhex({KEY.hex()!r})); "
            "sys.stdout.write(json.dumps([h(v) for v in sample]))"
        )
        for seed in ("0", "1", "4242"):
            assert json.loads(run_child(code, seed)) == mine


def has_nan(v: Any) -> bool:
    if type(v) is float:
        return v != v
    if type(v) is complex:
        return v != v
    if type(v) in (tuple, frozenset):
        return any(has_nan(x) for x in v)
    return False


def run_child(code: str, hash_seed: str) -> str:
    """Run ``code`` in a fresh interpreter with PYTHONHASHSEED=hash_seed; its stdout."""
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONIOENCODING="utf-8")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=120, check=True
    )
    return out.stdout.decode("utf-8")


# ---------------------------------------------------------------------------------------------
# The docstring table and the constants agree.
# ---------------------------------------------------------------------------------------------


class TestDocs:
    def test_table_names_every_tag(self):
        doc = C.__doc__
        for name in dir(C):
            if name.startswith("BLOB_") and name != "BLOB_TAGS":
                tag = getattr(C, name)
                assert f"tag {tag} {name[5:]}" in doc, name
        assert f"tags {C.BLOB_TAGS}-255 are reserved" in doc

    def test_public_names(self):
        for name in C.__all__:
            assert hasattr(C, name), name
        for f in (cell, from_cell, encode, decode, blob_length, blob_refs, ref_cell, ref_offset,
                  is_blob_cell, is_ref_cell, StableHasher):  # fmt: skip
            assert f.__doc__ and ">>>" in f.__doc__ and "O(" in f.__doc__, f.__name__
