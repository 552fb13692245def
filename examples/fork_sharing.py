"""Forked workers fill a shared numpy array, a shared dict and a counter; the parent reads the
results in place, with nothing pickled and nothing sent back.

    python3 examples/fork_sharing.py [WORKERS]

The parent makes an anonymous shared heap (``pheap.anonymous``: a ``MAP_SHARED`` region that
``fork`` shares; no file) and puts an int64 matrix (``h.ndarray``), a dict and a counter in it.
Each forked worker squares the flat indexes of its band of rows into the matrix, files a report
(a dict) under its name in the shared dict, and adds its cell count to the counter. The workers
return nothing: the parent finds everything in the heap, checks it against a formula, and exits
1 if anything is wrong.
"""

import multiprocessing
import os
import sys
import time

import numpy as np

import pheap

ROWS, COLS = 1000, 1000


def work(grid, reports, cells, w: int, workers: int) -> None:
    lo, hi = ROWS * w // workers, ROWS * (w + 1) // workers
    band = grid[lo:hi]  # a view of heap memory, the same pages the parent maps
    band[:] = np.arange(lo * COLS, hi * COLS, dtype="int64").reshape(hi - lo, COLS) ** 2
    reports[f"worker {w}"] = {"pid": os.getpid(), "rows": [lo, hi], "sum": int(band.sum())}
    cells.add(band.size)


def main() -> int:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    h = pheap.anonymous(16 << 20)  # a fixed size: room for the matrix and the rest
    grid = h.ndarray((ROWS, COLS), "int64")  # zeroed, in the heap
    reports, cells = h.dict(), h.counter()
    print(f"an anonymous heap of {h.capacity >> 20} MiB holds a {ROWS}x{COLS} int64 matrix "
          f"({grid.nbytes / 2**20:.1f} MiB), a dict and a counter")
    t = time.perf_counter()
    ctx = multiprocessing.get_context("fork")  # the children inherit the mapping: no pickling
    procs = [ctx.Process(target=work, args=(grid, reports, cells, w, workers))
             for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    print(f"{workers} forked workers done in {time.perf_counter() - t:.2f} s; in the heap now "
          "(nothing was pickled or sent back):")
    for name, rep in sorted(reports.items()):
        print(f"  {name} (pid {rep['pid']}): rows {rep['rows'][0]}-{rep['rows'][1] - 1}, "
              f"sum of squares {rep['sum']}")
    n = ROWS * COLS
    expect = (n - 1) * n * (2 * n - 1) // 6  # sum of i*i for i < n
    ok = [
        (all(p.exitcode == 0 for p in procs), "every worker exited 0"),
        (cells.value == n, f"counter: {cells.value} cells written, of {n}"),
        (len({r["pid"] for r in reports.values()} - {os.getpid()}) == workers,
         f"dict: {len(reports)} reports from {workers} other processes"),
        (sum(r["sum"] for r in reports.values()) == expect, "the reports add up to the formula"),
        (int(grid.sum()) == expect and grid[-1, -1] == (n - 1) ** 2,
         f"matrix: sum {int(grid.sum())} == sum of i*i for i < {n}"),
    ]
    for good, text in ok:
        print(f"{'ok' if good else 'WRONG'}: {text}")
    h.check()
    print("heap check: ok")
    return 0 if all(good for good, _ in ok) else 1


if __name__ == "__main__":
    sys.exit(main())
