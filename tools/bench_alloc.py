"""Allocator benchmark: pheap against ``multiprocessing.heap`` and a first-fit free list, one run.

Every contender runs in the same process, on the same inputs, in the same run, so the ratios hold
even where the absolute figures belong to the machine. Commands (from the repository root)::

    python3 tools/bench_alloc.py --quick          # smoke run, under a minute
    python3 tools/bench_alloc.py                  # full run, a few minutes
    python3 tools/bench_alloc.py --seed 1 -o tools/results/bench_alloc.txt   # the committed results

``--seed N`` (default 1) fixes every random size and index; ``-o FILE`` also writes the output to
FILE. The output is: an environment line; the malloc-lab trace replay (utilization and Kops/s);
micro-benchmarks (24 B pairs, random churn at three live-set sizes, per-op time against the number
of live blocks, the lock with two processes). Each figure is a median of several repeats.

Contenders
    ``pheap Allocator``  the TLSF allocator of a file heap opened with ``journal=False``, called
                         directly (``heap._a``), no lock; page releases it queues are done right
                         after the operation, as ``Heap`` does. The algorithm alone.
    ``pheap Heap``       the public API on a file heap: ``lock/op`` takes the flock lock in every
                         call; ``1 lock`` runs inside one ``with heap.lock():`` (re-entrant calls
                         do no lock work). Default heaps are journaled (every operation atomic);
                         ``no journal`` is the same on a heap opened with ``journal=False``.
    ``mp.heap``          CPython's ``multiprocessing.heap.Heap`` (what ``multiprocessing.Value``
                         and ``Array`` allocate from): per process, never shared; free-block tables
                         in Python dicts and a sorted list, blocks in mmap arenas. ``malloc(n)``
                         returns ``(arena, start, stop)``; realloc here is malloc + copy + free.
    ``first-fit``        :class:`FirstFit` below, the textbook explicit free list over a bytearray.

Utilization (trace replay) = peak live payload / high-water mark. Peak live payload is a property
of the trace: the largest sum, over time, of the requested bytes of the live blocks. High-water
marks:

- pheap: ``peak_brk - BLOCKS_OFF``, the block area at its largest (header word ``peak_brk``, read
  with ``heap.stats()``). The fixed header + control block (``BLOCKS_OFF`` = 16 KiB) and the
  allocation bitmap (1/64 of the mapping) come on top; the ``whole`` column counts them too
  (``BLOCKS_OFF`` + block area + the bitmap a mapping of that size needs).
- first-fit: the largest ``brk`` of its bytearray (the bytearray itself grows by doubling; the
  bytes past ``brk`` are spare capacity, like pheap's wilderness).
- mp.heap: the total size of its arenas, ``sum(a.size for a in h._arenas)``, sampled after every
  operation of a separate, untimed replay, maximum taken. Its bookkeeping lives in Python objects
  outside the arenas and is not counted, which flatters it.

Timing: ``time.perf_counter`` around the loop, the garbage collector off (as ``timeit`` does),
loop overhead included. Heaps are fresh for every repeat of a trace; pheap heaps are files in the
system temporary directory, created at 1 MiB and grown on demand.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import glob
import multiprocessing
import multiprocessing.heap as mpheap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TextIO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pheap  # noqa: E402
from pheap import format as F  # noqa: E402

TRACE_DIR = os.path.join(ROOT, "..", "shared", "traces", "malloclab")
TINY_TRACES = ("short1-bal", "short2-bal")  #: left out of the average (a few KiB of payload)
FLOOR_US = 0.47  #: one-class malloc+free on the word view, no lock (DESIGN.md, "Figures to beat")
UTIL_AVG_TARGET = 90.0  #: % average over the larger traces (the issue)
UTIL_MIN_TARGET = 75.0  #: % no larger trace below this
SCALE_TARGET = 1.2  #: per-op time at 10**6 live blocks / at 10**3

perf_counter = time.perf_counter

# ---------------------------------------------------------------------------------------------
# The first-fit baseline
# ---------------------------------------------------------------------------------------------

_USED = 1  #: header bit 0: the block is in use
_PREV_USED = 2  #: header bit 1: the block just before this one is in use (or there is none)
_MIN = 32  #: header + next + prev + footer: the smallest block that can be free
_BASE = 8  #: the first block starts here, so that offset 0 can mean "no block"


class FirstFit:
    """The classic explicit-free-list malloc (CS:APP 9.9) over a bytearray: a baseline.

    Blocks fill ``buf[8:brk]``; a block's size is a multiple of 8, at least 32, header included.
    Header word = size | USED | PREV_USED. A used block is ``[header][payload]``; a free block is
    ``[header][next][prev] ... [footer = size]`` and sits in one doubly linked free list, newest
    first. ``malloc`` takes the first block of the list that fits and splits off a remainder of
    32 bytes or more; ``free`` merges with both neighbours through the boundary tags, and a block
    freed at the end lowers ``brk``; when nothing fits, the block is carved at ``brk`` and the
    bytearray doubles as needed. ``realloc`` shrinks in place, grows in place at ``brk`` or into a
    free next block, else moves. Offsets are payload offsets into ``buf`` (never 0); ``peak`` is
    the high-water mark of ``brk``. A freed offset is checked for the USED bit only.

    >>> ff = FirstFit(); p = ff.malloc(100); ff.buf[p:p + 5] = b"hello"; q = ff.malloc(10)
    >>> ff.free(p); ff.malloc(50) == p, ff.peak
    (True, 152)
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.buf = bytearray(max(capacity, 64) + 7 & -8)
        self._w = memoryview(self.buf).cast("Q")
        self.brk = _BASE
        self.peak = _BASE
        self.head = 0  #: first block of the free list (0 = empty)

    def _grow(self, end: int) -> None:
        self._w.release()  # a bytearray cannot resize while a view of it exists
        self.buf.extend(bytes(max(end, 2 * len(self.buf)) - len(self.buf)))
        self._w = memoryview(self.buf).cast("Q")

    def _push(self, b: int) -> None:
        w = self._w
        h = self.head
        w[(b >> 3) + 1] = h
        w[(b >> 3) + 2] = 0
        if h:
            w[(h >> 3) + 2] = b
        self.head = b

    def _unlink(self, b: int) -> None:
        w = self._w
        nxt = w[(b >> 3) + 1]
        prv = w[(b >> 3) + 2]
        if prv:
            w[(prv >> 3) + 1] = nxt
        else:
            self.head = nxt
        if nxt:
            w[(nxt >> 3) + 2] = prv

    def _carve(self, s: int) -> int:
        b = self.brk
        end = b + s
        if end > len(self.buf):
            self._grow(end)
        self._w[b >> 3] = s | _USED | _PREV_USED  # the block below brk is never free
        self.brk = end
        if end > self.peak:
            self.peak = end
        return b + 8

    def malloc(self, n: int) -> int:
        """Allocate ``n`` bytes; return the payload offset. O(free blocks): first fit."""
        if n < 0:
            raise ValueError(f"negative size {n}")
        s = (n + 15) & -8
        if s < _MIN:
            s = _MIN
        w = self._w
        b = self.head
        while b:
            size = w[b >> 3] & -8
            if size >= s:
                break
            b = w[(b >> 3) + 1]
        else:
            return self._carve(s)
        self._unlink(b)
        rem = size - s
        if rem >= _MIN:
            w[b >> 3] = s | _USED | _PREV_USED  # the block before a free block is used
            r = b + s
            w[r >> 3] = rem | _PREV_USED  # the block after r already has PREV_USED clear
            w[((r + rem) >> 3) - 1] = rem
            self._push(r)
        else:
            w[b >> 3] = size | _USED | _PREV_USED
            w[(b + size) >> 3] |= _PREV_USED  # a free block never touches brk: a block follows
        return b + 8

    def _used_block(self, p: int) -> int:
        if type(p) is not int or p & 7 or p < _BASE + 8 or p >= self.brk \
                or not self._w[(p - 8) >> 3] & _USED:
            raise ValueError(f"first-fit: {p} is not a live block")
        return p - 8

    def free(self, p: int) -> None:
        """Free the block at ``p``, merging it with free neighbours. O(1)."""
        b = self._used_block(p)
        w = self._w
        hdr = w[b >> 3]
        size = hdr & -8
        nb = b + size
        if not hdr & _PREV_USED:
            psize = w[(b >> 3) - 1]
            b -= psize
            self._unlink(b)
            size += psize
        if nb == self.brk:
            self.brk = b
            return
        nh = w[nb >> 3]
        if nh & _USED:
            w[nb >> 3] = nh & ~_PREV_USED
        else:
            self._unlink(nb)
            size += nh & -8
        w[b >> 3] = size | _PREV_USED
        w[((b + size) >> 3) - 1] = size
        self._push(b)

    def realloc(self, p: int, n: int) -> int:
        """Resize the block at ``p`` to ``n`` bytes, keeping its contents; return its offset."""
        if p == 0:
            return self.malloc(n)
        if n < 0:
            raise ValueError(f"negative size {n}")
        b = self._used_block(p)
        w = self._w
        hdr = w[b >> 3]
        size = hdr & -8
        s = max(_MIN, (n + 15) & -8)
        flags = hdr & (_USED | _PREV_USED)
        if s <= size:  # shrink: cut off the tail as a used block and free it (it coalesces)
            if size - s >= _MIN:
                w[b >> 3] = s | flags
                w[(b + s) >> 3] = (size - s) | _USED | _PREV_USED
                self.free(b + s + 8)
            return p
        nb = b + size
        if nb == self.brk:  # the last block: move brk
            end = b + s
            if end > len(self.buf):
                self._grow(end)
                w = self._w
            w[b >> 3] = s | flags
            self.brk = end
            if end > self.peak:
                self.peak = end
            return p
        nh = w[nb >> 3]
        total = size + (nh & -8)
        if not nh & _USED and total >= s:  # absorb the free next block
            self._unlink(nb)
            rem = total - s
            if rem >= _MIN:
                w[b >> 3] = s | flags
                r = b + s
                w[r >> 3] = rem | _PREV_USED
                w[((r + rem) >> 3) - 1] = rem
                self._push(r)
            else:
                w[b >> 3] = total | flags
                w[(b + total) >> 3] |= _PREV_USED
            return p
        q = self.malloc(n)  # may grow buf; slices below see the new bytes
        self.buf[q:q + size - 8] = self.buf[p:p + size - 8]
        self.free(p)
        return q

    def usable_size(self, p: int) -> int:
        """Payload bytes of the live block at ``p``."""
        b = self._used_block(p)
        return (self._w[b >> 3] & -8) - 8

    def check(self) -> None:
        """Walk every block and the free list; raise RuntimeError naming a broken invariant."""
        w = self._w

        def bad(off: int, msg: str) -> RuntimeError:
            return RuntimeError(f"first-fit: offset {off}: {msg}")

        free_blocks: set[int] = set()
        b = _BASE
        prev_free = False
        while b < self.brk:
            hdr = w[b >> 3]
            size = hdr & -8
            if size < _MIN or b + size > self.brk:
                raise bad(b, f"size {size} below {_MIN} or past brk {self.brk}")
            if bool(hdr & _PREV_USED) == prev_free:
                raise bad(b, "PREV_USED disagrees with the previous block")
            if hdr & _USED:
                prev_free = False
            else:
                if prev_free:
                    raise bad(b, "two adjacent free blocks")
                if w[((b + size) >> 3) - 1] != size:
                    raise bad(b, "footer differs from the header")
                free_blocks.add(b)
                prev_free = True
            b += size
        if prev_free:
            raise bad(b, "the block below brk is free")
        seen: set[int] = set()
        x, prev = self.head, 0
        while x:
            if x not in free_blocks or x in seen:
                raise bad(x, "free list links to a non-free block, or loops")
            if w[(x >> 3) + 2] != prev:
                raise bad(x, "prev link is not the previous list node")
            seen.add(x)
            prev, x = x, w[(x >> 3) + 1]
        if seen != free_blocks:
            raise bad(min(free_blocks - seen), "free block missing from the free list")


