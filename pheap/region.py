"""The mapping under a heap: a file, a memfd, or a fixed anonymous shared region.

A :class:`Region` owns one ``mmap`` and a word view of it (``memoryview(mm).cast('Q')``, the
fastest way to read and write a word from Python: about 20 ns, against 80 ns for
``struct.unpack_from``). It knows nothing about the heap format; it maps, grows, flushes, gives
pages back to the OS and takes them again.

Growth never resizes a mapping in place (``mmap.resize`` raises ``BufferError`` while any
memoryview of it exists). It extends the backing with ``posix_fallocate`` -- so a full disk is a
:class:`HeapFullError` now, not a SIGBUS later -- and maps the larger size beside the old mapping.
The old mapping stays open while callers still hold memoryviews of it (both map the same pages, so
those views keep working and writes show through); it is closed at the next remap or close after
its last view is released.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Final

from .errors import HeapFullError, PheapError

RELEASE_ADVICE: Final = getattr(mmap, "MADV_REMOVE", None)  #: frees pages and disk blocks

__all__ = ["Region"]


class Region:
    """One mapping and its word view.

    ``kind`` is ``"file"``, ``"memfd"`` or ``"anon"``; ``fd`` is -1 for ``"anon"``.
    """

    __slots__ = ("kind", "fd", "path", "readonly", "mm", "w", "size", "_base", "_old", "_owns_fd")

    def __init__(self, kind: str, fd: int, size: int, *, path: str | None = None,
                 readonly: bool = False, owns_fd: bool = True) -> None:
        self.kind = kind
        self.fd = fd
        self.path = path
        self.readonly = readonly
        self._owns_fd = owns_fd
        self._old: list[mmap.mmap] = []  # earlier mappings that callers still hold views of
        self.mm: mmap.mmap
        self.w: memoryview
        self._base: memoryview
        self.size = 0
        self._map(size)

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
        """A growable anonymous region backed by ``memfd_create``; forked children share it."""
        if not hasattr(os, "memfd_create"):
            raise PheapError("memfd heaps need os.memfd_create (Linux)")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            allocate(fd, 0, size)
            return cls("memfd", fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def new_anonymous(cls, size: int) -> Region:
        """A fixed-size anonymous ``MAP_SHARED`` region; forked children share it."""
        return cls("anon", -1, size)

    def _map(self, size: int) -> None:
        if self.fd < 0:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        else:
            access = mmap.ACCESS_READ if self.readonly else mmap.ACCESS_WRITE
            mm = mmap.mmap(self.fd, size, access=access)
        base = memoryview(mm)
        self.mm, self._base, self.w, self.size = mm, base, base.cast("Q"), size

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
            try:
                os.ftruncate(self.fd, before)
            except OSError:
                pass
            raise

    def remap(self, new_size: int) -> None:
        """Map ``new_size`` bytes (the backing must already be that long). Old views stay valid."""
        if new_size == self.size:
            return
        old, old_w, old_base = self.mm, self.w, self._base
        self._map(new_size)
        old_w.release()
        old_base.release()
        self._old.append(old)
        self._close_old()

    def _close_old(self) -> None:
        keep = []
        for mm in self._old:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view: keep the mapping alive
                keep.append(mm)
        self._old = keep

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
        """Unmap and close. Never raises; a mapping with live exports is left to the GC."""
        try:
            self.w.release()
            self._base.release()
        except Exception:
            pass
        self._old.append(self.mm)
        for mm in self._old:
            try:
                mm.close()
            except Exception:  # views still exported: the GC unmaps it when they go
                pass
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
