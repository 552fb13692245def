"""Heap format v2: the byte layout of a heap, and the only module that knows it.

Every number in a heap is an unsigned 64-bit little-endian word; every reference is a byte offset
from the start of the mapping, and 0 means NULL. Other modules use the named word indexes and the
tiny helpers below, never bare arithmetic on offsets.

A heap is one mapping (a file, a memfd or an anonymous shared region) of ``capacity`` bytes::

    0        4096            16376                     brk          meta_off              capacity
    | header | control block |  blocks ... [free|used|run] | wilderness | page map | alloc bitmap |

Header (page 0). Fields above ``crc`` never change after creation and are covered by the CRC.

=======  ====  ===============  ==========================================================
offset   size  field            meaning
=======  ====  ===============  ==========================================================
0        8     magic            ``b"\\x93PHEAP\\r\\n"``: not text, catches newline mangling
8        8     version          format version, ``FORMAT_VERSION`` (2); others are refused
16       8     features         incompatible feature bits; an unknown bit is refused
24       8     byte_order       ``0x0807060504030201``; reads differently on big-endian hosts
32       16    uuid             random, identifies the heap (shown by ``pheap info``)
48       8     ctl_off          offset of the control block (4096)
56       8     blocks_off       offset of the first block header (16376)
64       8     created_ns       creation time, ns since the epoch
72       8     fl_count         first-level bin count (41)
80       8     sl_count         second-level bins per first level (32)
88       8     class_count      size classes of run slots (``len(CLASS_SIZE)``)
96       8     page             bytes per page of runs and of the page map (4096)
104      16    secret           random key of the stable hash the object layer keeps in the heap
120      8     crc              CRC-32 of bytes [0, 120) in the low 32 bits
128      8     capacity         bytes of the mapping in use; the file is at least this long
136      8     brk              end of the block area: blocks live in [blocks_off, brk)
144      8     zero_from        every byte in [zero_from, meta_off) is zero (calloc skips it)
152      8     hole_from        bytes in [hole_from, meta_off) may be holes with no disk blocks
160      8     generation       bumped whenever capacity changes; processes remap when it moves
168      8     root             entry ``root``: the raw root offset users set (0 = none)
176      8     objects          entry ``objects``: the object layer's root dict (0 = none)
184      8     max_size         largest capacity the heap may grow to (0 = unlimited)
192      8     peak_brk         high-water mark of brk since creation (utilization figures)
200      8     txlog            offset of the transaction log block (0 = none yet)
208      8     obj_seq          the object layer's version counter (odd while a writer is inside)
216      8     obj_serial       the last serial number given to a shared object
224      8     obj_grave        first object waiting to be freed (a list through the objects)
232      8     obj_all          first of all shared objects (a list through their headers)
240      8     entry_check      ``entry_check(root, objects, txlog)``: a damaged entry word
                                shows as a mismatch instead of naming the wrong block
248      8     reserved         zero; later entries
256      8     owner_pid        pid of the process holding the lock; left set on release when
                                work is pending (0 = none): an acquirer that finds it set
                                recovers first
264      8     owner_state      ``STATE_IDLE``, or ``STATE_REBUILD`` while a rebuild runs
272      8     (reserved)
280      8     recoveries       times a dead holder's work was recovered
512      8     j_state          0 idle; 1 operation or atomic bracket: records below are live;
                                2 transaction: records in the txlog block are live
520      8     (reserved)
528      3568  j_records        the operation journal's undo records, ended by a 0 word
=======  ====  ===============  ==========================================================

**The journal** is an undo log (:mod:`pheap.journal`). A record is live once its first word is
written, and only then does the word it protects change; clearing ``j_state`` commits. Records:

==================  =================================================================
record              words
==================  =================================================================
word                ``index``, ``old``, ``index ^ old ^ J_MIX``
byte range          ``RANGE_FLAG | n``, ``offset``, ``crc32(old bytes) ^ offset ^ n``,
                    then the n old bytes padded to whole words
end                 one 0 word
==================  =================================================================

The check word makes a damaged record an error on recovery, never a silent write. Recovery
writes the old values back, last record first; restoring is idempotent.

**Control block** (from ``ctl_off``): ``fl_bitmap`` (1 word: bit f set when some bin of first
level f is non-empty), ``sl_bitmap[fl_count]`` (bit s of word f set when bin (f, s) is
non-empty), ``heads[fl_count * sl_count]`` (offset of the first free block of bin (f, s)),
``class_heads[class_count]`` (word index of the first bitmap word with a free slot of class c,
0 when none), ``class_cache[class_count]`` (offset of one empty run of class c kept for reuse, or
0; a hint, checked before use).

**Bins** (two-level segregated fit). A free block of ``size`` bytes lives in bin
``size_class(size)``: sizes below ``SMALL_LIMIT`` (256) have exact 8-byte classes in first level
0; above, first level ``floor(log2(size)) - 7`` is split into 32 equal second-level ranges.

**Blocks.** Every block starts with a header word; block sizes are multiples of 8, at least
``MIN_BLOCK`` (32), and include the header. The offset handed to users is ``block + 8``.

=====  ============  ===================================================================
bits   name          meaning
=====  ============  ===================================================================
0      FREE          this block is free
1      PREV_FREE     the block just before this one is free (its footer holds its size)
2      RELEASED/RUN  on a free block: some of its pages were given back to the OS;
                     on a used block: the block is a run of small slots
3-47   size          block size in bytes (the low three bits are masked off)
48-55  class         on a run: its size class; 0 on every other block
=====  ============  ===================================================================

A used block is ``[header][payload ...]``. A free block is
``[header][next][prev] ... [footer = size]``: next/prev link it into its bin (0 ends the list).
Two free blocks are never adjacent, and the block just below ``brk`` is never free (it merges into
the wilderness instead).

**Runs** (small blocks). Requests up to ``RUN_LIMIT`` bytes are served as *slots* of a run: a
used block of ``CLASS_PAGES[c]`` pages whose payload starts on a page boundary (so its header is
the last word of the page before) and holds equal slots of ``CLASS_SIZE[c]`` bytes with no header
of their own. With ``m = CLASS_WORDS[c]``, at the payload ``base``:

==================  ===========  ===========================================================
offset from base    size         field
==================  ===========  ===========================================================
0                   8 m          ``bits[m]``: bit i of word j set when slot 64 j + i is free
8 m                 8 m          ``next[m]``: next bitmap word (word index) of this class with
                                 a free slot, 0 at the end
16 m                8 m          ``prev[m]``: previous one, 0 at the head
``CLASS_FIRST[c]``  size * n     the ``n = CLASS_SLOTS[c]`` slots
==================  ===========  ===========================================================

A bitmap word with a free slot is always on its class's list (from ``class_heads[c]``); a full
word may still be on it (malloc takes a full word off the list when it meets one: lazily, so
that a slot taken and freed again costs one store), and a word off the list has
``prev = UNLISTED`` (1, a word index no bitmap word can have).

**Metadata at the end of the mapping** (``meta_off = capacity - page_map_bytes -
bitmap_bytes``). The *page map*: one byte per page of the mapping; for a page that holds part of
a run's payload, ``(class + 1) | (page index within the run << 5)``, else 0. It finds the run of
a slot in O(1). The *allocation bitmap*: one bit per 8-byte word; the bit of offset ``b`` is set
exactly when a used block (a run included) starts at ``b``. Together they tell a live block or
slot from a double free or an interior pointer, exactly and in O(1). Both move to the new end
when the heap grows.
"""