# ---------------------------------------------------------------------------------------------
# malloc-lab traces
# ---------------------------------------------------------------------------------------------

OP_ALLOC, OP_REALLOC, OP_FREE = 0, 1, 2  #: op kinds in Trace.ops


class Trace(NamedTuple):
    """One parsed trace file."""

    name: str  #: file name without ``.rep``
    suggested_heap: int  #: header line 1
    n_ids: int  #: header line 2: ids are 0 .. n_ids - 1
    n_ops: int  #: header line 3 (equals len(ops))
    weight: int  #: header line 4
    ops: list[tuple[int, int, int]]  #: (OP_ALLOC | OP_REALLOC | OP_FREE, id, bytes); 0 bytes: free
    peak_live: int  #: largest sum over time of the requested bytes of the live blocks


def parse_trace(path: str) -> Trace:
    """Read a CS:APP malloc-lab trace: four header numbers, then ``a id n``, ``r id n``, ``f id``.

    Validates as it reads (ValueError naming the line): ids in range, no ``a`` of a live id, no
    ``r``/``f`` of a dead one, the op count matching the header. Computes the peak live payload.
    """
    name = os.path.basename(path).removesuffix(".rep")
    with open(path, encoding="ascii") as fh:
        lines = fh.read().splitlines()
    header: list[int] = []
    ops: list[tuple[int, int, int]] = []
    live: dict[int, int] = {}
    cur = peak = 0
    n_ids = 0
    for lineno, line in enumerate(lines, 1):
        t = line.split()
        if not t:
            continue
        where = f"{name}.rep line {lineno}"
        try:
            if len(header) < 4:
                if len(t) != 1:
                    raise ValueError("header lines hold one number each")
                header.append(int(float(t[0])) if len(header) == 3 else int(t[0]))
                n_ids = header[1] if len(header) >= 2 else 0
                continue
            kind = {"a": OP_ALLOC, "r": OP_REALLOC, "f": OP_FREE}.get(t[0])
            if kind is None or len(t) != (2 if kind == OP_FREE else 3):
                raise ValueError(f"expected 'a id n', 'r id n' or 'f id', got {line.strip()!r}")
            i = int(t[1])
            if not 0 <= i < n_ids:
                raise ValueError(f"id {i} outside [0, {n_ids})")
            if kind == OP_FREE:
                if i not in live:
                    raise ValueError(f"free of id {i}, which is not live")
                cur -= live.pop(i)
                ops.append((OP_FREE, i, 0))
                continue
            n = int(t[2])
            if n < 0:
                raise ValueError(f"negative size {n}")
            if kind == OP_ALLOC:
                if i in live:
                    raise ValueError(f"alloc of id {i}, which is live")
            elif i not in live:
                raise ValueError(f"realloc of id {i}, which is not live")
            cur += n - live.get(i, 0)
            live[i] = n
            peak = max(peak, cur)
            ops.append((kind, i, n))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if len(header) < 4:
        raise ValueError(f"{name}.rep: {len(header)} header lines, expected 4")
    if len(ops) != header[2]:
        raise ValueError(f"{name}.rep: header says {header[2]} ops, found {len(ops)}")
    return Trace(name, header[0], header[1], header[2], header[3], ops, peak)


