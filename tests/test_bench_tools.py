"""The pieces of tools/bench_alloc.py that its figures rest on: the first-fit baseline and the
trace parser. (The benchmark itself is run by hand; it takes minutes, and timings are no test.)"""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
import sys

import pytest

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                     "bench_alloc.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_alloc", _TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_alloc", mod)
    spec.loader.exec_module(mod)
    return mod


bench = _load()


def _pattern(serial: int, n: int) -> bytes:
    return bytes((serial * 7 + k) % 251 for k in range(n))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_first_fit_random_ops_keep_contents(seed):
    rng = random.Random(seed)
    ff = bench.FirstFit(capacity=64)  # tiny, so that the bytearray grows many times
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
    ff = bench.FirstFit()
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


def test_parse_trace_reads_a_small_trace(tmp_path):
    p = tmp_path / "tiny-bal.rep"
    p.write_text("20000\n3\n7\n1\na 0 100\na 1 50\nr 0 300\nf 1\na 2 0\nf 0\nf 2\n")
    t = bench.parse_trace(str(p))
    assert (t.name, t.suggested_heap, t.n_ids, t.n_ops, t.weight) == ("tiny-bal", 20000, 3, 7, 1)
    assert t.ops == [(bench.OP_ALLOC, 0, 100), (bench.OP_ALLOC, 1, 50),
                     (bench.OP_REALLOC, 0, 300), (bench.OP_FREE, 1, 0),
                     (bench.OP_ALLOC, 2, 0), (bench.OP_FREE, 0, 0), (bench.OP_FREE, 2, 0)]
    assert t.peak_live == 350  # 300 + 50, after the realloc
    ff = bench.FirstFit()
    bench.replay(t, ff.malloc, ff.realloc, ff.free)
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
        bench.parse_trace(str(p))


def test_tool_doctests():
    import doctest

    assert doctest.testmod(bench, verbose=False).failed == 0
