"""The undo journal: it makes every allocator operation, ``atomic()`` bracket and transaction
all-or-nothing, even when the process is killed in the middle, and it owns recovery.

Protocol (layout and record format in :mod:`pheap.format`)::

    begin:    log[0] = 0; j_state = 1 (or 2 for a transaction, whose log is the txlog block)
    store:    log[k+3] = 0; log[k+1] = old; log[k+2] = check; log[k] = index; w[index] = new
    commit:   j_state = 0
    recover:  if j_state: check every record, then write the old values back, last first;
              j_state = 0

A record becomes live when its first word is written, and only then is the heap word changed, so
a crash between any two word writes leaves either a record whose word is unchanged or a record
that restores it. Restoring writes absolute old values, so it is idempotent: a crash during
recovery is recovered again. Recovery is O(records), not O(heap). Every record carries a check
word, so a damaged journal is refused (:class:`DamagedJournalError`) instead of being written
into the heap.

One :class:`Journal` per mapped heap in a process owns the cursors of the log in use and the
three brackets:

* an *operation* (``begin``/``commit``/``rollback``): one allocator call, records in the header;
* an *atomic bracket* (``Heap.atomic()``): several operations and word writes as one, records in
  the header (``JournalFullError`` past its 3.5 KiB);
* a *transaction* (``Heap.transaction()``): records in a log block in the heap that grows, byte
  ranges included.

Inside a bracket, ``begin`` returns a savepoint, so that one failing operation is undone alone
and the bracket goes on. The cursors in Python are only where to append: every rollback and every
recovery reads the records from the mapping, so an exception that lands between two statements of
the journal (Ctrl-C) never makes an undo skip a record.

Why undo rather than redo: an allocator operation reads words it has just written (unlinking a
block and then inserting the remainder into the same bin), so a redo log would need a read
overlay. Undo lets the operation run exactly as without a journal.

Python does not promise that an 8-byte store is atomic, but a ``memoryview`` of format ``'Q'``
stores an aligned word with one machine store, and SIGKILL cannot split a machine store; that is
the crash model of the default durability (a process crash: the page cache survives it). Power
loss is a different model: see docs/design.md.

Crash points (testing only): ``PHEAP_CRASHPOINT=name:n[,name:n...]`` in the environment, or
:func:`set_crashpoint`, SIGKILLs the process at the n-th hit of a named point. Points: ``begin``
(after j_state is set), ``write`` (twice per journaled word: before its record and between the
record and the word), ``commit`` (before j_state is cleared), ``recover`` (between restored
words), ``grow`` (file extended, capacity not yet written), ``release`` (committed, before pages
are given back). A journal made while no point is armed runs none of this code.
"""

from __future__ import annotations

import os
import signal
import zlib
from typing import TYPE_CHECKING, Final

from . import format as F
from .errors import DamagedJournalError, JournalFullError, TransactionTooLargeError

if TYPE_CHECKING:
    from .region import Region

__all__ = ["Journal", "set_crashpoint", "clear_crashpoints", "crashpoints_armed", "hit",
           "pending_records", "undo", "CRASH_ENV", "IDLE", "OP", "ATOMIC", "TX"]

CRASH_ENV: Final = "PHEAP_CRASHPOINT"  #: environment variable naming crash points

IDLE: Final = 0  #: no operation or bracket is open
OP: Final = 1  #: one operation is open (records in the header)
ATOMIC: Final = 2  #: an atomic bracket is open (records in the header)
TX: Final = 3  #: a transaction is open (records in the txlog block)
OUTERMOST: Final = -1  #: the token begin() returns when it opened the operation itself
FRESH_SPANS: Final = 256  #: freed blocks a bracket tracks before it marks no block fresh

_J_RECORDS: Final = F.J_RECORDS
_J_STATE: Final = F.J_STATE
_J_END: Final = F.J_END
_MIX: Final = F.J_MIX
_RANGE: Final = F.RANGE_FLAG

_points: dict[str, int] = {}


def set_crashpoint(name: str, n: int) -> None:
    """SIGKILL this process at the ``n``-th hit of point ``name`` (counted from now)."""
    if n < 1:
        raise ValueError(f"crash point count must be >= 1, not {n}")
    _points[name] = n


def clear_crashpoints() -> None:
    """Disarm every crash point."""
    _points.clear()


