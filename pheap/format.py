"""Heap format v1: the byte layout of a heap, and the only module that knows it.

Every number in a heap is an unsigned 64-bit little-endian word; every reference is a byte offset
from the start of the mapping, and 0 means NULL. Other modules use the named word indexes and the
tiny helpers below, never bare arithmetic on offsets.

A heap is one mapping (a file, a memfd or an anonymous shared region) of ``capacity`` bytes::

    0        4096            16384                      brk            bitmap_off      capacity
    | header | control block |  blocks ...  [free|used]  | wilderness   | alloc bitmap  |

Header (page 0). Fields above ``CRC`` never change after creation and are covered by the CRC.

=======  ====  ===============  ==========================================================
offset   size  field            meaning
=======  ====  ===============  ==========================================================
0        8     magic            ``b"\\x93PHEAP\\r\\n"``: not text, catches newline mangling
8        8     version          format version, ``FORMAT_VERSION`` (1); others are refused
16       8     features         incompatible feature bits; an unknown bit is refused
24       8     byte_order       ``0x0807060504030201``; reads differently on big-endian hosts
32       16    uuid             random, identifies the heap (shown by ``pheap info``)
48       8     ctl_off          offset of the control block (4096)
56       8     blocks_off       offset of the first block (16384)
64       8     created_ns       creation time, ns since the epoch
72       8     fl_count         first-level bin count (41)
80       8     sl_count         second-level bins per first level (32)
88       8     crc              CRC-32 of bytes [0, 88) in the low 32 bits
128      8     capacity         bytes of the mapping in use; the file is at least this long
136      8     brk              end of the block area: blocks live in [blocks_off, brk)
144      8     zero_from        every byte in [zero_from, bitmap_off) is zero (calloc skips it)
152      8     hole_from        bytes in [hole_from, bitmap_off) may be holes with no disk blocks
160      8     generation       bumped whenever capacity changes; processes remap when it moves
168      8     root             offset of the root object (0 = none)
176      8     names            offset of the name directory (0 = none)
184      8     max_size         largest capacity the heap may grow to (0 = unlimited)
192      8     peak_brk         high-water mark of brk since creation (utilization figures)
200      8     txlog            offset of the transaction log block (0 = none yet)
256      8     owner_pid        pid of the process holding the lock (0 = none)
264      8     owner_state      ``STATE_IDLE``, ``STATE_IN_OP`` or ``STATE_IN_OP_UNJOURNALED``
272      8     op_count         operations completed under the lock (wraps at 2**64)
280      8     recoveries       times a dead holder's operation was recovered
512      8     j_state          0: idle; 1: an operation's undo entries below are live;
                                2: a transaction's undo records in the txlog block are live
528      3568  j_entries        undo entries ``(word index, old value)``, ended by index 0
=======  ====  ===============  ==========================================================

The journal is an undo log (see :mod:`pheap.journal`): before an operation changes a word it
records the word's index and old value; clearing ``j_state`` commits the operation. Inside a
transaction the records go to the txlog block instead, and may also be byte ranges:
``(RANGE_FLAG | n, offset, n bytes padded to words)``. Recovery
writes the old values back in reverse order, so a crash anywhere in an operation leaves exactly
the state before it. Restoring is idempotent: a crash during recovery is just another crash.

Control block (from ``ctl_off``): ``fl_bitmap`` (1 word: bit f set when some bin of first level f
is non-empty), ``sl_bitmap[fl_count]`` (bit s of word f set when bin (f, s) is non-empty),
``heads[fl_count * sl_count]`` (offset of the first free block of bin (f, s), 0 when empty).

Bins (two-level segregated fit). A free block of ``size`` bytes lives in bin ``size_class(size)``:
sizes below ``SMALL_LIMIT`` (256) have exact 8-byte classes in first level 0; above, first level
``floor(log2(size)) - 7`` is split into 32 equal second-level ranges.

Blocks. Every block starts with a header word; block sizes are multiples of 8, at least
``MIN_BLOCK`` (32), and include the header. The offset handed to users is ``block + 8``.

=====  ============  ===================================================================
bit    name          meaning
=====  ============  ===================================================================
0      FREE          this block is free
1      PREV_FREE     the block just before this one is free (its footer holds its size)
2      RELEASED      free block some of whose pages were given back to the OS
3-63   size          block size in bytes (the low three bits are masked off)
=====  ============  ===================================================================

A used block is ``[header][payload ...]``. A free block is
``[header][next][prev] ... [footer = size]``: next/prev link it into its bin (0 ends the list).
Two free blocks are never adjacent, and the block just below ``brk`` is never free (it merges into
the wilderness instead).

Allocation bitmap (from ``bitmap_off = capacity - bitmap_bytes(capacity)`` to ``capacity``): one
bit per 8-byte word of the mapping; the bit of offset ``b`` is set exactly when a used block starts
at ``b``. It is how ``free()`` tells a live block from a double free or an interior pointer, exactly
and in O(1). It moves to the new end when the heap grows.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

# ---------------------------------------------------------------------------------------------
# Format constants: changing any of these changes the file format (bump FORMAT_VERSION).
# ---------------------------------------------------------------------------------------------

MAGIC: Final = b"\x93PHEAP\r\n"  #: first 8 bytes of every heap
FORMAT_VERSION: Final = 1  #: the only version this code reads and writes
FEATURES_KNOWN: Final = 0  #: incompatible feature bits this version understands (none yet)
BYTE_ORDER_MARK: Final = 0x0807060504030201  #: bytes 01..08 read as a native little-endian word
WORD: Final = 8  #: bytes per word; every field is one word
ALIGN: Final = 8  #: block and payload alignment, bytes
PAGE: Final = 4096  #: page size assumed by the layout (header size, release granularity)
HEADER_SIZE: Final = PAGE  #: bytes of the header page
CTL_OFF: Final = HEADER_SIZE  #: offset of the control block
BLOCKS_OFF: Final = 4 * PAGE  #: offset of the first block (control block fits below it)
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
RELEASED: Final = 4  #: bit 2: a free block some of whose pages went back to the OS
FLAG_MASK: Final = 7  #: the three flag bits
SIZE_MASK: Final = ~7  #: everything but the flags

# Owner states.
STATE_IDLE: Final = 0  #: no process is inside an operation
STATE_IN_OP: Final = 1  #: owner_pid holds the lock, journaling (recovery = undo the journal)
STATE_IN_OP_UNJOURNALED: Final = 2  #: owner_pid holds the lock without a journal (recovery =
#: check, and rebuild the bins from the tags)

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
H_CRC: Final = 11  #: word index of crc
CRC_END: Final = H_CRC * WORD  #: the CRC covers bytes [0, CRC_END)

H_CAPACITY: Final = 16  #: word index of capacity
H_BRK: Final = 17  #: word index of brk
H_ZERO_FROM: Final = 18  #: word index of zero_from
H_HOLE_FROM: Final = 19  #: word index of hole_from
H_GENERATION: Final = 20  #: word index of generation
H_ROOT: Final = 21  #: word index of root
H_NAMES: Final = 22  #: word index of names
H_MAX_SIZE: Final = 23  #: word index of max_size
H_PEAK_BRK: Final = 24  #: word index of peak_brk
H_TXLOG: Final = 25  #: word index of txlog

H_OWNER_PID: Final = 32  #: word index of owner_pid
H_OWNER_STATE: Final = 33  #: word index of owner_state
H_OP_COUNT: Final = 34  #: word index of op_count
H_RECOVERIES: Final = 35  #: word index of recoveries

H_JOURNAL: Final = JOURNAL_OFF // WORD  #: word index of the first journal word
J_STATE: Final = H_JOURNAL  #: word index of j_state (0 idle, 1 an operation is in flight)
J_ENTRIES: Final = H_JOURNAL + 2  #: word index of the first undo entry (word 65 is reserved)
J_END: Final = HEADER_SIZE // WORD  #: first word index past the journal
J_CAPACITY: Final = (J_END - J_ENTRIES - 1) // 2  #: undo entries one operation may use
J_OP: Final = 1  #: j_state: an operation's entries in the header are live
J_TX: Final = 2  #: j_state: a transaction's records in the txlog block are live
RANGE_FLAG: Final = 1 << 63  #: marks a byte-range record in a transaction log

# Control block word indexes.
C_FL_BITMAP: Final = CTL_OFF // WORD  #: word index of the first-level bitmap
C_SL_BITMAP: Final = C_FL_BITMAP + 1  #: word index of sl_bitmap[0]
C_HEADS: Final = C_SL_BITMAP + FL_COUNT  #: word index of heads[0][0]
CTL_END: Final = (C_HEADS + FL_COUNT * SL_COUNT) * WORD  #: first byte after the control block

# Layout sanity, checked at import (a failure here is a programming error, not a runtime one).
assert MIN_BLOCK % ALIGN == 0 and MIN_BLOCK >= 4 * WORD
assert SMALL_LIMIT == 1 << (SL_LOG2 + 3)  # level 0 holds 32 exact classes of 8 bytes
assert CTL_END <= BLOCKS_OFF, (CTL_END, BLOCKS_OFF)
assert H_RECOVERIES * WORD < JOURNAL_OFF
assert BLOCKS_OFF % PAGE == 0
assert (MAX_BLOCK - 1).bit_length() - 1 - 7 < FL_COUNT
assert struct.calcsize("<Q") == WORD


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


def bitmap_bytes(capacity: int) -> int:
    """Bytes of allocation bitmap a mapping of ``capacity`` bytes needs (one bit per word)."""
    return ((capacity // 64) + WORD - 1) & ~(WORD - 1)


def bitmap_off(capacity: int) -> int:
    """Offset of the allocation bitmap in a mapping of ``capacity`` bytes."""
    return capacity - bitmap_bytes(capacity)


def min_capacity() -> int:
    """Smallest capacity that leaves room for one page of blocks."""
    return round_up(BLOCKS_OFF + PAGE + bitmap_bytes(BLOCKS_OFF + 2 * PAGE), PAGE)


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of the power of two ``m``."""
    return (n + m - 1) & ~(m - 1)


def header_crc(buf: bytes | bytearray | memoryview) -> int:
    """CRC-32 of the immutable header fields (bytes [0, CRC_END))."""
    return zlib.crc32(bytes(buf[:CRC_END])) & 0xFFFFFFFF
