"""The object benchmark's sections (a-h) and :func:`run`, which prints them.

a. dict set/get/delete, one process      e. counter add, one process and two
b. dict across two forked processes      f. queue put+get round trip; producer -> consumer
c. persistent store: put, reopen, get    g. a big float64 array summed by 2 pool workers
d. list append and index read            h. memory: bytes per entry of a big dict

Method, in every section: the systems of a table run round-robin, the order rotating each
repeat, so that a burst of other load hits all of them alike; every repeat gets a fresh store in
a fresh folder (removed after it); creating and opening stores and starting processes are not
timed, a commit that a mode needs is; the garbage collector is off inside timed loops (after a
collection); each timed phase stops when the budget is spent (its cell then shows '*' and the
figure is over the ops done); results are verified (a value read back that differs is WRONG, an
update missing afterwards is LOST) and a flagged row is never 'fastest' nor the reference;
figures are medians of the repeats. Children are forked, gathered with a deadline and reaped
with a timeout.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, NamedTuple

from . import env, peers, pheap_objects
from .contenders import TempDir
from .procs import FORK, child_timeout, reap, rss_bytes, run_children, sweep_shm
from .report import Out, Row, results_table
from .stores import (
    CounterSystem,
    DictSystem,
    ListSystem,
    QueueSystem,
    Store,
    System,
    describe,
    key,
    keys_values,
)
from .timing import budgeted, gc_off, rotated

SECTIONS = "abcdefgh"
PEER_DISTS = ("diskcache", "lmdb", "UltraDict", "sqlitedict", "numpy")  #: versions shown


class ObjConfig(NamedTuple):
    """Sizes of one run of the object benchmark."""

    keys: int  #: a, c: keys; d: list items; f: queue items
    xkeys: int  #: b: keys per process
    adds: int  #: e: adds per process
    array_mb: int  #: g: MB of the float64 array
    entries: int  #: h: entries of the big dict
    budget: float  #: seconds per timed phase before a system is cut short (0: no budget)
    mem_budget: float  #: h: seconds to fill one store before it is cut short
    repeats: int


QUICK = ObjConfig(1000, 1000, 2000, 20, 10**5, 0.1, 10.0, 3)
FULL = ObjConfig(20_000, 5_000, 50_000, 100, 10**6, 2.0, 120.0, 5)


class Ctx:
    """What every section gets: output, sizes, the run's folder, seed, and what pheap failed."""

    def __init__(self, out: Out, cfg: ObjConfig, tmp: TempDir, seed: int,
                 verbose: bool) -> None:
        self.out, self.cfg, self.tmp, self.seed, self.verbose = out, cfg, tmp, seed, verbose
        self.pheap_flagged: list[str] = []

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def order(self, n: int, salt: str) -> list[int]:
        """range(n) shuffled, the same in every run with this seed."""
        xs = list(range(n))
        random.Random(f"{self.seed}-{salt}").shuffle(xs)
        return xs

    def table(self, title: str, rows: Sequence[Row], cols: Sequence[str],
              budget: float | None = None, **kw: Any) -> None:
        """Print one results table (see report.results_table) under ``title``."""
        self.out()
        self.out(title)
        results_table(self.out, rows, cols, budget=budget or self.cfg.budget or None, **kw)
        self.pheap_flagged += [r.name for r in rows if r.name.startswith("pheap") and r.flagged]


def new_rows(systems: Sequence[System]) -> dict[str, Row]:
    """A row per system; one that cannot run here says why."""
    rows = {}
    for s in systems:
        why = s.check()
        rows[s.name] = Row(s.name, floor=s.floor,
                           unavailable=None if why is None else (
                               why if why.startswith("pheap:") else f"not available ({why})"))
    return rows


def round_robin(ctx: Ctx, label: str, systems: Sequence[System], rows: dict[str, Row],
                one: Callable[[System, Row, str], None]) -> None:
    """``one(system, row, folder)`` for every available system, ``repeats`` times round-robin
    (the order rotating each repeat), each time in a fresh folder. A repeat that raises is
    counted as failed; a system whose child hung is not run again."""
    live = [s for s in systems if rows[s.name].unavailable is None]
    hung: set[str] = set()
    for r in range(ctx.cfg.repeats):
        for s in rotated(live, r):
            if s.name in hung:
                continue
            ctx.log(f"{label}, repeat {r + 1}/{ctx.cfg.repeats}: {s.name}")
            folder = ctx.tmp.folder()
            try:
                one(s, rows[s.name], folder)
            except Hung as e:
                rows[s.name].failed.append(str(e))
                hung.add(s.name)
            except Exception as e:  # noqa: BLE001 - the row says it; the run goes on
                rows[s.name].failed.append(describe(e))
                if ctx.verbose:
                    import traceback

                    traceback.print_exc()
            finally:
                shutil.rmtree(folder, ignore_errors=True)
                sweep_shm()


class Hung(RuntimeError):
    """A child did not answer in time (it was killed)."""


