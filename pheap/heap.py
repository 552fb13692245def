"""The public heap: a region, its lock and its allocator, behind one object.

>>> import pheap, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "demo.heap")
>>> with pheap.open(path, "c") as h:
...     off = h.malloc(5)
...     h.write(off, b"hello")
...     h.root = off
>>> with pheap.open(path, "r") as h:      # later, from any process
...     h.read(h.root, 5)
b'hello'
"""

from __future__ import annotations

import fcntl
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

from . import format as F
from . import journal
from .allocator import Allocator, BlockInfo, HeapStats, JournaledAllocator
from .errors import (
    CorruptHeapError,
    FormatError,
    PheapError,
    TransactionTooLargeError,
    HeapClosedError,
    InvalidPointerError,
    InvalidSizeError,
    ReadOnlyError,
)
from .lock import HeapLock
from .region import Region, allocate

DEFAULT_SIZE: Final = 1 << 20  #: initial capacity of a new heap, bytes (it grows on demand)
TX_LOG_SIZE: Final = 256 * 1024  #: undo log a transaction starts with, bytes (grows after overflow)
FILE_MODE: Final = 0o600  #: permissions of new heap files: owner only

_get_ident = threading.get_ident

__all__ = ["Heap", "open", "anonymous", "memfd", "DEFAULT_SIZE"]


# ---------------------------------------------------------------------------------------------
# Header: writing a new one, validating an existing one
# ---------------------------------------------------------------------------------------------


def _write_header(region: Region, max_size: int) -> None:
    mm = region.mm
    w = region.w
    mm[0:8] = F.MAGIC
    w[F.H_VERSION] = F.FORMAT_VERSION
    w[F.H_FEATURES] = 0
    w[F.H_BYTE_ORDER] = F.BYTE_ORDER_MARK
    mm[F.H_UUID * 8:F.H_UUID * 8 + 16] = secrets.token_bytes(16)
    w[F.H_CTL_OFF] = F.CTL_OFF
    w[F.H_BLOCKS_OFF] = F.BLOCKS_OFF
    w[F.H_CREATED] = time.time_ns()
    w[F.H_FL_COUNT] = F.FL_COUNT
    w[F.H_SL_COUNT] = F.SL_COUNT
    w[F.H_CRC] = F.header_crc(mm)
    Allocator.format_region(region, max_size)


def validate_header(head: bytes, file_size: int, what: str = "heap") -> int:
    """Check the header page of a heap; return its capacity. Raises FormatError/CorruptHeapError.

    ``head`` is at least the first 4096 bytes; ``file_size`` the size of the file behind it.
    """
    if len(head) < F.HEADER_SIZE:
        raise FormatError(f"{what}: {len(head)} bytes is too short for a pheap heap "
                          f"(the header alone is {F.HEADER_SIZE})")
    if head[:8] != F.MAGIC:
        raise FormatError(f"{what}: not a pheap heap (magic {head[:8]!r}, expected {F.MAGIC!r})")
    (bom,) = struct.unpack_from("<Q", head, F.H_BYTE_ORDER * 8)
    if bom != F.BYTE_ORDER_MARK:
        raise FormatError(f"{what}: byte-order mark {bom:#x} is not {F.BYTE_ORDER_MARK:#x} "
                          "(made on a machine of another byte order, or damaged)")
    (version,) = struct.unpack_from("<Q", head, F.H_VERSION * 8)
    if version != F.FORMAT_VERSION:
        raise FormatError(f"{what}: format version {version}; this pheap reads version "
                          f"{F.FORMAT_VERSION} only")
    (features,) = struct.unpack_from("<Q", head, F.H_FEATURES * 8)
    if features & ~F.FEATURES_KNOWN:
        raise FormatError(f"{what}: unknown feature bits {features & ~F.FEATURES_KNOWN:#x}")
    (crc,) = struct.unpack_from("<Q", head, F.H_CRC * 8)
    if crc != F.header_crc(head):
        raise FormatError(f"{what}: header CRC {crc:#x} does not match {F.header_crc(head):#x} "
                          "(the immutable header fields are damaged)")
    fields = struct.unpack_from("<4Q", head, F.H_CTL_OFF * 8)
    layout = (F.CTL_OFF, F.BLOCKS_OFF)
    if fields[:2] != layout or struct.unpack_from("<2Q", head, F.H_FL_COUNT * 8) != \
            (F.FL_COUNT, F.SL_COUNT):
        raise FormatError(f"{what}: control-block layout {fields[:2]} differs from {layout}")
    (cap,) = struct.unpack_from("<Q", head, F.H_CAPACITY * 8)
    if cap < F.min_capacity() or cap % F.PAGE:
        raise CorruptHeapError(f"offset 128: capacity {cap} is below the minimum "
                               f"{F.min_capacity()} or not a multiple of {F.PAGE}")
    if cap > file_size:
        raise CorruptHeapError(f"offset 128: capacity {cap} exceeds the file size {file_size} "
                               "(truncated file)")
    (brk,) = struct.unpack_from("<Q", head, F.H_BRK * 8)
    if not F.BLOCKS_OFF <= brk <= F.bitmap_off(cap) or brk & 7:
        raise CorruptHeapError(f"offset 136: brk {brk} outside the block area "
                               f"[{F.BLOCKS_OFF}, {F.bitmap_off(cap)}]")
    return cap


