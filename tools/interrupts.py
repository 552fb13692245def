"""Ctrl-C torture: operations and transactions under a storm of KeyboardInterrupts.

A signal handler that raises KeyboardInterrupt (what Ctrl-C does) runs between two bytecodes of
whatever the main thread is doing: inside the lock's acquisition, inside an allocator operation,
inside a rollback, inside a remap. This script arms ``setitimer`` with random short intervals
whose handler raises KeyboardInterrupt, and runs a seeded random mix of mallocs and frees of slots
and blocks (single calls and batches under ``heap.lock()``), ``atomic()`` brackets and
transactions, catching every interrupt and going on. With the timer paused it checks, now and
then and at the end:

* no hang (a watchdog kills the process and prints where it hung);
* ``check()`` passes: every invariant of the heap holds;
* every live block still holds its bytes;
* every transaction and atomic bracket was all-or-nothing: the group of blocks it rewrites
  always holds one generation, never a mix;
* the handle still works, and the heap lock is free afterwards (another process takes it).

An interrupt that lands after a malloc returned but before its caller stored the offset loses
that offset: such blocks are counted (``lost``), not leaked silently.

Small, in CI (tests/test_journal.py)::

    python3 tools/interrupts.py -n 3000 --seed 1

Large, by hand::

    python3 tools/interrupts.py -n 100000 --seed 1
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import random
import signal
import struct
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pheap  # noqa: E402

GROUP = 6  #: blocks a transaction rewrites together
GEN = struct.Struct("<Q")


class Storm:
    """One-shot setitimer with a random delay, re-armed by the loop; the handler raises
    KeyboardInterrupt once and disarms itself, so the script's own recovery code between
    interrupts is never interrupted."""

    def __init__(self, rng: random.Random, lo_us: int, hi_us: int) -> None:
        self.rng = rng
        self.lo, self.hi = lo_us, hi_us
        self.fired = 0
        self.armed = False
        signal.signal(signal.SIGALRM, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        if not self.armed:
            return
        self.armed = False
        self.fired += 1
        raise KeyboardInterrupt

    def start(self) -> None:
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, self.rng.randint(self.lo, self.hi) / 1e6)

    def stop(self) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def pattern(tag: int, n: int) -> bytes:
    unit = struct.pack("<I", (tag * 2654435761 + 0x5BD1E995) & 0xFFFFFFFF)
    return (unit * (n // 4 + 1))[:n]


def run(n_ops: int, seed: int, kind: str, verbose: bool = False) -> int:
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="pheap-int-")
    path = os.path.join(tmp, "int.heap")
    if kind == "file":
        h = pheap.open(path, "n", size=1 << 20)
    elif kind == "memfd":
        h = pheap.memfd(1 << 20)
    else:
        h = pheap.anonymous(64 << 20)
    group = [h.malloc(24 if i % 2 else 900) for i in range(GROUP)]  # slots and blocks
    for b in group:
        h.write(b, GEN.pack(0))
    gen = 0
    live: dict[int, bytes] = {}
    tag = 0
    stats = {"ops": 0, "interrupted": 0, "tx": 0, "tx_aborted": 0, "atomic": 0,
             "lost": 0, "checks": 0, "leaked": 0}
    storm = Storm(rng, 20, 400)
    failures: list[str] = []

    def verify_group(where: str) -> int:
        gens = {GEN.unpack(h.read(b, 8))[0] for b in group}
        if len(gens) != 1:
            failures.append(f"{where}: the transaction group holds generations {sorted(gens)}")
            return max(gens)
        return gens.pop()

    def settle() -> None:
        """An interrupt that landed at the very first instruction of a with-block's __exit__
        leaves its bracket to the context object's finalizer, which runs when the last reference
        to it goes: at once, or (a traceback in a reference cycle) at the next collection."""
        gc.collect()
        c = h._core
        if c._j.mode or c.lock.depth:
            stats["leaked"] += 1
            failures.append(f"a bracket or lock hold outlived its with-block (journal mode "
                            f"{c._j.mode}, lock depth {c.lock.depth})")

    def reconcile() -> None:
        """With the timer off: frees that may or may not have happened, contents, check(). (A
        bracket an interrupt left open until its context is freed may still be open here: the
        reads below join it; settle() then checks it was closed.)"""
        nonlocal gen
        for p in list(live):
            if not h._core.is_live(p):
                del live[p]
        h.check()
        stats["checks"] += 1
        for p, data in live.items():
            if h.read(p, len(data)) != data:
                failures.append(f"block {p} lost its bytes")
                break
        gen = verify_group("after an interrupted bracket")

    faulthandler.dump_traceback_later(600, exit=True)  # a hang is a failure, with a traceback
    t0 = time.monotonic()
    last = ""
    pending_settle = False
    while True:
        try:  # the whole iteration, loop test included: an interrupt may land anywhere
            if stats["ops"] >= n_ops or failures:
                storm.stop()
                break
            if pending_settle:  # out of the except block: the interrupt's traceback is gone
                pending_settle = False
                settle()
            if not storm.armed:
                storm.start()
            stats["ops"] += 1
            r = rng.random()
            if r < 0.30:
                n = rng.choice((rng.randint(0, 448), rng.randint(449, 5000)))
                tag += 1
                p = h.malloc(n)
                data = pattern(tag, n)
                h.write(p, data)
                live[p] = data
            elif r < 0.55 and live:
                p = rng.choice(list(live))
                h.free(p)
                del live[p]
            elif r < 0.70:
                with h.lock():
                    for _ in range(rng.randint(1, 8)):
                        q = h.malloc(rng.randint(0, 3000))
                        h.free(q)
            elif r < 0.85:
                new = gen + 1
                try:
                    with h.transaction():
                        for b in group:
                            h.write(b, GEN.pack(new))
                        x = h.malloc(rng.randint(1, 2000))
                        h.free(x)
                        if rng.random() < 0.2:
                            raise ValueError("abort")
                    gen = new
                    stats["tx"] += 1
                except ValueError:
                    stats["tx_aborted"] += 1
            else:
                new = gen + 1
                with h.atomic() as s:
                    for b in group:
                        s.set_u64(b, 0, new)
                    y = s.malloc(rng.randint(1, 400))
                    s.free(y)
                gen = new
                stats["atomic"] += 1
            storm.stop()  # off before the loop's back edge, which no try covers
            if stats["ops"] % 500 == 0:
                reconcile()
        except KeyboardInterrupt:  # the storm is disarmed until the loop starts it again
            stats["interrupted"] += 1
            if verbose:
                import traceback
                last = traceback.format_exc()
            pending_settle = True
            try:
                reconcile()
            except pheap.PheapError:
                print("the interrupt before the failure:\n" + last, file=sys.stderr)
                raise
    storm.stop()
    elapsed = time.monotonic() - t0
    faulthandler.cancel_dump_traceback_later()

    # Afterwards: a sound heap, atomic transactions, a free lock.
    settle()
    reconcile()
    before = verify_group("before the final transactions")
    try:
        with h.transaction():
            for b in group:
                h.write(b, GEN.pack(before + 7))
            raise ValueError
    except ValueError:
        pass
    if verify_group("after a final abort") != before:
        failures.append("a final aborted transaction was not rolled back")
    with h.transaction():
        for b in group:
            h.write(b, GEN.pack(before + 8))
    if verify_group("after a final commit") != before + 8:
        failures.append("a final committed transaction was lost")
    for p in list(live):
        h.free(p)
    s = h.stats()
    stats["lost"] = s.used_blocks - len(group) - (1 if h._core._w[pheap.format.H_TXLOG] else 0)
    if kind == "file":
        h.close()
        pid = os.fork()
        if pid == 0:  # another process must get the lock at once
            try:
                with pheap.open(path, "w", lock_timeout=5) as h2:
                    h2.check()
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failures.append("another process could not take the lock and check the heap after")
    else:
        h.check()
        h.close()
    print(f"interrupts: {stats['ops']:,} operations ({kind} heap, seed {seed}) in {elapsed:.1f} s; "
          f"{storm.fired:,} KeyboardInterrupts raised, {stats['interrupted']:,} landed inside "
          f"an operation; {stats['tx']:,} transactions committed, {stats['tx_aborted']:,} "
          f"aborted, {stats['atomic']:,} atomic brackets; {stats['checks']:,} checks; "
          f"{stats['lost']} allocations lost to an interrupt after malloc returned")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# Shared objects under the storm
# ---------------------------------------------------------------------------------------------


def _value(rng: random.Random, tag: int) -> object:
    """A random value of the kinds containers store: immediates, blobs, tuples, nested lists."""
    r = rng.random()
    if r < 0.3:
        return tag
    if r < 0.5:
        return f"v{tag}-" + "x" * rng.randint(0, 300)
    if r < 0.6:
        return (tag, f"t{tag}", None, 2.5)
    if r < 0.7:
        return [tag, f"n{tag}"]  # becomes a shared list: refs, graveyard
    if r < 0.8:
        return {"k": tag}
    return bytes(rng.randint(0, 200))


def _plain(v: object) -> object:
    """A shared object's value as plain Python (for comparing with the model)."""
    if isinstance(v, pheap.SharedDict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, pheap.SharedList):
        return [_plain(x) for x in v]
    return v


