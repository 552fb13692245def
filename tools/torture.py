"""Random SIGKILL torture for heap format v2: committed work survives, work in doubt is
all-or-nothing, nothing leaks.

A worker process runs a seeded random workload on a heap file whose root entry names a table of
SLOTS words. A slot word is 0 or the offset of a record of 16 bytes to 300 KB: a slot of a run
(<= 448 B) or a block, holding ``record(slot, step, n)``. Each step is one of

* a transaction (``with h.transaction() as tx``): one to six slots freed, allocated, or
  reallocated across size classes and between slot and block, each record rewritten and its
  table word stored; now and then the table itself is reallocated (the root entry follows it);
* an atomic bracket (``with h.atomic() as s``): the same on one to three smaller records, so
  that the undo fits the operation journal (when it does not, the bracket raises
  JournalFullError and is rolled back: it counts as aborted);
* a plain single operation, atomic alone: a malloc whose record is written and then published
  by one word store; a free whose table word is cleared first; a realloc published after; a
  realloc of the table (the root entry follows in the same operation).

The worker sends the parent what each step will do before it starts and "done" after it. The
parent SIGKILLs the worker at a random moment (a tenth of the time within 2 ms of its start, when
it may still be recovering the previous kill), then opens a private copy of the file read-write
-- recovering it as any opener would -- and verifies the copy, so that the real file keeps what
the kill left and the next worker recovers it (a kill can land in that recovery too):

* ``check()`` passes;
* every slot holds exactly what the completed steps put there, record bytes included;
* the one step in doubt (started, "done" not received) is wholly present or wholly absent; for
  a plain operation, the operation itself is: its allocation either exists (then the parent
  frees it or publishes it, as the worker would have) or not;
* nothing leaks: the used allocations (``walk(slots=True)``: slots and blocks, not runs) are
  exactly the table, the transaction log and the records the table points to.

Small, in CI (tests/test_torture.py)::

    python3 tools/torture.py -n 60 --seed 1

Large, by hand::

    python3 tools/torture.py -n 3000 --seed 7
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pheap  # noqa: E402
from pheap import format as F  # noqa: E402

SLOTS = 48  #: table words: 384 bytes, itself a slot until it is reallocated into a block
TABLE_SIZES = (8 * SLOTS, 400, F.RUN_LIMIT, F.RUN_LIMIT + 8, 1000, 4000)  #: slot and block sizes
REC = struct.Struct("<IIQ")  #: slot, step, length: the head of every record
MIN_REC = REC.size


def record(slot: int, step: int, n: int) -> bytes:
    """The ``n`` bytes (n >= 16) of the record that step ``step`` writes for ``slot``."""
    body = bytes([(slot * 7 + step) % 251 + 1]) * (n - REC.size)
    return REC.pack(slot, step, n) + body


def record_size(rng: random.Random, small: bool = False) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.randint(MIN_REC, F.RUN_LIMIT)  # a slot, any class
    if small or r < 0.96:
        return rng.randint(F.RUN_LIMIT + 1, 1500 if small else 6000)
    return rng.randint(20_000, 300_000)


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


class Worker:
    """The workload; it runs until the parent kills it."""

    def __init__(self, path: str, seed: int, first_step: int, wfd: int) -> None:
        self.rng = random.Random(seed)
        self.wfd = wfd
        self.step = first_step
        fd = os.open(path, os.O_RDONLY)
        pending = struct.unpack("<Q", os.pread(fd, 8, F.J_STATE * 8))[0] != 0
        os.close(fd)
        self.send("open", pending)
        self.h = pheap.open(path, "w")  # recovers the previous kill, if it left work
        self.send("ready")
        with self.h.lock() as s:
            table = s.entry("root")
            self.offs = [s.u64(table, i) for i in range(SLOTS)]

    def send(self, *msg: object) -> None:
        os.write(self.wfd, pickle.dumps(msg))  # one write: a pipe never splits it

    def loop(self) -> None:
        while True:
            self.step += 1
            r = self.rng.random()
            if r < 0.4:
                self.bracket("tx")
            elif r < 0.7:
                self.bracket("atomic")
            else:
                self.plain()

    # -- brackets -------------------------------------------------------------------------------

    def bracket(self, mode: str) -> None:
        rng = self.rng
        k = rng.randint(1, 6 if mode == "tx" else 3)
        changes = {slot: 0 if rng.random() < 0.2 else record_size(rng, mode == "atomic")
                   for slot in rng.sample(range(SLOTS), k)}
        tsize = rng.choice(TABLE_SIZES) if rng.random() < 0.15 else 0
        self.send("intent", self.step, mode, changes, tsize)
        for attempt in range(8):
            try:
                offs = self.run_bracket(mode, changes, tsize)
                break
            except pheap.TransactionTooLargeError:
                if attempt == 7:  # rolled back; the heap doubles the log for the next one
                    raise
            except pheap.JournalFullError:
                self.send("aborted", self.step)  # rolled back
                return
        self.offs = offs
        self.send("done", self.step)

    def run_bracket(self, mode: str, changes: dict[int, int], tsize: int) -> list[int]:
        h = self.h
        offs = list(self.offs)
        rng = self.rng
        with (h.transaction() if mode == "tx" else h.atomic()) as s:
            table = s.entry("root")
            for slot, n in changes.items():
                off = offs[slot]
                if n == 0:
                    s.free(off)  # free(0) does nothing
                    new = 0
                elif off and rng.random() < 0.5:
                    new = s.realloc(off, n)
                    s.write(new, record(slot, self.step, n))
                else:
                    s.free(off)
                    new = s.malloc(n)
                    s.write(new, record(slot, self.step, n))
                s.set_u64(table, slot, new)
                offs[slot] = new
            if tsize:
                s.realloc(table, tsize)
        return offs

    # -- plain operations -----------------------------------------------------------------------

    def plain(self) -> None:
        rng = self.rng
        h = self.h
        full = [i for i, o in enumerate(self.offs) if o]
        empty = [i for i, o in enumerate(self.offs) if not o]
        what = rng.choice(["table"] + ["malloc"] * bool(empty) + ["free", "realloc"] * bool(full))
        if what == "table":
            size = rng.choice(TABLE_SIZES)
            self.send("intent", self.step, "plain-table", size)
            h.realloc(h.root_offset, size)
        elif what == "malloc":
            slot, n = rng.choice(empty), record_size(rng)
            self.send("intent", self.step, "plain-malloc", slot, n)
            p = h.malloc(n)
            h.write(p, record(slot, self.step, n))
            self.publish(slot, p)
        elif what == "free":
            slot = rng.choice(full)
            off = self.offs[slot]
            self.send("intent", self.step, "plain-free", slot, off)
            self.publish(slot, 0)
            h.free(off)
        else:
            slot, n = rng.choice(full), record_size(rng)
            self.send("intent", self.step, "plain-realloc", slot, n, self.offs[slot])
            self.publish(slot, h.realloc(self.offs[slot], n))
        self.send("done", self.step)

    def publish(self, slot: int, off: int) -> None:
        """Store ``off`` in the table word of ``slot``: one aligned word store."""
        with self.h.lock() as s:
            s.set_u64(s.entry("root"), slot, off)
        self.offs[slot] = off


def read_messages(rfd: int) -> list[tuple]:
    data = b""
    while True:
        chunk = os.read(rfd, 1 << 16)
        if not chunk:
            break
        data += chunk
    msgs = []
    up = pickle.Unpickler(io.BytesIO(data))
    while True:
        try:
            msgs.append(up.load())
        except EOFError:
            break
    return msgs


# ---------------------------------------------------------------------------------------------
# The parent: the model and the verification
# ---------------------------------------------------------------------------------------------

Model = dict[int, tuple[int, int, int]]  #: slot -> (step, n, bytes of the record still valid)


class Failure(Exception):
    """The heap broke a promise (the message says which)."""


@dataclass
class Seen:
    """One look at the heap: the table, the slots' offsets, the allocations nothing names."""

    table: int
    offs: dict[int, int]  #: slot -> offset, non-zero words only
    extra: dict[int, int]  #: used allocations nothing names -> usable size
    h: pheap.Heap


