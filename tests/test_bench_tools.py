"""The benchmarks' own pieces (tools/benchkit): the first-fit baseline against a model, the trace
parser, the reporter's table and ratio arithmetic, and tiny end-to-end runs of both benchmarks.
(The full benchmarks are run by hand; they take minutes, and timings are no test.)"""

from __future__ import annotations

import doctest
import importlib
import itertools
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from benchkit import alloc_suites, firstfit, report, timing, traces  # noqa: E402
from benchkit.firstfit import FirstFit  # noqa: E402
from benchkit.report import Out, Row  # noqa: E402


class Lines(list):
    """An ``Out`` target that collects what it is given."""

    def write(self, s: str) -> None:
        self.extend(s.splitlines())

    def flush(self) -> None:
        pass


def collect() -> tuple[Out, Lines]:
    lines = Lines()
    return Out(lines, echo=False), lines


# ---------------------------------------------------------------------------------------------
# first-fit
# ---------------------------------------------------------------------------------------------


def _pattern(serial: int, n: int) -> bytes:
    return bytes((serial * 7 + k) % 251 for k in range(n))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_first_fit_random_ops_keep_contents(seed):
    """A model (serial -> offset, length, contents) against random malloc/realloc/free."""
    rng = random.Random(seed)
    ff = FirstFit(capacity=64)  # tiny, so that the bytearray grows many times
    live: dict[int, tuple[int, int]] = {}  # serial -> (offset, length)
    for serial in range(400):
        r = rng.random()
        if live and r < 0.35:
            s = rng.choice(list(live))
            off, n = live.pop(s)
            assert ff.buf[off:off + n] == _pattern(s, n)
            ff.free(off)
        elif live and r < 0.5:
            s = rng.choice(list(live))
            off, n = live[s]
            n2 = rng.choice((rng.randint(0, 64), rng.randint(1, 3000)))
            off2 = ff.realloc(off, n2)
            keep = min(n, n2)
            assert ff.buf[off2:off2 + keep] == _pattern(s, n)[:keep]
            ff.buf[off2:off2 + n2] = _pattern(s, n2)
            live[s] = (off2, n2)
        else:
            n = rng.choice((rng.randint(0, 40), rng.randint(1, 2000)))
            off = ff.malloc(n)
            assert off % 8 == 0 and off > 0 and ff.usable_size(off) >= n
            ff.buf[off:off + n] = _pattern(serial, n)
            live[serial] = (off, n)
        ff.check()
    spans = sorted((off, off + max(n, 1)) for off, n in live.values())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "live blocks overlap"
    for s, (off, n) in live.items():
        assert ff.buf[off:off + n] == _pattern(s, n)
        ff.free(off)
    ff.check()
    assert ff.brk == 8 and ff.head == 0  # everything merged back into the wilderness
    assert ff.peak <= len(ff.buf)


def test_first_fit_reuses_split_and_coalesces():
    ff = FirstFit()
    a, b, c = ff.malloc(100), ff.malloc(100), ff.malloc(100)
    ff.free(a)
    ff.free(b)  # merges with a
    assert ff.malloc(200) == a  # the merged block, first fit
    d = ff.malloc(8)  # carved at brk: nothing free fits
    assert d > c
    with pytest.raises(ValueError):
        ff.free(a + 8)  # not the start of a block: its header word is payload
    ff.free(d)
    with pytest.raises(ValueError):
        ff.free(d)  # past brk now
    ff.check()


# ---------------------------------------------------------------------------------------------
# traces
# ---------------------------------------------------------------------------------------------


def test_parse_trace_reads_a_small_trace(tmp_path):
    p = tmp_path / "tiny-bal.rep"
    p.write_text("20000\n3\n7\n1\na 0 100\na 1 50\nr 0 300\nf 1\na 2 0\nf 0\nf 2\n")
    t = traces.parse_trace(str(p))
    assert (t.name, t.suggested_heap, t.n_ids, t.n_ops, t.weight) == ("tiny-bal", 20000, 3, 7, 1)
    assert t.ops == [(traces.OP_ALLOC, 0, 100), (traces.OP_ALLOC, 1, 50),
                     (traces.OP_REALLOC, 0, 300), (traces.OP_FREE, 1, 0),
                     (traces.OP_ALLOC, 2, 0), (traces.OP_FREE, 0, 0), (traces.OP_FREE, 2, 0)]
    assert t.peak_live == 350  # 300 + 50, after the realloc
    ff = FirstFit()
    traces.replay(t, ff.malloc, ff.realloc, ff.free)
    ff.check()
    assert ff.brk == 8