def children(jobs: Sequence[tuple[Callable[..., dict], tuple]], budget: float,
             barrier: Any = None, timeout: float | None = None) -> list[dict]:
    """run_children (timeout: ``child_timeout(budget)`` unless given), raising RuntimeError
    (a child's error) or Hung on failure. A child that failed is named before one that hung or
    broke the barrier waiting for it: the others' failures are often its echo."""
    res = run_children(jobs, timeout or child_timeout(budget), barrier)
    errs = [r for r in res if r.get("error")]
    errs.sort(key=lambda r: (bool(r.get("hung")), r["error"].startswith("BrokenBarrierError")))
    if errs:
        if errs[0].get("hung"):
            raise Hung(errs[0]["error"])
        raise RuntimeError(errs[0]["error"])
    return res


# ---------------------------------------------------------------------------------------------
# Timed loops: the same loop for every system
# ---------------------------------------------------------------------------------------------

MISSING = object()  #: what a get loop records for a key that is not there


def _setter(d: Any, ks: list[str], vs: list[str]) -> Callable[[int, int], None]:
    def step(a: int, b: int) -> None:
        for k, v in zip(ks[a:b], vs[a:b], strict=True):
            d[k] = v
    return step


def _getter(d: Any, ks: list[str], got: list[Any]) -> Callable[[int, int], None]:
    append = got.append

    def step(a: int, b: int) -> None:
        for k in ks[a:b]:
            try:
                append(d[k])
            except KeyError:
                append(MISSING)
    return step


def _deleter(d: Any, ks: list[str], missing: list[str]) -> Callable[[int, int], None]:
    def step(a: int, b: int) -> None:
        for k in ks[a:b]:
            try:
                del d[k]
            except KeyError:
                missing.append(k)
    return step


def phase(s: Any, store: Store | None, name: str, step: Callable[[int, int], None], n: int,
          budget: float, collect: bool = True) -> tuple[float, float, int]:
    """One timed phase, begin/end hooks (a commit) included: (t0, t1, ops done)."""
    with gc_off(collect):
        t0 = perf_counter()
        if store is not None:
            s.begin(store, name)
        _, done = budgeted(step, n, budget)
        if store is not None:
            s.end(store, name)
        t1 = perf_counter()
    return t0, t1, done


def compare(got: Sequence[Any], expected: Sequence[Any]) -> tuple[int, int]:
    """(lost, wrong): values missing, values that differ."""
    lost = sum(1 for g in got if g is MISSING)
    wrong = sum(1 for g, e in zip(got, expected, strict=False) if g is not MISSING and g != e)
    return lost, wrong


def verify_mapping(d: Any, ks: Sequence[str], vs: Sequence[str]) -> tuple[int, int]:
    """(lost, wrong) over keys ``ks`` of mapping ``d``, read back untimed."""
    got: list[Any] = []
    _getter(d, list(ks), got)(0, len(ks))
    return compare(got, vs)


def per_op_us(t0: float, t1: float, n: int) -> float:
    return (t1 - t0) / max(n, 1) * 1e6


# ---------------------------------------------------------------------------------------------
# a. dict, one process
# ---------------------------------------------------------------------------------------------


def dict_systems() -> list[DictSystem]:
    """Every dict row: pheap's first, then the peers."""
    return [pheap_objects.PheapDict(), pheap_objects.PheapRoot(), pheap_objects.PheapNamed(),
            *peers.dict_peers()]


def section_a(ctx: Ctx) -> None:
    n, budget = ctx.cfg.keys, ctx.cfg.budget
    ks, vs = keys_values(n)
    order = ctx.order(n, "a")
    systems = [s for s in dict_systems() if s.one_process]
    rows = new_rows(systems)

    def one(s: System, row: Row, folder: str) -> None:
        assert isinstance(s, DictSystem)
        store = s.create(folder)
        try:
            d = store.obj
            t0, t1, n_set = phase(s, store, "set", _setter(d, ks, vs), n, budget)
            row.add("set", per_op_us(t0, t1, n_set), n_set, n)
            idx = [i for i in order if i < n_set]
            gkeys, got = [ks[i] for i in idx], []
            t0, t1, n_get = phase(s, store, "get", _getter(d, gkeys, got), len(idx), budget)
            row.add("get", per_op_us(t0, t1, n_get), n_get, n)
            lost, wrong = compare(got, [vs[i] for i in idx])
            gone = {k for k, g in zip(gkeys, got, strict=False) if g is MISSING}
            missing: list[str] = []
            t0, t1, n_del = phase(s, store, "del", _deleter(d, gkeys, missing), len(idx), budget)
            row.add("del", per_op_us(t0, t1, n_del), n_del, n)
            # what should be left: the keys set, less those already gone, less those deleted
            expect_left = n_set - len(gone) - (n_del - len(missing))
            left = len(d)
            row.lost += lost + len(set(missing) - gone) + max(0, expect_left - left)
            row.wrong += wrong + max(0, left - expect_left)
            row.checked += n_get + n_del
        finally:
            s.close(store)

    round_robin(ctx, "a", systems, rows, one)
    ctx.table(f"== a. dict, one process: {n:,} keys (10-char str) -> 100-char str values; "
              f"set all, get all, delete all (random order); µs/op, median of "
              f"{ctx.cfg.repeats} ==", list(rows.values()), ("set", "get", "del"),
              fallbacks=("Manager().dict()",))
    ctx.out("check: every value read back compared; after the deletes the store holds what "
            "the budget left. On-disk stores appear again in c, with a reopen.")


