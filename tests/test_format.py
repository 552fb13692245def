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
            for s in (512, 528, 4096, 4224, 65536, 69632):
                a = h.malloc(s - 8)
                guard = h.malloc(600)
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
        assert F.meta_off(m) - F.BLOCKS_OFF >= 2 * F.PAGE
        h = pheap.anonymous(0)  # the smallest heap there is: room for a run and a block
        try:
            assert h.capacity == m
            h.free(h.malloc(100))
            h.free(h.malloc(1000))
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
            mm = h._core.region.mm
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
        assert sorted(bits) == [1, 2, 4] and F.RUN == F.RELEASED  # bit 2: by FREE's value
        assert F.FREE | F.PREV_FREE | F.RELEASED == F.FLAG_MASK
        assert F.SIZE_MASK & F.FLAG_MASK == 0
        classes = 0xFF << F.CLASS_SHIFT
        assert F.SIZE_MASK & classes == 0
        assert F.SIZE_MASK | F.FLAG_MASK | classes == (1 << 56) - 1

    def test_run_words(self):
        for c in range(F.CLASS_COUNT):
            hdr = F.run_header(c)
            assert F.is_run(hdr) and not F.is_free(hdr) and F.run_class(hdr) == c
            assert F.block_size(hdr) == F.CLASS_PAGES[c] * F.PAGE
            assert not F.is_run(hdr | F.FREE)  # a free block's bit 2 means RELEASED
            for i in range(F.CLASS_PAGES[c]):
                v = F.page_map_byte(c, i)
                assert 0 < v < 256 and (v & F.PM_CLASS) - 1 == c and v >> F.PM_SHIFT == i
        assert not F.is_run(4096)

    def test_round_up(self):
        for m in (8, 4096, 1 << 16):
            for n in (0, 1, m - 1, m, m + 1, 5 * m + 3):
                r = F.round_up(n, m)
                assert r % m == 0 and n <= r < n + m


# ---------------------------------------------------------------------------------------------
# The layout constants against the docstring table and each other
# ---------------------------------------------------------------------------------------------

HEADER_ROW = re.compile(r"^(\d+)\s+(\d+)\s+([a-z_]+)\s", re.M)
FLAG_ROW = re.compile(r"^(\d+)\s+([A-Z_/]+)\s", re.M)
CONSTANT_FOR = {"created_ns": "H_CREATED"}
NO_CONSTANT = {"reserved"}  # rows that name no field yet


def header_table() -> list[tuple[int, int, str]]:
    doc = F.__doc__ or ""
    doc = doc[:doc.index("**The journal**")]  # the header table comes first
    rows = [(int(o), int(s), f) for o, s, f in HEADER_ROW.findall(doc)]
    assert len(rows) >= 20, "the header table in pheap/format.py's docstring was not found"
    return rows


class TestLayout:
    def test_table_matches_word_indexes(self):
        for off, size, field in header_table():
            if field in NO_CONSTANT:
                continue
            prefix = "" if field.startswith("j_") else "H_"
            name = CONSTANT_FOR.get(field, prefix + field.upper())
            assert hasattr(F, name), f"no constant {name} for header field {field!r}"
            assert getattr(F, name) * F.WORD == off, (field, off)
            if field == "j_records":  # the rest of the header page
                assert off + size == F.HEADER_SIZE and off >= F.JOURNAL_OFF
            elif field in ("uuid", "secret"):
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
                                                   "sl_count", "class_count", "page", "secret"))
        assert all(offs[f] > F.CRC_END for f in ("capacity", "brk", "generation", "root"))

    def test_flag_table_matches_constants(self):
        rows = FLAG_ROW.findall(F.__doc__ or "")
        assert len(rows) == 3, "the flag table in pheap/format.py's docstring was not found"
        for bit, names in rows:
            for name in names.split("/"):
                assert getattr(F, name) == 1 << int(bit), name

    def test_control_block(self):
        assert F.C_FL_BITMAP * F.WORD == F.CTL_OFF
        assert F.C_SL_BITMAP == F.C_FL_BITMAP + 1
        assert F.C_HEADS == F.C_SL_BITMAP + F.FL_COUNT
        assert F.bin_index(0, 0) == F.C_HEADS
        assert F.bin_index(F.FL_COUNT - 1, F.SL_COUNT - 1) + 1 == F.C_CLASS_HEADS
        assert F.C_CLASS_CACHE == F.C_CLASS_HEADS + F.CLASS_COUNT
        assert (F.C_CLASS_CACHE + F.CLASS_COUNT) * F.WORD == F.CTL_END
        assert F.HEADER_SIZE <= F.CTL_OFF < F.CTL_END <= F.BLOCKS_OFF
        idx = {F.bin_index(fl, sl) for fl in range(F.FL_COUNT) for sl in range(F.SL_COUNT)}
        assert len(idx) == F.FL_COUNT * F.SL_COUNT

    def test_constants(self):
        assert F.MAGIC == b"\x93PHEAP\r\n" and len(F.MAGIC) == F.WORD
        assert F.SL_COUNT == 1 << F.SL_LOG2
        assert F.SMALL_LIMIT == F.SL_COUNT * F.ALIGN
        assert F.MIN_BLOCK == 4 * F.WORD
        assert (F.BLOCKS_OFF + F.WORD) % F.PAGE == 0 and F.HEADER_SIZE == F.PAGE
        assert struct.pack("<Q", F.BYTE_ORDER_MARK) == bytes(range(1, 9))
        assert F.MAX_BLOCK % F.PAGE == 0
        assert F.FEATURES_KNOWN == 0 and F.FORMAT_VERSION == 2
        assert F.STATE_IDLE != F.STATE_REBUILD
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


