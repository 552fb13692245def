"""Small slots in runs, large blocks in two-level segregated-fit bins with boundary tags; all of it
inside the mapping.

The seeds' ladder to its top. Large requests (over ``RUN_LIMIT`` = 448 bytes) get blocks: a
wilderness extended on demand (``brk``), free blocks in size-class bins found in O(1) through two
levels of bitmaps (TLSF), boundary tags so that a freed block merges with both neighbours in O(1),
splitting with a minimum block, and big free areas given back to the OS. Small requests get
*slots* of a run: a page-aligned block of one to four pages holding slots of one size class
(segregated storage), with a bitmap of free slots and no header per slot. A run's bitmap words
that have a free slot are linked into their class's list, so a slot is found in O(1); a run
that empties goes back to the bins (one per class is kept for reuse, so a heap that breathes does
not thrash). Layout and flag bits: see :mod:`pheap.format`.

All state is in the mapping and every reference is an offset, so any process that maps the
region sees the same heap. The boundary tags (block headers and footers) and the runs' slot
bitmaps are the truth; the bins, bin bitmaps, class lists, page map and allocation bitmap are an
index over them that :meth:`Allocator.rebuild` recreates with one walk.

**Crash safety: every store goes through the journal.** Inside an operation, every word this
module changes in the mapping is written with ``st(i, v)``, the journal's store (``st =
self._j.set``): the old value is logged first, so a crash or an exception anywhere leaves the
heap exactly as before the operation. There is no second, "journaled" copy of the allocator to
keep in step. Three kinds of code write the mapping without ``st``, each named in
:data:`UNJOURNALED`, with the reason: the single-word fast paths (one aligned store is atomic by
itself), work that is marked for recovery in the header instead (``rebuild``), and writes to
bytes nothing live refers to (growth's new metadata, page release). ``tests/test_allocator.py``
checks this list against the source.

Costs: ``malloc``, ``free``, ``calloc`` (plus the memset), ``realloc`` in place, ``memalign`` and
``usable_size`` are O(1) in the number of blocks; ``walk``, ``stats``, ``check``, ``rebuild`` and
``trim`` are O(blocks). Growth copies the metadata (capacity / 60 bytes) and is amortised by
growing the capacity geometrically.

Performance notes. Python pays ~30 ns a word access and ~50-70 ns a call, so the hot paths are
written flat: ``malloc``/``free`` of a slot that changes one bitmap word is one plain store with
no journal (tools/bench_alloc.py: the 24 B pair); the bin arithmetic of the block paths is
inlined where the churn benchmark showed it pays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from threading import get_ident
from typing import TYPE_CHECKING, Final, NamedTuple

from . import format as F
from . import journal
from .errors import (
    CorruptHeapError,
    HeapFullError,
    InvalidPointerError,
    InvalidSizeError,
    TransactionStateError,
)
from .format import (
    C_CLASS_CACHE,
    C_CLASS_HEADS,
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
    RUN,
)

if TYPE_CHECKING:
    from .journal import Journal
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
ALIGNED_PROBES: Final = 8  #: free blocks an aligned allocation looks at before the wilderness
_ZEROS: Final = bytes(1 << 20)  #: source for memset-by-slice (1 MiB at a time)

#: Methods that write the mapping without the journal's ``st``, and why that is safe.
UNJOURNALED: Final = {
    "malloc": "fast path: one aligned word store, atomic by itself; the rest goes through _bracket",
    "free": "fast path: one aligned word store, atomic by itself; the rest goes through _bracket",
    "_grow": "copies and zeroes the new metadata past the old capacity, which nothing live "
             "refers to until the journaled capacity store commits the growth",
    "release_pending": "after commit: sets RELEASED before the pages go (a crash between only "
                       "costs a needless posix_fallocate), lowers zero_from after",
    "_release_wilderness": "after commit, ordered as release_pending",
    "trim": "outside any operation, ordered as release_pending",
    "_memset0": "user bytes (calloc) or wilderness bytes above zero_from; callers guard the "
                "words an undo needs",
    "_copy": "realloc's copy into a block allocated in the same operation, guarded the same way",
    "rebuild": "rewrites only the index (bins, lists, page map, allocation bitmap) from the "
               "tags; the caller marks the header so that a crash half way rebuilds again",
    "_raw_insert": "rebuild's insert into a bin, under rebuild's marker",
    "format_region": "a new heap that no process has opened yet",
}

_SZ: Final = F.SIZE_MASK  # inlined size mask of a header word
_SMALL: Final = F.SMALL_LIMIT  # inlined small-class limit
_BLOCKS_OFF: Final = F.BLOCKS_OFF  # inlined first block offset
_PAGE: Final = F.PAGE  # inlined page size
_MAX_REQUEST: Final = F.MAX_BLOCK - F.BLOCK_OVERHEAD  # largest payload a block can hold
_RUN_LIMIT: Final = F.RUN_LIMIT
_CLASS_OF: Final = F.CLASS_OF
_CSIZE: Final = F.CLASS_SIZE
_CFIRST: Final = F.CLASS_FIRST
_CWORDS: Final = F.CLASS_WORDS
_CSLOTS: Final = F.CLASS_SLOTS
_CMASKS: Final = F.CLASS_MASKS
_PM_CLASS: Final = F.PM_CLASS
_PM_SHIFT: Final = F.PM_SHIFT
_FRESH_SPANS: Final = journal.FRESH_SPANS
_ATOMIC: Final = journal.ATOMIC
_H_ROOT: Final = F.H_ROOT
_H_OBJECTS: Final = F.H_OBJECTS
_J_STATE: Final = F.J_STATE
_UNLISTED: Final = F.UNLISTED
assert set(F.ENTRIES.values()) == {_H_ROOT, _H_OBJECTS}  # the free fast path checks these two


class BlockInfo(NamedTuple):
    """One block or slot, as :meth:`pheap.Heap.walk` reports it."""

    offset: int  #: payload offset (what malloc returned); a block's header is 8 bytes before it
    size: int  #: bytes: a block's size header included, or a slot's size
    free: bool  #: whether it is free
    kind: str  #: ``"block"``, ``"run"`` (a block holding slots) or ``"slot"``

    @property
    def usable(self) -> int:
        """Payload bytes."""
        return self.size if self.kind == "slot" else self.size - F.BLOCK_OVERHEAD


class HeapStats(NamedTuple):
    """Figures from :meth:`pheap.Heap.stats` (one walk over the blocks and runs)."""

    capacity: int  #: bytes mapped (file size in use)
    block_area: int  #: bytes between the first block and brk
    wilderness: int  #: bytes between brk and the metadata (room before growing)
    used_blocks: int  #: live allocations: used blocks that are not runs, plus used slots
    used_bytes: int  #: bytes they take: block sizes (headers included) plus slot sizes
    payload_bytes: int  #: usable bytes of the live allocations
    free_blocks: int  #: number of free blocks in the bins
    free_bytes: int  #: bytes in free blocks (wilderness not included)
    largest_free: int  #: largest free block (or the wilderness, if larger)
    fragmentation: float  #: 1 - largest_free / (free_bytes + wilderness); 0 when nothing is free
    peak_brk: int  #: high-water mark of brk, in bytes from the start of the mapping
    generation: int  #: growth generation
    runs: int  #: runs (blocks holding slots)
    run_bytes: int  #: bytes of all runs, headers included
    used_slots: int  #: live slots (counted in used_blocks too)
    free_slots: int  #: free slots in the runs

    @property
    def metadata_bytes(self) -> int:
        """Header page, control block, page map and allocation bitmap."""
        return _BLOCKS_OFF + F.meta_bytes_for(self.capacity)


class Allocator:
    """The allocator over one :class:`~pheap.region.Region` and its :class:`~pheap.journal.Journal`.

    It has no lock of its own: callers (``pheap.heap``) serialise access, call :meth:`sync`
    first so the local mapping covers the capacity another process may have grown the heap to,
    and set :attr:`fast` to their thread's ident while the single-store fast paths are allowed
    (lock held, no bracket open, writable). Every other call goes through :meth:`_op`.
    """

    fast = 0  #: thread ident allowed to take the single-store fast paths (0: nobody)
    held = 0  #: thread ident that holds the heap lock for writing (0: nobody)

    def __init__(self, region: Region, jrnl: Journal) -> None:
        self._r = region
        self._j = jrnl
        self.pending: list[tuple[int, int]] = []  #: page releases queued until commit
        #: undos begun in this process (counted before each starts: the object layer compares
        #: it with the undos it has caught up with, even when an interrupt cut one short)
        self.undos = 0
        self._grown_zero_from = 0  # zero_from the last growth needed (calloc reads it)
        self._adopt()
        self._gen = self._w[H_GENERATION]
        self._pins = (self._w[_H_ROOT], self._w[_H_OBJECTS])  # entries, refreshed by the lock

    # -- mapping bookkeeping ---------------------------------------------------------------

    def _adopt(self) -> None:
        """Refresh the cached views and geometry from the region (after a remap).

        Every value is computed first and assigned in one statement, so an interrupt cannot
        leave half of them stale.
        """
        r = self._r
        cap = r.size
        meta = F.meta_off(cap)
        bmo = F.bitmap_off(cap)
        self._w, self._b, self._cap, self._meta, self._bmw, self._j.w = (
            r.w, r.b, cap, meta, bmo >> 3, r.w)

    def sync(self) -> None:
        """Remap if another process grew the heap since this process last looked. O(1)."""
        w = self._w
        if self._w is not self._r.w:
            self._adopt()
            w = self._w
        if w[H_GENERATION] != self._gen or w[H_CAPACITY] != self._cap:
            cap = w[H_CAPACITY]
            fsize = self._r.file_size()
            if cap > fsize or cap < F.min_capacity() or cap % _PAGE:
                raise CorruptHeapError(
                    f"{F.at('capacity')}: {cap} is not a capacity this file of {fsize} bytes "
                    "can have (truncated by something other than pheap, or damaged)")
            self._r.remap(cap)
            self._adopt()
            self._gen = self._w[H_GENERATION]

    # -- format initialisation ---------------------------------------------------------------

    @staticmethod
    def format_region(region: Region, max_size: int = 0) -> None:
        """Write the header of a new heap into ``region`` (the rest starts all zero)."""
        region.mm[0:F.HEADER_SIZE] = F.new_header(region.size, max_size)

    # -- the operation bracket -----------------------------------------------------------------

    def _bracket(self, fn: Callable[..., object], *args: object) -> object:
        """Run ``fn(*args)`` as one operation: all of it or, if it raises, none of it. Page
        releases it queued happen after the commit (they cannot be undone). This is the one
        begin/commit/rollback bracket of the allocator."""
        j = self._j
        if not j.mode and self._w[_J_STATE]:
            self.finish_undo()  # an earlier rollback was cut off (Ctrl-C): finish it first
        t = j.begin()
        try:
            r = fn(*args)
        except BaseException:
            self.undos += 1
            # While the undo runs, no fast path may store a word it is about to restore; if
            # the undo itself is interrupted, the fast paths stay off until the next acquisition
            # and the next operation finishes it (j_state in the mapping says it is pending).
            fast = self.fast
            self.fast = 0
            j.rollback(t)
            if t == journal.OUTERMOST:
                self.pending.clear()
            self.after_undo()
            self.fast = fast
            raise
        j.commit(t)
        if self.pending and not j.mode:
            self.release_pending()
        return r

    def finish_undo(self) -> None:
        """Undo what the journal says is pending (a rollback an exception cut short)."""
        self.undos += 1
        self.fast = 0
        journal.undo(self._w, len(self._w))
        self.pending.clear()
        self._j.reset()
        self.after_undo()

    def _locked(self, method: Callable[..., object], fn: Callable[..., object],
                *args: object) -> object:
        """A public call made without the lock held: here (a bare allocator, whose caller
        serialises access) just the bracket; pheap.heap.Core takes the lock and calls
        ``method(*args)`` again."""
        return self._bracket(fn, *args)

    def after_undo(self) -> None:
        """Refresh what an undo may have changed under this process: the mapping (an undone
        growth) and the cached entries."""
        if self._w is not self._r.w or self._w[H_CAPACITY] != self._cap:
            self.sync()
        self._pins = (self._w[_H_ROOT], self._w[_H_OBJECTS])

    # -- validation helpers ------------------------------------------------------------------

    @staticmethod
    def _check_size(n: object, what: str = "size") -> int:
        if type(n) is not int:
            if isinstance(n, bool) or not hasattr(n, "__index__"):
                raise InvalidSizeError(f"{what} must be an int, not {type(n).__name__}")
            n = n.__index__()  # type: ignore[attr-defined]
        if n < 0:
            raise InvalidSizeError(f"{what} must not be negative: {n}")
        if n > _MAX_REQUEST:
            raise InvalidSizeError(f"{what} {n} exceeds the largest block the format allows "
                                   f"({_MAX_REQUEST} bytes)")
        return n  # type: ignore[return-value]

    def _slot_of(self, p: int, v: int) -> tuple[int, int, int, int]:
        """(class, run base, bitmap word index, bit) of the live slot ``p`` in the run whose
        page-map byte is ``v``; InvalidPointerError when ``p`` is not a live slot's start."""
        c = (v & _PM_CLASS) - 1
        if c >= F.CLASS_COUNT:
            raise CorruptHeapError(f"offset {self._meta + (p >> 12)}: page-map byte {v} "
                                   "names no class")
        base = ((p >> 12) - (v >> _PM_SHIFT)) << 12
        size = _CSIZE[c]
        d = p - base - _CFIRST[c]
        idx = d // size
        if d != idx * size or not 0 <= idx < _CSLOTS[c]:
            where = "inside the run's header" if d < 0 else \
                "past the run's last slot" if idx >= _CSLOTS[c] else \
                f"not at the start of a {size}-byte slot"
            raise InvalidPointerError(f"invalid offset {p}: {where} (run at {base - 8}, class "
                                      f"{size} B)")
        k = (base >> 3) + (idx >> 6)
        bit = 1 << (idx & 63)
        if self._w[k] & bit:
            raise InvalidPointerError(f"invalid offset {p}: a free slot of the {size}-byte run "
                                      f"at {base - 8} (double free?)")
        return c, base, k, bit

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
        size = hdr & _SZ
        end = b + size
        return size >= MIN_BLOCK and end <= self._w[H_BRK] and self._w[(end >> 3) - 1] == size

    def _block_of(self, p: object) -> int:
        """Block offset of the live block (not slot, not run) whose payload is ``p``."""
        if type(p) is not int or p & 7 or p < _BLOCKS_OFF + 8 or p >= self._w[H_BRK]:
            raise self._bad_pointer(p)
        b = p - 8
        w = self._w
        if not (w[self._bmw + (b >> 9)] >> ((b >> 3) & 63)) & 1:
            raise self._bad_pointer(p)
        if w[b >> 3] & RUN:
            raise InvalidPointerError(f"invalid offset {p}: it is a run of small slots, which "
                                      "belongs to the allocator")
        return b

    def is_block(self, p: int) -> bool:
        """Whether ``p`` is the payload offset of a live block (not a run or slot). O(1)."""
        try:
            self._block_of(p)
        except InvalidPointerError:
            return False
        return True

    def live_size(self, p: object) -> int:
        """Usable bytes of the live block or slot at ``p``; InvalidPointerError otherwise (the
        transaction log block, the journal's own, included). O(1)."""
        if type(p) is not int or p & 7 or p < _BLOCKS_OFF + 8 or p >= self._w[H_BRK]:
            raise self._bad_pointer(p)
        v = self._b[self._meta + (p >> 12)]
        if v:
            return _CSIZE[self._slot_of(p, v)[0]]
        b = self._block_of(p)
        if p == self._w[F.H_TXLOG]:
            raise InvalidPointerError(f"invalid offset {p}: it is the transaction log block")
        return (self._w[b >> 3] & _SZ) - 8

    def payload(self, p: object) -> bytes:
        """A copy of the whole usable part of the live block or slot at ``p`` (the layers
        above read a blob with it: one call where ``live_size`` and a slice were two).
        InvalidPointerError as :meth:`live_size`. O(size)."""
        if type(p) is int and not p & 7 and _BLOCKS_OFF + 8 <= p < self._w[H_BRK]:
            v = self._b[self._meta + (p >> 12)]
            if v:  # a slot: live_size's checks inlined
                c = (v & _PM_CLASS) - 1
                if c < F.CLASS_COUNT:
                    base = ((p >> 12) - (v >> _PM_SHIFT)) << 12
                    size = _CSIZE[c]
                    d = p - base - _CFIRST[c]
                    idx = d // size
                    if d == idx * size and -1 < idx < _CSLOTS[c] and \
                            not self._w[(base >> 3) + (idx >> 6)] & (1 << (idx & 63)):
                        return self._r.mm[p:p + size]
        return self._r.mm[p:p + self.live_size(p)]  # type: ignore[operator]

    def is_live(self, p: int) -> bool:
        """Whether ``p`` is the payload offset of a live block or slot. O(1)."""
        try:
            self.live_size(p)
        except InvalidPointerError:
            return False
        return True

    def containing(self, off: int, n: int) -> tuple[int, int]:
        """(payload start, payload end) of the live block or slot holding bytes [off, off+n).

        O(1) when ``off`` is a payload start or inside a slot; otherwise the allocation bitmap
        is searched backwards from ``off`` for the block's start, O(distance / 512) words.
        InvalidPointerError names the range when no live block holds all of it.
        """
        w = self._w
        if type(off) is not int or type(n) is not int or n < 0:
            raise InvalidPointerError(f"offset and length must be ints: {off!r}, {n!r}")
        brk = w[H_BRK]
        if off < _BLOCKS_OFF + 8 or off >= brk or off + n > brk:
            raise InvalidPointerError(f"range [{off}, {off + n}) is outside the block area "
                                      f"[{_BLOCKS_OFF + 8}, {brk})")
        v = self._b[self._meta + (off >> 12)]
        if v:  # inside a run: the slot holding off
            c = (v & _PM_CLASS) - 1
            base = ((off >> 12) - (v >> _PM_SHIFT)) << 12
            size = _CSIZE[c]
            idx = (off - base - _CFIRST[c]) // size
            start = base + _CFIRST[c] + idx * size
            if 0 <= idx < _CSLOTS[c] and off >= start:
                # raises for a free slot (with the page-map byte of the slot's first page: a
                # slot of a multi-page run may begin on the page before off's)
                self._slot_of(start, self._b[self._meta + (start >> 12)])
                if off + n <= start + size:
                    return start, start + size
                raise InvalidPointerError(f"range [{off}, {off + n}) runs past the end of the "
                                          f"{size}-byte slot at {start}")
            raise InvalidPointerError(f"range [{off}, {off + n}) is inside the header of the "
                                      f"run at {base - 8}")
        b = self._block_start_before(off - 8)
        if b < 0:
            raise InvalidPointerError(f"range [{off}, {off + n}) is in no live block")
        hdr = w[b >> 3]
        end = b + (hdr & _SZ)
        if hdr & RUN or off >= end:
            raise InvalidPointerError(f"range [{off}, {off + n}) is in no live block (it lies in "
                                      "free space)")
        if b + 8 == w[F.H_TXLOG]:
            raise InvalidPointerError(f"range [{off}, {off + n}) is in the transaction log block")
        if off + n > end:
            raise InvalidPointerError(f"range [{off}, {off + n}) runs past the end of the block "
                                      f"[{b + 8}, {end})")
        return b + 8, end

    def _block_start_before(self, b: int) -> int:
        """Offset of the last used block starting at or before ``b``, from the allocation
        bitmap (-1 when none). The backward search runs over bytes of the bitmap in C."""
        bi = b >> 3  # bit number of b in the bitmap
        base = self._bmw << 3  # byte offset of the bitmap
        first = base + (_BLOCKS_OFF >> 6)
        mm = self._r.mm
        hi = base + (bi >> 3)
        x = mm[hi] & ((2 << (bi & 7)) - 1)
        if x:
            return ((hi - base) << 6) + ((x.bit_length() - 1) << 3)
        step = 4096
        while hi > first:
            lo = max(first, hi - step)
            chunk = mm[lo:hi].rstrip(b"\0")
            if chunk:
                at = lo + len(chunk) - 1
                return ((at - base) << 6) + ((chunk[-1].bit_length() - 1) << 3)
            hi = lo
            step = min(step * 4, 1 << 20)
        return -1

    # -- bins ----------------------------------------------------------------------------------

    def _insert(self, b: int, size: int) -> None:
        """Push free block ``b`` of ``size`` bytes on the head of its bin. O(1)."""
        w = self._w
        st = self._j.set
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
        st(bi + 1, head)
        st(bi + 2, 0)
        if head:
            st((head >> 3) + 2, b)
        else:
            m = w[C_SL_BITMAP + fl]
            if not m:
                st(C_FL_BITMAP, w[C_FL_BITMAP] | 1 << fl)
            st(C_SL_BITMAP + fl, m | (1 << sl))
        st(h, b)

    def _unlink(self, b: int, size: int) -> None:
        """Remove free block ``b`` of ``size`` bytes from its bin. O(1)."""
        w = self._w
        st = self._j.set
        bi = b >> 3
        nxt = w[bi + 1]
        prv = w[bi + 2]
        if prv:
            st((prv >> 3) + 1, nxt)
        else:
            if size < _SMALL:
                fl = 0
                sl = size >> 3
            else:
                bl = size.bit_length() - 1
                fl = bl - 7
                sl = (size >> (bl - 5)) & 31
            st(C_HEADS + (fl << 5) + sl, nxt)
            if not nxt:
                m = w[C_SL_BITMAP + fl] & ~(1 << sl)
                st(C_SL_BITMAP + fl, m)
                if not m:
                    st(C_FL_BITMAP, w[C_FL_BITMAP] & ~(1 << fl))
        if nxt:
            st((nxt >> 3) + 2, prv)

    def _set_alloc_bit(self, b: int, on: bool) -> None:
        """Set or clear the allocation-bitmap bit of block ``b``."""
        bi = b >> 3
        k = self._bmw + (bi >> 6)
        x = self._w[k]
        bit = 1 << (bi & 63)
        self._j.set(k, x | bit if on else x & ~bit)

    def _set_page_map(self, page: int, v: int) -> None:
        """Set the page-map byte of page number ``page`` to ``v`` (one journaled word)."""
        i = (self._meta >> 3) + (page >> 3)
        sh = (page & 7) << 3
        self._j.set(i, (self._w[i] & ~(0xFF << sh)) | v << sh)

    # -- malloc --------------------------------------------------------------------------------

    def malloc(self, n: int) -> int:
        """Allocate ``n`` bytes; return the payload offset (never 0). O(1).

        ``malloc(0)`` returns the smallest slot, like glibc returns a minimum chunk. Raises
        HeapFullError when the heap cannot grow, InvalidSizeError for negative or absurd sizes.
        Requests up to RUN_LIMIT (448) bytes are slots of a run, 8-byte aligned; larger ones
        are blocks.
        """
        me = get_ident()
        if self.fast == me and type(n) is int and -1 < n <= _RUN_LIMIT:
            # Fast path: a slot from the head word of its class's list: one plain store, atomic
            # by itself, so no journal (a word that fills stays on the list until a malloc meets
            # it: see pheap.format). 0.3-0.4 us of a crash-safe pair (tools/bench_alloc.py).
            c = _CLASS_OF[n]
            w = self._w
            k = w[C_CLASS_HEADS + c]
            if k:
                x = w[k]
                if x:
                    low = x & -x
                    w[k] = x ^ low
                    base = (k << 3) & -4096
                    return base + _CFIRST[c] + ((((k << 3) - base) << 3) + low.bit_length() - 1) \
                        * _CSIZE[c]
        if self.held == me:
            return self._bracket(self._malloc, n)  # type: ignore[return-value]
        return self._locked(self.malloc, self._malloc, n)  # type: ignore[return-value]

    def jmalloc(self, n: int) -> int:
        """malloc inside an open bracket (the object layer's): a slot whose bitmap word keeps a
        free slot is one journaled store; anything else is a nested operation. The caller holds
        the lock and has a bracket or operation open."""
        if type(n) is int and -1 < n <= _RUN_LIMIT:
            c = _CLASS_OF[n]
            w = self._w
            k = w[C_CLASS_HEADS + c]
            if k:
                x = w[k]
                if x:
                    low = x & -x
                    j = self._j
                    j.set(k, x ^ low)
                    base = (k << 3) & -4096
                    p = base + _CFIRST[c] + ((((k << 3) - base) << 3) + low.bit_length() - 1) \
                        * _CSIZE[c]
                    if j.mode >= _ATOMIC:
                        if p not in j.freed and base not in j.new_runs:
                            j.fresh[p] = p + _CSIZE[c]
                        else:
                            j.unfresh.add(p)
                    return p
        return self._bracket(self._malloc, n)  # type: ignore[return-value]

    def jfree(self, p: int) -> None:
        """free inside an open bracket (see jmalloc): a slot whose word stays on its list and
        whose run does not empty is one journaled store; anything else a nested operation.
        (The slot tests are free()'s fast path, inlined in both: keep them in step.)"""
        if type(p) is int and p > 0:
            try:
                v = self._b[self._meta + (p >> 12)]
            except IndexError:
                v = 0
            if v:
                c = (v & 31) - 1
                base = ((p >> 12) - (v >> 5)) << 12
                size = _CSIZE[c]
                d = p - base - _CFIRST[c]
                idx = d // size
                if d == idx * size and -1 < idx < _CSLOTS[c]:
                    w = self._w
                    k = (base >> 3) + (idx >> 6)
                    x = w[k]
                    bit = 1 << (idx & 63)
                    if not x & bit and p not in self._pins and \
                            (x or w[k + 2 * _CWORDS[c]] != _UNLISTED):
                        y = x | bit
                        if y != _CMASKS[c][idx >> 6] or \
                                (w[C_CLASS_HEADS + c] << 3) & -4096 == base:
                            j = self._j
                            j.set(k, y)
                            if j.mode >= _ATOMIC:
                                j.fresh.pop(p, None)
                                j.freed.add(p)
                            return
        self._bracket(self._free, p)

    def _malloc(self, n: int, guard: bool = False) -> int:
        """malloc inside an operation. ``guard``: the caller writes data into the result before
        the operation commits (see _guard)."""
        if type(n) is not int or n < 0 or n > _MAX_REQUEST:
            n = self._check_size(n)
        j = self._j
        if n <= _RUN_LIMIT:
            p = self._slot(_CLASS_OF[n])
            if j.mode >= _ATOMIC:
                if p not in j.freed and \
                        ((p >> 12) - (self._b[self._meta + (p >> 12)] >> _PM_SHIFT)) << 12 \
                        not in j.new_runs:  # (the run's first page: runs span up to 4 pages)
                    j.fresh[p] = p + _CSIZE[_CLASS_OF[n]]  # its bytes need no undo records
                else:
                    j.unfresh.add(p)
            return p
        if j.mode < _ATOMIC:
            return self._block((n + 15) & -8, guard) + 8
        # In a bracket the block is guarded (its words an undo needs are journaled now), so
        # stores into it need no records -- unless it overlaps a block freed in the bracket,
        # whose bytes may have been live when the bracket began.
        b = self._block((n + 15) & -8, True)
        end = b + (self._w[b >> 3] & _SZ)
        if j.block_is_fresh(b, end):
            j.fresh[b + 8] = end
        else:
            j.unfresh.add(b + 8)
        return b + 8

    def _slot(self, c: int) -> int:
        """Take a free slot of class ``c`` (a new run when the class has none). O(1)."""
        w = self._w
        limit = (w[H_BRK] - _BLOCKS_OFF) >> 3
        while True:
            k = w[C_CLASS_HEADS + c]
            if not k:
                self._new_run(c)  # may grow the heap: a new mapping
                w = self._w
                continue
            x = w[k]
            if x:
                break
            self._chunk_unlink(c, k)  # a full word met on the list: off it now (lazily)
            limit -= 1
            if limit < 0:
                raise CorruptHeapError(f"class {_CSIZE[c]} B list: a cycle of full words")
        low = x & -x
        self._j.set(k, x ^ low)
        base = (k << 3) & -4096
        return base + _CFIRST[c] + ((((k << 3) - base) << 3) + low.bit_length() - 1) * _CSIZE[c]

    def _chunk_push(self, c: int, k: int) -> None:
        """Put bitmap word ``k`` (which has a free slot) on the head of class ``c``'s list."""
        w = self._w
        st = self._j.set
        m = _CWORDS[c]
        h = C_CLASS_HEADS + c
        nx = w[h]
        st(k + m, nx)
        st(k + 2 * m, 0)
        if nx:
            st(nx + 2 * m, k)
        st(h, k)

    def _chunk_unlink(self, c: int, k: int) -> None:
        """Take bitmap word ``k`` off class ``c``'s list (its prev link becomes UNLISTED)."""
        w = self._w
        st = self._j.set
        m = _CWORDS[c]
        nx = w[k + m]
        pv = w[k + 2 * m]
        if pv:
            st(pv + m, nx)
        else:
            st(C_CLASS_HEADS + c, nx)
        if nx:
            st(nx + 2 * m, pv)
        st(k + 2 * m, _UNLISTED)

    def _new_run(self, c: int) -> None:
        """Make a run of class ``c`` and put its bitmap words on the class's list."""
        pages = F.CLASS_PAGES[c]
        b = self._aligned_block(pages * _PAGE, _PAGE)
        st = self._j.set
        w = self._w
        st(b >> 3, F.run_header(c) | (w[b >> 3] & PREV_FREE))
        base = b + 8
        bi = base >> 3
        m = _CWORDS[c]
        masks = _CMASKS[c]
        for j in range(m):
            st(bi + j, masks[j])
            st(bi + m + j, bi + j + 1 if j + 1 < m else w[C_CLASS_HEADS + c])
            st(bi + 2 * m + j, bi + j - 1 if j else 0)
        nx = w[C_CLASS_HEADS + c]
        if nx:
            st(nx + 2 * m, bi + m - 1)
        st(C_CLASS_HEADS + c, bi)
        first = base >> 12
        for i in range(pages):
            self._set_page_map(first + i, F.page_map_byte(c, i))
        j = self._j
        if j.mode >= _ATOMIC and not j.block_is_fresh(b, b + pages * _PAGE):
            j.new_runs.add(base)  # carved from bytes that may have been live when it began

    def _block(self, s: int, guard: bool) -> int:
        """Take a block of ``s`` bytes (8-aligned, >= MIN_BLOCK) from the bins or the
        wilderness; return its block offset. ``guard``: journal the words of a block taken from
        a bin that an undo needs but the caller's data writes would overwrite. O(1)."""
        if s < MIN_BLOCK:
            s = MIN_BLOCK
        w = self._w
        st = self._j.set
        b = 0
        if s < _SMALL:
            fl = 0
            sl = s >> 3
        else:
            # Better fit first: the head of the size's own class, if it is large enough. O(1).
            bl = s.bit_length() - 1
            fl = bl - 7
            sl = (s >> (bl - 5)) & 31
            h = C_HEADS + (fl << 5) + sl
            b = w[h]
            if b and w[b >> 3] & _SZ < s:
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
        bsize = hdr & _SZ
        if hdr & RELEASED:  # pages of this block went back to the OS: back them first
            self._r.ensure_backed(b, min(s + MIN_BLOCK, bsize))
        if guard:
            self._guard(b, bsize)
        # Unlink the head of the bin (inlined _unlink for a head block).
        nxt = w[bi + 1]
        st(h, nxt)
        if nxt:
            st((nxt >> 3) + 2, 0)
        else:
            m = w[C_SL_BITMAP + fl] & ~(1 << sl)
            st(C_SL_BITMAP + fl, m)
            if not m:
                st(C_FL_BITMAP, w[C_FL_BITMAP] & ~(1 << fl))
        rem = bsize - s
        if rem >= MIN_BLOCK:
            # Split: [b: used s][r: free rem]. The block after r already has PREV_FREE set.
            st(bi, s)
            r = b + s
            ri = r >> 3
            # r's header and links lie inside the free block taken: an undo makes it one free
            # block again, whose inside means nothing, so they need no records -- unless that
            # block was freed in the open bracket, when its bytes may be a live block's again
            # after an undo (then they are logged). Its footer is the taken block's own: logged.
            j = self._j
            if j.freed_spans and j.mode >= _ATOMIC and j.overlaps_freed(r, r + 24):
                st(ri, rem | FREE | (hdr & RELEASED))
                st(ri + 1, w[ri + 1])
                st(ri + 2, w[ri + 2])
            w[ri] = rem | FREE | (hdr & RELEASED)  # unlogged: inside the block taken
            st(ri + (rem >> 3) - 1, rem)
            # Inlined _insert(r, rem): one call less on the hottest block path.
            if rem < _SMALL:
                fl = 0
                sl = rem >> 3
            else:
                bl = rem.bit_length() - 1
                fl = bl - 7
                sl = (rem >> (bl - 5)) & 31
            h = C_HEADS + (fl << 5) + sl
            head = w[h]
            w[ri + 1] = head  # unlogged: inside the block taken
            w[ri + 2] = 0  # unlogged: inside the block taken
            if head:
                st((head >> 3) + 2, r)
            else:
                m = w[C_SL_BITMAP + fl]
                if not m:
                    st(C_FL_BITMAP, w[C_FL_BITMAP] | 1 << fl)
                st(C_SL_BITMAP + fl, m | (1 << sl))
            st(h, r)
        else:
            st(bi, bsize)
            nb = (b + bsize) >> 3  # a free block never touches brk, so this is a used block
            st(nb, w[nb] & ~PREV_FREE)
        k = self._bmw + (bi >> 6)
        st(k, w[k] | 1 << (bi & 63))
        return b

    def _guard(self, b: int, size: int) -> None:
        """Journal the words of free block ``b`` that an undo needs -- its links and its footer --
        before data this operation writes into it (calloc's memset, realloc's copy) overwrites
        them without records. (Writes after the operation need none outside a bracket, and
        inside one they log the bytes they overwrite.)"""
        w = self._w
        st = self._j.set
        bi = b >> 3
        for i in (bi + 1, bi + 2, bi + (size >> 3) - 1):
            st(i, w[i])

    def _from_wilderness(self, s: int, past_old_metadata: bool = False) -> int:
        """Carve a block of ``s`` bytes at brk, growing the mapping if needed; return it.
        (Inside a bracket that grew the heap, see _wild_aligned; ``past_old_metadata``: it
        calls this, and knows.)"""
        w = self._w
        b = w[H_BRK]
        end = b + s
        if end > self._meta:
            self._grow(end)
            w = self._w
        j = self._j
        if j.mode >= _ATOMIC and end > j.at_meta and b < j.at_cap and not past_old_metadata:
            return self._wild_aligned(s, F.ALIGN)  # past the metadata the bracket began with
        if end > w[H_HOLE_FROM]:
            self._back_wilderness(end)
        st = j.set
        st(H_BRK, end)
        if j.mode >= _ATOMIC and b < j.at_brk:
            # brk fell in this bracket: b was inside a block freed in it, live again after an
            # undo, so the header word it gets now is logged.
            st(b >> 3, s)
        # Unlogged stores below: their old values are needed by no undo. The header word was
        # wilderness, and an undo, which has brk's record to restore, trusts no zeros there
        # (journal.forget_zeros); zero_from only ever rises, and the undo raises it further.
        w[b >> 3] = s  # unlogged: was wilderness. The block below brk is never free
        if end > w[H_ZERO_FROM]:
            w[H_ZERO_FROM] = end  # unlogged: only rises
        if end > w[H_PEAK_BRK]:
            st(H_PEAK_BRK, end)  # logged: it must stay below the metadata if a growth is undone
        bi = b >> 3
        k = self._bmw + (bi >> 6)
        st(k, w[k] | 1 << (bi & 63))
        return b

    def _aligned_block(self, s: int, align: int) -> int:
        """A used block of exactly ``s`` bytes whose payload offset is a multiple of ``align``
        (a power of two, 16 to PAGE); return its block offset. Looks at a few free blocks that
        could hold it, then carves from the wilderness. O(1)."""
        w = self._w
        # 1. A free block of the right size class or larger whose aligned part fits.
        fl, sl = F.size_class(s)
        probes = 0
        m = w[C_SL_BITMAP + fl] & (-1 << sl)
        fmap = w[C_FL_BITMAP] & (-1 << (fl + 1))
        while probes < ALIGNED_PROBES:
            if not m:
                if not fmap:
                    break
                fl = (fmap & -fmap).bit_length() - 1
                fmap &= fmap - 1
                m = w[C_SL_BITMAP + fl]
                continue
            sl = (m & -m).bit_length() - 1
            m &= m - 1
            fb = w[C_HEADS + (fl << 5) + sl]
            while fb and probes < ALIGNED_PROBES:
                probes += 1
                fs = w[fb >> 3] & _SZ
                a = _aligned_start(fb, align)
                if a + s <= fb + fs and (fb + fs - a - s == 0 or fb + fs - a - s >= MIN_BLOCK):
                    return self._carve(fb, fs, a, s)
                fb = w[(fb >> 3) + 1]
        return self._wild_aligned(s, align)

    def _wild_aligned(self, s: int, align: int) -> int:
        """A block of ``s`` bytes from the wilderness whose payload is ``align``-aligned: one
        carve (so a full heap fails before any store), then the gap before the aligned start
        becomes a free block.

        Inside a bracket in which the heap grew, the block starts past the capacity the bracket
        began with when it would otherwise cover the metadata the heap had then: the gap is a
        free block whose inside is never written, so an undo of the growth finds the old page
        map and allocation bitmap intact and nothing had to log them (capacity / 60 bytes: more
        than a transaction log holds, on a large heap)."""
        w = self._w
        j = self._j
        brk = w[H_BRK]
        a = _aligned_start(brk, align)
        if j.mode >= _ATOMIC and a < j.at_cap and a + s > j.at_meta:
            a = _aligned_start(max(j.at_cap, brk + MIN_BLOCK), align)
        elif a == brk:
            return self._from_wilderness(s)
        gap = a - brk
        b = self._from_wilderness(gap + s, past_old_metadata=True)
        st = self._j.set
        st(b >> 3, gap)
        st(a >> 3, s)
        self._set_alloc_bit(a, True)
        self._set_alloc_bit(b, False)
        self._free_block(b, gap)
        return a

    def _carve(self, fb: int, fs: int, a: int, s: int) -> int:
        """Take used block [a, a+s) out of free block [fb, fb+fs) (both gaps 0 or a block)."""
        w = self._w
        st = self._j.set
        hdr = w[fb >> 3]
        rel = hdr & RELEASED
        if rel:
            self._r.ensure_backed(a, s + MIN_BLOCK)
        self._unlink(fb, fs)
        end = fb + fs
        if a > fb:  # the gap before stays free
            gap = a - fb
            st(fb >> 3, gap | FREE | rel | (hdr & PREV_FREE))
            st((a >> 3) - 1, gap)
            self._insert(fb, gap)
            st(a >> 3, s | PREV_FREE)
        else:
            st(a >> 3, s | (hdr & PREV_FREE))
        if a + s < end:  # the gap after stays free; the block after it keeps PREV_FREE
            r = a + s
            rest = end - r
            st(r >> 3, rest | FREE | rel)
            st((end >> 3) - 1, rest)
            self._insert(r, rest)
        else:
            st(end >> 3, w[end >> 3] & ~PREV_FREE)
        self._set_alloc_bit(a, True)
        return a

    def _back_wilderness(self, end: int) -> None:
        """Give [hole_from, end) disk blocks again (it may have been released). Raises on ENOSPC."""
        w = self._w
        start = w[H_HOLE_FROM]
        stop = min(F.round_up(end + BACKING_CHUNK, _PAGE), self._meta)
        self._r.ensure_backed(start, stop - start)
        w[H_HOLE_FROM] = stop  # unlogged: [start, stop) has disk blocks now, undo or not

    def _grow(self, need_end: int) -> None:
        """Extend capacity so the block area reaches ``need_end``. Raises HeapFullError."""
        w = self._w
        r = self._r
        cap = self._cap
        max_size = w[H_MAX_SIZE]
        new_cap = F.round_up(max(cap * GROW_FACTOR_NUM // GROW_FACTOR_DEN,
                                 need_end + need_end // 60 + 2 * _PAGE), GROW_GRANULE)
        # The new metadata must lie past the old capacity: until the capacity word commits the
        # growth, the old metadata is the live one and must stay intact.
        floor = max(need_end, cap)
        while F.meta_off(new_cap) < floor:
            new_cap += GROW_GRANULE
        if max_size and new_cap > max_size:
            new_cap = max_size & ~(_PAGE - 1)
            if F.meta_off(new_cap) < floor:
                raise HeapFullError(
                    f"heap needs {floor + F.meta_bytes_for(floor)} bytes of capacity to reach "
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
        mm = r.mm
        # The new metadata, [new meta, new cap): the old page map and bitmap copied to their new
        # places, and every other byte of it zeroed -- the bytes may be left from a growth that
        # was undone (or any stale tail), and nothing may be trusted to be zero there.
        old_pm, old_pm_n = F.meta_off(cap), F.page_map_bytes(cap)
        old_bm, old_bm_n = F.bitmap_off(cap), F.bitmap_bytes(cap)
        new_pm, new_bm = F.meta_off(new_cap), F.bitmap_off(new_cap)
        mm.move(new_pm, old_pm, old_pm_n)
        self._memset0(new_pm + old_pm_n, new_bm)
        mm.move(new_bm, old_bm, old_bm_n)
        self._memset0(new_bm + old_bm_n, new_cap)
        # Before the capacity word changes, the new metadata is unreachable and the heap is the
        # old one. The old metadata's bytes [old meta, cap) now lie in the wilderness and are not
        # zero, so zero_from moves past them in the same journaled operation.
        st = self._j.set
        w = self._w
        st(H_CAPACITY, new_cap)
        zf = min(max(cap, stale_end), new_pm)
        self._grown_zero_from = zf
        if w[H_ZERO_FROM] < zf:
            st(H_ZERO_FROM, zf)
        if w[H_HOLE_FROM] >= old_pm:  # nothing below the old metadata was a hole: nor is above
            st(H_HOLE_FROM, new_pm)
        st(H_GENERATION, w[H_GENERATION] + 1)
        self._gen = w[H_GENERATION]

    # -- free ----------------------------------------------------------------------------------

    def free(self, p: int) -> None:
        """Free the block or slot at payload offset ``p``. O(1).

        ``free(0)`` does nothing, like C. Any other offset that is not a live block or slot
        (out of range, misaligned, interior, already free, a run, the transaction log, a block a
        header entry names) raises InvalidPointerError and changes nothing.
        """
        me = get_ident()
        if self.fast == me and type(p) is int and p > 0:
            # Fast path: a slot whose bitmap word stays on its class's list and whose run is not
            # left empty (or is the class's current run), and that no header entry names: one
            # plain store, atomic by itself.
            try:
                v = self._b[self._meta + (p >> 12)]
            except IndexError:
                v = 0
            if v:
                c = (v & 31) - 1
                base = ((p >> 12) - (v >> 5)) << 12
                size = _CSIZE[c]
                d = p - base - _CFIRST[c]
                idx = d // size
                if d == idx * size and -1 < idx < _CSLOTS[c]:
                    w = self._w
                    k = (base >> 3) + (idx >> 6)
                    x = w[k]
                    bit = 1 << (idx & 63)
                    if not x & bit and p not in self._pins and \
                            (x or w[k + 2 * _CWORDS[c]] != _UNLISTED):
                        y = x | bit
                        if y != _CMASKS[c][idx >> 6] or \
                                (w[C_CLASS_HEADS + c] << 3) & -4096 == base:
                            w[k] = y
                            return None
        if self.held == me:
            return self._bracket(self._free, p)  # type: ignore[return-value]
        return self._locked(self.free, self._free, p)  # type: ignore[return-value]

    def _free(self, p: int) -> None:
        if p == 0 and type(p) is int:
            return
        if type(p) is not int or p & 7 or p < _BLOCKS_OFF + 8 or p >= self._w[H_BRK]:
            raise self._bad_pointer(p)
        v = self._b[self._meta + (p >> 12)]
        if v:
            return self._free_slot(p, v)
        w = self._w
        b = p - 8
        bi = b >> 3
        k = self._bmw + (bi >> 6)
        x = w[k]
        bit = 1 << (bi & 63)
        hdr = w[bi]
        if not x & bit or hdr & RUN or p in self._pins or p == w[F.H_TXLOG]:
            raise self._refusal(p)
        j = self._j
        j.set(k, x ^ bit)
        if j.mode >= _ATOMIC:
            j.fresh.pop(p, None)
        self._free_block(b, hdr & _SZ)
        return None

    def _refusal(self, p: int) -> InvalidPointerError:
        """Why the allocation at ``p`` cannot be freed (the error path)."""
        w = self._w
        for name, i in F.ENTRIES.items():
            if w[i] == p:
                return InvalidPointerError(f"invalid offset {p}: it is the heap's {name!r} entry; "
                                           "clear the entry before freeing it")
        if p == w[F.H_TXLOG]:
            return InvalidPointerError(f"invalid offset {p}: it is the transaction log block")
        try:
            self._block_of(p)
        except InvalidPointerError as e:
            return e
        return InvalidPointerError(f"invalid offset {p}: not a live block")

    def _free_slot(self, p: int, v: int) -> None:
        c, base, k, bit = self._slot_of(p, v)
        w = self._w
        if p in self._pins:
            raise self._refusal(p)
        x = w[k]
        j = self._j
        j.set(k, x | bit)
        if j.mode >= _ATOMIC:
            j.fresh.pop(p, None)
            j.freed.add(p)  # live when the bracket began, maybe: never fresh again in it
        if not x and w[k + 2 * _CWORDS[c]] == _UNLISTED:
            # the word has a free slot again: it becomes the head of its class's list
            old = w[C_CLASS_HEADS + c]
            self._chunk_push(c, k)
            old_base = (old << 3) & -4096
            if old and old_base != base and self._run_empty(old_base, c):
                self._run_emptied(old_base, c)  # the head moved off an empty run
        elif x | bit == _CMASKS[c][k - (base >> 3)] and \
                (w[C_CLASS_HEADS + c] << 3) & -4096 != base and self._run_empty(base, c):
            self._run_emptied(base, c)

    def _run_empty(self, base: int, c: int) -> bool:
        """Whether every slot of the run of class ``c`` at ``base`` is free."""
        w = self._w
        bi = base >> 3
        for j, mask in enumerate(_CMASKS[c]):
            if w[bi + j] != mask:
                return False
        return True

    def _is_run(self, base: int, c: int) -> bool:
        """Whether a live run of class ``c`` has its payload at ``base``."""
        b = base - 8
        if base & (_PAGE - 1) or not _BLOCKS_OFF <= b < self._w[H_BRK] - 8:
            return False
        bi = b >> 3
        if not (self._w[self._bmw + (bi >> 6)] >> (bi & 63)) & 1:
            return False
        hdr = self._w[bi]
        return F.is_run(hdr) and F.run_class(hdr) == c

    def _run_emptied(self, base: int, c: int) -> None:
        """The run at ``base`` has no live slot and is not its class's current run: keep it as
        the class's one cached empty run, or give it back to the bins if one is kept already."""
        w = self._w
        cached = w[C_CLASS_CACHE + c]
        if cached == base:
            return
        head = (w[C_CLASS_HEADS + c] << 3) & -_PAGE
        if head and head != base and self._run_empty(head, c) or \
                cached and self._is_run(cached, c) and self._run_empty(cached, c):
            self._release_run(base, c)  # the class keeps an empty run already
        else:
            self._j.set(C_CLASS_CACHE + c, base)

    def _release_run(self, base: int, c: int) -> None:
        """Give the empty run at ``base`` back to the bins."""
        w = self._w
        bi = base >> 3
        m = _CWORDS[c]
        for j in range(m):
            if w[bi + 2 * m + j] != _UNLISTED:
                self._chunk_unlink(c, bi + j)
        first = base >> 12
        for i in range(F.CLASS_PAGES[c]):
            self._set_page_map(first + i, 0)
        if w[C_CLASS_CACHE + c] == base:
            self._j.set(C_CLASS_CACHE + c, 0)
        b = base - 8
        hdr = w[b >> 3]
        size = hdr & _SZ
        self._j.set(b >> 3, size | (hdr & PREV_FREE))
        self._set_alloc_bit(b, False)
        self._free_block(b, size)

    def _free_block(self, b: int, size: int) -> None:
        """Turn used block ``b`` of ``size`` bytes (alloc bit already clear) into free space,
        coalescing with free neighbours, or with the wilderness. O(1).

        The unlinks of the neighbours and the insert are inlined (the hottest block path)."""
        w = self._w
        j = self._j
        st = j.set
        # Its bytes may have been live when the bracket began; and so may the words of a free
        # neighbour it merges with (an undo makes that a free block on its bin again, with its
        # header, links and footer): the whole merged extent counts as freed in the bracket, so
        # that nothing written into it later in the bracket goes unlogged.
        spans = j.freed_spans if j.mode >= _ATOMIC and len(j.freed_spans) <= _FRESH_SPANS \
            else None  # (past FRESH_SPANS, every block counts as freed: see journal)
        if spans is not None:
            spans.append((b, b + size))
        bi = b >> 3
        hdr = w[bi]
        nb = b + size
        brk = w[H_BRK]
        if size < MIN_BLOCK or nb > brk:
            raise CorruptHeapError(f"offset {b}: block header {hdr:#x} gives size {size} "
                                   f"reaching past brk {brk}")
        freed = size
        released = 0
        if hdr & PREV_FREE:
            psize = w[bi - 1]
            b -= psize
            bi = b >> 3
            released = w[bi] & RELEASED
            nxt = w[bi + 1]  # unlink the previous block
            prv = w[bi + 2]
            if prv:
                st((prv >> 3) + 1, nxt)
            else:
                if psize < _SMALL:
                    fl = 0
                    sl = psize >> 3
                else:
                    bl = psize.bit_length() - 1
                    fl = bl - 7
                    sl = (psize >> (bl - 5)) & 31
                st(C_HEADS + (fl << 5) + sl, nxt)
                if not nxt:
                    m = w[C_SL_BITMAP + fl] & ~(1 << sl)
                    st(C_SL_BITMAP + fl, m)
                    if not m:
                        st(C_FL_BITMAP, w[C_FL_BITMAP] & ~(1 << fl))
            if nxt:
                st((nxt >> 3) + 2, prv)
            size += psize
            if spans is not None:
                spans.append((b, b + psize))
        if nb == brk:
            # The block touches the wilderness: give it back by lowering brk.
            st(H_BRK, b)
            if released and w[H_HOLE_FROM] > b:
                st(H_HOLE_FROM, b)  # the merged block had pages without disk blocks
            if w[H_ZERO_FROM] - b >= TRIM_THRESHOLD:
                self.pending.append((0, b))
            return
        ni = nb >> 3
        nhdr = w[ni]
        if nhdr & FREE:
            nsize = nhdr & _SZ
            released |= nhdr & RELEASED
            nxt = w[ni + 1]  # unlink the next block
            prv = w[ni + 2]
            if prv:
                st((prv >> 3) + 1, nxt)
            else:
                if nsize < _SMALL:
                    fl = 0
                    sl = nsize >> 3
                else:
                    bl = nsize.bit_length() - 1
                    fl = bl - 7
                    sl = (nsize >> (bl - 5)) & 31
                st(C_HEADS + (fl << 5) + sl, nxt)
                if not nxt:
                    m = w[C_SL_BITMAP + fl] & ~(1 << sl)
                    st(C_SL_BITMAP + fl, m)
                    if not m:
                        st(C_FL_BITMAP, w[C_FL_BITMAP] & ~(1 << fl))
            if nxt:
                st((nxt >> 3) + 2, prv)
            size += nsize
            if spans is not None:
                spans.append((nb, nb + nsize))
        else:
            st(ni, nhdr | PREV_FREE)
        if freed >= RELEASE_THRESHOLD:
            self.pending.append((b, size))
        st(bi, size | FREE | released)
        st(bi + (size >> 3) - 1, size)
        if size < _SMALL:  # insert into its bin
            fl = 0
            sl = size >> 3
        else:
            bl = size.bit_length() - 1
            fl = bl - 7
            sl = (size >> (bl - 5)) & 31
        h = C_HEADS + (fl << 5) + sl
        head = w[h]
        st(bi + 1, head)
        st(bi + 2, 0)
        if head:
            st((head >> 3) + 2, b)
        else:
            m = w[C_SL_BITMAP + fl]
            if not m:
                st(C_FL_BITMAP, w[C_FL_BITMAP] | 1 << fl)
            st(C_SL_BITMAP + fl, m | (1 << sl))
        st(h, b)

    def release_pending(self) -> int:
        """Give back the pages that the last operation freed; return the bytes released.

        Called after the operation committed (page release cannot be undone, so it must never
        happen inside an operation that a crash could roll back). Each step only makes the heap
        more conservative: RELEASED is set / hole_from lowered *before* the pages go, so a crash
        in between costs at most a needless ``posix_fallocate`` later. O(pending).
        """
        if self._j.mode:
            return 0  # a bracket could still be undone: wait for its commit
        total = 0
        w = self._w
        for b, size in self.pending:
            if b == 0:
                total += self._release_wilderness(size)
                continue
            hdr = w[b >> 3]
            if not hdr & FREE or hdr & _SZ != size or w[((b + size) >> 3) - 1] != size or \
                    not w[(b + size) >> 3] & PREV_FREE or self._inside_used(b):
                continue  # merged or reused since (a later operation of the same bracket)
            w[b >> 3] = hdr | RELEASED
            journal.hit("release")
            if self._r.release(b + MIN_BLOCK, size - MIN_BLOCK - 8):
                total += size - MIN_BLOCK - 8
        self.pending.clear()
        return total

    def _inside_used(self, b: int) -> bool:
        """Whether offset ``b`` lies inside a used block (a stale free header left in the
        payload of a block that grew over it). O(distance / 512)."""
        try:
            self.containing(b + 8, 8)
        except InvalidPointerError:
            return False
        return True

    def _release_wilderness(self, brk: int) -> int:
        """Give back the pages between brk + TOP_PAD and zero_from; they read as zero after."""
        w = self._w
        if w[H_BRK] != brk:
            return 0  # the wilderness moved since this release was queued
        start = F.round_up(brk + TOP_PAD, _PAGE)
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
        whole = end & -_PAGE
        if whole > start and not self._r.release(start, whole - start):
            return False
        if whole < end:
            self._memset0(max(start, whole), end)
        return True

    # -- calloc, realloc, memalign, usable_size -------------------------------------------------

    def calloc(self, count: int, size: int) -> int:
        """Allocate ``count * size`` zeroed bytes. O(1) plus the memset.

        The memset skips the part of a block at or above ``zero_from``: bytes there were never
        written since the file was extended (``posix_fallocate``/``ftruncate`` give zeros) or
        since their pages were released with ``MADV_REMOVE`` (a hole reads as zeros).
        """
        if self.held == get_ident():
            return self._bracket(self._calloc, count, size)  # type: ignore[return-value]
        return self._locked(self.calloc, self._calloc, count, size)  # type: ignore[return-value]

    def _calloc(self, count: int, size: int) -> int:
        count = self._check_size(count, "count")
        size = self._check_size(size, "size")
        total = count * size
        if total > _MAX_REQUEST:
            raise InvalidSizeError(f"calloc({count}, {size}) = {total} bytes exceeds the largest "
                                   "block the format allows")
        if total <= _RUN_LIMIT:
            p = self._malloc(total)
            self._j.log_range(p, total)  # unless fresh (a bracket may have freed it)
            self._memset0(p, p + total)
            return p
        zero_from = self._w[H_ZERO_FROM]
        cap = self._cap
        p = self._malloc(total, True)
        if self._cap != cap:  # it grew: the old metadata's bytes (and any stale tail) are dirty
            zero_from = max(zero_from, self._grown_zero_from)
        end = p + total
        if p < zero_from:
            self._j.log_range(p, min(end, zero_from) - p)
            self._memset0(p, min(end, zero_from))
        return p

    def _memset0(self, start: int, end: int) -> None:
        mm = self._r.mm
        while start < end:
            k = min(end - start, len(_ZEROS))
            mm[start:start + k] = _ZEROS[:k] if k < len(_ZEROS) else _ZEROS
            start += k

    def _copy(self, dst: int, src: int, n: int) -> None:
        self._r.mm.move(dst, src, n)

    def usable_size(self, p: int) -> int:
        """Payload bytes of the live block or slot at ``p`` (at least what was asked for). O(1)."""
        return self.live_size(p)

    def realloc(self, p: int, n: int) -> int:
        """Resize the allocation at ``p`` to ``n`` bytes, keeping its contents; return the new
        offset.

        A slot stays in place while ``n`` is in its class, and moves (malloc, copy, free)
        otherwise. A block shrinks in place; grows in place into a free next block or the
        wilderness when it can, otherwise moves. ``realloc(0, n)`` is ``malloc(n)``. O(1) plus
        the copy when it moves. On HeapFullError the old allocation is untouched.
        """
        if self.held == get_ident():
            return self._bracket(self._realloc, p, n)  # type: ignore[return-value]
        return self._locked(self.realloc, self._realloc, p, n)  # type: ignore[return-value]

    def _realloc(self, p: int, n: int) -> int:
        if p == 0 and type(p) is int:
            return self._malloc(n)
        n = self._check_size(n)
        if type(p) is not int or p & 7 or p < _BLOCKS_OFF + 8 or p >= self._w[H_BRK]:
            raise self._bad_pointer(p)
        v = self._b[self._meta + (p >> 12)]
        if v:
            c = self._slot_of(p, v)[0]
            if n <= _RUN_LIMIT and _CLASS_OF[n] == c:
                return p
            q = self._malloc(n, True)
            self._j.log_range(q, min(n, _CSIZE[c]))
            self._copy(q, p, min(n, _CSIZE[c]))
            self._repoint(p, q)
            self._free(p)
            return q
        b = self._block_of(p)
        if p == self._w[F.H_TXLOG]:
            raise self._refusal(p)  # the log is the journal's
        s = F.request_to_block(n)
        w = self._w
        st = self._j.set
        bi = b >> 3
        hdr = w[bi]
        size = hdr & _SZ
        if s <= size:
            if size - s >= MIN_BLOCK:
                self._split_tail(b, hdr, s)
            return p
        nb = b + size
        brk = w[H_BRK]
        if nb == brk:  # grow into the wilderness
            end = b + s
            if end > self._meta:
                self._grow(end)
                w = self._w
            if end > w[H_HOLE_FROM]:
                self._back_wilderness(end)
            st(bi, s | (hdr & PREV_FREE))
            st(H_BRK, end)
            if end > w[H_ZERO_FROM]:
                st(H_ZERO_FROM, end)
            if end > w[H_PEAK_BRK]:
                st(H_PEAK_BRK, end)
            return p
        nhdr = w[nb >> 3]
        if nhdr & FREE:
            nsize = nhdr & _SZ
            total = size + nsize
            if total >= s:  # grow into the free next block
                if nhdr & RELEASED:
                    self._r.ensure_backed(nb, min(b + s + MIN_BLOCK, nb + nsize) - nb)
                self._unlink(nb, nsize)
                rem = total - s
                if rem >= MIN_BLOCK:
                    st(bi, s | (hdr & PREV_FREE))
                    r = b + s
                    st(r >> 3, rem | FREE | (nhdr & RELEASED))
                    st((r + rem >> 3) - 1, rem)
                    self._insert(r, rem)
                else:
                    st(bi, total | (hdr & PREV_FREE))
                    st((b + total) >> 3, w[(b + total) >> 3] & ~PREV_FREE)
                return p
        q = self._malloc(n, True)  # may grow and remap
        self._j.log_range(q, size - 8)
        self._copy(q, p, size - 8)
        self._repoint(p, q)
        self._free(p)
        return q

    def _repoint(self, p: int, q: int) -> None:
        """A header entry that names ``p``, which moved to ``q``, names ``q`` (same operation)."""
        if p in self._pins:
            w = self._w
            for i in F.ENTRIES.values():
                if w[i] == p:
                    self._set_entry_word(i, q)
            self._pins = (w[_H_ROOT], w[_H_OBJECTS])

    def _split_tail(self, b: int, hdr: int, s: int) -> None:
        """Shrink used block ``b`` to ``s`` bytes and free the tail (which then coalesces)."""
        size = hdr & _SZ
        st = self._j.set
        st(b >> 3, s | (hdr & PREV_FREE))
        r = b + s
        st(r >> 3, size - s)  # a used-looking block whose previous block (b) is used
        self._free_block(r, size - s)

    def memalign(self, alignment: int, n: int) -> int:
        """Allocate ``n`` bytes at an offset that is a multiple of ``alignment``. O(1).

        ``alignment`` is a power of two up to the page size (4096). Offsets are relative to the
        start of the mapping, which the OS maps page-aligned, so the address is aligned too.
        """
        if self.held == get_ident():
            return self._bracket(self._memalign, alignment, n)  # type: ignore[return-value]
        return self._locked(self.memalign, self._memalign, alignment, n)  # type: ignore

    def _memalign(self, alignment: int, n: int) -> int:
        alignment = self._check_size(alignment, "alignment")
        if alignment & (alignment - 1) or not alignment or alignment > MAX_ALIGNMENT:
            raise InvalidSizeError(f"alignment must be a power of two from 1 to "
                                   f"{MAX_ALIGNMENT}: {alignment}")
        n = self._check_size(n)
        if alignment <= F.ALIGN:
            return self._malloc(n)
        return self._aligned_block(F.request_to_block(n), alignment) + 8

    def set_entry(self, name: str, off: int) -> None:
        """Point header entry ``name`` (``"root"``, ``"objects"``) at live block ``off`` or 0."""
        i = F.ENTRIES.get(name)
        if i is None:
            raise KeyError(f"no header entry {name!r}; there are {sorted(F.ENTRIES)}")
        if self.held != get_ident():
            self._locked(self.set_entry, self.set_entry, name, off)
            return
        if off != 0:
            self.live_size(off)
        self._bracket(self._set_entry_word, i, off)
        self._pins = (self._w[_H_ROOT], self._w[_H_OBJECTS])

    def _set_entry_word(self, i: int, v: int) -> None:
        """Store entry word ``i`` (root, objects, txlog) and the entries' check word."""
        w = self._w
        st = self._j.set
        st(i, v)
        st(F.H_ENTRY_CHECK, F.entry_check(w[_H_ROOT], w[_H_OBJECTS], w[F.H_TXLOG]))

    # -- whole-heap operations ---------------------------------------------------------------

    def trim(self) -> int:
        """Give back to the OS the pages of the wilderness and of every large free block.

        Returns the bytes given back: for a file or memfd heap, those that had blocks behind
        them (a second trim() gives back nothing new and returns 0); an anonymous heap cannot
        tell, and counts every page it releases. The file keeps its length (other processes may
        map it; shrinking it under them would SIGBUS them), but its disk blocks are released,
        which ``os.stat().st_blocks`` shows. O(free blocks).
        """
        if self._j.mode:
            raise TransactionStateError("trim() inside a transaction or atomic bracket: pages it "
                                        "gives back could still be needed by an undo; call it "
                                        "after the commit")
        for base, c in self._empty_runs():
            self._bracket(self._release_run, base, c)
        w = self._w
        brk = w[H_BRK]
        total = 0
        start = F.round_up(brk, _PAGE)
        if start < self._meta:
            # Ordered so that a crash at any point leaves only conservative state behind.
            if w[H_HOLE_FROM] > start:
                w[H_HOLE_FROM] = start
            journal.hit("release")
            backed = self._backed(start, self._meta)
            if self._zero_range(start, self._meta):
                total += backed
                if w[H_ZERO_FROM] > start:
                    w[H_ZERO_FROM] = start
        for b, size in self._free_list_blocks(2 * _PAGE):
            w[b >> 3] |= RELEASED
            journal.hit("release")
            backed = self._backed(b + MIN_BLOCK, b + size - 8)
            if self._r.release(b + MIN_BLOCK, size - MIN_BLOCK - 8):
                total += backed
        return total

    def _backed(self, start: int, end: int) -> int:
        """Bytes of the whole pages of [start, end) that have blocks behind them (all of them
        when the backing cannot tell)."""
        lo, hi = F.round_up(start, _PAGE), end & -_PAGE
        return sum(min(b, hi) - max(a, lo) for a, b in self._r.data_ranges(lo, hi)
                   if min(b, hi) > max(a, lo))

    def _empty_runs(self) -> list[tuple[int, int]]:
        """(base, class) of every run with no live slot, found through the class lists (an
        empty run has all its bitmap words listed). Bounded walks."""
        w = self._w
        limit = (w[H_BRK] - _BLOCKS_OFF) // 8 + 1
        out = []
        for c in range(F.CLASS_COUNT):
            seen = set()
            k = w[C_CLASS_HEADS + c]
            m = _CWORDS[c]
            steps = 0
            while k:
                base = (k << 3) & -_PAGE
                if base not in seen and self._is_run(base, c) and self._run_empty(base, c):
                    seen.add(base)
                    out.append((base, c))
                k = w[k + m]
                steps += 1
                if steps > limit:
                    raise CorruptHeapError(f"class {_CSIZE[c]} B list: cycle")
        return out

    def _free_list_blocks(self, min_size: int) -> list[tuple[int, int]]:
        """Free blocks of at least ``min_size`` bytes, read from the bins (bounded walk)."""
        w = self._w
        out = []
        limit = (w[H_BRK] - _BLOCKS_OFF) // MIN_BLOCK + 1
        fl0 = F.size_class(min_size)[0]
        for fl in range(fl0, F.FL_COUNT):
            for sl in range(F.SL_COUNT):
                b = w[C_HEADS + (fl << 5) + sl]
                steps = 0
                while b:
                    size = w[b >> 3] & _SZ
                    if size >= min_size:
                        out.append((b, size))
                    b = w[(b >> 3) + 1]
                    steps += 1
                    if steps > limit:
                        raise CorruptHeapError(f"bin ({fl}, {sl}): cycle in the free list")
        return out

    def walk(self, slots: bool = False) -> Iterator[BlockInfo]:
        """Yield every block from the first to brk, in address order; with ``slots``, each run
        is followed by its slots. O(blocks + slots).

        Bounded: a header that would loop or run past brk raises CorruptHeapError.
        """
        w = self._w
        b = _BLOCKS_OFF
        brk = w[H_BRK]
        while b < brk:
            hdr = w[b >> 3]
            size = hdr & _SZ
            if size < MIN_BLOCK or b + size > brk:
                raise CorruptHeapError(f"offset {b}: block size {size} (header {hdr:#x}) is "
                                       f"below {MIN_BLOCK} or runs past brk {brk}")
            if F.is_run(hdr):
                yield BlockInfo(b + 8, size, False, "run")
                if slots:
                    yield from self._slots(b + 8, F.run_class(hdr))
            else:
                yield BlockInfo(b + 8, size, bool(hdr & FREE), "block")
            b += size

    def _slots(self, base: int, c: int) -> Iterator[BlockInfo]:
        size = _CSIZE[c]
        first = base + _CFIRST[c]
        bi = base >> 3
        w = self._w
        for idx in range(_CSLOTS[c]):
            yield BlockInfo(first + idx * size, size, bool(w[bi + (idx >> 6)] >> (idx & 63) & 1),
                            "slot")

    def stats(self) -> HeapStats:
        """Used and free bytes, blocks, runs and slots, largest free block, fragmentation.
        O(blocks + runs)."""
        w = self._w
        used_n = used = payload = free_n = free_b = largest = 0
        runs = run_bytes = used_slots = free_slots = 0
        for blk in self.walk():
            if blk.kind == "run":
                hdr = w[(blk.offset >> 3) - 1]
                c = F.run_class(hdr)
                if c >= F.CLASS_COUNT:
                    raise CorruptHeapError(f"offset {blk.offset - 8}: run class {c} unknown")
                runs += 1
                run_bytes += blk.size
                nfree = sum(bin(w[(blk.offset >> 3) + j] & mask).count("1")
                            for j, mask in enumerate(_CMASKS[c]))
                free_slots += nfree
                live = _CSLOTS[c] - nfree
                used_slots += live
                used += live * _CSIZE[c]
                payload += live * _CSIZE[c]
            elif blk.free:
                free_n += 1
                free_b += blk.size
                largest = max(largest, blk.size)
            else:
                used_n += 1
                used += blk.size
                payload += blk.size - 8
        brk = w[H_BRK]
        wild = self._meta - brk
        largest = max(largest, wild)
        total_free = free_b + wild
        frag = 1.0 - largest / total_free if total_free else 0.0
        return HeapStats(self._cap, brk - _BLOCKS_OFF, wild, used_n + used_slots, used, payload,
                         free_n, free_b, largest, frag, w[H_PEAK_BRK], w[H_GENERATION], runs,
                         run_bytes, used_slots, free_slots)

    # -- invariants ---------------------------------------------------------------------------

    def check(self, progress: Callable[[float], None] | None = None) -> None:
        """Verify every invariant of the heap; raise CorruptHeapError naming offset and invariant.

        ``progress``, if given, is called with the fraction done (0.0 to 1.0) now and then.

        Header fields in range and consistent with the file; every block's tags sane (size,
        alignment, footer = size, PREV_FREE matches the previous block, no two adjacent free
        blocks, no free block touching brk); every run sane (page-aligned, its class, no bit
        past its slots, page map bytes); the page map and the allocation bitmap set exactly at
        runs and used blocks; every free block in exactly its own bin exactly once, links
        symmetric, no cycles (walks are bounded by what the heap can hold); bitmaps match the
        bins; every bitmap word with a free slot on its class's list exactly once; entries and
        the transaction log name live blocks; the bytes above zero_from are zero.
        O(blocks + capacity / 60).
        """
        w = self._w
        cap = self._cap
        if w[H_CAPACITY] != cap:
            raise CorruptHeapError(f"{F.at('capacity')}: {w[H_CAPACITY]} differs from the "
                                   f"mapping {cap}")
        F.validate_fields(w, self._r.file_size())
        report = progress or _no_progress

        # 1. The boundary-tag walk (the truth), runs included.
        free_blocks, used_blocks, runs = self.check_tags(report)

        # 2. The page map and the allocation bitmap agree with the walk.
        self._check_page_map(runs)
        self._check_alloc_bitmap(used_blocks, runs)
        report(0.85)

        # 3. Entries and the transaction log.
        F.check_entries(w)
        for name, i in [*F.ENTRIES.items(), ("txlog", F.H_TXLOG)]:
            v = w[i]
            if v and v - 8 not in used_blocks and not self._slot_live(v, runs):
                raise CorruptHeapError(f"{F.at(name)}: {v} is not a live block (freed while "
                                       "still named here, or damaged)")
        t = w[F.H_TXLOG]
        if t and (t - 8 not in used_blocks or w[(t >> 3) - 1] & RUN):
            raise CorruptHeapError(f"{F.at('txlog')}: {t} is a slot or a run, not a block of "
                                   "its own")

        # 4. The bins and the class lists.
        self._check_bins(free_blocks)
        self._check_class_lists(runs)
        report(0.95)

        # 5. Nothing above zero_from is anything but zero (calloc trusts it).
        self._check_zeros()
        report(1.0)

    def check_tags(self, progress: Callable[[float], None] | None = None
                   ) -> tuple[dict[int, int], set[int], dict[int, int]]:
        """Walk the boundary tags alone (the truth); return (free blocks by size, used blocks,
        runs by base -> class).

        Raises CorruptHeapError naming the first bad tag. Reads only. O(blocks).
        """
        w = self._w
        brk = w[H_BRK]

        def bad(off: int, msg: str) -> CorruptHeapError:
            return CorruptHeapError(f"offset {off}: {msg}")

        if not _BLOCKS_OFF <= brk <= self._meta or brk & 7:
            raise CorruptHeapError(f"{F.at('brk')}: {brk} outside [{_BLOCKS_OFF}, "
                                   f"{self._meta}] or misaligned")
        free_blocks: dict[int, int] = {}
        used_blocks: set[int] = set()
        runs: dict[int, int] = {}
        b = _BLOCKS_OFF
        prev_free = False
        span = max(brk - _BLOCKS_OFF, 1)
        tick = 0
        while b < brk:
            if progress is not None:
                tick += 1
                if tick & 0xFFFF == 0:
                    progress(0.7 * (b - _BLOCKS_OFF) / span)  # the walk is most of the work
            hdr = w[b >> 3]
            size = hdr & _SZ
            if size < MIN_BLOCK or b + size > brk or hdr >> 56:
                raise bad(b, f"block size {size} (header {hdr:#x}) below {MIN_BLOCK}, past "
                             f"brk {brk}, or stray high bits")
            if bool(hdr & PREV_FREE) != prev_free:
                raise bad(b, f"PREV_FREE bit is {bool(hdr & PREV_FREE)} but the previous block "
                             f"is {'free' if prev_free else 'used'}")
            if hdr & FREE:
                if prev_free:
                    raise bad(b, "two adjacent free blocks (missed coalesce)")
                if w[(b + size >> 3) - 1] != size:
                    raise bad(b, f"free block footer {w[(b + size >> 3) - 1]} != size {size}")
                if hdr >> F.CLASS_SHIFT:
                    raise bad(b, f"free block header {hdr:#x} has class bits")
                free_blocks[b] = size
                prev_free = True
            else:
                if hdr & RUN:
                    self._check_run(b, hdr)
                    runs[b + 8] = F.run_class(hdr)
                elif hdr >> F.CLASS_SHIFT:
                    raise bad(b, f"used block header {hdr:#x} has class bits but no RUN bit")
                used_blocks.add(b)
                prev_free = False
            b += size
        if prev_free:
            raise bad(b, "the block below brk is free (it should have merged into the wilderness)")
        return free_blocks, used_blocks, runs

    def _check_run(self, b: int, hdr: int) -> None:
        c = F.run_class(hdr)
        if c >= F.CLASS_COUNT:
            raise CorruptHeapError(f"offset {b}: run header {hdr:#x} names class {c}; there are "
                                   f"{F.CLASS_COUNT}")
        if (b + 8) % _PAGE or hdr & _SZ != F.CLASS_PAGES[c] * _PAGE:
            raise CorruptHeapError(f"offset {b}: run of class {_CSIZE[c]} B is not page-aligned "
                                   f"or not {F.CLASS_PAGES[c]} pages ({hdr & _SZ} bytes)")
        bi = (b + 8) >> 3
        for j, mask in enumerate(_CMASKS[c]):
            if self._w[bi + j] & ~mask:
                raise CorruptHeapError(f"offset {(bi + j) * 8}: run bitmap word {j} has bits "
                                       f"past the run's {_CSLOTS[c]} slots")

    def _slot_live(self, p: int, runs: dict[int, int]) -> bool:
        page = p & -_PAGE
        for base in (page, page - _PAGE, page - 2 * _PAGE, page - 3 * _PAGE):
            c = runs.get(base)
            if c is not None:
                d = p - base - _CFIRST[c]
                size = _CSIZE[c]
                if d < 0 or d % size or d // size >= _CSLOTS[c]:
                    return False
                idx = d // size
                return not (self._w[(base >> 3) + (idx >> 6)] >> (idx & 63)) & 1
        return False

    def _check_page_map(self, runs: dict[int, int]) -> None:
        meta = self._meta
        want: dict[int, int] = {}  # page number -> its page-map byte
        for base, c in runs.items():
            for i in range(F.CLASS_PAGES[c]):
                want[(base >> 12) + i] = F.page_map_byte(c, i)
        hot = {p >> 12 for p in want}  # 4 KiB chunks of the page map that hold a run's bytes
        mm = self._r.mm
        end = meta + F.page_map_bytes(self._cap)
        seen = 0
        for lo, hi in self._r.data_ranges(meta, end):  # holes read as zeros
            pos = meta + ((lo - meta) & -4096)
            while pos < hi:
                n = min(4096, end - pos)
                chunk = mm[pos:pos + n]
                if ((pos - meta) >> 12) in hot or chunk.count(0) != n:
                    for k in range(n):
                        page = pos - meta + k
                        v = chunk[k]
                        if v != want.get(page, 0):
                            raise CorruptHeapError(f"offset {pos + k}: page-map byte of page "
                                                   f"{page} is {v}, expected "
                                                   f"{want.get(page, 0)}")
                        if v:
                            seen += 1
                pos += 4096
        if seen != len(want):
            page = next(p for p in sorted(want) if mm[meta + p] != want[p])
            raise CorruptHeapError(f"offset {meta + page}: page-map byte of page {page} is "
                                   f"{mm[meta + page]}, expected {want[page]}")

    def _check_alloc_bitmap(self, used_blocks: set[int], runs: dict[int, int]) -> None:
        w = self._w
        mm = self._r.mm
        base = self._bmw << 3
        seen = 0
        zeros = _ZEROS[:4096]
        for lo, hi in self._r.data_ranges(base, self._cap):
            pos = lo
            while pos < hi:  # zero stretches are skipped at C speed
                n = min(4096, hi - pos)
                if mm[pos:pos + n] != zeros[:n]:
                    for k in range((pos - base) >> 3, (pos - base + n + 7) >> 3):
                        x = w[self._bmw + k]
                        while x:
                            low = x & -x
                            off = ((k << 6) + low.bit_length() - 1) << 3
                            if off not in used_blocks:
                                raise CorruptHeapError(f"offset {off}: allocation bitmap bit set "
                                                       "but no used block starts here")
                            seen += 1
                            x ^= low
                pos += n
        if seen != len(used_blocks):
            missing = next(u for u in sorted(used_blocks)
                           if not (w[self._bmw + (u >> 9)] >> ((u >> 3) & 63)) & 1)
            raise CorruptHeapError(f"offset {missing}: used block has no allocation bitmap bit")

    def _check_bins(self, free_blocks: dict[int, int]) -> None:
        w = self._w

        def bad(off: int, msg: str) -> CorruptHeapError:
            return CorruptHeapError(f"offset {off}: {msg}")

        in_bins = 0
        fl_map = w[C_FL_BITMAP]
        if fl_map >> F.FL_COUNT:
            raise bad(F.CTL_OFF, f"first-level bitmap {fl_map:#x} has bits past {F.FL_COUNT}")
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
        if in_bins != len(free_blocks):
            lost = next(o for o, s in free_blocks.items() if s >= 0)
            raise bad(lost, "free block is in no bin")

    def _check_class_lists(self, runs: dict[int, int]) -> None:
        w = self._w
        words: dict[int, int] = {}  # every run bitmap word -> its class
        for base, c in runs.items():
            for j in range(_CWORDS[c]):
                words[(base >> 3) + j] = c
        listed: set[int] = set()
        for c in range(F.CLASS_COUNT):
            h = C_CLASS_HEADS + c
            k = w[h]
            prev = 0
            m = _CWORDS[c]
            while k:
                if words.get(k) != c or k in listed:
                    raise CorruptHeapError(
                        f"offset {h * 8 if not prev else (prev + m) * 8}: class {_CSIZE[c]} B "
                        f"list links word {k}, which is not a bitmap word of such a run (or "
                        "it is listed twice: a cycle)")
                if w[k + 2 * m] != prev:
                    raise CorruptHeapError(f"offset {(k + 2 * m) * 8}: prev link "
                                           f"{w[k + 2 * m]} != {prev} in the class "
                                           f"{_CSIZE[c]} B list")
                listed.add(k)
                prev = k
                k = w[k + m]
            cached = w[C_CLASS_CACHE + c]
            if cached and runs.get(cached) != c:
                # A hint may go stale only in one way: its run was given back and reused.
                if cached in runs or cached & (_PAGE - 1):
                    raise CorruptHeapError(f"offset {(C_CLASS_CACHE + c) * 8}: class cache names "
                                           f"{cached}, a run of another class or no page")
        for k, c in words.items():
            if k in listed:
                continue
            if w[k]:
                raise CorruptHeapError(f"offset {k * 8}: run bitmap word with a free slot is "
                                       f"not on its class {_CSIZE[c]} B list")
            if w[k + 2 * _CWORDS[c]] != _UNLISTED:
                raise CorruptHeapError(f"offset {(k + 2 * _CWORDS[c]) * 8}: a run bitmap word "
                                       f"off its class list has prev link "
                                       f"{w[k + 2 * _CWORDS[c]]}, not {_UNLISTED}")

    def _check_zeros(self) -> None:
        zf = self._w[H_ZERO_FROM]
        mm = self._r.mm
        step = 1 << 20
        for lo, hi in self._r.data_ranges(zf, self._meta):
            pos = lo
            while pos < hi:
                n = min(step, hi - pos)
                if mm[pos:pos + n] != _ZEROS[:n]:
                    chunk = mm[pos:pos + n]
                    at = next(i for i, x in enumerate(chunk) if x)
                    raise CorruptHeapError(f"offset {pos + at}: byte {chunk[at]:#x} above "
                                           f"zero_from {zf}, where every byte must be zero")
                pos += n

    # -- rebuilding the index from the truth ----------------------------------------------------

    def rebuild(self) -> int:
        """Recreate the bins, bin bitmaps, class lists, page map and allocation bitmap from the
        boundary tags and the runs' slot bitmaps. O(blocks). Returns the free blocks indexed.

        Writes without the journal (a rebuild can change more words than any journal holds);
        the caller marks the header so that a crash half way rebuilds again.
        """
        w = self._w
        free_blocks, used_blocks, runs = self.check_tags()
        for i in range(C_FL_BITMAP, F.CTL_END >> 3):
            w[i] = 0
        self._memset0(self._meta, self._cap)
        for b in used_blocks:
            bi = b >> 3
            w[self._bmw + (bi >> 6)] |= 1 << (bi & 63)
        for b, size in sorted(free_blocks.items()):
            self._raw_insert(b, size)
        pm = self._b
        for base, c in sorted(runs.items()):
            for i in range(F.CLASS_PAGES[c]):
                pm[self._meta + (base >> 12) + i] = F.page_map_byte(c, i)
            m = _CWORDS[c]
            for j in range(m):
                k = (base >> 3) + j
                if w[k]:
                    nx = w[C_CLASS_HEADS + c]
                    w[k + m] = nx
                    w[k + 2 * m] = 0
                    if nx:
                        w[nx + 2 * m] = k
                    w[C_CLASS_HEADS + c] = k
                else:
                    w[k + 2 * m] = _UNLISTED
        return len(free_blocks)

    def _raw_insert(self, b: int, size: int) -> None:
        """_insert without the journal, for rebuild."""
        w = self._w
        fl, sl = F.size_class(size)
        h = C_HEADS + (fl << 5) + sl
        head = w[h]
        w[(b >> 3) + 1] = head
        w[(b >> 3) + 2] = 0
        if head:
            w[(head >> 3) + 2] = b
        w[C_SL_BITMAP + fl] |= 1 << sl
        w[C_FL_BITMAP] |= 1 << fl
        w[h] = b


def _aligned_start(b: int, align: int) -> int:
    """The first block offset at or after ``b`` whose payload is ``align``-aligned and that
    leaves before it either nothing or room for a free block."""
    a = ((b + 8 + align - 1) & -align) - 8
    while 0 < a - b < MIN_BLOCK:
        a += align
    return a


def _no_progress(fraction: float) -> None:
    return None


__all__ = ["Allocator", "BlockInfo", "HeapStats", "UNJOURNALED", "RELEASE_THRESHOLD",
           "TRIM_THRESHOLD", "TOP_PAD"]
