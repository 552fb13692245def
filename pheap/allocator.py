"""Two-level segregated-fit allocator with boundary tags, living entirely inside a mapping.

The seeds' ladder to its top: a wilderness extended on demand (``brk``), free blocks in
size-class bins found in O(1) through two levels of bitmaps (TLSF), boundary tags so that a freed
block merges with both neighbours in O(1), splitting with a minimum block, and big free areas given
back to the OS. Layout and flag bits: see :mod:`pheap.format`.

All state is in the mapping and every reference is an offset, so any process that maps the region
sees the same heap. The boundary tags (block headers and footers) are the truth; the bins and
bitmaps are an index over them that :meth:`Allocator.rebuild_bins` can recreate with one walk.

Costs: ``malloc``, ``free``, ``calloc`` (plus the memset), ``realloc`` in place, ``memalign`` and
``usable_size`` are O(1) in the number of blocks; ``walk``, ``stats``, ``check`` and ``trim`` are
O(blocks). Growth copies the allocation bitmap (capacity / 64 bytes) and is amortised by growing
the capacity geometrically.

Performance notes. ``malloc`` and ``free`` inline the bin arithmetic and link updates that the
named helpers below spell out; a call costs about 60 ns in CPython and a pair of them was
measured (tools/bench_alloc.py) to be the largest single cost after the word accesses themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final, NamedTuple

import ast
import inspect
import textwrap

from . import format as F
from . import journal
from .errors import (
    CorruptHeapError,
    HeapFullError,
    InvalidPointerError,
    InvalidSizeError,
    PheapError,
    TransactionTooLargeError,
)
from .format import (
    C_FL_BITMAP,
    C_HEADS,
    C_SL_BITMAP,
    FREE,
    H_BRK,
    H_CAPACITY,
    H_GENERATION,
    H_HOLE_FROM,
    H_MAX_SIZE,
    H_PEAK_BRK,
    H_ZERO_FROM,
    MIN_BLOCK,
    PREV_FREE,
    RELEASED,
)
from .region import Region

# ---------------------------------------------------------------------------------------------
# Tunables: safe to change, the format does not depend on them.
# ---------------------------------------------------------------------------------------------

RELEASE_THRESHOLD: Final = 128 * 1024  #: a freed block this large gives its pages back (glibc's
#: mmap threshold); smaller frees never cost a syscall
TRIM_THRESHOLD: Final = 256 * 1024  #: dirty wilderness above brk this large is given back ...
TOP_PAD: Final = 64 * 1024  #: ... except this much just above brk, which the next mallocs reuse
#: (glibc's trim threshold and top pad: hysteresis, so a heap that breathes does not thrash)
GROW_FACTOR_NUM: Final = 3  #: capacity grows to at least 3/2 of itself: amortised O(1) growth
GROW_FACTOR_DEN: Final = 2  #: (denominator of the growth factor)
GROW_GRANULE: Final = 64 * 1024  #: capacities are multiples of this many bytes
BACKING_CHUNK: Final = 256 * 1024  #: when brk passes hole_from, back this much at once
MAX_ALIGNMENT: Final = F.PAGE  #: memalign accepts powers of two up to the page size
_ZEROS: Final = bytes(1 << 20)  #: source for memset-by-slice (1 MiB at a time)

_NOT_FLAGS: Final = ~7  # inlined SIZE_MASK
_SMALL: Final = F.SMALL_LIMIT  # inlined small-class limit
_BLOCKS_OFF: Final = F.BLOCKS_OFF  # inlined first block offset
_PAGE: Final = F.PAGE  # inlined page size
_MAX_REQUEST: Final = F.MAX_BLOCK - F.BLOCK_OVERHEAD  # largest payload a block can hold


class BlockInfo(NamedTuple):
    """One block, as :meth:`Allocator.walk` reports it."""

    offset: int  #: payload offset (what malloc returned); the header is 8 bytes before it
    size: int  #: block size in bytes, header included
    free: bool  #: whether the block is free

    @property
    def usable(self) -> int:
        """Payload bytes of the block."""
        return self.size - F.BLOCK_OVERHEAD


class HeapStats(NamedTuple):
    """Figures from :meth:`Allocator.stats` (one walk over the blocks)."""

    capacity: int  #: bytes mapped (file size in use)
    block_area: int  #: bytes between the first block and brk
    wilderness: int  #: bytes between brk and the allocation bitmap (room before growing)
    used_blocks: int  #: number of live blocks
    used_bytes: int  #: bytes in live blocks, headers included
    payload_bytes: int  #: usable bytes in live blocks
    free_blocks: int  #: number of free blocks in the bins
    free_bytes: int  #: bytes in free blocks (wilderness not included)
    largest_free: int  #: largest free block (or the wilderness, if larger)
    fragmentation: float  #: 1 - largest_free / (free_bytes + wilderness); 0 when nothing is free
    peak_brk: int  #: high-water mark of brk, in bytes from the start of the mapping
    generation: int  #: growth generation


class Allocator:
    """The allocator over one :class:`~pheap.region.Region`, without a journal.

    It has no lock of its own: callers (``Heap``) serialise access and call :meth:`sync` first so
    the local mapping covers the capacity another process may have grown the heap to.
    """

    journaled = False  #: whether operations are atomic (see JournaledAllocator)
    in_tx = False  #: transactions need the journal

    def __init__(self, region: Region) -> None:
        self._r = region
        self._w = region.w
        self._cap = region.size
        self._bmo = F.bitmap_off(region.size)
        self._bmw = self._bmo >> 3
        self._gen = self._w[H_GENERATION]
        self.pending: list[tuple[int, int]] = []  #: page releases queued until commit
        self._grown_zero_from = 0  # zero_from the last growth needed (calloc reads it)

    # -- mapping bookkeeping ---------------------------------------------------------------

    def _adopt(self) -> None:
        """Refresh cached views after the region was remapped."""
        r = self._r
        self._w = r.w
        self._cap = r.size
        self._bmo = F.bitmap_off(r.size)
        self._bmw = self._bmo >> 3

    def sync(self) -> None:
        """Remap if another process grew the heap since this process last looked. O(1)."""
        w = self._w
        if w[H_GENERATION] != self._gen or w[H_CAPACITY] != self._cap:
            cap = w[H_CAPACITY]
            fsize = self._r.file_size()
            if cap > fsize:
                raise CorruptHeapError(
                    f"offset 128: capacity {cap} exceeds the file size {fsize} "
                    "(the file was truncated by something other than pheap)")
            self._r.remap(cap)
            self._adopt()
            self._gen = self._w[H_GENERATION]

    # -- format initialisation ---------------------------------------------------------------

    @staticmethod
    def format_region(region: Region, max_size: int = 0) -> None:
        """Write the mutable header fields of a new heap; the control block starts all zero."""
        w = region.w
        cap = region.size
        w[H_CAPACITY] = cap
        w[H_BRK] = F.BLOCKS_OFF
        w[H_ZERO_FROM] = F.BLOCKS_OFF
        w[H_HOLE_FROM] = F.bitmap_off(cap)
        w[H_GENERATION] = 1
        w[H_MAX_SIZE] = max_size
        w[H_PEAK_BRK] = F.BLOCKS_OFF

    # -- validation helpers ------------------------------------------------------------------

    @staticmethod
    def _check_size(n: object, what: str = "size") -> int:
        if type(n) is not int:
            if isinstance(n, bool) or not hasattr(n, "__index__"):
                raise InvalidSizeError(f"{what} must be an int, not {type(n).__name__}")
            n = n.__index__()  # type: ignore[attr-defined]
        if n < 0:
            raise InvalidSizeError(f"{what} must not be negative: {n}")
        if n > F.MAX_BLOCK - F.BLOCK_OVERHEAD:
            raise InvalidSizeError(f"{what} {n} exceeds the largest block the format allows "
                                   f"({F.MAX_BLOCK - F.BLOCK_OVERHEAD} bytes)")
        return n  # type: ignore[return-value]

    def _bad_pointer(self, p: object) -> InvalidPointerError:
        """Explain why ``p`` is not a live block (called only on the error path)."""
        if type(p) is not int:
            return InvalidPointerError(f"offset must be an int, not {type(p).__name__}: {p!r}")
        brk = self._w[H_BRK]
        if p == 0:
            why = "is NULL"
        elif p < _BLOCKS_OFF + 8 or p >= brk:
            why = f"is outside the block area [{_BLOCKS_OFF + 8}, {brk})"
        elif p & 7:
            why = "is not 8-byte aligned"
        else:
            b = p - 8
            hdr = self._w[b >> 3]
            if hdr & FREE and self._looks_like_block(b, hdr):
                why = "is a free block (double free?)"
            else:
                why = "is not the start of a live block (inside a block, or already freed)"
        return InvalidPointerError(f"invalid offset {p}: {why}")

    def _looks_like_block(self, b: int, hdr: int) -> bool:
        """Whether the tags at ``b`` describe a free block (header and footer agree)."""
        size = hdr & _NOT_FLAGS
        end = b + size
        return size >= MIN_BLOCK and end <= self._w[H_BRK] and self._w[(end >> 3) - 1] == size

    def is_live(self, p: int) -> bool:
        """Whether ``p`` is the payload offset of a live block. O(1)."""
        try:
            self._live(p)
        except InvalidPointerError:
            return False
        return True

    def _live_unchecked(self, p: int) -> int:
        """Like _live, but the transaction log block counts as live."""
        if type(p) is not int or p & 7 or p < _BLOCKS_OFF + 8 or p >= self._w[H_BRK]:
            raise self._bad_pointer(p)
        b = p - 8
        if not (self._w[self._bmw + (b >> 9)] >> ((b >> 3) & 63)) & 1:
            raise self._bad_pointer(p)
        return b

    def _live(self, p: object) -> int:
        """Block offset of the live block whose payload is ``p``; InvalidPointerError otherwise."""
        if type(p) is not int or p & 7 or p < _BLOCKS_OFF + 8 or p >= self._w[H_BRK]:
            raise self._bad_pointer(p)
        b = p - 8
        if not (self._w[self._bmw + (b >> 9)] >> ((b >> 3) & 63)) & 1:
            raise self._bad_pointer(p)
        if p == self._w[F.H_TXLOG]:
            raise InvalidPointerError(f"invalid offset {p}: it is the transaction log block")
        return b

    # -- bins ----------------------------------------------------------------------------------

    def _insert(self, b: int, size: int) -> None:
        """Push free block ``b`` of ``size`` bytes on the head of its bin. O(1)."""
        w = self._w
        if size < _SMALL:
            fl = 0
            sl = size >> 3
        else:
            bl = size.bit_length() - 1
            fl = bl - 7
            sl = (size >> (bl - 5)) & 31
        h = C_HEADS + (fl << 5) + sl
        head = w[h]
        bi = b >> 3
        w[bi + 1] = head
        w[bi + 2] = 0
        if head:
            w[(head >> 3) + 2] = b
        else:
            m = w[C_SL_BITMAP + fl]
            if not m:
                w[C_FL_BITMAP] |= 1 << fl
            w[C_SL_BITMAP + fl] = m | (1 << sl)
        w[h] = b

    def _unlink(self, b: int, size: int) -> None:
        """Remove free block ``b`` of ``size`` bytes from its bin. O(1)."""
        w = self._w
        bi = b >> 3
        nxt = w[bi + 1]
        prv = w[bi + 2]
        if prv:
            w[(prv >> 3) + 1] = nxt
        else:
            if size < _SMALL:
                fl = 0
                sl = size >> 3
            else:
                bl = size.bit_length() - 1
                fl = bl - 7
                sl = (size >> (bl - 5)) & 31
            w[C_HEADS + (fl << 5) + sl] = nxt
            if not nxt:
                m = w[C_SL_BITMAP + fl] & ~(1 << sl)
                w[C_SL_BITMAP + fl] = m
                if not m:
                    w[C_FL_BITMAP] &= ~(1 << fl)
        if nxt:
            w[(nxt >> 3) + 2] = prv

    # -- malloc --------------------------------------------------------------------------------

    def malloc(self, n: int) -> int:
        """Allocate ``n`` bytes; return the payload offset (never 0). O(1).

        ``malloc(0)`` returns a minimum block, like glibc. Raises HeapFullError when the heap
        cannot grow, InvalidSizeError for negative or absurd sizes.
        """
        if type(n) is not int or n < 0 or n > _MAX_REQUEST:
            n = self._check_size(n)
        s = (n + 15) & -8
        if s < 32:
            s = 32
        w = self._w
        b = 0
        if s < 256:
            fl = 0
            sl = s >> 3
        else:
            # Better fit first: the head of the size's own class, if it is large enough. O(1).
            bl = s.bit_length() - 1
            fl = bl - 7
            sl = (s >> (bl - 5)) & 31
            h = C_HEADS + (fl << 5) + sl
            b = w[h]
            if b and w[b >> 3] & -8 < s:
                b = 0
            if not b:  # search from the next class: every block there fits
                t = s + (1 << (bl - 5)) - 1
                bl = t.bit_length() - 1
                fl = bl - 7
                sl = (t >> (bl - 5)) & 31
        if not b:
            # Search: the first non-empty bin at or above (fl, sl), through the two bitmaps.
            m = w[C_SL_BITMAP + fl] & (-1 << sl)
            if not m:
                m = w[C_FL_BITMAP] & (-1 << (fl + 1))
                if not m:
                    return self._from_wilderness(s)
                fl = (m & -m).bit_length() - 1
                m = w[C_SL_BITMAP + fl]
            sl = (m & -m).bit_length() - 1
            h = C_HEADS + (fl << 5) + sl
            b = w[h]
        bi = b >> 3
        hdr = w[bi]
        if hdr & RELEASED:  # pages of this block went back to the OS: back them first
            self._r.ensure_backed(b, s + MIN_BLOCK)
        bsize = hdr & -8
        # Unlink the head of the bin (inlined _unlink for a head block).
        nxt = w[bi + 1]
        w[h] = nxt
        if nxt:
            w[(nxt >> 3) + 2] = 0
        else:
            m = w[C_SL_BITMAP + fl] & ~(1 << sl)
            w[C_SL_BITMAP + fl] = m
            if not m:
                w[C_FL_BITMAP] &= ~(1 << fl)
        rem = bsize - s
        if rem >= 32:
            # Split: [b: used s][r: free rem]. The block after r already has PREV_FREE set.
            w[bi] = s
            r = b + s
            ri = r >> 3
            w[ri] = rem | FREE | (hdr & RELEASED)
            w[ri + (rem >> 3) - 1] = rem
            # Inlined _insert(r, rem): worth ~0.1 us a split (tools/bench_alloc.py churn).
            if rem < 256:
                fl = 0
                sl = rem >> 3
            else:
                bl = rem.bit_length() - 1
                fl = bl - 7
                sl = (rem >> (bl - 5)) & 31
            h = C_HEADS + (fl << 5) + sl
            head = w[h]
            w[ri + 1] = head
            w[ri + 2] = 0
            if head:
                w[(head >> 3) + 2] = r
            else:
                m = w[C_SL_BITMAP + fl]
                if not m:
                    w[C_FL_BITMAP] |= 1 << fl
                w[C_SL_BITMAP + fl] = m | (1 << sl)
            w[h] = r
        else:
            w[bi] = bsize
            nb = (b + bsize) >> 3  # a free block never touches brk, so this is a used block
            w[nb] &= ~PREV_FREE
        w[self._bmw + (bi >> 6)] |= 1 << (bi & 63)
        return b + 8

    def _from_wilderness(self, s: int) -> int:
        """Carve a block of ``s`` bytes at brk, growing the mapping if needed. O(1) amortised."""
        w = self._w
        b = w[H_BRK]
        end = b + s
        if end > self._bmo:
            self._grow(end)
            w = self._w
        if end > w[H_HOLE_FROM]:
            self._back_wilderness(end)
        w[b >> 3] = s  # the block below brk is never free, so no PREV_FREE
        w[H_BRK] = end
        if end > w[H_ZERO_FROM]:
            w[H_ZERO_FROM] = end
        if end > w[H_PEAK_BRK]:
            w[H_PEAK_BRK] = end
        bi = b >> 3
        w[self._bmw + (bi >> 6)] |= 1 << (bi & 63)
        return b + 8

    def _back_wilderness(self, end: int) -> None:
        """Give [hole_from, end) disk blocks again (it may have been released). Raises on ENOSPC."""
        w = self._w
        start = w[H_HOLE_FROM]
        stop = min(F.round_up(end + BACKING_CHUNK, F.PAGE), self._bmo)
        self._r.ensure_backed(start, stop - start)
        w[H_HOLE_FROM] = stop

    def _grow(self, need_end: int) -> None:
        """Extend capacity so the block area reaches ``need_end``. Raises HeapFullError."""
        w = self._w
        r = self._r
        cap = self._cap
        max_size = w[H_MAX_SIZE]
        new_cap = F.round_up(max(cap * GROW_FACTOR_NUM // GROW_FACTOR_DEN,
                                 need_end + need_end // 64 + 2 * F.PAGE), GROW_GRANULE)
        # The new bitmap must lie past the old capacity: until the capacity word commits the
        # growth, the old bitmap is the live one and must stay intact.
        floor = max(need_end, cap)
        while F.bitmap_off(new_cap) < floor:
            new_cap += GROW_GRANULE
        if max_size and new_cap > max_size:
            new_cap = max_size & ~(F.PAGE - 1)
            if F.bitmap_off(new_cap) < floor:
                raise HeapFullError(
                    f"heap needs {floor + F.bitmap_bytes(floor)} bytes of capacity to reach "
                    f"{need_end}; max_size is {max_size}")
        if not r.growable:
            raise HeapFullError(
                f"{r.kind} heap is full: {need_end - w[H_BRK]} more bytes needed at brk "
                f"{w[H_BRK]}, capacity {cap} is fixed")
        # Crash window: extend() only lengthens the file; until capacity is written below nothing
        # refers to the new bytes, so a crash here leaves a longer file and an unchanged heap.
        stale_end = r.file_size()  # bytes past cap may be left from a growth that was undone
        r.extend(new_cap)
        journal.hit("grow")
        r.remap(new_cap)
        self._adopt()
        w = self._w
        old_bmo = F.bitmap_off(cap)
        r.mm.move(self._bmo, old_bmo, cap - old_bmo)
        # Before the capacity word changes, the new bitmap copy is unreachable and the heap is the
        # old one. The old bitmap's bytes [old_bmo, cap) now lie in the wilderness and are not
        # zero, so zero_from moves past them in the same journaled operation.
        w[H_CAPACITY] = new_cap
        zf = min(max(cap, stale_end), self._bmo)
        self._grown_zero_from = zf
        if w[H_ZERO_FROM] < zf:
            w[H_ZERO_FROM] = zf
        w[H_GENERATION] = w[H_GENERATION] + 1
        self._gen = w[H_GENERATION]

    # -- free ----------------------------------------------------------------------------------

    def free(self, p: int) -> None:
        """Free the block at payload offset ``p``, merging it with free neighbours. O(1).

        ``free(0)`` does nothing, like C. Any other offset that is not a live block raises
        InvalidPointerError and changes nothing.
        """
        if p == 0 and type(p) is int:
            return
        w = self._w
        if type(p) is not int or p & 7 or p < _BLOCKS_OFF + 8 or p >= w[H_BRK]:
            raise self._bad_pointer(p)
        b = p - 8
        bi = b >> 3
        k = self._bmw + (bi >> 6)
        bit = 1 << (bi & 63)
        x = w[k]
        if not x & bit or p == w[F.H_TXLOG]:
            raise self._bad_pointer(p) if not x & bit else InvalidPointerError(
                f"invalid offset {p}: it is the transaction log block")
        w[k] = x ^ bit
        # Inlined _free_block(b) with _insert: worth ~0.3 us a pair (tools/bench_alloc.py churn).
        hdr = w[bi]
        size = hdr & -8
        nb = b + size
        brk = w[H_BRK]
        if size < 32 or nb > brk or size >= RELEASE_THRESHOLD:
            return self._free_block(b)  # a corrupt header, or a block that releases pages
        released = 0
        if hdr & PREV_FREE:
            psize = w[bi - 1]
            b -= psize
            bi = b >> 3
            released = w[bi] & RELEASED
            # Inlined _unlink(b, psize).
            nxt = w[bi + 1]
            prv = w[bi + 2]
            if prv:
                w[(prv >> 3) + 1] = nxt
            else:
                if psize < 256:
                    fl = 0
                    sl = psize >> 3
                else:
                    bl = psize.bit_length() - 1
                    fl = bl - 7
                    sl = (psize >> (bl - 5)) & 31
                w[C_HEADS + (fl << 5) + sl] = nxt
                if not nxt:
                    m = w[C_SL_BITMAP + fl] & ~(1 << sl)
                    w[C_SL_BITMAP + fl] = m
                    if not m:
                        w[C_FL_BITMAP] &= ~(1 << fl)
            if nxt:
                w[(nxt >> 3) + 2] = prv
            size += psize
        if nb == brk:
            w[H_BRK] = b
            if released and w[H_HOLE_FROM] > b:
                w[H_HOLE_FROM] = b  # the merged block had pages without disk blocks
            if w[H_ZERO_FROM] - b >= TRIM_THRESHOLD:
                self.pending.append((0, b))
            return None
        ni = nb >> 3
        nhdr = w[ni]
        if nhdr & FREE:
            nsize = nhdr & -8
            released |= nhdr & RELEASED
            # Inlined _unlink(nb, nsize).
            nxt = w[ni + 1]
            prv = w[ni + 2]
            if prv:
                w[(prv >> 3) + 1] = nxt
            else:
                if nsize < 256:
                    fl = 0
                    sl = nsize >> 3
                else:
                    bl = nsize.bit_length() - 1
                    fl = bl - 7
                    sl = (nsize >> (bl - 5)) & 31
                w[C_HEADS + (fl << 5) + sl] = nxt
                if not nxt:
                    m = w[C_SL_BITMAP + fl] & ~(1 << sl)
                    w[C_SL_BITMAP + fl] = m
                    if not m:
                        w[C_FL_BITMAP] &= ~(1 << fl)
            if nxt:
                w[(nxt >> 3) + 2] = prv
            size += nsize
        else:
            w[ni] = nhdr | PREV_FREE
        w[bi] = size | FREE | released
        w[bi + (size >> 3) - 1] = size
        if size < 256:
            fl = 0
            sl = size >> 3
        else:
            bl = size.bit_length() - 1
            fl = bl - 7
            sl = (size >> (bl - 5)) & 31
        h = C_HEADS + (fl << 5) + sl
        head = w[h]
        w[bi + 1] = head
        w[bi + 2] = 0
        if head:
            w[(head >> 3) + 2] = b
        else:
            m = w[C_SL_BITMAP + fl]
            if not m:
                w[C_FL_BITMAP] |= 1 << fl
            w[C_SL_BITMAP + fl] = m | (1 << sl)
        w[h] = b
        return None

    def _free_block(self, b: int) -> None:
        """Turn used block ``b`` (alloc bit already clear) into free space, coalescing. O(1)."""
        w = self._w
        bi = b >> 3
        hdr = w[bi]
        size = hdr & -8
        nb = b + size
        brk = w[H_BRK]
        if size < 32 or nb > brk:
            raise CorruptHeapError(f"offset {b}: block header {hdr:#x} gives size {size} "
                                   f"reaching past brk {brk}")
        freed_start, freed_end = b, nb
        released = 0
        if hdr & PREV_FREE:
            psize = w[bi - 1]
            pb = b - psize
            released = w[pb >> 3] & RELEASED
            self._unlink(pb, psize)
            b = pb
            size += psize
        if nb == brk:
            # The block touches the wilderness: give it back by lowering brk.
            w[H_BRK] = b
            if released and w[H_HOLE_FROM] > b:
                w[H_HOLE_FROM] = b  # the merged block had pages without disk blocks
            if w[H_ZERO_FROM] - b >= TRIM_THRESHOLD:
                self.pending.append((0, b))
            return
        nhdr = w[nb >> 3]
        if nhdr & FREE:
            nsize = nhdr & -8
            released |= nhdr & RELEASED
            self._unlink(nb, nsize)
            size += nsize
        else:
            w[nb >> 3] = nhdr | PREV_FREE
        if freed_end - freed_start >= RELEASE_THRESHOLD:
            self.pending.append((b, size))
        w[b >> 3] = size | FREE | released
        w[(b + size >> 3) - 1] = size
        self._insert(b, size)

    def release_pending(self) -> int:
        """Give back the pages that the last operation freed; return the bytes released.

        Called after the operation committed (page release cannot be undone, so it must never
        happen inside an operation that a crash could roll back). Each step only makes the heap
        more conservative: RELEASED is set / hole_from lowered *before* the pages go, so a crash
        in between costs at most a needless ``posix_fallocate`` later. O(pending).
        """
        if self.in_tx:
            return 0  # the transaction could still be undone: wait for its commit
        total = 0
        w = self._w
        for b, size in self.pending:
            if b == 0:
                total += self._release_wilderness(size)
                continue
            hdr = w[b >> 3]
            if not hdr & FREE or hdr & -8 != size:
                continue  # merged or reused since (a later operation of the same hold)
            w[b >> 3] = hdr | RELEASED
            journal.hit("release")
            if self._r.release(b + MIN_BLOCK, size - MIN_BLOCK - 8):
                total += size - MIN_BLOCK - 8
        self.pending.clear()
        return total

    def _release_wilderness(self, brk: int) -> int:
        """Give back the pages between brk + TOP_PAD and zero_from; they read as zero after."""
        w = self._w
        if w[H_BRK] != brk:
            return 0  # the wilderness moved since this release was queued
        start = F.round_up(brk + TOP_PAD, F.PAGE)
        end = w[H_ZERO_FROM]
        if end <= start:
            return 0
        if w[H_HOLE_FROM] > start:
            w[H_HOLE_FROM] = start  # first: a crash after it only costs a needless fallocate
        if not self._zero_range(start, end):
            return 0
        w[H_ZERO_FROM] = start  # lowering zero_from is safe once [start, end) reads as zero
        return end - start

    def _zero_range(self, start: int, end: int) -> bool:
        """Make the wilderness bytes [start, end) read as zero: whole pages go back to the OS,
        a partial last page is cleared by hand. ``start`` is page-aligned. Returns False (and
        changes nothing) when the backing cannot release pages."""
        whole = end & -F.PAGE
        if whole > start and not self._r.release(start, whole - start):
            return False
        if whole < end:
            self._memset0(max(start, whole), end)
        return True

    # -- calloc, realloc, memalign, usable_size -------------------------------------------------

    def calloc(self, count: int, size: int) -> int:
        """Allocate ``count * size`` zeroed bytes. O(1) plus the memset.

        The memset skips the part of the block at or above ``zero_from``: bytes there were never
        written since the file was extended (``posix_fallocate``/``ftruncate`` give zeros) or since
        their pages were released with ``MADV_REMOVE`` (a hole reads as zeros).
        """
        count = self._check_size(count, "count")
        size = self._check_size(size, "size")
        total = count * size
        if total > F.MAX_BLOCK - F.BLOCK_OVERHEAD:
            raise InvalidSizeError(f"calloc({count}, {size}) = {total} bytes exceeds the largest "
                                   "block the format allows")
        zero_from = self._w[H_ZERO_FROM]
        cap = self._cap
        p = self.malloc(total)
        if self._cap != cap:  # it grew: the old bitmap's bytes (and any stale tail) are dirty
            zero_from = max(zero_from, self._grown_zero_from)
        end = p + total
        if p < zero_from:
            if self.in_tx:  # the memory may have been a free block when the transaction began
                self.log_range(p, min(end, zero_from) - p)  # type: ignore[attr-defined]
            self._guard(p - 8)
            self._memset0(p, min(end, zero_from))
        return p

    def _guard(self, b: int) -> None:
        """Before this operation writes data into block ``b``: nothing to do without a journal."""

    def _memset0(self, start: int, end: int) -> None:
        mm = self._r.mm
        while start < end:
            k = min(end - start, len(_ZEROS))
            mm[start:start + k] = _ZEROS[:k] if k < len(_ZEROS) else _ZEROS
            start += k

    def usable_size(self, p: int) -> int:
        """Payload bytes of the live block at ``p`` (at least what was asked for). O(1)."""
        b = self._live(p)
        return (self._w[b >> 3] & -8) - 8

    def realloc(self, p: int, n: int) -> int:
        """Resize the block at ``p`` to ``n`` bytes, keeping its contents; return the new offset.

        Shrinks in place; grows in place into a free next block or the wilderness when it can,
        otherwise moves (malloc, copy, free). ``realloc(0, n)`` is ``malloc(n)``. O(1) plus the
        copy when it moves. On HeapFullError the old block is untouched.
        """
        if p == 0 and type(p) is int:
            return self.malloc(n)
        n = self._check_size(n)
        b = self._live(p)
        s = F.request_to_block(n)
        w = self._w
        bi = b >> 3
        hdr = w[bi]
        size = hdr & -8
        if s <= size:
            if size - s >= MIN_BLOCK:
                self._split_tail(b, hdr, s)
            return p
        nb = b + size
        brk = w[H_BRK]
        if nb == brk:  # grow into the wilderness
            end = b + s
            if end > self._bmo:
                self._grow(end)
                w = self._w
            if end > w[H_HOLE_FROM]:
                self._back_wilderness(end)
            w[bi] = s | (hdr & PREV_FREE)
            w[H_BRK] = end
            if end > w[H_ZERO_FROM]:
                w[H_ZERO_FROM] = end
            if end > w[H_PEAK_BRK]:
                w[H_PEAK_BRK] = end
            return p
        nhdr = w[nb >> 3]
        if nhdr & FREE:
            nsize = nhdr & -8
            total = size + nsize
            if total >= s:  # grow into the free next block
                if nhdr & RELEASED:
                    self._r.ensure_backed(nb, min(b + s + MIN_BLOCK, nb + nsize) - nb)
                self._unlink(nb, nsize)
                rem = total - s
                if rem >= MIN_BLOCK:
                    w[bi] = s | (hdr & PREV_FREE)
                    r = b + s
                    w[r >> 3] = rem | FREE | (nhdr & RELEASED)
                    w[(r + rem >> 3) - 1] = rem
                    self._insert(r, rem)
                else:
                    w[bi] = total | (hdr & PREV_FREE)
                    w[(b + total) >> 3] &= ~PREV_FREE
                return p
        q = self.malloc(n)  # may grow and remap
        if self.in_tx:  # q may have been a free block when the transaction began: its links
            self.log_range(q, size - 8)  # type: ignore[attr-defined]
        self._guard(q - 8)
        self._r.mm.move(q, p, size - 8)
        self.free(p)
        return q

    def _split_tail(self, b: int, hdr: int, s: int) -> None:
        """Shrink used block ``b`` to ``s`` bytes and free the tail (which then coalesces)."""
        w = self._w
        size = hdr & -8
        w[b >> 3] = s | (hdr & PREV_FREE)
        r = b + s
        w[r >> 3] = size - s  # a used-looking block whose previous block (b) is used
        self._free_block(r)

    def memalign(self, alignment: int, n: int) -> int:
        """Allocate ``n`` bytes at an offset that is a multiple of ``alignment``. O(1).

        ``alignment`` is a power of two up to the page size (4096). Offsets are relative to the
        start of the mapping, which the OS maps page-aligned, so the address is aligned too.
        """
        alignment = self._check_size(alignment, "alignment")
        if alignment & (alignment - 1) or not alignment or alignment > MAX_ALIGNMENT:
            raise InvalidSizeError(f"alignment must be a power of two from 1 to "
                                   f"{MAX_ALIGNMENT}: {alignment}")
        n = self._check_size(n)
        if alignment <= F.ALIGN:
            return self.malloc(n)
        s = F.request_to_block(n)
        p = self.malloc(s + alignment + MIN_BLOCK)  # the gap is at most MIN_BLOCK + alignment - 8
        w = self._w
        b = p - 8
        q = (p + alignment - 1) & -alignment
        while q != p and q - p < MIN_BLOCK:
            q += alignment
        if q != p:
            gap = q - p
            hdr = w[b >> 3]
            nb = b + gap
            w[nb >> 3] = (hdr & -8) - gap  # the aligned block; PREV_FREE set when b is freed
            bi, ni = b >> 3, nb >> 3
            w[self._bmw + (bi >> 6)] &= ~(1 << (bi & 63))
            w[self._bmw + (ni >> 6)] |= 1 << (ni & 63)
            w[bi] = gap | (hdr & PREV_FREE)
            self._free_block(b)
            b = nb
        hdr = w[b >> 3]
        if (hdr & -8) - s >= MIN_BLOCK:
            self._split_tail(b, hdr, s)
        return b + 8

    def set_root(self, off: int) -> None:
        """Point the header's root at live block ``off`` (or 0). O(1)."""
        if off != 0:
            self._live(off)
        w = self._w
        w[F.H_ROOT] = off

    # -- whole-heap operations ---------------------------------------------------------------

    def trim(self) -> int:
        """Give back to the OS the pages of the wilderness and of every large free block.

        Returns the bytes given back. The file keeps its length (other processes may map it;
        shrinking it under them would SIGBUS them), but its disk blocks are released, which
        ``os.stat().st_blocks`` shows. O(free blocks).
        """
        if self.in_tx:
            raise PheapError("trim() inside a transaction: pages freed by it could still be "
                             "needed by an abort; call it after the commit")
        w = self._w
        brk = w[H_BRK]
        total = 0
        start = F.round_up(brk, F.PAGE)
        if start < self._bmo:
            # Ordered so that a crash at any point leaves only conservative state behind.
            if w[H_HOLE_FROM] > start:
                w[H_HOLE_FROM] = start
            journal.hit("release")
            if self._zero_range(start, self._bmo):
                total += self._bmo - start
                if w[H_ZERO_FROM] > start:
                    w[H_ZERO_FROM] = start
        for b, size in self._free_list_blocks(2 * F.PAGE):
            w[b >> 3] |= RELEASED
            journal.hit("release")
            if self._r.release(b + MIN_BLOCK, size - MIN_BLOCK - 8):
                total += size - MIN_BLOCK - 8
        return total

    def _free_list_blocks(self, min_size: int) -> list[tuple[int, int]]:
        """Free blocks of at least ``min_size`` bytes, read from the bins (bounded walk)."""
        w = self._w
        out = []
        limit = (self._w[H_BRK] - _BLOCKS_OFF) // MIN_BLOCK + 1
        fl0 = F.size_class(min_size)[0]
        for fl in range(fl0, F.FL_COUNT):
            for sl in range(F.SL_COUNT):
                b = w[C_HEADS + (fl << 5) + sl]
                steps = 0
                while b:
                    size = w[b >> 3] & -8
                    if size >= min_size:
                        out.append((b, size))
                    b = w[(b >> 3) + 1]
                    steps += 1
                    if steps > limit:
                        raise CorruptHeapError(f"bin ({fl}, {sl}): cycle in the free list")
        return out

    def walk(self) -> Iterator[BlockInfo]:
        """Yield every block from the first to brk, in address order. O(blocks).

        Bounded: a header that would loop or run past brk raises CorruptHeapError.
        """
        w = self._w
        b = _BLOCKS_OFF
        brk = w[H_BRK]
        while b < brk:
            hdr = w[b >> 3]
            size = hdr & -8
            if size < MIN_BLOCK or b + size > brk:
                raise CorruptHeapError(f"offset {b}: block size {size} (header {hdr:#x}) is "
                                       f"below {MIN_BLOCK} or runs past brk {brk}")
            yield BlockInfo(b + 8, size, bool(hdr & FREE))
            b += size

    def stats(self) -> HeapStats:
        """Used and free bytes, block counts, largest free block, fragmentation. O(blocks)."""
        w = self._w
        used_n = used = payload = free_n = free_b = largest = 0
        for blk in self.walk():
            if blk.free:
                free_n += 1
                free_b += blk.size
                largest = max(largest, blk.size)
            else:
                used_n += 1
                used += blk.size
                payload += blk.size - 8
        brk = w[H_BRK]
        wild = self._bmo - brk
        largest = max(largest, wild)
        total_free = free_b + wild
        frag = 1.0 - largest / total_free if total_free else 0.0
        return HeapStats(self._cap, brk - _BLOCKS_OFF, wild, used_n, used, payload, free_n,
                         free_b, largest, frag, w[H_PEAK_BRK], w[H_GENERATION])

    # -- invariants ---------------------------------------------------------------------------

    def check(self, progress: Callable[[float], None] | None = None) -> None:
        """Verify every invariant of the heap; raise CorruptHeapError naming offset and invariant.

        ``progress``, if given, is called with the fraction done (0.0 to 1.0) now and then.

        Header fields in range; every block's tags sane (size, alignment, footer = size, PREV_FREE
        matches the previous block, no two adjacent free blocks, no free block touching brk);
        allocation bitmap set exactly at used blocks; every free block in exactly its own bin
        exactly once, links symmetric, no cycles (walks are bounded); bitmaps match the bins.
        O(blocks + capacity / 512).
        """
        w = self._w
        cap = self._cap
        brk = w[H_BRK]

        def bad(off: int, msg: str) -> CorruptHeapError:
            return CorruptHeapError(f"offset {off}: {msg}")

        if w[H_CAPACITY] != cap:
            raise bad(128, f"header capacity {w[H_CAPACITY]} differs from the mapping {cap}")
        if not _BLOCKS_OFF <= brk <= self._bmo or brk & 7:
            raise bad(136, f"brk {brk} outside [{_BLOCKS_OFF}, {self._bmo}] or misaligned")
        if not brk <= w[H_ZERO_FROM] <= self._bmo or not brk <= w[H_PEAK_BRK] <= self._bmo:
            raise bad(144, f"expected brk {brk} <= zero_from {w[H_ZERO_FROM]} and peak_brk "
                           f"{w[H_PEAK_BRK]}, both <= bitmap offset {self._bmo}")
        if w[H_HOLE_FROM] > self._bmo:
            raise bad(152, f"hole_from {w[H_HOLE_FROM]} past the bitmap offset {self._bmo}")

        # 1. The boundary-tag walk.
        free_blocks, used_blocks = self.check_tags(progress)

        # 2. The allocation bitmap agrees with the walk.
        bm_words = F.bitmap_bytes(cap) >> 3
        base = self._bmw
        seen = 0
        for k in range(bm_words):
            x = w[base + k]
            while x:
                low = x & -x
                bi = (k << 6) + low.bit_length() - 1
                off = bi << 3
                if off not in used_blocks:
                    raise bad(off, "allocation bitmap bit set but no used block starts here")
                seen += 1
                x ^= low
        if seen != len(used_blocks):
            missing = next(u for u in sorted(used_blocks)
                           if not (w[base + (u >> 9)] >> ((u >> 3) & 63)) & 1)
            raise bad(missing, "used block has no allocation bitmap bit")

        txlog = w[F.H_TXLOG]
        if txlog and txlog - 8 not in used_blocks:
            raise bad(F.H_TXLOG * 8, f"transaction log offset {txlog} is not a used block")
        root = w[F.H_ROOT]
        if root and root - 8 not in used_blocks:
            raise bad(F.H_ROOT * 8, f"root offset {root} is not a used block (freed while "
                                    "still the root, or damaged)")

        # 3. The bins: every free block in its own bin exactly once, links symmetric, bounded.
        in_bins = 0
        fl_map = w[C_FL_BITMAP]
        for fl in range(F.FL_COUNT):
            sl_map = w[C_SL_BITMAP + fl]
            if bool(fl_map >> fl & 1) != bool(sl_map):
                raise bad(F.CTL_OFF, f"first-level bitmap bit {fl} is {fl_map >> fl & 1} but "
                                     f"second-level map is {sl_map:#x}")
            if sl_map >> F.SL_COUNT:
                raise bad((C_SL_BITMAP + fl) * 8, f"second-level map {sl_map:#x} has bits past "
                                                  f"{F.SL_COUNT}")
            for sl in range(F.SL_COUNT):
                h = C_HEADS + (fl << 5) + sl
                node = w[h]
                if bool(sl_map >> sl & 1) != bool(node):
                    raise bad(h * 8, f"bin ({fl}, {sl}) head {node} disagrees with its bitmap "
                                     f"bit {sl_map >> sl & 1}")
                prev = 0
                while node:
                    size = free_blocks.get(node)
                    if size is None:
                        raise bad(node, f"bin ({fl}, {sl}) links to something that is not a "
                                        "free block")
                    if size < 0:
                        raise bad(node, f"free block is in the bins twice (or a cycle), seen "
                                        f"again in bin ({fl}, {sl})")
                    if F.size_class(size) != (fl, sl):
                        raise bad(node, f"free block of size {size} in bin ({fl}, {sl}), "
                                        f"belongs in {F.size_class(size)}")
                    if w[(node >> 3) + 2] != prev:
                        raise bad(node, f"prev link {w[(node >> 3) + 2]} != {prev} (asymmetric "
                                        f"links in bin ({fl}, {sl}))")
                    free_blocks[node] = -1
                    in_bins += 1
                    prev = node
                    node = w[(node >> 3) + 1]
        if fl_map >> F.FL_COUNT:
            raise bad(F.CTL_OFF, f"first-level bitmap {fl_map:#x} has bits past {F.FL_COUNT}")
        if in_bins != len(free_blocks):
            lost = next(o for o, s in free_blocks.items() if s >= 0)
            raise bad(lost, "free block is in no bin")
        if progress is not None:
            progress(1.0)

    def check_tags(self, progress: Callable[[float], None] | None = None
                   ) -> tuple[dict[int, int], set[int]]:
        """Walk the boundary tags alone (the truth); return (free blocks by size, used blocks).

        Raises CorruptHeapError naming the first bad tag. Reads only. O(blocks).
        """
        w = self._w
        brk = w[H_BRK]

        def bad(off: int, msg: str) -> CorruptHeapError:
            return CorruptHeapError(f"offset {off}: {msg}")

        if not _BLOCKS_OFF <= brk <= self._bmo or brk & 7:
            raise bad(136, f"brk {brk} outside [{_BLOCKS_OFF}, {self._bmo}] or misaligned")
        free_blocks: dict[int, int] = {}
        used_blocks: set[int] = set()
        b = _BLOCKS_OFF
        prev_free = False
        span = max(brk - _BLOCKS_OFF, 1)
        tick = 0
        while b < brk:
            if progress is not None:
                tick += 1
                if tick & 0xFFFF == 0:
                    progress(0.8 * (b - _BLOCKS_OFF) / span)  # the walk is most of the work
            hdr = w[b >> 3]
            size = hdr & -8
            if size < MIN_BLOCK or b + size > brk:
                raise bad(b, f"block size {size} (header {hdr:#x}) below {MIN_BLOCK} or past "
                             f"brk {brk}")
            if bool(hdr & PREV_FREE) != prev_free:
                raise bad(b, f"PREV_FREE bit is {bool(hdr & PREV_FREE)} but the previous block "
                             f"is {'free' if prev_free else 'used'}")
            if hdr & FREE:
                if prev_free:
                    raise bad(b, "two adjacent free blocks (missed coalesce)")
                if w[(b + size >> 3) - 1] != size:
                    raise bad(b, f"free block footer {w[(b + size >> 3) - 1]} != size {size}")
                free_blocks[b] = size
                prev_free = True
            else:
                if hdr & RELEASED:
                    raise bad(b, "RELEASED flag on a used block")
                used_blocks.add(b)
                prev_free = False
            b += size
        if prev_free:
            raise bad(b, "the block below brk is free (it should have merged into the wilderness)")

        return free_blocks, used_blocks

    def rebuild_bins(self) -> int:
        """Recreate bins, bitmaps and the allocation bitmap from the boundary tags. O(blocks).

        Returns the number of free blocks indexed. Used by recovery and ``repair``.
        """
        w = self._w
        for i in range(C_FL_BITMAP, C_HEADS + F.FL_COUNT * F.SL_COUNT):
            w[i] = 0
        bm_bytes = F.bitmap_bytes(self._cap)
        self._memset0(self._bmo, self._bmo + bm_bytes)
        count = 0
        for blk in list(self.walk()):
            b = blk.offset - 8
            if blk.free:
                self._insert(b, blk.size)
                count += 1
            else:
                bi = b >> 3
                w[self._bmw + (bi >> 6)] |= 1 << (bi & 63)
        return count