def look(h: pheap.Heap) -> Seen:
    """Read the table and find the used allocations (slots and blocks) that nothing names.
    (Whether the records the table names are live is for ``matches``: after a plain realloc
    killed before its publication, the table names the old place, freed.)"""
    with h.lock() as s:
        table = s.entry("root")
        if not table or s.usable_size(table) < 8 * SLOTS:
            raise Failure(f"root {table} does not name a table of {SLOTS} words")
        words = struct.unpack(f"<{SLOTS}Q", s.read(table, 8 * SLOTS))
        txlog = h._core._w[F.H_TXLOG]  # internal: no public call reads the log entry
    offs = {i: o for i, o in enumerate(words) if o}
    used = {b.offset: b.usable for b in h.walk(slots=True)
            if not b.free and b.kind in ("slot", "block")}
    if txlog and txlog not in used:
        raise Failure(f"the transaction log {txlog} is not a used block")
    named = set(offs.values()) | {table} | ({txlog} if txlog else set())
    return Seen(table, offs, {o: u for o, u in used.items() if o not in named}, h)


def matches(seen: Seen, model: Model) -> str | None:
    """None when the heap holds exactly ``model``, else what differs."""
    if set(seen.offs) != set(model):
        return (f"slots {sorted(set(seen.offs) ^ set(model))} are "
                f"{'full' if set(seen.offs) - set(model) else 'empty'} against the model")
    with seen.h.lock() as s:
        for slot, (step, n, valid) in model.items():
            off = seen.offs[slot]
            try:
                u = s.usable_size(off)
                got = s.read(off, valid) if u >= valid else b""
            except pheap.InvalidPointerError as e:
                return f"slot {slot}: {off} is not a live allocation ({e})"
            if u < valid:
                return f"slot {slot}: allocation {off} has {u} usable bytes, fewer than {valid}"
            if got != record(slot, step, n)[:valid]:
                return (f"slot {slot}: record at {off} is {REC.unpack(got[:16])}..., expected "
                        f"step {step}, {n} bytes")
    return None


