"""The public heap: a region, its lock, its journal and its allocator, behind one object.

>>> import pheap, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "demo.heap")
>>> with pheap.open(path, "c") as h:
...     off = h.malloc(5)
...     h.write(off, b"hello")
...     h.root_offset = off
>>> with pheap.open(path, "r") as h:      # later, from any process
...     h.read(h.root_offset, 5)
b'hello'

Structure. A :class:`Heap` is a handle. What it handles is a :class:`Core`: the mapping, the
lock, the journal and the allocator of one heap in this process. Every handle of one heap file
(or memfd) in a process shares one core -- ``pheap.open`` of the same file twice, a pickle round
trip, ``copy.copy`` -- so the handles share one lock and one journal: ``with a.lock():
b.malloc(8)`` re-enters the lock instead of deadlocking, and an operation through ``b`` inside a
transaction of ``a`` joins the transaction. The core closes when its last handle does.

Sessions. ``with heap.lock() as s``, ``with heap.atomic() as s`` and ``with heap.transaction() as
s`` yield a :class:`Session`: the narrow surface the layers above use (allocate, free, words and
bytes inside live blocks), bounds-checked against the live block and journaled where the bracket
needs it.
"""

from __future__ import annotations

import os

import stat
import threading
from collections.abc import Iterator
from typing import Any, Final

from . import format as F
from . import journal as J
from .allocator import Allocator, BlockInfo, HeapStats
from .errors import (
    CorruptHeapError,
    DamagedJournalError,
    FormatError,
    HeapClosedError,
    InvalidPointerError,
    InvalidSizeError,
    JournalFullError,
    NeedsRecoveryError,
    ReadOnlyError,
    TransactionStateError,
    TransactionTooLargeError,
)
from .journal import Journal
from . import objects as _objects
from .lock import HeapLock, try_exclusive
from .region import Region, allocate

DEFAULT_SIZE: Final = 1 << 20  #: initial capacity of a new heap, bytes (it grows on demand)
TX_LOG_SIZE: Final = 256 * 1024  #: undo log a transaction starts with, bytes (grows after overflow)
TX_LOG_KEEP: Final = 16 * TX_LOG_SIZE  #: a log grown past this for one object operation is
#: given back after it (to TX_LOG_SIZE): one huge assignment does not pin its log for good
FILE_MODE: Final = 0o600  #: permissions of new heap files: owner only

_get_ident = threading.get_ident

#: Layers above the allocator add their invariants here: ``hook(core)`` runs at the end of
#: every ``Heap.check()``, under the same hold of the lock; it raises CorruptHeapError naming
#: what is broken, and may return a report (the object layer returns what it found unreachable).
CHECK_HOOKS: list[Any] = []

#: Functions of this module that write the mapping without the journal, and why that is safe
#: (tests/test_allocator.py checks this list against the source, as for pheap.allocator).
UNJOURNALED: Final = {
    "_on_acquire": "the owner word, written while the lock is held and before any operation",
    "_on_release": "the owner word, cleared unless work is pending (then the next holder "
                   "recovers)",
    "_recover": "recovery itself: undo restores logged values, counters are statistics",
    "do_rebuild": "the rebuild marker around an unjournaled rebuild (pheap.allocator)",
    "write": "data bytes: logged first inside a bracket (Journal.log_range), and outside one a "
             "write is not atomic, as documented",
    "set_u64": "one aligned word: atomic by itself outside a bracket; inside, journaled unless "
               "the slot is fresh (allocated in the bracket, no undo needs its bytes)",
    "snapshot": "a private anonymous copy no other process maps",
    "_repair": "repair after a rebuild: clears dangling entries, raises zero_from",
    "_seq_call": "the object layer's version counter: it only ever moves on, so an undo must "
                 "not put it back (readers would take a torn read for a clean one)",
}
_SEEK_END: Final = os.SEEK_END
_H_GENERATION: Final = F.H_GENERATION
_H_CAPACITY: Final = F.H_CAPACITY
_H_OWNER_PID: Final = F.H_OWNER_PID
_H_ROOT: Final = F.H_ROOT
_H_OBJECTS: Final = F.H_OBJECTS
_H_OBJ_SEQ: Final = F.H_OBJ_SEQ
_H_OBJ_GRAVE: Final = F.H_OBJ_GRAVE
_M64: Final = (1 << 64) - 1  #: the version counter wraps (an even word stays even)
#: the brackets an object operation tries in turn: the operation journal in the header, then
#: transactions whose log grows fourfold (at least twice what the attempt before filled) each time
_OP_MODES: Final = (J.ATOMIC,) + (J.TX,) * 6
_J_STATE: Final = F.J_STATE
_cores: dict[tuple[int, int], Core] = {}  # one core per heap file/memfd in this process
_cores_lock = threading.Lock()

__all__ = ["Heap", "Session", "Core", "open", "snapshot", "anonymous", "memfd", "DEFAULT_SIZE"]


# ---------------------------------------------------------------------------------------------
# The core: one per mapped heap per process
# ---------------------------------------------------------------------------------------------


