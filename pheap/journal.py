"""The undo journal that makes every allocator operation atomic, and the crash-point hooks.

Protocol (all inside the header page; layout in :mod:`pheap.format`)::

    begin:    j_entries[0].index = 0; j_state = 1
    write:    entry[k+1].index = 0; entry[k].old = w[i]; entry[k].index = i; w[i] = new
    commit:   j_state = 0
    recover:  if j_state: for each entry, last first: w[index] = old; then j_state = 0

An entry becomes live when its index word is written, and only then is the heap word changed, so
a crash between any two word writes leaves either an entry whose word is unchanged or an entry
that restores it. Restoring writes absolute old values, so it is idempotent: a crash during
recovery is recovered again. Recovery is O(entries), not O(heap).

Python does not promise that an 8-byte store is atomic, but a ``memoryview`` of format ``'Q'``
stores an aligned word with one machine store, and SIGKILL cannot split a machine store; that is
the crash model of the default durability (a process crash: the page cache survives it). Power
loss is a different model: see :meth:`pheap.Heap.flush` and docs/design.md.

Why undo rather than redo: an allocator operation reads words it has just written (unlinking a
block and then inserting the remainder into the same bin), so a redo log would need a read
overlay. Undo lets the operation run exactly as without a journal.

Crash points (testing only): ``PHEAP_CRASHPOINT=name:n[,name:n...]`` in the environment, or
:func:`set_crashpoint`, SIGKILLs the process at the n-th hit of a named point. Points: ``begin``
(after j_state is set), ``write`` (twice per journaled word: before its entry and between the
entry and the word), ``commit`` (before j_state is cleared), ``recover`` (between restored words),
``grow`` (file extended, capacity not yet written), ``release`` (committed, before pages are
given back). When no crash point is set, none of this code is on any path.
"""

from __future__ import annotations

import os
import signal
from typing import Final

from . import format as F
from .errors import CorruptHeapError

__all__ = ["set_crashpoint", "clear_crashpoints", "crashpoints_armed", "hit", "undo",
           "pending_entries", "log_area", "records", "restore", "CRASH_ENV"]

CRASH_ENV: Final = "PHEAP_CRASHPOINT"  #: environment variable naming crash points

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
    """Whether any crash point is set (allocators made from now on use the counting writer)."""
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


def log_area(w: memoryview, words: int) -> tuple[int, int]:
    """Word range [start, end) of the records of the journal now in use (header or txlog)."""
    state = w[F.J_STATE]
    if state == F.J_OP or state == 0:
        return F.J_ENTRIES, F.J_END
    if state != F.J_TX:
        raise CorruptHeapError(f"offset {F.J_STATE * 8}: journal state {state} is not 0, 1 or 2")
    p = w[F.H_TXLOG]
    brk = w[F.H_BRK]
    if p & 7 or not F.BLOCKS_OFF + 8 <= p < brk:
        raise CorruptHeapError(f"offset {F.H_TXLOG * 8}: transaction log offset {p} is not a "
                               f"block in [{F.BLOCKS_OFF + 8}, {brk})")
    size = w[(p >> 3) - 1] & ~7
    if size < F.MIN_BLOCK or p - 8 + size > brk:
        raise CorruptHeapError(f"offset {p - 8}: transaction log block size {size} runs past "
                               f"brk {brk}")
    return p >> 3, (p - 8 + size) >> 3


def pending_entries(w: memoryview, words: int) -> list[tuple[int, int, bytes | None]]:
    """The live undo records of an interrupted operation or transaction, validated.

    Each record is ``(word_index, old_value, None)`` or ``(byte_offset, 0, old_bytes)``.
    [] when nothing is in flight. A record naming anything outside the mapping, inside the
    immutable header or inside the journal itself means the journal is damaged: CorruptHeapError.
    """
    if not w[F.J_STATE]:
        return []
    start, end = log_area(w, words)
    return records(w, words, start, start, end)


def records(w: memoryview, words: int, p: int, start: int,
            end: int) -> list[tuple[int, int, bytes | None]]:
    """Parse the records from word ``p`` of the log occupying words [start, end)."""
    out: list[tuple[int, int, bytes | None]] = []
    while p + 1 < end:
        i = w[p]
        if i == 0:
            break
        if i & F.RANGE_FLAG:
            n = i & ~F.RANGE_FLAG
            off = w[p + 1]
            nw = (n + 7) >> 3
            if off < F.BLOCKS_OFF or off + n > words * 8 or p + 2 + nw >= end or \
                    start * 8 <= off + n and off < end * 8:
                raise CorruptHeapError(f"offset {p * 8}: range record ({off}, {n} bytes) "
                                       "outside the block area or past the log")
            data = bytes(w[p + 2:p + 2 + nw].cast("B"))[:n]
            out.append((off, 0, data))
            p += 2 + nw
            continue
        if i >= words or F.H_JOURNAL <= i < F.J_END or i < F.H_CAPACITY or start <= i < end:
            raise CorruptHeapError(f"offset {p * 8}: journal record names word {i}, outside "
                                   "what an operation may change")
        old = w[p + 1]
        if i == F.H_CAPACITY and (old % F.PAGE or not F.min_capacity() <= old <= words * 8) or \
                i == F.H_BRK and (old & 7 or not F.BLOCKS_OFF <= old <= words * 8):
            raise CorruptHeapError(f"offset {p * 8}: journal record would restore "
                                   f"{'capacity' if i == F.H_CAPACITY else 'brk'} = {old}, "
                                   "which no heap of this file can have")
        out.append((i, old, None))
        p += 2
    return out


def undo(w: memoryview, words: int) -> int:
    """Roll back an interrupted operation or transaction: restore its records, last first.

    Idempotent: restoring absolute old values twice is restoring them once, so a crash during
    recovery is recovered by the next opener. Returns the records restored. O(records).
    """
    entries = pending_entries(w, words)
    if not w[F.J_STATE]:
        return 0
    armed = bool(_points)
    restore(w, entries, armed)
    if entries:
        forget_zeros(w)
    w[F.J_STATE] = 0
    return len(entries)


def forget_zeros(w: memoryview) -> None:
    """After an undo, trust no zeros: the undone work may have written above brk (a copy, a
    memset, transaction data) without records, and zero_from was put back under those bytes.
    Moving zero_from up to the bitmap is always safe; the next wilderness release lowers it."""
    cap = w[F.H_CAPACITY]
    if cap >= F.min_capacity() and cap % F.PAGE == 0:
        w[F.H_ZERO_FROM] = F.bitmap_off(cap)


def restore(w: memoryview, records: list[tuple[int, int, bytes | None]],
            armed: bool = False) -> None:
    """Write the old values of ``records`` back, last record first."""
    wb = None
    for i, old, data in reversed(records):
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
