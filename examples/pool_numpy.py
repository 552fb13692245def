"""A spawn process pool computes on large numpy arrays that live in a memfd heap: the workers get
a handle of a few hundred bytes and map the same memory, instead of receiving the arrays pickled.

    python3 examples/pool_numpy.py [--mb 50] [--workers 2]

The arrays are made with ``h.ndarray`` and put in a shared dict. A task's argument is that dict
(its handle pickles as the heap -- a memfd travels as a descriptor, even to ``spawn`` workers --
plus an offset); in the worker ``arrays["a"]`` is a numpy array over the same pages, and the
worker writes its slice of the result straight into the heap. For comparison, plain
``pool.map`` with the slices as arguments pickles every input to the workers and every result
back. Both are timed (best of 3); the results are checked against each other and against the
parent's own computation, and the example exits 1 if they differ.
"""

import argparse
import multiprocessing
import sys
import time

import numpy as np

import pheap


def hypot_in_heap(task):
    arrays, lo, hi = task  # arrays: a pheap dict handle, re-attached here
    a, b, out = arrays["a"], arrays["b"], arrays["out"]  # views of the heap, not copies
    np.hypot(a[lo:hi], b[lo:hi], out=out[lo:hi])
    return float(out[lo:hi].sum())


def hypot_of_copies(task):
    a, b = task  # copies, unpickled from the task
    return np.hypot(a, b)  # and pickled back


def best(fn, repeat: int = 3) -> tuple[float, object]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=50, help="size of each input array, MB")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    n = int(args.mb * 1e6) // 8
    h = pheap.memfd(3 * n * 8 * 103 // 100 + (1 << 20))  # room for a, b and out up front
    rng = np.random.default_rng(7)
    arrays = h.dict(a=h.ndarray(n), b=h.ndarray(n), out=h.ndarray(n))
    arrays["a"][:] = rng.standard_normal(n)
    arrays["b"][:] = rng.standard_normal(n)
    a, b = arrays["a"], arrays["b"]
    cuts = np.linspace(0, n, 4 * args.workers + 1).astype(int)
    chunks = list(zip(cuts[:-1], cuts[1:], strict=True))
    print(f"2 arrays of {n:,} float64 ({n * 8 / 1e6:.0f} MB each) in a memfd heap; "
          f"{len(chunks)} tasks for a spawn pool of {args.workers} workers")
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pool.map(abs, range(args.workers))  # start the workers before the clocks
        t_heap, sums = best(lambda: pool.map(hypot_in_heap, [(arrays, lo, hi)
                                                             for lo, hi in chunks]))
        t_pickle, parts = best(lambda: pool.map(hypot_of_copies, [(a[lo:hi], b[lo:hi])
                                                                  for lo, hi in chunks]))
    print(f"  handles (zero-copy):   {t_heap:6.3f} s")
    print(f"  pickled arrays:        {t_pickle:6.3f} s   ({t_pickle / t_heap:.1f}x as long; "
          f"{2 * n * 8 / 1e6:.0f} MB sent and {n * 8 / 1e6:.0f} MB sent back each time)")
    out, want = arrays["out"], np.hypot(a, b)
    checks = [(np.array_equal(out, want), f"the heap's result equals the parent's np.hypot "
               f"for all {n:,} elements"),
              (np.array_equal(np.concatenate(parts), want), "the pickled way's result too"),
              (np.isclose(sum(sums), want.sum()), "the workers' partial sums add up")]
    for ok, text in checks:
        print(f"{'ok' if ok else 'WRONG'}: {text}")
    h.check()
    print("heap check: ok")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