from __future__ import annotations

import os

import struct
import time
import zlib
from typing import Final

from .errors import CorruptHeapError, FormatError

# ---------------------------------------------------------------------------------------------
# Format constants: changing any of these changes the file format (bump FORMAT_VERSION).
# ---------------------------------------------------------------------------------------------

MAGIC: Final = b"\x93PHEAP\r\n"  #: first 8 bytes of every heap
FORMAT_VERSION: Final = 2  #: the only version this code reads and writes (1: pheap 0.1)
FEATURES_KNOWN: Final = 0  #: incompatible feature bits this version understands (none yet)
BYTE_ORDER_MARK: Final = 0x0807060504030201  #: bytes 01..08 read as a native little-endian word
WORD: Final = 8  #: bytes per word; every field is one word
ALIGN: Final = 8  #: block, slot and payload alignment, bytes
PAGE: Final = 4096  #: bytes per page: header size, runs, page map, release granularity
HEADER_SIZE: Final = PAGE  #: bytes of the header page
CTL_OFF: Final = HEADER_SIZE  #: offset of the control block
BLOCKS_OFF: Final = 4 * PAGE - WORD  #: offset of the first block header: its payload is
#: page-aligned, so runs tile from the first block on
FL_COUNT: Final = 41  #: first-level bins: sizes up to 2**48 bytes
SL_LOG2: Final = 5  #: log2 of second-level bins per first level
SL_COUNT: Final = 1 << SL_LOG2  #: second-level bins per first level (32)
SMALL_LIMIT: Final = 256  #: sizes below this have exact 8-byte classes (first level 0)
MIN_BLOCK: Final = 32  #: header + next + prev + footer: the smallest block that can be free
BLOCK_OVERHEAD: Final = WORD  #: bytes a used block spends on its header
MAX_BLOCK: Final = (1 << 48) - PAGE  #: largest block the bins can index
JOURNAL_OFF: Final = 512  #: offset of the journal area in the header page
JOURNAL_SIZE: Final = HEADER_SIZE - JOURNAL_OFF  #: bytes reserved for the journal