def apply(model: Model, step: int, kind: str, args: tuple) -> Model:
    """The model after step ``step`` of ``kind`` completed."""
    after = dict(model)
    if kind in ("tx", "atomic"):
        changes = args[0]
        for slot, n in changes.items():
            if n:
                after[slot] = (step, n, n)
            else:
                after.pop(slot, None)
    elif kind == "plain-malloc":
        slot, n = args
        after[slot] = (step, n, n)
    elif kind == "plain-free":
        after.pop(args[0], None)
    elif kind == "plain-realloc":
        slot, n = args[0], args[1]
        st, n0, valid = after[slot]
        after[slot] = (st, n0, min(valid, n))
    return after


@dataclass
class Stats:
    kills: int = 0
    done: Counter[str] = field(default_factory=Counter)  #: completed steps by kind
    doubt: Counter[str] = field(default_factory=Counter)  #: "kind present/absent"
    aborted: int = 0
    early: int = 0  #: kills before the worker had the heap open
    early_pending: int = 0  #: ... of which found records pending (killed in recovery, maybe)
    fixups: Counter[str] = field(default_factory=Counter)


def private_copy(path: str) -> str:
    """A fresh copy of the heap file beside it (a new inode: its own core when opened)."""
    copy = path + ".verify"
    if os.path.exists(copy):
        os.unlink(copy)
    shutil.copyfile(path, copy)
    return copy


