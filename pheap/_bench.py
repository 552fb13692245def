"""``pheap bench``: a compact, self-contained benchmark of pheap's shared dict in one process.

N str keys (10 characters) -> 100-character str values: set every key, get every key (in a
shuffled order), delete every key; microseconds per operation for pheap's ``h.dict()`` on a file
heap and for what a user would pick instead: a plain ``dict`` (the floor: in-process, shares and
keeps nothing), ``multiprocessing.Manager().dict()``, ``shelve``, ``sqlite3`` (one table, WAL,
synchronous=NORMAL, one commit per operation), and the peers that happen to be importable
(sqlitedict, diskcache, lmdb, UltraDict; a 'not installed' line otherwise). Every store is fresh
for each repeat, in a folder of its own; the systems run round-robin, in an order that rotates
each repeat, with the garbage collector off in the timed loops; the table shows medians, and a
ratio against pheap. A phase that runs past its time budget stops early and is marked ``*``
(its figure is per operation over what it did). Values read back are checked: a row whose
values came back wrong says so.

Standard library only (and whatever peers import). The full benchmarks -- more systems, several
processes, persistence, lists, counters, queues, arrays -- live in the repository's tools/ folder.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

QUICK = {"keys": 2000, "repeats": 3, "budget": 2.0}  #: --quick: well under a minute
FULL = {"keys": 20000, "repeats": 5, "budget": 10.0}  #: the default: a few minutes
VALUE_LEN = 100  #: characters of every value
CHUNK = 256  #: operations between two looks at the clock (the budget)
FULL_BENCH = "tools/bench_all.py"  #: where the repository keeps the full benchmarks

Opened = tuple[Any, Callable[[], None]]  #: (the mapping, what closes it)


def keys_values(n: int) -> tuple[list[str], list[str]]:
    """The i-th key is 'k' and 9 digits; its value names it, padded to VALUE_LEN."""
    keys = [f"k{i:09d}" for i in range(n)]
    return keys, [f"value of {k} ".ljust(VALUE_LEN, ".") for k in keys]


# ---------------------------------------------------------------------------------------------
# The systems: each opens a fresh, empty mapping in a folder of its own
# ---------------------------------------------------------------------------------------------


def _pheap(folder: str) -> Opened:
    from . import open as open_heap

    h = open_heap(os.path.join(folder, "bench.heap"), "n")
    d = h.dict()
    return d, h.close


def _dict(folder: str) -> Opened:
    return {}, lambda: None


def _manager(folder: str) -> Opened:
    import multiprocessing

    m = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Manager()
    return m.dict(), m.shutdown


def _shelve(folder: str) -> Opened:
    import shelve

    s = shelve.open(os.path.join(folder, "shelf"), "n")
    return s, s.close


class _Sqlite:
    """A str -> str mapping in one sqlite3 table: WAL, synchronous=NORMAL, a commit per set
    and per delete."""

    def __init__(self, path: str) -> None:
        import sqlite3

        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL)")

    def __setitem__(self, k: str, v: str) -> None:
        self.db.execute("BEGIN")
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, v))
        self.db.execute("COMMIT")

    def __getitem__(self, k: str) -> str:
        row = self.db.execute("SELECT v FROM kv WHERE k = ?", (k,)).fetchone()
        if row is None:
            raise KeyError(k)
        return str(row[0])

    def __delitem__(self, k: str) -> None:
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM kv WHERE k = ?", (k,))
        self.db.execute("COMMIT")


def _sqlite(folder: str) -> Opened:
    s = _Sqlite(os.path.join(folder, "kv.sqlite"))
    return s, s.db.close


def _sqlitedict(folder: str) -> Opened:
    from sqlitedict import SqliteDict

    d = SqliteDict(os.path.join(folder, "kv.sqlite"), autocommit=True)
    return d, d.close


def _diskcache(folder: str) -> Opened:
    import diskcache

    d = diskcache.Index(os.path.join(folder, "index"))
    return d, d.cache.close


class _Lmdb:
    """A str -> str mapping in an LMDB environment: a transaction per operation, no fsync
    at commit (sync=False: safe from a process crash, as pheap and sqlite's WAL+NORMAL)."""

    def __init__(self, path: str) -> None:
        import lmdb

        self.env = lmdb.open(path, map_size=1 << 30, sync=False)  # like sqlite's NORMAL

    def __setitem__(self, k: str, v: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(k.encode(), v.encode())

    def __getitem__(self, k: str) -> str:
        with self.env.begin() as txn:
            v = txn.get(k.encode())
        if v is None:
            raise KeyError(k)
        return bytes(v).decode()

    def __delitem__(self, k: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(k.encode())


def _lmdb(folder: str) -> Opened:
    s = _Lmdb(os.path.join(folder, "lmdb"))
    return s, s.env.close


def _ultradict(folder: str) -> Opened:
    from UltraDict import UltraDict

    d = UltraDict(auto_unlink=True)

    def close() -> None:
        d.close()
        d.unlink()

    return d, close


#: (name as shown, module it needs (None: the standard library), opener)
SYSTEMS: list[tuple[str, str | None, Callable[[str], Opened]]] = [
    ("pheap h.dict(), file heap", None, _pheap),
    ("dict (in-process floor: shares nothing)", None, _dict),
    ("multiprocessing.Manager().dict()", None, _manager),
    ("shelve", None, _shelve),
    ("sqlite3 (a commit per op)", None, _sqlite),
    ("sqlitedict (autocommit)", "sqlitedict", _sqlitedict),
    ("diskcache.Index", "diskcache", _diskcache),
    ("lmdb (a txn per op, sync=False)", "lmdb", _lmdb),
    ("UltraDict", "UltraDict", _ultradict),
]


def _importable(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - anything failing on import means 'not here'
        return False
    return True


def _shelve_name() -> str:
    """'shelve (dbm.X)': the dbm module shelve uses here (the first of dbm's that imports)."""
    import dbm

    for name in getattr(dbm, "_names", ["dbm.gnu", "dbm.ndbm", "dbm.dumb"]):
        try:
            __import__(name)
        except ImportError:
            continue
        return f"shelve ({name})"
    return "shelve"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@contextmanager
def _no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _timed(op: Callable[[int], None], n: int, budget: float) -> tuple[float, int]:
    """(seconds, operations done) of ``op(i)`` for i in range(n), stopping after the chunk
    that passes ``budget`` seconds."""
    clock = time.perf_counter
    done = 0
    with _no_gc():
        t0 = clock()
        while done < n:
            end = min(done + CHUNK, n)
            for i in range(done, end):
                op(i)
            done = end
            if clock() - t0 > budget:
                break
        return clock() - t0, done


def _one(opener: Callable[[str], Opened], keys: list[str], values: list[str],
         order: list[int], budget: float) -> tuple[list[float], bool, bool]:
    """([set, get, delete] microseconds per op, whether a phase was cut, whether values read
    back wrong) for one fresh store."""
    folder = tempfile.mkdtemp(prefix="pheap-bench-")
    try:
        d, close = opener(folder)
        try:
            got: list[Any] = [None] * len(keys)

            def put(i: int) -> None:
                d[keys[i]] = values[i]

            t_set, n = _timed(put, len(keys), budget)
            mine = [i for i in order if i < n]

            def get(j: int) -> None:
                i = mine[j]
                got[i] = d[keys[i]]

            def delete(j: int) -> None:
                del d[keys[mine[j]]]

            t_get, n_get = _timed(get, len(mine), budget)
            wrong = any(got[i] != values[i] for i in mine[:n_get])
            t_del, n_del = _timed(delete, len(mine), budget)
        finally:
            close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cut = n < len(keys) or n_get < len(mine) or n_del < len(mine)
    return ([t / max(k, 1) * 1e6 for t, k in ((t_set, n), (t_get, n_get), (t_del, n_del))],
            cut, wrong)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def environment() -> str:
    """One line: Python, CPUs, load average, pheap's version, the OS."""
    from . import __version__

    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return (f"Python {platform.python_version()} ({platform.python_implementation()}), "
            f"{os.cpu_count()} CPUs, load average {load}, pheap {__version__}, "
            f"{platform.system()} {platform.machine()}")


def run(keys: int, repeats: int, budget: float, out: Callable[[str], None] = print,
        progress: Callable[[str], None] | None = None) -> int:
    """Run the benchmark and print its table through ``out``; return 0, or 1 when pheap's
    row failed or a store (pheap's included) read values back wrong."""
    ks, vs = keys_values(keys)
    order = list(range(keys))
    random.Random(1).shuffle(order)
    rows = [(name if opener is not _shelve else _shelve_name(), opener)
            for name, module, opener in SYSTEMS if _importable(module)]
    missing = [name for name, module, _ in SYSTEMS if not _importable(module)]
    times: dict[str, list[list[float]]] = {name: [] for name, _ in rows}
    cut: dict[str, bool] = dict.fromkeys(times, False)
    wrong: dict[str, bool] = dict.fromkeys(times, False)
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    for r in range(repeats):
        turn = rows[r % len(rows):] + rows[:r % len(rows)]
        for name, opener in turn:
            if name in failed:
                continue
            if progress is not None:
                progress(f"repeat {r + 1}/{repeats}: {name}")
            try:
                per_op, c, w = _one(opener, ks, vs, order, budget)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run here: say why
                failed[name] = f"{type(e).__name__}: {e}".splitlines()[0][:100]
                continue
            times[name].append(per_op)
            cut[name] |= c
            wrong[name] |= w
    mu = "\u00b5s" if _encodes("\u00b5") else "us"
    took = time.perf_counter() - t0
    out(f"pheap bench: {keys} str keys -> {VALUE_LEN}-char str values, one process; median of "
        f"{repeats} round-robin repeat{'s' if repeats != 1 else ''} ({took:.0f} s)")
    out(environment())
    width = max(len(name) for name, _ in rows) + 2
    out(f"{'store':<{width}}{'set ' + mu + '/op':>12}{'get ' + mu + '/op':>12}"
        f"{'del ' + mu + '/op':>12}{'vs pheap':>10}")
    med = {name: [statistics.median(t[i] for t in ts) for i in range(3)]
           for name, ts in times.items() if ts}
    base = sum(med.get(rows[0][0], [0.0]))
    for name, _ in rows:
        if name in failed:
            out(f"{name:<{width}}could not run: {failed[name]}")
            continue
        m = med[name]
        ratio = f"{sum(m) / base:.2f}x" if base else "-"
        flag = (" *" if cut[name] else "") + (" WRONG VALUES" if wrong[name] else "")
        out(f"{name:<{width}}{m[0]:>12.2f}{m[1]:>12.2f}{m[2]:>12.2f}{ratio:>10}{flag}")
    for name in missing:
        out(f"{name:<{width}}not installed")
    notes = ("vs pheap: the row's set + get + del time over pheap's (below 1: faster than "
             "pheap)" + ("; * a phase ran past its time budget and stopped early"
                         if any(cut.values()) else "") + ". pheap's dict takes the heap lock and "
             "journals every operation (crash-safe, shared by every process that opens the "
             "file); sqlite3: one table, WAL, synchronous=NORMAL, a commit per set and per "
             "delete.")
    for line in textwrap.wrap(notes, 96):
        out(line)
    out(f"The full benchmarks live in the repository's {FULL_BENCH}.")
    return 1 if any(wrong.values()) or rows[0][0] in failed else 0


def _encodes(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True