def crashpoints_armed() -> bool:
    """Whether any crash point is set (journals made from now on count the hits)."""
    return bool(_points)


def hit(name: str) -> None:
    """Count a hit of crash point ``name``; SIGKILL the process when its count runs out."""
    left = _points.get(name)
    if left is None:
        return
    if left <= 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _points[name] = left - 1


def _parse_env() -> None:
    spec = os.environ.get(CRASH_ENV, "")
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, n = part.partition(":")
        set_crashpoint(name, int(n or 1))


_parse_env()


# ---------------------------------------------------------------------------------------------
# Reading and restoring records (recovery and rollback)
# ---------------------------------------------------------------------------------------------

Record = tuple[int, int, "bytes | None"]  #: (word index, old value, None) or (offset, 0, bytes)


def log_area(w: memoryview) -> tuple[int, int]:
    """Word range [start, end) of the log that j_state says is in use (header or txlog)."""
    state = w[_J_STATE]
    if state != F.J_TX:
        return _J_RECORDS, _J_END
    p = w[F.H_TXLOG]
    brk = w[F.H_BRK]
    if p & 7 or not F.BLOCKS_OFF + 8 <= p < brk:
        raise DamagedJournalError(f"{F.at('txlog')}: transaction log offset {p} is not a "
                                  f"block in [{F.BLOCKS_OFF + 8}, {brk})")
    size = w[(p >> 3) - 1] & F.SIZE_MASK
    if size < F.MIN_BLOCK or p - 8 + size > brk:
        raise DamagedJournalError(f"offset {p - 8}: transaction log block size {size} runs "
                                  f"past brk {brk}")
    return p >> 3, (p - 8 + size) >> 3


def records(w: memoryview, words: int, p: int, start: int, end: int) -> list[Record]:
    """Parse and check the records from word ``p`` of the log occupying words [start, end).

    Raises DamagedJournalError for a record whose check word fails, or that names anything
    outside what an operation may change (the immutable header, the journal itself, past the
    mapping): such a record is never restored.
    """
    out: list[Record] = []
    while p < end:
        i = w[p]
        if i == 0:
            break
        if p + 2 >= end:
            raise DamagedJournalError(f"offset {p * 8}: journal record runs past its log")
        if i & _RANGE:
            n = i & ~_RANGE
            off = w[p + 1]
            nw = (n + 7) >> 3
            if off < F.BLOCKS_OFF or off + n > words * 8 or p + 3 + nw > end or \
                    start * 8 < off + n and off < end * 8:
                raise DamagedJournalError(f"offset {p * 8}: range record ({off}, {n} bytes) "
                                          "outside the block area or past the log")
            data = bytes(w[p + 3:p + 3 + nw].cast("B"))[:n]
            if w[p + 2] != (zlib.crc32(data) ^ off ^ n):
                raise DamagedJournalError(f"offset {p * 8}: range record ({off}, {n} bytes) "
                                          "fails its check")
            out.append((off, 0, data))
            p += 3 + nw
            continue
        old = w[p + 1]
        if w[p + 2] != i ^ old ^ _MIX:
            raise DamagedJournalError(f"offset {p * 8}: journal record for word {i} fails its "
                                      "check")
        if i >= words or F.H_JOURNAL <= i < _J_END or i < F.H_CAPACITY or \
                F.H_OWNER_PID <= i < F.H_JOURNAL or start <= i < end:
            raise DamagedJournalError(f"offset {p * 8}: journal record names word {i}, outside "
                                      "what an operation may change")
        if i == F.H_CAPACITY and (old % F.PAGE or not F.min_capacity() <= old <= words * 8) or \
                i == F.H_BRK and (old & 7 or not F.BLOCKS_OFF <= old <= words * 8):
            raise DamagedJournalError(f"offset {p * 8}: journal record would restore word {i} "
                                      f"to {old}, which no heap of this file can have")
        out.append((i, old, None))
        p += 3
    else:
        raise DamagedJournalError(f"offset {end * 8}: journal has no end record")
    return out


def pending_records(w: memoryview, words: int) -> list[Record]:
    """The live undo records of an interrupted operation, bracket or transaction, checked.

    [] when nothing is in flight. ``words`` is the size of the mapping in words.
    """
    state = w[_J_STATE]
    if not state:
        return []
    if state not in (F.J_OP, F.J_TX):
        raise DamagedJournalError(f"{F.at('j_state')}: {state} names no journal (1: the "
                                  "operation journal, 2: the transaction log)")
    start, end = log_area(w)
    return records(w, words, start, start, end)