def resolve(path: str, model: Model, doubt: tuple | None, stats: Stats) -> Model:
    """Verify the heap after a kill; return the model with the step in doubt resolved."""
    fix: list[tuple[str, int, int]] = []
    with pheap.open(private_copy(path), "w") as h:  # recovered as an opener recovers; the
        h.check()                                     # file itself keeps the kill's state
        seen = look(h)
        if doubt is None:
            why = matches(seen, model)
            if why or seen.extra:
                raise Failure(why or f"leaked allocations {sorted(seen.extra.items())}")
            return model
        step, kind, *args = doubt
        after = apply(model, step, kind, tuple(args))
        absent, present = matches(seen, model), matches(seen, after)
        extra = seen.extra
        if kind in ("tx", "atomic", "plain-table"):
            if extra:
                raise Failure(f"{kind} step {step} in doubt: leaked {sorted(extra.items())}")
            if absent is None:
                outcome, result = "absent", model
            elif present is None:
                outcome, result = "present", after
            else:
                raise Failure(f"{kind} step {step} in doubt is neither absent ({absent}) nor "
                              f"present ({present})")
        elif kind == "plain-malloc":
            slot, n = args
            if present is None and not extra:
                outcome, result = "present", after
            elif absent is None and not extra:
                outcome, result = "absent", model
            elif absent is None and len(extra) == 1 and next(iter(extra.values())) >= n:
                outcome, result = "allocated, not published", model  # the parent frees it
                fix.append(("free", next(iter(extra)), 0))
            else:
                raise Failure(f"plain malloc({n}) for slot {slot} in doubt: absent: {absent}; "
                              f"present: {present}; unnamed allocations {sorted(extra.items())}")
        elif kind == "plain-free":
            slot, off = args
            if absent is None and not extra:
                outcome, result = "absent", model
            elif present is None and not extra:
                outcome, result = "present", after
            elif present is None and set(extra) == {off}:
                outcome, result = "unpublished, not freed", after  # the parent frees it
                fix.append(("free", off, 0))
            else:
                raise Failure(f"plain free of slot {slot} ({off}) in doubt: absent: {absent}; "
                              f"present: {present}; unnamed allocations {sorted(extra.items())}")
        else:  # plain-realloc: the record keeps min(valid, n) bytes, wherever it is
            slot, n, off = args
            if present is None and not extra:
                outcome = "present" if seen.offs.get(slot) != off else "in place or absent"
                result = after
            elif len(extra) == 1 and seen.offs.get(slot) == off:
                q = next(iter(extra))
                _, n0, valid = after[slot]
                with h.lock() as s:
                    ok = s.read(q, valid) == record(slot, after[slot][0], n0)[:valid]
                if not ok:
                    raise Failure(f"plain realloc({off}, {n}) moved the record to {q} without "
                                  "its bytes")
                outcome, result = "moved, not published", after  # the parent publishes it
                fix.append(("publish", q, slot))
            else:
                raise Failure(f"plain realloc({off}, {n}) of slot {slot} in doubt: present: "
                              f"{present}; unnamed allocations {sorted(extra.items())}")
        stats.doubt[f"{kind}: {outcome}"] += 1
    if fix:
        with pheap.open(path, "w") as h:  # recovers for real, then finishes the plain step
            for what, off, slot in fix:
                if what == "free":
                    h.free(off)
                else:
                    with h.lock() as s:
                        s.set_u64(s.entry("root"), slot, off)
                stats.fixups[what] += 1
        return resolve(path, result, None, stats)
    return result


