"""Crash consistency: a process killed at any journaled point leaves exactly before or after.

For every operation shape (malloc with and without a split, from the wilderness, with growth;
free with each coalescing case; realloc in place and moving; memalign; calloc; a large free that
gives pages back) and for every crash point it passes (``begin``, each of the two ``write`` points
of every journaled word, ``commit``, ``grow``, ``release``), a forked child opens the heap, arms
the point, runs the operation and is SIGKILLed there. The parent reopens the heap (which undoes
the journal), runs ``check()`` and compares the whole allocator state -- every block, the control
block, the header fields, and the bytes of every live block -- with the state before the
operation and the state after it (from an uncrashed run). It must equal one of them.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable

import pytest

import pheap
from pheap import format as F
from pheap import journal

from conftest import core, reap

Setup = Callable[[pheap.Heap], dict]
Op = Callable[[pheap.Heap, dict], object]


def _fill(h: pheap.Heap, sizes: list[int]) -> list[int]:
    out = []
    for i, n in enumerate(sizes):
        off = h.malloc(n)
        h.write(off, bytes([i % 250 + 1]) * n)
        out.append(off)
    return out


def s_free_block_in_bin(h):  # [a used][b FREE 1000][c used] ...
    a, b, c = _fill(h, [600, 1000, 600])
    h.free(b)
    return {"a": a, "c": c}


def s_two_in_a_bin(h):  # two free 608 B blocks in one bin: their links and footers matter
    a, s1, b, s2, g, _guard = _fill(h, [600, 500, 600, 500, 520, 500])  # g cannot grow in place
    h.free(a)
    h.free(b)
    return {"g": g}


def s_row(h):  # five used blocks then the wilderness
    return dict(zip("abcde", _fill(h, [600, 700, 800, 900, 1000]), strict=True))


def s_row_prev_free(h):
    d = s_row(h)
    h.free(d["b"])
    return d


def s_row_next_free(h):
    d = s_row(h)
    h.free(d["d"])
    return d


def s_row_both_free(h):
    d = s_row(h)
    h.free(d["b"])
    h.free(d["d"])
    return d


def s_large(h):
    a, big, c = _fill(h, [600, 600_000, 600])
    return {"a": a, "big": big, "c": c}


def s_small_heap(h):
    return {"a": _fill(h, [1000])[0]}


def s_slots(h):  # a partial run of 40-byte slots, a full run of 64-byte slots, blocks around
    d = s_row(h)
    d["s"] = _fill(h, [40] * 5)
    n = F.CLASS_SLOTS[F.CLASS_OF[64]]
    d["full"] = _fill(h, [64] * n)
    return d


def s_one_free_slot(h):  # a run of 64 B slots with one free slot, and no other such run
    d = s_slots(h)
    h.free(d["full"][7])
    return d


def s_full_word_listed(h):  # the run's word is full but still on the list (taken off lazily)
    d = s_one_free_slot(h)
    d["last"] = h.malloc(64)
    return d


def s_run_emptying(h):  # two runs of 24 B slots, the first empty and cached, one slot left
    d = s_row(h)
    n = F.CLASS_SLOTS[F.CLASS_OF[24]]
    first = _fill(h, [24] * n)
    second = _fill(h, [24] * 3)
    for p in first:
        h.free(p)  # the first run empties: kept as the class's cached run
    third = _fill(h, [24] * n)  # fills the first run again, and more
    d["last"] = second
    for p in third:
        h.free(p)
    h.free(second[0])
    h.free(second[1])
    return d


SCENARIOS: dict[str, tuple[Setup, Op]] = {
    "malloc split": (s_free_block_in_bin, lambda h, d: h.malloc(600)),
    "calloc takes a listed block whole": (lambda h: s_two_in_a_bin(h),
                                          lambda h, d: h.calloc(1, 600)),
    "realloc moves into a listed block": (lambda h: s_two_in_a_bin(h),
                                          lambda h, d: h.realloc(d["g"], 600)),
    "malloc exact": (s_free_block_in_bin, lambda h, d: h.malloc(1000)),
    "malloc wilderness": (s_row, lambda h, d: h.malloc(5000)),
    "malloc grows the heap": (s_small_heap, lambda h, d: h.malloc(3 << 20)),
    "calloc reused memory": (s_free_block_in_bin, lambda h, d: h.calloc(10, 50)),
    "free, no free neighbour": (s_row, lambda h, d: h.free(d["c"])),
    "free, previous free": (s_row_prev_free, lambda h, d: h.free(d["c"])),
    "free, next free": (s_row_next_free, lambda h, d: h.free(d["c"])),
    "free, both free": (s_row_both_free, lambda h, d: h.free(d["c"])),
    "free into the wilderness": (s_row_both_free, lambda h, d: h.free(d["e"])),
    "free large, pages released": (s_large, lambda h, d: h.free(d["big"])),
    "realloc shrink": (s_row, lambda h, d: h.realloc(d["c"], 500)),
    "realloc grow into next": (s_row_next_free, lambda h, d: h.realloc(d["c"], 1200)),
    "realloc grow into wilderness": (s_row, lambda h, d: h.realloc(d["e"], 9000)),
    "realloc moves": (s_row, lambda h, d: h.realloc(d["b"], 5000)),
    "memalign": (s_row_next_free, lambda h, d: h.memalign(256, 800)),
    "slot from a partial run": (s_slots, lambda h, d: h.malloc(40)),
    "slot freed into a partial run": (s_slots, lambda h, d: h.free(d["s"][2])),
    "a new run": (s_row, lambda h, d: h.malloc(100)),
    "the last free slot": (lambda h: s_one_free_slot(h), lambda h, d: h.malloc(64)),
    "malloc meets a full word": (lambda h: s_full_word_listed(h), lambda h, d: h.malloc(64)),
    "a slot freed in a full run": (s_slots, lambda h, d: h.free(d["full"][9])),
    "a run empties and goes back": (s_run_emptying, lambda h, d: h.free(d["last"][2])),
    "cross-class realloc": (s_slots, lambda h, d: h.realloc(d["s"][1], 200)),
    "slot to block realloc": (s_slots, lambda h, d: h.realloc(d["s"][3], 2000)),
    "calloc of a slot": (s_slots, lambda h, d: h.calloc(4, 10)),
    "atomic bracket": (s_slots, lambda h, d: atomic_work(h, d)),
    "transaction commits": (lambda h: s_tx(h), lambda h, d: tx_work(h, d, fail=False)),
    "transaction aborts": (lambda h: s_tx(h), lambda h, d: tx_work(h, d, fail=True)),
}


ONE_WORD = {"slot from a partial run", "slot freed into a partial run", "calloc of a slot",
            "the last free slot", "a slot freed in a full run"}


def s_tx(h: pheap.Heap) -> dict:
    d = s_row_both_free(h)
    with h.transaction():  # the log block is allocated once, by its own atomic operation
        pass
    return d


def tx_work(h: pheap.Heap, d: dict, fail: bool) -> None:
    """A transaction touching every kind of record: allocator words, writes, a view range."""
    try:
        with h.transaction() as tx:
            x = h.malloc(300)
            h.write(x, b"x" * 300)
            h.write(d["a"], b"A" * 50)
            h.free(d["c"])
            y = h.realloc(d["e"], 2000)
            tx.add_range(d["a"] + 100, 20)
            v = h.view(d["a"] + 100, 20)
            v[:] = b"V" * 20
            v.release()
            h.write(y, b"y" * 2000)
            s = h.malloc(24)
            tx.set_u64(d["a"], 3, 0x1234)
            tx.set_u64(s, 1, 77)
            if fail:
                raise KeyError("abort")
    except KeyError:
        pass


def atomic_work(h: pheap.Heap, d: dict) -> None:
    """Several operations and word writes as one, in the operation journal."""
    with h.atomic() as s:
        x = s.malloc(48)
        s.set_u64(x, 0, 1)
        s.set_u64(d["a"], 0, 99)
        s.write(d["b"], b"atomic!", start=16)
        s.free(d["s"][0])
        s.free(d["c"])


def snapshot(path: str) -> tuple:
    """Everything that defines the heap: blocks, runs and their live slots, control block,
    header fields, metadata, live bytes. (Free slots' bytes and the wilderness are not state.)"""
    with pheap.open(path, "w") as h:
        h.check()
        c = core(h)
        mm = c.region.mm
        w = c._w
        txlog = w[F.H_TXLOG]  # the undo log's own bytes are scratch, not state
        items = tuple(h.walk(slots=True))
        live = []
        for b in items:
            if b.kind == "run":
                cls = F.run_class(w[(b.offset >> 3) - 1])
                live.append(bytes(mm[b.offset:b.offset + F.CLASS_FIRST[cls]]))
            elif not b.free and b.offset != txlog:
                live.append(bytes(mm[b.offset:b.offset + b.usable]))
        fields = tuple(int(w[i]) for i in (F.H_CAPACITY, F.H_BRK, F.H_ROOT, F.H_GENERATION,
                                           F.H_OBJECTS))
        ctl = bytes(mm[F.CTL_OFF:F.CTL_END])
        meta = bytes(mm[c._meta:c._cap])
        return items, tuple(live), fields, ctl, meta


def run_child(path: str, op: Op, d: dict, point: str, n: int) -> int:
    """Fork; the child arms ``point:n``, opens the heap and runs ``op``. Returns exit status."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            journal.set_crashpoint(point, n)
            h = pheap.open(path, "w")
            op(h, d)
            code = 0
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    return reap(pid)


def explore(tmp_path, name: str) -> dict[str, int]:
    setup, op = SCENARIOS[name]
    pristine = str(tmp_path / "pristine.heap")
    with pheap.open(pristine, "n", size=1 << 20) as h:
        d = setup(h)
    before = snapshot(pristine)
    done = str(tmp_path / "done.heap")
    shutil.copyfile(pristine, done)
    with pheap.open(done, "w") as h:
        op(h, d)
    after = snapshot(done)
    if "aborts" not in name:
        assert after != before, f"{name}: the operation changed nothing"
    work = str(tmp_path / "work.heap")
    hits: dict[str, int] = {}
    for point in ("begin", "write", "commit", "grow", "release", "recover"):
        n = 1
        while True:
            shutil.copyfile(pristine, work)
            status = run_child(work, op, d, point, n)
            if status == 0:
                assert snapshot(work) == after, f"{name}: {point}:{n} completed wrongly"
                break
            assert status == -signal.SIGKILL, f"{name}: child failed ({status}) at {point}:{n}"
            state = snapshot(work)  # reopening read-write ran recovery
            assert state in (before, after), f"{name}: crash at {point}:{n} left a third state"
            hits[point] = n
            n += 1
    return hits


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_crash_at_every_point_leaves_before_or_after(tmp_path, name):
    hits = explore(tmp_path, name)
    assert hits.get("begin", 0) >= 1
    assert hits.get("commit", 0) >= (0 if "aborts" in name else 1)
    # every operation journals words (a slot from a partial run: one, the bitmap word)
    assert hits.get("write", 0) >= (2 if name in ONE_WORD else 4), hits
    if name == "transaction aborts":
        assert hits.get("recover", 0) >= 10  # the abort itself was killed at every step
    if name == "malloc grows the heap":
        assert hits.get("grow") == 1
    if name == "free large, pages released":
        assert hits.get("release") == 1


@pytest.mark.timeout(300)
def test_crash_during_recovery_is_just_another_crash(tmp_path):
    """Kill an operation half way, then kill the recovery at each of its steps, then recover."""
    setup, op = SCENARIOS["free, both free"]
    pristine = str(tmp_path / "p.heap")
    with pheap.open(pristine, "n") as h:
        d = setup(h)
    before = snapshot(pristine)
    crashed = str(tmp_path / "crashed.heap")
    shutil.copyfile(pristine, crashed)
    # Crash late in the operation so that recovery has many words to restore.
    n_writes = explore_count(tmp_path, op, d, pristine)
    assert run_child(crashed, op, d, "write", n_writes) == -signal.SIGKILL
    steps = 0
    work = str(tmp_path / "w.heap")
    while True:
        steps += 1
        shutil.copyfile(crashed, work)
        status = run_child(work, lambda h, d: None, d, "recover", steps)
        if status == 0:
            break
        assert status == -signal.SIGKILL
        assert snapshot(work) == before  # the next opener recovered what the last one began
    assert steps > 5


def explore_count(tmp_path, op: Op, d: dict, pristine: str) -> int:
    """How many ``write`` crash points the operation passes (the last one is the deepest)."""
    work = str(tmp_path / "count.heap")
    n = 1
    while True:
        shutil.copyfile(pristine, work)
        if run_child(work, op, d, "write", n) == 0:
            return n - 1
        n += 1


def test_exception_inside_an_operation_rolls_back(tmp_path):
    """An error after some words were written (here: an injected failure) changes nothing."""
    path = str(tmp_path / "x.heap")
    with pheap.open(path, "n") as h:
        d = s_row(h)
        c = core(h)
        before = bytes(c.region.mm)
        real = c._j.set
        calls = [0]

        def failing(i, v):
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("injected failure after four journaled words")
            real(i, v)

        c._j.set = failing
        with pytest.raises(RuntimeError, match="injected"):
            h.free(d["c"])
        c._j.set = real
        after = bytes(c.region.mm)
        # Everything but the lock bookkeeping and the journal is as it was -- and zero_from,
        # which an undo raises to the metadata on purpose (no zeros are trusted after an undo).
        skip = range(F.H_OWNER_PID * 8, F.H_RECOVERIES * 8)
        jskip = range(F.JOURNAL_OFF, F.HEADER_SIZE)
        zskip = range(F.H_ZERO_FROM * 8, F.H_ZERO_FROM * 8 + 8)
        diff = [i for i in range(len(before)) if before[i] != after[i]
                and i not in skip and i not in jskip and i not in zskip]
        assert diff == []
        assert c._w[F.H_ZERO_FROM] == c._meta
        h.free(d["c"])
        h.check()


def test_the_fast_paths_change_exactly_one_word(tmp_path):
    """A slot malloc or free that takes the fast path is one aligned word store, with no
    journal: atomic by itself, so a crash leaves before or after. (The crash sweeps above run
    the journaled path of the same shapes: crash points turn the fast path off.)"""
    with pheap.open(str(tmp_path / "f.heap"), "n") as h:
        d = s_slots(h)
        c = core(h)
        mm = c.region.mm
        with h.lock():
            assert c.fast
            for op in (lambda: h.malloc(40), lambda: h.free(d["s"][1]), lambda: h.malloc(36),
                       lambda: h.free(d["s"][4])):
                before = bytes(mm)
                op()
                after = bytes(mm)
                changed = {i // 8 for i in range(len(before)) if before[i] != after[i]}
                assert len(changed) == 1, changed
                (k,) = changed
                assert c._meta > k * 8 >= F.BLOCKS_OFF  # a run's bitmap word
                assert after[F.J_STATE * 8:F.J_STATE * 8 + 8] == bytes(8)
        h.check()


def test_crash_inside_a_rebuild_rebuilds_again(tmp_path):
    path = str(tmp_path / "u.heap")
    with pheap.open(path, "n") as h:
        d = s_slots(h)
        h.free(d["b"])
        h.free(d["s"][0])
        expected = snapshot_blocks(h)
    pid = os.fork()
    if pid == 0:
        try:
            h = pheap.open(path, "w")
            c = core(h)
            with h.lock():
                c._w[F.H_OWNER_STATE] = F.STATE_REBUILD
                # Half a rebuild: the index wiped, not yet written again.
                for i in range(F.C_FL_BITMAP, F.CTL_END >> 3):
                    c._w[i] = 0
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(3)
    assert reap(pid) == -signal.SIGKILL
    with pheap.open(path, "w") as h:  # recovery: the rebuild is done again
        h.check()
        assert h.info()["recoveries"] == 1
        assert snapshot_blocks(h) == expected
        h.free(d["c"])
        h.free(d["s"][1])
        h.check()


def snapshot_blocks(h: pheap.Heap) -> tuple:
    return tuple(h.walk(slots=True))


def test_read_only_open_refuses_a_heap_that_needs_recovery(tmp_path):
    path = str(tmp_path / "r.heap")
    with pheap.open(path, "n") as h:
        d = s_row(h)
    assert run_child(path, lambda h, d: h.free(d["c"]), d, "write", 3) == -signal.SIGKILL
    with pytest.raises(pheap.NeedsRecoveryError, match="undo records are pending"):
        pheap.open(path, "r")
    with pheap.open(path, "w") as h:  # a writer undoes it
        h.check()
        assert not h.info()["journal_pending"]


def test_crashpoint_environment_variable_is_parsed(monkeypatch):
    monkeypatch.setenv(journal.CRASH_ENV, "write:7, commit:2")
    journal.clear_crashpoints()
    try:
        journal._parse_env()
        assert journal._points == {"write": 7, "commit": 2}
        with pytest.raises(ValueError):
            journal.set_crashpoint("write", 0)
    finally:
        journal.clear_crashpoints()


# -- transactions ----------------------------------------------------------------------------


def test_transaction_commit_keeps_everything(tmp_path):
    with pheap.open(str(tmp_path / "t.heap"), "n") as h:
        d = s_row(h)
        with h.transaction():
            x = h.malloc(100)
            h.write(x, b"z" * 100)
            h.free(d["b"])
            h.write(d["a"], b"q" * 200)
        assert h.read(x, 100) == b"z" * 100 and h.read(d["a"], 200) == b"q" * 200
        with pytest.raises(pheap.InvalidPointerError):
            h.free(d["b"])
        h.check()


def test_transaction_abort_restores_bytes_frees_and_allocations(tmp_path):
    with pheap.open(str(tmp_path / "t.heap"), "n") as h:
        d = s_row(h)
        before = [h.read(d[k], 600) for k in "abcde"]
        blocks_before = list(h.walk())
        with pytest.raises(ZeroDivisionError):
            with h.transaction() as tx:
                x = h.malloc(100_000)
                h.write(d["a"], b"!" * 600)
                h.free(d["b"])  # freed inside: live again after the abort, bytes intact
                h.free(d["e"])  # merges into the wilderness
                tx.add_range(d["c"], 16)
                v = h.view(d["c"], 16)
                v[:] = bytes(16)
                v.release()
                raise ZeroDivisionError("abort the transaction")
        assert [h.read(d[k], 600) for k in "abcde"] == before
        txlog = core(h)._w[F.H_TXLOG]
        assert [b for b in h.walk() if b.offset != txlog] == \
            [b for b in blocks_before if b.offset != txlog]
        with pytest.raises(pheap.InvalidPointerError):
            h.usable_size(x)  # the aborted allocation is not live: no leak
        h.check()


def test_nested_transactions_join_the_outer_one(tmp_path):
    with pheap.open(str(tmp_path / "t.heap"), "n") as h:
        a = h.malloc(8)
        h.write(a, b"original")
        with pytest.raises(ValueError):
            with h.transaction():
                with h.transaction():
                    h.write(a, b"inner!!!")
                raise ValueError  # the outer abort undoes the inner block too
        assert h.read(a, 8) == b"original"


def test_failed_operation_inside_a_transaction_does_not_abort_it(tmp_path):
    with pheap.open(str(tmp_path / "t.heap"), "n") as h:
        a = h.malloc(8)
        with h.transaction():
            b = h.malloc(64)
            h.free(a)
            with pytest.raises(pheap.InvalidPointerError):
                h.free(a)  # double free: rejected, the transaction goes on
            c = h.malloc(64)
        assert h.usable_size(b) >= 64 and h.usable_size(c) >= 64
        h.check()


def test_transaction_too_large_rolls_back_and_the_next_one_fits(tmp_path):
    with pheap.open(str(tmp_path / "t.heap"), "n") as h:
        a = h.malloc(400_000)
        h.write(a, b"k" * 400_000)
        with pytest.raises(pheap.TransactionTooLargeError):
            with h.transaction():
                h.write(a, b"n" * 400_000)  # more than the 256 KiB log
        assert h.read(a, 400_000) == b"k" * 400_000
        with h.transaction():  # the log grew after the overflow
            h.write(a, b"n" * 400_000)
        assert h.read(a, 16) == b"n" * 16
        h.check()


def test_pages_freed_in_a_transaction_are_released_only_at_commit(tmp_path):
    path = str(tmp_path / "t.heap")
    with pheap.open(path, "n", size=8 << 20) as h:
        keep = h.malloc(16)
        big = h.malloc(4 << 20)
        h.write(big, b"b" * (4 << 20))
        guard = h.malloc(16)
        with pytest.raises(KeyError):
            with h.transaction():
                h.free(big)
                raise KeyError
        assert h.read(big, 4 << 20) == b"b" * (4 << 20)  # not punched while undoable
        h.flush()
        disk_before = os.stat(path).st_blocks
        with h.transaction(durable=True):
            h.free(big)
        assert os.stat(path).st_blocks < disk_before - (2 << 20) // 512
        h.free(keep)
        h.free(guard)
        h.check()


def _count_flushes(monkeypatch) -> list[int]:
    from pheap.region import Region

    calls: list[int] = []
    real = Region.flush

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Region, "flush", counting)
    return calls


def test_power_durability_commits_through_msync(tmp_path, monkeypatch):
    path = str(tmp_path / "p.heap")
    calls = _count_flushes(monkeypatch)
    with pheap.open(path, "n", durability="power") as h:
        del calls[:]
        a = h.malloc(100)
        assert len(calls) == 2  # before and after the commit word
        with h.transaction():  # the first one also allocates the log: one more operation
            pass
        del calls[:]
        with h.transaction():
            h.write(a, b"durable")
        assert len(calls) == 2
        h.check()
    with pheap.open(path, "r") as h:
        assert h.read(a, 7) == b"durable"
    with pytest.raises(ValueError, match="durability"):
        pheap.open(path, "w", durability="eventually")


def test_durable_transaction_on_a_process_durability_heap(tmp_path, monkeypatch):
    calls = _count_flushes(monkeypatch)
    with pheap.open(str(tmp_path / "d.heap"), "n") as h:
        del calls[:]
        h.free(h.malloc(10))
        assert calls == []  # the default never msyncs on the hot path
        with h.transaction(durable=True):
            h.malloc(10)
        assert len(calls) == 2


# -- regressions found in review -------------------------------------------------------------


def test_growth_capped_by_max_size_never_overlaps_the_old_bitmap(tmp_path):
    path = str(tmp_path / "m.heap")
    with pheap.open(path, "n", size=1 << 20, max_size=(1 << 20) + 8192) as h:
        keep = [h.malloc(2000) for _ in range(300)]
        with pytest.raises(pheap.HeapFullError, match="max_size"):
            h.malloc(1_020_000 - 300 * 2008)  # would need the old bitmap's own bytes
        h.check()
        assert all(h.usable_size(k) >= 2000 for k in keep)


def test_root_set_inside_an_aborted_transaction_is_restored(tmp_path):
    with pheap.open(str(tmp_path / "r.heap"), "n") as h:
        old = h.malloc(8)
        h.root_offset = old
        with pytest.raises(KeyError):
            with h.transaction():
                h.root_offset = h.malloc(64)
                raise KeyError
        assert h.root_offset == old
        h.check()


def test_calloc_after_an_aborted_transaction_returns_zeros(tmp_path):
    with pheap.open(str(tmp_path / "z.heap"), "n") as h:
        with pytest.raises(KeyError):
            with h.transaction():
                p = h.malloc(100)
                h.write(p, b"x" * 100)  # above the brk it began with: not logged
                raise KeyError
        q = h.calloc(1, 100)
        assert q == p and h.read(q, 100) == bytes(100)


def test_calloc_after_a_growth_that_was_undone_returns_zeros(tmp_path):
    with pheap.open(str(tmp_path / "g.heap"), "n", size=1 << 20) as h:
        with pytest.raises(KeyError):
            with h.transaction():
                big = h.malloc(3 << 20)  # grows the file; the abort puts the capacity back
                h.write(big, b"\xff" * (3 << 20))
                raise KeyError
        assert os.path.getsize(h.path) > h.capacity  # the longer file stays
        c = h.calloc(1, 4 << 20)
        assert h.read(c, 4 << 20).count(0) == 4 << 20
        h.check()


def test_crash_during_recovery_of_a_growth_recovers(tmp_path):
    path = str(tmp_path / "cg.heap")
    with pheap.open(path, "n") as h:
        with h.transaction():
            pass

    def grow(h, d):
        with h.transaction():
            h.malloc(100)
            h.malloc(2 << 20)

    before = snapshot(path)
    crashed = str(tmp_path / "crashed.heap")
    shutil.copyfile(path, crashed)
    assert run_child(crashed, grow, {}, "commit", 1) == -signal.SIGKILL
    work = str(tmp_path / "w.heap")
    step = 0
    while True:
        step += 1
        shutil.copyfile(crashed, work)
        status = run_child(work, lambda h, d: None, {}, "recover", step)
        if status == 0:
            break
        assert status == -signal.SIGKILL
        assert snapshot(work) == before, f"recovery killed at step {step}"
    assert step > 5


@pytest.mark.parametrize("word,value", [(F.H_CAPACITY, 5), (F.H_CAPACITY, 8),
                                        (F.H_BRK, F.BLOCKS_OFF + 4), (F.H_BRK, 1 << 40)])
def test_damaged_journal_values_are_refused_and_repair_discards_them(tmp_path, word, value):
    from pheap import cli

    path = str(tmp_path / "dj.heap")
    with pheap.open(path, "n") as h:
        h.malloc(100)
    with open(path, "r+b") as f:
        f.seek(F.J_STATE * 8)
        f.write((1).to_bytes(8, "little"))
        f.seek(F.H_OWNER_PID * 8)
        f.write((1).to_bytes(8, "little"))
        f.seek(F.J_RECORDS * 8)
        f.write(word.to_bytes(8, "little") + value.to_bytes(8, "little") +
                (word ^ value ^ F.J_MIX).to_bytes(8, "little") + bytes(8))
    size = os.path.getsize(path)
    with pytest.raises(pheap.DamagedJournalError, match="journal record would restore"):
        pheap.open(path, "w")
    assert os.path.getsize(path) == size  # nothing was restored, nothing grew
    assert cli.main(["check", path]) == cli.EXIT_DAMAGED
    assert cli.main(["repair", "--backup", path]) == cli.EXIT_OK
    with pheap.open(path, "w") as h:
        h.check()


@pytest.mark.parametrize("damage", ["check word", "index", "old value", "range crc",
                                    "no end"])
def test_a_damaged_record_is_refused_not_restored(tmp_path, damage):
    """A record that fails its check is never written into the heap (it would land in a live
    block with check() clean afterwards)."""
    path = str(tmp_path / "dr.heap")
    with pheap.open(path, "n") as h:
        d = s_row(h)
        with h.transaction():
            pass
        log = core(h)._w[F.H_TXLOG]
    crashed = str(tmp_path / "c.heap")

    def tx(h, d):
        with h.transaction():
            h.write(d["a"], b"W" * 64)
            h.free(d["c"])

    shutil.copyfile(path, crashed)
    assert run_child(crashed, tx, d, "commit", 1) == -signal.SIGKILL
    with open(crashed, "r+b") as f:
        raw = bytearray(f.read())
    base = log
    first_range = base  # the write's range record comes first
    n = int.from_bytes(raw[base:base + 8], "little") & ~F.RANGE_FLAG
    word_rec = base + 24 + ((n + 7) // 8) * 8  # the free's first word record
    if damage == "check word":
        raw[word_rec + 16] ^= 1
    elif damage == "index":
        raw[word_rec] ^= 0x40
    elif damage == "old value":
        raw[word_rec + 8] ^= 0x80
    elif damage == "range crc":
        raw[first_range + 24 + 5] ^= 0xFF  # a byte of the saved old data
    else:
        end = word_rec
        while int.from_bytes(raw[end:end + 8], "little"):
            end += 24
        log_end = log - 8 + (int.from_bytes(raw[log - 8:log], "little") & F.SIZE_MASK)
        raw[end:log_end] = b"\x01" * (log_end - end)  # no end record: garbage to the end
    with open(crashed, "r+b") as f:
        f.write(raw)
    with pytest.raises(pheap.DamagedJournalError):
        pheap.open(crashed, "w")
    with open(crashed, "rb") as f:
        assert f.read() == bytes(raw)  # nothing was restored


def test_the_transaction_log_is_not_the_users(tmp_path):
    with pheap.open(str(tmp_path / "t.heap"), "n") as h:
        with h.transaction():
            pass
        log = core(h)._w[F.H_TXLOG]
        for op in (lambda: h.free(log), lambda: h.realloc(log, 10), lambda: h.usable_size(log),
                   lambda: h.write(log + 64, b"A" * 16), lambda: h.view(log, 8)):
            with pytest.raises(pheap.InvalidPointerError, match="transaction log"):
                op()
        with h.transaction():
            with pytest.raises(pheap.PheapError):
                h.rebuild_bins()  # could not be undone with the transaction
        h.check()


def test_a_child_forked_inside_a_transaction_journals_its_own_operations(tmp_path):
    path = str(tmp_path / "f.heap")
    with pheap.open(path, "n") as h:
        d = s_row_both_free(h)
        with h.transaction():
            h.malloc(10)
            pid = os.fork()
            if pid == 0:
                try:
                    journal.set_crashpoint("write", 3)
                    j = core(h)._j
                    j._crashy = True
                    j.set = j._set_crash
                    h.free(d["c"])  # waits for the parent's lock, then dies half way
                finally:
                    os._exit(3)
        assert reap(pid) == -signal.SIGKILL
    with pheap.open(path, "w") as h:
        h.check()
        assert h.usable_size(d["c"]) >= 800  # the child's free was undone


def test_close_inside_a_transaction_leaves_it_to_the_next_opener(tmp_path):
    path = str(tmp_path / "c.heap")
    h = pheap.open(path, "n")
    a = h.malloc(8)
    h.write(a, b"original")
    with pytest.raises(pheap.HeapClosedError, match="inside a transaction"):
        with h.transaction():
            h.write(a, b"changed!")
            h.close()
    with pheap.open(path, "w") as h2:
        assert h2.read(a, 8) == b"original"
        h2.check()


def test_failed_growth_gives_the_disk_back(tmp_path, monkeypatch):
    from pheap import region

    path = str(tmp_path / "e.heap")
    h = pheap.open(path, "n", size=1 << 20)
    size = os.path.getsize(path)
    real = region.allocate

    def half_then_enospc(fd, off, n):
        real(fd, off, n // 2)  # some blocks were taken before the disk filled up
        raise pheap.HeapFullError("no space (simulated)")

    monkeypatch.setattr(region, "allocate", half_then_enospc)
    with pytest.raises(pheap.HeapFullError):
        h.malloc(8 << 20)
    monkeypatch.undo()
    assert os.path.getsize(path) == size
    h.free(h.malloc(100))
    h.check()
    h.close()


def test_pickled_handle_of_a_relative_path_survives_chdir(tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    h = pheap.open("rel.heap", "n")
    blob = pickle.dumps(h)
    monkeypatch.chdir("/")
    h2 = pickle.loads(blob)
    assert h2.path == str(tmp_path / "rel.heap")
    h2.close()
    h.close()


def test_crash_at_every_point_of_trim_leaves_the_heap_as_it_was(tmp_path):
    """trim() changes no block, bin or live byte -- only page backing and conservative
    watermarks -- so a crash anywhere in it must leave exactly the state before it."""
    pristine = str(tmp_path / "p.heap")
    with pheap.open(pristine, "n", size=4 << 20) as h:
        offs = _fill(h, [600, 300_000, 600, 200_000, 600, 50_000, 600])
        h.free(offs[1])
        h.free(offs[3])
        h.free(offs[5])
        h.free(h.malloc(1 << 20))  # dirty wilderness
    before = snapshot(pristine)
    work = str(tmp_path / "w.heap")
    n = 0
    while True:
        n += 1
        shutil.copyfile(pristine, work)
        status = run_child(work, lambda h, d: h.trim(), {}, "release", n)
        assert snapshot(work) == before, f"trim killed at release:{n}"
        if status == 0:
            break
        assert status == -signal.SIGKILL
    assert n >= 4  # the wilderness and each large free block
    with pheap.open(work, "w") as h:
        for i in (0, 2, 4, 6):
            assert h.read(offs[i], 600) == bytes([i % 250 + 1]) * 600


@pytest.mark.parametrize("n", [16, 600])
def test_realloc_that_moves_the_root_block_moves_the_root(tmp_path, n):
    with pheap.open(str(tmp_path / "rr.heap"), "n") as h:
        p = h.malloc(n)
        h.malloc(n)  # p cannot grow in place
        h.write(p, b"r" * n)
        h.root_offset = p
        q = h.realloc(p, 5000)
        assert q != p and h.root_offset == q and h.read(q, n) == b"r" * n
        with pytest.raises(KeyError):
            with h.transaction():
                r = h.realloc(q, 20000)
                assert h.root_offset == r
                raise KeyError
        assert h.root_offset == q  # undone with the transaction
        h.check()


# -- Ctrl-C ---------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,seed", [("file", 1), ("memfd", 2), ("anon", 3)])
def test_keyboard_interrupts_at_random_moments(kind, seed):
    """tools/interrupts.py: operations, atomic brackets and transactions under a storm of
    KeyboardInterrupts from setitimer: no hang, check() clean, every bracket all-or-nothing,
    the handle and the lock fine afterwards."""
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "interrupts.py")
    res = subprocess.run([sys.executable, tool, "-n", "3000", "--seed", str(seed), "--kind",
                          kind], capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAIL" not in res.stdout and "Traceback" not in res.stderr, res.stdout + res.stderr
    fired = int(res.stdout.split(" KeyboardInterrupts raised")[0].rsplit(" ", 1)[1]
                .replace(",", ""))
    assert fired >= 50, res.stdout  # the storm really hit the operations


@pytest.mark.parametrize("cut", range(0, 4))
def test_an_interrupted_rollback_is_finished_by_the_next_operation(tmp_path, cut, monkeypatch):
    """Ctrl-C inside the undo of a failed operation: the journal in the mapping still says what
    is pending, so the next operation of the same lock hold finishes the undo first."""
    with pheap.open(str(tmp_path / "ir.heap"), "n") as h:
        d = s_row(h)
        real = journal.restore

        def cut_short(w, recs, armed=False):
            for k, (i, old, _data) in enumerate(reversed(recs)):
                if k == cut:
                    raise KeyboardInterrupt
                w[i] = old

        calls = [0]
        real_set = core(h)._j.set

        def failing(i, v):
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("fail after four journaled words")
            real_set(i, v)

        with h.lock():
            core(h)._j.set = failing
            monkeypatch.setattr(journal, "restore", cut_short)
            with pytest.raises(KeyboardInterrupt):
                h.free(d["c"])
            assert core(h)._w[F.J_STATE]  # the undo is pending in the mapping
            monkeypatch.setattr(journal, "restore", real)
            core(h)._j.set = real_set
            h.free(d["a"])  # finishes the cut undo first, then frees a
            assert h.usable_size(d["c"]) >= 800  # the failed free left c live
        h.check()


# -- bytes freed and reused inside one bracket ------------------------------------------------


def _pattern(n: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


@pytest.mark.parametrize("mode", ["atomic", "transaction"])
@pytest.mark.parametrize("reuse", [200, 24, 600])
def test_a_block_freed_and_split_in_one_bracket_comes_back_whole(tmp_path, mode, reuse):
    """A bracket frees a live block, then an allocation splits it (or carves a run from it);
    the remainder's header and links land inside what the undo makes live again: they must be
    logged, or the undo returns the block with foreign words in its bytes."""
    with pheap.open(str(tmp_path / "split.heap"), "n") as h:
        a, b, c = (h.malloc(1000) for _ in range(3))  # b's neighbours stay used
        data = _pattern(1000, 5)
        h.write(b, data)
        bracket = h.atomic if mode == "atomic" else h.transaction
        with pytest.raises(RuntimeError):
            with bracket() as s:
                s.free(b)
                for _ in range(3):
                    s.malloc(reuse)  # from the bin b went to: split, or a run carved from it
                raise RuntimeError("undo")
        assert h.read(b, 1000) == data
        h.check()
        h.free(b)
        h.check()
        del a, c


@pytest.mark.parametrize("mode", ["atomic", "transaction"])
def test_blocks_freed_into_the_wilderness_and_carved_again_come_back_whole(tmp_path, mode):
    """Frees that lower brk, then allocations carved from the wilderness at other boundaries:
    the new block headers fall inside the freed blocks' bytes, which the undo makes live."""
    with pheap.open(str(tmp_path / "wild.heap"), "n") as h:
        blocks = [h.malloc(n) for n in (3000, 5000, 700)]  # the last blocks before brk
        datas = [_pattern(n, k) for k, n in enumerate((3000, 5000, 700))]
        for p, d in zip(blocks, datas, strict=True):
            h.write(p, d)
        bracket = h.atomic if mode == "atomic" else h.transaction
        with pytest.raises(RuntimeError):
            with bracket() as s:
                for p in reversed(blocks):
                    s.free(p)
                for n in (1234, 777, 2900, 3333):
                    s.malloc(n)
                raise RuntimeError("undo")
        for p, d in zip(blocks, datas, strict=True):
            assert h.read(p, len(d)) == d
        h.check()


def test_a_run_emptied_and_reused_in_one_bracket_comes_back_whole(tmp_path):
    """A run whose slots a bracket frees (the run goes back to the bins) and whose block a
    larger allocation then takes: the slots' bytes must come back with the undo."""
    with pheap.open(str(tmp_path / "run.heap"), "n") as h:
        with h.lock():
            fill = [h.malloc(448) for _ in range(64)]  # several runs of the 448-byte class
        mine = fill[-8:]
        for k, p in enumerate(mine):
            h.write(p, _pattern(448, k))
        with pytest.raises(RuntimeError):
            with h.transaction() as s:
                for p in fill:
                    s.free(p)  # empties the runs: they go back to the bins
                for _ in range(8):
                    s.malloc(3000)  # blocks from the runs' pages
                raise RuntimeError("undo")
        for k, p in enumerate(mine):
            assert h.read(p, 448) == _pattern(448, k)
        h.check()


@pytest.mark.parametrize("align", [0, 64, 4096])
def test_growth_in_a_bracket_does_not_log_the_old_metadata(tmp_path, align):
    """A bracket whose allocation grows a large heap: the new block must not cover the metadata
    the heap had (capacity / 60 bytes, more than a transaction log holds), or every retry
    overflows the log. The block starts past the old capacity; an undo finds the old metadata
    intact."""
    with pheap.open(str(tmp_path / "g.heap"), "n", size=48 << 20) as h:
        keep = h.malloc(40 << 20)  # most of the heap in use: the next big block grows it
        h.write(keep, b"k" * 4096)
        cap = h.capacity
        with h.transaction() as s:
            p = s.memalign(align, 30 << 20) if align else s.malloc(30 << 20)
            s.write(p, b"x" * (1 << 20))  # logged only if it overlapped the old metadata
        assert h.capacity > cap and h.read(p, 4) == b"xxxx"
        h.check()
        cap = h.capacity
        with pytest.raises(RuntimeError):
            with h.transaction() as s:
                q = s.memalign(align, 200 << 20) if align else s.malloc(200 << 20)
                s.write(q, b"y" * (1 << 20))
                raise RuntimeError("undo the growth")
        assert h.capacity == cap and h.read(keep, 4) == b"kkkk"
        h.check()
        h.free(p)
        h.check()


@pytest.mark.parametrize("mode", ["atomic", "transaction"])
@pytest.mark.parametrize("side", ["before", "after", "both"])
@pytest.mark.parametrize("reuse", [1.0, 0.3, 0.6, 1.5])
def test_a_free_neighbour_merged_and_reused_in_one_bracket_comes_back_free(
        tmp_path, mode, side, reuse):
    """A bracket frees a block next to a block that was already free (they merge), then
    allocations split the merged block and fill what they get: headers, links and data written
    into the old free neighbour must be logged, or the undo puts it back on its bin with foreign
    link words or footer (found by the random-kill torture: a later free wrote through a bogus
    link). Sizes stay above the run limit and, for atomic(), inside its small journal."""
    n = 2000 if mode == "transaction" else 480
    reuse = int(n * reuse) & -8
    with pheap.open(str(tmp_path / "merge.heap"), "n") as h:
        a, b, c, guard = (h.malloc(n) for _ in range(4))
        h.write(b, _pattern(n, 9))
        if side in ("before", "both"):
            h.free(a)
        if side in ("after", "both"):
            h.free(c)
        h.check()
        bracket = h.atomic if mode == "atomic" else h.transaction
        with pytest.raises(RuntimeError):
            with bracket() as s:
                s.free(b)
                for k in range(3):
                    p = s.malloc(reuse)
                    s.write(p, _pattern(reuse, k))
                raise RuntimeError("undo")
        h.check()
        assert h.read(b, n) == _pattern(n, 9)
        # The free neighbours work as free blocks again: take them, fill them, free all.
        taken = [h.malloc(n) for _ in range(4)]
        for k, p in enumerate(taken):
            h.write(p, _pattern(n, k))
        h.check()
        for p in taken:
            h.free(p)
        h.free(b)
        h.check()
        del guard