def restore(w: memoryview, recs: list[Record], armed: bool = False) -> None:
    """Write the old values of ``recs`` back, last record first."""
    wb = None
    for i, old, data in reversed(recs):
        if armed:
            hit("recover")
        if data is None:
            w[i] = old
        else:
            if wb is None:
                wb = w.cast("B")
            wb[i:i + len(data)] = data
    if wb is not None:
        wb.release()


def forget_zeros(w: memoryview) -> None:
    """After an undo, trust no zeros: the undone work may have written above brk (a run header,
    a copy, a memset) without records, and zero_from was put back under those bytes. Moving
    zero_from up to the metadata is always safe; the next wilderness release lowers it."""
    cap = w[F.H_CAPACITY]
    if cap >= F.min_capacity() and cap % F.PAGE == 0:
        w[F.H_ZERO_FROM] = F.meta_off(cap)
        if w[F.H_HOLE_FROM] > F.meta_off(cap):  # raised unlogged by an undone growth
            w[F.H_HOLE_FROM] = F.meta_off(cap)


def undo(w: memoryview, words: int) -> int:
    """Roll back whatever j_state says is pending: restore its records, last first, then clear
    j_state. Idempotent. Returns the records restored. O(records)."""
    if not w[_J_STATE]:
        return 0
    recs = pending_records(w, words)
    start = log_area(w)[0]
    restore(w, recs, bool(_points))
    if recs:
        forget_zeros(w)
    w[_J_STATE] = 0
    w[start] = 0  # the log ends: a flipped j_state replays nothing
    return len(recs)


def pending_in_file(path: str) -> tuple[int, str] | None:
    """The journal of the heap file ``path`` as it is now, read without the lock and without
    recovering anything (for tools that inspect a heap another process may hold): None when it
    is idle, ``(records pending, '')`` when an operation is in flight or was left by a dead
    process, ``(-1, why)`` when its records fail their checks. O(records)."""
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size & ~(F.PAGE - 1)
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    w = memoryview(mm).cast("Q")
    try:
        if not w[_J_STATE]:
            return None
        return len(pending_records(w, len(w))), ""
    except DamagedJournalError as e:
        return -1, str(e)
    finally:
        w.release()
        mm.close()


def discard(fd: int) -> None:
    """Mark the journal of the heap file open as ``fd`` idle *without* restoring its records:
    for records that fail their checks, which restoring could turn into garbage in live blocks.
    The operation they describe stays half done; the caller (``pheap repair``) holds the heap
    lock and rebuilds the indexes from the boundary tags next. Durable (fsync) on return."""
    os.pwrite(fd, (0).to_bytes(F.WORD, "little"), _J_STATE * F.WORD)
    os.fsync(fd)


# ---------------------------------------------------------------------------------------------
# The journal of one mapped heap
# ---------------------------------------------------------------------------------------------