# ---------------------------------------------------------------------------------------------
# b. dict, two processes
# ---------------------------------------------------------------------------------------------


def _open_in_child(s: DictSystem, handle: Any) -> tuple[Store, bool]:
    """The store a child uses: the inherited one, or reopened from the handle."""
    if isinstance(handle, Store):
        return handle, False
    return s.reopen(handle), True


def _b_writer(s: DictSystem, handle: Any, ks: list[str], vs: list[str], budget: float,
              barrier: Any, handoff: Any) -> dict:
    store, opened = _open_in_child(s, handle)
    try:
        len(store.obj)  # connect (a proxy), load (UltraDict): not timed
        gc.collect()
        barrier.wait(child_timeout(budget))
        try:
            t0, t1, n = phase(s, store, "set", _setter(store.obj, ks, vs), len(ks), budget,
                              False)
        except BaseException:
            handoff.put(-1)  # the reader need not wait for keys that will not come
            raise
        handoff.put(n)
        return {"set": per_op_us(t0, t1, n), "n": n}
    finally:
        if opened:
            s.detach(store)


def _b_reader(s: DictSystem, handle: Any, ks: list[str], vs: list[str], budget: float,
              barrier: Any, handoff: Any, order: list[int]) -> dict:
    store, opened = _open_in_child(s, handle)
    try:
        len(store.obj)
        gc.collect()
        barrier.wait(child_timeout(budget))
        n = handoff.get(timeout=child_timeout(budget))
        if n < 0:
            raise RuntimeError("the writer failed")
        idx = [i for i in order if i < n]
        gkeys, got = [ks[i] for i in idx], []
        gc.collect()
        t0, t1, m = phase(s, store, "get", _getter(store.obj, gkeys, got), len(idx), budget,
                          False)
        lost, wrong = compare(got, [vs[i] for i in idx])
        return {"get": per_op_us(t0, t1, m), "n": m, "lost": lost, "wrong": wrong}
    finally:
        if opened:
            s.detach(store)


def _b_both(s: DictSystem, handle: Any, ks: list[str], vs: list[str], budget: float,
            barrier: Any, order: list[int]) -> dict:
    store, opened = _open_in_child(s, handle)
    try:
        d = store.obj
        len(d)
        gc.collect()
        barrier.wait(child_timeout(budget))
        t0, t1, n_set = phase(s, store, "set", _setter(d, ks, vs), len(ks), budget, False)
        idx = [i for i in order if i < n_set]
        gkeys, got = [ks[i] for i in idx], []
        gc.collect()
        barrier.wait(child_timeout(budget))
        t2, t3, n_get = phase(s, store, "get", _getter(d, gkeys, got), len(idx), budget, False)
        lost, wrong = compare(got, [vs[i] for i in idx])
        return {"t0": t0, "t1": t1, "n_set": n_set, "t2": t2, "t3": t3, "n_get": n_get,
                "lost": lost, "wrong": wrong}
    finally:
        if opened:
            s.detach(store)


def section_b(ctx: Ctx) -> None:
    n, budget = ctx.cfg.xkeys, ctx.cfg.budget
    systems = [s for s in dict_systems() if s.two_processes]
    wr_rows, both_rows = new_rows(systems), new_rows(systems)
    ks, vs = keys_values(n)
    own = [keys_values(n, p) for p in ("a", "b")]
    orders = [ctx.order(n, f"b{w}") for w in range(2)]

    def cycle(s: System, row: Row, folder: str, both: bool) -> None:
        assert isinstance(s, DictSystem)
        store: Store | None = s.create(folder)
        vstore: Store | None = None
        try:
            assert store is not None
            handle = store if s.inherit else s.handle(store, folder)
            if not s.inherit:  # stores reopened by path: the parent lets go while they work
                s.close(store)
                store = None
            barrier = FORK.Barrier(2)
            if both:
                res = children([(_b_both, (s, handle, *own[w], budget, barrier, orders[w]))
                                for w in range(2)], budget, barrier)
                n_set = sum(r["n_set"] for r in res)
                row.add("set", (max(r["t1"] for r in res) - min(r["t0"] for r in res)) * 2
                        / n_set * 1e6, min(r["n_set"] for r in res), n)
                n_get = sum(r["n_get"] for r in res)
                row.add("get", (max(r["t3"] for r in res) - min(r["t2"] for r in res)) * 2
                        / max(n_get, 1) * 1e6, min(r["n_get"] for r in res), n)
                written = [(own[w][0][:r["n_set"]], own[w][1][:r["n_set"]])
                           for w, r in enumerate(res)]
            else:
                handoff = FORK.Queue()
                try:
                    res = children([(_b_writer, (s, handle, ks, vs, budget, barrier, handoff)),
                                    (_b_reader, (s, handle, ks, vs, budget, barrier, handoff,
                                                 orders[0]))], budget, barrier)
                finally:
                    handoff.close()
                    handoff.join_thread()
                n_set = res[0]["n"]
                row.add("set", res[0]["set"], n_set, n)
                row.add("get", res[1]["get"], res[1]["n"], n)
                n_get = res[1]["n"]
                written = [(ks[:n_set], vs[:n_set])]
            vstore = store if store is not None else s.reopen(handle)
            lost = wrong = 0
            for wk, wv in written:
                lo, wr = verify_mapping(vstore.obj, wk, wv)
                lost, wrong = lost + lo, wrong + wr
            extra = len(vstore.obj) - (n_set - lost)
            # a key a child could not read is usually the one the parent misses too: count the
            # larger of the two, not both
            row.lost += max(lost, sum(r.get("lost", 0) for r in res))
            row.wrong += max(wrong, sum(r.get("wrong", 0) for r in res)) + max(0, extra)
            row.checked += n_set + n_get
        finally:
            if store is not None:
                s.close(store)
            elif vstore is not None:
                s.detach(vstore)

    round_robin(ctx, "b, 1 writes, 1 reads", systems, wr_rows,
                lambda s, row, folder: cycle(s, row, folder, False))
    round_robin(ctx, "b, both write", systems, both_rows,
                lambda s, row, folder: cycle(s, row, folder, True))
    how = "; ".join(f"{s.name}: {s.how}" for s in systems)
    ctx.table(f"== b. dict across 2 forked processes: one sets {n:,} keys, then the other gets "
              f"them (random order); µs/op, median of {ctx.cfg.repeats} ==",
              list(wr_rows.values()), ("set", "get"), fallbacks=("Manager().dict()",))
    ctx.table(f"-- b. both at once, each setting then getting its own {n:,} keys: µs/op = wall "
              f"x 2 / ops, median of {ctx.cfg.repeats} --",
              list(both_rows.values()), ("set", "get"), fallbacks=("Manager().dict()",))
    ctx.out(f"How the children get at the store (fork start method): {how}. The parent then "
            "checks that the store holds every key a child set, with its value, and nothing "
            "else. Left out: shelve (no dbm takes two writers), the 1 commit/txn per phase "
            "modes (one long write transaction each would lock the other process out), "
            "the floor.")


