"""Random SIGKILL torture: committed transactions survive, uncommitted ones vanish, nothing leaks.

A worker process runs a seeded random workload of transactions on a heap file. The heap holds a
table of SLOTS slot words (the root block); each transaction frees, allocates, reallocates and
rewrites records for a few slots and updates their slot words. Before committing it sends the
parent what the transaction changes ("intent"); after committing, its number ("committed"). The
parent kills the worker with SIGKILL at a random moment (sometimes while it is still recovering
the previous crash), reopens the heap (which undoes any half-done transaction), runs check(),
and verifies:

* every slot holds exactly what the committed transactions put there, record bytes included;
* the one transaction in doubt (intent sent, kill before "committed" arrived) is either wholly
  present or wholly absent;
* no block is leaked: the used blocks are exactly the table, the transaction log and the records
  the slots point to.

Small, in CI (tests/test_torture.py)::

    python3 tools/torture.py -n 30 --seed 1

Large, by hand (the figures in the issue notes)::

    python3 tools/torture.py -n 10000 --seed 1
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import signal
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pheap  # noqa: E402

SLOTS = 64
REC = struct.Struct("<IIQ")  # slot, tx number, length


def record(slot: int, tx: int, n: int) -> bytes:
    """The bytes of the record that transaction ``tx`` writes for ``slot`` (``n`` >= 16)."""
    body = bytes([(slot * 7 + tx) % 251 + 1]) * (n - REC.size)
    return REC.pack(slot, tx, n) + body


def worker(path: str, seed: int, first_tx: int, wfd: int) -> None:
    """Run transactions forever, reporting each over ``wfd``; the parent kills us."""
    rng = random.Random(seed)
    out = os.fdopen(wfd, "wb", buffering=0)
    h = pheap.open(path, "w")  # recovers the previous crash, if any
    table = h.root_offset
    tx = first_tx
    while True:
        tx += 1
        changes = {}
        for slot in rng.sample(range(SLOTS), rng.randint(1, 6)):
            changes[slot] = rng.choice((0, rng.randint(16, 200), rng.randint(16, 5000),
                                        rng.randint(16, 300_000) if rng.random() < 0.05 else 64))
        out.write(pickle.dumps(("intent", tx, changes)))
        for attempt in range(8):
            try:
                run_tx(h, rng, table, tx, changes)
                break
            except pheap.TransactionTooLargeError:
                # Rolled back; the heap doubles the log for the next transaction: retry.
                if attempt == 7:
                    raise
        out.write(pickle.dumps(("committed", tx, None)))


def run_tx(h: pheap.Heap, rng: random.Random, table: int, tx: int,
           changes: dict[int, int]) -> None:
    with h.transaction():
        for slot, n in changes.items():
            (off,) = struct.unpack("<Q", h.read(table + 8 * slot, 8))
            if n == 0:
                h.free(off)
                new = 0
            elif off and rng.random() < 0.5:
                new = h.realloc(off, n)
                h.write(new, record(slot, tx, n))
            else:
                h.free(off)
                new = h.malloc(n)
                h.write(new, record(slot, tx, n))
            h.write(table + 8 * slot, struct.pack("<Q", new))


def read_messages(rfd: int) -> list[tuple]:
    data = b""
    while True:
        chunk = os.read(rfd, 1 << 16)
        if not chunk:
            break
        data += chunk
    msgs = []
    up = pickle.Unpickler(__import__("io").BytesIO(data))
    while True:
        try:
            msgs.append(up.load())
        except (EOFError, pickle.UnpicklingError):
            break  # a message cut short by the kill
    return msgs


def verify(path: str, model: dict[int, tuple[int, int]],
           doubt: tuple[int, dict[int, int]] | None) -> tuple[dict[int, tuple[int, int]], str]:
    """Check the heap against the model; return the model with the doubtful tx resolved."""
    with pheap.open(path, "w") as h:  # runs recovery
        h.check()
        table = h.root_offset
        actual = {}
        offsets = {}
        for slot in range(SLOTS):
            (off,) = struct.unpack("<Q", h.read(table + 8 * slot, 8))
            if off:
                s, tx, n = REC.unpack(h.read(off, REC.size))
                if s != slot or h.read(off, n) != record(slot, tx, n):
                    raise AssertionError(f"slot {slot}: record at {off} damaged")
                actual[slot] = (tx, n)
                offsets[slot] = off
        after = dict(model)
        if doubt is not None:
            tx, changes = doubt
            for slot, n in changes.items():
                if n:
                    after[slot] = (tx, n)
                else:
                    after.pop(slot, None)
        if actual == model:
            outcome = "absent"
        elif doubt is not None and actual == after:
            outcome = "present"
        else:
            diff = {s: (model.get(s), actual.get(s)) for s in range(SLOTS)
                    if model.get(s) != actual.get(s)}
            raise AssertionError(f"heap differs from the committed state: {diff}")
        used = {b.offset for b in h.walk() if not b.free}
        expected = set(offsets.values()) | {table}
        txlog = h._a._w[pheap.format.H_TXLOG]
        if txlog:
            expected.add(txlog)
        if used != expected:
            raise AssertionError(f"{len(used - expected)} leaked blocks, "
                                 f"{len(expected - used)} missing")
    return actual, outcome


def run(kills: int, seed: int, max_delay: float, quiet: bool = False) -> int:
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="pheap-torture-")
    path = os.path.join(tmp, "torture.heap")
    with pheap.open(path, "n") as h:
        h.root_offset = h.calloc(SLOTS, 8)
    model: dict[int, tuple[int, int]] = {}
    committed = in_doubt = present = recoveries = 0
    last_tx = 0
    t0 = time.perf_counter()
    for k in range(kills):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                worker(path, seed * 1_000_003 + k, last_tx, w)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        time.sleep(rng.random() * max_delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        msgs = read_messages(r)
        os.close(r)
        if os.waitstatus_to_exitcode(status) != -signal.SIGKILL:
            print(f"FAIL: worker exited with {status} before the kill", file=sys.stderr)
            return 1
        doubt = None
        for kind, tx, changes in msgs:
            if kind == "intent":
                doubt = (tx, changes)
            elif kind == "committed" and doubt is not None and doubt[0] == tx:
                for slot, n in doubt[1].items():
                    if n:
                        model[slot] = (tx, n)
                    else:
                        model.pop(slot, None)
                committed += 1
                last_tx = tx
                doubt = None
        if doubt is not None:
            in_doubt += 1
            last_tx = doubt[0]
        try:
            model, outcome = verify(path, model, doubt)
        except AssertionError as e:
            print(f"FAIL after kill {k + 1}: {e}", file=sys.stderr)
            return 1
        except pheap.PheapError as e:
            print(f"FAIL after kill {k + 1}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        if outcome == "present":
            present += 1
        if not quiet and (k + 1) % 500 == 0:
            print(f"  {k + 1} kills, {committed} committed transactions verified", flush=True)
    with pheap.open(path, "r") as h:
        recoveries = h.info()["recoveries"]
        size = os.path.getsize(path)
    elapsed = time.perf_counter() - t0
    print(f"torture: {kills} kills in {elapsed:.1f} s, seed {seed}: {committed} committed "
          f"transactions all present; {in_doubt} killed between intent and report "
          f"({present} had committed, {in_doubt - present} had not: each all-or-nothing); "
          f"{recoveries} recoveries ran; 0 leaked blocks; heap file {size} bytes")
    os.unlink(path)
    os.rmdir(tmp)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-delay", type=float, default=0.03,
                    help="longest time a worker runs before its kill, s (default 0.03)")
    args = ap.parse_args(argv)
    return run(args.kills, args.seed, args.max_delay)


if __name__ == "__main__":
    sys.exit(main())