# Header flag bits of a block header word.
FREE: Final = 1  #: bit 0: the block is free
PREV_FREE: Final = 2  #: bit 1: the previous block is free
RELEASED: Final = 4  #: bit 2 of a free block: some of its pages went back to the OS
RUN: Final = 4  #: bit 2 of a used block: the block is a run of slots
FLAG_MASK: Final = 7  #: the three flag bits
CLASS_SHIFT: Final = 48  #: a run's header keeps its class in bits 48-55
SIZE_MASK: Final = (1 << CLASS_SHIFT) - 8  #: the size bits of a header word

# Size classes of run slots (jemalloc-like spacing: 8-byte steps to 64, then 4 per doubling).
CLASS_SIZE: Final = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
                     384, 448)  #: slot bytes of each class
RUN_LIMIT: Final = CLASS_SIZE[-1]  #: requests up to this many bytes are run slots
CLASS_COUNT: Final = len(CLASS_SIZE)  #: number of classes
MAX_RUN_WASTE: Final = 0.03  #: a class's run takes the fewest pages that waste at most this ...
MAX_RUN_PAGES: Final = 4  #: ... of the run, and never more pages than this (page map: 3 bits)


def _run_geometry(size: int) -> tuple[int, int, int, int]:
    """(pages, bitmap words, first slot offset from base, slots) of a run of ``size``-byte slots:
    the fewest pages whose waste is at most MAX_RUN_WASTE, else the least wasteful."""
    best: tuple[float, int, int, int, int] | None = None
    for pages in range(1, MAX_RUN_PAGES + 1):
        room = pages * PAGE - WORD  # the block header sits in the page before
        m = 1
        while True:  # bitmap + next + prev words, 3 per 64 slots
            n = (room - 24 * m) // size
            need = (n + 63) // 64
            if need <= m:
                break
            m = need
        n = (room - 24 * m) // size
        waste = (pages * PAGE - n * size) / (pages * PAGE)
        if best is None or waste < best[0] - 0.005:
            best = (waste, pages, m, 24 * m, n)
        if waste <= MAX_RUN_WASTE:
            break
    assert best is not None
    return best[1], best[2], best[3], best[4]


_GEOMETRY = tuple(_run_geometry(s) for s in CLASS_SIZE)
CLASS_PAGES: Final = tuple(g[0] for g in _GEOMETRY)  #: pages of a run of each class
CLASS_WORDS: Final = tuple(g[1] for g in _GEOMETRY)  #: bitmap words (m) of each class
CLASS_FIRST: Final = tuple(g[2] for g in _GEOMETRY)  #: offset of slot 0 from the run's base
CLASS_SLOTS: Final = tuple(g[3] for g in _GEOMETRY)  #: slots of a run of each class
CLASS_MASKS: Final = tuple(
    tuple(((1 << min(64, n - 64 * j)) - 1) for j in range(m))
    for (_, m, _, n) in _GEOMETRY)  #: per class, the bits of each bitmap word that are slots