# ---------------------------------------------------------------------------------------------
# c. persistent store
# ---------------------------------------------------------------------------------------------


def section_c(ctx: Ctx) -> None:
    n, budget = ctx.cfg.keys, ctx.cfg.budget
    ks, vs = keys_values(n)
    order = ctx.order(n, "c")
    systems = [s for s in dict_systems() if s.persistent]
    rows = new_rows(systems)

    def one(s: System, row: Row, folder: str) -> None:
        assert isinstance(s, DictSystem)
        store: Store | None = s.create(folder)
        try:
            assert store is not None
            handle = s.handle(store, folder)
            t0, t1, n_put = phase(s, store, "set", _setter(store.obj, ks, vs), n, budget)
            row.add("put", per_op_us(t0, t1, n_put), n_put, n)
            t0 = perf_counter()
            s.close(store)
            store = None
            store = s.reopen(handle)
            row.add("close+open", (perf_counter() - t0) * 1e3)
            idx = [i for i in order if i < n_put]
            got: list[Any] = []
            t0, t1, n_get = phase(s, store, "get", _getter(store.obj, [ks[i] for i in idx], got),
                                  len(idx), budget)
            row.add("get", per_op_us(t0, t1, n_get), n_get, n)
            lost, wrong = compare(got, [vs[i] for i in idx])
            left = len(store.obj)
            row.lost += lost + max(0, n_put - left)
            row.wrong += wrong + max(0, left - n_put)
            row.checked += n_get
        finally:
            if store is not None:
                s.close(store)

    round_robin(ctx, "c", systems, rows, one)
    ctx.table(f"== c. persistent store: put {n:,} keys, close, reopen, get them (random order); "
              f"µs/op (close+open: ms), median of {ctx.cfg.repeats} ==", list(rows.values()),
              ("put", "close+open", "get"), units={"close+open": "ms"},
              fallbacks=("sqlite3 WAL, commit/op",))
    ctx.out("check: values read back after the reopen, and the count. Durability differs: "
            "lmdb fsyncs each write transaction (default sync=True); sqlite3 WAL with "
            "synchronous=NORMAL (and diskcache, which uses it) survives a process crash, not "
            "a power loss; pheap with its default durability the same; shelve/dbm.dumb writes "
            "through the OS.")


# ---------------------------------------------------------------------------------------------
# d. list
# ---------------------------------------------------------------------------------------------


def section_d(ctx: Ctx) -> None:
    n, budget = ctx.cfg.keys, ctx.cfg.budget
    _, vs = keys_values(n)
    order = ctx.order(n, "d")
    systems: list[ListSystem] = [pheap_objects.PheapList(), *peers.list_peers()]
    rows = new_rows(systems)

    def one(s: System, row: Row, folder: str) -> None:
        store = s.create(folder)
        try:
            lst = store.obj
            append = lst.append

            def app(a: int, b: int) -> None:
                for v in vs[a:b]:
                    append(v)
            t0, t1, n_app = phase(None, None, "append", app, n, budget)
            row.add("append", per_op_us(t0, t1, n_app), n_app, n)
            idx = [i for i in order if i < n_app]
            got: list[Any] = []
            t0, t1, n_get = phase(None, None, "index", _getter(lst, idx, got), len(idx), budget)
            row.add("index", per_op_us(t0, t1, n_get), n_get, n)
            lost, wrong = compare(got, [vs[i] for i in idx])
            size = len(lst)
            row.lost += lost + max(0, n_app - size)
            row.wrong += wrong + max(0, size - n_app)
            row.checked += n_get
        finally:
            s.close(store)

    round_robin(ctx, "d", systems, rows, one)
    ctx.table(f"== d. list of 100-char str, one process: append {n:,}, then read each by index "
              f"(random order); µs/op, median of {ctx.cfg.repeats} ==", list(rows.values()),
              ("append", "index"), fallbacks=("Manager().list()",))


