"""The one place where the benchmarks reach inside pheap.

Everything else in tools/ uses pheap's public API only. The allocator benchmark also needs four
things the public API does not give (on purpose): the allocator of a heap called directly, with
no lock and no journal (the "pheap Allocator" row: the algorithm alone); the offset of the first
block and the size of the mapping a block area needs (the "pheap whole" utilization); and a
crash point inside a journaled write (the recovery-time row).

All four come from :func:`pheap_internals`, the only function in tools/ that touches a private
attribute or an internal module of pheap. When pheap's internals change, adapt that function
and nothing else; the benchmarks keep working through the names it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class PheapInternals(NamedTuple):
    """What :func:`pheap_internals` returns."""

    #: ``raw_ops(heap)`` -> (malloc, realloc, free) of the allocator behind ``heap`` (opened with
    #: ``journal=False``), called directly: no lock, no journal; page releases that the
    #: allocator queues are done right after each op, as Heap does
    raw_ops: Callable[[Any], tuple[Callable[[int], int], Callable[[int, int], int],
                                   Callable[[int], None]]]
    blocks_off: int  #: offset of the first block (header + control block come before it)
    #: ``mapping_for(peak_brk)`` -> bytes of the smallest mapping whose block area reaches
    #: ``peak_brk``: header, control block, blocks and the allocation bitmap
    mapping_for: Callable[[int], int]
    #: ``crash_at_journal_write(n)``: SIGKILL this process at its n-th journaled write (armed
    #: before the heap is opened)
    crash_at_journal_write: Callable[[int], None]


def pheap_internals() -> PheapInternals:
    """THE function that touches pheap's internals (``Heap._a``, ``pheap.format``,
    ``pheap.journal``). Adapt it, and only it, when they change."""
    from pheap import format as F
    from pheap import journal

    def raw_ops(heap: Any) -> tuple[Callable[[int], int], Callable[[int, int], int],
                                    Callable[[int], None]]:
        a = heap._a  # the Allocator behind the Heap
        if a.journaled:
            raise ValueError("raw_ops needs a heap opened with journal=False")
        pending, release, a_free, a_realloc = a.pending, a.release_pending, a.free, a.realloc

        def free(p: int) -> None:
            a_free(p)
            if pending:
                release()

        def realloc(p: int, n: int) -> int:
            q = a_realloc(p, n)
            if pending:
                release()
            return q
        return a.malloc, realloc, free

    def mapping_for(peak_brk: int) -> int:
        cap = F.round_up(peak_brk, 8)
        while F.bitmap_off(cap) < peak_brk:
            cap += 8
        return cap

    def crash_at_journal_write(n: int) -> None:
        journal.set_crashpoint("write", n)

    return PheapInternals(raw_ops, F.BLOCKS_OFF, mapping_for, crash_at_journal_write)