class Core(Allocator):
    """The mapping, lock, journal and allocator of one heap in this process (shared by all its
    handles). Its public methods are the allocator's; this class adds the lock around them,
    recovery, brackets and the bounds-checked data access."""

    def __init__(self, region: Region, *, lock_timeout: float | None = None,
                 durability: str = "process", key: tuple[int, int] | None = None) -> None:
        if durability not in ("process", "power"):
            raise ValueError(f"durability must be 'process' or 'power', not {durability!r}")
        super().__init__(region, Journal(region, durable=durability == "power"))
        self.region = region
        self.readonly = region.readonly
        self.durability = durability
        self.lock_timeout = lock_timeout
        self.key = key
        #: descriptor the truncation guard lseeks on acquisition (-1: a memfd sealed against
        #: shrinking, or an anonymous region, cannot be truncated)
        self._guard_fd = region.fd if region.kind == "file" or (region.kind == "memfd" and
                                                                not region.sealed) else -1
        #: whether the single-store fast paths may run: not under durability "power" (every
        #: operation msyncs its commit), nor while crash points are armed (the crash sweeps
        #: run the journaled path of every shape; the fast path's one store is atomic anyway)
        self._fast_ok = durability == "process" and not self._j._crashy
        self.handles = 0  #: open handles of this core
        self.closed = False
        self.tx_log_want = TX_LOG_SIZE
        self._lock_fd_source = -1
        if region.kind == "anon":
            # An anonymous mapping has no file to flock: a memfd stands in for it, inherited by
            # forked children like the mapping itself.
            self._lock_fd_source = os.memfd_create("pheap-lock", os.MFD_CLOEXEC)
            src = self._lock_fd_source
        else:
            src = region.fd
        self.lock = HeapLock(lambda: os.open(f"/proc/self/fd/{src}",
                                             os.O_RDONLY | os.O_CLOEXEC),
                             shared=self.readonly)
        self.lock.on_acquire = self._on_acquire
        self.lock.on_release = self._on_release
        self.lock.on_fork_child = self._after_fork_in_child
        self._validated = False
        self._old_regions: list[Region] = []
        self._obj_depth = 0  # nesting of object-layer operations (the version counter is odd)
        #: whether the open bracket is an object operation's own (not the user's, which other
        #: operations share): only then were the places past a container's count unused when
        #: it began, so that stores there need no records (pheap.objects)
        self.own_bracket = False
        self.after_op: Any = None  #: the object layer's hook: free what lost its references
        self.objects: Any = None  #: the object layer's per-core state (pheap.objects)
        self.allow_pickle = False  #: whether the object layer may store and load pickles
        # Recovers at once if a process died inside an operation; validates the header fields.
        try:
            self.acquire()
            self.lock.release()
        except BaseException:
            self.lock.close()
            if self._lock_fd_source >= 0:
                os.close(self._lock_fd_source)
            raise

    # -- lock and recovery -------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> None:
        """Take the heap lock (re-entrant); ``timeout`` None uses the heap's ``lock_timeout``."""
        if self.closed:
            raise HeapClosedError("the heap is closed")
        if timeout is None:
            timeout = self.lock_timeout
        if timeout is None:
            self.lock.acquire()
        else:
            self.lock.acquire(timeout, self._holder_pid)

    def _holder_pid(self) -> int:
        try:
            return int(self._w[F.H_OWNER_PID])
        except Exception:
            return 0

    def _on_acquire(self) -> None:
        # Runs after every outermost acquisition, so it is kept to a few word reads and, for
        # files, one lseek (the names are module constants: each F.X costs ~25 ns).
        if self.closed:
            raise HeapClosedError("the heap is closed")
        fd = self._guard_fd
        if fd >= 0 and os.lseek(fd, 0, _SEEK_END) < self._cap:
            # Foreign truncation guard: touching bytes past the end of the file would SIGBUS.
            raise CorruptHeapError(f"{F.at('capacity')}: the file is "
                                   f"{os.lseek(fd, 0, _SEEK_END)} bytes, shorter than the "
                                   f"heap's capacity {self._cap}: something truncated it")
        w = self._w
        if w[_H_GENERATION] != self._gen or w[_H_CAPACITY] != self._cap or \
                w is not self.region.w:
            self.sync()
            w = self._w
        if self.readonly:
            if w[_J_STATE]:
                raise NeedsRecoveryError(
                    f"{F.at('j_state')}: a process died inside an operation and its undo "
                    "records are pending; open the heap read-write (or run `pheap repair`) to "
                    "undo it")
            if not self._validated:
                F.validate_fields(w, self.region.file_size(), self.region.path or "heap")
                self._validated = True
            return
        if w[_H_OWNER_PID] or w[_J_STATE]:  # the last holder died inside, or left work: recover
            self._recover()
            w = self._w  # recovery may have remapped (an undone growth)
        if not self._validated:  # once per core: the fields a forged or damaged file may lie in
            F.validate_fields(w, self.region.file_size(), self.region.path or "heap")
            self._validated = True
        w[_H_OWNER_PID] = self.lock.pid
        self._pins = (w[_H_ROOT], w[_H_OBJECTS])
        me = self.lock.owner
        self.held = me
        if not self._j.mode and self._fast_ok:
            self.fast = me

    def _on_release(self) -> None:
        self.fast = 0
        self.held = 0
        if self.readonly or self.closed:
            return
        w = self._w
        if not (w[_J_STATE] or w[_H_OBJ_SEQ] & 1):  # else the next acquirer recovers
            w[_H_OWNER_PID] = 0

    def _after_fork_in_child(self) -> None:
        # A child forked inside a transaction or a lock hold of its parent is in neither: it
        # takes the lock afresh, and its operations journal on their own.
        self.fast = 0
        self.held = 0
        self._j.reset()
        self.pending.clear()
        _objects.after_fork(self)

    def _recover(self) -> None:
        """The last holder died holding the lock, or an operation of this process was cut off
        by an exception it could not finish undoing: make the heap whole again.

        Pending undo records are restored, O(records). A holder that died inside a rebuild
        leaves it to be done again, O(blocks). A holder that died between operations left
        nothing to do but count the recovery. Records that fail their checks raise
        DamagedJournalError and change nothing (``pheap repair`` discards them).
        """
        r = self.region
        w = self._w
        state = w[F.H_OWNER_STATE]
        if w[F.J_STATE] and not w[F.H_OWNER_PID]:
            # Every holder writes its pid before it changes anything and leaves it when it dies
            # (or leaves work): a journal with no owner is stale or damaged, not a crash's.
            raise DamagedJournalError(
                f"{F.at('j_state')}: {w[F.J_STATE]} says an operation is pending, but "
                f"{F.at('owner_pid')} is 0: no process held the lock; the journal is stale or "
                "damaged, and undoing it could change committed data (pheap repair discards "
                "it)")
        if w[F.J_STATE]:
            self.undos += 1  # (objects this process made in it are forgotten: pheap.objects)
            # Records may name words past the capacity the header shows now (a growth whose
            # capacity word an earlier, interrupted recovery already put back): map the whole
            # file so that every record can be checked and restored again.
            fsize = r.file_size() & ~(F.PAGE - 1)
            if fsize > r.size:
                r.remap(fsize)
                self._adopt()
            J.undo(self._w, r.size >> 3)
            self._gen = -1  # force the remap to the restored capacity
        self._j.reset()
        self.pending.clear()
        self.sync()
        w = self._w
        if state == F.STATE_REBUILD:
            self.rebuild()
        if w[F.H_OBJ_SEQ] & 1:
            w[F.H_OBJ_SEQ] = (w[F.H_OBJ_SEQ] + 1) & _M64  # a writer died: readers may go on
        w[F.H_RECOVERIES] += 1
        w[F.H_OWNER_STATE] = F.STATE_IDLE
        w[F.H_OWNER_PID] = 0

    def upgrade(self, fd: int) -> None:
        """A read-write open of a heap this process has open read-only: map it read-write
        through ``fd`` (which the core takes over), so that all its handles keep sharing one
        lock. The read-only handles stay read-only. Refused while the lock is held here."""
        lk = self.lock
        if lk.depth:
            os.close(fd)
            raise TransactionStateError("cannot open the heap read-write while a read-only "
                                        "handle of it holds its lock in this process")
        old = self.region
        try:
            new = Region.open_file(old.path or "", self._cap, fd=fd)
        except BaseException:
            os.close(fd)
            raise
        self._old_regions.append(old)  # views of the read-only mapping stay valid
        self.region = self._r = self._j._region = new
        self._adopt()
        self._guard_fd = new.fd
        self.readonly = False
        lk.shared = False
        self._validated = False
        self.acquire()  # recover if needed, as a read-write opener does
        lk.release()

    # -- the operation path ------------------------------------------------------------------

    def _locked(self, method: Any, fn: Any, *args: Any) -> Any:
        """A modifying call made without the lock: check the heap is writable and open (the
        one writability check of every modifying call), take the lock, call ``method(*args)``
        again (now it may take its fast path), release."""
        if self.readonly:
            raise ReadOnlyError("modifying operation on a heap opened read-only (flag 'r')")
        if self.closed:
            raise HeapClosedError("the heap is closed")
        if self.lock_timeout is not None:
            self.acquire()
            try:
                return method(*args)
            finally:
                self.lock.release()
        return self.lock.call(method, *args)

    def op(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` as one atomic operation of the layers above: under the lock, inside an
        atomic bracket (or the user's open bracket, which it joins), with the object layer's
        version counter odd while it runs (readers that skip the lock see the change and try
        again). An operation too large for the operation journal is undone and run again as a
        transaction, whose log grows. Afterwards, objects the operation left without references
        are freed a little at a time (:func:`pheap.objects.reap`).

        The path of every write to a shared object, so written flat (each call layer removed is
        ~0.1 us an operation): the lock's own :meth:`HeapLock.call`, then :meth:`_op_locked`."""
        lk = self.lock
        if lk.owner == _get_ident() and lk.depth:
            return self._op_locked(fn, args)
        if self.closed:
            raise HeapClosedError("the heap is closed")
        if self.lock_timeout is None:
            return lk.call(self._op_locked, fn, args)
        return self.run(self._op_locked, fn, args)

    def _op_locked(self, fn: Any, args: tuple[Any, ...]) -> Any:
        if self.readonly:
            raise ReadOnlyError("modifying operation on a heap opened read-only (flag 'r')")
        j = self._j
        if j.mode >= J.ATOMIC or self._obj_depth:  # inside a bracket or another object op
            return self._seq_call(fn, args)
        if not j.mode and self._w[_J_STATE]:
            self.finish_undo()
        for mode in _OP_MODES:
            self.open_bracket(mode)
            self._obj_depth = 1
            self.own_bracket = True
            try:
                r = fn(*args)
            except JournalFullError as e:
                self._obj_depth = 0
                self.own_bracket = False
                self.close_bracket(False)
                if mode == J.TX:  # again, with a log well past what this attempt filled
                    need = getattr(e, "needed", 0)
                    if not need or need > self._cap:
                        raise
                    self.tx_log_want = max(self.tx_log_want * 4, need * 2)
                continue
            except BaseException:
                self._obj_depth = 0
                self.own_bracket = False
                self.close_bracket(False)
                raise
            self._obj_depth = 0
            self.own_bracket = False
            self.close_bracket(True)
            if mode == J.TX and self.tx_log_want > TX_LOG_KEEP:
                self.tx_log_want = TX_LOG_SIZE
                self._ensure_txlog(TX_LOG_SIZE, shrink=True)
            st = self.objects
            if st is not None and (st.to_bury or self._w[_H_OBJ_GRAVE]):
                self.after_op(self)
            return r
        raise TransactionTooLargeError(f"an operation outgrew its transaction log "
                                       f"{len(_OP_MODES) - 1} times over, each time with one "
                                       f"four times larger (last {self.tx_log_want} bytes)")

    def after_undo(self) -> None:
        """After any undo: refresh the mapping and entries; objects made in what was undone
        lose their handles in this process (:func:`pheap.objects._after_undo`)."""
        super().after_undo()
        if self.objects is not None:
            _objects._after_undo(self)

    def finish_undo(self) -> None:
        """Finish a rollback an interrupt cut off; the version counter, left odd by it, goes on
        to even (unless an object call of this thread is still running: it does that)."""
        super().finish_undo()
        w = self._w
        s = w[_H_OBJ_SEQ]
        if s & 1 and not self._obj_depth:
            w[_H_OBJ_SEQ] = (s + 1) & _M64  # unlogged: even again, and changed

    def _seq_call(self, fn: Any, args: tuple[Any, ...]) -> Any:
        """Run ``fn`` with the version counter odd, and even again (one step on) afterwards,
        whatever happens. Inside a bracket (odd from its opening to its end) or a call of its
        own, the outermost does it."""
        if self._obj_depth or self._j.mode >= J.ATOMIC:
            self._obj_depth += 1
            try:
                return fn(*args)
            finally:
                self._obj_depth -= 1
        w = self._w
        s = w[_H_OBJ_SEQ]
        w[_H_OBJ_SEQ] = s | 1  # unlogged: the counter only ever moves on (see _recover)
        self._obj_depth = 1
        try:
            return fn(*args)
        finally:
            self._obj_depth = 0
            self._w[_H_OBJ_SEQ] = ((s | 1) + 1) & _M64  # unlogged: even again, and changed

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` with the lock held (re-entrant): the path of every Heap call. Written
        without a with-statement: an interrupt can land at the entry of a context manager's
        ``__exit__``, before it releases anything; :meth:`HeapLock.call` has no such gap."""
        if self.closed:
            raise HeapClosedError("the heap is closed")
        if self.lock_timeout is None:
            return self.lock.call(fn, *args)
        lk = self.lock
        me = _get_ident()
        depth = lk.depth if lk.owner == me else 0
        try:
            self.acquire()
            return fn(*args)
        finally:
            if lk.owner == me and lk.depth > depth:
                lk.release()

    def entry(self, name: str) -> int:
        """The offset header entry ``name`` holds (0: none). The caller holds the lock."""
        return int(self._w[F.ENTRIES[name]])

    # -- brackets ------------------------------------------------------------------------------

    def open_bracket(self, mode: int, log_size: int = 0) -> bool:
        """With the lock held: open an atomic bracket or a transaction, or join the open one.
        Returns whether this call opened it (and must close it)."""
        if self.readonly:
            raise ReadOnlyError("atomic()/transaction() on a heap opened read-only")
        j = self._j
        if not j.mode and self._w[_J_STATE]:
            self.finish_undo()  # an earlier rollback was cut off (Ctrl-C): finish it first
        if j.mode >= J.ATOMIC:
            if mode == J.TX and j.mode == J.ATOMIC:
                raise TransactionStateError("transaction() inside atomic(): an atomic bracket "
                                            "cannot grow into a transaction; open the "
                                            "transaction first")
            return False
        if j.mode:
            raise TransactionStateError("a bracket opened inside an allocator operation")
        st = self.objects
        if st is not None and (st.made or st.seen_undos != self.undos):
            _objects._after_undo(self)  # (left by an undo an interrupt cut short: finish it)
            st.made.clear()
        if mode == J.TX:
            self._ensure_txlog(max(log_size, self.tx_log_want))
        if self.pending:
            self.release_pending()
        self.fast = 0
        self.own_bracket = False  # (an object operation sets it once this returns)
        try:
            j.open_bracket(mode, self._meta)
            w = self._w
            w[_H_OBJ_SEQ] |= 1  # unlogged: odd until the bracket ends (see close_bracket)
        except BaseException:
            if j.mode or self._w[F.J_STATE]:
                self.close_bracket(False)
            raise
        return True

    def close_bracket(self, commit: bool, durable: bool = False) -> None:
        """Commit or undo the open bracket; then give back pages it freed.

        The object layer's version counter is odd from the bracket's opening until here, after
        the commit or the undo: a reader that skips the lock never takes a state the bracket
        had not finished (nor one it undid) for a clean one. If the undo is cut off, the counter
        stays odd until recovery finishes it (readers take the lock meanwhile)."""
        self.own_bracket = False
        if not commit:
            self.undos += 1
        try:
            self._j.close_bracket(commit, durable)
        finally:
            if not commit:
                self.pending.clear()
                self.after_undo()  # (the objects it made lose their handles here)
            elif not self._w[_J_STATE]:  # committed (not cut short before its commit word)
                st = self.objects
                if st is not None and st.made:
                    if st.seen_undos != self.undos:  # an undo inside it was cut short
                        _objects._after_undo(self)
                    st.made.clear()  # (nothing made in the bracket can be undone any more)
        w = self._w
        s = w[_H_OBJ_SEQ]
        if s & 1:
            w[_H_OBJ_SEQ] = (s + 1) & _M64  # unlogged: even again, and changed
        if commit and self.pending:
            self.release_pending()
        if self._fast_ok and self.lock.owner == _get_ident():
            self.fast = self.lock.owner

    def _ensure_txlog(self, nbytes: int, shrink: bool = False) -> None:
        """Make the transaction log block at least ``nbytes`` long (one atomic operation);
        ``shrink``: also replace one more than TX_LOG_KEEP long by one of ``nbytes``."""
        w = self._w
        cur = w[F.H_TXLOG]
        if cur:
            try:
                b = self._block_of(cur)
            except InvalidPointerError as e:
                raise CorruptHeapError(f"{F.at('txlog')}: {cur} is not a live block "
                                       f"({e})") from None
            have = (w[b >> 3] & F.SIZE_MASK) - 8
            if have >= nbytes and not (shrink and have > TX_LOG_KEEP):
                return

        def swap() -> None:
            new = self._block(F.request_to_block(max(nbytes, 2 * F.RUN_LIMIT)), False) + 8
            self._set_entry_word(F.H_TXLOG, new)
            if cur:
                b = cur - 8
                self._set_alloc_bit(b, False)
                self._free_block(b, self._w[b >> 3] & F.SIZE_MASK)

        self._bracket(swap)

    # -- data access ---------------------------------------------------------------------------

    def write(self, off: int, data: Any) -> None:
        """Bounds-checked write of ``data`` at ``off`` (inside one live block), logged inside a
        bracket. The caller holds the lock."""
        if self.readonly:
            raise ReadOnlyError("write() on a heap opened read-only (flag 'r')")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        if off in self._j.fresh and off + n <= self._j.fresh[off]:
            pass  # a block allocated in this bracket: no undo record needed
        else:
            self.containing(off, n)
            if off == self._w[F.H_TXLOG] or self._in_txlog(off):
                raise InvalidPointerError(f"range [{off}, {off + n}) is the transaction log")
            if self._j.mode >= J.ATOMIC:
                self._j.log_range(off, n)
        self.region.mm[off:off + n] = mv

    def _in_txlog(self, off: int) -> bool:
        t = self._w[F.H_TXLOG]
        return bool(t) and t <= off < t - 8 + (self._w[(t >> 3) - 1] & F.SIZE_MASK)

    def read(self, off: int, n: int) -> bytes:
        """Bounds-checked copy of ``n`` bytes at ``off``. The caller holds the lock."""
        self.containing(off, n)
        return self.region.mm[off:off + n]

    def view(self, off: int, n: int, writable: bool) -> memoryview:
        """Bounds-checked memoryview of ``n`` bytes at ``off``."""
        self.containing(off, n)
        if writable and self._in_txlog(off):
            raise InvalidPointerError(f"range [{off}, {off + n}) is the transaction log")
        v = self.region.b[off:off + n]
        return v if writable and not self.readonly else v.toreadonly()

    # -- whole-heap operations ---------------------------------------------------------------

    def do_rebuild(self) -> int:
        """rebuild() under the lock, marked so that a crash half way is rebuilt again."""
        if self._j.mode:
            raise TransactionStateError("rebuild()/repair() inside a transaction or atomic "
                                        "bracket: its undo could not restore what the rebuild "
                                        "rewrites; call it after the commit")
        self.check_tags()  # damaged tags: raise before changing anything
        w = self._w
        w[F.H_OWNER_STATE] = F.STATE_REBUILD  # a crash from here: the next holder rebuilds
        n = self.rebuild()
        w[F.H_OWNER_STATE] = F.STATE_IDLE
        return n

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close. Never raises."""
        if self.closed:
            return
        try:
            _objects.before_close(self)
        except Exception:
            pass
        self.closed = True
        self.fast = 0
        self.held = 0
        with _cores_lock:
            if self.key is not None and _cores.get(self.key) is self:
                del _cores[self.key]
        try:
            self.lock.close()
            self.region.close()
            for r in self._old_regions:
                r.close()
            if self._lock_fd_source >= 0:
                os.close(self._lock_fd_source)
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# Sessions: the surface for the layers above
# ---------------------------------------------------------------------------------------------


class Session:
    """What ``with heap.lock()``, ``heap.atomic()`` and ``heap.transaction()`` yield: allocation
    and bounds-checked access to the words and bytes of live blocks, under the held lock.

    Inside ``lock()`` every call is atomic by itself. Inside ``atomic()`` and ``transaction()``
    everything is all-or-nothing: stores into blocks that existed before the bracket are logged
    first; stores into blocks allocated inside it are not (an undo frees them anyway).

    Offsets name live blocks or slots as malloc returned them; word ``i`` of block ``off`` is at
    ``off + 8 * i``. A block is checked once per session (O(1)) and remembered, so later
    accesses cost a dict lookup. A session is valid inside its ``with`` block only.

    >>> import pheap
    >>> h = pheap.anonymous()
    >>> with h.atomic() as s:
    ...     a = s.malloc(32)
    ...     s.set_u64(a, 0, 7)
    ...     s.write(a, b"tail", start=8)
    ...     s.u64(a), s.read(a, 4, start=8)
    (7, b'tail')
    >>> with h.lock() as s:
    ...     s.u64(a, 4)
    Traceback (most recent call last):
    ...
    pheap.errors.InvalidPointerError: word 4 of the block at ... is past its 32 bytes
    """

    __slots__ = ("_c", "_heap", "_live", "open", "tx")

    def __init__(self, heap: Heap, tx: bool = False) -> None:
        self._heap = heap
        self._c = heap._core
        self._live: dict[int, int] = {}  # block -> usable bytes, checked in this session
        self.open = True  #: False once the ``with`` block has ended
        self.tx = tx  #: whether this is a transaction (``add_range`` works)

    def _size(self, off: int) -> int:
        if not self.open:
            raise TransactionStateError("a session used after its with-block ended")
        n = self._live.get(off)
        if n is None:
            n = self._live[off] = self._c.live_size(off)
        return n

    def malloc(self, n: int) -> int:
        """Allocate ``n`` bytes (see Heap.malloc). O(1)."""
        p = self._c.malloc(n)
        return p

    def calloc(self, count: int, size: int) -> int:
        """Allocate ``count * size`` zeroed bytes. O(1) plus the memset."""
        return self._c.calloc(count, size)

    def realloc(self, off: int, n: int) -> int:
        """Resize the allocation at ``off``; return its (maybe new) offset."""
        self._live.pop(off, None)
        return self._c.realloc(off, n)

    def memalign(self, alignment: int, n: int) -> int:
        """Allocate ``n`` bytes aligned to ``alignment`` (a power of two up to 4096)."""
        return self._c.memalign(alignment, n)

    def free(self, off: int) -> None:
        """Free the allocation at ``off``. O(1)."""
        self._live.pop(off, None)
        self._c.free(off)

    def usable_size(self, off: int) -> int:
        """Usable bytes of the live block at ``off``. O(1)."""
        return self._size(off)

    def u64(self, off: int, i: int = 0) -> int:
        """Word ``i`` of the live block at ``off``. O(1)."""
        n = self._live.get(off) if self.open else None
        if n is None:
            n = self._size(off)
        if -1 < i and i << 3 < n:
            return self._c._w[(off >> 3) + i]  # type: ignore[no-any-return]
        raise InvalidPointerError(f"word {i} of the block at {off} is past its {n} bytes")

    def set_u64(self, off: int, i: int, v: int) -> None:
        """Store ``v`` in word ``i`` of the live block at ``off`` (journaled in a bracket unless
        the block was allocated in it). O(1)."""
        n = self._live.get(off) if self.open else None
        if n is None:
            n = self._size(off)
        if not (-1 < i and i << 3 < n):
            raise InvalidPointerError(f"word {i} of the block at {off} is past its {n} bytes")
        c = self._c
        if c.readonly:
            raise ReadOnlyError("set_u64() on a heap opened read-only")
        j = c._j
        if j.mode >= J.ATOMIC and off not in j.fresh:
            j.set((off >> 3) + i, v)
        else:
            c._w[(off >> 3) + i] = v

    def words(self, off: int) -> memoryview:
        """A read-only word view (``'Q'``) of the payload of the live block at ``off``: indexing
        it is the fastest checked read (bounds by the view). O(1)."""
        n = self._size(off)
        return self._c.region.b[off:off + (n & -8)].cast("Q").toreadonly()

    def read(self, off: int, n: int | None = None, start: int = 0) -> bytes:
        """``n`` bytes (default: to the end) from byte ``start`` of the live block at ``off``."""
        size = self._size(off)
        if n is None:
            n = size - start
        if start < 0 or n < 0 or start + n > size:
            raise InvalidPointerError(f"bytes [{start}, {start + n}) of the block at {off} are "
                                      f"not inside its {size} bytes")
        return self._c.region.mm[off + start:off + start + n]

    def write(self, off: int, data: Any, start: int = 0) -> None:
        """Copy ``data`` to byte ``start`` of the live block at ``off`` (logged in a bracket
        unless the block was allocated in it)."""
        size = self._size(off)
        mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        n = len(mv)
        if start < 0 or start + n > size:
            raise InvalidPointerError(f"bytes [{start}, {start + n}) of the block at {off} are "
                                      f"not inside its {size} bytes")
        c = self._c
        if c.readonly:
            raise ReadOnlyError("write() on a heap opened read-only")
        j = c._j
        if j.mode >= J.ATOMIC and off not in j.fresh:
            j.log_range(off + start, n)
        c.region.mm[off + start:off + start + n] = mv

    def view(self, off: int, n: int | None = None, start: int = 0) -> memoryview:
        """A memoryview of bytes of the live block at ``off``. Writes through it are neither
        locked nor logged (call ``add_range`` first inside a transaction)."""
        size = self._size(off)
        if n is None:
            n = size - start
        if start < 0 or n < 0 or start + n > size:
            raise InvalidPointerError(f"bytes [{start}, {start + n}) of the block at {off} are "
                                      f"not inside its {size} bytes")
        v = self._c.region.b[off + start:off + start + n]
        return v.toreadonly() if self._c.readonly else v

    def add_range(self, off: int, n: int) -> None:
        """Log bytes [off, off+n) of a live block before changing them through a view. O(n)."""
        if not self.open or not self.tx and self._c._j.mode < J.ATOMIC:
            raise TransactionStateError("add_range() outside a transaction or atomic bracket")
        self._c.containing(off, n)
        self._c._j.log_range(off, n)

    def entry(self, name: str) -> int:
        """The offset header entry ``name`` holds (0: none)."""
        i = F.ENTRIES.get(name)
        if i is None:
            raise KeyError(f"no header entry {name!r}; there are {sorted(F.ENTRIES)}")
        return int(self._c._w[i])

    def set_entry(self, name: str, off: int) -> None:
        """Point header entry ``name`` at the live block ``off`` (or 0)."""
        self._c.set_entry(name, off)


class _Hold:
    """What one entered with-block of :class:`_SessionContext` holds, and how to let go of it.

    Every field is set before the first thing is taken, and :meth:`cleanup` derives what to undo
    from the state itself -- the lock depth this thread had before, whether a bracket was open
    before -- so it is idempotent and right wherever an exception raised by a signal handler
    (Ctrl-C) cut the entry or the exit short. Holds are pooled: a with-block that exits normally
    puts its hold back, so ``__del__`` runs only for a hold whose with-block never ran its exit
    -- the one gap no Python code can close, an interrupt at the very first instruction of
    ``__exit__``. The context then drops the hold, and (once the exception that interrupted it
    is gone) the bracket is rolled back and the lock released here.
    """

    __slots__ = ("core", "session", "tid", "depth0", "mode0", "mode", "durable", "live")

    def cleanup(self, commit: bool, ev: object) -> None:
        """Close what the with-block opened and release what it took; safe to run again."""
        if not self.live:
            return
        core = self.core
        if self.session is not None:
            self.session.open = False
        lk = core.lock
        me = self.tid
        try:
            if self.mode and not self.mode0 and core._j.mode:  # the bracket is this block's
                if core.closed:
                    raise HeapClosedError("the heap was closed inside a transaction: it was not "
                                          "committed, and the next process to open the heap "
                                          "undoes it")
                if lk.owner == me:
                    try:
                        core.close_bracket(commit, self.durable)
                    finally:
                        if isinstance(ev, TransactionTooLargeError):
                            core.tx_log_want = max(core.tx_log_want * 2, TX_LOG_SIZE,
                                                   ev.needed if ev.needed <= core._cap else 0)
                    # Object operations inside the bracket freed nothing (the bracket was
                    # open): free what it left without references now, as after an operation
                    # -- from a with-statement's exit only (not from __del__ or a failed entry).
                    if core.after_op is not None and (commit or ev is not None):
                        try:
                            core.after_op(core)
                        except Exception:
                            pass  # (its own bracket was undone: the next operation tries again)
        finally:
            while lk.owner == me and lk.depth > self.depth0:
                lk.release()
            self.live = False

    def __del__(self) -> None:
        if getattr(self, "live", False):  # (an interrupt may have cut its setting-up short)
            try:
                self.cleanup(False, None)
            except Exception:
                pass


_holds: list[_Hold] = []  # the pool
_HOLDS_KEPT: Final = 64  #: holds the pool keeps for reuse


class _SessionContext:
    """The with-statement of ``heap.lock()``, ``heap.atomic()`` and ``heap.transaction()``:
    entering takes the lock and (for a bracket) opens it, leaving closes and releases (see
    :class:`_Hold` for what happens when Ctrl-C cuts either short)."""

    __slots__ = ("_heap", "_mode", "_timeout", "_log_size", "_durable", "_hold")

    def __init__(self, heap: Heap, mode: int, timeout: float | None, log_size: int = 0,
                 durable: bool = False) -> None:
        self._heap = heap
        self._mode = mode
        self._timeout = timeout
        self._log_size = log_size
        self._durable = durable
        self._hold: _Hold | None = None

    def __enter__(self) -> Session:
        h = self._heap
        core = h._live_core()
        if self._mode and h.readonly:
            raise ReadOnlyError("atomic()/transaction() on a heap opened read-only (flag 'r')")
        if self._hold is not None:
            raise TransactionStateError("a heap.lock()/atomic()/transaction() context is not "
                                        "re-entrant: make a new one for each with-statement")
        lk = core.lock
        me = _get_ident()
        g = _holds.pop() if _holds else _Hold()
        g.core, g.session, g.tid, g.mode, g.durable = core, None, me, self._mode, self._durable
        g.depth0 = lk.depth if lk.owner == me else 0
        # A bracket open now is this thread's only if it holds the lock (another thread's is
        # closed by the time this one has the lock).
        g.mode0 = core._j.mode if lk.owner == me else 0
        g.live = True
        self._hold = g
        try:
            core.acquire(self._timeout)
            if self._mode:
                core.open_bracket(self._mode, self._log_size)
            g.session = Session(h, self._mode == J.TX)
        except BaseException:
            g.cleanup(False, None)
            raise
        return g.session

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        g = self._hold
        if g is None:
            return
        g.cleanup(et is None, ev)
        self._hold = None
        g.core = g.session = None  # type: ignore[assignment]
        if len(_holds) < _HOLDS_KEPT:
            _holds.append(g)


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
    d = os.path.dirname(path)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}"
                          ".new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        allocate(fd, 0, cap)
        os.pwrite(fd, F.new_header(cap, max_size), 0)
        os.fsync(fd)
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