# ---------------------------------------------------------------------------------------------
# e. counter
# ---------------------------------------------------------------------------------------------


def _e_adder(s: CounterSystem, store: Store, n: int, budget: float, barrier: Any) -> dict:
    add = s.adder(store)

    def step(a: int, b: int) -> None:
        for _ in range(a, b):
            add()
    gc.collect()
    barrier.wait(child_timeout(budget))
    t0, t1, done = phase(None, None, "add", step, n, budget, False)
    return {"t0": t0, "t1": t1, "n": done}


def section_e(ctx: Ctx) -> None:
    n, budget = ctx.cfg.adds, ctx.cfg.budget
    systems: list[CounterSystem] = [pheap_objects.PheapCounter(), *peers.counter_peers()]
    rows = new_rows(systems)

    def one(s: System, row: Row, folder: str) -> None:
        assert isinstance(s, CounterSystem)
        store = s.create(folder)
        try:
            add = s.adder(store)

            def step(a: int, b: int) -> None:
                for _ in range(a, b):
                    add()
            t0, t1, done = phase(None, None, "add", step, n, budget)
            row.add("1 proc", per_op_us(t0, t1, done), done, n)
            got = s.value(store)
            row.lost += max(0, done - got)
            row.wrong += max(0, got - done)
            row.checked += done
        finally:
            s.close(store)
        if not s.two_processes:
            return
        store = s.create(folder)
        try:
            barrier = FORK.Barrier(2)
            res = children([(_e_adder, (s, store, n, budget, barrier))] * 2, budget, barrier)
            total = sum(r["n"] for r in res)
            row.add("2 procs", (max(r["t1"] for r in res) - min(r["t0"] for r in res)) * 2
                    / total * 1e6, min(r["n"] for r in res), n)
            got = s.value(store)
            row.lost += max(0, total - got)
            row.wrong += max(0, got - total)
            row.checked += total
        finally:
            s.close(store)

    round_robin(ctx, "e", systems, rows, one)
    ctx.table(f"== e. counter: add 1, {n:,} times, in one process, then in 2 forked processes "
              f"at once (µs/add = wall x 2 / adds); median of {ctx.cfg.repeats} ==",
              list(rows.values()), ("1 proc", "2 procs"), fallbacks=("mp.Value, get_lock() held",))
    ctx.out("check: the counter's value afterwards against the adds done (LOST: updates that "
            "a race overwrote). mp.Value bare += 1 and Manager().Value read and write in two "
            "steps, with no lock held across them.")


# ---------------------------------------------------------------------------------------------
# f. queue
# ---------------------------------------------------------------------------------------------

END = "<end>"  #: what the producer puts last


def _f_producer(q: Any, vs: list[str], budget: float, barrier: Any) -> dict:
    put = q.put

    def step(a: int, b: int) -> None:
        for v in vs[a:b]:
            put(v)
    gc.collect()
    barrier.wait(child_timeout(budget))
    t0, t1, n = phase(None, None, "put", step, len(vs), budget, False)
    q.put(END)
    return {"t0": t0, "t1": t1, "n": n}


def _f_consumer(q: Any, vs: list[str], budget: float, barrier: Any) -> dict:
    timeout = child_timeout(budget)
    got = []
    gc.collect()
    barrier.wait(timeout)
    with gc_off(False):
        t0 = perf_counter()
        while True:
            x = q.get(timeout=timeout)
            if x == END:
                break
            got.append(x)
        t1 = perf_counter()
    wrong = sum(1 for g, v in zip(got, vs, strict=False) if g != v) + max(0, len(got) - len(vs))
    return {"t0": t0, "t1": t1, "n": len(got), "wrong": wrong}


