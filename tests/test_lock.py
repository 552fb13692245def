"""The heap lock: threads and processes exclude each other; a dead holder never blocks the rest."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time

import pytest

import pheap
from conftest import reap
from pheap import format as F

COUNTER = struct.Struct("<Q")


def _make(kind: str, tmp_path) -> pheap.Heap:
    if kind == "file":
        return pheap.open(str(tmp_path / "lock.heap"), "n")
    if kind == "memfd":
        return pheap.memfd(1 << 20)
    return pheap.anonymous(1 << 20)


def _bump(h: pheap.Heap, off: int, times: int) -> None:
    """Read-modify-write a counter under the lock, slowly enough that races would show."""
    for i in range(times):
        with h.lock():
            (v,) = COUNTER.unpack(h.read(off, 8))
            if i % 16 == 0:
                time.sleep(0)  # yield inside the critical section
            h.write(off, COUNTER.pack(v + 1))


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_threads_exclude_each_other(tmp_path):
    h = _make("file", tmp_path)
    off = h.calloc(1, 8)
    threads = [threading.Thread(target=_bump, args=(h, off, 300)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert COUNTER.unpack(h.read(off, 8))[0] == 1200
    h.check()
    h.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["file", "memfd", "anon"])
def test_forked_processes_exclude_each_other(kind, tmp_path):
    # The lock descriptor is re-opened in every child: an inherited flock would not exclude.
    h = _make(kind, tmp_path)
    off = h.calloc(1, 8)
    pids = [_fork(lambda: _bump(h, off, 400)) for _ in range(4)]
    _bump(h, off, 400)
    assert [reap(p) for p in pids] == [0, 0, 0, 0]
    assert COUNTER.unpack(h.read(off, 8))[0] == 2000
    h.check()
    h.close()


def test_reentrant_and_release_rules(tmp_path):
    h = _make("file", tmp_path)
    with h.lock():
        with h.lock():
            a = h.malloc(10)
            assert h._core.lock.depth == 2
        assert h._core.lock.depth == 1
        h.free(a)
    assert h._core.lock.depth == 0
    with pytest.raises(RuntimeError):
        h._core.lock.release()
    h.close()


@pytest.mark.timeout(60)
def test_timeout_names_the_holder(tmp_path):
    h = _make("file", tmp_path)
    r, w = os.pipe()

    def hold():
        with h.lock():
            os.write(w, b"x")
            time.sleep(30)

    pid = _fork(hold)
    try:
        assert os.read(r, 1) == b"x"
        with pytest.raises(pheap.LockTimeoutError) as ei:
            with h.lock(timeout=0.2):
                pass
        assert isinstance(ei.value, TimeoutError)
        assert f"pid {pid}" in str(ei.value)
    finally:
        os.kill(pid, signal.SIGKILL)
        reap(pid)
    # The kernel dropped the dead holder's lock: we get it at once, and recovery ran.
    with h.lock(timeout=1.0):
        pass
    assert h.info()["recoveries"] == 1
    h.check()
    h.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["file", "memfd", "anon"])
def test_sigkilled_holder_does_not_block_others(kind, tmp_path):
    h = _make(kind, tmp_path)
    keep = [h.malloc(100 + i) for i in range(50)]
    r, w = os.pipe()

    def die_holding():
        with h.lock():
            for i in range(20):
                h.free(h.malloc(1000 + i))
            os.write(w, b"x")
            time.sleep(60)  # the test hook: paused inside the lock until killed

    pid = _fork(die_holding)
    assert os.read(r, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    with h.lock(timeout=1.0):  # the kernel released the dead holder's flock: no wait
        a = h.malloc(64)
    info = h.info()
    assert info["recoveries"] == 1  # it died inside the lock; the next holder recovered
    assert h._core._w[F.H_OWNER_STATE] == F.STATE_IDLE
    h.free(a)
    for off in keep:
        h.free(off)
    h.check()
    h.close()


@pytest.mark.timeout(60)
def test_read_only_handles_share_and_never_write(tmp_path):
    path = str(tmp_path / "ro.heap")
    with pheap.open(path, "n") as h:
        h.root_offset = h.malloc(8)
    before = open(path, "rb").read()
    r1 = pheap.open(path, "r")
    r, w = os.pipe()

    def other_reader():
        with pheap.open(path, "r") as r2:
            with r2.lock(timeout=1.0):  # shared: readers do not exclude each other
                ok = r2.read(r2.root_offset, 8) == bytes(8)
        os.write(w, b"r" if ok else b"?")

    def writer():
        try:  # opening read-write takes the lock at once (to recover): it times out there
            pheap.open(path, "w", lock_timeout=0.2)
        except pheap.LockTimeoutError:
            os._exit(9)

    with r1.lock():
        assert reap(_fork(other_reader)) == 0
        assert os.read(r, 1) == b"r"
        pid = _fork(writer)
        code = reap(pid)
        assert code == 9, code  # the child reports the LockTimeoutError it got
    r1.close()
    os.close(r)
    os.close(w)
    # Neither the readers' locking nor the writer's failed attempt wrote a byte.
    assert open(path, "rb").read() == before


def test_two_handles_of_one_heap_in_one_process_share_the_lock(tmp_path):
    """A second open of the same file, a pickle round trip and copy.copy all make handles on
    the same heap in this process: they share one lock (and journal), so they re-enter instead
    of deadlocking each other."""
    import copy
    import pickle

    path = str(tmp_path / "two.heap")
    a = pheap.open(path, "n")
    b = pheap.open(path, "w")
    c = pickle.loads(pickle.dumps(a))
    d = copy.copy(a)
    r = pheap.open(path, "r")
    assert len({id(x._core) for x in (a, b, c, d, r)}) == 1
    with a.lock(timeout=2):
        p = b.malloc(8)
        c.free(p)
        q = d.malloc(1000)
        with b.lock(timeout=2):
            d.free(q)
        assert r.read(a.malloc(8), 8) is not None
    with a.transaction():
        x = b.malloc(600)  # joins a's transaction
        assert b.usable_size(x) >= 600
    with pytest.raises(pheap.ReadOnlyError):
        r.malloc(8)  # the read-only handle stays read-only on a shared read-write core
    for h in (b, c, d, r):
        h.close()
    a.malloc(8)  # the others closing leaves a open
    a.check()
    a.close()
    assert a.closed and b.closed


def test_read_only_first_then_read_write_in_one_process(tmp_path):
    path = str(tmp_path / "rw.heap")
    with pheap.open(path, "n") as h:
        h.root_offset = h.malloc(8)
    r = pheap.open(path, "r")
    w = pheap.open(path, "w")  # a read-write core beside the read-only one
    with r.lock(timeout=2):
        with w.lock(timeout=2):  # one lock for both: no self-deadlock
            w.write(w.root_offset, b"12345678")
        assert r.read(r.root_offset, 8) == b"12345678"
    r.close()
    w.close()


@pytest.mark.timeout(60)
def test_ctrl_c_while_waiting_for_another_thread_leaves_its_hold_alone(tmp_path):
    """A Ctrl-C landing in the main thread while it waits for the lock a second thread holds:
    the wait ends, and the other thread still holds the lock (the interrupted wait cleared the
    owner fields, and the holder's transaction then ran outside the lock)."""
    h = pheap.open(str(tmp_path / "wait.heap"), "n")
    lk = h._live_core().lock
    holding, go_on = threading.Event(), threading.Event()
    seen = {}

    def holder():
        with h.transaction():
            holding.set()
            go_on.wait(20)
            seen["owner"] = lk.owner == threading.get_ident() and lk.depth == 1
            seen["block"] = h.malloc(64)  # inside its transaction, under its lock

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    t = threading.Thread(target=holder)
    t.start()
    try:
        assert holding.wait(20)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            h.malloc(8)  # waits for the holder's lock
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        go_on.set()
        t.join(30)
    assert seen["owner"]
    assert h.usable_size(seen["block"]) >= 64  # committed by the holder
    h.check()
    h.close()