# ---------------------------------------------------------------------------------------------
# The journaled twin
# ---------------------------------------------------------------------------------------------

#: Methods that change allocator state inside an operation. Their journaled versions are made
#: from their own source by one mechanical rewrite (below), so there is one allocator to read and
#: to fix, and journaling costs nothing when it is off.
JOURNALED_METHODS: Final = ("malloc", "_from_wilderness", "_back_wilderness", "_grow", "free",
                            "_free_block", "_insert", "_unlink", "realloc", "_split_tail",
                            "memalign", "set_root")


class _LogWrites(ast.NodeTransformer):
    """Rewrite ``w[i] = v`` to ``_jset(i, v)`` and ``w[i] op= v`` to ``_jset(i, w[i] op v)``."""

    @staticmethod
    def _is_w(node: ast.AST) -> bool:
        return isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
            and node.value.id == "w"

    def _call(self, index: ast.expr, value: ast.expr) -> ast.Expr:
        return ast.Expr(ast.Call(ast.Name("_jset", ast.Load()), [index, value], []))

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        if len(node.targets) == 1 and self._is_w(node.targets[0]):
            return self._call(node.targets[0].slice, node.value)  # type: ignore[attr-defined]
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        if self._is_w(node.target):
            t = node.target
            old = ast.Subscript(ast.Name("w", ast.Load()), t.slice, ast.Load())  # type: ignore
            return self._call(t.slice, ast.BinOp(old, node.op, node.value))  # type: ignore
        return node


