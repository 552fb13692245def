"""Forked workers fill one shared heap; the parent reads their results without any pickling.

    python3 examples/fork_workers.py

A memfd heap is shared with every child made by ``os.fork`` (here through multiprocessing's fork
start method) and may grow while they use it; each worker writes its results straight into heap
blocks and publishes one offset. The parent reads the bytes in place.
"""

import multiprocessing
import struct

import pheap


def work(heap: pheap.Heap, worker: int, slots: int, n: int) -> None:
    values = [(worker * 1_000_003 + i * i) % 65_521 for i in range(n)]
    with heap.lock():  # one lock acquisition for the allocation, write and publication
        off = heap.malloc(8 * n)
        heap.write(off, struct.pack(f"<{n}Q", *values))
        heap.write(slots + 16 * worker, struct.pack("<QQ", off, n))


def main(workers: int = 4, n: int = 50_000) -> None:
    heap = pheap.memfd(64 * 1024)  # starts small; the workers' allocations grow it
    slots = heap.calloc(workers, 16)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=work, args=(heap, w, slots, n)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    total = 0
    for w in range(workers):
        off, count = struct.unpack("<QQ", heap.read(slots + 16 * w, 16))
        total += sum(struct.unpack(f"<{count}Q", heap.read(off, 8 * count)))
    heap.check()
    print(f"{workers} workers wrote {workers * n} numbers; sum {total}; "
          f"heap grew to {heap.capacity} bytes")


if __name__ == "__main__":
    main()
