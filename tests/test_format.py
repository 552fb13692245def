"""Tests of pheap.format: size classes, block sizes, the allocation bitmap, the header CRC and the
consistency of the layout constants with the table in the module docstring."""

from __future__ import annotations

import re
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pheap
from pheap import format as F

# ---------------------------------------------------------------------------------------------
# Bin bounds, derived independently from the docstring's description of the classes:
# below SMALL_LIMIT exact 8-byte classes; above, first level floor(log2 size) - 7 split in 32.
# ---------------------------------------------------------------------------------------------


def bin_bounds(fl: int, sl: int) -> tuple[int, int]:
    """[lo, hi) of the sizes kept in bin (fl, sl)."""
    if fl == 0:
        return sl * 8, sl * 8 + 8
    base = 1 << (fl + 7)
    step = base >> F.SL_LOG2
    return base + sl * step, base + (sl + 1) * step


def linear(c: tuple[int, int]) -> int:
    return c[0] * F.SL_COUNT + c[1]


def all_bins():
    for fl in range(F.FL_COUNT):
        for sl in range(F.SL_COUNT):
            if fl == 0 and sl * 8 >= F.SMALL_LIMIT:
                continue
            yield fl, sl


# Block sizes checked exhaustively (every multiple of 8 up to 1 MiB) and by sampling beyond.
EXHAUSTIVE = range(F.MIN_BLOCK, 1 << 20, F.ALIGN)
big_sizes = st.integers(F.SMALL_LIMIT // 8, (1 << 47) // 8).map(lambda k: k * 8)


class TestSizeClass:
    def test_docstring_examples(self):
        assert F.size_class(32) == (0, 4)
        assert F.size_class(248) == (0, 31)
        assert F.size_class(256) == (1, 0)
        assert F.size_class(300) == (1, 5)

    def test_exact_classes_below_small_limit(self):
        seen = {}
        for s in range(0, F.SMALL_LIMIT, 8):
            c = F.size_class(s)
            assert c == (0, s // 8)
            seen[c] = s
            for t in range(s, s + 8):  # all sizes of one 8-byte class share it
                assert F.size_class(t) == c
        assert len(seen) == F.SMALL_LIMIT // 8 == F.SL_COUNT

    def test_size_within_its_bin_bounds_exhaustive(self):
        for s in EXHAUSTIVE:
            fl, sl = F.size_class(s)
            lo, hi = bin_bounds(fl, sl)
            assert lo <= s < hi, (s, fl, sl, lo, hi)
            assert 0 <= sl < F.SL_COUNT and 0 <= fl < F.FL_COUNT

    @given(big_sizes)
    def test_size_within_its_bin_bounds_sampled(self, s):
        fl, sl = F.size_class(s)
        lo, hi = bin_bounds(fl, sl)
        assert lo <= s < hi

    def test_monotone(self):
        prev = -1
        for s in EXHAUSTIVE:
            k = linear(F.size_class(s))
            assert k >= prev, s
            prev = k

    @given(big_sizes, big_sizes)
    def test_monotone_sampled(self, a, b):
        if a > b:
            a, b = b, a
        assert linear(F.size_class(a)) <= linear(F.size_class(b))

    def test_every_bin_is_used(self):
        # Each bin's lower bound maps to that bin: no bin is unreachable or shared.
        for fl, sl in all_bins():
            lo, hi = bin_bounds(fl, sl)
            assert F.size_class(lo) == (fl, sl)
            assert F.size_class(hi - 8) == (fl, sl)

    def test_largest_block_has_a_bin(self):
        fl, sl = F.size_class(F.MAX_BLOCK)
        assert fl < F.FL_COUNT and sl < F.SL_COUNT
        assert F.bin_index(fl, sl) * F.WORD < F.CTL_END


class TestSearchClass:
    def test_docstring_example(self):
        assert F.search_class(300) == (1, 6)

    @staticmethod
    def _verify(s: int) -> None:
        c = F.search_class(s)
        lo, _ = bin_bounds(*c)
        # Every block of that bin holds s bytes ...
        assert lo >= s, (s, c, lo)
        # ... and the bin is the first such one: the bin before it has blocks smaller than s.
        k = linear(c)
        if k > 0 and s > F.MIN_BLOCK:
            before = divmod(k - 1, F.SL_COUNT)
            assert bin_bounds(*before)[0] < s, (s, c, before)
        # The block is never put in a bin below the one searched for a block of its own size.
        assert linear(F.size_class(s)) <= k

    def test_exhaustive(self):
        for s in EXHAUSTIVE:
            self._verify(s)

    @given(big_sizes)
    def test_sampled(self, s):
        self._verify(s)

    def test_exact_below_small_limit(self):
        for s in range(F.MIN_BLOCK, F.SMALL_LIMIT, 8):
            assert F.search_class(s) == F.size_class(s)

    def test_class_boundaries_are_found_directly(self):
        # A size that is exactly a bin's lower bound needs no rounding up.
        for fl, sl in all_bins():
            lo, _ = bin_bounds(fl, sl)
            if lo >= F.MIN_BLOCK:
                assert F.search_class(lo) == (fl, sl)
                # One word more needs the next bin.
                assert linear(F.search_class(lo + 8)) == linear((fl, sl)) + 1

    def test_malloc_inline_search_matches(self):
        # Allocator.malloc inlines search_class; a free block of each class must be found by a
        # request of exactly its class bound (checked through a real heap below the 1 MiB line).
        h = pheap.anonymous(4 << 20)
        try:
            for s in (256, 264, 296, 512, 528, 4096, 4224, 65536, 69632):
                a = h.malloc(s - 8)
                guard = h.malloc(8)
                h.free(a)
                assert h.malloc(s - 8) == a, s  # the free block of exactly s is reused
                h.free(a)
                h.free(guard)
            h.check()
        finally:
            h.close()


class TestRequestToBlock:
    def test_small_values(self):
        for n in range(0, 4096):
            s = F.request_to_block(n)
            assert s % F.ALIGN == 0
            assert s >= F.MIN_BLOCK
            assert s - F.BLOCK_OVERHEAD >= n
            assert s == max(F.MIN_BLOCK, F.round_up(n + F.BLOCK_OVERHEAD, F.ALIGN))

    @given(st.integers(0, F.MAX_BLOCK - F.BLOCK_OVERHEAD))
    def test_minimal(self, n):
        s = F.request_to_block(n)
        assert s - F.BLOCK_OVERHEAD >= n
        assert s == F.MIN_BLOCK or s - F.ALIGN - F.BLOCK_OVERHEAD < n
        assert s <= F.MAX_BLOCK

    def test_examples(self):
        assert F.request_to_block(0) == 32
        assert F.request_to_block(24) == 32
        assert F.request_to_block(25) == 40
        assert F.request_to_block(100) == 112


class TestBitmap:
    @given(st.integers(F.min_capacity() // F.PAGE, (1 << 36) // F.PAGE).map(lambda k: k * F.PAGE))
    def test_bitmap_covers_every_word(self, cap):
        nbytes = F.bitmap_bytes(cap)
        off = F.bitmap_off(cap)
        assert nbytes % F.WORD == 0
        assert off + nbytes == cap
        assert off % F.WORD == 0
        assert nbytes * 8 >= cap // F.WORD  # one bit for every word of the mapping
        assert nbytes * 8 < cap // F.WORD + 64  # and no more than a word of slack
        # The bit of the last word below the bitmap lands inside the bitmap.
        last_word = (off - F.WORD) // F.WORD
        assert off + last_word // 8 < cap

    def test_examples(self):
        assert F.bitmap_bytes(1 << 20) == (1 << 20) // 64
        assert F.bitmap_off(1 << 20) == (1 << 20) - (1 << 14)
        assert F.bitmap_bytes(64 * 8 + 64) % 8 == 0

    def test_min_capacity(self):
        m = F.min_capacity()
        assert m % F.PAGE == 0
        assert F.bitmap_off(m) - F.BLOCKS_OFF >= F.PAGE
        h = pheap.anonymous(0)  # the smallest heap there is
        try:
            assert h.capacity == m
            h.free(h.malloc(100))
            h.check()
        finally:
            h.close()


class TestHeaderCrc:
    def test_matches_zlib(self):
        buf = bytes(range(256)) * 16
        assert F.header_crc(buf) == zlib.crc32(buf[:F.CRC_END]) & 0xFFFFFFFF

    def test_buffer_types_agree(self):
        buf = bytes(range(200))
        assert F.header_crc(buf) == F.header_crc(bytearray(buf)) == F.header_crc(memoryview(buf))

    def test_covers_exactly_the_immutable_fields(self):
        buf = bytearray(F.HEADER_SIZE)
        base = F.header_crc(buf)
        for i in range(F.CRC_END):
            b2 = bytearray(buf)
            b2[i] ^= 0x40
            assert F.header_crc(b2) != base, i
        for i in (F.CRC_END, F.CRC_END + 7, F.H_CAPACITY * 8, F.H_ROOT * 8, F.HEADER_SIZE - 1):
            b2 = bytearray(buf)
            b2[i] ^= 0xFF
            assert F.header_crc(b2) == base, i

    def test_real_heap_header(self):
        h = pheap.anonymous(0)
        try:
            mm = h._region.mm
            (crc,) = struct.unpack_from("<Q", mm, F.H_CRC * 8)
            assert crc == F.header_crc(mm) and crc <= 0xFFFFFFFF
        finally:
            h.close()


class TestBlockWords:
    def test_helpers(self):
        for size in (32, 40, 4096, 1 << 40):
            for flags in range(8):
                word = size | flags
                assert F.block_size(word) == size
                assert F.is_free(word) == bool(flags & F.FREE)
                assert F.is_prev_free(word) == bool(flags & F.PREV_FREE)

    def test_flag_bits(self):
        bits = [F.FREE, F.PREV_FREE, F.RELEASED]
        assert sorted(bits) == [1, 2, 4]
        assert F.FREE | F.PREV_FREE | F.RELEASED == F.FLAG_MASK
        assert F.SIZE_MASK & F.FLAG_MASK == 0
        assert (F.SIZE_MASK | F.FLAG_MASK) & 0xFFFFFFFFFFFFFFFF == 0xFFFFFFFFFFFFFFFF

    def test_round_up(self):
        for m in (8, 4096, 1 << 16):
            for n in (0, 1, m - 1, m, m + 1, 5 * m + 3):
                r = F.round_up(n, m)
                assert r % m == 0 and n <= r < n + m


# ---------------------------------------------------------------------------------------------
# The layout constants against the docstring table and each other
# ---------------------------------------------------------------------------------------------

HEADER_ROW = re.compile(r"^(\d+)\s+(\d+)\s+([a-z_]+)\s", re.M)
FLAG_ROW = re.compile(r"^(\d+)\s+([A-Z_]+)\s", re.M)
CONSTANT_FOR = {"created_ns": "H_CREATED"}


def header_table() -> list[tuple[int, int, str]]:
    rows = [(int(o), int(s), f) for o, s, f in HEADER_ROW.findall(F.__doc__ or "")]
    assert len(rows) >= 20, "the header table in pheap/format.py's docstring was not found"
    return rows


class TestLayout:
    def test_table_matches_word_indexes(self):
        for off, size, field in header_table():
            prefix = "" if field.startswith("j_") else "H_"
            name = CONSTANT_FOR.get(field, prefix + field.upper())
            assert hasattr(F, name), f"no constant {name} for header field {field!r}"
            assert getattr(F, name) * F.WORD == off, (field, off)
            if field == "journal" or field == "j_entries":  # the rest of the header page
                assert off + size == F.HEADER_SIZE and off >= F.JOURNAL_OFF
            elif field == "uuid":
                assert size == 16
            else:
                assert size == F.WORD, field

    def test_table_rows_do_not_overlap_and_fit_the_header(self):
        rows = sorted(header_table())
        for (o1, s1, f1), (o2, _, f2) in zip(rows, rows[1:], strict=False):
            assert o1 + s1 <= o2, (f1, f2)
        last_off, last_size, _ = rows[-1]
        assert last_off + last_size == F.HEADER_SIZE

    def test_crc_covers_the_fields_above_it(self):
        offs = {f: o for o, _, f in header_table()}
        assert F.CRC_END == offs["crc"]
        assert all(offs[f] < F.CRC_END for f in ("magic", "version", "features", "byte_order",
                                                   "uuid", "ctl_off", "blocks_off", "fl_count",
                                                   "sl_count"))
        assert all(offs[f] > F.CRC_END for f in ("capacity", "brk", "generation", "root"))

    def test_flag_table_matches_constants(self):
        rows = FLAG_ROW.findall(F.__doc__ or "")
        assert rows, "the flag table in pheap/format.py's docstring was not found"
        for bit, name in rows:
            assert getattr(F, name) == 1 << int(bit), name

    def test_control_block(self):
        assert F.C_FL_BITMAP * F.WORD == F.CTL_OFF
        assert F.C_SL_BITMAP == F.C_FL_BITMAP + 1
        assert F.C_HEADS == F.C_SL_BITMAP + F.FL_COUNT
        assert F.bin_index(0, 0) == F.C_HEADS
        assert (F.bin_index(F.FL_COUNT - 1, F.SL_COUNT - 1) + 1) * F.WORD == F.CTL_END
        assert F.HEADER_SIZE <= F.CTL_OFF < F.CTL_END <= F.BLOCKS_OFF
        idx = {F.bin_index(fl, sl) for fl in range(F.FL_COUNT) for sl in range(F.SL_COUNT)}
        assert len(idx) == F.FL_COUNT * F.SL_COUNT

    def test_constants(self):
        assert F.MAGIC == b"\x93PHEAP\r\n" and len(F.MAGIC) == F.WORD
        assert F.SL_COUNT == 1 << F.SL_LOG2
        assert F.SMALL_LIMIT == F.SL_COUNT * F.ALIGN
        assert F.MIN_BLOCK == 4 * F.WORD
        assert F.BLOCKS_OFF % F.PAGE == 0 and F.HEADER_SIZE == F.PAGE
        assert struct.pack("<Q", F.BYTE_ORDER_MARK) == bytes(range(1, 9))
        assert F.MAX_BLOCK % F.PAGE == 0
        assert F.FEATURES_KNOWN == 0 and F.FORMAT_VERSION == 1
        assert F.STATE_IDLE != F.STATE_IN_OP
        assert F.H_RECOVERIES * F.WORD < F.JOURNAL_OFF
        assert F.JOURNAL_OFF + F.JOURNAL_SIZE == F.HEADER_SIZE


@settings(max_examples=200)
@given(st.integers(1, 1 << 40))
def test_size_class_accepts_any_size_in_range(s):
    fl, sl = F.size_class(s)
    assert 0 <= fl < F.FL_COUNT and 0 <= sl < F.SL_COUNT


@pytest.mark.parametrize("s", [F.MIN_BLOCK, 248, 256, 4096, 1 << 30])
def test_search_not_below_size(s):
    assert linear(F.search_class(s)) >= linear(F.size_class(s))