#: class of a request of n bytes, for n in [0, RUN_LIMIT]
CLASS_OF: Final = tuple(next(c for c, s in enumerate(CLASS_SIZE) if s >= max(n, 1))
                        for n in range(RUN_LIMIT + 1))
UNLISTED: Final = 1  #: prev link of a run bitmap word that is not on its class's list
PM_CLASS: Final = 31  #: page-map byte bits holding class + 1
PM_SHIFT: Final = 5  #: page-map byte: page index within the run from this bit

# Owner states.
STATE_IDLE: Final = 0  #: no rebuild in progress
STATE_REBUILD: Final = 2  #: owner_pid is rebuilding the index: a crash in it rebuilds again

# ---------------------------------------------------------------------------------------------
# Word indexes into the header (byte offset // 8). Algorithm code uses these names only.
# ---------------------------------------------------------------------------------------------

H_MAGIC: Final = 0  #: word index of magic
H_VERSION: Final = 1  #: word index of version
H_FEATURES: Final = 2  #: word index of features
H_BYTE_ORDER: Final = 3  #: word index of byte_order
H_UUID: Final = 4  #: word index of the uuid (two words)
H_CTL_OFF: Final = 6  #: word index of ctl_off
H_BLOCKS_OFF: Final = 7  #: word index of blocks_off
H_CREATED: Final = 8  #: word index of created_ns
H_FL_COUNT: Final = 9  #: word index of fl_count
H_SL_COUNT: Final = 10  #: word index of sl_count
H_CLASS_COUNT: Final = 11  #: word index of class_count
H_PAGE: Final = 12  #: word index of page
H_SECRET: Final = 13  #: word index of the secret (two words)
H_CRC: Final = 15  #: word index of crc
CRC_END: Final = H_CRC * WORD  #: the CRC covers bytes [0, CRC_END)

H_CAPACITY: Final = 16  #: word index of capacity
H_BRK: Final = 17  #: word index of brk
H_ZERO_FROM: Final = 18  #: word index of zero_from
H_HOLE_FROM: Final = 19  #: word index of hole_from
H_GENERATION: Final = 20  #: word index of generation
H_ROOT: Final = 21  #: word index of entry ``root``
H_OBJECTS: Final = 22  #: word index of entry ``objects``
H_MAX_SIZE: Final = 23  #: word index of max_size
H_PEAK_BRK: Final = 24  #: word index of peak_brk
H_TXLOG: Final = 25  #: word index of txlog
H_OBJ_SEQ: Final = 26  #: word index of obj_seq
H_OBJ_SERIAL: Final = 27  #: word index of obj_serial
H_OBJ_GRAVE: Final = 28  #: word index of obj_grave
H_OBJ_ALL: Final = 29  #: word index of obj_all
H_ENTRY_CHECK: Final = 30  #: word index of entry_check
ENTRY_MIX: Final = 0x454E545259434B31  #: mixed into entry_check ("ENTRYCK1")

H_OWNER_PID: Final = 32  #: word index of owner_pid
H_OWNER_STATE: Final = 33  #: word index of owner_state
H_RECOVERIES: Final = 35  #: word index of recoveries

#: Named entry points: header words that name a block the layers above start from. check()
#: verifies each names a live block; free() refuses a block an entry names.
ENTRIES: Final = {"root": H_ROOT, "objects": H_OBJECTS}

H_JOURNAL: Final = JOURNAL_OFF // WORD  #: word index of the first journal word
J_STATE: Final = H_JOURNAL  #: word index of j_state
J_RECORDS: Final = H_JOURNAL + 2  #: word index of the first operation-journal record
J_END: Final = HEADER_SIZE // WORD  #: first word index past the journal
J_OP: Final = 1  #: j_state: records in the header are live (an operation or atomic bracket)
J_TX: Final = 2  #: j_state: records in the txlog block are live (a transaction)
RANGE_FLAG: Final = 1 << 63  #: marks a byte-range record
J_MIX: Final = 0x5048454150A7C15E  #: mixed into every word record's check word
WORD_RECORD: Final = 3  #: words of a word record

