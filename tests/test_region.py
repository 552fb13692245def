"""Tests of pheap.region: mapping files, memfds and anonymous regions; growth with old views kept
valid; giving pages back to the OS and taking them again; closing."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from pheap import HeapFullError, region as R
from pheap.region import Region

PAGE = mmap.PAGESIZE
MIB = 1 << 20


def disk_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


@pytest.fixture(params=["file", "memfd", "anon"])
def region(request, tmp_path):
    if request.param == "file":
        path = str(tmp_path / "r.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        R.allocate(fd, 0, 4 * MIB)
        r = Region.open_file(path, 4 * MIB, fd=fd)
    elif request.param == "memfd":
        r = Region.new_memfd(4 * MIB)
    else:
        r = Region.new_anonymous(4 * MIB)
    yield r
    r.close()


def fill(r: Region, off: int, n: int, byte: int = 0xA5) -> None:
    r.mm[off:off + n] = bytes([byte]) * n


class TestMapping:
    def test_maps_size_and_word_view(self, region):
        assert region.size == 4 * MIB == len(region.mm)
        assert region.w.format == "Q" and len(region.w) == 4 * MIB // 8
        region.w[3] = 0x0102030405060708
        assert region.mm[24:32] == bytes(range(8, 0, -1))
        region.mm[40:48] = b"\x01" * 8
        assert region.w[5] == 0x0101010101010101
        assert region.file_size() == 4 * MIB

    def test_kinds(self, region):
        assert region.kind in ("file", "memfd", "anon")
        if region.kind == "anon":
            assert region.fd == -1 and not region.growable
        else:
            assert region.fd >= 0 and region.growable

    def test_file_region_reads_existing_contents(self, tmp_path):
        path = str(tmp_path / "data.bin")
        with open(path, "wb") as f:
            f.write(b"pheap!" + bytes(PAGE * 2 - 6))
        r = Region.open_file(path, PAGE * 2)
        try:
            assert r.mm[:6] == b"pheap!" and r.path == path
            r.mm[6:8] = b"ok"
            r.flush()
        finally:
            r.close()
        with open(path, "rb") as f:
            assert f.read(8) == b"pheap!ok"

    def test_readonly_file_region(self, tmp_path):
        path = str(tmp_path / "ro.bin")
        with open(path, "wb") as f:
            f.write(b"x" * PAGE * 4)
        r = Region.open_file(path, PAGE * 4, readonly=True)
        try:
            assert r.readonly and not r.growable
            assert r.mm[:1] == b"x"
            with pytest.raises(TypeError):
                r.mm[0:1] = b"y"
            with pytest.raises(HeapFullError):
                r.extend(PAGE * 8)
            assert r.release(0, PAGE * 4) is False  # a read-only mapping never releases
            assert r.mm[:PAGE * 4] == b"x" * PAGE * 4
            r.flush()  # a no-op, must not raise
        finally:
            r.close()

    def test_open_file_closes_fd_when_mapping_fails(self, tmp_path):
        path = str(tmp_path / "empty.bin")
        open(path, "wb").close()
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises((ValueError, OSError)):
            Region.open_file(path, 0)  # mapping 0 bytes fails
        assert set(os.listdir("/proc/self/fd")) <= before

    def test_memfd_is_shared_through_its_fd(self):
        r = Region.new_memfd(MIB)
        try:
            fill(r, 100, 10, 0x42)
            assert os.pread(r.fd, 10, 100) == b"\x42" * 10
            os.pwrite(r.fd, b"back", 200)
            assert r.mm[200:204] == b"back"
        finally:
            r.close()


class TestGrowth:
    @pytest.mark.parametrize("kind", ["file", "memfd"])
    def test_extend_and_remap_keep_old_views(self, kind, tmp_path):
        if kind == "file":
            path = str(tmp_path / "g.bin")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            R.allocate(fd, 0, MIB)
            r = Region.open_file(path, MIB, fd=fd)
        else:
            r = Region.new_memfd(MIB)
        try:
            old_mm = r.mm
            view = memoryview(r.mm)[1000:2000]
            view[:5] = b"early"
            r.extend(3 * MIB)
            assert r.file_size() == 3 * MIB
            assert r.size == MIB  # extend does not remap
            r.remap(3 * MIB)
            assert r.size == 3 * MIB and len(r.mm) == 3 * MIB and len(r.w) == 3 * MIB // 8
            assert r.mm is not old_mm
            # The old view still reads and writes, and both mappings see the same pages.
            assert bytes(view[:5]) == b"early"
            view[5:10] = b"later"
            assert r.mm[1000:1010] == b"earlylater"
            r.mm[1010:1015] = b"newer"
            assert bytes(view[10:15]) == b"newer"
            # The new part is usable and starts zeroed.
            assert r.mm[3 * MIB - 8:] == bytes(8)
            r.w[(3 * MIB) // 8 - 1] = 7
            assert r.mm[3 * MIB - 8] == 7
            assert old_mm in r._old  # kept alive while a view of it exists
            view.release()
            r.extend(4 * MIB)
            r.remap(4 * MIB)
            assert old_mm.closed  # no exports left: closed at the next remap
        finally:
            r.close()

    def test_remap_same_size_is_a_no_op(self, region):
        mm = region.mm
        region.remap(region.size)
        assert region.mm is mm

    def test_anonymous_cannot_grow(self):
        r = Region.new_anonymous(MIB)
        try:
            with pytest.raises(HeapFullError, match="cannot grow"):
                r.extend(2 * MIB)
            assert r.size == MIB
        finally:
            r.close()

    def test_allocate_disk_full_is_heap_full(self, tmp_path, monkeypatch):
        def full(fd, off, n):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(R.os, "posix_fallocate", full)
        fd = os.open(str(tmp_path / "f.bin"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with pytest.raises(HeapFullError, match="No space"):
                R.allocate(fd, 0, MIB)
        finally:
            os.close(fd)

    def test_allocate_falls_back_to_ftruncate(self, tmp_path, monkeypatch):
        def unsupported(fd, off, n):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(R.os, "posix_fallocate", unsupported)
        fd = os.open(str(tmp_path / "f.bin"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            R.allocate(fd, 0, MIB)
            assert os.fstat(fd).st_size == MIB
            R.allocate(fd, 0, PAGE)  # never shrinks
            assert os.fstat(fd).st_size == MIB
        finally:
            os.close(fd)

    def test_allocate_other_errors_propagate(self, tmp_path, monkeypatch):
        def broken(fd, off, n):
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(R.os, "posix_fallocate", broken)
        fd = os.open(str(tmp_path / "f.bin"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as ei:
                R.allocate(fd, 0, MIB)
            assert not isinstance(ei.value, HeapFullError) and ei.value.errno == errno.EIO
            R.allocate(fd, 0, 0)  # nothing to do: no call at all
        finally:
            os.close(fd)


class TestRelease:
    def test_release_advice_available(self):
        # pheap targets Linux, where MADV_REMOVE exists; without it nothing is ever released.
        assert R.RELEASE_ADVICE is not None

    def test_release_reads_zero_and_frees_disk(self, region):
        fill(region, 0, 4 * MIB)
        if region.fd >= 0:
            before = disk_bytes(region.fd)
            assert before >= 4 * MIB
        assert region.release(MIB, 2 * MIB) is True
        if region.fd >= 0:
            # Measured before reading the range: a read fault on a tmpfs hole allocates a page.
            assert disk_bytes(region.fd) <= before - 2 * MIB + 64 * 1024
            assert region.file_size() == 4 * MIB  # the length stays
        assert region.mm[MIB:3 * MIB] == bytes(2 * MIB)
        assert region.mm[MIB - 1] == 0xA5 and region.mm[3 * MIB] == 0xA5

    def test_release_only_whole_pages(self, region):
        fill(region, 0, 8 * PAGE)
        assert region.release(100, 3 * PAGE) is True
        assert region.mm[:PAGE] == b"\xa5" * PAGE  # partial first page untouched
        assert region.mm[PAGE:3 * PAGE] == bytes(2 * PAGE)
        assert region.mm[3 * PAGE:4 * PAGE] == b"\xa5" * PAGE  # partial last page untouched

    def test_release_less_than_a_page_does_nothing(self, region):
        fill(region, 0, 2 * PAGE)
        assert region.release(10, PAGE) is False
        assert region.release(PAGE, PAGE - 1) is False
        assert region.mm[:2 * PAGE] == b"\xa5" * 2 * PAGE

    def test_ensure_backed_after_release(self, region):
        fill(region, 0, 4 * MIB)
        assert region.release(0, 4 * MIB)
        if region.fd >= 0:
            low = disk_bytes(region.fd)
            assert low <= 64 * 1024
        region.ensure_backed(MIB, MIB)
        if region.fd >= 0:
            assert disk_bytes(region.fd) >= low + MIB
        assert region.mm[MIB:2 * MIB] == bytes(MIB)  # backing again keeps the zeros
        fill(region, MIB, MIB, 0x11)
        assert region.mm[MIB:2 * MIB] == b"\x11" * MIB
        region.ensure_backed(0, 0)  # nothing to do

    def test_ensure_backed_disk_full(self, tmp_path, monkeypatch):
        r = Region.new_memfd(MIB)
        try:
            assert r.release(0, MIB)

            def full(fd, off, n):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(R.os, "posix_fallocate", full)
            with pytest.raises(HeapFullError):
                r.ensure_backed(0, PAGE)
        finally:
            r.close()

    def test_release_after_growth_uses_new_mapping(self):
        r = Region.new_memfd(MIB)
        try:
            r.extend(2 * MIB)
            r.remap(2 * MIB)
            fill(r, 0, 2 * MIB)
            assert r.release(MIB, MIB)
            assert r.mm[MIB:] == bytes(MIB)
            assert r.mm[MIB - 1] == 0xA5
        finally:
            r.close()


class TestClose:
    def test_close_never_raises_with_live_view(self, region):
        view = memoryview(region.mm)[0:16]
        view[:4] = b"live"
        region.close()
        assert region.fd == -1
        assert bytes(view[:4]) == b"live"  # the mapping is left to the GC, not torn down
        region.close()  # twice is fine
        view.release()

    def test_close_releases_word_view(self, region):
        w = region.w
        region.close()
        with pytest.raises(ValueError):
            w[0]  # noqa: B018 - a released view refuses access instead of touching freed memory

    def test_close_closes_owned_fd_only(self, tmp_path):
        path = str(tmp_path / "c.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        R.allocate(fd, 0, MIB)
        r = Region("file", fd, MIB, path=path, owns_fd=False)
        r.close()
        os.fstat(fd)  # still open: the caller owns it
        r2 = Region("file", fd, MIB, path=path, owns_fd=True)
        r2.close()
        with pytest.raises(OSError):
            os.fstat(fd)

    def test_close_with_old_mappings_held(self):
        r = Region.new_memfd(MIB)
        v = memoryview(r.mm)[:8]
        r.extend(2 * MIB)
        r.remap(2 * MIB)
        v2 = memoryview(r.mm)[:8]
        r.close()  # two mappings with exports: neither raises
        assert r._old == []
        v[:1] = b"z"
        assert bytes(v2[:1]) == b"z"
        v.release()
        v2.release()


def test_memfd_growth_beyond_available_memory_is_heap_full():
    import pheap
    from pheap.region import available_memory

    avail = available_memory()
    assert avail is not None and avail > 0
    h = pheap.memfd(1 << 20)
    before = h.capacity
    with pytest.raises(pheap.HeapFullError, match="memory available"):
        h.malloc(avail + (1 << 30))  # more than the machine has: refused, not OOM-killed
    assert h.capacity == before
    h.free(h.malloc(100))
    h.check()
    h.close()