def run(kills: int, seed: int, max_delay: float, quiet: bool = False) -> int:
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="pheap-torture-")
    path = os.path.join(tmp, "torture.heap")
    with pheap.open(path, "n") as h:
        h.root_offset = h.calloc(SLOTS, 8)
    model: Model = {}
    stats = Stats()
    last_step = 0
    t0 = time.perf_counter()
    try:
        for k in range(kills):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker
                try:
                    os.close(r)
                    Worker(path, seed * 1_000_003 + k, last_step, w).loop()
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(1)
            os.close(w)
            delay = rng.random() * (0.002 if rng.random() < 0.1 else max_delay)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            msgs = read_messages(r)
            os.close(r)
            stats.kills += 1
            if os.waitstatus_to_exitcode(status) != -signal.SIGKILL:
                raise Failure(f"the worker exited with status {status} before the kill (kill "
                              f"{k + 1}; its traceback is above); file kept: {path}")
            doubt = None
            opened = pending = False
            for msg in msgs:
                if msg[0] == "open":
                    pending = msg[1]
                elif msg[0] == "ready":
                    opened = True
                elif msg[0] == "intent":
                    doubt = msg[1:]
                    last_step = msg[1]
                elif msg[0] in ("done", "aborted"):
                    if doubt is None or doubt[0] != msg[1]:
                        raise Failure(f"worker message {msg} after intent {doubt}")
                    if msg[0] == "done":
                        model = apply(model, doubt[0], doubt[1], tuple(doubt[2:]))
                        stats.done[doubt[1]] += 1
                    else:
                        stats.aborted += 1
                    doubt = None
            if not opened:
                stats.early += 1
                stats.early_pending += pending
            try:
                model = resolve(path, model, doubt, stats)
            except (Failure, pheap.PheapError) as e:
                print(f"FAIL after kill {k + 1} (seed {seed}): {type(e).__name__}: {e}\n"
                      f"  step in doubt: {doubt}; the worker had "
                      f"{'opened the heap' if opened else 'not opened the heap yet'} (records "
                      f"{'pending' if pending else 'none pending'} at its open) and completed "
                      f"{sum(m[0] == 'done' for m in msgs)} steps", file=sys.stderr)
                print(f"  file kept: {path}", file=sys.stderr)
                return 1
            if not quiet and (k + 1) % 500 == 0:
                print(f"  {k + 1} kills, {sum(stats.done.values())} steps verified", flush=True)
        with pheap.open(path, "w") as h:  # the file itself, recovered for real, agrees
            h.check()
            seen = look(h)
            why = matches(seen, model)
            if why or seen.extra:
                print(f"FAIL at the end: {why or seen.extra}", file=sys.stderr)
                return 1
            info = h.info()
            runs = h.stats().runs
        size = os.path.getsize(path)
    except (Failure, pheap.PheapError) as e:
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    done = stats.done
    print(f"torture: {stats.kills} kills in {elapsed:.1f} s, seed {seed}: "
          f"{sum(done.values())} completed steps all present "
          f"({done['tx']} transactions, {done['atomic']} atomic brackets, "
          f"{sum(v for k, v in done.items() if k.startswith('plain'))} plain operations); "
          f"{stats.aborted} atomic brackets rolled back by JournalFullError")
    print(f"  {sum(stats.doubt.values())} steps in doubt at the kill, each all-or-nothing: " +
          ", ".join(f"{v} {k}" for k, v in sorted(stats.doubt.items())))
    print(f"  plain steps finished by the verifier: {stats.fixups['free']} allocations freed, "
          f"{stats.fixups['publish']} published; {stats.early} kills before the worker had "
          f"the heap open ({stats.early_pending} of them with records pending: in recovery)")
    print(f"  {info['recoveries']} recoveries ran on the file; 0 leaked allocations; final heap: "
          f"{size} bytes, capacity {info['capacity']}, generation {info['generation']}, "
          f"{runs} runs, {len(model)} records")
    shutil.rmtree(tmp)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("-n", "--kills", type=int, default=30, help="kills (default 30)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-delay", type=float, default=0.03,
                    help="longest time a worker runs before its kill, s (default 0.03)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.kills < 1 or args.max_delay <= 0:
        ap.error("-n must be at least 1 and --max-delay positive")
    return run(args.kills, args.seed, args.max_delay, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
