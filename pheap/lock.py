"""The heap lock: threads of one process and all processes that map the heap exclude each other.

Two locks, taken in this order and released in reverse:

1. a ``threading.Lock`` for the threads of this process, and
2. ``flock(LOCK_EX)`` on a file descriptor that *this process* opened itself.

Why ``flock`` on a private descriptor (measured on the project's machines, see DESIGN.md): the
kernel drops it when the holder dies, even by SIGKILL, so a dead process never blocks the others;
``multiprocessing.Lock`` stays held forever in that case. ``flock`` belongs to the open file
description, so a descriptor *inherited* across ``fork`` would be the parent's own lock and would
not exclude it: every forked child therefore re-opens its descriptor (``os.register_at_fork``),
through ``/proc/self/fd/N`` for a memfd or an anonymous heap's lock memfd. POSIX ``lockf`` is not
used: it is dropped when the process closes *any* descriptor of the file.

The lock is re-entrant per thread: ``with heap.lock():`` around many operations pays for one
acquisition, and every public heap operation takes it implicitly. Read-only handles take the lock
shared (``LOCK_SH``): they see no half-done operation and never write.

Costs (uncontended, measured by tools/bench_alloc.py): one outer acquire+release is one flock pair
(about 0.5-0.8 us here) plus an ``lseek`` for the truncation guard; a nested one is a few attribute
operations.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Final

from .errors import LockTimeoutError

POLL_START: Final = 0.0005  #: first sleep between non-blocking tries when a timeout is given, s
POLL_MAX: Final = 0.02  #: longest sleep between tries, s

_live_locks: weakref.WeakSet[HeapLock] = weakref.WeakSet()


def _reopen_all_after_fork() -> None:
    for lk in list(_live_locks):
        lk._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reopen_all_after_fork)


class HeapLock:
    """Re-entrant inter-process + inter-thread lock on a heap's backing file.

    ``reopen()`` opens a new descriptor of the heap's file: the lock calls it once now and again
    in every forked child (a new open file description, so the child's flock excludes the
    parent's). The lock owns that descriptor and closes it in :meth:`close`. ``on_acquire()``
    runs after the outermost acquisition and ``on_release()`` before the outermost release.
    """

    __slots__ = ("_fd", "_reopen", "_tlock", "_owner", "_depth", "_shared", "on_acquire",
                 "on_release", "on_fork_child", "_closed", "pid", "__weakref__")

    def __init__(self, reopen: Callable[[], int], *, shared: bool = False) -> None:
        self._fd = reopen()
        self._reopen = reopen
        self._tlock = threading.Lock()
        self._owner = 0
        self._depth = 0
        self._shared = shared
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
        return self._owner == threading.get_ident() and self._depth > 0

    @property
    def depth(self) -> int:
        """Nesting depth of the calling thread's hold (0 when not held by it)."""
        return self._depth if self._owner == threading.get_ident() else 0

    def acquire(self, timeout: float | None = None,
                holder: Callable[[], int] | None = None) -> None:
        """Take the lock (re-entrant). ``timeout`` in seconds; None waits forever.

        ``holder`` tells the pid in the heap header, for the LockTimeoutError message.
        """
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            return
        if timeout is None:
            self._tlock.acquire()
            try:
                fcntl.flock(self._fd, fcntl.LOCK_SH if self._shared else fcntl.LOCK_EX)
            except BaseException:
                self._tlock.release()
                raise
        else:
            deadline = time.monotonic() + timeout
            if not self._tlock.acquire(True, max(timeout, 0.0)):
                raise LockTimeoutError(f"heap lock not acquired within {timeout} s: another "
                                       f"thread of this process (pid {os.getpid()}) holds it")
            try:
                self._flock(deadline, timeout, holder)
            except BaseException:
                self._tlock.release()
                raise
        self._owner = me
        self._depth = 1
        try:
            self.on_acquire()
        except BaseException:
            self._depth = 0
            self._owner = 0
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._tlock.release()
            raise

    def _flock(self, deadline: float, timeout: float,
               holder: Callable[[], int] | None) -> None:
        op = (fcntl.LOCK_SH if self._shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
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

    def release(self) -> None:
        """Release one level; the outermost release runs ``on_release`` and unlocks."""
        if self._owner != threading.get_ident() or self._depth <= 0:
            raise RuntimeError("heap lock released by a thread that does not hold it")
        self._depth -= 1
        if self._depth:
            return
        try:
            self.on_release()
        finally:
            self._owner = 0
            try:
                if not self._closed:  # closed while held: the descriptor is gone already
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                self._tlock.release()

    def _after_fork_in_child(self) -> None:
        # The child has one thread and none of the parent's holds; give it a fresh thread lock and
        # its own open file description. The inherited descriptor shares the parent's: it is
        # closed so that it can never keep the parent's flock alive after the parent dies.
        self._tlock = threading.Lock()
        self._owner = 0
        self._depth = 0
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
        except OSError:  # the file is gone; operations will fail clearly when they try to lock
            self._fd = -1
            self._closed = True
        try:
            os.close(old)
        except OSError:
            pass

    def close(self) -> None:
        """Close the descriptor (dropping any hold it has). Never raises."""
        if not self._closed:
            self._closed = True
            try:
                os.close(self._fd)
            except OSError:
                pass
        _live_locks.discard(self)


def _nothing() -> None:
    return None


__all__ = ["HeapLock"]