def _diff(a: object, b: object, path: str = "") -> str:
    """Where two plain values first differ (for a short failure message)."""
    if type(a) is not type(b):
        return f"{path or 'value'}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=repr):  # type: ignore[arg-type]
            if k not in a or k not in b:
                return f"{path}[{k!r}] only on one side"
            if a[k] != b[k]:  # type: ignore[index]
                return _diff(a[k], b[k], f"{path}[{k!r}]")  # type: ignore[index]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):  # type: ignore[arg-type]
            return f"{path or 'value'}: length {len(a)} vs {len(b)}"  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b, strict=True)):  # type: ignore[call-overload]
            if x != y:
                return _diff(x, y, f"{path}[{i}]")
    r = repr(a)
    return f"{path or 'value'}: {r[:60]} vs {repr(b)[:60]}"


def run_objects(n_ops: int, seed: int, kind: str, verbose: bool = False) -> int:
    """The storm over shared objects: a dict, a list, a counter and a queue in the root, each
    operation checked all-or-nothing against a model (after an interrupt the object holds the
    model's state before the operation or after it, never anything else)."""
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="pheap-int-")
    path = os.path.join(tmp, "obj.heap")
    h = pheap.open(path, "n", size=1 << 20) if kind == "file" else \
        pheap.memfd(1 << 20) if kind == "memfd" else pheap.anonymous(64 << 20)
    root = h.root
    root["d"] = {}
    root["l"] = []
    root["c"] = h.counter()
    root["q"] = h.queue()
    d, lst, ctr, q = root["d"], root["l"], root["c"], root["q"]
    model_d: dict[str, object] = {}
    model_l: list[object] = []
    model_c = 0
    model_q: list[object] = []
    stats = {"ops": 0, "interrupted": 0, "tx": 0, "checks": 0, "either": 0}
    storm = Storm(rng, 10, 300)
    failures: list[str] = []
    tag = 0

    def state() -> tuple[object, ...]:
        return (_plain(d), _plain(lst), ctr.value, q.qsize())

    def model() -> tuple[object, ...]:
        return (model_d, model_l, model_c, len(model_q))

    def judge(cut: tuple[Any, ...]) -> None:
        """After an interrupted operation, out of the except block (whose traceback may keep a
        bracket open until it goes: see run()'s settle), the objects hold the state before the
        operation or after it; the model follows."""
        nonlocal model_d, model_l, model_c, model_q
        name, before, after, new = cut
        gc.collect()
        c = h._core
        with h.lock():  # (an operation cut off before its commit is undone here, at the latest)
            pass
        if c._j.mode or c.lock.depth:
            failures.append(f"an interrupted {name} left a bracket or a lock hold open "
                            f"(journal mode {c._j.mode}, lock depth {c.lock.depth})"
                            + (f"; the interrupt:\n{last}" if verbose else ""))
            return
        now = state()
        if now == after:
            model_d, model_l, model_c, model_q = new
        elif now == before:
            stats["either"] += 1
        else:
            failures.append(f"an interrupted {name} left the objects neither as before it nor "
                            f"as after it (first difference: {_diff(now, before)})")
        h.check()
        stats["checks"] += 1

    faulthandler.dump_traceback_later(600, exit=True)
    t0 = time.monotonic()
    cut: tuple[Any, ...] | None = None
    last = ""
    while True:
        before = after = None
        try:
            if stats["ops"] >= n_ops or failures:
                storm.stop()
                break
            if cut is not None:
                judge(cut)
                cut = None
                continue
            tag += 1
            k = f"k{rng.randint(0, 40)}"
            v = _value(rng, tag)
            r = rng.random()
            nd, nl, nc, nq = dict(model_d), list(model_l), model_c, list(model_q)
            if r < 0.30:
                nd[k] = _plain(v) if not isinstance(v, bytes) else v
                op = ("set", k, v)
            elif r < 0.40:
                nd.pop(k, None)
                op = ("del", k)
            elif r < 0.55:
                nl.append(v)
                op = ("append", v)
            elif r < 0.62:
                if nl:
                    nl.pop()
                op = ("pop",)
            elif r < 0.72:
                nc += 3
                op = ("add", 3)
            elif r < 0.80:
                nq.append(tag)
                op = ("put", tag)
            elif r < 0.87:
                if nq:
                    nq.pop(0)
                op = ("get",)
            else:  # a transaction of several changes: all or nothing
                nd[k] = tag
                nl.append(tag)
                nc += 1
                op = ("tx", k, tag)
            before, after = model(), (nd, nl, nc, len(nq))
            stats["ops"] += 1
            if not storm.armed:
                storm.start()
            if op[0] == "set":
                d[k] = v
            elif op[0] == "del":
                d.pop(k, None)
            elif op[0] == "append":
                lst.append(v)
            elif op[0] == "pop":
                if len(lst):
                    lst.pop()
            elif op[0] == "add":
                ctr.add(3)
            elif op[0] == "put":
                q.put(op[1])
            elif op[0] == "get":
                if q.qsize():
                    q.get_nowait()
            else:
                with h.transaction():
                    d[k] = tag
                    lst.append(tag)
                    ctr.add(1)
                stats["tx"] += 1
            storm.stop()
            model_d, model_l, model_c, model_q = nd, nl, nc, nq
            if stats["ops"] % 300 == 0:
                if state() != model():
                    failures.append(f"after op {stats['ops']} ({op[0]}): the objects differ "
                                    "from the model")
                h.check()
                stats["checks"] += 1
        except pheap.PheapError:
            storm.stop()
            import traceback
            failures.append(f"op {stats['ops']} ({op[0]}) raised:\n{traceback.format_exc()}"
                            + (f"\nafter this interrupt:\n{last}" if verbose else ""))
            break
        except KeyboardInterrupt:
            storm.stop()
            stats["interrupted"] += 1
            if verbose:
                import traceback
                last = traceback.format_exc()
            if before is not None:
                cut = (op[0], before, after, (nd, nl, nc, nq))
    storm.stop()
    elapsed = time.monotonic() - t0
    faulthandler.cancel_dump_traceback_later()
    gc.collect()
    if state() != model():
        failures.append("at the end the objects differ from the model")
    # An interrupt inside a handle's finalizer (a weakref callback: Python prints "Exception
    # ignored in") keeps its floating object from the graveyard; gc() reclaims those.
    stats["reclaimed"] = h.gc()["freed"]
    report = h.check()
    if report is not None:
        failures.append(f"check() reports unreachable objects after gc(): {report!r}")
    if kind == "file":
        h.close()
        with pheap.open(path, "r") as h2:  # a reopen sees exactly the model
            r2 = h2.root
            seen = (_plain(r2["d"]), _plain(r2["l"]), r2["c"].value, r2["q"].qsize())
            if seen != model():
                failures.append("a reopened heap differs from the model")
    else:
        h.close()
    print(f"interrupts (objects): {stats['ops']:,} operations ({kind} heap, seed {seed}) in "
          f"{elapsed:.1f} s; {storm.fired:,} KeyboardInterrupts raised, "
          f"{stats['interrupted']:,} landed inside an operation ({stats['either']:,} of them "
          f"before it changed anything); {stats['tx']:,} transactions; "
          f"{stats['checks']:,} checks; {stats['reclaimed']} objects left floating by an "
          "interrupted finalizer reclaimed by gc(); 0 mismatches" if not failures else "")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=3000, help="operations (default 3000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kind", choices=("file", "memfd", "anon"), default="file")
    p.add_argument("--objects", action="store_true",
                   help="shared objects (dict, list, counter, queue) checked against a model")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.objects:
        return run_objects(args.n, args.seed, args.kind, args.verbose)
    return run(args.n, args.seed, args.kind, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
