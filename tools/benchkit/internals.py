"""The one place where the benchmarks reach inside pheap.

Everything else in tools/ uses pheap's public API only. The allocator benchmark also needs four
things the public API does not give (on purpose): the allocator behind a heap called directly,
under the heap lock the caller holds (the "pheap Allocator" row: the algorithm and its journal,
without the public methods' wrapper); the offset of the first block and the size of the mapping
a block area needs (the "pheap whole" utilization); and a crash point inside a journaled write
(the recovery-time row).

All four come from :func:`pheap_internals`, the only function in tools/ that touches a private
attribute or an internal module of pheap. When pheap's internals change, adapt that function
and nothing else; the benchmarks keep working through the names it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class PheapInternals(NamedTuple):
    """What :func:`pheap_internals` returns."""

    #: ``raw_ops(heap)`` -> (malloc, realloc, free) of the allocator behind ``heap`` (its core),
    #: called directly. Call them with the heap lock held (``with heap.lock():``): then a small
    #: slot is one plain word store and every other operation is one journaled operation (begin,
    #: logged stores, commit; page releases it queues are done right after the commit), with
    #: no lock work per call. Without the lock each call takes it, as the public methods do.
    raw_ops: Callable[[Any], tuple[Callable[[int], int], Callable[[int, int], int],
                                   Callable[[int], None]]]
    blocks_off: int  #: offset of the first block header (header + control block come before it)
    #: ``mapping_for(peak_brk)`` -> bytes of the smallest mapping whose block area reaches
    #: ``peak_brk``: header, control block, blocks, the page map and the allocation bitmap
    mapping_for: Callable[[int], int]
    #: ``crash_at_journal_write(n)``: SIGKILL this process at its n-th journaled write (armed
    #: before the heap is opened: a heap opened while no crash point is armed never counts)
    crash_at_journal_write: Callable[[int], None]


def pheap_internals() -> PheapInternals:
    """THE function that touches pheap's internals (``Heap._core``, ``pheap.format``,
    ``pheap.journal``). Adapt it, and only it, when they change."""
    from pheap import format as F
    from pheap import journal

    def raw_ops(heap: Any) -> tuple[Callable[[int], int], Callable[[int, int], int],
                                    Callable[[int], None]]:
        core = heap._core  # pheap.heap.Core: the Allocator behind the Heap, with its lock
        return core.malloc, core.realloc, core.free

    def mapping_for(peak_brk: int) -> int:
        cap = F.round_up(peak_brk, 8)
        while F.meta_off(cap) < peak_brk:  # the wilderness ends where the page map begins
            cap += 8
        return cap

    def crash_at_journal_write(n: int) -> None:
        journal.set_crashpoint("write", n)

    return PheapInternals(raw_ops, F.BLOCKS_OFF, mapping_for, crash_at_journal_write)
