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
    with pheap.open(str(tmp_path / "t.heap"), "n", journal=False) as h:
        malloc, realloc, free = it.raw_ops(h)
        p = realloc(malloc(24), 4000)
        free(p)
        h.check()
        assert 0 < it.blocks_off < h.stats().peak_brk <= it.mapping_for(h.stats().peak_brk)


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
    assert "The heap was checked after all rounds: clean, 0 used blocks left." in text


def test_bench_alloc_says_when_traces_are_absent(tmp_path):
    out, lines = collect()
    alloc_suites.bench_traces(out, 1, None, str(tmp_path / "none"), "nowhere")
    assert any(ln.startswith("skipped: no traces in nowhere") for ln in lines)


@pytest.mark.parametrize("name", ["env", "report", "timing", "traces", "firstfit", "internals",
                                  "contenders", "alloc_suites"])
def test_benchkit_doctests(name):
    mod = importlib.import_module(f"benchkit.{name}")
    assert doctest.testmod(mod, verbose=False).failed == 0


def test_modules_are_what_the_tools_use():
    assert firstfit.FirstFit is FirstFit
    assert alloc_suites.replay is traces.replay
