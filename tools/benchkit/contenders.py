"""The allocators the allocator benchmark compares, behind one interface.

:class:`Contender` gives ``malloc``, ``realloc``, ``free`` and the context to run them in, for:

``pheap Allocator``  the allocator behind a file heap (its core) called directly (see
                     :mod:`benchkit.internals`) inside one ``with heap.lock():``: the algorithm
                     and its journal, no lock work per call.
``pheap Heap ...``   the public API on a file heap: ``lock/op`` takes the lock in every call;
                     ``1 lock`` runs inside one ``with heap.lock():``.
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

    def heap(self, size: int = pheap.DEFAULT_SIZE, **kw: Any) -> pheap.Heap:
        """A new heap file (``kw``: more options of ``pheap.open``), unlinked at once."""
        path = self.path()
        h = pheap.open(path, "n", size=size, **kw)
        os.unlink(path)  # the mapping and descriptors keep it alive; nothing to clean up later
        return h

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


ALLOC = "pheap Allocator"
LOCK_OP = "pheap Heap lock/op"
ONE_LOCK = "pheap Heap 1 lock"
MP = "mp.heap"
FF = "first-fit"
ALL_CONTENDERS = (ALLOC, LOCK_OP, ONE_LOCK, MP, FF)
LEGEND = (f"Every pheap heap is journaled (each operation atomic against SIGKILL). {ALLOC}: the "
          f"allocator behind the heap (its core's malloc/realloc/free) called directly inside one "
          f"`with heap.lock():` -- the algorithm and its journal, no lock system call per op: a "
          f"small slot whose bitmap word stays listed is one plain word store, any other op is "
          f"one journaled operation (begin, logged stores, commit). {LOCK_OP}: Heap.malloc/free, "
          f"each taking and releasing the flock lock. {ONE_LOCK}: Heap.malloc/free inside one "
          f"`with heap.lock():` (the allocator's paths plus the public methods' checks).")


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
            h = self.heap = tmp.heap(size)
            self.malloc, self.realloc, self.free = pheap_internals().raw_ops(h)
        elif who.startswith("pheap Heap"):
            h = self.heap = tmp.heap(size)
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
        """The context to run in: one heap lock for ``1 lock`` and the raw allocator."""
        if self.heap is not None and self.who in (ALLOC, ONE_LOCK):
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
