"""``pheap demo``: worker processes fill one persistent heap at once; a fresh process reads it.

What it shows: a heap file that several processes allocate in concurrently (each through its own
``pheap.open``), whose contents -- found from the root -- survive every process closing it, and
that a new interpreter opens in O(1) and verifies record by record.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

from .heap import open as open_heap

SLOT = struct.Struct("<QQ")  # per worker: offset of its index array, record count


def _record(worker: int, i: int) -> bytes:
    return f"worker {worker} record {i}: {'x' * (i % 97)}".encode()


def _worker(path: str, worker: int, records: int) -> None:
    with open_heap(path, "w") as h:
        index = h.malloc(8 * 64)
        cap = 64
        for i in range(records):
            data = _record(worker, i)
            with h.lock():  # one lock acquisition for the three operations
                off = h.malloc(len(data))
                h.write(off, data)
                if i == cap:
                    cap *= 2
                    index = h.realloc(index, 8 * cap)
                h.write(index + 8 * i, struct.pack("<Q", off))
                if i % 3 == 2:  # churn: drop every third record and allocate it again
                    h.free(off)
                    off = h.malloc(len(data))
                    h.write(off, data)
                    h.write(index + 8 * i, struct.pack("<Q", off))
        with h.lock():
            h.write(h.root_offset + SLOT.size * worker, SLOT.pack(index, records))


VERIFY = r"""
import struct, sys, time
import pheap
path, workers = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
with pheap.open(path, "r") as h:
    opened = time.perf_counter() - t0
    n = 0
    for w in range(workers):
        index, count = struct.unpack("<QQ", h.read(h.root_offset + 16 * w, 16))
        for i in range(count):
            (off,) = struct.unpack("<Q", h.read(index + 8 * i, 8))
            want = f"worker {w} record {i}: {'x' * (i % 97)}".encode()
            got = h.read(off, len(want))
            if got != want:
                sys.exit(f"record {w}/{i} at {off}: {got!r} != {want!r}")
            n += 1
    t1 = time.perf_counter()
    h.check()
    st = h.stats()
print(f"  opened in {opened * 1e3:.2f} ms, verified {n} records in {t1 - t0:.2f} s, "
      f"check() clean in {time.perf_counter() - t1:.2f} s")
print(f"  {st.used_blocks} live blocks, {st.payload_bytes} payload bytes, "
      f"capacity {st.capacity}, fragmentation {st.fragmentation:.1%}")
"""


def run_demo(workers: int = 4, records: int = 20000, path: str | None = None) -> int:
    """Run the demo; return 0 on success, 1 when a worker or the verification failed (the heap
    file is kept then, for ``pheap check``). Without ``path`` the heap lives in a temporary
    directory, removed after a success."""
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="pheap-demo-")
        path = os.path.join(tmp, "demo.heap")
    print(f"pheap demo: {workers} processes x {records} records into {path}")
    with open_heap(path, "n") as h:
        h.root_offset = h.calloc(workers, SLOT.size)  # worker w's index goes in slot w
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(path, w, records)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        print(f"  workers failed with exit codes {failed}; the heap is kept at {path}",
              file=sys.stderr)
        return 1
    total = workers * records
    print(f"  {workers} workers wrote {total} records concurrently in {elapsed:.2f} s "
          f"({total / elapsed:,.0f} records/s, {total * 4 // 3 / elapsed:,.0f} allocations/s)")
    print("  every process has closed the heap; a new interpreter opens it and checks:")
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    rc = subprocess.call([sys.executable, "-c", VERIFY, path, str(workers)], env=env)
    if rc != 0:
        print(f"  verification FAILED; the heap is kept at {path}", file=sys.stderr)
        return 1
    if tmp is None:
        print(f"  ok: the heap file persists at {path}; look inside with `pheap stats {path}`, "
              f"`pheap walk {path}` or `pheap map {path} -o heap.svg`")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        print("  ok")
    return 0