@pytest.mark.parametrize("body, why", [
    ("20000\n2\n2\n1\na 0 10\nf 1\n", "not live"),
    ("20000\n2\n2\n1\na 0 10\na 0 10\n", "which is live"),
    ("20000\n2\n3\n1\na 0 10\nf 0\n", "header says 3 ops"),
    ("20000\n2\n1\n1\na 5 10\n", "outside"),
    ("20000\n2\n1\n1\nx 0 10\n", "expected"),
    ("20000\n2\n", "header lines"),
])
def test_parse_trace_rejects_bad_traces(tmp_path, body, why):
    p = tmp_path / "bad.rep"
    p.write_text(body)
    with pytest.raises(ValueError, match=why):
        traces.parse_trace(str(p))


def test_load_traces_names_the_files_it_skips(tmp_path):
    (tmp_path / "good.rep").write_text("1\n1\n2\n1\na 0 8\nf 0\n")
    (tmp_path / "bad.rep").write_text("1\n1\n")
    got, skipped = traces.load_traces(traces.trace_files(str(tmp_path)))
    assert [t.name for t in got] == ["good"]
    assert len(skipped) == 1 and "bad.rep" in skipped[0]
    assert traces.trace_files(str(tmp_path / "absent")) == []


# ---------------------------------------------------------------------------------------------
# reporter
# ---------------------------------------------------------------------------------------------


def test_table_aligns_and_spans():
    out, lines = collect()
    out.table(["contender", "us", "x"], [["a", "1.25", "2.00x"], [""] * 3,
                                         ["long name", report.Span("not available (why)")]])
    assert lines == ["contender    us      x",
                     "---------  ----  -----",
                     "a          1.25  2.00x",
                     "",
                     "long name  not available (why)"]


def test_number_formats():
    assert report.us(0.4567) == "0.46" and report.us(123.4) == "123"
    assert report.ratio(2) == "2.00x" and report.pct(0.5) == "50.0 %"
    assert report.spread([9.0, 10.0, 12.0]) == "30 %"  # (12 - 9) / 10
    assert report.fig(0.5) == "0.500" and report.fig(12345.6) == "12346"
    assert report.xratio(0.5) == "0.50x" and report.xratio(0.05) == "0.05x"


def _row(name, get, set_, **kw):
    r = Row(name, **kw)
    for g, s in zip(get, set_, strict=True):
        r.add("get", g)
        r.add("set", s)
    return r


def test_results_table_ratios_cuts_flags_and_fastest():
    rows = [Row("pheap h.dict()", unavailable="pheap: not available (no h.dict())"),
            _row("Manager().dict()", [30.0, 40.0, 50.0], [10.0, 20.0, 30.0]),
            _row("fast but wrong", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], lost=3, checked=100),
            _row("dict (floor)", [0.1, 0.1, 0.1], [0.1, 0.1, 0.1], floor=True),
            _row("slow", [80.0, 80.0, 80.0], [5.0, 5.0, 5.0])]
    rows[-1].add("get", 80.0, done=10, full=100)  # one repeat cut by the budget
    out, lines = collect()
    ref = report.results_table(out, rows, ("set", "get"), fallbacks=("Manager().dict()",),
                               budget=0.5)
    assert ref is rows[1]  # no usable pheap row: the fallback
    text = "\n".join(lines)
    by_name = {ln.split("  ")[0]: ln for ln in lines}
    assert "pheap: not available (no h.dict())" in by_name["pheap h.dict()"]
    mgr = by_name["Manager().dict()"].split()
    # set median 20, get median 40; ratios against itself 1.00x; spread (50 - 30) / 40 and
    # (30 - 10) / 20: the larger, 100 %
    assert mgr[1:7] == ["20.0", "40.0", "100", "%", "1.00x", "1.00x"]
    slow = by_name["slow"].split()
    assert slow[1:3] == ["5.00", "80.0*"] and slow[5:7] == ["0.25x", "2.00x"]
    assert "!!! LOST 3 of 100 checked" in by_name["fast but wrong"]
    assert "cut short by the 0.5 s budget" in text and "slow get 10" in text
    # the floor and the flagged row are never the fastest
    assert "fastest (floors and flagged rows left out): set: slow (5.00 µs); " \
           "get: Manager().dict() (40.0 µs)" in text


