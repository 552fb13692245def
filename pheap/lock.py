"""The heap lock: threads of one process and all processes that map the heap exclude each other.

Two locks, taken in this order and released in reverse:

1. a thread lock (``threading.RLock``) for the threads of this process, and
2. ``flock(LOCK_EX)`` on a file descriptor that *this process* opened itself.

Why ``flock`` on a private descriptor: the kernel drops it when the holder dies, even by SIGKILL,
so a dead process never blocks the others; ``multiprocessing.Lock`` stays held forever in that
case. ``flock`` belongs to the open file description, so a descriptor *inherited* across ``fork``
would be the parent's own lock and would not exclude it: every forked child therefore re-opens
its descriptor (``os.register_at_fork``), through ``/proc/self/fd/N`` of the heap's file, memfd
or an anonymous heap's lock memfd. POSIX ``lockf`` is not used: it is dropped when the process
closes *any* descriptor of the file.

The same descriptor carries an *attach* lock: an open-file-description (OFD) read lock on byte 0
of the file, held for as long as the lock object lives. Creating a heap with flag ``'n'`` over an
existing file takes the write lock on that byte first, so it fails while any process has the heap
open (:func:`try_exclusive`). OFD locks and ``flock`` are independent in the kernel.

One lock per heap per process (the heap module shares it between handles of one file), re-entrant
per thread: ``with heap.lock():`` around many operations pays for one acquisition. Read-only
processes take the lock shared (``LOCK_SH``).

**Interrupts.** An exception raised by a signal handler (Ctrl-C) can land between any two
bytecodes, including just after the thread lock was taken and before anything recorded it. The
thread lock is an ``RLock`` so that the lock can ask whether *this* thread owns it: an acquisition
that fails or is interrupted gives back whatever it took, and an acquisition that finds the
thread lock owned by its own thread at depth 0 (an earlier acquire or release was interrupted
half way) heals that first. No interrupt leaves the lock held by a thread that does not know it.

Costs (uncontended, measured by tools/bench_alloc.py): one outer acquire+release is one flock
pair (about 0.5-1 us here) plus the heap's checks on acquisition; a nested one is a few
attribute operations.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Final

from .errors import HeapInUseError, LockTimeoutError

POLL_START: Final = 0.0005  #: first sleep between non-blocking tries when a timeout is given, s
POLL_MAX: Final = 0.02  #: longest sleep between tries, s
_FLOCK: Final = "hhqqi4x"  #: struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid)

_get_ident = threading.get_ident
_live_locks: weakref.WeakSet[HeapLock] = weakref.WeakSet()


def _reopen_all_after_fork() -> None:
    for lk in list(_live_locks):
        lk._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reopen_all_after_fork)


def _ofd_lock(fd: int, kind: int, wait: bool) -> None:
    """Take (or with F_UNLCK drop) an OFD lock on byte 0 of ``fd``."""
    op = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    fcntl.fcntl(fd, op, struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 1, 0))


def attach(fd: int) -> None:
    """Hold the attach (OFD read) lock on ``fd`` until it is closed. Waits while a heap is being
    replaced with flag ``'n'``."""
    if hasattr(fcntl, "F_OFD_SETLKW"):
        _ofd_lock(fd, fcntl.F_RDLCK, True)


def try_exclusive(fd: int, what: str) -> None:
    """Take the attach byte exclusively: HeapInUseError when any handle has the heap open.

    The lock lasts until ``fd`` is closed.
    """
    if not hasattr(fcntl, "F_OFD_SETLK"):
        return
    try:
        _ofd_lock(fd, fcntl.F_WRLCK, False)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise HeapInUseError(f"{what}: the heap is open in another handle or process; "
                                 "close it there before replacing it with flag 'n'") from None
        if e.errno != errno.EBADF:
            raise
        # Open read-only (the file is not ours to write): ask whether anyone holds it instead.
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK,
                                                             os.SEEK_SET, 0, 1, 0))
        if struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK:
            raise HeapInUseError(f"{what}: the heap is open in another handle or process; "
                                 "close it there before replacing it with flag 'n'") from None


class HeapLock:
    """Re-entrant inter-process + inter-thread lock on a heap's backing file.

    ``reopen()`` opens a new descriptor of the heap's file: the lock calls it once now and again
    in every forked child (a new open file description, so the child's flock excludes the
    parent's). The lock owns that descriptor and closes it in :meth:`close`. ``on_acquire()``
    runs after the outermost acquisition and ``on_release()`` before the outermost release.

    ``owner`` (the thread ident of the holder, 0 when free) and ``depth`` are public for the
    heap's fast paths: ``lock.owner == threading.get_ident()`` is "this thread holds it".
    """

    __slots__ = ("_fd", "_reopen", "_tlock", "owner", "depth", "shared", "on_acquire",
                 "on_release", "on_fork_child", "_closed", "pid", "__weakref__")

    def __init__(self, reopen: Callable[[], int], *, shared: bool = False) -> None:
        self._fd = reopen()
        try:
            attach(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._reopen = reopen
        self._tlock = threading.RLock()
        self.owner = 0
        self.depth = 0
        self.shared = shared  #: take the flock shared (read-only processes)
        self._closed = False
        self.pid = os.getpid()  #: this process's pid, refreshed in forked children
        self.on_acquire: Callable[[], None] = _nothing
        self.on_release: Callable[[], None] = _nothing
        self.on_fork_child: Callable[[], None] = _nothing  #: runs in a forked child
        _live_locks.add(self)

    @property
    def fd(self) -> int:
        """This process's own descriptor for the lock."""
        return self._fd

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self.owner == _get_ident() and self.depth > 0

    def acquire(self, timeout: float | None = None,
                holder: Callable[[], int] | None = None) -> None:
        """Take the lock (re-entrant). ``timeout`` in seconds; None waits forever.

        ``holder()`` tells the pid in the heap header, for the LockTimeoutError message. If
        ``on_acquire`` raises, the lock is released again and the error propagates.
        """
        me = _get_ident()
        if self.owner == me and self.depth:
            self.depth += 1
            return
        tl = self._tlock
        if tl._is_owned():  # type: ignore[attr-defined]
            self._heal()
        try:
            if timeout is None:
                tl.acquire()
                fcntl.flock(self._fd, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout
                if not tl.acquire(True, max(timeout, 0.0)):
                    raise LockTimeoutError(f"heap lock not acquired within {timeout} s: another "
                                           f"thread of this process (pid {os.getpid()}) holds it")
                self._flock(deadline, timeout, holder)
            self.owner = me
            self.depth = 1
            self.on_acquire()
        except BaseException:
            self._abandon()
            raise

    def call(self, fn: Callable[..., object], *args: object) -> object:
        """``fn(*args)`` with the lock held: when this thread does not hold it yet, one outermost
        acquisition (waiting without a timeout) and release around the call, in one frame.

        This is the lock-per-operation path of every heap call made outside ``heap.lock()``,
        so it is written flat: each call layer removed is ~0.1 us an operation.
        """
        me = _get_ident()
        if self.owner == me and self.depth:
            return fn(*args)
        tl = self._tlock
        if tl._is_owned():  # type: ignore[attr-defined]
            self._heal()
        try:
            tl.acquire()
            fcntl.flock(self._fd, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
            self.owner = me
            self.depth = 1
            self.on_acquire()
        except BaseException:
            self._abandon()
            raise
        try:
            return fn(*args)
        finally:
            try:
                self.on_release()
            finally:
                self.depth = 0
                self.owner = 0
                try:
                    if not self._closed:
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                finally:
                    tl.release()

    def _flock(self, deadline: float, timeout: float,
               holder: Callable[[], int] | None) -> None:
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        delay = POLL_START
        while True:
            try:
                fcntl.flock(self._fd, op)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now >= deadline:
                pid = holder() if holder is not None else 0
                who = f"pid {pid}" if pid else "another process"
                raise LockTimeoutError(f"heap lock not acquired within {timeout} s: {who} "
                                       "holds it")
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, POLL_MAX)

    def _abandon(self) -> None:
        """Give back whatever a failed or interrupted acquisition of this thread took -- and
        nothing else: a thread interrupted while it waits for the thread lock took nothing, and
        the owner fields are another thread's then."""
        if self.owner == _get_ident():
            self.depth = 0
            self.owner = 0
        self._heal()

    def _heal(self) -> None:
        """This thread owns the thread lock without holding the heap lock (an acquire or release
        was interrupted): drop the flock it may hold and the thread lock."""
        tl = self._tlock
        if not tl._is_owned():  # type: ignore[attr-defined]
            return  # another thread may hold the flock: leave it alone
        self.depth = 0
        self.owner = 0
        if not self._closed:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
        while tl._is_owned():  # type: ignore[attr-defined]
            tl.release()

    def release(self) -> None:
        """Release one level; the outermost release runs ``on_release`` and unlocks."""
        if self.owner != _get_ident() or self.depth <= 0:
            raise RuntimeError("heap lock released by a thread that does not hold it")
        if self.depth > 1:
            self.depth -= 1
            return
        try:
            self.on_release()
        finally:
            self.depth = 0
            self.owner = 0
            try:
                if not self._closed:  # closed while held: the descriptor is gone already
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                self._tlock.release()

    def _after_fork_in_child(self) -> None:
        # The child has one thread and none of the parent's holds; give it a fresh thread lock and
        # its own open file description. The inherited descriptor shares the parent's: it is
        # closed so that it can never keep the parent's flock alive after the parent dies.
        self._tlock = threading.RLock()
        self.owner = 0
        self.depth = 0
        self.pid = os.getpid()
        if self._closed:
            return
        try:
            self.on_fork_child()
        except Exception:
            pass
        old = self._fd
        try:
            self._fd = self._reopen()
            attach(self._fd)
        except OSError:  # the file is gone; operations will fail clearly when they try to lock
            self._fd = -1
            self._closed = True
        try:
            os.close(old)
        except OSError:
            pass

    def close(self) -> None:
        """Close the descriptor (dropping any hold and the attach lock). Never raises."""
        if not self._closed:
            self._closed = True
            try:
                os.close(self._fd)
            except OSError:
                pass
        _live_locks.discard(self)


def _nothing() -> None:
    return None


__all__ = ["HeapLock", "attach", "try_exclusive"]