# Control block word indexes.
C_FL_BITMAP: Final = CTL_OFF // WORD  #: word index of the first-level bitmap
C_SL_BITMAP: Final = C_FL_BITMAP + 1  #: word index of sl_bitmap[0]
C_HEADS: Final = C_SL_BITMAP + FL_COUNT  #: word index of heads[0][0]
C_CLASS_HEADS: Final = C_HEADS + FL_COUNT * SL_COUNT  #: word index of class_heads[0]
C_CLASS_CACHE: Final = C_CLASS_HEADS + CLASS_COUNT  #: word index of class_cache[0]
CTL_END: Final = (C_CLASS_CACHE + CLASS_COUNT) * WORD  #: first byte after the control block

# Layout sanity, checked at import (a failure here is a programming error, not a runtime one).
assert MIN_BLOCK % ALIGN == 0 and MIN_BLOCK >= 4 * WORD
assert SMALL_LIMIT == 1 << (SL_LOG2 + 3)  # level 0 holds 32 exact classes of 8 bytes
assert CTL_END <= BLOCKS_OFF, (CTL_END, BLOCKS_OFF)
assert H_RECOVERIES * WORD < JOURNAL_OFF and H_OBJ_ALL < H_OWNER_PID
assert (BLOCKS_OFF + WORD) % PAGE == 0
assert (MAX_BLOCK - 1).bit_length() - 1 - 7 < FL_COUNT
assert struct.calcsize("<Q") == WORD
assert CLASS_COUNT < PM_CLASS and MAX_RUN_PAGES <= 1 << (8 - PM_SHIFT)
assert all(s % ALIGN == 0 for s in CLASS_SIZE) and RUN_LIMIT < SMALL_LIMIT * 2
assert all(CLASS_FIRST[c] + CLASS_SLOTS[c] * CLASS_SIZE[c] <= CLASS_PAGES[c] * PAGE - WORD
           for c in range(CLASS_COUNT))
assert all(CLASS_PAGES[c] * PAGE < SMALL_LIMIT * 64 for c in range(CLASS_COUNT))
assert MAX_BLOCK < 1 << CLASS_SHIFT


# ---------------------------------------------------------------------------------------------
# Block-word helpers. The allocator's hottest paths inline these (see the comments there).
# ---------------------------------------------------------------------------------------------


def block_size(word: int) -> int:
    """Size in bytes recorded in a block header word."""
    return word & SIZE_MASK


def is_free(word: int) -> bool:
    """True when a block header word says the block is free."""
    return bool(word & FREE)


def is_prev_free(word: int) -> bool:
    """True when a block header word says the previous block is free."""
    return bool(word & PREV_FREE)


def is_run(word: int) -> bool:
    """True when a block header word is a run's (used, with the RUN bit)."""
    return word & (FREE | RUN) == RUN


def run_header(c: int) -> int:
    """The header word of a run of class ``c`` (its previous block is used)."""
    return CLASS_PAGES[c] * PAGE | RUN | c << CLASS_SHIFT


def run_class(word: int) -> int:
    """The class a run's header word records."""
    return (word >> CLASS_SHIFT) & 0xFF


def page_map_byte(c: int, page_index: int) -> int:
    """The page-map byte of page ``page_index`` of a run of class ``c``."""
    return (c + 1) | page_index << PM_SHIFT


def request_to_block(n: int) -> int:
    """Block size for a payload of ``n`` bytes: header added, 8-aligned, at least MIN_BLOCK."""
    s = (n + BLOCK_OVERHEAD + ALIGN - 1) & ~(ALIGN - 1)
    return s if s > MIN_BLOCK else MIN_BLOCK