def test_reference_prefers_a_pheap_row():
    rows = [_row("Manager().dict()", [1.0], [1.0]), _row("pheap h.dict()", [2.0], [2.0])]
    assert report.reference(rows, ("get",), ("Manager().dict()",)).name == "pheap h.dict()"
    rows[1].failed.append("KeyError: 'k'")
    assert report.reference(rows, ("get",), ("Manager().dict()",)).name == "Manager().dict()"


def test_budgeted_stops_on_time_and_counts():
    seen = []
    dt, done = timing.budgeted(lambda a, b: seen.extend(range(a, b)), 1000, None)
    assert done == 1000 and seen == list(range(1000))
    dt, done = timing.budgeted(lambda a, b: __import__("time").sleep(0.01), 10**6, 0.02)
    assert done < 10**6 and done % timing.CHUNK == 0


# ---------------------------------------------------------------------------------------------
# pheap internals, and a tiny end-to-end run of the allocator benchmark
# ---------------------------------------------------------------------------------------------


def test_the_one_internals_function_still_fits_pheap(tmp_path):
    """If this fails, pheap's internals moved: adapt benchkit/internals.py:pheap_internals()."""
    import pheap
    from benchkit.internals import pheap_internals

    it = pheap_internals()
    with pheap.open(str(tmp_path / "t.heap"), "n") as h:
        malloc, realloc, free = it.raw_ops(h)
        with h.lock():  # how the benchmark calls them
            ps = [malloc(24) for _ in range(100)]  # slots
            p = realloc(malloc(24), 4000)  # a slot moved into a block
            h.write(p, b"x" * 4000)
            p = realloc(p, 200_000)  # a block big enough to give pages back when freed
            assert h.read(p, 4000) == b"x" * 4000
            for q in ps:
                free(q)
        free(p)  # without the lock: it takes it
        h.check()
        st = h.stats()
        assert st.used_blocks == 0
        assert 0 < it.blocks_off < st.peak_brk <= it.mapping_for(st.peak_brk)
        assert it.mapping_for(st.peak_brk) <= h.capacity


def _random_trace(path, n_ids, seed):
    rng = random.Random(seed)
    live, ops = set(), []
    for i in range(n_ids):
        ops.append(f"a {i} {rng.randint(1, 3000)}")
        live.add(i)
        if rng.random() < 0.3:
            j = rng.choice(sorted(live))
            ops.append(f"r {j} {rng.randint(1, 5000)}")
        if rng.random() < 0.5:
            j = rng.choice(sorted(live))
            live.remove(j)
            ops.append(f"f {j}")
    ops += [f"f {j}" for j in sorted(live)]
    path.write_text(f"100000\n{n_ids}\n{len(ops)}\n1\n" + "\n".join(ops) + "\n")


TINY = alloc_suites.AllocConfig(1, 1, 0.002, (100,), 100, 1, 1.0, (100, 200), 200, 1,
                                1, 0.05, 1, 0.002, (100,))


def test_bench_alloc_tiny_run_end_to_end(tmp_path):
    tdir = tmp_path / "traces"
    tdir.mkdir()
    _random_trace(tdir / "mix-bal.rep", 400, 1)
    _random_trace(tdir / "short1-bal.rep", 5, 2)  # a tiny trace: left out of the averages
    out, lines = collect()
    assert alloc_suites.run(out, TINY, 1, "tiny", str(tdir), "test traces") == 0
    text = "\n".join(lines)
    for heading in ("== 1. environment ==", "== 2. malloc-lab trace replay ==",
                    "2 traces from test traces", "-- 3a. fixed 24 B malloc+free pair",
                    "-- 3b. random churn", "-- 3c. pheap Allocator per-op time",
                    "-- 3d. the lock across processes", "-- 4. the cost of crash safety",
                    "average of the 1 larger", "total time"):
        assert heading in text, heading
    for who in ("pheap Allocator", "pheap Heap lock/op", "mp.heap", "first-fit",
                alloc_suites.FLOCK, alloc_suites.LSEEK):  # the system-call floor, same run
        assert any(ln.startswith(who) for ln in lines), who
    assert "System-call floor" in text
    assert "The heap was checked after all rounds: clean, 0 live allocations left." in text