def section_f(ctx: Ctx) -> None:
    n, budget = ctx.cfg.keys, ctx.cfg.budget
    _, vs = keys_values(n)
    systems: list[QueueSystem] = [pheap_objects.PheapQueue(), *peers.queue_peers()]
    rows = new_rows(systems)
    timeout = child_timeout(budget)

    def one(s: System, row: Row, folder: str) -> None:
        assert isinstance(s, QueueSystem)
        store = s.create(folder)
        try:
            q = store.obj
            put, get, got = q.put, q.get, []

            def trip(a: int, b: int) -> None:
                for v in vs[a:b]:
                    put(v)
                    got.append(get(timeout=timeout))
            t0, t1, done = phase(None, None, "trip", trip, n, budget)
            row.add("put+get", per_op_us(t0, t1, done), done, n)
            lost, wrong = compare(got, vs)
            row.lost += lost
            row.wrong += wrong
            row.checked += done
        finally:
            s.close(store)
        if not s.two_processes:
            return
        store = s.create(folder)
        try:
            barrier = FORK.Barrier(2)
            res = children([(_f_producer, (store.obj, vs, budget, barrier)),
                            (_f_consumer, (store.obj, vs, budget, barrier))], budget, barrier)
            put_n, got_n = res[0]["n"], res[1]["n"]
            row.add("1 -> 1 proc", (res[1]["t1"] - min(res[0]["t0"], res[1]["t0"]))
                    / max(got_n, 1) * 1e6, put_n, n)
            row.lost += max(0, put_n - got_n)
            row.wrong += res[1]["wrong"]
            row.checked += put_n
        finally:
            s.close(store)

    round_robin(ctx, "f", systems, rows, one)
    ctx.table(f"== f. queue of 100-char str: put+get round trip in one process; then one "
              f"process puts {n:,} items while another gets them (µs/item, first put to last "
              f"get); median of {ctx.cfg.repeats} ==", list(rows.values()),
              ("put+get", "1 -> 1 proc"), fallbacks=("Manager().Queue()",))
    ctx.out("check: every item got, in order, equal to the one put.")


# ---------------------------------------------------------------------------------------------
# g. a big array summed by 2 pool workers
# ---------------------------------------------------------------------------------------------

_W: Any = None  #: in a pool worker: the array it sums
_KEEP: Any = None  #: in a pool worker: what keeps _W's memory mapped


def _g_init(kind: str, arg: Any) -> None:
    global _W, _KEEP
    if kind == "shm":
        import numpy as np
        from multiprocessing import shared_memory

        name, n = arg
        _KEEP = shared_memory.SharedMemory(name=name)
        _W = np.ndarray((n,), dtype=np.float64, buffer=_KEEP.buf)
    elif kind == "obj":  # an array object inherited through fork (pheap's)
        _W = arg


def _g_sum(_: int) -> float:
    return float(_W.sum())


def _g_sum_arg(a: Any) -> float:
    return float(a.sum())


class _ArrayCase(NamedTuple):
    name: str
    floor: bool
    why: str | None