class Journal:
    """The undo log of one mapped heap in this process: cursors, brackets, stores.

    ``set(i, v)`` is the journaled store every allocator and object-layer change goes through
    while an operation or bracket is open. Cost: five word stores and a read, about 0.2 us in
    CPython. Callers refresh ``w`` when the region is remapped.
    """

    __slots__ = ("w", "_region", "mode", "pos", "base", "end", "durable", "fresh", "freed",
                 "freed_spans", "new_runs", "unfresh", "at_brk", "at_meta", "at_cap", "set",
                 "_crashy")

    def __init__(self, region: Region, durable: bool = False) -> None:
        self._region = region
        self.w = region.w
        self.mode = IDLE  #: IDLE, OP, ATOMIC or TX
        self.pos = _J_RECORDS  #: where the next record goes
        self.base = _J_RECORDS  #: first record word of the log in use
        self.end = _J_END  #: first word past the log in use
        self.durable = durable  #: msync before and after every commit word
        #: Allocations made in the open bracket whose bytes no undo needs (offset -> end): a slot
        #: free when the bracket began, in a run that existed then; a block whose words an undo
        #: needs were journaled when it was taken, and that overlaps nothing freed in the
        #: bracket. Stores into them are not logged.
        self.fresh: dict[int, int] = {}
        self.freed: set[int] = set()  #: slots freed in the open bracket (never fresh again)
        #: allocations made in the open bracket that are not fresh (their bytes may have been
        #: live when it began): the layers above log every store into them
        self.unfresh: set[int] = set()
        #: blocks freed in the open bracket, [start, end) with headers (live when it began,
        #: maybe: an allocation that overlaps one is not fresh)
        self.freed_spans: list[tuple[int, int]] = []
        self.new_runs: set[int] = set()  #: runs made in the open bracket (their slots are not
        #: fresh: the run may have been carved from bytes that were live when it began)
        self.at_brk = 0  #: brk when the open bracket began
        self.at_meta = 0  #: metadata offset when the open bracket began
        self.at_cap = 0  #: capacity when the open bracket began
        self._crashy = bool(_points)  # test-only: count crash points
        self.set = self._set_crash if self._crashy else self._set

    # -- stores ------------------------------------------------------------------------------

    def _set(self, i: int, v: int) -> None:
        """Journal word ``i``, then store ``v`` in it."""
        w = self.w
        p = self.pos
        if p + 4 > self.end:
            raise self._full()
        old = w[i]
        w[p + 3] = 0  # the next record's first word: keeps the log ended
        w[p + 1] = old
        w[p + 2] = i ^ old ^ _MIX
        w[p] = i  # the record is live from here on
        self.pos = p + 3
        w[i] = v

    def _set_crash(self, i: int, v: int) -> None:
        hit("write")
        w = self.w
        p = self.pos
        if p + 4 > self.end:
            raise self._full()
        old = w[i]
        w[p + 3] = 0
        w[p + 1] = old
        w[p + 2] = i ^ old ^ _MIX
        w[p] = i
        self.pos = p + 3
        hit("write")
        w[i] = v

    def log_range(self, off: int, n: int) -> None:
        """Record the current bytes [off, off+n) so that an undo restores them.

        Skipped where nothing needs restoring: a fresh slot (see ``fresh``), and bytes that were
        wilderness when the bracket began (in no live block then; the undo frees whatever was
        allocated there). O(n).
        """
        if n <= 0 or self.mode < ATOMIC:
            return
        end = off + n
        e = self.fresh.get(off)
        if e is not None and end <= e:
            return
        lo, hi, cap = self.at_brk, self.at_meta, self.at_cap
        if off < lo:
            self._log_bytes(off, min(end, lo) - off)
        if end > hi and off < cap:  # the old metadata, if the heap grew; past it was no heap
            start = max(off, hi)
            self._log_bytes(start, min(end, cap) - start)

    def _log_bytes(self, off: int, n: int) -> None:
        w = self.w
        p = self.pos
        nw = (n + 7) >> 3
        if p + 4 + nw > self.end:
            raise self._full(n)
        if self._crashy:
            hit("write")
        data = bytes(self._region.mm[off:off + n])
        self._region.mm[(p + 3) << 3:((p + 3) << 3) + n] = data
        w[p + 3 + nw] = 0
        w[p + 1] = off
        w[p + 2] = zlib.crc32(data) ^ off ^ n
        w[p] = _RANGE | n  # the record is live from here on
        self.pos = p + 3 + nw
        if self._crashy:
            hit("write")

    def _full(self, n: int = 8) -> JournalFullError:
        size = (self.end - self.base) * 8
        if self.mode == TX:
            e = TransactionTooLargeError(
                f"transaction log full: {n} more bytes do not fit in its {size} bytes")
            e.needed = (self.pos - self.base) * 8 + n + 64  # at least this log would have held it
            return e
        what = "an atomic() bracket" if self.mode == ATOMIC else "an operation"
        return JournalFullError(f"{what} changes more than the {size} bytes of the operation "
                                "journal hold; use heap.transaction() for large updates")

    # -- operations --------------------------------------------------------------------------

    def begin(self) -> int:
        """Open an operation; return the token for commit/rollback.

        Inside a bracket the operation joins it, and the token is a savepoint, so that a
        failing operation is undone alone.
        """
        if self.mode:
            return self.pos
        w = self.w
        w[_J_RECORDS] = 0
        w[_J_STATE] = F.J_OP  # from here a crash undoes the operation
        self.pos = self.base = _J_RECORDS
        self.end = _J_END
        self.mode = OP
        if self._crashy:
            hit("begin")
        return OUTERMOST

    def commit(self, token: int) -> None:
        """Close the operation ``begin`` opened: one word makes all of it permanent."""
        if token != OUTERMOST:
            return
        if self._crashy or self.durable:
            self._commit_word()
        else:
            w = self.w
            w[_J_STATE] = 0
            w[self.base] = 0  # the log ends at once: a flipped j_state replays nothing
        self.mode = IDLE

    def rollback(self, token: int) -> None:
        """Undo the operation (it raised): every journaled word gets its old value back.

        Inside a bracket only the records since the savepoint are undone.
        """
        w = self.w
        if token == OUTERMOST:
            try:
                undo(w, len(w))
            finally:
                self.mode = IDLE
            return
        recs = records(w, len(w), token, self.base, self.end)
        restore(w, recs)
        if recs:
            forget_zeros(w)
        w[token] = 0
        self.pos = token

    def _commit_word(self) -> None:
        if self._crashy:
            hit("commit")
        if self.durable:  # the work and its undo log on disk before and after the commit word
            self._region.flush()
            self.w[_J_STATE] = 0
            self._region.flush()
        else:
            self.w[_J_STATE] = 0
        self.w[self.base] = 0  # the log ends at once: a flipped j_state replays nothing

    # -- brackets ------------------------------------------------------------------------------

    def open_bracket(self, mode: int, meta: int) -> None:
        """Open an atomic bracket (``ATOMIC``) or a transaction (``TX``; the txlog block must
        exist). ``meta`` is the metadata offset now (the end of the wilderness)."""
        w = self.w
        if mode == TX:
            start, end = _txlog_words(w)
        else:
            start, end = _J_RECORDS, _J_END
        w[start] = 0
        self.at_brk = w[F.H_BRK]
        self.at_meta = meta
        self.at_cap = w[F.H_CAPACITY]
        self._forget()
        self.pos = self.base = start
        self.end = end
        w[_J_STATE] = F.J_TX if mode == TX else F.J_OP  # from here a crash undoes it all
        self.mode = mode
        if self._crashy:
            hit("begin")

    def close_bracket(self, commit: bool, durable: bool = False) -> None:
        """Commit (one word) or undo everything the bracket did, last first."""
        try:
            if commit:
                if durable and not self.durable:
                    self.durable = True
                    try:
                        self._commit_word()
                    finally:
                        self.durable = False
                else:
                    self._commit_word()
            else:
                undo(self.w, len(self.w))
        finally:
            self.mode = IDLE
            self._forget()
            self.pos = self.base = _J_RECORDS
            self.end = _J_END

    def _forget(self) -> None:
        if self.fresh:
            self.fresh.clear()
        if self.freed:
            self.freed.clear()
        if self.freed_spans:
            self.freed_spans.clear()
        if self.new_runs:
            self.new_runs.clear()
        if self.unfresh:
            self.unfresh.clear()

    def overlaps_freed(self, start: int, end: int) -> bool:
        """Whether [start, end) overlaps a block freed in the open bracket (or more were freed
        than are tracked: then it may). O(blocks freed in it)."""
        spans = self.freed_spans
        if len(spans) > FRESH_SPANS:
            return True
        for a, b in spans:
            if a < end and start < b:
                return True
        return False

    def block_is_fresh(self, start: int, end: int) -> bool:
        """Whether an allocation made now in the open bracket over [start, end) may be marked
        fresh: it overlaps no block freed in the bracket, nor the metadata the heap had when the
        bracket began (wilderness once the heap grew). O(blocks freed in it), and never once
        more than FRESH_SPANS were freed (then nothing is fresh: only slower, never wrong)."""
        spans = self.freed_spans
        if len(spans) > FRESH_SPANS or self.at_meta < end and start < self.at_cap:
            return False  # (the metadata the bracket began with, now wilderness after a growth)
        for a, b in spans:
            if a < end and start < b:
                return False
        return True

    def reset(self) -> None:
        """Forget the cursors (a forked child, or after recovery): nothing is open."""
        self.mode = IDLE
        self._forget()
        self.pos = self.base = _J_RECORDS
        self.end = _J_END


def _txlog_words(w: memoryview) -> tuple[int, int]:
    p = w[F.H_TXLOG]
    return p >> 3, (p - 8 + (w[(p >> 3) - 1] & F.SIZE_MASK)) >> 3