def test_bench_alloc_says_when_traces_are_absent(tmp_path):
    out, lines = collect()
    alloc_suites.bench_traces(out, 1, None, str(tmp_path / "none"), "nowhere")
    assert any(ln.startswith("skipped: no traces in nowhere") for ln in lines)


@pytest.mark.parametrize("name", ["env", "report", "timing", "traces", "firstfit", "internals",
                                  "contenders", "alloc_suites", "stores", "procs", "peers",
                                  "pheap_objects", "object_suites"])
def test_benchkit_doctests(name):
    mod = importlib.import_module(f"benchkit.{name}")
    assert doctest.testmod(mod, verbose=False).failed == 0


def test_modules_are_what_the_tools_use():
    assert firstfit.FirstFit is FirstFit
    assert alloc_suites.replay is traces.replay


# ---------------------------------------------------------------------------------------------
# The object benchmark
# ---------------------------------------------------------------------------------------------

from benchkit import object_suites, peers, pheap_objects  # noqa: E402

TINY_OBJ = ["--keys", "40", "--xkeys", "40", "--adds", "200", "--array-mb", "1",
            "--entries", "3000", "--repeats", "1", "--budget", "0.5"]


RACY = {"mp.Value, bare += 1", "Manager().Value, += 1"}  #: may lose updates: flagged if so


def _bench_objects():
    spec = importlib.util.spec_from_file_location("bench_objects_cli",
                                                  os.path.join(TOOLS, "bench_objects.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the thin command line only; the work is in benchkit
    return mod


def _section_lines(lines: list[str], section: str) -> list[str]:
    """The lines of the report from section ``section``'s heading to the next section's."""
    start = next(k for k, ln in enumerate(lines) if ln.startswith(f"== {section}. "))
    end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("== ")),
               len(lines))
    return lines[start:end]


def _row_line(block: list[str], name: str) -> str:
    hits = [ln for ln in block if ln.startswith(name + "  ")]
    assert hits, f"no row {name!r} in:\n" + "\n".join(block)
    return hits[0]


def _run_objects(tmp_path, extra=()):
    out_file = tmp_path / "objects.txt"
    rc = _bench_objects().main([*TINY_OBJ, *extra, "-o", str(out_file)])
    return rc, out_file.read_text(encoding="utf-8").splitlines()


def test_bench_objects_tiny_run_every_row_present(tmp_path, capsys):
    """Every section prints every row: figures, or 'not available (why)' for a peer that is
    not installed here. pheap's rows have figures (numpy's only where it is installed), and
    every row verifies clean. Nothing is skipped silently."""
    try:
        import numpy  # noqa: F401
        have_numpy = True
    except ImportError:
        have_numpy = False
    rc, lines = _run_objects(tmp_path)
    capsys.readouterr()
    text = "\n".join(lines)
    assert lines[0].startswith("pheap object benchmark: python3 tools/bench_objects.py --keys 40")
    assert "-o" not in lines[0]
    assert any(ln.startswith("Python ") for ln in lines) and "peers: " in text
    for sec in object_suites.SECTIONS:
        block = _section_lines(lines, sec)
        for name in object_suites.expected_rows(sec):
            line = _row_line(block, name)
            cells = line[len(name):].strip()
            if name.startswith("pheap"):
                if "not available" in cells:  # only what needs numpy, where it is absent
                    assert not have_numpy and sec == "g", line
                    assert cells.startswith("pheap: not available ("), line
                else:
                    assert "!!!" not in cells, line  # pheap's rows verify clean too
            elif "not available" in cells:
                assert cells.startswith("not available ("), line
            elif name not in RACY:
                assert "!!!" not in cells, line  # the peers lose nothing and read right
    for mod, rows in (("lmdb", ["lmdb, txn/op"]), ("diskcache", ["diskcache.Index"]),
                      ("UltraDict", ["UltraDict"]), ("sqlitedict", ["sqlitedict, autocommit"]),
                      ("numpy", ["Pool arg (pickled)"])):
        try:
            __import__(mod)
            installed = True
        except ImportError:
            installed = False
        for name in rows:
            line = next(ln for ln in lines if ln.startswith(name + "  "))
            assert ("not available" in line) != installed, line
    # the rows that need nothing but the standard library always have figures
    for sec, name in (("a", "Manager().dict()"), ("a", "sqlite3 WAL, commit/op"),
                      ("c", "shelve (" + peers.default_dbm() + ")"), ("d", "list (floor)"),
                      ("e", "mp.Value, get_lock() held"), ("f", "mp.Queue"),
                      ("h", "dict, tracemalloc")):
        assert "not available" not in _row_line(_section_lines(lines, sec), name)
    assert "pheap API: open ok; dict ok; root ok; list ok; queue ok; counter ok" in text
    assert "total time" in lines[-1]
    assert rc == 0