def section_g(ctx: Ctx) -> None:
    mb = ctx.cfg.array_mb
    names = [_ArrayCase("a.sum() in the parent (floor)", True, None),
             _ArrayCase("Pool arg (pickled)", False, None),
             _ArrayCase("shared_memory + np.ndarray", False, None),
             _ArrayCase("pheap h.ndarray", False, pheap_objects.unavailable("ndarray"))]
    try:
        import numpy as np
    except ImportError as e:
        why = f"not available (import numpy failed: {describe(e)})"
        names = [c._replace(why=c.why or why) for c in names]
        np = None
    rows = {c.name: Row(c.name, floor=c.floor, unavailable=c.why) for c in names}
    trips: dict[str, Callable[[], list[float]]] = {}
    pools: list[Any] = []
    closers: list[Callable[[], None]] = []
    if np is not None:
        n = mb * (1 << 20) // 8
        data = np.arange(n, dtype=np.float64)
        expect = float(n * (n - 1) // 2)  # exact: every partial sum is an integer below 2**53

        def pool(kind: str | None = None, arg: Any = None) -> Any:
            before = set(multiprocessing.active_children())
            p = FORK.Pool(2, initializer=_g_init, initargs=(kind, arg))
            pools.append((p, set(multiprocessing.active_children()) - before))
            return p
        try:
            trips[names[0].name] = lambda: [float(data.sum())] * 2
            pp = pool()
            trips[names[1].name] = lambda: pp.map(_g_sum_arg, [data, data], chunksize=1)
            from multiprocessing import shared_memory

            t0 = perf_counter()
            shm = shared_memory.SharedMemory(create=True, size=data.nbytes)
            closers += [shm.unlink, shm.close]  # run in reverse: close, then unlink
            np.ndarray((n,), dtype=np.float64, buffer=shm.buf)[:] = data  # the view dies here
            rows[names[2].name].notes.append(f"setup {perf_counter() - t0:.3f} s")
            ps = pool("shm", (shm.name, n))
            trips[names[2].name] = lambda: ps.map(_g_sum, [0, 1], chunksize=1)
            if rows[names[3].name].unavailable is None:
                try:
                    t0 = perf_counter()
                    h = pheap_objects.create_heap(ctx.tmp.path(), data.nbytes + (16 << 20))
                    closers.append(h.close)
                    arr = pheap_objects.ndarray(h, n)
                    arr[:] = data
                    rows[names[3].name].notes.append(f"setup {perf_counter() - t0:.3f} s")
                    ph = pool("obj", arr)  # fork: the workers inherit the heap and the array
                    del arr
                    trips[names[3].name] = lambda: ph.map(_g_sum, [0, 1], chunksize=1)
                except Exception as e:  # noqa: BLE001
                    rows[names[3].name].failed.append(describe(e))
            for name, trip in list(trips.items()):
                try:
                    trip()  # one untimed round: workers map the memory, pools warm up
                except Exception as e:  # noqa: BLE001
                    rows[name].failed.append(describe(e))
                    del trips[name]
            for r in range(ctx.cfg.repeats):
                for name in rotated(list(trips), r):
                    ctx.log(f"g, repeat {r + 1}/{ctx.cfg.repeats}: {name}")
                    row = rows[name]
                    try:
                        t0 = perf_counter()
                        got = trips[name]()
                        row.add("round trip", perf_counter() - t0)
                        row.wrong += sum(1 for g in got if g != expect)
                        row.checked += len(got)
                    except Exception as e:  # noqa: BLE001
                        row.failed.append(describe(e))
        finally:
            # close(): the workers (idle, or finishing a sum of milliseconds) exit on their own;
            # one that has not after a while is killed. (terminate() was seen to hang on a
            # busy machine: Pool.join waits for a worker the SIGTERM did not end.)
            for p, _ in pools:
                p.close()
            for _, workers in pools:
                reap(list(workers))
            for p, _ in pools:
                p.join()
            for close in reversed(closers):
                try:
                    close()
                except Exception as e:  # noqa: BLE001
                    ctx.out(f"g: cleanup: {describe(e)}")
    ctx.table(f"== g. a {mb} MB float64 array, 2 fork-pool workers each sum it: s per round "
              f"trip, median of {ctx.cfg.repeats} (after one untimed round) ==",
              list(rows.values()), ("round trip",), unit="s",
              fallbacks=("Pool arg (pickled)",))
    ctx.out("check: both sums exact. setup = making the shared copy (allocate + fill); the "
            "pickled Pool arg copies the array to each worker on every round trip.")


# ---------------------------------------------------------------------------------------------
# h. memory
# ---------------------------------------------------------------------------------------------

MEM_CHUNK = 10_000  #: entries per Manager().dict().update() call while filling it


def _h_items(n: int) -> Any:
    return ((key(i), i) for i in range(n))


def _h_dict_tracemalloc(n: int) -> dict:
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    d = dict(_h_items(n))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    ok = len(d) == n and d[key(n - 1)] == n - 1
    return {"bytes": after - before, "n": n, "wrong": 0 if ok else 1}


def _h_dict_rss(n: int) -> dict:
    gc.collect()
    before = rss_bytes() or 0
    d = dict(_h_items(n))
    after = rss_bytes() or 0
    ok = len(d) == n and d[key(n - 1)] == n - 1
    return {"bytes": after - before, "n": n, "wrong": 0 if ok else 1}


def section_h(ctx: Ctx) -> None:
    n, budget = ctx.cfg.entries, ctx.cfg.mem_budget
    rows = {name: Row(name) for name in (
        "pheap h.dict()", "dict, tracemalloc", "dict, RSS delta", "Manager().dict(), server RSS",
        "sqlite3 file")}
    rows["dict, tracemalloc"].floor = rows["dict, RSS delta"].floor = True
    why = pheap_objects.unavailable("dict", "stats")
    if why:
        rows["pheap h.dict()"].unavailable = why
    if rss_bytes() is None:
        rows["dict, RSS delta"].unavailable = rows["Manager().dict(), server RSS"].unavailable = \
            "not available (no /proc/<pid>/status here)"

    def measure(name: str, fn: Callable[[], tuple[int, int, str]]) -> None:
        row = rows[name]
        if row.unavailable is not None:
            return
        ctx.log(f"h: {name}")
        try:
            used, done, how = fn()
            # (a row that failed part way says so in its check cell, not as a budget cut)
            row.add("bytes/entry", used / max(done, 1), done, done if row.failed else n)
            row.notes.append(how)
        except Hung as e:
            row.failed.append(str(e))
        except Exception as e:  # noqa: BLE001
            row.failed.append(describe(e))

    def child(fn: Callable[[int], dict], how: str) -> Callable[[], tuple[int, int, str]]:
        def go() -> tuple[int, int, str]:
            r = children([(fn, (n,))], 0, timeout=120 + n / 2000)[0]
            if r.get("wrong"):
                raise RuntimeError("the dict read back wrong")
            return r["bytes"], r["n"], how
        return go

    def pheap_dict() -> tuple[int, int, str]:
        h = pheap_objects.create_heap(ctx.tmp.path())
        try:
            before = pheap_objects.used_bytes(h)
            d = h.dict()
            ks = [key(i) for i in range(n)]

            def step(a: int, b: int) -> None:
                for i in range(a, b):
                    d[ks[i]] = i
            try:
                _, _, done = phase(None, None, "fill", step, n, budget)
            except Exception as e:  # noqa: BLE001
                # pheap refused an entry: the row is flagged FAILED, and its figure is over the
                # entries that went in before (the operation that raised was rolled back)
                done = len(d)
                rows["pheap h.dict()"].failed.append(
                    f"{describe(e)} (at entry {done + 1:,}; the figure is over the {done:,} "
                    "entries before it)")
            used = pheap_objects.used_bytes(h) - before
            if len(d) != done or d[ks[done - 1]] != done - 1:
                rows["pheap h.dict()"].wrong += 1
            return used, done, "h.stats().used_bytes delta"
        finally:
            h.close()

    def manager_dict() -> tuple[int, int, str]:
        mgr = FORK.Manager()  # a fresh server: no garbage of the other sections in it
        try:
            pid = mgr._process.pid  # the server process (multiprocessing keeps it there)
            d = mgr.dict()
            gc.collect()
            before = rss_bytes(pid) or 0
            done = 0
            t_end = perf_counter() + budget
            while done < n and perf_counter() < t_end:
                m = min(n, done + MEM_CHUNK)
                d.update({key(i): i for i in range(done, m)})
                done = m
            after = rss_bytes(pid) or 0
            if len(d) != done:
                rows["Manager().dict(), server RSS"].lost += done - len(d)
            return after - before, done, f"RSS of the server, update() {MEM_CHUNK:,} a call"
        finally:
            mgr.shutdown()

    def sqlite_file() -> tuple[int, int, str]:
        import sqlite3

        path = ctx.tmp.path(".sqlite")
        con = sqlite3.connect(path)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value INTEGER)")
            con.executemany("INSERT INTO kv VALUES (?, ?)", _h_items(n))
            con.commit()
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if con.execute("SELECT COUNT(*) FROM kv").fetchone()[0] != n:
                rows["sqlite3 file"].lost += 1
        finally:
            con.close()
        size = os.path.getsize(path)
        for p in (path, path + "-wal", path + "-shm"):
            if os.path.exists(p):
                os.unlink(p)
        return size, n, "file size, WAL checkpointed"

    measure("pheap h.dict()", pheap_dict)
    measure("dict, tracemalloc", child(_h_dict_tracemalloc,
                                       "tracemalloc: keys, ints and table, in a fresh child"))
    measure("dict, RSS delta", child(_h_dict_rss, "RSS delta of a fresh child"))
    measure("Manager().dict(), server RSS", manager_dict)
    measure("sqlite3 file", sqlite_file)
    ctx.table(f"== h. memory: {n:,} entries of 10-char str -> int (0 .. {n - 1:,}); bytes "
              f"per entry, measured once ==", list(rows.values()), ("bytes/entry",), budget,
              unit="B", fallbacks=("dict, tracemalloc",), best="smallest")
    ctx.out("CPython's own dict counts its key strs (59 B each, 64 with pymalloc's rounding) "
            "and int objects (28-32 B; 0-256 are shared) besides its table. The RSS figures "
            "see whole pages and the allocator's free lists: coarse.")


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------