def size_class(size: int) -> tuple[int, int]:
    """Bin (first level, second level) where a free block of ``size`` bytes is kept.

    >>> size_class(32), size_class(248), size_class(256), size_class(300)
    ((0, 4), (0, 31), (1, 0), (1, 5))
    """
    if size < SMALL_LIMIT:
        return 0, size >> 3
    b = size.bit_length() - 1
    return b - 7, (size >> (b - SL_LOG2)) & (SL_COUNT - 1)


def search_class(size: int) -> tuple[int, int]:
    """First bin whose every block holds ``size`` bytes (the size rounded up to a class boundary).

    >>> search_class(300)
    (1, 6)
    """
    if size < SMALL_LIMIT:
        return 0, size >> 3
    size += (1 << (size.bit_length() - 1 - SL_LOG2)) - 1
    b = size.bit_length() - 1
    return b - 7, (size >> (b - SL_LOG2)) & (SL_COUNT - 1)


def bin_index(fl: int, sl: int) -> int:
    """Word index of the head of bin (fl, sl)."""
    return C_HEADS + fl * SL_COUNT + sl


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of the power of two ``m``."""
    return (n + m - 1) & ~(m - 1)


def bitmap_bytes(capacity: int) -> int:
    """Bytes of allocation bitmap a mapping of ``capacity`` bytes needs (one bit per word)."""
    return round_up(capacity // 64, WORD)


def page_map_bytes(capacity: int) -> int:
    """Bytes of page map a mapping of ``capacity`` bytes needs (one byte per page)."""
    return round_up(capacity // PAGE, WORD)


def bitmap_off(capacity: int) -> int:
    """Offset of the allocation bitmap in a mapping of ``capacity`` bytes."""
    return capacity - bitmap_bytes(capacity)


def meta_off(capacity: int) -> int:
    """Offset of the metadata (page map, then allocation bitmap): the end of the wilderness."""
    return capacity - bitmap_bytes(capacity) - page_map_bytes(capacity)


def min_capacity() -> int:
    """Smallest capacity that leaves room for one page of blocks."""
    return round_up(BLOCKS_OFF + 2 * PAGE + meta_bytes_for(BLOCKS_OFF + 4 * PAGE), PAGE)


def meta_bytes_for(capacity: int) -> int:
    """Bytes of page map and allocation bitmap of a mapping of ``capacity`` bytes."""
    return bitmap_bytes(capacity) + page_map_bytes(capacity)


# ---------------------------------------------------------------------------------------------
# The header: creating one, validating one (every check names the field and its offset)
# ---------------------------------------------------------------------------------------------

#: byte offsets of the header fields by name, for messages and tools
FIELD_OFFSETS: Final = {
    "magic": 0, "version": H_VERSION * WORD, "features": H_FEATURES * WORD,
    "byte_order": H_BYTE_ORDER * WORD, "uuid": H_UUID * WORD, "crc": H_CRC * WORD,
    "capacity": H_CAPACITY * WORD, "brk": H_BRK * WORD, "zero_from": H_ZERO_FROM * WORD,
    "hole_from": H_HOLE_FROM * WORD, "generation": H_GENERATION * WORD,
    "root": H_ROOT * WORD, "objects": H_OBJECTS * WORD, "max_size": H_MAX_SIZE * WORD,
    "peak_brk": H_PEAK_BRK * WORD, "txlog": H_TXLOG * WORD, "obj_seq": H_OBJ_SEQ * WORD,
    "obj_serial": H_OBJ_SERIAL * WORD, "obj_grave": H_OBJ_GRAVE * WORD,
    "obj_all": H_OBJ_ALL * WORD, "entry_check": H_ENTRY_CHECK * WORD,
    "owner_pid": H_OWNER_PID * WORD, "owner_state": H_OWNER_STATE * WORD,
    "j_state": J_STATE * WORD,
}


def at(field: str) -> str:
    """``'offset N (field)'`` for an error message about a header field."""
    return f"offset {FIELD_OFFSETS[field]} ({field})"


def header_crc(buf: bytes | bytearray | memoryview) -> int:
    """CRC-32 of the immutable header fields (bytes [0, CRC_END))."""
    return zlib.crc32(bytes(buf[:CRC_END])) & 0xFFFFFFFF


def entry_check(root: int, objects: int, txlog: int) -> int:
    """The check word of the three entry words (kept in ``entry_check``; every store of an
    entry stores it too, in the same operation)."""
    return zlib.crc32(struct.pack("<3Q", root, objects, txlog)) ^ ENTRY_MIX


def new_header(capacity: int, max_size: int) -> bytes:
    """The header page of a new, empty heap of ``capacity`` bytes (everything else zero)."""
    head = bytearray(HEADER_SIZE)
    head[0:8] = MAGIC
    struct.pack_into("<5Q", head, H_VERSION * WORD, FORMAT_VERSION, 0, BYTE_ORDER_MARK, 0, 0)
    head[H_UUID * WORD:H_UUID * WORD + 16] = os.urandom(16)
    struct.pack_into("<7Q", head, H_CTL_OFF * WORD, CTL_OFF, BLOCKS_OFF, time.time_ns(),
                     FL_COUNT, SL_COUNT, CLASS_COUNT, PAGE)
    head[H_SECRET * WORD:H_SECRET * WORD + 16] = os.urandom(16)
    struct.pack_into("<Q", head, H_CRC * WORD, header_crc(head))
    fields = {H_CAPACITY: capacity, H_BRK: BLOCKS_OFF, H_ZERO_FROM: BLOCKS_OFF,
              H_HOLE_FROM: meta_off(capacity), H_GENERATION: 1, H_MAX_SIZE: max_size,
              H_PEAK_BRK: BLOCKS_OFF, H_ENTRY_CHECK: entry_check(0, 0, 0)}
    for i, v in fields.items():
        struct.pack_into("<Q", head, i * WORD, v)
    return bytes(head)


def validate_header(head: bytes, file_size: int, what: str = "heap") -> int:
    """Check the header page of a heap; return its capacity. O(1).

    ``head`` is at least the first 4096 bytes, ``file_size`` the size of the file behind it.
    A file that is not a heap of this format raises FormatError; a capacity the file cannot
    hold raises CorruptHeapError. The other mutable fields are checked under the lock, after
    any recovery (:func:`validate_fields`): a process may be in the middle of changing them.
    """
    if len(head) < HEADER_SIZE:
        raise FormatError(f"{what}: {len(head)} bytes is too short for a pheap heap "
                          f"(the header alone is {HEADER_SIZE})")
    if head[:8] != MAGIC:
        raise FormatError(f"{what}: not a pheap heap (magic {bytes(head[:8])!r}, expected "
                          f"{MAGIC!r})")
    w = struct.unpack_from(f"<{H_CAPACITY + 1}Q", head, 0)
    if w[H_BYTE_ORDER] != BYTE_ORDER_MARK:
        raise FormatError(f"{what}: byte-order mark {w[H_BYTE_ORDER]:#x} is not "
                          f"{BYTE_ORDER_MARK:#x} (made on a machine of another byte order, or "
                          "damaged)")
    if w[H_VERSION] != FORMAT_VERSION:
        hint = (" (made by pheap 0.1, whose small blocks had no runs; this release cannot read "
                "it: open it with pheap 0.1 and copy the data out)") if w[H_VERSION] == 1 else ""
        raise FormatError(f"{what}: format version {w[H_VERSION]}; this pheap reads version "
                          f"{FORMAT_VERSION} only{hint}")
    if w[H_FEATURES] & ~FEATURES_KNOWN:
        raise FormatError(f"{what}: unknown feature bits {w[H_FEATURES] & ~FEATURES_KNOWN:#x}")
    crc = header_crc(head)
    if w[H_CRC] != crc:
        raise FormatError(f"{what}: header CRC {w[H_CRC]:#x} does not match {crc:#x} (the "
                          "immutable header fields are damaged)")
    layout = (w[H_CTL_OFF], w[H_BLOCKS_OFF], w[H_FL_COUNT], w[H_SL_COUNT], w[H_CLASS_COUNT],
              w[H_PAGE])
    want = (CTL_OFF, BLOCKS_OFF, FL_COUNT, SL_COUNT, CLASS_COUNT, PAGE)
    if layout != want:
        raise FormatError(f"{what}: layout (ctl_off, blocks_off, fl_count, sl_count, "
                          f"class_count, page) = {layout} differs from {want}")
    cap = w[H_CAPACITY]
    if cap < min_capacity() or cap % PAGE:
        raise CorruptHeapError(f"{what}: {at('capacity')}: {cap} is below the minimum "
                               f"{min_capacity()} or not a multiple of {PAGE}")
    if cap > file_size:
        raise CorruptHeapError(f"{what}: {at('capacity')}: {cap} exceeds the file size "
                               f"{file_size} (the file was truncated)")
    return cap


def validate_fields(w: tuple[int, ...] | memoryview, file_size: int, what: str = "heap") -> None:
    """Check the mutable header fields against each other and against the file. O(1)."""
    cap = w[H_CAPACITY]
    if cap < min_capacity() or cap % PAGE:
        raise CorruptHeapError(f"{what}: {at('capacity')}: {cap} is below the minimum "
                               f"{min_capacity()} or not a multiple of {PAGE}")
    if cap > file_size:
        raise CorruptHeapError(f"{what}: {at('capacity')}: {cap} exceeds the file size "
                               f"{file_size} (the file was truncated)")
    mo = meta_off(cap)
    brk = w[H_BRK]
    if not BLOCKS_OFF <= brk <= mo or brk & 7:
        raise CorruptHeapError(f"{what}: {at('brk')}: {brk} outside the block area "
                               f"[{BLOCKS_OFF}, {mo}] or misaligned")
    if not brk <= w[H_PEAK_BRK] <= mo:
        raise CorruptHeapError(f"{what}: {at('peak_brk')}: {w[H_PEAK_BRK]} not in "
                               f"[brk {brk}, {mo}]")
    if not brk <= w[H_ZERO_FROM] <= mo:
        raise CorruptHeapError(f"{what}: {at('zero_from')}: {w[H_ZERO_FROM]} not in "
                               f"[brk {brk}, {mo}]")
    if w[H_HOLE_FROM] > mo:
        raise CorruptHeapError(f"{what}: {at('hole_from')}: {w[H_HOLE_FROM]} past {mo}")
    if w[H_GENERATION] == 0:
        raise CorruptHeapError(f"{what}: {at('generation')}: 0 (it starts at 1)")
    ms = w[H_MAX_SIZE]
    if ms and ms < cap:
        raise CorruptHeapError(f"{what}: {at('max_size')}: {ms} is below the capacity {cap}")
    for name in ("root", "objects", "txlog"):
        v = w[FIELD_OFFSETS[name] // WORD]
        if v and (v & 7 or not BLOCKS_OFF + WORD <= v < brk):
            raise CorruptHeapError(f"{what}: {at(name)}: {v} is not an offset in the block "
                                   f"area [{BLOCKS_OFF + WORD}, {brk})")
    check_entries(w, what)
    if w[J_STATE] not in (0, J_OP, J_TX):
        raise CorruptHeapError(f"{what}: {at('j_state')}: {w[J_STATE]} is not 0, 1 or 2")


def check_entries(w: tuple[int, ...] | memoryview, what: str = "heap") -> None:
    """The entry words agree with their check word (CorruptHeapError names them if not)."""
    root, objects, txlog = w[H_ROOT], w[H_OBJECTS], w[H_TXLOG]
    if w[H_ENTRY_CHECK] != entry_check(root, objects, txlog):
        raise CorruptHeapError(f"{what}: {at('entry_check')}: {w[H_ENTRY_CHECK]:#x} does not "
                               f"match the entries root {root}, objects {objects}, txlog "
                               f"{txlog}: one of them is damaged")


def read_header(fd: int, what: str) -> tuple[bytes, int]:
    """Read and validate the header page of the file open at ``fd``; (header, capacity). The
    header is read before the size: a growth in between only makes the file longer."""
    head = os.pread(fd, HEADER_SIZE, 0)
    size = os.fstat(fd).st_size
    return head, validate_header(head, size, what)
