"""Tests of pheap.heap: open flags, file modes, persistence across processes, fork and memfd
sharing, refusing foreign or damaged files without touching them, closing, and the root."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import time

import pytest

import pheap
from conftest import reap
from pheap import (
    CorruptHeapError,
    FormatError,
    HeapClosedError,
    InvalidPointerError,
    InvalidSizeError,
    ReadOnlyError,
)
from pheap import format as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
MIB = 1 << 20


def pattern(tag: int, n: int) -> bytes:
    unit = struct.pack("<I", (tag * 2654435761 + 12345) & 0xFFFFFFFF)
    return (unit * (n // 4 + 1))[:n]


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_heap(path: str, blocks: int = 5) -> list[int]:
    """A heap file with a few blocks holding known bytes; returns their offsets."""
    with pheap.open(path, "n", size=MIB) as h:
        offs = []
        for i in range(blocks):
            p = h.malloc(100 + i)
            h.write(p, pattern(i, 100 + i))
            offs.append(p)
        h.root_offset = offs[0]
    return offs


# ---------------------------------------------------------------------------------------------
# Forked children (always reaped; never return into pytest)
# ---------------------------------------------------------------------------------------------


def fork(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        except BaseException:  # the parent sees 99 and reads nothing else
            code = 99
        finally:
            os._exit(code if isinstance(code, int) else 98)
    return pid


# ---------------------------------------------------------------------------------------------
# Flags and modes
# ---------------------------------------------------------------------------------------------


class TestFlags:
    @pytest.mark.parametrize("flag", ["r", "w"])
    def test_missing_file(self, tmp_path, flag):
        path = str(tmp_path / "missing.heap")
        with pytest.raises(FileNotFoundError):
            pheap.open(path, flag)
        assert not os.path.exists(path)

    def test_c_creates_then_opens(self, tmp_path):
        path = str(tmp_path / "c.heap")
        with pheap.open(path, "c", size=2 * MIB) as h:
            assert h.capacity == 2 * MIB and h.path == path and h.kind == "file"
            uuid = h.info()["uuid"]
            p = h.malloc(10)
            h.write(p, b"persistent")
            h.root_offset = p
        with pheap.open(path, "c", size=8 * MIB) as h:  # exists: size is ignored
            assert h.info()["uuid"] == uuid and h.capacity == 2 * MIB
            assert h.read(h.root_offset, 10) == b"persistent"
        assert [f for f in os.listdir(tmp_path) if f != "c.heap"] == []  # no temporary left

    def test_w_opens_existing_read_write(self, tmp_path):
        path = str(tmp_path / "w.heap")
        offs = make_heap(path)
        with pheap.open(path, "w") as h:
            assert not h.readonly
            h.free(offs[1])
            h.check()
        with pheap.open(path, "r") as h:
            assert h.stats().used_blocks == len(offs) - 1

    def test_n_replaces_a_heap(self, tmp_path):
        path = str(tmp_path / "n.heap")
        make_heap(path)
        with pheap.open(path, "r") as h:
            old_uuid = h.info()["uuid"]
        with pheap.open(path, "n", size=MIB) as h:
            assert h.info()["uuid"] != old_uuid
            assert h.root_offset == 0 and h.stats().used_blocks == 0
            h.check()

    def test_n_replaces_a_foreign_file(self, tmp_path):
        path = tmp_path / "text.heap"
        path.write_text("not a heap\n")
        with pheap.open(str(path), "n") as h:
            h.check()
        assert file_bytes(str(path))[:8] == F.MAGIC

    def test_bad_flag(self, tmp_path):
        with pytest.raises(ValueError, match="'x'"):
            pheap.open(str(tmp_path / "x.heap"), "x")
        assert os.listdir(tmp_path) == []

    def test_accepts_pathlike(self, tmp_path):
        with pheap.open(tmp_path / "p.heap", "c") as h:
            assert h.path == str(tmp_path / "p.heap")

    def test_size_arguments(self, tmp_path):
        with pytest.raises(InvalidSizeError):
            pheap.open(str(tmp_path / "a.heap"), "n", size=-1)
        with pytest.raises(InvalidSizeError, match="max_size"):
            pheap.open(str(tmp_path / "b.heap"), "n", size=4 * MIB, max_size=MIB)
        with pytest.raises(InvalidSizeError, match="max_size"):
            pheap.open(str(tmp_path / "c.heap"), "n", size=0, max_size=4096)
        assert os.listdir(tmp_path) == []
        with pheap.open(str(tmp_path / "d.heap"), "n", size=100000) as h:
            assert h.capacity == F.round_up(100000, F.PAGE)
        with pheap.open(str(tmp_path / "e.heap"), "n", size=0) as h:
            assert h.capacity == F.min_capacity()

    @pytest.mark.parametrize("flag", ["c", "n"])
    def test_new_files_are_private(self, tmp_path, flag):
        path = str(tmp_path / "m.heap")
        old = os.umask(0)  # the mode must not rely on the umask to be private
        try:
            pheap.open(path, flag).close()
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def test_mode_argument(self, tmp_path):
        path = str(tmp_path / "m.heap")
        old = os.umask(0)
        try:
            pheap.open(path, "c", mode=0o640).close()
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


class TestReadOnly:
    MUTATIONS = {
        "malloc": lambda h, p: h.malloc(10),
        "free": lambda h, p: h.free(p),
        "calloc": lambda h, p: h.calloc(1, 10),
        "realloc": lambda h, p: h.realloc(p, 500),
        "memalign": lambda h, p: h.memalign(64, 10),
        "write": lambda h, p: h.write(p, b"x"),
        "trim": lambda h, p: h.trim(),
        "rebuild_bins": lambda h, p: h.rebuild_bins(),
        "root": lambda h, p: setattr(h, "root_offset", p),
        "root0": lambda h, p: setattr(h, "root_offset", 0),
        "atomic": lambda h, p: h.atomic().__enter__(),
        "transaction": lambda h, p: h.transaction().__enter__(),
    }

    @pytest.mark.parametrize("name", sorted(MUTATIONS))
    def test_refuses_every_mutation(self, tmp_path, name):
        path = str(tmp_path / "ro.heap")
        offs = make_heap(path)
        before = file_bytes(path)
        with pheap.open(path, "r") as h:
            assert h.readonly and h.info()["readonly"]
            with pytest.raises(ReadOnlyError) as ei:
                self.MUTATIONS[name](h, offs[1])
            assert isinstance(ei.value, PermissionError)
            assert h.read(offs[1], 101) == pattern(1, 101)  # reading still works
            h.check()
        assert file_bytes(path) == before

    def test_reads_and_views(self, tmp_path):
        path = str(tmp_path / "ro.heap")
        offs = make_heap(path)
        before = file_bytes(path)
        with pheap.open(path, "r") as h:
            assert h.root_offset == offs[0]
            assert h.usable_size(offs[2]) >= 102
            assert len([b for b in h.walk(slots=True) if b.kind == "slot" and not b.free]) == \
                len(offs)
            v = h.view(offs[0], 100)
            assert v.readonly and bytes(v) == pattern(0, 100)
            with pytest.raises(TypeError):
                v[0] = 1
            v.release()
            h.flush()
        assert file_bytes(path) == before


# ---------------------------------------------------------------------------------------------
# Many processes
# ---------------------------------------------------------------------------------------------

WRITER = """
import struct, sys, pheap
path = sys.argv[1]
def pattern(tag, n):
    unit = struct.pack("<I", (tag * 2654435761 + 12345) & 0xFFFFFFFF)
    return (unit * (n // 4 + 1))[:n]
with pheap.open(path, "n", size=1 << 16) as h:
    offs = []
    for i in range(200):
        n = 20 + (i * 37) % 3000
        p = h.malloc(n)
        h.write(p, pattern(i, n))
        offs.append((p, n, i))
    d = h.malloc(8 + 24 * len(offs))
    h.write(d, struct.pack("<Q", len(offs)) + b"".join(struct.pack("<3Q", *o) for o in offs))
    h.root_offset = d
    h.check()
print("wrote", len(offs))
"""

READER = """
import struct, sys, pheap
path = sys.argv[1]
def pattern(tag, n):
    unit = struct.pack("<I", (tag * 2654435761 + 12345) & 0xFFFFFFFF)
    return (unit * (n // 4 + 1))[:n]
with pheap.open(path, "w") as h:
    d = h.root_offset
    (count,) = struct.unpack("<Q", h.read(d, 8))
    offs = [struct.unpack("<3Q", h.read(d + 8 + 24 * k, 24)) for k in range(count)]
    for p, n, i in offs:
        assert h.read(p, n) == pattern(i, n), ("corrupt", i)
    keep = [o for o in offs if o[2] % 2 == 0]
    for p, n, i in offs:
        if i % 2:
            h.free(p)
    for i in range(1000, 1100):
        n = 10 + i % 500
        p = h.malloc(n)
        h.write(p, pattern(i, n))
        keep.append((p, n, i))
    old = d
    d = h.malloc(8 + 24 * len(keep))
    h.write(d, struct.pack("<Q", len(keep)) + b"".join(struct.pack("<3Q", *o) for o in keep))
    h.root_offset = d
    h.free(old)
    h.check()
print("verified", count, "now", len(keep))
"""


def read_directory(h: pheap.Heap) -> list[tuple[int, int, int]]:
    d = h.root_offset
    (count,) = struct.unpack("<Q", h.read(d, 8))
    return [struct.unpack("<3Q", h.read(d + 8 + 24 * k, 24)) for k in range(count)]


@pytest.mark.timeout(60)
def test_persistence_across_processes(tmp_path):
    path = str(tmp_path / "persist.heap")
    res = subprocess.run([sys.executable, "-c", WRITER, path], env=ENV, capture_output=True,
                         text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["wrote", "200"]
    res = subprocess.run([sys.executable, "-c", READER, path], env=ENV, capture_output=True,
                         text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["verified", "200", "now", "200"]
    with pheap.open(path, "r") as h:
        h.check()
        offs = read_directory(h)
        assert len(offs) == 200
        for p, n, i in offs:
            assert h.read(p, n) == pattern(i, n)
        assert h.stats().used_blocks == 201  # the blocks and the directory


@pytest.mark.timeout(60)
def test_forked_child_writes_into_an_anonymous_heap(tmp_path):
    h = pheap.anonymous(4 * MIB)
    try:
        mine = h.malloc(64)
        h.write(mine, pattern(1, 64))

        def child():
            if h.read(mine, 64) != pattern(1, 64):
                return 2  # the child does not see the parent's bytes
            offs = []
            for i in range(100):
                p = h.malloc(200 + i)
                h.write(p, pattern(100 + i, 200 + i))
                offs.append(p)
            d = h.malloc(8 * len(offs))
            h.write(d, struct.pack(f"<{len(offs)}Q", *offs))
            h.root_offset = d
            h.free(mine)
            return 0

        pid = fork(child)
        assert reap(pid) == 0
        offs = struct.unpack("<100Q", h.read(h.root_offset, 800))
        for i, p in enumerate(offs):
            assert h.read(p, 200 + i) == pattern(100 + i, 200 + i)
        with pytest.raises(InvalidPointerError):
            h.usable_size(mine)  # the child's free is seen too
        h.check()
        assert h.stats().used_blocks == 101
    finally:
        h.close()


@pytest.mark.timeout(60)
def test_memfd_growth_is_seen_both_ways():
    h = pheap.memfd(0)
    try:
        cap0 = h.capacity
        r_go, w_go = os.pipe()

        def child_sees_parent_growth():
            os.close(w_go)
            if os.read(r_go, 1) != b"g":  # wait until the parent has grown the heap
                return 3
            if h.capacity <= cap0:
                return 4
            p = h.root_offset
            if h.read(p + 3 * MIB - 6, 6) != b"parent":
                return 5
            q = h.malloc(8 * MIB)  # and grow it further from here
            h.write(q + 8 * MIB - 5, b"child")
            h.root_offset = q
            return 0

        pid = fork(child_sees_parent_growth)
        try:
            os.close(r_go)
            p = h.malloc(3 * MIB)
            h.write(p + 3 * MIB - 6, b"parent")
            h.root_offset = p
            assert h.capacity > cap0
            os.write(w_go, b"g")
        finally:
            os.close(w_go)
            code = reap(pid)
        assert code == 0
        cap1 = h.capacity
        q = h.root_offset
        assert q != p and cap1 >= q + 8 * MIB
        assert h.read(q + 8 * MIB - 5, 5) == b"child"
        assert h.read(p + 3 * MIB - 6, 6) == b"parent"
        h.check()
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# Foreign and damaged files: refused with a clear error, never modified
# ---------------------------------------------------------------------------------------------


def patch_word(path: str, word: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(word * 8)
        f.write(struct.pack("<Q", value))


def _empty(path):
    open(path, "wb").close()


def _random(path):
    with open(path, "wb") as f:
        f.write(os.urandom(64 * 1024))


def _text(path):
    with open(path, "w") as f:
        f.write("Hello, I am a text file.\n" * 1000)


def _short(path):
    make_heap(path)
    os.truncate(path, 1000)


def _magic(path):
    make_heap(path)
    with open(path, "r+b") as f:
        f.write(b"\x93PHEAQ")


def _newline_mangled(path):
    make_heap(path)
    data = file_bytes(path)
    with open(path, "wb") as f:
        f.write(data[:6] + b"\n" + data[8:])  # \r\n -> \n, as a text-mode copy would


def _version(path):
    make_heap(path)
    patch_word(path, F.H_VERSION, 3)


def _crc(path):
    make_heap(path)
    with open(path, "r+b") as f:
        f.seek(F.H_UUID * 8)
        b = f.read(1)
        f.seek(F.H_UUID * 8)
        f.write(bytes([b[0] ^ 1]))


def _features(path):
    make_heap(path)
    patch_word(path, F.H_FEATURES, 1 << 7)


def _byte_order(path):
    make_heap(path)
    patch_word(path, F.H_BYTE_ORDER, 0x0102030405060708)


def _truncated(path):
    make_heap(path)
    os.truncate(path, MIB - F.PAGE)


def _brk(path):
    make_heap(path)
    patch_word(path, F.H_BRK, MIB)


def _brk_misaligned(path):
    make_heap(path)
    patch_word(path, F.H_BRK, F.BLOCKS_OFF + 4)


def _capacity_odd(path):
    make_heap(path)
    patch_word(path, F.H_CAPACITY, MIB - 8)


def _capacity_tiny(path):
    make_heap(path)
    patch_word(path, F.H_CAPACITY, F.PAGE)


FOREIGN = {
    "empty": (_empty, FormatError, "too short"),
    "random": (_random, FormatError, "not a pheap heap"),
    "text": (_text, FormatError, "not a pheap heap"),
    "short": (_short, FormatError, "too short"),
    "magic": (_magic, FormatError, "magic"),
    "newlines": (_newline_mangled, FormatError, "magic"),
    "version": (_version, FormatError, "version 3"),
    "crc": (_crc, FormatError, "CRC"),
    "features": (_features, FormatError, "feature"),
    "byte-order": (_byte_order, FormatError, "byte-order"),
    "truncated": (_truncated, CorruptHeapError, "offset 128"),
    "brk": (_brk, CorruptHeapError, "offset 136"),
    "brk-misaligned": (_brk_misaligned, CorruptHeapError, "offset 136"),
    "capacity-odd": (_capacity_odd, CorruptHeapError, "offset 128"),
    "capacity-tiny": (_capacity_tiny, CorruptHeapError, "offset 128"),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
@pytest.mark.parametrize("flag", ["r", "w", "c"])
def test_foreign_or_damaged_file_is_refused_untouched(tmp_path, case, flag):
    make, error, words = FOREIGN[case]
    path = str(tmp_path / f"{case}.heap")
    make(path)
    before = file_bytes(path)
    mode = os.stat(path).st_mode
    fds = open_fds()
    with pytest.raises(error) as ei:
        pheap.open(path, flag)
    msg = str(ei.value)
    assert words in msg, msg
    assert path in msg or "offset" in msg, msg  # says which file or where in it
    assert isinstance(ei.value, ValueError)
    assert file_bytes(path) == before
    assert os.stat(path).st_mode == mode
    assert open_fds() == fds  # nothing leaked on the error path
    assert sorted(os.listdir(tmp_path)) == [f"{case}.heap"]


@pytest.mark.parametrize("flag", ["r", "w", "c", "n"])
def test_directory_is_refused(tmp_path, flag):
    with pytest.raises(FormatError, match="is a directory") as ei:
        pheap.open(str(tmp_path), flag)
    assert str(tmp_path) in str(ei.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize("flag", ["r", "w", "c", "n"])
def test_fifo_is_refused_at_once(tmp_path, flag):
    path = str(tmp_path / "fifo.heap")
    os.mkfifo(path)
    with pytest.raises(FormatError, match="not a regular file"):
        pheap.open(path, flag)


# ---------------------------------------------------------------------------------------------
# Closing
# ---------------------------------------------------------------------------------------------

CLOSED_OPS = {
    "malloc": lambda h: h.malloc(8),
    "free": lambda h: h.free(F.BLOCKS_OFF + 8),
    "free0": lambda h: h.free(0),
    "calloc": lambda h: h.calloc(1, 8),
    "realloc": lambda h: h.realloc(F.BLOCKS_OFF + 8, 64),
    "memalign": lambda h: h.memalign(64, 8),
    "usable_size": lambda h: h.usable_size(F.BLOCKS_OFF + 8),
    "read": lambda h: h.read(F.BLOCKS_OFF + 8, 4),
    "write": lambda h: h.write(F.BLOCKS_OFF + 8, b"x"),
    "view": lambda h: h.view(F.BLOCKS_OFF + 8, 4),
    "root": lambda h: h.root_offset,
    "set_root": lambda h: setattr(h, "root_offset", 0),
    "walk": lambda h: h.walk(),
    "stats": lambda h: h.stats(),
    "check": lambda h: h.check(),
    "trim": lambda h: h.trim(),
    "rebuild_bins": lambda h: h.rebuild_bins(),
    "flush": lambda h: h.flush(),
    "info": lambda h: h.info(),
    "capacity": lambda h: h.capacity,
    "lock": lambda h: h.lock().__enter__(),
    "transaction": lambda h: h.transaction().__enter__(),
}


class TestClose:
    @pytest.mark.parametrize("kind", ["file", "memfd", "anon"])
    def test_context_manager_closes(self, tmp_path, kind):
        if kind == "file":
            h = pheap.open(str(tmp_path / "cm.heap"), "n")
        elif kind == "memfd":
            h = pheap.memfd()
        else:
            h = pheap.anonymous()
        fds = open_fds()
        with h as same:
            assert same is h and not h.closed
            h.malloc(10)
        assert h.closed and "closed" in repr(h)
        assert open_fds() < fds  # the mapping's and the lock's descriptors went
        h.close()  # twice is fine
        assert h.closed

    @pytest.mark.parametrize("op", sorted(CLOSED_OPS))
    def test_operations_on_a_closed_heap(self, tmp_path, op):
        h = pheap.open(str(tmp_path / "closed.heap"), "n")
        h.malloc(8)
        h.close()
        with pytest.raises(HeapClosedError) as ei:
            CLOSED_OPS[op](h)
        assert isinstance(ei.value, ValueError)

    def test_close_with_a_live_view(self, tmp_path):
        path = str(tmp_path / "v.heap")
        h = pheap.open(path, "n")
        p = h.malloc(16)
        v = h.view(p, 16)
        v[:5] = b"still"
        h.close()  # never raises, even with an exported view
        assert bytes(v[:5]) == b"still"
        v.release()
        with pheap.open(path, "r") as h2:
            assert h2.read(p, 5) == b"still"

    def test_close_while_holding_the_lock(self, tmp_path):
        h = pheap.open(str(tmp_path / "l.heap"), "n")
        h.malloc(8)
        with h.lock():
            h.close()
            with pytest.raises(HeapClosedError):
                h.malloc(8)  # the lock is still held by this thread: no lock work to catch it
        # Leaving the with-block must not raise either (close() never raises).
        with pytest.raises(HeapClosedError):
            h.malloc(8)

    def test_exception_inside_with_still_closes(self, tmp_path):
        with pytest.raises(RuntimeError):
            with pheap.open(str(tmp_path / "e.heap"), "n") as h:
                raise RuntimeError("boom")
        assert h.closed


# ---------------------------------------------------------------------------------------------
# The root
# ---------------------------------------------------------------------------------------------


class TestRoot:
    def test_roundtrip_and_persistence(self, tmp_path):
        path = str(tmp_path / "root.heap")
        with pheap.open(path, "n") as h:
            assert h.root_offset == 0
            p = h.malloc(32)
            h.write(p, b"the root object")
            h.root_offset = p
            assert h.root_offset == p and h.info()["root"] == p
        with pheap.open(path, "w") as h:
            assert h.root_offset == p
            assert h.read(h.root_offset, 15) == b"the root object"
            h.root_offset = 0
        with pheap.open(path, "r") as h:
            assert h.root_offset == 0

    def test_non_live_offsets_are_refused(self, any_heap):
        h = any_heap
        a = h.malloc(64)
        b = h.malloc(64)
        h.malloc(8)
        h.root_offset = a
        h.free(b)
        for off in (b, a + 8, a + 1, -8, 8, h.capacity, 1 << 40, "x", None):
            with pytest.raises(InvalidPointerError):
                h.root_offset = off
            assert h.root_offset == a
        h.root_offset = 0
        assert h.root_offset == 0


# ---------------------------------------------------------------------------------------------
# Several handles, info
# ---------------------------------------------------------------------------------------------


def test_two_handles_in_one_process(tmp_path):
    path = str(tmp_path / "two.heap")
    with pheap.open(path, "n") as a, pheap.open(path, "w") as b:
        p = a.malloc(10)
        a.write(p, b"from a....")
        assert b.read(p, 10) == b"from a...."
        b.free(p)
        with pytest.raises(InvalidPointerError):
            a.free(p)  # a sees b's free: a double free
        a.check()


def test_info_fields(tmp_path):
    path = str(tmp_path / "info.heap")
    with pheap.open(path, "n", size=MIB, max_size=4 * MIB) as h:
        info = h.info()
        assert info["path"] == path and info["kind"] == "file"
        assert info["format_version"] == F.FORMAT_VERSION
        assert len(info["uuid"]) == 32
        assert info["capacity"] == MIB and info["max_size"] == 4 * MIB
        assert info["brk"] == F.BLOCKS_OFF and info["generation"] == 1
        assert abs(info["created_ns"] - time.time_ns()) < 60 * 10**9
        assert info["readonly"] is False
    with pheap.memfd() as h:
        assert h.path is None and h.kind == "memfd" and h.info()["path"] is None
    with pheap.anonymous() as h:
        assert h.kind == "anon"


def test_anonymous_heaps_are_independent():
    with pheap.anonymous() as a, pheap.anonymous() as b:
        pa = a.malloc(16)
        a.write(pa, b"only in a")
        pb = b.malloc(16)
        assert pa == pb  # same offsets, different memory
        assert b.read(pb, 8) != b"only in a"[:8]


# ---------------------------------------------------------------------------------------------
# Defects found from outside, each with its reproducer
# ---------------------------------------------------------------------------------------------


def test_an_aborted_growth_leaves_no_stale_allocation_bits(tmp_path):
    """The rollback of a transaction that grew the heap left the file long with the moved
    allocation bitmap in it; a later, slightly smaller growth adopted the stale bits."""
    h = pheap.open(str(tmp_path / "g.heap"), "n", size=8 * MIB)
    with h.transaction():
        pass
    core = h._core
    while F.meta_off(h.capacity) - core._w[F.H_BRK] > 300 * 1024:
        h.malloc(4000)
    with pytest.raises(RuntimeError):
        with h.transaction():
            h.malloc(20 * MIB)
            raise RuntimeError("changed my mind")
    big = h.malloc(20 * MIB - 65536)
    h.check()
    for interior in (big + 4096, big + MIB, big + 10 * MIB - 8):
        with pytest.raises(InvalidPointerError):
            h.free(interior)
    p = h.malloc(48)
    q = h.malloc(600)
    assert not big <= p < big + 20 * MIB - 65536 and not big <= q < big + 20 * MIB - 65536
    h.check()
    h.close()


@pytest.mark.timeout(120)
def test_repair_and_recovery_of_a_large_heap_do_not_overflow_the_journal(tmp_path):
    """rebuild_bins() used the journaling insert: with more than ~50 free blocks, recovery of a
    holder that died in a rebuild, and repair of wiped bins, failed. 10^5 live allocations and
    10^4 free blocks here."""
    path = str(tmp_path / "big.heap")
    with pheap.open(path, "n", size=16 * MIB) as h:
        with h.lock():
            slots = [h.malloc(16 + (i % 8) * 8) for i in range(90_000)]
            blocks = [h.malloc(500 + (i % 7) * 16) for i in range(20_000)]
            for b in blocks[::2]:
                h.free(b)
        st_ = h.stats()
        assert st_.used_blocks == 100_000 and st_.free_blocks >= 10_000
        w = h._core._w
        with h.lock():
            for i in range(F.C_FL_BITMAP, F.CTL_END >> 3):  # wipe every bin and class list
                w[i] = 0
        with pytest.raises(CorruptHeapError):
            h.check()
        report = h.repair()
        assert "rebuilt" in report
        h.check()
        assert h.stats().used_blocks == 100_000
    pid = os.fork()
    if pid == 0:  # dies half way through a rebuild
        try:
            h = pheap.open(path, "w")
            with h.lock():
                h._core._w[F.H_OWNER_STATE] = F.STATE_REBUILD
                for i in range(F.C_FL_BITMAP, F.CTL_END >> 3):
                    h._core._w[i] = 0
                os.kill(os.getpid(), 9)
        finally:
            os._exit(3)
    assert reap(pid) == -9
    with pheap.open(path, "w") as h:  # the default open recovers: it rebuilds again
        h.check()
        assert h.info()["recoveries"] >= 1
        h.free(slots[5])
        h.free(blocks[1])
        h.check()


class TestBounds:
    """No public call reads, writes or views bytes outside the payload of one live block."""

    @pytest.fixture
    def bh(self, tmp_path):
        h = pheap.open(str(tmp_path / "b.heap"), "n", size=MIB)
        slot = h.malloc(24)
        other = h.malloc(24)
        block = h.malloc(1000)
        freed = h.malloc(1000)
        guard = h.malloc(1000)
        h.free(freed)
        for p, n in ((slot, 24), (other, 24), (block, h.usable_size(block)), (guard, 1000)):
            h.write(p, b"\xab" * n)
        yield h, {"slot": slot, "other": other, "block": block, "freed": freed, "guard": guard}
        h.check()
        h.close()

    def bad_ranges(self, h, d):
        size = h.usable_size(d["block"])
        return [
            (d["slot"], 25),  # one byte past a 24-byte slot
            (d["slot"] + 16, 9),
            (d["slot"] - 8, 8),  # the slot before it, or the run header
            (d["block"], size + 1),  # past the block (into the next header)
            (d["block"] - 8, 8),  # the block's own header
            (d["block"] + size - 4, 8),
            (d["freed"], 8),  # a free block
            (d["freed"] + 64, 8),
            (8, 8),  # the header page
            (F.CTL_OFF, 8),  # the control block
            (F.meta_off(h.capacity), 8),  # the metadata
            (h.capacity + 8, 8),
            (-8, 8),
            (d["slot"], -1),
        ]

    def test_write_outside_raises_and_writes_nothing(self, bh):
        h, d = bh
        for off, n in self.bad_ranges(h, d):
            if n < 0:
                continue  # a write has the length of its data
            before = bytes(h._core.region.mm)
            with pytest.raises(InvalidPointerError) as ei:
                h.write(off, b"Z" * n)
            assert str(off) in str(ei.value)
            assert bytes(h._core.region.mm) == before, (off, n)

    def test_read_and_view_outside_raise(self, bh):
        h, d = bh
        for off, n in self.bad_ranges(h, d):
            with pytest.raises(InvalidPointerError):
                h.read(off, n)
            with pytest.raises(InvalidPointerError):
                h.view(off, n)

    def test_inside_a_block_is_fine_from_any_offset(self, bh):
        h, d = bh
        size = h.usable_size(d["block"])
        h.write(d["block"] + 100, b"inside")
        assert h.read(d["block"] + 100, 6) == b"inside"
        assert h.read(d["block"] + size - 8, 8) == b"\xab" * 8
        h.write(d["slot"] + 20, b"tail")
        assert bytes(h.view(d["slot"] + 16, 8)) == b"\xab" * 4 + b"tail"
        assert h.read(d["other"], 24) == b"\xab" * 24  # the neighbour slot is untouched

    def test_the_message_names_offset_length_and_block(self, bh):
        h, d = bh
        with pytest.raises(InvalidPointerError, match=rf"\[{d['slot']}, {d['slot'] + 40}\).*"
                                                     rf"24-byte slot at {d['slot']}"):
            h.write(d["slot"], b"x" * 40)
        size = h.usable_size(d["block"])
        with pytest.raises(InvalidPointerError, match=rf"block \[{d['block']}, "
                                                     rf"{d['block'] + size}\)"):
            h.write(d["block"] + 8, b"x" * size)


@pytest.mark.timeout(60)
def test_check_of_a_sparse_file_with_a_forged_capacity_is_bounded(tmp_path):
    """The CRC covers only the immutable fields: a forged capacity in a sparse file made check()
    walk 'metadata' of gigabytes for minutes. Walks are bounded by what the file holds."""
    import time

    path = str(tmp_path / "forged.heap")
    make_heap(path)
    forged = 64 << 30
    os.truncate(path, forged)  # sparse: no disk blocks behind the new length
    patch_word(path, F.H_CAPACITY, forged)
    t0 = time.monotonic()
    try:
        h = pheap.open(path, "r")
    except CorruptHeapError:
        pass  # refused at once is fine too
    else:
        with h, pytest.raises(CorruptHeapError):
            h.check()  # the metadata at the forged end is all holes: no bitmap bit for A..E
    assert time.monotonic() - t0 < 20


def test_a_memfd_heap_cannot_be_truncated_under_its_users():
    with pheap.memfd(MIB) as h:
        fd = h._core.region.fd
        assert h._core.region.sealed
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        assert os.fstat(fd).st_size >= h.capacity
        h.free(h.malloc(2 * MIB))  # it still grows
        h.check()
