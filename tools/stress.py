"""Multi-process stress: P processes run random malloc/realloc/free on one heap at once.

Every block is filled with a pattern that names its owner (worker id, block serial), so an
overlap -- two live blocks sharing a byte -- corrupts a pattern and is caught when the block is
verified (on every realloc and free, and at the end). At the end each worker reports its live
blocks; the parent checks them against the allocator's own walk (every reported block is a used
block there, and no two workers report the same one), runs ``check()``, and exits non-zero on any
failure.

Small, in CI (tests/test_sharing.py)::

    python3 tools/stress.py -p 4 -n 2000 --seed 1

Large, by hand::

    python3 tools/stress.py -p 8 -n 100000 --seed 1
    python3 tools/stress.py -p 8 -n 100000 --seed 2 --kind memfd --batch 50

``--objects``: the same with shared objects, each worker opening the heap file by its path as an
unrelated process would. Every worker sets its own keys of one shared dict (and reads the
others'), appends to one shared list, adds to one counter and puts to and gets from one queue;
afterwards the counter is exact, each worker's keys hold its last values, the list holds each
append exactly once, every item put was gotten exactly once (or is still queued), and
``check()`` is clean::

    python3 tools/stress.py --objects -p 4 -n 2000 --seed 1      # CI
    python3 tools/stress.py --objects -p 8 -n 50000 --seed 1     # by hand
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pheap  # noqa: E402

HEAD = struct.Struct("<IIQ")  # worker, serial, length: the first 16 bytes of every block >= 16


def pattern(worker: int, serial: int, n: int) -> bytes:
    """The bytes block (worker, serial) holds: a header naming it, then a repeating byte."""
    head = HEAD.pack(worker, serial, n)
    fill = bytes([(worker * 31 + serial) % 251 + 1]) * n
    return (head + fill[len(head):])[:n] if n >= len(head) else fill


def worker_main(heap: pheap.Heap, worker: int, ops: int, seed: int, batch: int, conn) -> None:
    rng = random.Random(seed * 1000 + worker)
    live: dict[int, tuple[int, int]] = {}  # serial -> (offset, length)
    serial = 0
    errors: list[str] = []
    done = 0

    def verify(s: int, off: int, n: int, what: str) -> None:
        got = heap.read(off, n)
        if got != pattern(worker, s, n):
            errors.append(f"worker {worker}: block {s} at {off} ({n} B) damaged before {what}")

    while done < ops:
        with heap.lock():
            for _ in range(min(batch, ops - done)):
                done += 1
                r = rng.random()
                if live and r < 0.4:
                    s = rng.choice(list(live))
                    off, n = live.pop(s)
                    verify(s, off, n, "free")
                    heap.free(off)
                elif live and r < 0.55:
                    s = rng.choice(list(live))
                    off, n = live[s]
                    verify(s, off, n, "realloc")
                    n2 = rng.choice((rng.randint(1, 256), rng.randint(1, 8192)))
                    off = heap.realloc(off, n2)
                    keep = min(n, n2)
                    if heap.read(off, keep) != pattern(worker, s, n)[:keep]:
                        errors.append(f"worker {worker}: realloc of block {s} lost its bytes")
                    heap.write(off, pattern(worker, s, n2))
                    live[s] = (off, n2)
                else:
                    n = rng.choice((rng.randint(1, 64), rng.randint(1, 1024),
                                    rng.randint(1, 16384), rng.randint(1, 200_000)
                                    if rng.random() < 0.02 else 32))
                    off = heap.malloc(n)
                    serial += 1
                    heap.write(off, pattern(worker, serial, n))
                    live[serial] = (off, n)
            if errors:
                break
    for s, (off, n) in live.items():
        verify(s, off, n, "the end")
    conn.send((errors, sorted(off for off, _ in live.values())))
    conn.close()


def run(processes: int, ops: int, seed: int, kind: str, batch: int, path: str | None,
        quiet: bool = False) -> int:
    tmp = None
    if kind == "file":
        if path is None:
            tmp = tempfile.mkdtemp(prefix="pheap-stress-")
            path = os.path.join(tmp, "stress.heap")
        heap = pheap.open(path, "n", size=1 << 20)
    elif kind == "memfd":
        heap = pheap.memfd(1 << 20)
    else:
        heap = pheap.anonymous(256 << 20)
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    pipes, procs = [], []
    for w in range(processes):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=worker_main, args=(heap, w, ops, seed, batch, send))
        p.start()
        send.close()
        pipes.append(recv)
        procs.append(p)
    results = []
    for recv in pipes:
        try:
            results.append(recv.recv())
        except EOFError:
            results.append((["worker died without reporting"], []))
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    failures = [e for errs, _ in results for e in errs]
    failures += [f"worker {i} exit code {p.exitcode}" for i, p in enumerate(procs) if p.exitcode]
    reported = [off for _, offs in results for off in offs]
    used = {b.offset for b in heap.walk(slots=True) if not b.free and b.kind != "run"}
    if len(set(reported)) != len(reported):
        failures.append("two workers report the same live block")
    missing = [off for off in reported if off not in used]
    if missing:
        failures.append(f"{len(missing)} reported live blocks are not used blocks in the walk, "
                        f"first {missing[0]}")
    try:
        heap.check()
    except pheap.CorruptHeapError as e:
        failures.append(f"check(): {e}")
    st = heap.stats()
    total = processes * ops
    if not quiet or failures:
        print(f"stress: {processes} processes x {ops} ops ({kind} heap, batch {batch}, seed "
              f"{seed}): {elapsed:.2f} s, {total / elapsed:,.0f} ops/s overall; "
              f"{len(reported)} live blocks, capacity {st.capacity}, generation {st.generation}, "
              f"check clean: {not any(f.startswith('check') for f in failures)}")
    heap.close()
    if tmp is not None:
        os.unlink(path)  # type: ignore[arg-type]
        os.rmdir(tmp)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


def objects_worker(path: str, worker: int, ops: int, seed: int, conn) -> None:
    """One worker of --objects: a process of its own that opens the file by path."""
    errors: list[str] = []
    got: list[int] = []
    last: dict[str, int] = {}
    adds = appended = 0
    try:
        rng = random.Random(f"{seed}:{worker}")
        with pheap.open(path, "w") as h:
            root = h.root
            d, lst, ctr, q = root["d"], root["l"], root["c"], root["q"]
            for i in range(ops):
                r = rng.random()
                if r < 0.35:
                    k = f"w{worker}:{rng.randrange(50)}"
                    d[k] = i
                    last[k] = i
                elif r < 0.50:
                    k = f"w{rng.randrange(64)}:{rng.randrange(50)}"
                    v = d.get(k)
                    if v is not None and not isinstance(v, int):
                        errors.append(f"d[{k!r}] read {v!r}")
                elif r < 0.65:
                    lst.append(worker * 1_000_000_000 + i)
                    appended += 1
                elif r < 0.78:
                    n = rng.randint(1, 5)
                    ctr.add(n)
                    adds += n
                elif r < 0.90:
                    q.put(worker * 1_000_000_000 + i)
                else:
                    try:
                        got.append(q.get_nowait())
                    except Exception:  # queue.Empty
                        pass
    except Exception as e:  # the parent reports it
        errors.append(f"{type(e).__name__}: {e}")
    conn.send((errors, got, last, adds, appended))
    conn.close()


def run_objects(processes: int, ops: int, seed: int, quiet: bool = False) -> int:
    tmp = tempfile.mkdtemp(prefix="pheap-stress-")
    path = os.path.join(tmp, "objects.heap")
    with pheap.open(path, "n", size=1 << 20) as h:
        h.root.update(d=h.dict(), l=h.list(), c=h.counter(), q=h.queue())
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    pipes, procs = [], []
    for w in range(processes):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=objects_worker, args=(path, w, ops, seed, send))
        p.start()
        send.close()
        pipes.append(recv)
        procs.append(p)
    results = []
    for recv in pipes:
        try:
            results.append(recv.recv())
        except EOFError:
            results.append((["worker died without reporting"], [], {}, 0, 0))
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    failures = [e for r in results for e in r[0]]
    failures += [f"worker {i} exit code {p.exitcode}" for i, p in enumerate(procs) if p.exitcode]
    with pheap.open(path, "w") as h:
        root = h.root
        d, items, total = root["d"].copy(), root["l"].copy(), root["c"].value
        queued = []
        while root["q"].qsize():
            queued.append(root["q"].get_nowait())
        adds = sum(r[3] for r in results)
        if total != adds:
            failures.append(f"counter {total}, but the workers added {adds}")
        for _, _, last, _, _ in results:
            for k, v in last.items():
                if d.get(k) != v:
                    failures.append(f"d[{k!r}] is {d.get(k)!r}, its worker last set {v}")
                    break
        if len(items) != len(set(items)) or len(items) != sum(r[4] for r in results):
            failures.append(f"the list holds {len(items)} items ({len(set(items))} distinct), "
                            f"the workers appended {sum(r[4] for r in results)}")
        gotten = [x for r in results for x in r[1]] + queued
        if len(gotten) != len(set(gotten)):
            failures.append("an item was gotten from the queue twice")
        report = h.check()
        if report is not None:
            failures.append(f"check(): {report!r}")
        st = h.stats()
    total_ops = processes * ops
    if not quiet or failures:
        print(f"stress --objects: {processes} processes x {ops} ops (file heap opened by path in "
              f"each, seed {seed}): {elapsed:.2f} s, {total_ops / elapsed:,.0f} ops/s overall; "
              f"counter {total}, {len(d)} keys, {len(items)} list items, {len(gotten)} queue "
              f"items gotten or left, capacity {st.capacity}; check clean: "
              f"{not any(f.startswith('check') for f in failures)}")
    os.unlink(path)
    os.rmdir(tmp)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", "--processes", type=int, default=4)
    ap.add_argument("-n", "--ops", type=int, default=2000, help="operations per process")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kind", choices=("file", "memfd", "anon"), default="file")
    ap.add_argument("--batch", type=int, default=1,
                    help="operations per lock acquisition (1 = lock per operation)")
    ap.add_argument("--path", default=None, help="heap file (default: a temporary one)")
    ap.add_argument("--objects", action="store_true",
                    help="shared objects instead of raw blocks (see the module docstring)")
    args = ap.parse_args(argv)
    if args.objects:
        return run_objects(args.processes, args.ops, args.seed)
    return run(args.processes, args.ops, args.seed, args.kind, args.batch, args.path)


if __name__ == "__main__":
    sys.exit(main())
