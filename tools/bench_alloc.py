"""Allocator benchmark: pheap against ``multiprocessing.heap`` and a first-fit free list, one run.

Every contender runs in the same process, on the same inputs, in the same run, so the ratios hold
even where the absolute figures belong to the machine. Commands (from the repository root)::

    python3 tools/bench_alloc.py --quick          # smoke run, under a minute
    python3 tools/bench_alloc.py                  # full run, a few minutes
    python3 tools/bench_alloc.py --seed 1 -o alloc.txt   # also into a file (docs/benchmarks.md
                                                         # comes from tools/bench_all.py)

``--seed N`` (default 1) fixes every random size and index; ``-o FILE`` also writes the output to
FILE. The output is: an environment line; the malloc-lab trace replay (utilization and Kops/s);
micro-benchmarks (24 B pairs, with a flock pair and an lseek beside them as the system-call floor;
random churn at three live-set sizes, per-op time against the number of live blocks, the lock
with two processes); the cost of crash safety. Each figure is a median of several repeats. The
code is the package ``tools/benchkit`` (``alloc_suites`` holds the sections); this file is its
command line.

Contenders
    ``pheap Allocator``  the allocator behind a file heap (its core's malloc/realloc/free, through
                         benchkit/internals.py) called directly inside one ``with heap.lock():``:
                         the algorithm and its journal, no lock system call per op (a small slot
                         is one plain word store; any other op one journaled operation; page
                         releases right after the commit, as always).
    ``pheap Heap``       the public API on a file heap: ``lock/op`` takes the flock lock in every
                         call; ``1 lock`` runs inside one ``with heap.lock():`` (re-entrant calls
                         do no lock work). Every heap is journaled: every operation is atomic
                         against SIGKILL; there is no unjournaled mode.
    ``mp.heap``          CPython's ``multiprocessing.heap.Heap`` (what ``multiprocessing.Value``
                         and ``Array`` allocate from): per process, never shared; free-block tables
                         in Python dicts and a sorted list, blocks in mmap arenas. ``malloc(n)``
                         returns ``(arena, start, stop)``; realloc here is malloc + copy + free.
    ``first-fit``        ``FirstFit`` (benchkit/firstfit.py), the textbook explicit free list
                         over a bytearray.

Utilization (trace replay) = peak live payload / high-water mark. Peak live payload is a property
of the trace: the largest sum, over time, of the requested bytes of the live blocks. High-water
marks:

- pheap: ``peak_brk - BLOCKS_OFF``, the block area at its largest (header word ``peak_brk``, read
  with ``heap.stats()``). The fixed header + control block (``BLOCKS_OFF``, about 16 KiB), the
  page map (1/4096 of the mapping) and the allocation bitmap (1/64) come on top; the ``whole``
  column counts them too (``BLOCKS_OFF`` + block area + the metadata a mapping of that size
  needs).
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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this pheap
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchkit

from benchkit import alloc_suites  # noqa: E402
from benchkit.report import Out  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="under a minute: fewer repeats, smaller sizes, no 10**6 run")
    ap.add_argument("--seed", type=int, default=1, help="seed for every random size and index")
    ap.add_argument("-o", "--output", metavar="FILE", help="also write the output to FILE")
    args = ap.parse_args(argv)
    cfg = alloc_suites.QUICK if args.quick else alloc_suites.FULL
    cmd = "python3 tools/bench_alloc.py" + (" --quick" if args.quick else "") + \
        f" --seed {args.seed}"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            return alloc_suites.run(Out(fh), cfg, args.seed, cmd)
    return alloc_suites.run(Out(), cfg, args.seed, cmd)


if __name__ == "__main__":
    sys.exit(main())