SECTION_FUNCS: dict[str, Callable[[Ctx], None]] = {
    "a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e,
    "f": section_f, "g": section_g, "h": section_h}


def expected_rows(section: str) -> list[str]:
    """The row names section ``section`` prints (available or not), for the tests."""
    if section == "a":
        return [s.name for s in dict_systems() if s.one_process]
    if section == "b":
        return [s.name for s in dict_systems() if s.two_processes]
    if section == "c":
        return [s.name for s in dict_systems() if s.persistent]
    if section == "d":
        return [s.name for s in (pheap_objects.PheapList(), *peers.list_peers())]
    if section == "e":
        return [s.name for s in (pheap_objects.PheapCounter(), *peers.counter_peers())]
    if section == "f":
        return [s.name for s in (pheap_objects.PheapQueue(), *peers.queue_peers())]
    if section == "g":
        return ["a.sum() in the parent (floor)", "Pool arg (pickled)",
                "shared_memory + np.ndarray", "pheap h.ndarray"]
    return ["pheap h.dict()", "dict, tracemalloc", "dict, RSS delta",
            "Manager().dict(), server RSS", "sqlite3 file"]


def run(out: Out, cfg: ObjConfig, sections: str, seed: int, command: str,
        verbose: bool = False) -> int:
    """Print the header and ``sections``; 2 if a pheap row failed or was flagged, else 0."""
    import sqlite3

    tmp = TempDir(prefix="pheap-objbench-")
    meter = env.BusyMeter()
    ctx = Ctx(out, cfg, tmp, seed, verbose)
    try:
        out(f"pheap object benchmark: {command}")
        out()
        out("== environment ==")
        out(env.environment(tmp.dir))
        out(f"peers: {env.package_versions(PEER_DISTS)}; sqlite {sqlite3.sqlite_version}; "
            f"default dbm {peers.default_dbm()}")
        out(f"config: sections {','.join(sections)}; {cfg.keys:,} keys/items; 2 x "
            f"{cfg.xkeys:,} keys across processes; {cfg.adds:,} adds; {cfg.array_mb} MB "
            f"array; {cfg.entries:,} entries for memory; {cfg.repeats} repeats; budget "
            f"{cfg.budget or 'none'} s a phase ({cfg.mem_budget} s a fill in h)")
        pheap_objects.reset_probe()
        probe = pheap_objects.probe()
        out("pheap API: " + "; ".join(f"{f} {'ok' if why is None else 'missing'}"
                                      for f, why in probe.items()))
        idle = env.idle_line()
        if idle is not None:
            out(idle)
        for sec in sections:
            SECTION_FUNCS[sec](ctx)
        out()
        if ctx.pheap_flagged:
            out("pheap FLAGGED: " + ", ".join(dict.fromkeys(ctx.pheap_flagged)))
        out(meter.line("; kernel threads writing the on-disk peers' files back count as "
                       "other processes"))
    finally:
        peers.shutdown_manager()
        sweep_shm()
        tmp.close()
    return 2 if ctx.pheap_flagged else 0