def _open_regular(path: str, readonly: bool) -> int:
    """Open ``path`` without blocking (a FIFO would) and make sure it is a regular file."""
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NONBLOCK |
                     os.O_CLOEXEC)
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a heap file") from None
    try:
        _must_be_regular(path, os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _must_be_regular(path: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{path}: is a directory, not a heap file")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: not a regular file (a FIFO, device or socket), so not a "
                          "heap")


def _replace(path: str, tmp: str) -> None:
    """Put the new heap ``tmp`` in place of ``path``, refusing while ``path`` is attached."""
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:  # not ours to write: it can still be replaced, if not in use
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        os.replace(tmp, path)
        return
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a heap file") from None
    try:
        _must_be_regular(path, os.fstat(fd))  # 'n' replaces heaps and files, not devices
        try_exclusive(fd, path)  # held until fd closes: openers of the old file wait, then see
        os.replace(tmp, path)    # it was replaced
    finally:
        os.close(fd)


def open(path: str | os.PathLike[str], flag: str = "c", *, size: int = DEFAULT_SIZE,
         max_size: int = 0, mode: int = FILE_MODE, lock_timeout: float | None = None,
         durability: str = "process", allow_pickle: bool = False) -> Heap:
    """Open or create a heap file. ``flag`` as in :mod:`dbm`:

    ``'r'`` existing, read-only; ``'w'`` existing, read-write; ``'c'`` read-write, created if
    missing; ``'n'`` always a new, empty heap (replacing any file at ``path``; HeapInUseError
    while a handle anywhere has that heap open).

    ``size`` is the initial capacity of a new heap (it grows on demand, up to ``max_size`` bytes
    when that is not 0). New files get ``mode`` (0600). Creation is atomic: the heap is built under
    a temporary name and linked into place, so processes racing to create ``path`` all end up
    with the one complete heap. Opening is O(1): the header is validated, nothing is scanned.
    A second ``open`` of the same file in one process shares the first one's lock, journal and
    objects (so it must agree on ``allow_pickle``: ValueError otherwise).

    ``durability``: ``"process"`` (every operation survives the death of any process) or
    ``"power"`` (also an OS crash or power loss: an msync around every commit).

    ``allow_pickle``: let shared containers store values of other types by pickling them, and
    load such values. Off by default: a heap file is untrusted input, and unpickling runs
    whatever the bytes say. Only for heaps you trust.
    """
    path = os.path.abspath(os.fspath(path))  # pickled handles re-open it from anywhere
    if flag not in ("r", "w", "c", "n"):
        raise ValueError(f"flag must be 'r', 'w', 'c' or 'n', not {flag!r}")
    if durability not in ("process", "power"):
        raise ValueError(f"durability must be 'process' or 'power', not {durability!r}")
    if flag in ("c", "n"):
        cap = _capacity_for(size, max_size)
        if flag == "n":
            tmp = _new_file(path, cap, max_size, mode)
            try:
                _replace(path, tmp)
            except BaseException:
                _unlink_quietly(tmp)
                raise
        elif not os.path.lexists(path):
            tmp = _new_file(path, cap, max_size, mode)
            try:
                os.link(tmp, path)  # atomic, and never replaces: the first creator wins
            except FileExistsError:
                pass
            finally:
                _unlink_quietly(tmp)
    readonly = flag == "r"
    for _attempt in range(100):
        fd = _open_regular(path, readonly)
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            with _cores_lock:
                core = _cores.get(key)
                if core is not None and not core.closed:
                    if lock_timeout is not None:
                        core.lock_timeout = lock_timeout
                    if core.readonly and not readonly:
                        core.upgrade(fd)  # one core, one lock per heap in a process
                    else:
                        os.close(fd)
                    fd = -1
                    if core.allow_pickle != allow_pickle:
                        raise ValueError(
                            f"{path} is open in this process with allow_pickle="
                            f"{core.allow_pickle}; a second handle shares its objects, so it "
                            f"cannot have allow_pickle={allow_pickle}: open it the same way")
                    return Heap(core, readonly, lock_timeout)
            _, cap = F.read_header(fd, path)
            region = Region.open_file(path, cap, readonly=readonly, fd=fd)
            fd = -1
        finally:
            if fd >= 0:
                os.close(fd)
        try:
            core = Core(region, lock_timeout=lock_timeout, durability=durability, key=key)
        except BaseException:
            region.close()
            raise
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == key:
            with _cores_lock:
                old = _cores.get(key)
                if old is None or old.closed or old.readonly:
                    _cores[key] = core
            core.allow_pickle = allow_pickle
            return Heap(core, readonly, lock_timeout)
        core.close()  # replaced (flag 'n' elsewhere) between our open and our attach: again
    raise FormatError(f"{path}: replaced again and again while opening it")


def snapshot(path: str | os.PathLike[str]) -> Heap:
    """A read-only handle on a private copy of the heap file at ``path``, taken without the
    lock: for inspecting a heap that another process holds (``pheap info --snapshot``).

    Never waits. The copy is as the file was while it was read: if a process was inside an
    operation then, the copy's journal rolls that operation back, as the next opener of the
    real file would; a process changing the heap *while* it is copied can leave a copy whose
    parts disagree, which ``check()`` then reports. O(file size).
    """
    path = os.path.abspath(os.fspath(path))
    fd = _open_regular(path, True)
    try:
        head, cap = F.read_header(fd, path)
        size = os.fstat(fd).st_size & ~(F.PAGE - 1)
        region = Region.new_anonymous(max(size, cap))
        pos = 0
        while pos < region.size:
            chunk = os.pread(fd, min(1 << 24, region.size - pos), pos)
            if not chunk:
                break
            region.mm[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
    finally:
        os.close(fd)
    if region.size != cap:  # a copy of a longer file (an undone growth): map the capacity
        small = Region.new_anonymous(cap)
        small.mm[:] = region.mm[:cap]
        region.close()
        region = small
    region.path = path
    core = Core(region)  # recovers the copy if the file was caught inside an operation
    return Heap(core, True, None)


def anonymous(size: int = DEFAULT_SIZE, *, allow_pickle: bool = False) -> Heap:
    """A fixed-capacity heap in anonymous shared memory (``MAP_SHARED``).

    Forked children (``os.fork``, multiprocessing's fork start method) share it. It cannot grow:
    when it is full, malloc raises HeapFullError. Gone when the last process unmaps it.
    """
    cap = _capacity_for(size, 0)
    region = Region.new_anonymous(cap)
    Allocator.format_region(region, cap)
    core = Core(region)
    core.allow_pickle = allow_pickle
    return Heap(core, False, None)


def memfd(size: int = DEFAULT_SIZE, *, max_size: int = 0, name: str = "pheap",
          allow_pickle: bool = False) -> Heap:
    """A growable anonymous heap backed by ``memfd_create`` (Linux). Forked children share it,
    growth included; spawned children and pool workers get it by pickling the heap. Gone when
    the last process closes it. The memfd is sealed against shrinking, so no process can
    truncate it under the others.
    """
    cap = _capacity_for(size, max_size)
    region = Region.new_memfd(cap, name)
    Allocator.format_region(region, max_size)
    st = os.fstat(region.fd)
    key = (st.st_dev, st.st_ino)
    core = Core(region, key=key)
    core.allow_pickle = allow_pickle
    with _cores_lock:
        _cores[key] = core
    return Heap(core, False, None)


def _reattach_file(path: str, flag: str, lock_timeout: float | None,
                   durability: str = "process", allow_pickle: bool = False) -> Heap:
    return open(path, flag, lock_timeout=lock_timeout, durability=durability,
                allow_pickle=allow_pickle)


def _reattach_memfd(dupfd: Any, lock_timeout: float | None,
                    allow_pickle: bool = False) -> Heap:
    fd = dupfd.detach()
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with _cores_lock:
            core = _cores.get(key)
            if core is not None and not core.closed:
                return Heap(core, False, lock_timeout)
        _, cap = F.read_header(fd, "memfd heap")
        region = Region("memfd", fd, cap)
        fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    core = Core(region, lock_timeout=lock_timeout, key=key)
    core.allow_pickle = allow_pickle
    with _cores_lock:
        _cores[key] = core
    return Heap(core, False, lock_timeout)


# ---------------------------------------------------------------------------------------------
# The Heap handle
# ---------------------------------------------------------------------------------------------


class Heap:
    """A heap in a mapping. Create one with :func:`pheap.open`, :func:`pheap.anonymous` or
    :func:`pheap.memfd`.

    Every operation takes the heap lock (re-entrant; ``with heap.lock():`` batches many
    operations under one acquisition). Offsets are plain ints, valid in every process.
    """

    def __init__(self, core: Core, readonly: bool, lock_timeout: float | None) -> None:
        self._core = core
        self._closed = False
        self.readonly = readonly or core.readonly
        if lock_timeout is not None:
            core.lock_timeout = lock_timeout
        core.handles += 1
        if not self.readonly:
            # The two hottest calls go straight to the core: one call layer less, ~0.1 us a
            # malloc+free pair (tools/bench_alloc.py, 3a).
            self.malloc = core.malloc
            self.free = core.free

    def _live_core(self) -> Core:
        if self._closed or self._core.closed:
            raise HeapClosedError("the heap is closed")
        return self._core

    def _mutable_core(self, what: str) -> Core:
        c = self._live_core()
        if self.readonly:
            raise ReadOnlyError(f"{what}() on a heap opened read-only (flag 'r')")
        return c

    # -- sessions -------------------------------------------------------------------------------

    def lock(self, timeout: float | None = None) -> _SessionContext:
        """``with heap.lock() as s:`` holds the heap lock across many operations. Re-entrant.

        Each operation inside is atomic by itself; ``s`` is a :class:`Session`.
        ``timeout`` (seconds) raises LockTimeoutError naming the holder's pid when it can.
        """
        return _SessionContext(self, J.IDLE, timeout)

    def atomic(self, timeout: float | None = None) -> _SessionContext:
        """``with heap.atomic() as s:`` -- several operations and word writes as one: all of
        them, or (on an exception, or if the process dies inside) none.

        Cheaper than a transaction: the records stay in the 3.5 KiB operation journal in the
        header, and stores into blocks allocated inside need none. JournalFullError (rolled
        back) when it changes more; use :meth:`transaction` for large updates.

        >>> import pheap
        >>> h = pheap.anonymous()
        >>> try:
        ...     with h.atomic() as s:
        ...         a = s.malloc(100)
        ...         raise RuntimeError("changed my mind")
        ... except RuntimeError:
        ...     pass
        >>> h.stats().used_blocks
        0
        """
        return _SessionContext(self, J.ATOMIC, timeout)

    def transaction(self, log_size: int = 0, durable: bool = False,
                    timeout: float | None = None) -> _SessionContext:
        """``with heap.transaction() as tx:`` -- everything inside is all-or-nothing.

        Every malloc/calloc/realloc/free/memalign, every :meth:`write`, and every range passed
        to ``tx.add_range(off, n)`` before changing it through a view is undone when the block
        raises, and by the next opener when the process dies inside it. A normal exit commits
        with one word. Blocks allocated by an aborted transaction are free again, never leaked;
        shared objects made in it are gone too, and their handles raise ReferenceError (a numpy
        array or buffer made in it is bare memory, given back: do not use it after the undo).
        The heap lock is held throughout; nested transactions join the outer one (an exception
        caught inside the outer block undoes nothing by itself: the outer block's end decides).

        ``log_size`` (bytes) sizes the undo log; the default starts at 256 KiB and grows after
        a transaction overflows it (that one raises TransactionTooLargeError, rolled back).
        ``durable=True`` msyncs the mapping around the commit, so the committed transaction also
        survives an OS crash or a power loss (see docs/design.md for what that covers).
        Cost: one lock hold, ~0.2 us per allocator word changed, one copy per logged range.

        >>> import pheap
        >>> h = pheap.anonymous()
        >>> a = h.malloc(4); h.write(a, b"old!")
        >>> try:
        ...     with h.transaction():
        ...         h.write(a, b"new!")
        ...         b = h.malloc(1000)
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
        return _SessionContext(self, J.TX, timeout, log_size, durable)

    # -- allocation --------------------------------------------------------------------------

    def malloc(self, n: int) -> int:
        """Allocate ``n`` bytes; return the payload offset. O(1).

        Requests up to 448 bytes are slots of a run (no header of their own); larger ones are
        blocks. Offsets are 8-byte aligned.

        >>> import pheap
        >>> h = pheap.anonymous(); off = h.malloc(100); h.usable_size(off)
        112
        """
        return self._mutable_core("malloc").malloc(n)

    def free(self, off: int) -> None:
        """Free the allocation at ``off`` (``free(0)`` does nothing). O(1).

        An offset that is not a live block or slot raises InvalidPointerError and changes
        nothing.
        """
        self._mutable_core("free").free(off)

    def calloc(self, count: int, size: int) -> int:
        """Allocate ``count * size`` zeroed bytes. O(1) plus the memset of reused memory."""
        return self._mutable_core("calloc").calloc(count, size)

    def realloc(self, off: int, n: int) -> int:
        """Resize the allocation at ``off`` to ``n`` bytes, keeping its contents; return its
        offset.

        In place when it can (a slot within its size class; a block that shrinks, or grows into
        free space after it), else it moves. ``realloc(0, n)`` is ``malloc(n)``. O(1) plus the
        copy when it moves.
        """
        return self._mutable_core("realloc").realloc(off, n)

    def memalign(self, alignment: int, n: int) -> int:
        """Allocate ``n`` bytes at an offset that is a multiple of ``alignment`` (a power of two
        up to 4096). O(1)."""
        return self._mutable_core("memalign").memalign(alignment, n)

    def usable_size(self, off: int) -> int:
        """Payload bytes of the live block or slot at ``off``. O(1)."""
        c = self._live_core()
        return c.run(c.live_size, off)

    # -- data access -------------------------------------------------------------------------

    def read(self, off: int, n: int) -> bytes:
        """Copy ``n`` bytes at ``off`` out of the heap. ``[off, off + n)`` must lie inside one
        live block or slot (InvalidPointerError otherwise). O(n), plus the block look-up: O(1)
        from a payload start, else O(distance / 512) bytes of bitmap searched in C.

        >>> import pheap
        >>> h = pheap.anonymous(); a = h.malloc(24); h.write(a, b"x" * 24)
        >>> h.read(a + 16, 8)
        b'xxxxxxxx'
        >>> h.read(a, 40)
        Traceback (most recent call last):
        ...
        pheap.errors.InvalidPointerError: range [..., ...) runs past the end of the 24-byte slot ...
        """
        c = self._live_core()
        return c.run(c.read, off, n)

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the heap at ``off``, inside one live block or slot; a range
        outside one raises InvalidPointerError and writes nothing. Costs as :meth:`read`.

        Inside :meth:`transaction` or :meth:`atomic` the old bytes are logged first, so an
        abort restores them; outside, a crash in the middle of a long write may leave part of
        it (use a transaction when that matters).
        """
        c = self._mutable_core("write")
        c.run(c.write, off, data)

    def view(self, off: int, n: int) -> memoryview:
        """A memoryview of ``n`` bytes at ``off`` inside one live block (read-only for 'r'
        heaps). O(1) from a payload start.

        The view stays valid after the heap grows (its mapping is kept until the view is
        released). Writes through it are neither locked nor logged: hold ``heap.lock()`` if
        others may write, and call ``tx.add_range()`` first inside a transaction. A view keeps
        pointing at the bytes after the block is freed: do not use it past the block's life.
        If another program truncates a heap *file* while a view of it is in use, touching the
        view kills the process with SIGBUS (a memfd heap is sealed against this).
        """
        c = self._live_core()
        return c.run(c.view, off, n, not self.readonly)

    # -- shared objects (pheap.objects) ----------------------------------------------------------

    @property
    def root(self) -> Any:
        """The root dict: the entry point of a persistent heap and the directory of named
        objects (``heap.root.setdefault("jobs", heap.list())`` finds or makes one). Made on
        first use; everything it holds persists. (The raw root offset is :attr:`root_offset`.)

        >>> import pheap
        >>> h = pheap.anonymous()
        >>> h.root["users"] = {"bob": {"tags": []}}
        >>> h.root["users"]["bob"]["tags"].append("admin")   # changes the heap
        >>> h.root
        {'users': {'bob': {'tags': ['admin']}}}
        """
        return _objects.root(self)

    def dict(self, *args: Any, **kw: Any) -> Any:
        """A new shared dict (:class:`pheap.SharedDict`), from the arguments of ``dict()``.
        It lives until nothing holds it: store it in the root (or in what the root holds) to
        keep it."""
        return _objects.new_dict(self, *args, **kw)

    def list(self, iterable: Any = ()) -> Any:
        """A new shared list (:class:`pheap.SharedList`)."""
        return _objects.new_list(self, iterable)

    def queue(self, maxsize: int = 0) -> Any:
        """A new shared FIFO queue (:class:`pheap.SharedQueue`); 0: unbounded."""
        return _objects.new_queue(self, maxsize)

    def counter(self, value: int = 0) -> Any:
        """A new shared counter (:class:`pheap.SharedCounter`)."""
        return _objects.new_counter(self, value)

    def ndarray(self, shape: Any, dtype: Any = "float64") -> Any:
        """A zeroed numpy array whose memory is in the heap (needs numpy: ``pheap[numpy]``):
        the same memory, not a copy, in every process that gets it from a container. ``shape``
        is an int or a sequence of ints (numpy integers too). One made inside a bracket that is
        undone points at memory the undo gave back: drop it."""
        return _objects.new_ndarray(self, shape, dtype)

    def buffer(self, n: int) -> memoryview:
        """A zeroed, writable memoryview of ``n`` bytes in the heap, storable in containers:
        :meth:`ndarray` without numpy."""
        return _objects.new_buffer(self, n)

    def gc(self, dry_run: bool = False) -> Any:
        """Free the shared objects nothing reaches (left by a process that died holding
        handles, or by a Ctrl-C that cut a handle's finalizer short); return counts.
        ``dry_run`` only counts. O(allocations)."""
        return _objects.gc(self, dry_run)

    # -- entries -------------------------------------------------------------------------------

    @property
    def root_offset(self) -> int:
        """Offset of the raw root block (header entry ``root``; 0 when unset); persistent.
        Setting it takes the lock; it must name a live block or slot (or be 0)."""
        c = self._live_core()
        return c.run(c.entry, "root")

    @root_offset.setter
    def root_offset(self, off: int) -> None:
        self._mutable_core("root_offset").set_entry("root", off)

    # -- whole-heap operations ---------------------------------------------------------------

    def walk(self, slots: bool = False) -> Iterator[BlockInfo]:
        """Every block in address order (a snapshot taken under the lock); with ``slots``, the
        slots of each run after it. O(blocks + slots)."""
        c = self._live_core()
        return iter(c.run(lambda: list(c.walk(slots))))

    def stats(self) -> HeapStats:
        """Used/free bytes, blocks, runs and slots, largest free block, fragmentation.
        O(blocks)."""
        c = self._live_core()
        return c.run(c.stats)

    def check(self, progress: Any = None) -> Any:
        """Verify every invariant; raise CorruptHeapError naming the offset and invariant.

        Header fields against each other and the file, the boundary-tag walk, every run, the
        page map and the allocation bitmap, every bin and class list (each free block in its own
        bin once, symmetric links, no cycle: walks are bounded), entries and transaction log
        naming live blocks, zeros above zero_from; then every shared object reachable from the
        root (pheap.objects). O(blocks + capacity / 60 + objects).
        ``progress(fraction)`` is called now and then on large heaps.

        Returns None, or -- when shared objects are unreachable (left by a process that died
        holding handles, or by a Ctrl-C that cut a handle's finalizer short; ``heap.gc()``
        reclaims them) -- a report naming them.
        """
        c = self._live_core()
        return c.run(self._check, c, progress)  # type: ignore[no-any-return]

    @staticmethod
    def _check(c: Core, progress: Any) -> Any:
        c.check(progress)
        report = None
        for hook in CHECK_HOOKS:
            report = hook(c) or report
        return report

    def repair(self) -> str:
        """Make a damaged heap whole where its boundary tags allow; return what was done.

        Taking the lock already undid any operation or transaction a dead process left in the
        journal. If check() still fails and the boundary tags (the truth) are sound, the bins,
        class lists, page map and allocation bitmap are rebuilt from them. If the tags themselves
        are damaged, CorruptHeapError names the first bad one and nothing is changed: the file
        is left for a person (``pheap walk`` shows where).
        O(blocks). Back the file up first: ``pheap repair --backup`` does.
        """
        c = self._mutable_core("repair")
        return c.run(self._repair, c)  # type: ignore[no-any-return]

    @staticmethod
    def _repair(c: Core) -> str:
        try:
            c.check()
            return "sound: nothing to repair"
        except CorruptHeapError as e:
            first = str(e)
        n = c.do_rebuild()
        done = f"rebuilt the bins from the boundary tags ({n} free blocks) after: {first}"
        w = c._w
        for name, i in [*F.ENTRIES.items(), ("txlog", F.H_TXLOG)]:
            v = w[i]
            if v and not (c.is_live(v) if name != "txlog" else c.is_block(v)):
                w[i] = 0
                done += f"; the {name} entry pointed at {v}, not a live block: cleared"
        zf = w[F.H_ZERO_FROM]
        try:
            c._check_zeros()
        except CorruptHeapError:
            w[F.H_ZERO_FROM] = c._meta
            done += f"; bytes above zero_from {zf} were not zero: zero_from raised"
        c.check()
        return done

    def rebuild_bins(self) -> int:
        """Recreate the bins, class lists, page map and allocation bitmap from the boundary
        tags; return the free block count. O(blocks)."""
        c = self._mutable_core("rebuild_bins")
        return c.run(c.do_rebuild)

    def trim(self) -> int:
        """Give the pages of the wilderness and of large free blocks back to the OS; return the
        bytes released. The file keeps its length; its disk blocks go. O(free blocks)."""
        c = self._mutable_core("trim")
        return c.run(c.trim)

    def flush(self) -> None:
        """msync the mapping: data written so far survives an OS crash or power loss."""
        c = self._live_core()
        c.run(c.region.flush)

    # -- properties ----------------------------------------------------------------------------

    @property
    def path(self) -> str | None:
        """The heap file, or None for memfd and anonymous heaps."""
        return self._core.region.path

    @property
    def kind(self) -> str:
        """``'file'``, ``'memfd'`` or ``'anon'``."""
        return self._core.region.kind

    @property
    def capacity(self) -> int:
        """Bytes currently mapped (grows on demand)."""
        c = self._live_core()
        return c.run(lambda: c._cap)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed or self._core.closed

    @property
    def durability(self) -> str:
        """``'process'`` or ``'power'``."""
        return self._core.durability

    @property
    def lock_timeout(self) -> float | None:
        """Seconds an implicit lock acquisition waits (None: forever); shared by the handles
        of one heap in this process."""
        return self._core.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, t: float | None) -> None:
        self._core.lock_timeout = t

    def info(self) -> dict[str, Any]:
        """Header fields as a dict (what ``pheap info`` prints). O(1)."""
        c = self._live_core()
        return c.run(self._info, c)  # type: ignore[no-any-return]

    def _info(self, c: Core) -> dict[str, Any]:
        w = c._w
        mm = c.region.mm
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
            "objects": int(w[F.H_OBJECTS]),
            "recoveries": int(w[F.H_RECOVERIES]),
            "journal_pending": bool(w[F.J_STATE]),
            "durability": c.durability,
            "readonly": self.readonly,
        }

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the heap: idempotent, never raises. The mapping is unmapped when the last
        handle of this heap in the process closes; views still held keep it alive."""
        if self._closed:
            return
        self._closed = True
        try:
            self.__dict__.pop("malloc", None)
            self.__dict__.pop("free", None)
            core = self._core
            core.handles -= 1
            if core.handles <= 0:
                if core.lock.held():
                    core.fast = 0
                core.close()
        except Exception:
            pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> Heap:
        """``with pheap.open(...) as h:`` closes the heap at the end of the block."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self._core
        state = "closed" if self.closed else f"capacity={c._cap}"
        where = self.path or self.kind
        return f"<pheap.Heap {where} {state}{' read-only' if self.readonly else ''}>"

    def __copy__(self) -> Heap:
        """Another handle on the same heap (shares the lock and journal)."""
        return Heap(self._live_core(), self.readonly, None)

    # -- pickling: a handle that re-attaches in another process --------------------------------

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as a handle: file heaps re-open by path; memfd heaps pass their descriptor.

        A memfd descriptor travels the way multiprocessing sends descriptors (to a spawned child
        directly, to pool workers through the sender's resource sharer), so it works for
        ``multiprocessing`` Process arguments and Pool tasks, while the sender is alive. An
        anonymous heap has nothing to send: it is shared by ``fork`` only, and pickling it raises
        TypeError.
        """
        if self.closed:
            raise HeapClosedError("cannot pickle a closed heap")
        kind = self.kind
        if kind == "file":
            return (_reattach_file, (self.path, "r" if self.readonly else "w",
                                     self.lock_timeout, self.durability,
                                     self._core.allow_pickle))
        if kind == "memfd":
            from multiprocessing import reduction

            return (_reattach_memfd, (reduction.DupFd(self._core.region.fd), self.lock_timeout,
                                      self._core.allow_pickle))
        raise TypeError("an anonymous heap cannot be sent to another process: it is shared with "
                        "forked children only; use pheap.memfd() or a heap file instead")


CHECK_HOOKS.append(_objects._check_hook)