# ---------------------------------------------------------------------------------------------
# Opening and creating
# ---------------------------------------------------------------------------------------------


def _capacity_for(size: int, max_size: int) -> int:
    size = Allocator._check_size(size, "size")
    max_size = Allocator._check_size(max_size, "max_size")
    cap = max(F.round_up(size, F.PAGE), F.min_capacity())
    if max_size and cap > max_size:
        raise InvalidSizeError(f"size {size} exceeds max_size {max_size}")
    if max_size and max_size < F.min_capacity():
        raise InvalidSizeError(f"max_size {max_size} is below the minimum heap of "
                               f"{F.min_capacity()} bytes")
    return cap


def _new_file(path: str, cap: int, max_size: int, mode: int) -> str:
    """Build a complete heap under a temporary name beside ``path``; return that name."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    try:
        allocate(fd, 0, cap)
        region = Region("file", fd, cap, path=tmp, owns_fd=False)
        try:
            _write_header(region, max_size)
            region.flush()
        finally:
            region.close()
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def open(path: str | os.PathLike[str], flag: str = "c", *, size: int = DEFAULT_SIZE,
         max_size: int = 0, mode: int = FILE_MODE, lock_timeout: float | None = None,
         journal: bool = True, durability: str = "process") -> Heap:
    """Open or create a heap file. ``flag`` as in :mod:`dbm`:

    ``'r'`` existing, read-only; ``'w'`` existing, read-write; ``'c'`` read-write, created if
    missing; ``'n'`` always a new, empty heap (replacing any file at ``path``).

    ``size`` is the initial capacity of a new heap (it grows on demand, up to ``max_size`` bytes
    when that is not 0). New files get ``mode`` (0600). Creation is atomic: the heap is built under
    a temporary name and linked into place, so processes racing to create ``path`` all end up
    with the one complete heap. Opening is O(1): the header is validated, nothing is scanned.
    """
    path = os.path.abspath(os.fspath(path))  # pickled handles re-open it from anywhere
    if flag not in ("r", "w", "c", "n"):
        raise ValueError(f"flag must be 'r', 'w', 'c' or 'n', not {flag!r}")
    if flag in ("c", "n"):
        cap = _capacity_for(size, max_size)
        if flag == "n":
            tmp = _new_file(path, cap, max_size, mode)
            os.replace(tmp, path)
        elif not os.path.exists(path):
            tmp = _new_file(path, cap, max_size, mode)
            try:
                os.link(tmp, path)  # atomic, and never replaces: the first creator wins
            except FileExistsError:
                pass
            finally:
                _unlink_quietly(tmp)
    readonly = flag == "r"
    fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
    try:
        head = os.pread(fd, F.HEADER_SIZE, 0)
        cap = validate_header(head, os.fstat(fd).st_size, path)
        region = Region.open_file(path, cap, readonly=readonly, fd=fd)
    except BaseException:
        os.close(fd)
        raise
    return Heap(region, lock_timeout=lock_timeout, journal=journal, durability=durability)


def anonymous(size: int = DEFAULT_SIZE, *, journal: bool = True) -> Heap:
    """A fixed-capacity heap in anonymous shared memory (``MAP_SHARED``).

    Forked children (``os.fork``, multiprocessing's fork start method) share it. It cannot grow:
    when it is full, malloc raises HeapFullError. Gone when the last process unmaps it.
    """
    cap = _capacity_for(size, 0)
    region = Region.new_anonymous(cap)
    _write_header(region, cap)
    return Heap(region, journal=journal)


def memfd(size: int = DEFAULT_SIZE, *, max_size: int = 0, name: str = "pheap",
          journal: bool = True) -> Heap:
    """A growable anonymous heap backed by ``memfd_create`` (Linux). Forked children share it,
    growth included. Gone when the last process closes it.
    """
    cap = _capacity_for(size, max_size)
    region = Region.new_memfd(cap, name)
    _write_header(region, max_size)
    return Heap(region, journal=journal)


def _reattach_file(path: str, flag: str, lock_timeout: float | None,
                   journal: bool = True, durability: str = "process") -> Heap:
    return open(path, flag, lock_timeout=lock_timeout, journal=journal, durability=durability)


def _reattach_memfd(dupfd: Any, lock_timeout: float | None, journal: bool = True) -> Heap:
    fd = dupfd.detach()
    try:
        head = os.pread(fd, F.HEADER_SIZE, 0)
        cap = validate_header(head, os.fstat(fd).st_size, "memfd heap")
        region = Region("memfd", fd, cap)
    except BaseException:
        os.close(fd)
        raise
    return Heap(region, lock_timeout=lock_timeout, journal=journal)


def _proc_fd(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


# ---------------------------------------------------------------------------------------------
# The Heap
# ---------------------------------------------------------------------------------------------

_MUTATORS: Final = ("malloc", "free", "calloc", "realloc", "memalign", "write", "trim",
                    "rebuild_bins", "repair", "transaction")


class Heap:
    """A heap in a mapping. Create one with :func:`pheap.open`, :func:`pheap.anonymous` or
    :func:`pheap.memfd`.

    Every operation takes the heap lock (re-entrant; ``with heap.lock():`` batches many
    operations under one acquisition). Offsets are plain ints, valid in every process.
    """

    def __init__(self, region: Region, *, lock_timeout: float | None = None,
                 journal: bool = True, durability: str = "process") -> None:
        if durability not in ("process", "power"):
            raise ValueError(f"durability must be 'process' or 'power', not {durability!r}")
        if durability == "power" and not journal:
            raise ValueError("durability='power' needs the journal")
        self._region = region
        self._journaled = journal and not region.readonly
        self._a: Allocator = JournaledAllocator(region) if self._journaled else Allocator(region)
        self.durability = durability
        if durability == "power" and self._journaled:
            self._a.durable = True  # type: ignore[attr-defined]
        self._held_state = F.STATE_IN_OP if self._journaled else F.STATE_IN_OP_UNJOURNALED
        self._tx_log_want = TX_LOG_SIZE
        self._closed = False
        self.readonly = region.readonly
        self.lock_timeout = lock_timeout
        self._lock_fd_source = -1
        if region.kind == "anon":
            # An anonymous mapping has no file to flock: a memfd stands in for it, inherited by
            # forked children like the mapping itself.
            self._lock_fd_source = os.memfd_create("pheap-lock", os.MFD_CLOEXEC)
            src = self._lock_fd_source
        else:
            src = region.fd
        flags = os.O_RDONLY
        self._lock = HeapLock(lambda: os.open(_proc_fd(src), flags), shared=self.readonly)
        self._lock.on_acquire = self._on_acquire
        self._lock.on_release = self._on_release
        self._lock.on_fork_child = self._after_fork_in_child
        if self.readonly:
            for name in _MUTATORS:
                setattr(self, name, self._read_only_op(name))
        else:
            with self._locked():  # recovers at once if a process died inside an operation
                pass

    # -- lock and recovery -------------------------------------------------------------------

    def _on_acquire(self) -> None:
        # Runs after every outermost acquisition, so it is kept to a few word reads and one
        # lseek; the pid comes from the lock, which refreshes it in forked children.
        if self._closed:
            raise HeapClosedError("the heap is closed")
        a = self._a
        fd = self._region.fd
        if fd >= 0:
            # Foreign truncation guard: touching bytes past the end of the file would SIGBUS.
            end = os.lseek(fd, 0, os.SEEK_END)
            if end < a._cap:
                raise CorruptHeapError(f"offset 128: the file is {end} bytes, shorter than the "
                                       f"heap's capacity {a._cap}: something truncated it")
        w = a._w
        if w[F.H_GENERATION] != a._gen or w[F.H_CAPACITY] != a._cap:
            a.sync()
            w = a._w
        if self.readonly:
            if w[F.J_STATE]:
                raise CorruptHeapError(
                    f"offset {F.J_STATE * 8}: needs recovery: a process died inside an "
                    "operation; open the heap read-write (or run `pheap repair`) to undo it")
            return
        if w[F.H_OWNER_STATE] != F.STATE_IDLE or w[F.J_STATE]:
            self._recover()
            w = a._w  # recovery may have remapped (an undone growth)
        w[F.H_OWNER_PID] = self._lock.pid
        w[F.H_OWNER_STATE] = self._held_state

    def _after_fork_in_child(self) -> None:
        # A child forked inside a transaction or a lock hold of its parent is in neither: it
        # takes the lock afresh, and its operations journal on their own.
        a = self._a
        if a.in_tx:
            a._tx_end()  # type: ignore[attr-defined]
        a.pending.clear()

    def _on_release(self) -> None:
        if self.readonly or self._closed:
            return
        w = self._a._w
        w[F.H_OP_COUNT] = (w[F.H_OP_COUNT] + 1) & 0xFFFFFFFFFFFFFFFF
        w[F.H_OWNER_STATE] = F.STATE_IDLE
        w[F.H_OWNER_PID] = 0

    def _recover(self) -> None:
        """The last holder died holding the lock: make the heap whole again.

        A journaled operation in flight is undone from the journal, O(journal). A holder that ran
        without a journal may have left torn tags: check(), and rebuild the bins from the tags
        when only they are damaged, O(heap). A holder that died between operations (inside
        ``with heap.lock():``) left nothing to do but count the recovery.
        """
        a = self._a
        r = self._region
        w = a._w
        state = w[F.H_OWNER_STATE]
        if w[F.J_STATE]:
            # Records may name words past the capacity the header shows now (a growth whose
            # capacity word an earlier, interrupted recovery already put back): map the whole
            # file so that every record can be checked and restored again.
            fsize = r.file_size() & ~(F.PAGE - 1)
            if fsize > r.size:
                r.remap(fsize)
                a._adopt()
            journal.undo(a._w, r.size >> 3)
            a._gen = -1  # force the remap to the restored capacity
        a.sync()
        w = a._w
        if state == F.STATE_IN_OP_UNJOURNALED:
            # No journal: the tags are the truth; rebuild the index over them. Damaged tags
            # raise CorruptHeapError (`pheap repair` reports where).
            a.check_tags()
            a.rebuild_bins()
        w[F.H_RECOVERIES] += 1
        w[F.H_OWNER_STATE] = F.STATE_IDLE

    def lock(self, timeout: float | None = None) -> _LockContext:
        """``with heap.lock():`` holds the heap lock across many operations. Re-entrant.

        ``timeout`` (seconds) raises LockTimeoutError naming the holder's pid when it can.
        """
        return _LockContext(self, timeout)

    def _holder_pid(self) -> int:
        try:
            return int(self._a._w[F.H_OWNER_PID])
        except Exception:
            return 0

    def _acquire(self, timeout: float | None) -> None:
        """Take the heap lock (re-entrant); a closed heap raises HeapClosedError."""
        if self._closed:
            raise HeapClosedError("the heap is closed")
        self._lock.acquire(timeout, self._holder_pid)

    # -- allocation --------------------------------------------------------------------------

    def _op(self, fn: Any, *args: Any) -> Any:
        """Run one allocator operation under the lock, atomically, then give back freed pages.

        The uncontended outermost acquisition without a timeout -- every single malloc/free
        outside ``with heap.lock()`` -- is inlined here (thread lock, flock, bookkeeping): each
        Python call layer removed is worth ~0.1 us an operation (tools/bench_alloc.py, 3a).
        """
        lk = self._lock
        me = _get_ident()
        outer = lk._owner != me
        inline = False
        if outer:
            if self._closed:
                raise HeapClosedError("the heap is closed")
            if self.lock_timeout is not None:
                self._acquire(self.lock_timeout)
            else:
                inline = True
                tl = lk._tlock
                tl.acquire()
                try:
                    fcntl.flock(lk._fd, fcntl.LOCK_SH if lk._shared else fcntl.LOCK_EX)
                except BaseException:
                    tl.release()
                    raise
                lk._owner = me
                lk._depth = 1
                try:
                    self._on_acquire()
                except BaseException:
                    lk._depth = 0
                    lk._owner = 0
                    fcntl.flock(lk._fd, fcntl.LOCK_UN)
                    tl.release()
                    raise
        elif self._closed:
            raise HeapClosedError("the heap is closed")
        try:
            a = self._a
            if self._journaled:
                a.begin()  # type: ignore[attr-defined]
                try:
                    r = fn(*args)
                except BaseException:
                    a.rollback()  # type: ignore[attr-defined]
                    raise
                a.commit()  # type: ignore[attr-defined]
            else:
                r = fn(*args)
            if a.pending:
                a.release_pending()
            return r
        finally:
            if inline:
                lk._depth = 0
                try:
                    self._on_release()
                finally:
                    lk._owner = 0
                    try:
                        if not lk._closed:
                            fcntl.flock(lk._fd, fcntl.LOCK_UN)
                    finally:
                        lk._tlock.release()
            elif outer:
                lk.release()

    def malloc(self, n: int) -> int:
        """Allocate ``n`` bytes; return the payload offset. O(1).

        >>> import pheap
        >>> h = pheap.anonymous(); off = h.malloc(100); h.usable_size(off) >= 100
        True
        """
        a = self._a
        if self._lock._owner == _get_ident() and not a.pending and not self._closed:
            # Fast path: lock already held by this thread (inside ``with heap.lock()``).
            if not self._journaled:
                return a.malloc(n)
            a.begin()  # type: ignore[attr-defined]
            try:
                off = a.malloc(n)
            except BaseException:
                a.rollback()  # type: ignore[attr-defined]
                raise
            a.commit()  # type: ignore[attr-defined]
            if a.pending:
                a.release_pending()
            return off
        return self._op(a.malloc, n)

    def free(self, off: int) -> None:
        """Free the block at ``off`` (``free(0)`` does nothing). O(1).

        An offset that is not a live block raises InvalidPointerError and changes nothing.
        """
        a = self._a
        if self._lock._owner == _get_ident() and not a.pending and not self._closed:
            if not self._journaled:
                a.free(off)
            else:
                a.begin()  # type: ignore[attr-defined]
                try:
                    a.free(off)
                except BaseException:
                    a.rollback()  # type: ignore[attr-defined]
                    raise
                a.commit()  # type: ignore[attr-defined]
            if a.pending:
                a.release_pending()
            return
        self._op(a.free, off)

    def calloc(self, count: int, size: int) -> int:
        """Allocate ``count * size`` zeroed bytes. O(1) plus the memset of reused memory."""
        return self._op(self._a.calloc, count, size)  # type: ignore[no-any-return]

    def realloc(self, off: int, n: int) -> int:
        """Resize the block at ``off`` to ``n`` bytes, keeping its contents; return its offset.

        In place when it can (shrink, or grow into free space after it), else it moves.
        ``realloc(0, n)`` is ``malloc(n)``. O(1) plus the copy when it moves.
        """
        return self._op(self._a.realloc, off, n)  # type: ignore[no-any-return]

    def memalign(self, alignment: int, n: int) -> int:
        """Allocate ``n`` bytes at an offset that is a multiple of ``alignment`` (a power of two
        up to 4096). O(1)."""
        return self._op(self._a.memalign, alignment, n)  # type: ignore[no-any-return]

    def usable_size(self, off: int) -> int:
        """Payload bytes of the live block at ``off``. O(1)."""
        with self._locked():
            return self._a.usable_size(off)

    def transaction(self, log_size: int = 0, durable: bool = False) -> Transaction:
        """``with heap.transaction() as tx:`` -- everything inside is all-or-nothing.

        Every malloc/calloc/realloc/free/memalign, every :meth:`write`, and every range passed
        to ``tx.add_range(off, n)`` before changing it through a view is undone when the block
        raises, and by the next opener when the process dies inside it. A normal exit commits
        with one word. Blocks allocated by an aborted transaction are free again, never leaked.
        The heap lock is held throughout; nested transactions join the outer one.

        ``log_size`` (bytes) sizes the undo log; the default starts at 256 KiB and grows after
        a transaction overflows it (that one raises TransactionTooLargeError, rolled back).
        ``durable=True`` msyncs the mapping after the commit, so the committed transaction also
        survives an OS crash or a power loss (see docs/design.md for what that covers).
        Cost: one lock hold, ~0.1 us per allocator word changed, one copy per logged range.

        >>> import pheap
        >>> h = pheap.anonymous()
        >>> a = h.malloc(4); h.write(a, b"old!")
        >>> try:
        ...     with h.transaction():
        ...         h.write(a, b"new!")
        ...         b = h.malloc(100)
        ...         raise RuntimeError("changed my mind")
        ... except RuntimeError:
        ...     pass
        >>> h.read(a, 4)
        b'old!'
        >>> h.usable_size(b)
        Traceback (most recent call last):
        ...
        pheap.errors.InvalidPointerError: invalid offset ...: is outside the block area ...
        """
        if not self._journaled:
            raise PheapError("transactions need the journal: this heap was opened with "
                             "journal=False")
        return Transaction(self, log_size, durable)

    # -- data access -------------------------------------------------------------------------

    def _span(self, off: int, n: int, writing: bool = False) -> None:
        if type(off) is not int or type(n) is not int or off < F.BLOCKS_OFF or n < 0 \
                or off + n > self._a._bmo:
            raise InvalidPointerError(f"range [{off}, {off}+{n}) is outside the block area "
                                      f"[{F.BLOCKS_OFF}, {self._a._bmo})")
        if writing and self._journaled:
            lo, hi = self._a.txlog_span()  # type: ignore[attr-defined]
            if off < hi and off + n > lo:
                raise InvalidPointerError(f"range [{off}, {off}+{n}) overlaps the transaction "
                                          f"log block [{lo}, {hi})")

    def read(self, off: int, n: int) -> bytes:
        """Copy ``n`` bytes at ``off`` out of the heap. O(n)."""
        with self._locked():
            self._span(off, n)
            return self._region.mm[off:off + n]

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the heap at ``off``. O(len(data)).

        Inside :meth:`transaction` the old bytes are logged first, so an abort restores them.
        """
        with self._locked():
            n = len(memoryview(data).cast("B"))
            self._span(off, n, True)
            if self._a.in_tx:
                self._a.log_range(off, n)  # type: ignore[attr-defined]
            self._region.mm[off:off + n] = data

    def view(self, off: int, n: int) -> memoryview:
        """A memoryview of ``n`` bytes at ``off`` (read-only for 'r' heaps). O(1).

        The view stays valid after the heap grows (its mapping is kept until the view is
        released). Writes through it are not locked: hold ``heap.lock()`` if others may write.
        """
        with self._locked():
            self._span(off, n, not self.readonly)
            return memoryview(self._region.mm)[off:off + n]

    # -- root --------------------------------------------------------------------------------

    @property
    def root(self) -> int:
        """Offset of the root object (0 when unset); persistent. Setting it takes the lock."""
        with self._locked():
            return int(self._a._w[F.H_ROOT])

    @root.setter
    def root(self, off: int) -> None:
        if self.readonly:
            raise ReadOnlyError("cannot set the root of a heap opened read-only")
        self._op(self._a.set_root, off)  # journaled: undone with its transaction

    # -- whole-heap operations ---------------------------------------------------------------

    def walk(self) -> Iterator[BlockInfo]:
        """Every block in address order (a snapshot taken under the lock). O(blocks)."""
        with self._locked():
            return iter(list(self._a.walk()))

    def stats(self) -> HeapStats:
        """Used/free bytes and blocks, largest free block, fragmentation. O(blocks)."""
        with self._locked():
            return self._a.stats()

    def check(self, progress: Any = None) -> None:
        """Verify every invariant; raise CorruptHeapError naming the offset and invariant.

        Header and journal state, the boundary-tag walk, the allocation bitmap, every bin (each
        free block in its own bin once, symmetric links, no cycle: walks are bounded), bitmaps
        against bins, root and transaction log pointing at live blocks. O(blocks + capacity/512).
        ``progress(fraction)`` is called now and then on large heaps.
        """
        with self._locked():
            self._a.check(progress)

    def repair(self) -> str:
        """Make a damaged heap whole where its boundary tags allow; return what was done.

        Taking the lock already undid any operation or transaction a dead process left in the
        journal. If check() still fails and the boundary tags (the truth) are sound, the bins,
        bitmaps and allocation bitmap are rebuilt from them. If the tags themselves are damaged,
        CorruptHeapError names the first bad one and nothing is changed: the file is left for a
        person (``pheap walk`` shows where).
        O(blocks). Back the file up first: ``pheap repair --backup`` does.
        """
        with self._locked():
            try:
                self._a.check()
                return "sound: nothing to repair"
            except CorruptHeapError as e:
                first = str(e)
            n = self._rebuild()
            w = self._a._w
            done = f"rebuilt the bins from the boundary tags ({n} free blocks) after: {first}"
            root = w[F.H_ROOT]
            if root and not self._a.is_live(root):
                self._op(self._a.set_root, 0)
                done += f"; the root pointed at {root}, which is not a live block: cleared"
            self._a.check()
            return done

    def rebuild_bins(self) -> int:
        """Recreate the bins and bitmaps from the boundary tags; return the free block count."""
        with self._locked():
            return self._rebuild()

    def _rebuild(self) -> int:
        """rebuild_bins under the lock, marked so that a crash half way is rebuilt again."""
        a = self._a
        if a.in_tx:
            raise PheapError("rebuild_bins()/repair() inside a transaction: its undo could not "
                             "restore what the rebuild rewrites; call it after the commit")
        a.check_tags()  # damaged tags: raise before changing anything
        w = a._w
        w[F.H_OWNER_STATE] = F.STATE_IN_OP_UNJOURNALED  # a crash from here: check + rebuild
        n = a.rebuild_bins()
        w[F.H_OWNER_STATE] = self._held_state
        return n

    def trim(self) -> int:
        """Give the pages of the wilderness and of large free blocks back to the OS; return the
        bytes released. The file keeps its length; its disk blocks go. O(free blocks)."""
        with self._locked():
            return self._a.trim()

    def flush(self) -> None:
        """msync the mapping: data written so far survives an OS crash or power loss."""
        with self._locked():
            self._region.flush()

    # -- properties ----------------------------------------------------------------------------

    @property
    def path(self) -> str | None:
        """The heap file, or None for memfd and anonymous heaps."""
        return self._region.path

    @property
    def kind(self) -> str:
        """``'file'``, ``'memfd'`` or ``'anon'``."""
        return self._region.kind

    @property
    def capacity(self) -> int:
        """Bytes currently mapped (grows on demand)."""
        with self._locked():
            return self._a._cap

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def info(self) -> dict[str, Any]:
        """Header fields as a dict (what ``pheap info`` prints). O(1)."""
        with self._locked():
            w = self._a._w
            mm = self._region.mm
            return {
                "path": self.path,
                "kind": self.kind,
                "format_version": int(w[F.H_VERSION]),
                "uuid": bytes(mm[F.H_UUID * 8:F.H_UUID * 8 + 16]).hex(),
                "created_ns": int(w[F.H_CREATED]),
                "capacity": int(w[F.H_CAPACITY]),
                "brk": int(w[F.H_BRK]),
                "peak_brk": int(w[F.H_PEAK_BRK]),
                "max_size": int(w[F.H_MAX_SIZE]),
                "generation": int(w[F.H_GENERATION]),
                "root": int(w[F.H_ROOT]),
                "op_count": int(w[F.H_OP_COUNT]),
                "recoveries": int(w[F.H_RECOVERIES]),
                "journal_pending": bool(w[F.J_STATE]),
                "journaled": self._journaled,
                "readonly": self.readonly,
            }

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close. Idempotent; never raises. Views still held keep their mapping alive."""
        if self._closed:
            return
        self._closed = True
        try:
            self._lock.close()
            self._region.close()
            if self._lock_fd_source >= 0:
                os.close(self._lock_fd_source)
        except Exception:
            pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"capacity={self._a._cap}"
        where = self.path or self.kind
        return f"<pheap.Heap {where} {state}>"

    # -- pickling: a handle that re-attaches in another process --------------------------------

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as a handle: file heaps re-open by path; memfd heaps pass their descriptor.

        A memfd descriptor travels the way multiprocessing sends descriptors (to a spawned child
        directly, to pool workers through the sender's resource sharer), so it works for
        ``multiprocessing`` Process arguments and Pool tasks, while the sender is alive. An
        anonymous heap has nothing to send: it is shared by ``fork`` only, and pickling it raises
        TypeError.
        """
        if self._closed:
            raise HeapClosedError("cannot pickle a closed heap")
        kind = self._region.kind
        if kind == "file":
            return (_reattach_file, (self.path, "r" if self.readonly else "w",
                                     self.lock_timeout, self._journaled, self.durability))
        if kind == "memfd":
            from multiprocessing import reduction

            return (_reattach_memfd, (reduction.DupFd(self._region.fd), self.lock_timeout,
                                      self._journaled))
        raise TypeError("an anonymous heap cannot be sent to another process: it is shared with "
                        "forked children only; use pheap.memfd() or a heap file instead")

    def _locked(self) -> _LockContext:
        return _LockContext(self, self.lock_timeout)

    @staticmethod
    def _read_only_op(name: str) -> Any:
        def op(*args: object, **kwargs: object) -> Any:
            raise ReadOnlyError(f"{name}() on a heap opened read-only (flag 'r')")
        op.__name__ = name
        return op


class Transaction:
    """An open transaction (see :meth:`Heap.transaction`)."""

    __slots__ = ("_heap", "_log_size", "_durable", "_outer", "_entered")

    def __init__(self, heap: Heap, log_size: int, durable: bool) -> None:
        self._heap = heap
        self._log_size = log_size
        self._durable = durable
        self._outer = False
        self._entered = False

    def __enter__(self) -> Transaction:
        h = self._heap
        h._acquire(h.lock_timeout)
        a = h._a
        try:
            if not a.in_tx:
                want = max(self._log_size, h._tx_log_want)
                a.ensure_txlog(want)  # type: ignore[attr-defined]
                if a.pending:
                    a.release_pending()
                a.tx_begin()  # type: ignore[attr-defined]
                self._outer = True
        except BaseException:
            h._lock.release()
            raise
        self._entered = True
        return self

    def add_range(self, off: int, n: int) -> None:
        """Log bytes [off, off+n) before you change them through a view. O(n)."""
        h = self._heap
        if not self._entered:
            raise PheapError("add_range() outside the transaction's with-block")
        h._span(off, n, True)
        h._a.log_range(off, n)  # type: ignore[attr-defined]

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        h = self._heap
        a = h._a
        if h._closed:
            self._entered = False
            h._lock.release()
            raise HeapClosedError("the heap was closed inside a transaction: it was not "
                                  "committed, and the next process to open the heap undoes it")
        try:
            if self._outer:
                if et is None:
                    a.tx_commit(self._durable)  # type: ignore[attr-defined]
                else:
                    a.tx_abort()  # type: ignore[attr-defined]
                    if isinstance(ev, TransactionTooLargeError):
                        h._tx_log_want = max(h._tx_log_want * 2, TX_LOG_SIZE)
        finally:
            self._entered = False
            h._lock.release()


class _LockContext:
    __slots__ = ("_heap", "_timeout")

    def __init__(self, heap: Heap, timeout: float | None) -> None:
        self._heap = heap
        self._timeout = timeout

    def __enter__(self) -> Heap:
        h = self._heap
        h._acquire(self._timeout)
        return h

    def __exit__(self, *exc: object) -> None:
        self._heap._lock.release()