def test_bench_objects_rejects_bad_arguments(capsys):
    cli = _bench_objects()
    for bad in (["--sections", "az"], ["--keys", "0"], ["--budget", "-1"]):
        with pytest.raises(SystemExit):
            cli.main(bad)
    capsys.readouterr()


class _FakePheap:
    """A stand-in for pheap with the planned object API (pheap.open, h.dict(), h.root, h.list(),
    h.queue(), h.counter(), h.ndarray(), h.stats().used_bytes), kept in a sqlite3 file at the
    heap's path so that forked children (inherited or reopened by path) share it. Slow, and
    only here to run the benchmark's pheap rows before pheap has them. ``wrong_key``: the
    dict reads a wrong value for that key; ``drop``: it ignores a set of a key ending so (to
    see the rows flagged)."""

    __version__ = "fake"

    class Heap:
        def __init__(self, path, wrong_key=None, drop=None):
            self.path, self.wrong_key, self.drop = path, wrong_key, drop
            self._pid, self._c = None, None
            c = self.con
            c.execute("CREATE TABLE IF NOT EXISTS kv (obj TEXT, k TEXT, v, "
                      "PRIMARY KEY (obj, k))")
            c.execute("CREATE TABLE IF NOT EXISTS seq (obj TEXT, id INTEGER PRIMARY KEY "
                      "AUTOINCREMENT, v)")
            c.execute("CREATE TABLE IF NOT EXISTS meta (n INTEGER)")
            if c.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 0:
                c.execute("INSERT INTO meta VALUES (0)")

        @property
        def con(self):
            import sqlite3

            if self._pid != os.getpid():  # a forked child: its own connection
                self._c = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                self._c.execute("PRAGMA journal_mode=WAL")
                self._pid = os.getpid()
            return self._c

        def _new(self, cls, *args):
            c = self.con
            c.execute("UPDATE meta SET n = n + 1")
            return cls(self, f"o{c.execute('SELECT n FROM meta').fetchone()[0]}", *args)

        def dict(self):
            return self._new(_FakePheap.Dict)

        @property
        def root(self):
            return _FakePheap.Dict(self, "root")

        def list(self):
            return self._new(_FakePheap.List)

        def queue(self):
            return self._new(_FakePheap.Queue)

        def counter(self):
            return self._new(_FakePheap.Counter)

        def ndarray(self, shape, dtype):
            import numpy as np

            return np.memmap(self.path + ".array", dtype=dtype, mode="w+", shape=shape)

        def stats(self):
            n = self.con.execute("SELECT COUNT(*) FROM kv").fetchone()[0]
            return type("Stats", (), {"used_bytes": 64 * n})()

        def close(self):
            if self._c is not None and self._pid == os.getpid():
                self._c.close()
            self._c = None

    class Obj:
        def __init__(self, heap, name):
            self.h, self.name = heap, name

    class Dict(Obj):
        def __setitem__(self, k, v):
            if self.h.drop and k.endswith(self.h.drop):
                return  # a lost update
            if isinstance(v, _FakePheap.Obj):
                v = "\0" + v.name
            self.h.con.execute("REPLACE INTO kv VALUES (?, ?, ?)", (self.name, k, v))

        def __getitem__(self, k):
            row = self.h.con.execute("SELECT v FROM kv WHERE obj = ? AND k = ?",
                                     (self.name, k)).fetchone()
            if row is None:
                raise KeyError(k)
            if isinstance(row[0], str) and row[0].startswith("\0"):
                return _FakePheap.Dict(self.h, row[0][1:])
            return "wrong" if k == self.h.wrong_key else row[0]

        def __delitem__(self, k):
            if self.h.con.execute("DELETE FROM kv WHERE obj = ? AND k = ?",
                                  (self.name, k)).rowcount == 0:
                raise KeyError(k)

        def __len__(self):
            return self.h.con.execute("SELECT COUNT(*) FROM kv WHERE obj = ?",
                                      (self.name,)).fetchone()[0]

    class List(Obj):
        def append(self, v):
            self.h.con.execute("INSERT INTO seq (obj, v) VALUES (?, ?)", (self.name, v))

        def __getitem__(self, i):
            row = self.h.con.execute("SELECT v FROM seq WHERE obj = ? ORDER BY id LIMIT 1 "
                                     "OFFSET ?", (self.name, i)).fetchone()
            if row is None:
                raise IndexError(i)
            return row[0]

        def __len__(self):
            return self.h.con.execute("SELECT COUNT(*) FROM seq WHERE obj = ?",
                                      (self.name,)).fetchone()[0]

    class Queue(List):
        def put(self, v):
            self.append(v)

        def qsize(self):
            return len(self)

        def get(self, timeout=None):
            import queue as queue_mod
            import time

            deadline = time.monotonic() + (timeout or 0)
            while True:
                c = self.h.con
                c.execute("BEGIN IMMEDIATE")
                row = c.execute("SELECT id, v FROM seq WHERE obj = ? ORDER BY id LIMIT 1",
                                (self.name,)).fetchone()
                if row is not None:
                    c.execute("DELETE FROM seq WHERE id = ?", (row[0],))
                c.execute("COMMIT")
                if row is not None:
                    return row[1]
                if time.monotonic() > deadline:
                    raise queue_mod.Empty
                time.sleep(0.0005)

    class Counter(Obj):
        def add(self, n):
            self.h.con.execute("REPLACE INTO kv VALUES (?, '', COALESCE((SELECT v FROM kv "
                               "WHERE obj = ? AND k = ''), 0) + ?)", (self.name, self.name, n))

        @property
        def value(self):
            row = self.h.con.execute("SELECT v FROM kv WHERE obj = ? AND k = ''",
                                     (self.name,)).fetchone()
            return row[0] if row else 0

    def __init__(self, wrong_key=None, drop=None):
        self.wrong_key, self.drop = wrong_key, drop

    def open(self, path, flag="c", size=0):
        if flag == "n":
            for p in (path, path + "-wal", path + "-shm"):
                if os.path.exists(p):
                    os.unlink(p)
        elif not os.path.exists(path):
            raise FileNotFoundError(path)
        return _FakePheap.Heap(path, self.wrong_key, self.drop)