class TestRunGeometry:
    def test_tables_agree(self):
        n = F.CLASS_COUNT
        assert len(F.CLASS_PAGES) == len(F.CLASS_WORDS) == len(F.CLASS_FIRST) == \
            len(F.CLASS_SLOTS) == len(F.CLASS_MASKS) == n
        for c in range(n):
            m = F.CLASS_WORDS[c]
            assert F.CLASS_FIRST[c] == 3 * m * F.WORD  # bits, next and prev words
            assert 64 * (m - 1) < F.CLASS_SLOTS[c] <= 64 * m
            assert sum(bin(x).count("1") for x in F.CLASS_MASKS[c]) == F.CLASS_SLOTS[c]
            assert 1 <= F.CLASS_PAGES[c] <= F.MAX_RUN_PAGES
            # the slots end before the last word of the run: the next block's header is there
            end = F.CLASS_FIRST[c] + F.CLASS_SLOTS[c] * F.CLASS_SIZE[c]
            assert end <= F.CLASS_PAGES[c] * F.PAGE - F.WORD

    def test_class_of(self):
        assert len(F.CLASS_OF) == F.RUN_LIMIT + 1
        assert F.CLASS_OF[0] == F.CLASS_OF[1] == F.CLASS_OF[8] == 0
        assert F.CLASS_SIZE[F.CLASS_OF[9]] == 16
        assert F.CLASS_SIZE[F.CLASS_OF[F.RUN_LIMIT]] == F.RUN_LIMIT


class TestHeader:
    def test_new_header_validates(self):
        cap = 1 << 20
        head = F.new_header(cap, 0)
        assert len(head) == F.HEADER_SIZE
        assert F.validate_header(head, cap) == cap
        w = struct.unpack_from(f"<{F.J_STATE + 1}Q", head)
        F.validate_fields(w, cap)

    def test_two_headers_differ_in_uuid_and_secret(self):
        a, b = F.new_header(1 << 20, 0), F.new_header(1 << 20, 0)
        for field in (F.H_UUID, F.H_SECRET):
            assert a[field * 8:field * 8 + 16] != b[field * 8:field * 8 + 16]

    @pytest.mark.parametrize("field,value,match", [
        (F.H_BRK, F.BLOCKS_OFF - 8, "brk"), (F.H_BRK, F.BLOCKS_OFF + 4, "brk"),
        (F.H_PEAK_BRK, 8, "peak_brk"), (F.H_ZERO_FROM, 0, "zero_from"),
        (F.H_HOLE_FROM, 1 << 30, "hole_from"), (F.H_GENERATION, 0, "generation"),
        (F.H_MAX_SIZE, 4096, "max_size"), (F.H_ROOT, 12345, "root"),
        (F.H_OBJECTS, 1 << 40, "objects"), (F.H_TXLOG, 8, "txlog"), (F.J_STATE, 7, "j_state"),
    ])
    def test_validate_fields_names_the_field(self, field, value, match):
        cap = 1 << 20
        head = bytearray(F.new_header(cap, 0))
        struct.pack_into("<Q", head, field * 8, value)
        w = struct.unpack_from(f"<{F.J_STATE + 1}Q", head)
        with pytest.raises(pheap.CorruptHeapError, match=match) as ei:
            F.validate_fields(w, cap)
        assert f"offset {field * 8}" in str(ei.value)

    def test_capacity_is_checked_against_the_file(self):
        head = F.new_header(1 << 20, 0)
        with pytest.raises(pheap.CorruptHeapError, match="truncated"):
            F.validate_header(head, (1 << 20) - F.PAGE)

    def test_version_1_is_refused_with_a_clear_message(self):
        head = bytearray(F.new_header(1 << 20, 0))
        struct.pack_into("<Q", head, F.H_VERSION * 8, 1)
        struct.pack_into("<Q", head, F.H_CRC * 8, F.header_crc(head))
        with pytest.raises(pheap.FormatError, match="version 1.*pheap 0.1"):
            F.validate_header(bytes(head), 1 << 20)