def _journaled_version(fn: object) -> object:
    """Compile ``fn`` again with every store to ``w[...]`` going through ``self._jset``."""
    src = textwrap.dedent(inspect.getsource(fn))  # type: ignore[arg-type]
    tree = ast.parse(src)
    ast.increment_lineno(tree, fn.__code__.co_firstlineno - 1)  # type: ignore[attr-defined]
    tree = _LogWrites().visit(tree)
    fdef = tree.body[0]
    for node in ast.walk(fdef):  # nothing may write the mapping behind the journal's back
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AugAssign) else []
        if any(_LogWrites._is_w(t) for t in targets):
            raise AssertionError(f"{fn.__name__}: unjournaled store left")  # type: ignore
    first = 1 if ast.get_docstring(fdef) else 0
    bind = ast.parse("_jset = self._jset").body[0]
    ast.copy_location(bind, fdef.body[0])
    fdef.body.insert(first, bind)
    ast.fix_missing_locations(tree)
    ns: dict[str, object] = {}
    exec(compile(tree, inspect.getsourcefile(fn), "exec"), fn.__globals__, ns)  # type: ignore
    return ns[fn.__name__]  # type: ignore[attr-defined]


_J_ENTRIES: Final = F.J_ENTRIES
_J_STATE: Final = F.J_STATE
_J_END: Final = F.J_END


