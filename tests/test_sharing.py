"""Many processes, one heap: fork, spawn pools, unrelated programs, growth, create races."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

import pheap

from conftest import reap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _make(kind: str, tmp_path, size: int = 1 << 16) -> pheap.Heap:
    if kind == "file":
        return pheap.open(str(tmp_path / "s.heap"), "n", size=size)
    if kind == "memfd":
        return pheap.memfd(size)
    return pheap.anonymous(8 << 20)


def _child_fill(h: pheap.Heap, tag: int, n: int) -> list[int]:
    offs = []
    for i in range(n):
        off = h.malloc(32 + i % 200)
        h.write(off, bytes([tag]) * (32 + i % 200))
        offs.append(off)
    return offs


# -- fork ------------------------------------------------------------------------------------


def _mp_child(h: pheap.Heap, tag: int, conn) -> None:
    conn.send(_child_fill(h, tag, 300))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["file", "memfd", "anon"])
def test_fork_start_method_children_share_the_heap(kind, tmp_path):
    h = _make(kind, tmp_path)
    ctx = multiprocessing.get_context("fork")
    results = []
    procs = []
    for tag in (1, 2, 3):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_mp_child, args=(h, tag, send))
        p.start()
        procs.append((p, recv, tag))
    for p, recv, tag in procs:
        results.append((tag, recv.recv()))
        p.join(30)
        assert p.exitcode == 0
    for tag, offs in results:
        for i, off in enumerate(offs):
            assert h.read(off, 32 + i % 200) == bytes([tag]) * (32 + i % 200)
    if kind != "anon":  # a fixed 64 KiB heap would be full; growth must have been shared
        assert h.capacity > 1 << 16
    h.check()
    h.close()


# -- spawn and pools ---------------------------------------------------------------------------


def _pool_task(h: pheap.Heap, tag: int) -> tuple[int, int]:
    off = h.malloc(100)
    h.write(off, bytes([tag]) * 100)
    return off, tag


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["file", "memfd"])
def test_spawn_pool_workers_reattach(kind, tmp_path):
    h = _make(kind, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        got = pool.starmap(_pool_task, [(h, t) for t in range(1, 21)])
    for off, tag in got:
        assert h.read(off, 100) == bytes([tag]) * 100
    h.check()
    h.close()


def test_anonymous_heap_refuses_to_pickle():
    h = pheap.anonymous()
    with pytest.raises(TypeError, match="anonymous heap cannot be sent"):
        pickle.dumps(h)
    h.close()


def test_file_heap_pickles_to_a_path_handle(tmp_path):
    h = _make("file", tmp_path)
    off = h.malloc(8)
    h.write(off, b"12345678")
    h2 = pickle.loads(pickle.dumps(h))
    assert h2.path == h.path and h2.read(off, 8) == b"12345678"
    h2.close()
    h.close()
    with pytest.raises(pheap.HeapClosedError):
        pickle.dumps(h)


# -- unrelated processes -----------------------------------------------------------------------

CHURN = """
import random, sys, pheap
path, tag = sys.argv[1], int(sys.argv[2])
rng = random.Random(tag)
live = []
with pheap.open(path, "c") as h:
    for i in range(3000):
        if live and rng.random() < 0.45:
            off, n = live.pop(rng.randrange(len(live)))
            assert h.read(off, n) == bytes([tag]) * n, ("damaged", off)
            h.free(off)
        else:
            n = rng.randint(1, 3000)
            off = h.malloc(n)
            h.write(off, bytes([tag]) * n)
            live.append((off, n))
    for off, n in live:
        assert h.read(off, n) == bytes([tag]) * n
