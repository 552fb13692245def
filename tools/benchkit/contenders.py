"""The allocators the allocator benchmark compares, behind one interface.

:class:`Contender` gives ``malloc``, ``realloc``, ``free`` and the context to run them in, for:

``pheap Allocator``  the allocator of a file heap opened with ``journal=False``, called directly
                     (see :mod:`benchkit.internals`), no lock: the algorithm alone.
``pheap Heap ...``   the public API on a file heap: ``lock/op`` takes the lock in every call;
                     ``1 lock`` runs inside one ``with heap.lock():``; ``no journal`` on a heap
                     opened with ``journal=False``.
``mp.heap``          CPython's ``multiprocessing.heap.Heap``: per process, never shared;
                     ``malloc(n)`` returns ``(arena, start, stop)``; realloc = malloc + copy + free.
``first-fit``        :class:`benchkit.firstfit.FirstFit`.

Heap files live in a :class:`TempDir`, removed at the end of the run.
"""

from __future__ import annotations

import contextlib
import multiprocessing.heap as mpheap
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import pheap

from .firstfit import FirstFit
from .internals import pheap_internals


class TempDir:
    """A private temporary directory for heap files; every heap gets a new name in it."""

    def __init__(self, prefix: str = "pheap-bench-") -> None:
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.n = 0

    def path(self, suffix: str = ".heap") -> str:
        self.n += 1
        return os.path.join(self.dir, f"b{self.n}{suffix}")

    def folder(self) -> str:
        """A new, empty folder inside (for stores that are a directory)."""
        self.n += 1
        return tempfile.mkdtemp(prefix=f"s{self.n}-", dir=self.dir)

    def heap(self, size: int = pheap.DEFAULT_SIZE, journal: bool = True) -> pheap.Heap:
        path = self.path()
        h = pheap.open(path, "n", size=size, journal=journal)
        os.unlink(path)  # the mapping and descriptors keep it alive; nothing to clean up later
        return h

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


ALLOC = "pheap Allocator"
LOCK_OP = "pheap Heap lock/op"
ONE_LOCK = "pheap Heap 1 lock"
ONE_LOCK_NJ = "pheap Heap 1 lock, no journal"
MP = "mp.heap"
FF = "first-fit"
ALL_CONTENDERS = (ALLOC, LOCK_OP, ONE_LOCK, ONE_LOCK_NJ, MP, FF)
LEGEND = (f"{ALLOC}: the allocator without journal (pheap.open(..., journal=False)) called "
          f"directly, no lock; page releases it queues are done right after the op, as Heap "
          f"does. {LOCK_OP}: Heap.malloc/free, each taking the flock lock. {ONE_LOCK}: the same "
          f"calls inside one `with heap.lock():` (the default, journaled heap: begin/commit around "
          f"each op). {ONE_LOCK_NJ}: that, on a heap opened with journal=False.")


def mp_realloc(heap: mpheap.Heap) -> Callable[[tuple, int], tuple]:
    """realloc for multiprocessing.heap: malloc the new size, copy, free the old block."""
    malloc, free = heap.malloc, heap.free

    def realloc(block: tuple, n: int) -> tuple:
        new = malloc(n)
        arena, start, stop = block
        k = min(stop - start, n)
        new[0].buffer[new[1]:new[1] + k] = arena.buffer[start:start + k]
        free(block)
        return new
    return realloc


def mp_arena_bytes(heap: mpheap.Heap) -> int:
    """Bytes of all arenas a multiprocessing.heap.Heap has mapped now."""
    return sum(a.size for a in heap._arenas)


class Contender:
    """A fresh allocator of one kind: ``malloc``, ``realloc``, ``free`` and a context to run in."""

    def __init__(self, who: str, tmp: TempDir, size: int = pheap.DEFAULT_SIZE) -> None:
        self.who = who
        self.heap: pheap.Heap | None = None
        self.obj: Any = None
        if who == ALLOC:
            h = self.heap = tmp.heap(size, journal=False)
            self.malloc, self.realloc, self.free = pheap_internals().raw_ops(h)
        elif who.startswith("pheap Heap"):
            h = self.heap = tmp.heap(size, journal=who != ONE_LOCK_NJ)
            self.malloc, self.realloc, self.free = h.malloc, h.realloc, h.free
        elif who == MP:
            mh = self.obj = mpheap.Heap()
            self.malloc, self.realloc, self.free = mh.malloc, mp_realloc(mh), mh.free
        elif who == FF:
            ff = self.obj = FirstFit()
            self.malloc, self.realloc, self.free = ff.malloc, ff.realloc, ff.free
        else:
            raise ValueError(f"unknown contender {who!r}")

    def held(self) -> Any:
        """The context to run in: one heap lock for the ``1 lock`` contenders."""
        if self.heap is not None and self.who in (ONE_LOCK, ONE_LOCK_NJ):
            return self.heap.lock()
        return contextlib.nullcontext()

    def close(self, check: bool = True) -> None:
        """Check the allocator's invariants (pheap, first-fit), then let it go."""
        if self.heap is not None:
            if check:
                self.heap.check()
            self.heap.close()
        if check and isinstance(self.obj, FirstFit):
            self.obj.check()
        self.obj = None