def replay(trace: Trace, malloc: Callable[[int], Any], realloc: Callable[[Any, int], Any],
           free: Callable[[Any], Any]) -> float:
    """Run the trace's ops through the three functions; return the seconds the loop took."""
    h: list[Any] = [0] * trace.n_ids
    ops = trace.ops
    t0 = perf_counter()
    for k, i, n in ops:
        if k == 0:
            h[i] = malloc(n)
        elif k == 1:
            h[i] = realloc(h[i], n)
        else:
            free(h[i])
    return perf_counter() - t0


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


def whole_pheap_bytes(peak_brk: int) -> int:
    """Smallest mapping holding a block area up to ``peak_brk``: header, blocks, bitmap."""
    cap = F.round_up(peak_brk, 8)
    while F.bitmap_off(cap) < peak_brk:
        cap += 8
    return cap


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


class Out:
    """print() to stdout and, when given, to a file as well."""

    def __init__(self, fh: TextIO | None = None) -> None:
        self.fh = fh

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if self.fh is not None:
            self.fh.write(line + "\n")
            self.fh.flush()

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """First column left-aligned, the others right-aligned."""
        cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
        widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]

        def fmt(r: list[str]) -> str:
            return "  ".join(c.ljust(widths[k]) if k == 0 else c.rjust(widths[k])
                             for k, c in enumerate(r)).rstrip()
        self(fmt(cells[0]))
        self("  ".join("-" * wd for wd in widths))
        for r in cells[1:]:
            self(fmt(r) if r[0] else "")


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def us(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def spread(xs: Sequence[float]) -> str:
    """(max - min) / median of the repeats, as a percentage."""
    return f"{100 * (max(xs) - min(xs)) / statistics.median(xs):.0f} %"


def _fs_type(path: str) -> str:
    """File-system type of ``path`` from /proc/self/mounts ('?' when unknown)."""
    best, kind = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 2 and (real == parts[1] or real.startswith(
                        parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def cpu_idle(seconds: float = 1.0) -> float | None:
    """Fraction of CPU time idle over the next ``seconds`` (from /proc/stat; None elsewhere)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    try:
        i0, t0 = sample()
        time.sleep(seconds)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (i1 - i0) / max(1, t1 - t0)


def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (from /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    """CPU seconds this process and its reaped children have used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def environment() -> str:
    """One line: Python, platform, CPUs, date, pheap version and commit."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip() + ", "
                    break
    except OSError:
        pass
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = os.cpu_count() or 0
    try:
        commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], check=False,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Python {platform.python_version()} ({platform.python_implementation()}) on "
            f"{platform.platform()}, {cpu}{os.cpu_count()} CPUs ({avail} usable), {now}; "
            f"pheap {pheap.__version__}" + (f" at {commit}" if commit else "")
            + f"; heap files on {_fs_type(tempfile.gettempdir())}")


# ---------------------------------------------------------------------------------------------
# Contenders, timing
# ---------------------------------------------------------------------------------------------


class _Tmp:
    """A private temporary directory for heap files; every heap gets a new name in it."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pheap-bench-")
        self.n = 0

    def path(self) -> str:
        self.n += 1
        return os.path.join(self.dir, f"b{self.n}.heap")

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


class Contender:
    """A fresh allocator of one kind: ``malloc``, ``realloc``, ``free`` and a context to run in."""

    def __init__(self, who: str, tmp: _Tmp, size: int = pheap.DEFAULT_SIZE) -> None:
        self.who = who
        self.heap: pheap.Heap | None = None
        self.obj: Any = None
        if who == ALLOC:
            h = self.heap = tmp.heap(size, journal=False)
            a = h._a
            assert not a.journaled
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
            self.malloc, self.realloc, self.free = a.malloc, realloc, free
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


def timed(fn: Callable[..., float], *args: Any) -> float:
    """``fn(*args)`` (which times itself) with the garbage collector off."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        return fn(*args)
    finally:
        if enabled:
            gc.enable()


def calibrate(run: Callable[[int], float], target_s: float) -> int:
    """A loop count for which ``run(n)`` takes about ``target_s`` seconds."""
    n = 64
    while True:
        dt = timed(run, n)
        if dt >= target_s / 8 or n >= 1 << 26:
            return max(16, int(n * target_s / max(dt, 1e-9)))
        n *= 4


# ---------------------------------------------------------------------------------------------
# Section 2: trace replay
# ---------------------------------------------------------------------------------------------

TRACE_CONTENDERS = (ALLOC, ONE_LOCK, ONE_LOCK_NJ, FF, MP)


def _trace_run(who: str, trace: Trace, tmp: _Tmp) -> float:
    """One timed replay of ``trace`` on a fresh ``who``; seconds."""
    c = Contender(who, tmp)
    try:
        with c.held():
            return timed(replay, trace, c.malloc, c.realloc, c.free)
    finally:
        c.close(check=False)


def _trace_hwm(trace: Trace, tmp: _Tmp) -> dict[str, int]:
    """Untimed replays measuring each allocator's high-water mark; checks pheap and first-fit."""
    out: dict[str, int] = {}
    c = Contender(ALLOC, tmp)
    replay(trace, c.malloc, c.realloc, c.free)
    assert c.heap is not None
    peak_brk = c.heap.stats().peak_brk
    out["pheap"] = peak_brk - F.BLOCKS_OFF
    out["pheap whole"] = whole_pheap_bytes(peak_brk)
    c.close()
    c = Contender(FF, tmp)
    replay(trace, c.malloc, c.realloc, c.free)
    out[FF] = c.obj.peak
    c.close()
    c = Contender(MP, tmp)
    mh = c.obj
    peak = [0]

    def sample(x: Any) -> Any:
        peak[0] = max(peak[0], mp_arena_bytes(mh))
        return x
    m_malloc, m_realloc, m_free = c.malloc, c.realloc, c.free
    replay(trace, lambda n: sample(m_malloc(n)), lambda b, n: sample(m_realloc(b, n)),
           lambda b: sample(m_free(b)))
    out[MP] = peak[0]
    c.close()
    return out


def bench_traces(out: Out, repeats: int, tmp: _Tmp) -> None:
    out()
    out("== 2. malloc-lab trace replay ==")
    tdir = os.path.normpath(TRACE_DIR)
    files = sorted(glob.glob(os.path.join(tdir, "*.rep")))
    if not files:
        out("skipped: no traces in ../shared/traces/malloclab (relative to the repository root); "
            "they are not part of the project (copyright) and are read from there when present")
        return
    traces = []
    for f in files:
        try:
            traces.append(parse_trace(f))
        except (OSError, ValueError) as e:
            out(f"skipped {os.path.basename(f)}: {e}")
    out(f"{len(traces)} traces from ../shared/traces/malloclab; median of {repeats} replays each, "
        f"every replay on a fresh allocator ({10 * repeats} for traces under 1,000 ops)")
    util: dict[str, dict[str, float]] = {}
    secs: dict[str, dict[str, float]] = {}
    for t in traces:
        hw = _trace_hwm(t, tmp)
        util[t.name] = {k: t.peak_live / v for k, v in hw.items()}
        secs[t.name] = {}
        reps = repeats if len(t.ops) >= 1000 else 10 * repeats  # tiny traces: noise
        for who in TRACE_CONTENDERS:
            secs[t.name][who] = statistics.median(_trace_run(who, t, tmp) for _ in range(reps))

    out()
    out("Utilization = peak live payload / high-water mark (higher is better).")
    rows: list[list[object]] = []
    for t in traces:
        u = util[t.name]
        rows.append([t.name, len(t.ops), f"{t.peak_live / 1024:.1f}", pct(u["pheap"]),
                     pct(u["pheap whole"]), pct(u[FF]), pct(u[MP]),
                     ratio(u["pheap"] / u[FF]), ratio(u["pheap"] / u[MP])])
    big = [t.name for t in traces if t.name not in TINY_TRACES]
    rows.append([""] * 9)
    for label, names in ((f"average of the {len(big)} larger", big),
                         (f"average of all {len(traces)}", [t.name for t in traces])):
        if not names:
            continue
        avg = {k: statistics.mean(util[n][k] for n in names) for k in util[names[0]]}
        rows.append([label, "", "", pct(avg["pheap"]), pct(avg["pheap whole"]),
                     pct(avg[FF]), pct(avg[MP]),
                     ratio(avg["pheap"] / avg[FF]), ratio(avg["pheap"] / avg[MP])])
    if big:
        mins = {k: min(util[n][k] for n in big) for k in util[big[0]]}
        rows.append([f"minimum of the {len(big)} larger", "", "", pct(mins["pheap"]),
                     pct(mins["pheap whole"]), pct(mins[FF]), pct(mins[MP]), "", ""])
    out.table(["trace", "ops", "peak KiB", "pheap", "pheap whole", FF, MP,
               "pheap/ff", "pheap/mp"], rows)
    out(f"pheap = payload / (peak_brk - BLOCKS_OFF); pheap whole = payload / (BLOCKS_OFF = "
        f"{F.BLOCKS_OFF} B of header and control block + block area + allocation bitmap).")
    out("first-fit = payload / peak brk. mp.heap = payload / peak total arena size, sampled after "
        "every op of an untimed replay (its Python-side tables are not counted).")
    if big:
        avg_p = statistics.mean(util[n]["pheap"] for n in big)
        low = [(n, util[n]["pheap"]) for n in big if util[n]["pheap"] * 100 < UTIL_MIN_TARGET]
        out(f"Target: average >= {UTIL_AVG_TARGET:.0f} % over the {len(big)} larger traces: "
            f"pheap {pct(avg_p)} -> {'met' if avg_p * 100 >= UTIL_AVG_TARGET else 'MISSED'}.")
        out(f"Target: none below {UTIL_MIN_TARGET:.0f} %: "
            + ("met." if not low else "MISSED by " + ", ".join(f"{n} {pct(u)}" for n, u in low)
               + "."))

    out()
    out("Throughput, Kops/s (trace ops per second, higher is better); the ratios use "
        f"{ALLOC}.")
    short = {ALLOC: "pheap Allocator", ONE_LOCK: "Heap 1 lock", ONE_LOCK_NJ: "Heap 1 lock nj",
             FF: FF, MP: MP}
    rows = []
    for t in traces:
        k = {who: len(t.ops) / secs[t.name][who] / 1e3 for who in TRACE_CONTENDERS}
        rows.append([t.name] + [f"{k[w]:.0f}" for w in TRACE_CONTENDERS]
                    + [ratio(k[ALLOC] / k[FF]), ratio(k[ALLOC] / k[MP])])
    total_ops = sum(len(t.ops) for t in traces)
    tot = {w: total_ops / sum(secs[t.name][w] for t in traces) / 1e3 for w in TRACE_CONTENDERS}
    rows.append([""] * (len(TRACE_CONTENDERS) + 3))
    rows.append([f"all {len(traces)}: total ops / total time"]
                + [f"{tot[w]:.0f}" for w in TRACE_CONTENDERS]
                + [ratio(tot[ALLOC] / tot[FF]), ratio(tot[ALLOC] / tot[MP])])
    out.table(["trace"] + [short[w] for w in TRACE_CONTENDERS] + ["pheap/ff", "pheap/mp"], rows)
    out(LEGEND + " nj = no journal.")
    out("Heap growth (pheap files start at 1 MiB) is inside the timed loop, as arena creation is "
        "for mp.heap and bytearray doubling for first-fit.")


# ---------------------------------------------------------------------------------------------
# Section 3: micro-benchmarks
# ---------------------------------------------------------------------------------------------


def _pairs(malloc: Callable[[int], Any], free: Callable[[Any], Any], n: int, size: int) -> float:
    t0 = perf_counter()
    for _ in range(n):
        free(malloc(size))
    return perf_counter() - t0


def _nop(x: Any) -> Any:
    return x


def bench_pairs(out: Out, repeats: int, target_s: float, tmp: _Tmp) -> dict[str, float]:
    out()
    out(f"-- 3a. fixed 24 B malloc+free pair: us per pair (median of {repeats} repeats) --")
    res: dict[str, dict[str, list[float]]] = {"at brk": {}, "from a bin": {}}
    for who in ALL_CONTENDERS:
        for case, per_who in res.items():
            c = Contender(who, tmp)
            malloc, free = c.malloc, c.free
            guard = None
            if case == "from a bin":
                # A free 24 B block with a used block after it: malloc takes it from the free
                # list/bin, free puts it back; neither touches the end of the heap.
                x = malloc(24)
                guard = malloc(24)
                free(x)
            with c.held():
                n = calibrate(lambda k, m=malloc, f=free: _pairs(m, f, k, 24), target_s)
                per_who[who] = [timed(_pairs, malloc, free, n, 24) / n * 1e6
                                  for _ in range(repeats)]
            if guard is not None:
                free(guard)
            c.close()
    rows = []
    for who in ALL_CONTENDERS:
        row: list[object] = [who]
        for case in res:
            xs = res[case][who]
            m = statistics.median(xs)
            row += [us(m), spread(xs), ratio(statistics.median(res[case][MP]) / m),
                    ratio(m / FLOOR_US)]
        rows.append(row)
    out.table(["contender", "at brk", "spread", "mp/this", "/floor", "from a bin", "spread",
               "mp/this", "/floor"], rows)
    loop = statistics.median(_pairs(_nop, _nop, 200_000, 24) / 200_000 * 1e6 for _ in range(3))
    out("at brk: an empty heap (pheap and first-fit carve at brk, free lowers brk again); from a "
        "bin: a free 24 B block lies before a used one. mp/this: multiprocessing.heap's time / "
        f"this one (> 1: faster than mp.heap); /floor: this time / {FLOOR_US} us, the floor in "
        "DESIGN.md (which has mp.heap at 6.0 us). Spread: (max - min) / median of the repeats. "
        f"Loop overhead is included: {loop:.3f} us for the same loop calling two no-op "
        "functions.")
    out(LEGEND)
    return {w: statistics.median(res["from a bin"][w]) for w in ALL_CONTENDERS}


def _churn(malloc: Callable[[int], Any], free: Callable[[Any], Any], slots: list[Any],
           idx: Sequence[int], sizes: Sequence[int]) -> float:
    t0 = perf_counter()
    for i, n in zip(idx, sizes, strict=True):
        free(slots[i])
        slots[i] = malloc(n)
    return perf_counter() - t0


def bench_churn(out: Out, lives: Sequence[int], steps: int, repeats: int, seed: int,
                tmp: _Tmp, budget_s: float) -> None:
    out()
    out(f"-- 3b. random churn, 8-4096 B: us per free+malloc pair (median of {repeats} repeats of "
        f"up to {steps:,} steps, after filling the slots and {steps:,} warm-up steps) --")
    rows = []
    for live in lives:
        rng = random.Random(f"{seed}-churn-{live}")
        fill = [rng.randint(8, 4096) for _ in range(live)]
        total = steps * (repeats + 1)
        idx = [rng.randrange(live) for _ in range(total)]
        sizes = [rng.randint(8, 4096) for _ in range(total)]
        res: dict[str, list[float]] = {}
        n_steps: dict[str, int] = {}
        for who in ALL_CONTENDERS:
            c = Contender(who, tmp)
            malloc, free = c.malloc, c.free
            with c.held():
                slots = [malloc(n) for n in fill]
                warm = timed(_churn, malloc, free, slots, idx[:steps], sizes[:steps])
                # A slow contender (first-fit's search grows with its free list) gets fewer
                # timed steps, so that its repeats fit in ``budget_s``.
                k = min(steps, max(200, int(budget_s / repeats / (warm / steps))))
                xs = []
                for r in range(1, repeats + 1):
                    a, b = r * steps, r * steps + k
                    xs.append(timed(_churn, malloc, free, slots, idx[a:b], sizes[a:b]) / k * 1e6)
                for s in slots:
                    free(s)
            res[who] = xs
            n_steps[who] = k
            c.close()
        mp = statistics.median(res[MP])
        pa = statistics.median(res[ALLOC])
        for who in ALL_CONTENDERS:
            m = statistics.median(res[who])
            rows.append([f"{live:>7,}  {who}", us(m), spread(res[who]), ratio(mp / m),
                         ratio(m / pa), f"{n_steps[who]:,}"])
        rows.append([""] * 6)
    out.table(["live blocks, contender", "us/pair", "spread", "mp/this", "this/pheapA",
               "steps"], rows[:-1])
    out("Each slot holds one block; a step frees a random slot's block and mallocs a random size "
        "into it, so the live set stays constant. mp/this > 1: faster than multiprocessing.heap "
        "(DESIGN.md: 8.8 us). this/pheapA: time relative to the raw pheap Allocator. steps: timed "
        f"steps per repeat (fewer for a contender whose {repeats} repeats would pass "
        f"{budget_s:.0f} s; all contenders see the same sequence of slots and sizes).")


class _ScaleCase:
    """One live-set size of the scaling test: a filled, warmed-up heap and its step sequence."""

    def __init__(self, live: int, steps: int, repeats: int, seed: int, tmp: _Tmp) -> None:
        rng = random.Random(f"{seed}-scale-{live}")
        fill = [rng.randint(8, 256) for _ in range(live)]
        warm = min(live, 200_000)
        total = warm + steps * repeats
        self.idx = [rng.randrange(live) for _ in range(total)]
        self.sizes = [rng.randint(8, 256) for _ in range(total)]
        self.c = Contender(ALLOC, tmp, size=max(pheap.DEFAULT_SIZE, live * 160))
        self.slots = [self.c.malloc(n) for n in fill]
        timed(_churn, self.c.malloc, self.c.free, self.slots, self.idx[:warm], self.sizes[:warm])
        self.fake = list(self.slots)  # for the no-op loop: the harness's own cost
        self.warm, self.steps = warm, steps
        self.xs: list[float] = []
        self.hs: list[float] = []

    def run(self, r: int) -> None:
        """Repeat ``r``: time the allocator, then the same loop with no-op functions."""
        a, b = self.warm + r * self.steps, self.warm + (r + 1) * self.steps
        idx, sizes = self.idx[a:b], self.sizes[a:b]
        self.xs.append(timed(_churn, self.c.malloc, self.c.free, self.slots, idx, sizes)
                       / self.steps * 1e6)
        self.hs.append(timed(_churn, _nop, _nop, self.fake, idx, sizes) / self.steps * 1e6)


def bench_scaling(out: Out, lives: Sequence[int], steps: int, repeats: int, seed: int,
                  tmp: _Tmp) -> None:
    out()
    out(f"-- 3c. pheap Allocator per-op time against the number of live blocks (random 8-256 B; "
        f"median of {repeats} x {steps:,} free+malloc steps) --")
    cases = [_ScaleCase(live, steps, repeats, seed, tmp) for live in lives]
    for r in range(repeats):  # round robin: a burst of other load hits every size alike
        for case in cases:
            case.run(r)
    rows = []
    base = base_net = last = last_net = 0.0
    for live, case in zip(lives, cases, strict=True):
        assert case.c.heap is not None
        cap = case.c.heap.capacity
        case.c.close()
        m, h = statistics.median(case.xs), statistics.median(case.hs)
        if not base:
            base, base_net = m, m - h
        last, last_net = m / base, (m - h) / base_net
        rows.append([f"{live:,}", us(m), spread(case.xs), ratio(last), us(h), us(m - h),
                     ratio(last_net), f"{cap / 2**20:.0f}"])
    del cases
    out.table(["live blocks", "us/pair", "spread", f"t/t({lives[0]:,})", "harness",
               "net", f"net/net({lives[0]:,})", "heap MiB"], rows)
    out("harness: the same loop and slot list with no-op malloc/free (its own cache misses grow "
        "with the list); net = us/pair - harness. Heaps are created at their final size, so no "
        "growth happens in the loop; every size gets min(live, 200,000) warm-up steps; the "
        "repeats go round the sizes in turn.")
    if lives[-1] >= 10**6:
        out(f"Target t(10^6) <= {SCALE_TARGET} x t(10^3): {last:.2f}x -> "
            f"{'met' if last <= SCALE_TARGET else 'MISSED'} (net of the harness: "
            f"{last_net:.2f}x).")
    else:
        out("(10^6 live blocks: skipped in --quick)")


def _hammer(kind: str, path: str, batch: int, seconds: float, barrier: Any, q: Any) -> None:
    """Child: malloc+free 24 B pairs until ``seconds`` pass; send (pid, pairs, elapsed) back."""
    try:
        h = None
        if kind == "pheap":
            h = pheap.open(path, "w")
            malloc, free = h.malloc, h.free
        else:
            mh = mpheap.Heap()
            malloc, free = mh.malloc, mh.free
        for _ in range(1000):
            free(malloc(24))
        gc.disable()
        barrier.wait(30)
        t0 = perf_counter()
        end = t0 + seconds
        pairs = 0
        if batch and h is not None:
            lock = h.lock
            while True:
                with lock():
                    for _ in range(batch):
                        free(malloc(24))
                pairs += batch
                if perf_counter() >= end:
                    break
        else:
            while True:
                for _ in range(100):
                    free(malloc(24))
                pairs += 100
                if perf_counter() >= end:
                    break
        q.put((os.getpid(), pairs, perf_counter() - t0))
        if h is not None:
            h.close()
    except BaseException as e:  # report, then fail the exit status too
        q.put((os.getpid(), -1, repr(e)))
        raise


def _lock_round(kind: str, path: str, procs: int, batch: int,
                seconds: float) -> tuple[float, float]:
    """One round with ``procs`` forked children: (us per pair per process, fairness).

    us per pair per process = the time each ran * procs / the pairs all of them did; fairness =
    fewest pairs of a child / most pairs of a child (flock does not queue waiters fairly).
    """
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    q = ctx.Queue()
    ps = [ctx.Process(target=_hammer, args=(kind, path, batch, seconds, barrier, q))
          for _ in range(procs)]
    for p in ps:
        p.start()
    results = []
    try:
        for _ in ps:
            results.append(q.get(timeout=seconds + 60))
    finally:
        for p in ps:
            p.join(10)
            if p.is_alive():
                p.kill()  # only our own children, through their Process objects
                p.join()
    bad = [r for r in results if r[1] < 0] + [p.exitcode for p in ps if p.exitcode]
    if bad:
        raise RuntimeError(f"lock benchmark child failed: {bad}")
    pairs = [r[1] for r in results]
    seconds_each = statistics.mean(r[2] for r in results)
    return seconds_each * procs / sum(pairs) * 1e6, min(pairs) / max(pairs)


def bench_lock(out: Out, repeats: int, seconds: float, tmp: _Tmp,
               single: dict[str, float]) -> None:
    out()
    out(f"-- 3d. the lock across processes: 24 B malloc+free pairs on one heap file, us per pair "
        f"per process (median of {repeats} rounds of {seconds} s) --")
    path = tmp.path()
    pheap.open(path, "n").close()
    cases = [("pheap Heap, lock per op", "pheap", 0),
             ("pheap Heap, 1 lock per 100 pairs", "pheap", 100),
             ("mp.heap, one heap per process", "mp", 0)]
    res: dict[tuple[str, int], float] = {}
    fair: dict[str, float] = {}
    for label, kind, batch in cases:
        for procs in (1, 2):
            rounds = [_lock_round(kind, path, procs, batch, seconds) for _ in range(repeats)]
            res[(label, procs)] = statistics.median(r[0] for r in rounds)
            if procs == 2:
                fair[label] = statistics.median(r[1] for r in rounds)
    with pheap.open(path, "w") as h:
        h.check()
        used = sum(1 for b in h.walk() if not b.free)
    os.unlink(path)
    mp2 = res[(cases[2][0], 2)]
    rows = []
    for label, _, _ in cases:
        one, two = res[(label, 1)], res[(label, 2)]
        rows.append([label, us(one), us(two), ratio(two / one), f"{fair[label]:.2f}",
                     ratio(two / FLOOR_US), ratio(mp2 / two)])
    out.table(["contender", "1 process", "2 processes", "2p/1p", "2p fairness", "2p/floor",
               "mp(2p)/this"], rows)
    out("Children are forked (multiprocessing, fork) and start together; each opens the heap file "
        "by path and takes its own flock lock. us per pair per process = seconds each ran x "
        "processes / pairs done by all (two processes sharing one lock perfectly would show 2x "
        "the 1-process figure); fairness = fewest / most pairs of the two children (1.00: even "
        "shares; flock does not queue waiters). mp.heap cannot be shared between processes: "
        "each child has its own and nothing is contended, so it is the per-process reference, "
        f"not a shared alternative. Floor: {FLOOR_US} us (DESIGN.md). The heap was checked after "
        f"all rounds: clean, {used} used blocks left.")
    if single:
        out(f"In-process figures from 3a (from a bin): {ALLOC} {us(single[ALLOC])} us, "
            f"{LOCK_OP} {us(single[LOCK_OP])} us, {ONE_LOCK} {us(single[ONE_LOCK])} us.")

# ---------------------------------------------------------------------------------------------
# Section 4: the cost of crash safety
# ---------------------------------------------------------------------------------------------


def _tx_loop(h: Any, n: int, root: int) -> float:
    """n small transactions: allocate a 64 B record, write it, link it, free the previous one."""
    prev = 0
    rec = b"r" * 64
    t0 = perf_counter()
    for _ in range(n):
        with h.transaction():
            off = h.malloc(64)
            h.write(off, rec)
            h.write(root, off.to_bytes(8, "little"))
            if prev:
                h.free(prev)
        prev = off
    return perf_counter() - t0


def _recovery_open(path: str, live: int) -> float:
    """Build a heap with ``live`` blocks, kill a process inside a free, time the reopen."""
    import signal

    from pheap import journal

    with pheap.open(path, "n", size=1 << 20) as h, h.lock():
        offs = [h.malloc(40) for _ in range(live)]
    pid = os.fork()
    if pid == 0:
        try:
            journal.set_crashpoint("write", 9)
            h = pheap.open(path, "w")
            h.free(offs[live // 2])
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    t0 = perf_counter()
    h = pheap.open(path, "w")  # undoes the interrupted free
    dt = perf_counter() - t0
    assert h.info()["recoveries"] == 1
    h.close()
    return dt


def bench_crash_safety(out: Out, repeats: int, target_s: float, tmp: _Tmp,
                       lives: Sequence[int]) -> None:
    out()
    out(f"-- 4. the cost of crash safety: 24 B malloc+free pair and a small transaction, us "
        f"(median of {repeats}) --")
    rows = []
    base: dict[str, float] = {}
    for lock in ("one lock (with heap.lock())", "lock per operation"):
        for journal in (False, True):
            path = tmp.path()
            h = pheap.open(path, "n", size=1 << 22, journal=journal)
            held = h.lock() if lock.startswith("one") else contextlib.nullcontext()
            with held:
                n = calibrate(lambda k, h=h: _pairs(h.malloc, h.free, k, 24), target_s)
                xs = [timed(_pairs, h.malloc, h.free, n, 24) / n * 1e6 for _ in range(repeats)]
            h.check()
            h.close()
            m = statistics.median(xs)
            base.setdefault(lock, m)
            rows.append([lock, "on" if journal else "off", us(m), spread(xs),
                         ratio(m / base[lock]), ratio(m / FLOOR_US)])
    path = tmp.path()
    h = pheap.open(path, "n", size=1 << 22, durability="power")
    with h.lock():
        xs = [timed(_pairs, h.malloc, h.free, 50, 24) / 50 * 1e6 for _ in range(repeats)]
    h.close()
    m = statistics.median(xs)
    rows.append(["one lock, durability='power'", "on + msync", us(m), spread(xs),
                 ratio(m / base["one lock (with heap.lock())"]), ratio(m / FLOOR_US)])
    out.table(["locking", "journal", "us/pair", "spread", "x journal off", "/floor"], rows)
    out("Crash-safe = journal on (the default): every operation is atomic against SIGKILL. "
        "'power' also msyncs before and after every commit word (two per operation).")
    path = tmp.path()
    h = pheap.open(path, "n", size=1 << 22)
    root = h.calloc(1, 8)
    _tx_loop(h, 10, root)
    n = calibrate(lambda k, h=h: _tx_loop(h, k, root), target_s)
    xs = [timed(_tx_loop, h, n, root) / n * 1e6 for _ in range(repeats)]
    h.check()
    h.close()
    out(f"small transaction (malloc 64 B, write it, write an 8 B link, free the previous "
        f"record, commit): {us(statistics.median(xs))} us each, spread {spread(xs)}")
    rows = []
    for live in lives:
        ts = [_recovery_open(tmp.path(), live) for _ in range(3)]
        rows.append([f"{live:,}", f"{statistics.median(ts) * 1e3:.2f}"])
    out.table(["live blocks", "open + recovery, ms"], rows)
    out("A process was SIGKILLed inside a free; opening the heap undoes it from the journal. "
        "The time does not grow with the heap: recovery is O(journal), not O(heap).")



# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="under a minute: fewer repeats, smaller sizes, no 10**6 run")
    ap.add_argument("--seed", type=int, default=1, help="seed for every random size and index")
    ap.add_argument("-o", "--output", metavar="FILE", help="also write the output to FILE")
    args = ap.parse_args(argv)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            return _run(args, Out(fh))
    return _run(args, Out())


def _run(args: argparse.Namespace, out: Out) -> int:
    tmp = _Tmp()
    t0 = perf_counter()
    busy0, own0 = cpu_busy_seconds(), own_cpu_seconds()
    try:
        cmd = "python3 tools/bench_alloc.py" + (" --quick" if args.quick else "") + \
            f" --seed {args.seed}"
        out(f"pheap allocator benchmark: {cmd}")
        out()
        out("== 1. environment ==")
        out(environment())
        idle = cpu_idle()
        if idle is not None:
            out(f"CPU idle in the second before the start: {100 * idle:.0f} %"
                + ("" if idle >= 0.9 else " -- other work is running: timings will be noisy"))
        if args.quick:
            bench_traces(out, 2, tmp)
            out()
            out("== 3. micro-benchmarks ==")
            single = bench_pairs(out, 5, 0.02, tmp)
            bench_churn(out, (10**3, 10**4), 2000, 5, args.seed, tmp, 2.0)
            bench_scaling(out, (10**3, 10**4, 10**5), 10_000, 5, args.seed, tmp)
            bench_lock(out, 5, 0.1, tmp, single)
            bench_crash_safety(out, 5, 0.02, tmp, (10**3, 10**4))
        else:
            bench_traces(out, 5, tmp)
            out()
            out("== 3. micro-benchmarks ==")
            single = bench_pairs(out, 7, 0.2, tmp)
            bench_churn(out, (10**3, 10**4, 10**5), 20_000, 7, args.seed, tmp, 15.0)
            bench_scaling(out, (10**3, 10**4, 10**5, 10**6), 50_000, 7, args.seed, tmp)
            bench_lock(out, 7, 0.5, tmp, single)
            bench_crash_safety(out, 7, 0.2, tmp, (10**3, 10**5))
        out()
        wall = perf_counter() - t0
        busy = cpu_busy_seconds()
        other = ""
        if busy is not None and busy0 is not None:
            others = max(0.0, busy - busy0 - (own_cpu_seconds() - own0))
            other = (f"; other processes kept the CPUs busy for {others:.0f} CPU-seconds meanwhile "
                     f"(of {wall * (os.cpu_count() or 1):.0f} available)")
        out(f"total time {wall:.0f} s{other}")
    finally:
        tmp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