print(len(live))
"""


@pytest.mark.timeout(120)
def test_unrelated_programs_work_on_one_file_at_once(tmp_path):
    path = str(tmp_path / "shared.heap")
    procs = [subprocess.Popen([sys.executable, "-c", CHURN, path, str(tag)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in (7, 8, 9)]
    outs = [p.communicate(timeout=100) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    live = sum(int(o.strip()) for o, _ in outs)
    with pheap.open(path, "r") as h:
        h.check()
        assert h.stats().used_blocks == live


# -- growth seen by others -----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["file", "memfd"])
def test_growth_by_one_process_is_seen_without_reopening(kind, tmp_path):
    h = _make(kind, tmp_path, size=1 << 16)
    cap0 = h.capacity
    small = h.malloc(16)
    h.write(small, b"before the child")
    view = h.view(small, 16)  # held across the growth another process makes
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            big = h.malloc(4 << 20)  # grows the heap far past the parent's mapping
            h.write(big + (4 << 20) - 5, b"tail!")
            os.write(w, big.to_bytes(8, "little"))
            code = 0
        finally:
            os._exit(code)
    big = int.from_bytes(os.read(r, 8), "little")
    assert reap(pid) == 0
    assert big + (4 << 20) > cap0  # beyond what this process has mapped
    assert h.read(big + (4 << 20) - 5, 5) == b"tail!"  # remapped on taking the lock
    assert h.capacity > cap0 and h.info()["generation"] > 1
    assert bytes(view) == b"before the child"  # the old mapping is alive while viewed
    view[0:6] = b"AFTER "
    assert h.read(small, 6) == b"AFTER "  # and writes through it land in the heap
    view.release()
    h.check()
    h.close()


# -- create-or-open races ------------------------------------------------------------------------

RACER = """
import os, sys, pheap
path, tag, gate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.read(gate, 1)  # every racer blocks here until the parent opens the gate for all at once
h = pheap.open(path, "c", size=1 << 16)
off = h.malloc(16)
h.write(off, tag.to_bytes(16, "little"))
print(h.info()["uuid"], off)
h.close()
"""


@pytest.mark.timeout(120)
def test_processes_racing_to_create_end_with_one_heap(tmp_path):
    import time

    for round_ in range(3):
        path = str(tmp_path / f"race{round_}.heap")
        gate_r, gate_w = os.pipe()
        try:
            procs = [subprocess.Popen([sys.executable, "-c", RACER, path, str(t), str(gate_r)],
                                      env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, pass_fds=(gate_r,)) for t in range(12)]
            time.sleep(0.5)  # let them start (and block on the gate)
            os.write(gate_w, b"g" * 12)
        finally:
            os.close(gate_r)
            os.close(gate_w)
        outs = [p.communicate(timeout=100) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        uuids = {o.split()[0] for o, _ in outs}
        assert len(uuids) == 1, "some racer initialised a second heap"
        with pheap.open(path, "r") as h:
            h.check()
            tags = sorted(int.from_bytes(h.read(int(o.split()[1]), 16), "little")
                          for o, _ in outs)
            assert tags == list(range(12))
            assert h.stats().used_blocks == 12
        assert [f for f in os.listdir(tmp_path) if f.endswith(".new")] == []


# -- foreign truncation --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_truncation_by_a_foreign_program_is_an_error_not_sigbus(tmp_path):
    path = str(tmp_path / "t.heap")
    res = _run("""
        import os, sys, pheap
        h = pheap.open(sys.argv[1], "n", size=1 << 20)
        off = h.malloc(100000)
        os.truncate(sys.argv[1], 8192)   # someone else cuts the file under the mapping
        try:
            h.read(off, 10)
        except pheap.CorruptHeapError as e:
            print("refused:", e)
        else:
            print("read past the end of the file")
    """, path)
    assert res.returncode == 0, res.stderr  # a SIGBUS would be -7
    assert "refused:" in res.stdout and "truncated" in res.stdout


# -- the stress script, small ------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind,batch", [("file", 1), ("memfd", 10), ("anon", 3)])
def test_stress_script_small(kind, batch):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "stress.py"), "-p", "4",
                          "-n", "1500", "--seed", "3", "--kind", kind, "--batch", str(batch)],
                         env=ENV, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "check clean: True" in res.stdout


@pytest.mark.timeout(180)
def test_stress_script_objects_small():
    """tools/stress.py --objects: 4 processes, each opening the file by path, on one dict,
    list, counter and queue: nothing lost or duplicated, check() clean."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "stress.py"), "--objects",
                          "-p", "4", "-n", "1500", "--seed", "3"],
                         env=ENV, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "check clean: True" in res.stdout and "FAIL" not in res.stderr