class JournaledAllocator(Allocator):
    """The allocator with every operation made atomic by the undo journal (:mod:`pheap.journal`).

    The caller brackets each operation: :meth:`begin`, the operation, :meth:`commit` (or
    :meth:`rollback` when it raised). Cost: about 0.1 us per word an operation changes.
    """

    journaled = True

    in_tx = False  #: a transaction is open: records go to the txlog block, ops do not commit
    durable = False  #: msync before and after every commit word (durability="power")
    tx_brk = 0  #: brk when the open transaction began
    _tx_bmo = 0  #: allocation bitmap offset when the open transaction began
    _tx_cap = 0  #: capacity when the open transaction began

    def __init__(self, region: Region) -> None:
        super().__init__(region)
        self._jpos = _J_ENTRIES
        self._jend = _J_END
        self._jbase = _J_ENTRIES
        self._opstart = _J_ENTRIES
        self._oppending = 0
        self._crashy = journal.crashpoints_armed()  # test-only: count crash points
        if self._crashy:
            self._jset = self._jset_crash  # type: ignore[method-assign]

    def begin(self) -> None:
        """Open an operation: from here every word written is journaled first."""
        if self.in_tx:  # part of the transaction: remember where, to undo just it if it raises
            self._opstart = self._jpos
            self._oppending = len(self.pending)
            return
        w = self._w
        w[_J_ENTRIES] = 0
        w[_J_STATE] = 1
        self._jpos = _J_ENTRIES
        if self._crashy:
            journal.hit("begin")

    def commit(self) -> None:
        """Close the operation: the single word that makes all of it permanent."""
        if self.in_tx:
            return
        if self._crashy:
            journal.hit("commit")
        if self.durable:  # the operation and its undo log on disk before the commit word
            self._r.flush()
            self._w[_J_STATE] = 0
            self._r.flush()
            return
        self._w[_J_STATE] = 0

    def rollback(self) -> None:
        """Undo the open operation (it raised): every journaled word gets its old value back.

        Inside a transaction only this operation's records are undone; the transaction goes on.
        """
        w = self._w
        if self.in_tx:
            start, end = self._opstart, self._jend
            records = journal.records(w, self._cap >> 3, start, self._jbase, end)
            journal.restore(w, records)
            if records:
                journal.forget_zeros(w)
            w[start] = 0
            self._jpos = start
            del self.pending[self._oppending:]
        else:
            journal.undo(w, self._cap >> 3)
            self.pending.clear()
        if w[H_GENERATION] != self._gen or w[H_CAPACITY] != self._cap:
            self.sync()

    def _guard(self, b: int) -> None:
        """Journal the words of block ``b`` that an undo needs if ``b`` was free before this
        operation -- its links and its last word (the old footer) -- before calloc's memset or
        realloc's copy overwrites them without records."""
        w = self._w
        bi = b >> 3
        for i in (bi + 1, bi + 2, bi + ((w[bi] & -8) >> 3) - 1):
            self._jset(i, w[i])

    # -- transactions ------------------------------------------------------------------------

    def ensure_txlog(self, nbytes: int) -> None:
        """Make the transaction log block at least ``nbytes`` long (one atomic operation)."""
        w = self._w
        cur = w[F.H_TXLOG]
        if cur:
            try:
                self._live_unchecked(cur)
            except InvalidPointerError as e:
                raise CorruptHeapError(f"offset {F.H_TXLOG * 8}: transaction log offset {cur} "
                                       f"is not a live block ({e})") from None
            if (w[(cur >> 3) - 1] & -8) - 8 >= nbytes:
                return
        self.begin()
        try:
            new = self.malloc(nbytes)
            self._jset(F.H_TXLOG, new)
            if cur:
                self.free(cur)
        except BaseException:
            self.rollback()
            raise
        self.commit()

    def tx_begin(self) -> None:
        """Open a transaction: records go to the txlog block until tx_commit or tx_abort."""
        w = self._w
        p = w[F.H_TXLOG]
        self._jbase = p >> 3
        self._jend = (p - 8 + (w[(p >> 3) - 1] & -8)) >> 3
        w[self._jbase] = 0
        self.tx_brk = w[H_BRK]  # bytes in [tx_brk, _tx_bmo) were in no live block when it began
        self._tx_bmo = self._bmo
        self._tx_cap = self._cap
        w[_J_STATE] = F.J_TX  # from here a crash undoes the transaction
        self._jpos = self._jbase
        self.in_tx = True
        if self._crashy:
            journal.hit("begin")

    def tx_commit(self, durable: bool = False) -> None:
        """Make the transaction permanent (one word), then give back pages it freed."""
        if self._crashy:
            journal.hit("commit")
        if durable or self.durable:
            self._r.flush()
            self._w[_J_STATE] = 0
            self._r.flush()
        else:
            self._w[_J_STATE] = 0
        self._tx_end()
        self.release_pending()

    def tx_abort(self) -> None:
        """Undo everything the transaction did, last first."""
        try:
            journal.undo(self._w, self._cap >> 3)
        finally:
            self.pending.clear()
            self._tx_end()
        w = self._w
        if w[H_GENERATION] != self._gen or w[H_CAPACITY] != self._cap:
            self.sync()

    def txlog_span(self) -> tuple[int, int]:
        """Byte range [start, end) of the transaction log block, header included ((0, 0): none)."""
        p = self._w[F.H_TXLOG]
        if not p:
            return 0, 0
        return p - 8, p - 8 + (self._w[(p >> 3) - 1] & -8)

    def _tx_end(self) -> None:
        self.in_tx = False
        self._jbase = self._jpos = _J_ENTRIES
        self._jend = _J_END

    def log_range(self, off: int, n: int) -> None:
        """Record the current bytes [off, off+n) so that an abort or a crash restores them.

        Bytes that were wilderness when the transaction began -- [tx_brk, bitmap offset then) --
        are not recorded: they were in no live block, and an undo frees whatever the
        transaction allocated there; nor are bytes past the capacity it began with. The old
        allocation bitmap in between, if the heap grew inside the transaction, is recorded.
        """
        lo, hi, cap = self.tx_brk, self._tx_bmo, self._tx_cap
        end = off + n
        if off < lo:
            self._log_bytes(off, min(end, lo) - off)
        if end > hi and off < cap:  # the old bitmap, if the heap grew; past it was no heap
            start = max(off, hi)
            self._log_bytes(start, min(end, cap) - start)

    def _log_bytes(self, off: int, n: int) -> None:
        w = self._w
        p = self._jpos
        nw = (n + 7) >> 3
        if p + 3 + nw >= self._jend:
            raise TransactionTooLargeError(
                f"transaction log full: {n} more bytes at offset {off} do not fit in "
                f"{(self._jend - self._jbase) * 8} bytes of log")
        if self._crashy:
            journal.hit("write")
        self._r.mm.move((p + 2) << 3, off, n)
        w[p + 1] = off
        w[p + 2 + nw] = 0
        w[p] = F.RANGE_FLAG | n  # the record is live from here on
        self._jpos = p + 2 + nw
        if self._crashy:
            journal.hit("write")

    def _jset(self, i: int, v: int) -> None:
        w = self._w
        p = self._jpos
        if p + 2 >= self._jend:
            raise self._log_full()
        w[p + 2] = 0  # the next entry's index: keeps the log terminated
        w[p + 1] = w[i]
        w[p] = i  # the entry is live from here on
        self._jpos = p + 2
        w[i] = v

    def _jset_crash(self, i: int, v: int) -> None:
        journal.hit("write")
        w = self._w
        p = self._jpos
        if p + 2 >= self._jend:
            raise self._log_full()
        w[p + 2] = 0
        w[p + 1] = w[i]
        w[p] = i
        self._jpos = p + 2
        journal.hit("write")
        w[i] = v

    def _log_full(self) -> PheapError:
        if self.in_tx:
            return TransactionTooLargeError(
                f"transaction log full ({(self._jend - self._jbase) * 8} bytes)")
        return PheapError(f"operation changes more than {F.J_CAPACITY} words: too large for the "
                          "journal")


for _name in JOURNALED_METHODS:
    setattr(JournaledAllocator, _name, _journaled_version(getattr(Allocator, _name)))
del _name

__all__ = ["Allocator", "JournaledAllocator", "BlockInfo", "HeapStats", "RELEASE_THRESHOLD",
           "TRIM_THRESHOLD", "TOP_PAD"]
