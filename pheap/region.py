"""The mapping under a heap: a file, a memfd, or a fixed anonymous shared region.

A :class:`Region` owns one ``mmap``, a byte view (``b``) and a word view (``w``, a
``memoryview(mm).cast('Q')``: the fastest way to read and write a word from Python, about 30 ns,
against 80 ns for ``struct.unpack_from``). It knows nothing about the heap format; it maps, grows,
flushes, gives pages back to the OS and takes them again.

Growth never resizes a mapping in place (``mmap.resize`` raises ``BufferError`` while any
memoryview of it exists). It extends the backing with ``posix_fallocate`` -- so a full disk is a
:class:`HeapFullError` now, not a SIGBUS later -- and maps the larger size beside the old mapping.
The old mapping stays open while anything still holds a memoryview of it (both map the same
pages, so those views keep working and writes show through); it is closed at a later remap or at
close, once its last view is gone. :meth:`Region.remap` swaps the views in one step with no call
in between, so an exception raised by a signal handler (Ctrl-C) can never leave a region whose
``mm``, ``b``, ``w`` and ``size`` disagree.

A memfd is sealed against shrinking (``F_SEAL_SHRINK``): no process can truncate it under the
others' mappings, which would kill them with SIGBUS. A heap *file* cannot be sealed; see
``Heap.view`` and the README for what is and is not protected there.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import Final

from .errors import HeapFullError, NotSupportedError

RELEASE_ADVICE: Final = getattr(mmap, "MADV_REMOVE", None)  #: frees pages and disk blocks
MEMFD_SEALS: Final = getattr(fcntl, "F_SEAL_SHRINK", 0)  #: seals put on a new memfd

__all__ = ["Region", "allocate", "available_memory"]


class Region:
    """One mapping and its views.

    ``kind`` is ``"file"``, ``"memfd"`` or ``"anon"``; ``fd`` is -1 for ``"anon"``.
    """

    __slots__ = ("kind", "fd", "path", "readonly", "mm", "b", "w", "size", "_old", "_owns_fd",
                 "sealed")

    def __init__(self, kind: str, fd: int, size: int, *, path: str | None = None,
                 readonly: bool = False, owns_fd: bool = True) -> None:
        self.kind = kind
        self.fd = fd
        self.path = path
        self.readonly = readonly
        self.sealed = False
        self._owns_fd = owns_fd
        self._old: list[mmap.mmap] = []  # earlier mappings that something still holds views of
        self.size = 0
        self.mm, self.b, self.w, self.size = self._map(size)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def open_file(cls, path: str, size: int, *, readonly: bool = False, fd: int = -1) -> Region:
        """Map an existing heap file; ``size`` bytes of it (the header's capacity)."""
        if fd < 0:
            fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            return cls("file", fd, size, path=path, readonly=readonly)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def new_memfd(cls, size: int, name: str = "pheap") -> Region:
        """A growable anonymous region backed by ``memfd_create``; forked children share it.

        Sealed against shrinking where the kernel allows it.
        """
        if not hasattr(os, "memfd_create"):
            raise NotSupportedError("memfd heaps need os.memfd_create (Linux 3.17+)")
        flags = os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0)
        fd = os.memfd_create(name, flags)
        try:
            allocate(fd, 0, size)
            region = cls("memfd", fd, size)
        except BaseException:
            os.close(fd)
            raise
        region.seal()
        return region

    @classmethod
    def new_anonymous(cls, size: int) -> Region:
        """A fixed-size anonymous ``MAP_SHARED`` region; forked children share it."""
        return cls("anon", -1, size)

    def seal(self) -> None:
        """Forbid shrinking the backing (memfd only; a no-op where sealing is unsupported)."""
        if self.kind != "memfd" or not MEMFD_SEALS:
            return
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
            self.sealed = True
        except OSError:
            self.sealed = bool(fcntl.fcntl(self.fd, fcntl.F_GET_SEALS) & MEMFD_SEALS) \
                if hasattr(fcntl, "F_GET_SEALS") else False

    def _map(self, size: int) -> tuple[mmap.mmap, memoryview, memoryview, int]:
        if self.fd < 0:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        else:
            access = mmap.ACCESS_READ if self.readonly else mmap.ACCESS_WRITE
            mm = mmap.mmap(self.fd, size, access=access)
        b = memoryview(mm)
        return mm, b, b.cast("Q"), size

    # -- growth -------------------------------------------------------------------------------

    @property
    def growable(self) -> bool:
        """Whether the backing can be extended (files and memfds can; anonymous regions cannot)."""
        return self.fd >= 0 and not self.readonly

    def extend(self, new_size: int) -> None:
        """Make the backing ``new_size`` bytes long with real disk blocks; do not remap yet."""
        if not self.growable:
            raise HeapFullError(f"a {self.kind} heap of {self.size} bytes cannot grow to "
                                f"{new_size}")
        if self.kind == "memfd":
            # A memfd lives in memory: posix_fallocate takes RAM at once, and asking for more
            # than there is would summon the OOM killer instead of raising.
            avail = available_memory()
            if avail is not None and new_size - self.size > avail:
                raise HeapFullError(f"growing this memfd heap by {new_size - self.size} bytes "
                                    f"needs more than the {avail} bytes of memory available")
        before = self.file_size()
        try:
            allocate(self.fd, self.size, new_size - self.size)
        except HeapFullError:
            # posix_fallocate may have taken some blocks before it failed: give them back, so a
            # failed growth leaves the disk as it found it (nothing maps past the old size).
            if not self.sealed:
                try:
                    os.ftruncate(self.fd, before)
                except OSError:
                    pass
            raise

    def remap(self, new_size: int) -> None:
        """Map ``new_size`` bytes (the backing must already be that long). Old views stay valid.

        The four view attributes change in one statement with no call inside it, so an
        exception from a signal handler lands either before (nothing changed) or after.
        """
        if new_size == self.size:
            return
        new = self._map(new_size)
        if self.fd < 0:  # a new anonymous mapping is all zeros: the bytes move with it
            n = min(new_size, self.size)
            new[0][:n] = self.mm[:n]
        old = self.mm
        self.mm, self.b, self.w, self.size = new
        self._old.append(old)
        self.close_unused()

    def close_unused(self) -> None:
        """Close the earlier mappings that no view refers to any more. Never raises."""
        keep = []
        for mm in self._old:
            try:
                mm.close()
            except BufferError:  # something still holds a view: keep the mapping alive
                keep.append(mm)
            except Exception:
                pass
        self._old = keep

    def data_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) that may hold non-zero bytes: for a file or memfd, the
        extents that are not holes (``SEEK_DATA``/``SEEK_HOLE``; a hole reads as zeros), so a
        scan for non-zero bytes costs what the file holds, not what its length claims."""
        if self.fd < 0 or not hasattr(os, "SEEK_DATA") or start >= end:
            return [(start, end)] if start < end else []
        out = []
        pos = start
        try:
            while pos < end:
                try:
                    d = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # nothing but a hole up to the end of the file
                        break
                    raise
                if d >= end:
                    break
                h = os.lseek(self.fd, d, os.SEEK_HOLE)
                out.append((d, min(h, end)))
                pos = h
        except OSError:
            return [(start, end)]
        return out

    def file_size(self) -> int:
        """Current size of the backing (``size`` for anonymous regions)."""
        return os.fstat(self.fd).st_size if self.fd >= 0 else self.size

    # -- pages --------------------------------------------------------------------------------

    def ensure_backed(self, off: int, n: int) -> None:
        """Give [off, off+n) disk blocks again after a release; ENOSPC raises HeapFullError."""
        if self.fd >= 0 and n > 0:
            allocate(self.fd, off, n)

    def release(self, off: int, n: int) -> bool:
        """Give the whole pages of [off, off+n) back to the OS (they read as zero afterwards).

        Returns whether anything was released (False when the backing cannot punch holes).
        """
        start = (off + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        end = (off + n) & ~(mmap.PAGESIZE - 1)
        if end <= start or RELEASE_ADVICE is None or self.readonly:
            return False
        try:
            self.mm.madvise(RELEASE_ADVICE, start, end - start)
        except OSError:
            return False
        return True

    def flush(self) -> None:
        """msync the whole mapping (a no-op for anonymous regions: nothing to sync to)."""
        if self.fd >= 0 and not self.readonly:
            self.mm.flush()

    def close(self) -> None:
        """Unmap and close. Never raises; a mapping with live views is left to the GC."""
        try:
            self.w.release()
            self.b.release()
        except Exception:
            pass
        self._old.append(self.mm)
        self.close_unused()
        self._old = []
        if self._owns_fd and self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def allocate(fd: int, off: int, n: int) -> None:
    """``posix_fallocate`` with pheap's errors: a full disk (or tmpfs) is :class:`HeapFullError`."""
    if n <= 0:
        return
    try:
        os.posix_fallocate(fd, off, n)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise HeapFullError(f"no space to back {n} bytes at offset {off}: {e.strerror}") from e
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystem without fallocate
            size = os.fstat(fd).st_size
            if off + n > size:
                os.ftruncate(fd, off + n)
            return
        raise