def test_bench_objects_pheap_rows_with_the_planned_api(tmp_path, monkeypatch, capsys):
    """With a stand-in for the planned API, every pheap row has figures, the ratios are taken
    against pheap, and the run exits 0."""
    monkeypatch.setattr(pheap_objects, "_module", lambda: _FakePheap())
    rc, lines = _run_objects(tmp_path, ["--sections", "a,b,c,d,e,f,h"])
    capsys.readouterr()
    assert rc == 0, "\n".join(lines)
    assert "pheap API: open ok; dict ok; root ok; list ok; queue ok; counter ok" in "\n".join(
        lines)
    for sec in "abcdefh":
        block = _section_lines(lines, sec)
        names = [n for n in object_suites.expected_rows(sec) if n.startswith("pheap")]
        for name in names:
            line = _row_line(block, name)
            assert "not available" not in line and "!!!" not in line, line
        assert "1.00x" in _row_line(block, names[0])  # the reference
        assert any(ln.startswith(f"/ref = this / {names[0]},") for ln in block), block


def test_bench_objects_flags_a_wrong_value(tmp_path, monkeypatch, capsys):
    """A store that reads back one wrong value is flagged (and the run exits 2 when it is
    pheap's), not timed as if it were right."""
    monkeypatch.setattr(pheap_objects, "_module", lambda: _FakePheap(wrong_key="k000000007"))
    rc, lines = _run_objects(tmp_path, ["--sections", "a"])
    capsys.readouterr()
    assert rc == 2
    line = _row_line(_section_lines(lines, "a"), "pheap h.dict()")
    assert "!!! WRONG 1 of" in line
    assert any(ln.startswith("pheap FLAGGED: pheap h.dict()") for ln in lines)
    assert any(ln.startswith("/ref = this / Manager().dict()") for ln in lines)


def test_bench_objects_flags_lost_updates_across_processes(tmp_path, monkeypatch, capsys):
    """A store that drops an update is flagged LOST in one process, when another process
    reads, and when both write; one lost update is counted once."""
    monkeypatch.setattr(pheap_objects, "_module", lambda: _FakePheap(drop="000000005"))
    rc, lines = _run_objects(tmp_path, ["--sections", "a,b"])
    capsys.readouterr()
    assert rc == 2
    assert "!!! LOST 1 of" in _row_line(_section_lines(lines, "a"), "pheap h.dict()")
    b = _section_lines(lines, "b")
    both = b.index(next(ln for ln in b if ln.startswith("-- b. both at once")))
    for name in ("pheap h.dict()", 'pheap h.root["bench"]'):
        assert "!!! LOST 1 of" in _row_line(b[:both], name)  # one writes, one reads
        assert "!!! LOST 2 of" in _row_line(b[both:], name)  # one key of each writer
    assert "!!!" not in _row_line(b, "Manager().dict()")


# ---------------------------------------------------------------------------------------------
# The one generated file: tools/bench_all.py
# ---------------------------------------------------------------------------------------------


def _bench_all():
    spec = importlib.util.spec_from_file_location("bench_all_cli",
                                                  os.path.join(TOOLS, "bench_all.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_all_writes_one_markdown_file(tmp_path, capsys):
    """A --tiny run over a tiny trace folder: the file has its title, the exact command line,
    the environment, and both benchmarks' sections with their output in code blocks."""
    tdir = tmp_path / "traces"
    tdir.mkdir()
    _random_trace(tdir / "mix-bal.rep", 200, 3)
    out = tmp_path / "docs" / "bench.md"  # the folder is made
    argv = ["--tiny", "--traces", str(tdir), "-o", str(out)]
    rc = _bench_all().main(argv)
    capsys.readouterr()
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# pheap benchmarks"
    gen = next(ln for ln in lines if ln.startswith("Generated by "))
    assert gen.startswith("Generated by `python tools/bench_all.py --tiny --traces "
                          f"{tdir} -o {out}` on ")
    for item in ("- CPU: ", "- load average at the start", "- Python ", "- pheap ",
                 "- peers: "):
        assert any(ln.startswith(item) for ln in lines), item
    assert "Size: --tiny" in text
    a = lines.index(next(ln for ln in lines if ln.startswith("## 1. The allocator")))
    b = lines.index(next(ln for ln in lines if ln.startswith("## 2. Shared objects")))
    assert a < b
    for start, end, first in ((a, b, "pheap allocator benchmark: python tools/bench_all.py"),
                              (b, len(lines), "pheap object benchmark: python tools/bench_all.py")):
        part = lines[start:end]
        assert any(ln.startswith("How to read it.") for ln in part)
        fence = part.index("```text")
        assert part[fence + 1].startswith(first)
        assert "```" in part[fence + 2:]  # the block is closed
    for heading in ("== 2. malloc-lab trace replay ==", "1 traces from the folder given",
                    "-- 3a. fixed 24 B", "-- 4. the cost of crash safety", "== a. dict, one",
                    "== h. memory"):
        assert heading in text, heading
    assert sum(ln.startswith("total time ") for ln in lines) == 2  # both ran to their end
    assert rc == 0, text  # (2: a pheap row was flagged; the file would say which)
    assert "flagged a pheap row" not in text
    assert not os.path.exists(str(out) + ".tmp")


def test_bench_all_rejects_bad_arguments(capsys):
    cli = _bench_all()
    for bad in (["--repeats", "0"], ["--quick", "--tiny"]):
        with pytest.raises(SystemExit):
            cli.main(bad)
    capsys.readouterr()
