"""Shared objects in the heap: dicts, lists, queues, counters and arrays that live in the mapping
and persist, and the root dict that names them.

Python values are stored as *cells* (:mod:`pheap.codec`): small ints, None, booleans and short
str/bytes inside the 64-bit cell itself; other values as a *blob* in a slot or block of their
own; shared objects as a *ref* cell naming the object. A shared object is a block that starts
with the common header below; its kind says the rest. Every object and every array it owns is
an allocation of the heap, found from the root, so ``check()`` verifies all of them and
``gc()`` reclaims what nothing reaches.

Object header (word offsets from the object's offset)

======  =========  ==========================================================================
word    field      meaning
======  =========  ==========================================================================
0       kind       ``MAGIC | kind``: 1 dict, 2 list, 3 queue, 4 counter, 5 array
1       serial     unique in the heap (``obj_serial`` counter); a handle checks it at every use,
                   so a handle of a freed object raises ReferenceError, never reads reuse
2       refs       references from cells of other objects and from the root entry
3       float_pid  while refs is 0: the process whose handles keep it (0: none)
4       next       next object waiting in the graveyard (``obj_grave``) to be freed
5       all_next   next object of the heap's list of all objects (``obj_all``), 0 at its end
6       all_prev   previous one, 0 at its head: gc() and check() find every object there, and
                   nothing else (a block whose bytes merely look like a header is not one)
7...    (kind)     below
======  =========  ==========================================================================

================  ====================================================================
kind              words from 7
================  ====================================================================
dict              used, count, entries, ecap, index, mask, version. ``entries`` holds
                  ``ecap`` entries of 3 words (hash, key cell, value cell) in insertion
                  order, ``used`` of them written (a deleted one has key cell 0);
                  ``index`` holds ``mask + 1`` words: 0 empty, ``DUMMY`` deleted, else
                  entry number + 1. Open addressing with CPython's probe sequence.
list              len, items, cap, version: ``items`` holds ``cap`` cells, ``len`` used.
queue             head, len, items, cap, maxsize, puts: a ring of ``cap`` cells.
counter           value (signed 64-bit, two's complement).
array             dtype (numpy type string, 8 bytes), ndim, data, nbytes, shape[ndim]:
                  ``data`` is 64-byte aligned; the first word of its block, 64 bytes
                  before it, names this header.
================  ====================================================================

Atomicity. Every change to an object is one operation of :meth:`pheap.heap.Core.op`: under the
heap lock, inside an undo bracket (all of it or none of it, even if the process dies in the
middle), with the object version counter (header ``obj_seq``) odd while it runs. Inside
``heap.transaction()`` or ``heap.atomic()`` the operations join that bracket.

Reads without the lock. On x86-64 (whose stores become visible in program order), reads of
dicts, lists and counters do not take the lock: they read the version counter, read the
object, and read the counter again; an odd or changed counter means a writer was inside, and
the read is tried again (then taken under the lock). Everything a reader follows is bounds-
checked and every walk is bounded, so a torn read costs a retry, never a crash or a hang.
Elsewhere reads take the lock.

References and lifetimes. ``refs`` counts the cells that name an object. When it drops to
zero the object is freed -- unless a handle in the process that dropped it still refers to it:
then it *floats*, kept by that process (``float_pid``), until the handle goes or it is stored
again. Objects made by ``heap.dict()`` etc. float until stored. A process that dies leaves its
floating objects behind; ``check()`` reports them and ``gc()`` frees them. Handles of a freed
object raise ReferenceError. Freeing is done a bounded step at a time after each operation
and each bracket (the graveyard), so freeing a large structure never outgrows a journal: a few
steps, plus one for each object the operation buried, so that freeing keeps up with the work.
"""

from __future__ import annotations

import atexit
import os
import queue as _queue
import threading
import time
import weakref
from reprlib import recursive_repr as _recursive_repr
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    MutableSequence,
    ValuesView,
)
from typing import TYPE_CHECKING, Any, Final

from . import codec
from . import format as F
from .errors import (
    CorruptHeapError,
    HeapClosedError,
    InvalidPointerError,
    JournalFullError,
    PheapError,
)
from .journal import ATOMIC as _ATOMIC  # mode of an atomic bracket (a transaction's is above)

if TYPE_CHECKING:
    from .heap import Core, Heap

__all__ = ["SharedObject", "SharedDict", "SharedList", "SharedQueue", "SharedCounter",
           "new_dict", "new_list", "new_queue", "new_counter", "new_ndarray", "new_buffer",
           "root", "gc", "check", "reap", "LOCK_FREE_READS"]

# ---------------------------------------------------------------------------------------------
# Format constants (changing any of these changes the file format)
# ---------------------------------------------------------------------------------------------

MAGIC: Final = 0x4F42_4A50_4800_0000  #: high bytes of every object's kind word ("PHJBO")
KIND_MASK: Final = 0xFF  #: low byte of the kind word
DICT: Final = 1  #: kind of a dict
LIST: Final = 2  #: kind of a list
QUEUE: Final = 3  #: kind of a queue
COUNTER: Final = 4  #: kind of a counter
ARRAY: Final = 5  #: kind of an array (ndarray / buffer)
KINDS: Final = {DICT: "dict", LIST: "list", QUEUE: "queue", COUNTER: "counter", ARRAY: "array"}

O_KIND: Final = 0  #: word: MAGIC | kind
O_SERIAL: Final = 1  #: word: serial number
O_REFS: Final = 2  #: word: references from cells
O_FLOAT: Final = 3  #: word: pid keeping a zero-refs object (0: none)
O_NEXT: Final = 4  #: word: next object in the graveyard
O_ALL_NEXT: Final = 5  #: word: next object in the list of all objects
O_ALL_PREV: Final = 6  #: word: previous object in that list
HEADER_WORDS: Final = 7  #: words of the common header
_H: Final = HEADER_WORDS

D_USED, D_COUNT, D_ENTRIES, D_ECAP, D_INDEX, D_MASK, D_VERSION = range(_H, _H + 7)
DICT_WORDS: Final = _H + 7  #: words of a dict's header
DUMMY: Final = 1 << 63  #: index word of a deleted entry
ENTRY: Final = 3  #: words of a dict entry
MIN_TABLE: Final = 8  #: smallest index table (power of two)
#: A probe visits every slot within mask + 1 + 13 steps: the perturbation (the 64-bit hash,
#: shifted right 5 bits a step) is 0 after 13 steps, and from then on i -> 5 i + 1 (mod a power
#: of two) runs through every slot. So a probe longer than mask + _PROBE_EXTRA means damage.
_PROBE_EXTRA: Final = 15

L_LEN, L_ITEMS, L_CAP, L_VERSION = range(_H, _H + 4)
LIST_WORDS: Final = _H + 4  #: words of a list's header

Q_HEAD, Q_LEN, Q_ITEMS, Q_CAP, Q_MAXSIZE, Q_PUTS = range(_H, _H + 6)
QUEUE_WORDS: Final = _H + 6  #: words of a queue's header

C_VALUE: Final = _H  #: word of a counter's value
COUNTER_WORDS: Final = _H + 1  #: words of a counter

A_DTYPE, A_NDIM, A_DATA, A_NBYTES, A_SHAPE = range(_H, _H + 5)
MAX_NDIM: Final = 32  #: most dimensions an array may have (numpy's limit)
ARRAY_ALIGN: Final = 64  #: alignment of array data, bytes

assert DUMMY > 1 << 48 and MIN_TABLE & (MIN_TABLE - 1) == 0

# ---------------------------------------------------------------------------------------------
# Tunables (safe to change)
# ---------------------------------------------------------------------------------------------

#: Whether reads skip the lock (seqlock). Only where stores become visible in program order:
#: x86 and x86-64 (TSO). Weaker CPUs (ARM, POWER) read under the lock.
LOCK_FREE_READS: Final = os.uname().machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")
READ_TRIES: Final = 3  #: lock-free tries before a read takes the lock
REAP_STEP: Final = 16  #: cells a graveyard step frees at most (bounded journal use; a step
#: that still outgrows the operation journal is undone and tried again with half as many)
REAP_STEPS: Final = 4  #: graveyard steps after every operation, besides one per object it buried
REAP_STEPS_MAX: Final = 64  #: most graveyard steps after one operation (a bounded pause)
SWEEP_FLOATING: Final = 256  #: floating objects of a process before it first looks for ones
#: whose finalizer an interrupt cut short (then again each time their number doubles)
QUEUE_POLL_MIN: Final = 0.0002  #: first sleep of a waiting get/put, s
QUEUE_POLL_MAX: Final = 0.005  #: longest sleep between looks (a waiter wakes within it), s

#: Functions of this module that store into the mapping without the journal, and why that is
#: safe (tests/test_allocator.py reads this list against the source).
UNJOURNALED: Final = {
    "_fill": "bytes of a new allocation: logged first (Journal.log_range) unless fresh",
    "_store": "a new blob's bytes (_fill inlined): logged first unless fresh",
    "_dict_insert": "an entry past 'used', which nothing reads until the journaled 'used' "
                    "store publishes it (an undo puts 'used' back: the entry is garbage "
                    "again) -- only in the operation's own bracket, and only in an array that "
                    "was not live when it began (else logged)",
    "_list_append": "a cell past 'len', published by the journaled 'len' store (same terms)",
    "_queue_put": "a cell past the ring's used part, published by the journaled 'len' store "
                  "(same terms)",
    "_new_obj": "the header of an object just allocated in the operation (fresh or logged)",
    "_counter_store": "a counter's one aligned word outside a bracket (journaled inside one)",
    "_array_copy": "the data of an array made in the operation: logged first unless fresh",
}

_get_ident = threading.get_ident
_SIGN: Final = 1 << 63
#: blob tags that never hold a ref (a blob starting with one is freed without a walk)
_NO_REFS: Final = frozenset((codec.BLOB_STR, codec.BLOB_BYTES, codec.BLOB_INT, codec.BLOB_FLOAT,
                             codec.BLOB_COMPLEX, codec.BLOB_PICKLE))
KEY_CACHE_SIZE: Final = 1 << 15  #: str and bytes keys (each) whose (hash, cell, blob) a process
#: remembers (cleared when full: a loop over more keys than this misses every time)
_MISSING: Final = object()
_TORN: Final = object()


class _Torn(Exception):
    """A lock-free read met a half-written structure (raised inside readers, never escapes)."""


# ---------------------------------------------------------------------------------------------
# Per-core state
# ---------------------------------------------------------------------------------------------


class _State:
    """The object layer's state for one core (one mapped heap in this process)."""

    __slots__ = ("core", "hasher", "handles", "floating", "to_bury", "buried", "made",
                 "unsure", "seen_undos", "sweep_at", "pid", "heaps", "lock", "keys", "bkeys",
                 "deref", "views", "view_off", "__weakref__")

    def live_heap(self) -> Heap:
        """An open Heap handle of this heap (object handles outlive the one that made them);
        a closed one when none is open (then every use says the heap is closed)."""
        last = None
        for h in list(self.heaps):
            if not h.closed:
                return h
            last = h
        if last is None:
            raise HeapClosedError("no handle of this heap is open in this process")
        return last

    def __init__(self, core: Core, heap: Heap) -> None:
        self.core = core
        #: the Heap handles of this heap in the process (pickling re-attaches through one)
        self.heaps: weakref.WeakSet[Heap] = weakref.WeakSet()
        if heap is not None:
            self.heaps.add(heap)
        w = core._w
        secret = bytes(core.region.mm[F.H_SECRET * 8:F.H_SECRET * 8 + 16])
        self.hasher = codec.StableHasher(secret)
        self.handles: weakref.WeakValueDictionary[int, SharedObject] = \
            weakref.WeakValueDictionary()
        self.floating: dict[int, Any] = {}  # off -> weakref.finalize of its handle
        self.to_bury: list[int] = []  # floating objects whose handles are gone
        #: objects this process put in the graveyard since it last freed some: the next
        #: operation frees that many steps more (pay as you go: the graveyard keeps up)
        self.buried = 0
        #: (offset, serial) of the objects made in the open bracket or operation: an undo
        #: takes them away, and their handles here must die with them (see _after_undo)
        self.made: list[tuple[int, int]] = []
        self.seen_undos = core.undos  #: the core's undos this state has caught up with
        #: in a forked child: objects the parent had made in a bracket still open at the fork
        #: (the parent may undo it): each handle checks, once, under the lock, that its object
        #: is still there (see SharedObject._o)
        self.unsure: set[int] = set()
        self.sweep_at = SWEEP_FLOATING  #: floating objects at which to look for lost finalizers
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.keys: dict[str, tuple[int, int | None, bytes | None]] = {}  # str keys' parts
        self.bkeys: dict[bytes, tuple[int, int | None, bytes | None]] = {}  # bytes keys' parts
        self.deref = lambda off: _handle(self, off)  # for codec.decode: a ref's handle
        #: array offset -> {id: weak reference} of the ctypes arrays under this process's views
        #: of it (one alive: the object is kept); ctypes arrays are unhashable, hence the ids
        self.views: dict[int, dict[int, weakref.ref[Any]]] = {}
        #: id of a view's ctypes array -> (weak reference, array offset): how a stored view is
        #: recognised
        self.view_off: dict[int, tuple[weakref.ref[Any], int]] = {}
        del w


def _state(heap: Heap | None, core: Core | None = None) -> _State:
    if core is None:
        assert heap is not None
        core = heap._live_core()
    st = core.objects
    if st is None:
        st = core.objects = _State(core, heap)  # type: ignore[arg-type]
        core.after_op = _after_op
    elif st.pid != os.getpid():  # a forked child: the handles stay, this process's keeps go
        st.pid = os.getpid()
        st.floating = {}
        st.to_bury = []
        st.unsure = {off for off, _ in st.made}
        st.made = []
        st.lock = threading.Lock()
    if heap is not None:
        st.heaps.add(heap)
    return st  # type: ignore[no-any-return]


def after_fork(core: Core) -> None:
    """In a forked child: the parent's floating objects are the parent's (this process buries
    only what its own handles kept)."""
    st = core.objects
    if st is not None:
        st.pid = os.getpid()
        st.floating = {}
        st.to_bury = []
        st.unsure = {off for off, _ in st.made}  # (the parent's bracket may be undone)
        st.made = []
        st.lock = threading.Lock()


def before_close(core: Core) -> None:
    """The last handle of a heap in this process closes: every object floating for this
    process is buried now -- the handles that kept it cannot be used once the heap is closed
    -- with the lock if it comes within a second, rather than left for gc()."""
    st = core.objects
    if st is None or core.readonly or st.pid != os.getpid() or \
            not (st.to_bury or st.floating):
        return
    try:
        core.acquire(1.0)
    except Exception:
        return
    try:
        w = core._w
        for off in list(st.floating) + st.to_bury:
            if _kind_at(w, off >> 3) == ARRAY and _kept_here(st, off):
                continue  # a numpy array or memoryview of it may outlive the handle: kept
            if _floats_here(st, off):
                core._seq_call(core._bracket, (_bury_one, st, off))
        st.floating.clear()
        st.to_bury.clear()
        core._seq_call(reap, (st, 1))
    except Exception:
        pass
    finally:
        core.lock.release()


def _at_exit() -> None:
    """At interpreter exit (after weakref's finalizers ran: atexit calls run last registered
    first, and this one is registered before any finalizer exists) bury what they dropped."""
    from .heap import _cores

    for core in list(_cores.values()):
        if not core.closed:
            before_close(core)


atexit.register(_at_exit)


def _after_op(core: Core) -> None:
    """After an operation or a bracket ended (still under the lock): bury floating objects whose
    last handle here is gone, and free a few steps of the graveyard: REAP_STEPS, plus one for
    each object buried since the last time (at most REAP_STEPS_MAX), so that freeing keeps up
    with a steady workload. Readers see it as a change."""
    st = core.objects
    if st is not None and (st.to_bury or core._w[F.H_OBJ_GRAVE]):
        steps = min(REAP_STEPS + st.buried + len(st.to_bury), REAP_STEPS_MAX)
        st.buried = 0
        core._seq_call(reap, (st, steps))


# ---------------------------------------------------------------------------------------------
# Cells: storing values, loading them, dropping them
# ---------------------------------------------------------------------------------------------


def _fill(st: _State, p: int, data: bytes | memoryview) -> None:
    """Write ``data`` at ``p``, a new allocation of this operation (logged unless fresh)."""
    c = st.core
    n = len(data)
    c._j.log_range(p, n)
    c.region.mm[p:p + n] = data


def _store(st: _State, v: Any) -> int:
    """The cell for ``v`` in a container (inside an operation): an immediate, a ref (the
    object's refs go up; a plain dict/list/array becomes a shared copy), or a new blob."""
    t = type(v)
    if t is memoryview:  # a heap buffer's view, even an empty one, is a ref, not bytes
        off = _array_of(st, v)
        if off:
            _incref(st, off)
            return codec.ref_cell(off)
    c = codec.cell(v)
    if c is not None:
        return c
    if t is str or t is bytes or t is int or t is float:  # no refs inside: encoded directly
        blob = codec.encode(v)
    else:
        if isinstance(v, SharedObject):
            off = v._attach_to(st)
            _incref(st, off)
            return codec.ref_cell(off)
        r = _ref_of(st, v)
        if r is not None:
            return r
        blob = codec.encode(v, ref=lambda x: _ref_of(st, x), allow_pickle=st.core.allow_pickle)
    core = st.core
    n = len(blob)
    p = core.jmalloc(n)
    core._j.log_range(p, n)  # (_fill inlined)
    core.region.mm[p:p + n] = blob
    return p


def _ref_of(st: _State, v: Any) -> int | None:
    """A ref cell for a value that is (or becomes) a shared object, refs counted; else None."""
    if isinstance(v, SharedObject):
        off = v._attach_to(st)
        _incref(st, off)
        return codec.ref_cell(off)
    t = type(v)
    if t is dict:
        off = _dict_new(st, v.items(), refs=1)
        return codec.ref_cell(off)
    if t is list:
        off = _list_new(st, v, refs=1)
        return codec.ref_cell(off)
    off = _array_of(st, v)
    if off:
        _incref(st, off)
        return codec.ref_cell(off)
    if getattr(t, "__module__", "") == "numpy" and hasattr(v, "__array_interface__") and \
            hasattr(v, "shape") and t.__name__ != "generic" and getattr(v, "ndim", 0) >= 0 and \
            not _is_numpy_scalar(v):
        return codec.ref_cell(_array_copy(st, v, refs=1))  # a shared copy, like a plain list
    return None


def _is_numpy_scalar(v: Any) -> bool:
    import numpy as np

    return isinstance(v, np.generic)


def _load(st: _State, c: int) -> Any:
    """The value of cell ``c`` (any context; under the lock or inside a lock-free read)."""
    if c & 1:
        if c < _SIGN:  # a non-negative small int, inlined
            return c >> 1
        return codec.from_cell(c)
    t = c & 7
    if t == 2:
        return codec.from_cell(c)
    if t == 4:
        return _handle(st, codec.ref_offset(c))
    if t or not c:
        raise CorruptHeapError(f"cell {c:#x} is neither a value, a blob nor a ref")
    core = st.core
    return codec.decode(core.payload(c), deref=st.deref, allow_pickle=core.allow_pickle)


def _drop(st: _State, c: int) -> None:
    """A cell leaves its container (inside an operation): free its blob, or drop a reference."""
    if not c or c & 1 or c & 7 == 2:
        return
    if c & 7 == 4:
        _decref(st, codec.ref_offset(c))
        return
    core = st.core
    try:
        tag = core._b[c]
    except (IndexError, TypeError):
        tag = -1
    if tag not in _NO_REFS:  # a tuple, frozenset or cell blob may hold refs: walk it
        for off in codec.blob_refs(core.payload(c)):
            _decref(st, off)
    core.jfree(c)


# ---------------------------------------------------------------------------------------------
# Objects: making them, references, the graveyard
# ---------------------------------------------------------------------------------------------


def _new_obj(st: _State, kind: int, nwords: int, refs: int = 0) -> int:
    """Allocate and initialise the header of a new object (inside an operation). With refs 0
    it floats, kept by this process."""
    core = st.core
    p = core.jmalloc(nwords * 8)
    w = core._w
    serial = w[F.H_OBJ_SERIAL] + 1
    w[F.H_OBJ_SERIAL] = serial  # unlogged: serials only move on, so an undo never hands one out
    # twice (a handle of an undone object, here or in a reader elsewhere, never matches again)
    st.made.append((p, serial))
    head = w[F.H_OBJ_ALL]
    data = bytearray(nwords * 8)
    for i, v in ((O_KIND, MAGIC | kind), (O_SERIAL, serial), (O_REFS, refs),
                 (O_FLOAT, 0 if refs else st.pid), (O_ALL_NEXT, head)):
        data[i * 8:i * 8 + 8] = v.to_bytes(8, "little")
    _fill(st, p, data)
    if head:
        core._j.set((head >> 3) + O_ALL_PREV, p)
    core._j.set(F.H_OBJ_ALL, p)
    return p


def _kind_at(w: memoryview, o: int) -> int:
    k = w[o]
    return k & KIND_MASK if k & ~KIND_MASK == MAGIC else 0


def _incref(st: _State, off: int) -> None:
    core = st.core
    w = core._w
    o = off >> 3
    st_ = core._j.set
    refs = w[o + O_REFS]
    st_(o + O_REFS, refs + 1)
    if not refs and w[o + O_FLOAT]:
        st_(o + O_FLOAT, 0)  # stored: no longer kept by a process
        # (its handle's finalizer stays: if this operation is undone, the object floats again
        # and is still watched; if not, burying it later finds refs > 0 and does nothing)


def _decref(st: _State, off: int) -> None:
    core = st.core
    w = core._w
    o = off >> 3
    refs = w[o + O_REFS]
    if refs == 0:
        if not w[o + O_SERIAL] and _kind_at(w, o):
            return  # already in the graveyard: gc() buried it with the garbage that held it
        raise CorruptHeapError(f"offset {off}: object's reference count is 0 and drops again")
    core._j.set(o + O_REFS, refs - 1)
    if refs == 1:
        h = st.handles.get(off)
        if h is not None:  # a handle here still uses it: it floats, kept by this process
            core._j.set(o + O_FLOAT, st.pid)
            _watch_float(st, h)
        elif _views_alive(st, off):  # an array a view of this process still shows: floats
            core._j.set(o + O_FLOAT, st.pid)
        else:
            _bury(st, off)


def _bury(st: _State, off: int) -> None:
    """Put an object without references in the graveyard (freed a step at a time) and make
    every handle of it stale (its serial goes)."""
    core = st.core
    w = core._w
    o = off >> 3
    s = core._j.set
    s(o + O_SERIAL, 0)
    s(o + O_NEXT, 0)
    tail = w[F.H_OBJ_GRAVE_TAIL]  # first in, first out: the object being freed stays first
    if tail and w[F.H_OBJ_GRAVE]:
        s((tail >> 3) + O_NEXT, off)
    else:
        s(F.H_OBJ_GRAVE, off)
    s(F.H_OBJ_GRAVE_TAIL, off)
    st.buried += 1


def _dropped(st: _State, off: int) -> None:
    """A finalizer: a handle or view of ``off`` went; bury the object at the next call if it
    floats for this process and nothing here keeps it (the list is the one of now: a forked
    child has its own)."""
    st.to_bury.append(off)


def _watch_float(st: _State, h: SharedObject) -> None:
    """When the last handle of floating object ``h`` goes, bury it at the next operation."""
    off = h._off
    if off in st.floating:
        return
    st.floating[off] = weakref.finalize(h, _dropped, st, off)
    if len(st.floating) >= st.sweep_at:
        _sweep_floating(st)


def _sweep_floating(st: _State) -> None:
    """Queue for burial the floating objects whose finalizer ran but was cut short before it
    queued them (a Ctrl-C landing inside it): their handles are gone, so nothing else would
    until gc(). O(floating objects); run each time their number doubles."""
    for off, fin in list(st.floating.items()):
        if fin is not None and not fin.alive and off not in st.to_bury:
            st.to_bury.append(off)
    st.sweep_at = max(SWEEP_FLOATING, 2 * len(st.floating))


def _after_undo(core: Core) -> None:
    """After an undo (of a bracket, an operation or part of one): the objects made in what was
    undone are gone, so their handles in this process die with them -- a use raises
    ReferenceError -- and nothing here waits to bury them. O(objects made since the bracket
    began)."""
    st = core.objects
    if st is None:
        return
    n = core.undos
    if not st.made:
        st.seen_undos = n
        return
    w = core._w
    keep = []
    for off, serial in st.made:
        o = off >> 3
        try:
            alive = core.live_size(off) > 0 and w[o + O_SERIAL] == serial and _kind_at(w, o)
        except (PheapError, IndexError):
            alive = False
        if alive:
            keep.append((off, serial))
            continue
        h = st.handles.get(off)
        if h is not None and h._serial == serial:
            h._serial = -1  # (never a serial: every use of this handle raises ReferenceError)
            del st.handles[off]
            h = None
        if h is None:  # no live object of this process is at off: nothing floats there
            fin = st.floating.pop(off, None)
            if fin is not None:
                fin.detach()
            st.views.pop(off, None)
            while off in st.to_bury:
                st.to_bury.remove(off)
    st.made = keep
    st.seen_undos = n


def reap(st: _State, steps: int = 1 << 62) -> int:
    """Free up to ``steps`` bounded steps of the graveyard, each its own operation; return the
    steps done. The lock is held by the caller."""
    core = st.core
    done = 0
    _bury_dropped(st)
    step = REAP_STEP
    while done < steps and core._w[F.H_OBJ_GRAVE]:
        try:
            core._bracket(_reap_step, st, step)
        except JournalFullError:
            if step == 1:
                raise
            step = max(1, step // 2)
            continue
        done += 1
    return done


def _bury_dropped(st: _State) -> None:
    """Floating objects whose last handle in this process is gone go to the graveyard."""
    core = st.core
    while st.to_bury:
        off = st.to_bury.pop()
        st.floating.pop(off, None)
        h = st.handles.get(off)
        if h is not None:  # a new handle of it appeared meanwhile (an unpickled one)
            _watch_float(st, h)
            continue
        if _views_alive(st, off):  # another view of the array still lives: its finalizer
            continue
        if _floats_here(st, off):
            core._bracket(_bury_one, st, off)


def _floats_here(st: _State, off: int) -> bool:
    """Whether ``off`` is a live object without references that floats for this process."""
    core = st.core
    w = core._w
    o = off >> 3
    try:
        return bool(_kind_at(w, o) and w[o + O_SERIAL] and w[o + O_REFS] == 0 and
                    w[o + O_FLOAT] == st.pid and core.live_size(off))  # (still an allocation)
    except (IndexError, InvalidPointerError):
        return False


def _bury_one(st: _State, off: int) -> None:
    core = st.core
    core._j.set((off >> 3) + O_FLOAT, 0)
    _bury(st, off)


def _reap_step(st: _State, left: int) -> None:
    """Free a bounded part (``left`` cells) of the first object in the graveyard (one
    operation)."""
    core = st.core
    w = core._w
    off = w[F.H_OBJ_GRAVE]
    o = off >> 3
    kind = _kind_at(w, o)
    if kind == DICT:
        used = w[o + D_USED]
        ent = w[o + D_ENTRIES] >> 3
        while used and left:
            used -= 1
            b = ent + ENTRY * used
            k, v = w[b + 1], w[b + 2]
            if k:
                core._j.set(b + 1, 0)
                _drop(st, k)
                _drop(st, v)
                left -= 2
            core._j.set(o + D_USED, used)
        if used:
            return
        _free_arrays(st, o, (D_ENTRIES, D_INDEX))
    elif kind in (LIST, QUEUE):
        n_at, items_at, cap_at = (L_LEN, L_ITEMS, L_CAP) if kind == LIST else \
            (Q_LEN, Q_ITEMS, Q_CAP)
        n = w[o + n_at]
        items = w[o + items_at] >> 3
        head = w[o + Q_HEAD] if kind == QUEUE else 0
        cap = w[o + cap_at] or 1
        while n and left:
            n -= 1
            i = items + ((head + n) % cap if kind == QUEUE else n)
            _drop(st, w[i])
            core._j.set(o + n_at, n)
            left -= 1
        if n:
            return
        _free_arrays(st, o, (items_at,))
    elif kind == ARRAY:
        data = w[o + A_DATA]
        if data:
            core._j.set(o + A_DATA, 0)
            core.jfree(data - ARRAY_ALIGN)
    elif kind != COUNTER:
        raise CorruptHeapError(f"offset {off}: the graveyard holds something that is not an "
                               "object")
    if w[F.H_OBJ_GRAVE] != off:
        raise CorruptHeapError(f"{F.at('obj_grave')}: the object freed ({off}) is no longer "
                               "first in the graveyard")
    nxt = w[o + O_NEXT]
    core._j.set(F.H_OBJ_GRAVE, nxt)
    if not nxt:
        core._j.set(F.H_OBJ_GRAVE_TAIL, 0)
    core._j.set(o + O_KIND, 0)  # no longer an object (a stray handle's check fails)
    nxt, prev = w[o + O_ALL_NEXT], w[o + O_ALL_PREV]  # off the list of all objects
    if nxt:
        core._j.set((nxt >> 3) + O_ALL_PREV, prev)
    core._j.set((prev >> 3) + O_ALL_NEXT if prev else F.H_OBJ_ALL, nxt)
    core.jfree(off)


def _free_arrays(st: _State, o: int, fields: tuple[int, ...]) -> None:
    core = st.core
    w = core._w
    for f in fields:
        p = w[o + f]
        if p:
            core._j.set(o + f, 0)
            core.jfree(p)


# ---------------------------------------------------------------------------------------------
# Reading without the lock
# ---------------------------------------------------------------------------------------------


#: what a lock-free read may raise when it met a half-written structure (it is tried again;
#: under the lock the same error, if any, is the real one)
_READ_ERRORS: Final = (IndexError, _Torn, CorruptHeapError, ValueError, TypeError, OverflowError,
                       UnicodeDecodeError, ReferenceError, MemoryError, InvalidPointerError)
_H_OBJ_SEQ: Final = F.H_OBJ_SEQ


def _read(st: _State, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, a pure reader: without the lock when that is safe (see the module
    docstring), else under it. ``fn`` returns _MISSING rather than raising for a missing key."""
    core = st.core
    if core.closed:
        raise HeapClosedError("the heap is closed")
    if core.held == _get_ident() or not LOCK_FREE_READS:
        return core.run(fn, *args) if core.held != _get_ident() else fn(*args)
    for _ in range(READ_TRIES):
        w = core._w
        s = w[F.H_OBJ_SEQ]
        if s & 1:
            break
        try:
            r = fn(*args)
        except _READ_ERRORS:
            r = _TORN
        if core._w[F.H_OBJ_SEQ] == s and r is not _TORN and core._w is w:
            return r
        if core._w[F.H_GENERATION] != core._gen:
            break  # another process grew the heap: the lock remaps
    return core.run(fn, *args)


# ---------------------------------------------------------------------------------------------
# Handles
# ---------------------------------------------------------------------------------------------


def _handle(st: _State, off: int) -> Any:
    """The Python object for the shared object at ``off`` (one handle per object per process;
    an array loads as a numpy array)."""
    h = st.handles.get(off)
    w = st.core._w
    o = off >> 3
    kind = _kind_at(w, o)
    if h is not None and h._serial == w[o + O_SERIAL] and h._serial:
        return h
    if kind == ARRAY:
        return _array_view(st, off)
    cls = _CLASSES.get(kind)
    if cls is None:
        raise CorruptHeapError(f"offset {off}: a ref cell names something that is not a shared "
                               "object")
    h = object.__new__(cls)
    h._st = st
    h._off = off
    h._serial = w[o + O_SERIAL]
    h._heap = st.live_heap()  # a handle keeps a Heap of its heap open
    st.handles[off] = h
    return h


class SharedObject:
    """Base of the handles of shared objects. A handle names an object in a heap by offset and
    serial number; it re-attaches in other processes when pickled (the heap re-attaches with
    it: file heaps by path, memfd heaps by descriptor)."""

    __slots__ = ("_st", "_off", "_serial", "_heap", "__weakref__")
    _kind: int = 0

    def _o(self) -> int:
        """The object's word index, after checking it is still this object. O(1)."""
        st = self._st
        core = st.core
        if st.seen_undos != core.undos:  # an undo whose objects this process has not yet
            core.run(_after_undo, core)  # forgotten (an interrupt cut it short): first that
        if st.unsure and self._off in st.unsure:
            core.run(_settle, st, self)
        w = core._w
        o = self._off >> 3
        if w[o] != MAGIC | self._kind or w[o + O_SERIAL] != self._serial:
            raise ReferenceError(f"the shared {KINDS[self._kind]} at offset {self._off} was "
                                 "freed (nothing referred to it any more)")
        return o

    def _attach_to(self, st: _State) -> int:
        if st is not self._st and st.core is not self._st.core:
            raise PheapError(f"a shared {KINDS[self._kind]} of another heap cannot be stored "
                             "here; copy it (dict(d), list(l)) first")
        self._o()
        return self._off

    @property
    def offset(self) -> int:
        """Offset of the object in its heap (stable for its lifetime)."""
        return self._off

    @property
    def heap(self) -> Heap:
        """The heap the object lives in (an open handle of it, while there is one)."""
        h = self._heap
        if h.closed:
            h = self._heap = self._st.live_heap()
        return h

    def _op(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._st.core.op(fn, self, *args)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reattach, (self.heap, self._off, self._serial, self._kind))

    def __copy__(self) -> Any:
        """``copy.copy``: a plain dict or list of a shared dict or list (its values as they
        are: nested shared objects stay shared); a queue or counter is itself."""
        plain = getattr(self, "copy", None)
        return plain() if plain is not None else self

    def __deepcopy__(self, memo: Any) -> Any:
        """``copy.deepcopy``: plain dicts and lists all the way down, independent of the heap
        (arrays become numpy's copies); a queue or counter is itself."""
        import copy as _copy

        if isinstance(self, SharedDict):
            d: dict[Any, Any] = {}
            memo[id(self)] = d
            for k, v in self.copy().items():
                d[_copy.deepcopy(k, memo)] = _copy.deepcopy(v, memo)
            return d
        if isinstance(self, SharedList):
            lst: list[Any] = []
            memo[id(self)] = lst
            lst.extend(_copy.deepcopy(v, memo) for v in self.copy())
            return lst
        return self

    def __hash__(self) -> int:  # mutable containers are unhashable, like dict and list
        raise TypeError(f"unhashable type: '{type(self).__name__}'")


def _reattach(heap: Heap, off: int, serial: int, kind: int) -> SharedObject:
    """The handle an unpickled one stands for: the object must still be there -- a live
    allocation (an undone bracket may have taken it away, leaving its bytes) with that kind and
    serial. Under the lock, so that no bracket is half done meanwhile."""
    st = _state(heap)
    core = st.core
    h = core.run(_reattach_locked, st, off)
    if not isinstance(h, SharedObject) or h._serial != serial or h._kind != kind:
        raise ReferenceError(f"the shared {KINDS.get(kind, 'object')} at offset {off} was freed "
                             "before this handle arrived")
    if h._heap.closed:
        h._heap = heap
    return h


# ---------------------------------------------------------------------------------------------
# dict
# ---------------------------------------------------------------------------------------------


def _settle(st: _State, h: SharedObject) -> None:
    """In a forked child, under the lock: whether the object ``h`` names, made in a bracket
    its parent had open at the fork, is still there (the bracket committed) or was undone (the
    handle dies). Once per such handle."""
    off = h._off
    st.unsure.discard(off)
    core = st.core
    w = core._w
    o = off >> 3
    try:
        alive = bool(core.live_size(off) and w[o + O_SERIAL] == h._serial and _kind_at(w, o))
    except (PheapError, IndexError):
        alive = False
    if not alive:
        h._serial = -1  # (every use raises ReferenceError)
        if st.handles.get(off) is h:
            del st.handles[off]


def _reattach_locked(st: _State, off: int) -> Any:
    try:
        if not _kind_at(st.core._w, off >> 3) or not st.core.live_size(off):
            return None
    except (IndexError, InvalidPointerError, TypeError):
        return None
    return _handle(st, off)


def _table_for(n: int) -> int:
    """Index table size (a power of two) holding ``n`` entries at load <= 2/3."""
    t = MIN_TABLE
    while t * 2 // 3 < n:
        t <<= 1
    return t


def _dict_new(st: _State, items: Iterable[tuple[Any, Any]] = (), refs: int = 0) -> int:
    """A new dict holding ``items`` (inside an operation); its offset."""
    items = list(items)
    off = _new_obj(st, DICT, DICT_WORDS, refs)
    o = off >> 3
    parts = [_key_parts(st, k) for k, _ in items]
    if len(items) <= MIN_TABLE or len({(h, kc, kb) for h, kc, kb in parts}) < len(items):
        _dict_alloc(st, o, _table_for(max(len(items), 1)))  # (equal keys: dict's rules)
        for k, v in items:
            _dict_set(st, o, k, v)
        return off
    # Many distinct keys: the arrays are built here and written in one go. They are new in
    # this operation (nothing logs them), where inserting one by one would log four header and
    # index words an entry: a dict of 10**5 items stored in one operation would outgrow any log.
    core = st.core
    table = _table_for(len(items))
    mask = table - 1
    ecap = table * 2 // 3
    ent = core.jmalloc(ecap * ENTRY * 8)
    idx = core.jmalloc(table * 8)
    index = [0] * table
    flat: list[int] = []
    for n, ((_, v), (h, kc, kb)) in enumerate(zip(items, parts, strict=True)):
        if kc is None:
            assert kb is not None
            kc = core.jmalloc(len(kb))
            _fill(st, kc, kb)
        flat += (h, kc, _store(st, v))
        i = h & mask
        perturb = h
        while index[i]:
            perturb >>= 5
            i = (i * 5 + perturb + 1) & mask
        index[i] = n + 1
    _fill(st, idx, _words(index))
    _fill(st, ent, _words(flat))
    s = core._j.set
    s(o + D_USED, len(items))
    s(o + D_COUNT, len(items))
    s(o + D_ENTRIES, ent)
    s(o + D_ECAP, ecap)
    s(o + D_INDEX, idx)
    s(o + D_MASK, mask)
    s(o + D_VERSION, 1)
    return off


def _dict_alloc(st: _State, o: int, table: int) -> None:
    """Give the dict at word ``o`` (empty) new, zeroed arrays for a table of ``table`` slots."""
    core = st.core
    ecap = table * 2 // 3
    ent = core.jmalloc(ecap * ENTRY * 8)
    idx = core.jmalloc(table * 8)
    _fill(st, idx, bytes(table * 8))
    s = core._j.set
    s(o + D_USED, 0)
    s(o + D_COUNT, 0)
    s(o + D_ENTRIES, ent)
    s(o + D_ECAP, ecap)
    s(o + D_INDEX, idx)
    s(o + D_MASK, table - 1)
    s(o + D_VERSION, core._w[o + D_VERSION] + 1)


def _key_parts(st: _State, key: Any) -> tuple[int, int | None, bytes | None]:
    """(hash, immediate cell or None, blob bytes or None) of a key; TypeError if unhashable.
    Remembered for str and bytes keys (exact types: 1, 1.0 and True are equal keys of three
    encodings, so numbers are not cached by value)."""
    t = type(key)
    if t is str or t is bytes:  # (two caches: "a" and b"a" hash alike, and -bb would object)
        cache = st.keys if t is str else st.bkeys
        p = cache.get(key)
        if p is not None:
            return p
        p = _parts(st, key)
        if len(key) <= 256:
            if len(cache) >= KEY_CACHE_SIZE:
                cache.clear()
            cache[key] = p
        return p
    return _parts(st, key)


def _parts(st: _State, key: Any) -> tuple[int, int | None, bytes | None]:
    h = st.hasher(key)
    kc = codec.cell(key)
    if kc is not None:
        return h, kc, None
    if isinstance(key, SharedObject):
        raise TypeError(f"unhashable type: '{type(key).__name__}'")
    return h, None, codec.encode(key, allow_pickle=st.core.allow_pickle)


def _dict_find(st: _State, o: int, h: int, kc: int | None, kb: bytes | None,
               key: Any) -> tuple[int, int]:
    """(entry number or -1, index slot: the key's, or where it goes). Pure read, bounded."""
    core = st.core
    w = core._w
    mask = w[o + D_MASK]
    idx = w[o + D_INDEX] >> 3
    ent = w[o + D_ENTRIES] >> 3
    used = w[o + D_USED]
    i = h & mask
    perturb = h
    free = -1
    mm = core.region.mm
    for _ in range(mask + _PROBE_EXTRA):
        e = w[idx + i]
        if e == 0:
            return -1, free if free >= 0 else i
        if e == DUMMY:
            if free < 0:
                free = i
        elif e <= used:
            b = ent + ENTRY * (e - 1)
            if w[b] == h:
                ek = w[b + 1]
                if ek and (ek == kc or kb is not None and not ek & 7 and
                           mm[ek:ek + len(kb)] == kb or _same_key(st, ek, key)):
                    return e - 1, i
        perturb >>= 5
        i = (i * 5 + perturb + 1) & mask
    raise CorruptHeapError(f"offset {o * 8}: dict index has no empty slot (probe did not end)")


def _same_key(st: _State, ek: int, key: Any) -> bool:
    """Equal hashes, different encodings: equal values of different types (1, 1.0, True)?"""
    try:
        return bool(_load(st, ek) == key)
    except (CorruptHeapError, ReferenceError):
        return False


def _dict_get(st: _State, d: SharedDict, key: Any) -> Any:
    """The value of ``key`` or _MISSING. The common case, a key found at its first probe
    (equal cells, or equal blob bytes), is inlined; the rest is :func:`_dict_find`'s."""
    w = st.core._w
    o = d._off >> 3
    if w[o] != d._kind | MAGIC or w[o + O_SERIAL] != d._serial:
        o = d._o()  # raises ReferenceError
    t = type(key)
    p = st.keys.get(key) if t is str else None
    h, kc, kb = p if p is not None else _key_parts(st, key)
    i = h & w[o + D_MASK]
    e = w[(w[o + D_INDEX] >> 3) + i]
    if 0 < e <= w[o + D_USED]:  # (DUMMY is larger than any count)
        b = (w[o + D_ENTRIES] >> 3) + ENTRY * (e - 1)
        if w[b] == h:
            ek = w[b + 1]
            if kc is not None and ek == kc or kb is not None and ek and not ek & 7 and \
                    st.core.region.mm[ek:ek + len(kb)] == kb:
                c = w[b + 2]
                if c & 1 and c < _SIGN:
                    return c >> 1
                return _load(st, c)
    e, _ = _dict_find(st, o, h, kc, kb, key)
    if e < 0:
        return _MISSING
    w = st.core._w
    return _load(st, w[(w[o + D_ENTRIES] >> 3) + ENTRY * e + 2])


def _dict_set(st: _State, o: int, key: Any, value: Any) -> None:
    core = st.core
    h, kc, kb = _key_parts(st, key)
    w = core._w
    i = h & w[o + D_MASK]
    e = w[(w[o + D_INDEX] >> 3) + i]
    if 0 < e <= w[o + D_USED]:  # the key found at its first probe, inlined (see _dict_get)
        b = (w[o + D_ENTRIES] >> 3) + ENTRY * (e - 1)
        if w[b] == h:
            ek = w[b + 1]
            if kc is not None and ek == kc or kb is not None and ek and not ek & 7 and \
                    core.region.mm[ek:ek + len(kb)] == kb:
                old = w[b + 2]
                core._j.set(b + 2, _store(st, value))
                if not old & 1 and old & 7 != 2:
                    _drop(st, old)
                return
    elif not e and w[o + D_USED] < w[o + D_ECAP]:  # a new key whose first probe is empty
        new = _store(st, value)
        if kc is None:
            kc = core.jmalloc(len(kb))  # type: ignore[arg-type]
            _fill(st, kc, kb)  # type: ignore[arg-type]
        _dict_insert(st, o, i, h, kc, new)
        return
    e, slot = _dict_find(st, o, h, kc, kb, key)
    if e >= 0:
        b = (w[o + D_ENTRIES] >> 3) + ENTRY * e
        old = w[b + 2]
        new = _store(st, value)
        core._j.set(b + 2, new)
        _drop(st, old)
        return
    if w[o + D_USED] >= w[o + D_ECAP]:
        _dict_resize(st, o, w[o + D_COUNT] + 1)
        e, slot = _dict_find(st, o, h, kc, kb, key)
    new = _store(st, value)
    if kc is None:
        assert kb is not None
        kc = core.jmalloc(len(kb))
        _fill(st, kc, kb)
    _dict_insert(st, o, slot, h, kc, new)


def _dict_insert(st: _State, o: int, slot: int, h: int, kc: int, vc: int) -> None:
    core = st.core
    w = core._w
    used = w[o + D_USED]
    b = (w[o + D_ENTRIES] >> 3) + ENTRY * used
    s = core._j.set
    if core.own_bracket and w[o + D_ENTRIES] not in core._j.unfresh:
        w[b] = h  # unlogged: past 'used', published by the store of 'used' below
        w[b + 1] = kc  # unlogged: past 'used'
        w[b + 2] = vc  # unlogged: past 'used'
    else:  # a bracket of the user's: 'used' may have been higher when it began
        s(b, h)
        s(b + 1, kc)
        s(b + 2, vc)
    s((w[o + D_INDEX] >> 3) + slot, used + 1)
    s(o + D_USED, used + 1)
    s(o + D_COUNT, w[o + D_COUNT] + 1)
    s(o + D_VERSION, w[o + D_VERSION] + 1)


def _dict_del(st: _State, o: int, key: Any) -> Any:
    """Delete ``key``; return its value cell's value (loaded first), or _MISSING."""
    core = st.core
    h, kc, kb = _key_parts(st, key)
    e, slot = _dict_find(st, o, h, kc, kb, key)
    if e < 0:
        return _MISSING
    w = core._w
    b = (w[o + D_ENTRIES] >> 3) + ENTRY * e
    k, v = w[b + 1], w[b + 2]
    value = _load(st, v)
    s = core._j.set
    s(b + 1, 0)
    s(b + 2, 0)
    s((w[o + D_INDEX] >> 3) + slot, DUMMY)
    count = w[o + D_COUNT] - 1
    s(o + D_COUNT, count)
    s(o + D_VERSION, w[o + D_VERSION] + 1)
    _drop(st, k)
    if isinstance(value, SharedObject) and value._off in st.handles:
        pass  # the handle we return keeps it (floating) if this was its last reference
    _drop(st, v)
    if count < w[o + D_ECAP] // 8 and w[o + D_MASK] + 1 > MIN_TABLE:
        _dict_resize(st, o, count)
    return value


def _dict_resize(st: _State, o: int, need: int) -> None:
    """New arrays for at least ``need`` entries (twice that, for room), entries compacted in
    order, index rebuilt; the old arrays freed. O(entries)."""
    core = st.core
    w = core._w
    table = _table_for(max(need * 2, 1))
    ecap = table * 2 // 3
    old_ent, old_idx, used = w[o + D_ENTRIES], w[o + D_INDEX], w[o + D_USED]
    live = []
    oe = old_ent >> 3
    for e in range(used):
        b = oe + ENTRY * e
        if w[b + 1]:
            live.append((w[b], w[b + 1], w[b + 2]))
    ent = core.jmalloc(ecap * ENTRY * 8)
    idx = core.jmalloc(table * 8)
    mask = table - 1
    index = [0] * table
    flat = []
    for n, (h, k, v) in enumerate(live):
        flat += (h, k, v)
        i = h & mask
        perturb = h
        while index[i]:
            perturb >>= 5
            i = (i * 5 + perturb + 1) & mask
        index[i] = n + 1
    _fill(st, idx, _words(index))
    if flat:
        _fill(st, ent, _words(flat))
    s = core._j.set
    s(o + D_ENTRIES, ent)
    s(o + D_ECAP, ecap)
    s(o + D_INDEX, idx)
    s(o + D_MASK, mask)
    s(o + D_USED, len(live))
    s(o + D_COUNT, len(live))
    s(o + D_VERSION, w[o + D_VERSION] + 1)
    core.jfree(old_ent)
    core.jfree(old_idx)


def _words(values: list[int]) -> bytes:
    import array

    a = array.array("Q", values)
    return a.tobytes()


def _dict_items(st: _State, d: SharedDict, which: int) -> list[Any]:
    """A list of the keys (0), values (1) or (key, value) pairs (2): one consistent read."""
    o = d._o()
    w = st.core._w
    used = w[o + D_USED]
    ent = w[o + D_ENTRIES] >> 3
    if used > w[o + D_ECAP]:
        raise _Torn
    out = []
    for e in range(used):
        b = ent + ENTRY * e
        k = w[b + 1]
        if not k:
            continue
        if which == 0:
            out.append(_load(st, k))
        elif which == 1:
            out.append(_load(st, w[b + 2]))
        else:
            out.append((_load(st, k), _load(st, w[b + 2])))
    return out


def _dict_meta(st: _State, d: SharedDict) -> tuple[int, int]:
    o = d._o()
    w = st.core._w
    return w[o + D_COUNT], w[o + D_VERSION]


class _DictKeys(KeysView[Any]):
    """``SharedDict.keys()``: set-like, and like dict's view reversible and with ``mapping``."""

    __slots__ = ()

    def __reversed__(self) -> Iterator[Any]:
        return reversed(list(self._mapping.copy()))  # type: ignore[attr-defined]

    @property
    def mapping(self) -> Any:
        """A read-only proxy of the dict this view shows (as ``dict_keys.mapping``)."""
        import types

        return types.MappingProxyType(self._mapping)  # type: ignore[arg-type]


class _DictValues(ValuesView[Any]):
    """``SharedDict.values()``: like dict's view, reversible and with ``mapping``."""

    __slots__ = ()

    def __reversed__(self) -> Iterator[Any]:
        return reversed(list(self._mapping.copy().values()))  # type: ignore[attr-defined]

    mapping = _DictKeys.mapping


class _DictItems(ItemsView[Any, Any]):
    """``SharedDict.items()``: set-like, and like dict's view reversible and with ``mapping``."""

    __slots__ = ()

    def __reversed__(self) -> Iterator[tuple[Any, Any]]:
        return reversed(list(self._mapping.copy().items()))  # type: ignore[attr-defined]

    mapping = _DictKeys.mapping


class SharedDict(SharedObject, MutableMapping[Any, Any]):
    """A dict in the heap: insertion order, views, ``==`` with dicts, ``|``, every method of
    dict. Keys and values are stored with :mod:`pheap.codec` (str, bytes, int, float, tuple,
    None, bool..., and shared objects as values); a plain dict or list stored as a value
    becomes a shared copy. Costs as dict's, plus the lock (or a lock-free read) per call.

    >>> import pheap
    >>> h = pheap.anonymous()
    >>> d = h.dict(a=1)
    >>> d["b"] = [1, 2]          # a shared copy of the list
    >>> d["b"].append(3)
    >>> d
    {'a': 1, 'b': [1, 2, 3]}
    """

    __slots__ = ()
    _kind = DICT

    # -- reads --------------------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        st = self._st
        core = st.core
        if LOCK_FREE_READS and core.held != _get_ident() and not core.closed:  # _read's try
            w = core._w
            s = w[_H_OBJ_SEQ]
            if not s & 1:
                try:
                    r = _dict_get(st, self, key)
                except _READ_ERRORS:
                    r = _TORN
                if r is not _TORN and core._w[_H_OBJ_SEQ] == s and core._w is w:
                    if r is _MISSING:
                        raise KeyError(key)
                    return r
        r = _read(st, _dict_get, st, self, key)
        if r is _MISSING:
            raise KeyError(key)
        return r

    def get(self, key: Any, default: Any = None) -> Any:
        st = self._st
        r = _read(st, _dict_get, st, self, key)
        return default if r is _MISSING else r

    def __contains__(self, key: Any) -> bool:
        st = self._st
        try:
            return _read(st, _dict_get, st, self, key) is not _MISSING
        except TypeError:
            raise

    def __len__(self) -> int:
        st = self._st
        return int(_read(st, _dict_meta, st, self)[0])

    def __iter__(self) -> Iterator[Any]:
        st = self._st
        _, version = _read(st, _dict_meta, st, self)
        keys = _read(st, _dict_items, st, self, 0)
        for k in keys:
            if _read(st, _dict_meta, st, self)[1] != version:
                raise RuntimeError("dictionary changed size during iteration")
            yield k

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self.copy())

    def keys(self) -> KeysView[Any]:
        return _DictKeys(self)

    def values(self) -> ValuesView[Any]:
        return _DictValues(self)

    def items(self) -> ItemsView[Any, Any]:
        return _DictItems(self)

    def copy(self) -> dict[Any, Any]:
        """A plain dict with the same items (one consistent read). O(n)."""
        st = self._st
        return dict(_read(st, _dict_items, st, self, 2))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SharedDict):
            return self.copy() == other.copy()
        if isinstance(other, Mapping):
            return self.copy() == dict(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    @_recursive_repr("{...}")
    def __repr__(self) -> str:
        try:
            return repr(self.copy())
        except ReferenceError:
            return f"<freed pheap.SharedDict at offset {self._off}>"

    def __or__(self, other: Any) -> dict[Any, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        d = self.copy()
        d.update(other)
        return d

    def __ror__(self, other: Any) -> dict[Any, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        d = dict(other)
        d.update(self.copy())
        return d

    def __ior__(self, other: Any) -> SharedDict:
        self.update(other)
        return self

    # -- writes -------------------------------------------------------------------------------

    def __setitem__(self, key: Any, value: Any) -> None:
        self._op(_set_item, key, value)

    def __delitem__(self, key: Any) -> None:
        if self._op(_del_item, key) is _MISSING:
            raise KeyError(key)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        r = self._op(_del_item, key)
        if r is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return r

    def popitem(self) -> tuple[Any, Any]:
        r = self._op(_pop_last)
        if r is _MISSING:
            raise KeyError("popitem(): dictionary is empty")
        return r  # type: ignore[no-any-return]

    def setdefault(self, key: Any, default: Any = None) -> Any:
        return self._op(_setdefault, key, default)

    def update(self, other: Any = (), /, **kw: Any) -> None:
        if isinstance(other, Mapping):
            items = list(other.items())
        elif hasattr(other, "keys"):
            items = [(k, other[k]) for k in other.keys()]
        else:
            items = []
            for pair in other:
                pair = tuple(pair)
                if len(pair) != 2:
                    raise ValueError(f"dictionary update sequence element has length "
                                     f"{len(pair)}; 2 is required")
                items.append(pair)
        items += kw.items()
        if items:
            self._op(_update, items)

    def clear(self) -> None:
        self._op(_clear)

    def fromkeys(self, iterable: Iterable[Any], value: Any = None) -> SharedDict:
        """A new shared dict in the same heap with keys from ``iterable``, each set to
        ``value`` (called on a dict, as ``d.fromkeys(...)``: the heap comes from it)."""
        return new_dict(self.heap, dict.fromkeys(iterable, value))


def _set_item(d: SharedDict, key: Any, value: Any) -> None:
    _dict_set(d._st, d._o(), key, value)


def _del_item(d: SharedDict, key: Any) -> Any:
    return _dict_del(d._st, d._o(), key)


def _update(d: SharedDict, items: list[tuple[Any, Any]]) -> None:
    st = d._st
    o = d._o()
    for k, v in items:
        _dict_set(st, o, k, v)


def _setdefault(d: SharedDict, key: Any, default: Any) -> Any:
    st = d._st
    r = _dict_get(st, d, key)
    if r is not _MISSING:
        return r
    _dict_set(st, d._o(), key, default)
    return _dict_get(st, d, key)


def _pop_last(d: SharedDict) -> Any:
    st = d._st
    o = d._o()
    w = st.core._w
    ent = w[o + D_ENTRIES] >> 3
    for e in range(w[o + D_USED] - 1, -1, -1):
        k = w[ent + ENTRY * e + 1]
        if k:
            key = _load(st, k)
            return key, _dict_del(st, o, key)
    return _MISSING


def _clear(d: SharedDict) -> None:
    st = d._st
    o = d._o()
    core = st.core
    w = core._w
    used = w[o + D_USED]
    ent = w[o + D_ENTRIES] >> 3
    cells = []
    for e in range(used):
        b = ent + ENTRY * e
        if w[b + 1]:
            cells += (w[b + 1], w[b + 2])
    old_ent, old_idx = w[o + D_ENTRIES], w[o + D_INDEX]
    _dict_alloc(st, o, MIN_TABLE)
    core.jfree(old_ent)
    core.jfree(old_idx)
    for c in cells:
        _drop(st, c)


# ---------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------


def _list_new(st: _State, items: Iterable[Any] = (), refs: int = 0) -> int:
    items = list(items)
    off = _new_obj(st, LIST, LIST_WORDS, refs)
    o = off >> 3
    core = st.core
    cap = max(4, len(items))
    arr = core.jmalloc(cap * 8)
    s = core._j.set
    s(o + L_LEN, 0)
    s(o + L_ITEMS, arr)
    s(o + L_CAP, cap)
    s(o + L_VERSION, 0)
    if items:
        cells = [_store(st, v) for v in items]
        _fill(st, arr, _words(cells))
        s(o + L_LEN, len(cells))
    return off


def _list_cells(st: _State, o: int) -> list[int]:
    w = st.core._w
    n = w[o + L_LEN]
    if n > w[o + L_CAP]:
        raise _Torn
    items = w[o + L_ITEMS] >> 3
    return list(w[items:items + n])


def _list_values(st: _State, lst: SharedList) -> list[Any]:
    o = lst._o()
    return [_load(st, c) for c in _list_cells(st, o)]


def _list_len(st: _State, lst: SharedList) -> int:
    return int(st.core._w[lst._o() + L_LEN])


def _list_get(st: _State, lst: SharedList, i: int) -> Any:
    o = lst._o()
    w = st.core._w
    n = w[o + L_LEN]
    if i < 0:
        i += n
    if not 0 <= i < n:
        return _MISSING
    if n > w[o + L_CAP]:
        raise _Torn
    return _load(st, w[(w[o + L_ITEMS] >> 3) + i])


def _list_append(st: _State, o: int, values: list[Any]) -> None:
    core = st.core
    w = core._w
    n = w[o + L_LEN]
    need = n + len(values)
    if need > w[o + L_CAP]:
        _list_grow(st, o, need)
        w = core._w
    items = w[o + L_ITEMS] >> 3
    # Unlogged past 'len' only in the operation's own bracket (a user's: 'len' may have been
    # higher when it began) and into an array that was not live then (made in it, not fresh)
    own = core.own_bracket and w[o + L_ITEMS] not in core._j.unfresh
    for v in values:
        c = _store(st, v)
        w = core._w
        if own:
            w[items + n] = c  # unlogged: past 'len', published by its store below
        else:
            core._j.set(items + n, c)
        n += 1
    core._j.set(o + L_LEN, n)
    core._j.set(o + L_VERSION, w[o + L_VERSION] + 1)


def _list_grow(st: _State, o: int, need: int) -> None:
    """Room for ``need`` cells: a new array 1.5 times larger, the cells copied. O(len)."""
    core = st.core
    w = core._w
    cap = max(need, w[o + L_CAP] + (w[o + L_CAP] >> 1) + 4)
    old = w[o + L_ITEMS]
    new = core.jmalloc(cap * 8)
    n = w[o + L_LEN]
    if n:
        _fill(st, new, bytes(core.region.mm[old:old + n * 8]))
    core._j.set(o + L_ITEMS, new)
    core._j.set(o + L_CAP, cap)
    core.jfree(old)


def _list_replace(st: _State, o: int, cells: list[int]) -> None:
    """Make the list hold exactly ``cells`` (cells it held and no longer does are dropped by
    the caller). One logged copy of the array."""
    core = st.core
    w = core._w
    if len(cells) > w[o + L_CAP]:
        _list_grow(st, o, len(cells))
        w = core._w
    items = w[o + L_ITEMS]
    if cells:
        data = _words(cells)
        core._j.log_range(items, len(data))
        core.region.mm[items:items + len(data)] = data
    core._j.set(o + L_LEN, len(cells))
    core._j.set(o + L_VERSION, w[o + L_VERSION] + 1)


def _list_assign(lst: SharedList, fn: Callable[[list[Any]], list[Any] | None]) -> Any:
    """Run ``fn`` on a plain copy of the list's values and store the result (values that are
    kept keep their cells; new ones are stored; dropped ones freed). Inside an operation."""
    st = lst._st
    o = lst._o()
    cells = _list_cells(st, o)
    values = [_load(st, c) for c in cells]
    before = list(values)
    result = fn(values)
    # keep the cells of values that stay (by identity), store the rest
    pool: dict[int, list[int]] = {}
    for v, c in zip(before, cells, strict=True):
        pool.setdefault(id(v), []).append(c)
    new_cells = []
    for v in values:
        lst_ = pool.get(id(v))
        new_cells.append(lst_.pop() if lst_ else _store(st, v))
    _list_replace(st, o, new_cells)
    for left in pool.values():
        for c in left:
            _drop(st, c)
    return result


class SharedList(SharedObject, MutableSequence[Any]):
    """A list in the heap with list's behaviour: indexes and slices (get, set, delete,
    extended), ``append/extend/insert/pop/remove/index/count/sort/reverse/clear``, ``+=``,
    ``*=``, ``==`` and ordering with lists. Appends and index reads are O(1); inserts, deletes
    and slice assignments O(n), like list's.

    >>> import pheap
    >>> h = pheap.anonymous()
    >>> l = h.list([3, 1, 2])
    >>> l.sort(); l.append("x"); l[1:3]
    [2, 3]
    """

    __slots__ = ()
    _kind = LIST

    def __len__(self) -> int:
        st = self._st
        return int(_read(st, _list_len, st, self))

    def __getitem__(self, i: Any) -> Any:
        st = self._st
        if isinstance(i, slice):
            return _read(st, _list_values, st, self)[i]
        i = _index(i)
        r = _read(st, _list_get, st, self, i)
        if r is _MISSING:
            raise IndexError("list index out of range")
        return r

    def __iter__(self) -> Iterator[Any]:
        return iter(self.copy())

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self.copy())

    def __contains__(self, v: object) -> bool:
        return v in self.copy()

    def copy(self) -> list[Any]:
        """A plain list of the values (one consistent read). O(n)."""
        st = self._st
        return list(_read(st, _list_values, st, self))

    def index(self, v: Any, start: int = 0, stop: int | None = None, /) -> int:
        values = self.copy()
        return values.index(v, start, len(values) if stop is None else stop)

    def count(self, v: Any) -> int:
        return self.copy().count(v)

    @_recursive_repr("[...]")
    def __repr__(self) -> str:
        try:
            return repr(self.copy())
        except ReferenceError:
            return f"<freed pheap.SharedList at offset {self._off}>"

    def _cmp(self, other: Any) -> list[Any] | None:
        if isinstance(other, SharedList):
            return other.copy()
        if isinstance(other, list):
            return other
        return None

    def __eq__(self, other: object) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else self.copy() == o

    def __ne__(self, other: object) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else self.copy() != o

    def __lt__(self, other: Any) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else self.copy() < o

    def __le__(self, other: Any) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else self.copy() <= o

    def __gt__(self, other: Any) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else self.copy() > o

    def __ge__(self, other: Any) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else self.copy() >= o

    def __add__(self, other: Any) -> list[Any]:
        o = self._cmp(other)
        if o is None:
            return NotImplemented
        return self.copy() + o

    def __radd__(self, other: Any) -> list[Any]:
        o = self._cmp(other)
        if o is None:
            return NotImplemented
        return o + self.copy()

    def __mul__(self, n: int) -> list[Any]:
        return self.copy() * n

    __rmul__ = __mul__

    # -- writes -------------------------------------------------------------------------------

    def append(self, v: Any) -> None:
        self._op(_append, [v])

    def extend(self, values: Iterable[Any]) -> None:
        values = list(values)
        if values:
            self._op(_append, values)

    def __iadd__(self, values: Iterable[Any]) -> SharedList:
        self.extend(values)
        return self

    def __imul__(self, n: int) -> SharedList:
        n = _index(n)
        self._op(_list_assign, lambda v: v.__imul__(n) and None)
        return self

    def __setitem__(self, i: Any, v: Any) -> None:
        if isinstance(i, slice):
            v = list(v)
            self._op(_list_assign, lambda vals: vals.__setitem__(i, v))
        else:
            self._op(_set_index, _index(i), v)

    def __delitem__(self, i: Any) -> None:
        if not isinstance(i, slice):
            i = _index(i)
        self._op(_list_assign, lambda vals: vals.__delitem__(i))

    def insert(self, i: int, v: Any) -> None:
        i = _index(i)
        self._op(_list_assign, lambda vals: vals.insert(i, v))

    def pop(self, i: int = -1) -> Any:
        i = _index(i)
        if not -_SSIZE_MAX - 1 <= i <= _SSIZE_MAX:  # as list.pop
            raise OverflowError("Python int too large to convert to C ssize_t")
        r = self._op(_pop, i)
        return r

    def remove(self, v: Any) -> None:
        self._op(_list_assign, lambda vals: vals.remove(v))

    def reverse(self) -> None:
        self._op(_list_assign, lambda vals: vals.reverse())

    def sort(self, *, key: Callable[[Any], Any] | None = None, reverse: bool = False) -> None:
        """Sort in place, like ``list.sort`` (the values are loaded, sorted, and stored back
        in one operation). O(n log n)."""
        self._op(_list_assign, lambda vals: vals.sort(key=key, reverse=reverse))

    def clear(self) -> None:
        self._op(_list_assign, lambda vals: vals.clear())


_SSIZE_MAX: Final = (1 << 63) - 1  #: list indices beyond this overflow, as list's do


def _index(i: Any) -> int:
    if type(i) is int:
        return i
    if hasattr(i, "__index__"):
        return int(i.__index__())
    raise TypeError(f"list indices must be integers or slices, not {type(i).__name__}")


def _append(lst: SharedList, values: list[Any]) -> None:
    _list_append(lst._st, lst._o(), values)


def _set_index(lst: SharedList, i: int, v: Any) -> None:
    st = lst._st
    o = lst._o()
    core = st.core
    w = core._w
    n = w[o + L_LEN]
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError("list assignment index out of range")
    new = _store(st, v)
    w = core._w
    k = (w[o + L_ITEMS] >> 3) + i
    old = w[k]
    core._j.set(k, new)
    _drop(st, old)


def _pop(lst: SharedList, i: int) -> Any:
    st = lst._st
    o = lst._o()
    core = st.core
    w = core._w
    n = w[o + L_LEN]
    if not n:
        raise IndexError("pop from empty list")
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError("pop index out of range")
    items = w[o + L_ITEMS] >> 3
    c = w[items + i]
    value = _load(st, c)
    if i == n - 1:
        core._j.set(o + L_LEN, n - 1)
        core._j.set(o + L_VERSION, w[o + L_VERSION] + 1)
    else:
        cells = list(w[items:items + n])
        del cells[i]
        _list_replace(st, o, cells)
    _drop(st, c)
    return value


# ---------------------------------------------------------------------------------------------
# queue
# ---------------------------------------------------------------------------------------------


def _queue_new(st: _State, maxsize: int, refs: int = 0) -> int:
    off = _new_obj(st, QUEUE, QUEUE_WORDS, refs)
    o = off >> 3
    core = st.core
    cap = 8
    s = core._j.set
    s(o + Q_HEAD, 0)
    s(o + Q_LEN, 0)
    s(o + Q_ITEMS, core.jmalloc(cap * 8))
    s(o + Q_CAP, cap)
    s(o + Q_MAXSIZE, maxsize)
    s(o + Q_PUTS, 0)
    return off


def _queue_put(q: SharedQueue, v: Any) -> bool:
    st = q._st
    o = q._o()
    core = st.core
    w = core._w
    n, cap, maxsize = w[o + Q_LEN], w[o + Q_CAP], w[o + Q_MAXSIZE]
    if maxsize and n >= maxsize:
        return False
    if n == cap:
        head = w[o + Q_HEAD]
        items = w[o + Q_ITEMS] >> 3
        cells = [w[items + (head + i) % cap] for i in range(n)]
        ncap = cap * 2
        new = core.jmalloc(ncap * 8)
        _fill(st, new, _words(cells))
        old = w[o + Q_ITEMS]
        s = core._j.set
        s(o + Q_ITEMS, new)
        s(o + Q_CAP, ncap)
        s(o + Q_HEAD, 0)
        core.jfree(old)
        w = core._w
        cap = ncap
    c = _store(st, v)
    w = core._w
    k = (w[o + Q_ITEMS] >> 3) + (w[o + Q_HEAD] + n) % cap
    if core.own_bracket and w[o + Q_ITEMS] not in core._j.unfresh:
        w[k] = c  # unlogged: past the ring's used part, published by the store of 'len' below
    else:  # a bracket of the user's: a get in it may have left this place for the undo
        core._j.set(k, c)
    core._j.set(o + Q_LEN, n + 1)
    core._j.set(o + Q_PUTS, w[o + Q_PUTS] + 1)
    return True


def _queue_get(q: SharedQueue) -> Any:
    st = q._st
    o = q._o()
    core = st.core
    w = core._w
    n = w[o + Q_LEN]
    if not n:
        return _MISSING
    head, cap = w[o + Q_HEAD], w[o + Q_CAP]
    c = w[(w[o + Q_ITEMS] >> 3) + head]
    value = _load(st, c)
    s = core._j.set
    s(o + Q_HEAD, (head + 1) % cap)
    s(o + Q_LEN, n - 1)
    _drop(st, c)
    return value


def _queue_len(st: _State, q: SharedQueue) -> int:
    return int(st.core._w[q._o() + Q_LEN])


class SharedQueue(SharedObject):
    """A FIFO queue in the heap for cooperating processes, like :class:`queue.Queue`: ``put``,
    ``get(block, timeout)`` raising :class:`queue.Empty`, ``put`` with a ``maxsize`` raising
    :class:`queue.Full`, ``qsize``, ``empty``, ``full``. A waiting ``get`` sleeps between looks
    (at most 5 ms: it wakes within that of a ``put``), burning no CPU.

    >>> import pheap
    >>> h = pheap.anonymous()
    >>> q = h.queue()
    >>> q.put("job 1"); q.put(2); q.get(), q.get()
    ('job 1', 2)
    """

    __slots__ = ()
    _kind = QUEUE

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Append ``item`` (stored like a dict value). On a full bounded queue: wait (at most
        ``timeout`` seconds; None: as long as it takes) or, with ``block=False``, raise
        :class:`queue.Full` at once."""
        if self._op(_queue_put, item):
            return
        _wait(lambda: None if self._op(_queue_put, item) else _MISSING, block, timeout,
              _queue.Full)

    def put_nowait(self, item: Any) -> None:
        """``put(item, block=False)``."""
        self.put(item, False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest item. On an empty queue: wait (at most ``timeout``
        seconds; None: as long as it takes) or, with ``block=False``, raise :class:`queue.Empty`
        at once. Each item goes to exactly one caller, in any process."""
        r = self._op(_queue_get)
        if r is not _MISSING:
            return r
        return _wait(lambda: self._op(_queue_get) if self.qsize() else _MISSING, block,
                     timeout, _queue.Empty)

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(False)

    def qsize(self) -> int:
        """Items in the queue now (others may change it at once)."""
        st = self._st
        return int(_read(st, _queue_len, st, self))

    def empty(self) -> bool:
        """Whether the queue is empty now."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Whether a bounded queue is full now (never for an unbounded one)."""
        st = self._st
        m = _read(st, lambda: st.core._w[self._o() + Q_MAXSIZE])
        return bool(m) and self.qsize() >= m

    def __len__(self) -> int:
        return self.qsize()

    def __repr__(self) -> str:
        try:
            return f"<pheap.SharedQueue of {self.qsize()} items at offset {self._off}>"
        except ReferenceError:
            return f"<freed pheap.SharedQueue at offset {self._off}>"


def _wait(attempt: Callable[[], Any], block: bool, timeout: float | None,
          exc: type[Exception]) -> Any:
    """Retry ``attempt`` (which returns _MISSING while it cannot proceed, else its result),
    sleeping between tries, until it succeeds or ``timeout`` passes."""
    if not block:
        raise exc
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = QUEUE_POLL_MIN
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise exc
            time.sleep(min(delay, left))
        else:
            time.sleep(delay)
        delay = min(delay * 2, QUEUE_POLL_MAX)
        r = attempt()
        if r is not _MISSING:
            return r


# ---------------------------------------------------------------------------------------------
# counter
# ---------------------------------------------------------------------------------------------

_I64: Final = 1 << 64


def _to_i64(v: int) -> int:
    if not -(1 << 63) <= v < 1 << 63:
        raise OverflowError(f"counter value {v} does not fit in a signed 64-bit word")
    return v % _I64


def _from_i64(u: int) -> int:
    return u - _I64 if u >> 63 else u


def _counter_new(st: _State, value: int, refs: int = 0) -> int:
    off = _new_obj(st, COUNTER, COUNTER_WORDS, refs)
    st.core._j.set((off >> 3) + C_VALUE, _to_i64(value))
    return off


def _counter_add(c: SharedCounter, n: int) -> int:
    core = c._st.core
    k = c._o() + C_VALUE
    v = _from_i64(core._w[k]) + n
    _counter_store(core, k, _to_i64(v))
    return v


def _counter_cas(c: SharedCounter, expected: int, new: int) -> bool:
    core = c._st.core
    k = c._o() + C_VALUE
    if _from_i64(core._w[k]) != expected:
        return False
    _counter_store(core, k, _to_i64(new))
    return True


def _counter_store(core: Core, k: int, u: int) -> None:
    """Store a counter's word: one aligned store, atomic by itself, unless a bracket is open
    (``heap.atomic()``, ``heap.transaction()``): then journaled, so that its undo puts it back."""
    if core._j.mode >= _ATOMIC:
        core._j.set(k, u)
    else:
        core._w[k] = u  # unlogged: one aligned word outside a bracket, atomic by itself


class SharedCounter(SharedObject):
    """A signed 64-bit counter in the heap: ``add(n)`` (returns the new value), ``value``
    (a read without the lock: one aligned word), ``compare_and_set(expected, new)``.

    >>> import pheap
    >>> h = pheap.anonymous()
    >>> c = h.counter()
    >>> c.add(5), c.add(-2), c.value
    (5, 3, 3)
    """

    __slots__ = ()
    _kind = COUNTER

    def add(self, n: int = 1) -> int:
        """Add ``n`` (may be negative) atomically; return the new value. OverflowError past
        the signed 64-bit range (the value is left unchanged)."""
        n = _index(n)
        return int(self._st.core.run(_counter_add, self, n))

    @property
    def value(self) -> int:
        """The value now (one aligned word: read without the lock where reads may skip it)."""
        core = self._st.core
        if core.closed:
            raise HeapClosedError("the heap is closed")
        if LOCK_FREE_READS:
            try:
                return _from_i64(core._w[self._o() + C_VALUE])
            except IndexError:
                pass
        return int(core.run(lambda: _from_i64(core._w[self._o() + C_VALUE])))

    def compare_and_set(self, expected: int, new: int) -> bool:
        """Set the value to ``new`` if it is ``expected`` (atomically); return whether it was."""
        _to_i64(new)
        return bool(self._st.core.run(_counter_cas, self, _index(expected), _index(new)))

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        try:
            return f"<pheap.SharedCounter value={self.value}>"
        except ReferenceError:
            return f"<freed pheap.SharedCounter at offset {self._off}>"


# ---------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------


def _array_new(st: _State, shape: tuple[int, ...], dtype: str, itemsize: int,
               refs: int = 0) -> int:
    if len(shape) > MAX_NDIM:
        raise ValueError(f"an array has at most {MAX_NDIM} dimensions, not {len(shape)}")
    nbytes = itemsize
    for n in shape:
        if n < 0:
            raise ValueError(f"negative dimensions are not allowed: {shape}")
        nbytes *= n
    code = dtype.encode()
    if len(code) > 8:
        raise ValueError(f"dtype {dtype!r} is not a simple numpy type string")
    off = _new_obj(st, ARRAY, A_SHAPE + len(shape), refs)
    core = st.core
    blk = core._bracket(core._memalign, ARRAY_ALIGN, ARRAY_ALIGN + nbytes)
    data = blk + ARRAY_ALIGN
    core._j.set(blk >> 3, off)  # the block's first word names the array's header
    _zero(st, data, nbytes)
    o = off >> 3
    s = core._j.set
    s(o + A_DTYPE, int.from_bytes(code.ljust(8, b"\0"), "little"))
    s(o + A_NDIM, len(shape))
    s(o + A_DATA, data)
    s(o + A_NBYTES, nbytes)
    for i, n in enumerate(shape):
        s(o + A_SHAPE + i, n)
    return off


def _zero(st: _State, p: int, n: int) -> None:
    """Zero [p, p+n) of a new allocation; bytes at or above zero_from are zero already."""
    core = st.core
    end = min(p + n, core._w[F.H_ZERO_FROM])
    if end > p:
        core._j.log_range(p, end - p)
        core._memset0(p, end)


def _array_meta(w: memoryview, off: int) -> tuple[str, tuple[int, ...], int, int]:
    o = off >> 3
    dtype = w[o + A_DTYPE].to_bytes(8, "little").rstrip(b"\0").decode()
    ndim = w[o + A_NDIM]
    if ndim > MAX_NDIM:
        raise CorruptHeapError(f"offset {off}: array has {ndim} dimensions")
    shape = tuple(w[o + A_SHAPE:o + A_SHAPE + ndim])
    return dtype, shape, w[o + A_DATA], w[o + A_NBYTES]


def _array_view(st: _State, off: int) -> Any:
    """A numpy array (or, for a buffer, a memoryview) over the array object's data. Every view
    rests on a ctypes array of this process made for it, which the process tracks: while one
    lives, the object is not freed here (it floats), and storing the view stores the object."""
    import ctypes

    core = st.core
    dtype, shape, data, nbytes = _array_meta(core._w, off)
    if data + nbytes > core._cap:
        raise _Torn
    cbuf = (ctypes.c_char * nbytes).from_buffer(core.region.mm, data)
    key = id(cbuf)

    def gone(_: Any, st: _State = st, off: int = off, key: int = key) -> None:
        views = st.views.get(off)
        if views is not None:
            views.pop(key, None)
            if not views:
                del st.views[off]
        st.view_off.pop(key, None)
        st.to_bury.append(off)  # the last view gone: buried at the next call if it floats

    ref = weakref.ref(cbuf, gone)
    st.views.setdefault(off, {})[key] = ref
    st.view_off[key] = (ref, off)
    if dtype == "|mv":
        return memoryview(cbuf).cast("B")
    import numpy as np

    return np.ndarray(shape, dtype=np.dtype(dtype), buffer=cbuf)


def _views_alive(st: _State, off: int) -> bool:
    views = st.views.get(off)
    return bool(views) and any(r() is not None for r in list(views.values()))


def _view_off(st: _State, base: Any) -> int | None:
    """The array offset of the ctypes array ``base`` under a view of this process, or None."""
    e = st.view_off.get(id(base))
    return e[1] if e is not None and e[0]() is base else None


def _array_of(st: _State, v: Any) -> int:
    """The offset of the array object that ``v`` (a numpy array or memoryview) is exactly a
    view of -- the same data, shape and type -- found through the view's base object; 0
    otherwise (a view of part of one, reshaped or retyped, is stored as a copy of what it
    shows)."""
    t = type(v)
    if t is memoryview:
        base = v.obj
        off = _view_off(st, base) if _is_cbuf(base) else None
        if off is None:
            return 0
        import ctypes

        w = st.core._w
        o = off >> 3
        ok = (w[o] == MAGIC | ARRAY and w[o + O_SERIAL] and not v.readonly and
              v.format == "B" and v.ndim == 1 and v.nbytes == w[o + A_NBYTES] and
              (not v.nbytes or ctypes.addressof(ctypes.c_char.from_buffer(v)) ==
               ctypes.addressof(base)))
        return int(off) if ok else 0
    if getattr(t, "__module__", "") != "numpy" or not hasattr(v, "__array_interface__"):
        return 0
    base = v
    for _ in range(64):  # numpy views chain to the ctypes array the first one was made over
        if _is_cbuf(base):
            break
        base = getattr(base, "base", None)
        if base is None:
            return 0
    off = _view_off(st, base) if _is_cbuf(base) else None
    if off is None:
        return 0
    import ctypes

    w = st.core._w
    o = off >> 3
    if w[o] != MAGIC | ARRAY or not w[o + O_SERIAL]:
        return 0
    dtype, shape, _, nbytes = _array_meta(w, off)
    ok = (v.dtype.str == dtype and tuple(v.shape) == shape and v.flags["C_CONTIGUOUS"] and
          v.flags["WRITEABLE"] and v.__array_interface__["data"][0] == ctypes.addressof(base))
    return int(off) if ok else 0


def _is_cbuf(x: Any) -> bool:
    return type(x).__name__.startswith("c_char_Array_")


def _array_copy(st: _State, v: Any, refs: int) -> int:
    """A new array object holding a copy of numpy array ``v`` (a plain numeric dtype)."""
    import numpy as np

    dt = v.dtype
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise TypeError(f"a numpy array of dtype {dt} cannot be stored: plain numeric dtypes "
                        "only")
    src = np.ascontiguousarray(v)
    off = _array_new(st, tuple(src.shape), dt.str, dt.itemsize, refs)
    data = st.core._w[(off >> 3) + A_DATA]
    n = src.nbytes
    core = st.core
    core._j.log_range(data, n)  # a new allocation: logged only if it is not fresh
    core.region.mm[data:data + n] = src.tobytes()
    return off


# ---------------------------------------------------------------------------------------------
# The heap's constructors, the root, gc, check
# ---------------------------------------------------------------------------------------------

def _doc_like(cls: type, builtin: type) -> None:
    """Methods that behave as the built-in's and say nothing more take its docstring."""
    for name, f in list(vars(cls).items()):
        if not name.startswith("_") and callable(f) and not f.__doc__:
            doc = getattr(getattr(builtin, name, None), "__doc__", None)
            if doc:
                f.__doc__ = f"As ``{builtin.__name__}.{name}``: {doc.strip()}"


_doc_like(SharedDict, dict)
_doc_like(SharedList, list)

_CLASSES: dict[int, type[SharedObject]] = {DICT: SharedDict, LIST: SharedList,
                                           QUEUE: SharedQueue, COUNTER: SharedCounter}


def _made(st: _State, off: int) -> Any:
    """The handle of an object just made with refs 0: it floats, kept by this process."""
    h = _handle(st, off)
    if isinstance(h, SharedObject):
        _watch_float(st, h)
    return h


def new_dict(heap: Heap, *args: Any, **kw: Any) -> SharedDict:
    """``heap.dict(...)``: a new shared dict, from the same arguments as ``dict()``."""
    items = list(dict(*args, **kw).items())
    st = _state(heap)
    return _made(st, st.core.op(lambda: _dict_new(st, items)))  # type: ignore[no-any-return]


def new_list(heap: Heap, iterable: Iterable[Any] = ()) -> SharedList:
    """``heap.list(...)``: a new shared list."""
    items = list(iterable)
    st = _state(heap)
    return _made(st, st.core.op(lambda: _list_new(st, items)))  # type: ignore[no-any-return]


def new_queue(heap: Heap, maxsize: int = 0) -> SharedQueue:
    """``heap.queue(maxsize=0)``: a new shared FIFO queue (0: unbounded)."""
    maxsize = _index(maxsize)
    if maxsize < 0:
        raise ValueError(f"maxsize must not be negative: {maxsize}")
    st = _state(heap)
    return _made(st, st.core.op(lambda: _queue_new(st, maxsize)))  # type: ignore[no-any-return]


def new_counter(heap: Heap, value: int = 0) -> SharedCounter:
    """``heap.counter(value=0)``: a new shared counter."""
    value = _index(value)
    st = _state(heap)
    return _made(st, st.core.op(lambda: _counter_new(st, value)))  # type: ignore[no-any-return]


def new_ndarray(heap: Heap, shape: Any, dtype: Any = "float64") -> Any:
    """``heap.ndarray(shape, dtype)``: a zeroed numpy array whose memory is in the heap (64-byte
    aligned); storable in containers, the same memory in every process. Needs numpy."""
    try:
        import numpy as np
    except ImportError:
        raise ImportError("heap.ndarray() needs numpy: pip install 'pheap[numpy]' (or use "
                          "heap.buffer(), a memoryview, without it)") from None
    dt = np.dtype(dtype)
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise TypeError(f"heap.ndarray() takes plain numeric dtypes, not {dt}")
    if hasattr(shape, "__index__"):  # an int, a numpy integer (as numpy takes them)
        shape = (shape.__index__(),)
    else:  # floats are refused, as numpy refuses them
        shape = tuple(n.__index__() if hasattr(n, "__index__") else _bad_dim(n) for n in shape)
    st = _state(heap)
    off = st.core.op(lambda: _array_new(st, shape, dt.str, dt.itemsize))
    return _array_view(st, off)


def _bad_dim(n: Any) -> int:
    raise TypeError(f"'{type(n).__name__}' object cannot be interpreted as an integer "
                    "(an array dimension)")


def new_buffer(heap: Heap, n: int) -> memoryview:
    """``heap.buffer(n)``: a zeroed, writable memoryview of ``n`` bytes in the heap (64-byte
    aligned): the numpy-free ndarray. Storable in containers like an array."""
    n = _index(n)
    st = _state(heap)
    off = st.core.op(lambda: _array_new(st, (n,), "|mv", 1))
    return _array_view(st, off)  # type: ignore[no-any-return]


def root(heap: Heap) -> SharedDict:
    """``heap.root``: the root dict, made on first use of a writable heap. Everything stored
    in it (and in what it holds) persists; it is also the directory of named objects:
    ``heap.root.setdefault("jobs", heap.list())``."""
    st = _state(heap)
    core = st.core
    off = core.run(core.entry, "objects")
    if not off:
        if core.readonly or heap.readonly:
            return _EmptyRoot()  # type: ignore[return-value]
        off = core.op(_make_root, st)
    h = _handle(st, off)
    return h  # type: ignore[no-any-return]


def _make_root(st: _State) -> int:
    core = st.core
    off = core._w[F.H_OBJECTS]
    if off:
        return int(off)
    off = _dict_new(st, refs=1)
    core.set_entry("objects", off)
    return off


class _EmptyRoot(dict):  # type: ignore[type-arg]
    """The root of a read-only heap that has none yet: empty, and read-only."""

    def _ro(self, *a: Any, **k: Any) -> Any:
        from .errors import ReadOnlyError

        raise ReadOnlyError("the heap is read-only and has no root dict yet")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _ro  # type: ignore


def gc(heap: Heap, dry_run: bool = False) -> dict[str, int]:
    """Free the shared objects nothing reaches: not the root (and what it holds), not a live
    handle of this process, not a floating object of a process still alive. Those are left by a
    process that died holding handles. Returns counts. O(allocations)."""
    st = _state(heap)
    core = st.core

    def run() -> dict[str, int]:
        if not dry_run:
            reap(st)  # first what already waits to be freed
        live, objs = _mark(st)
        unreachable = [off for off in objs if off not in live]
        if not dry_run:
            # First the garbage lets go of the garbage (a cell naming another unreachable
            # object becomes None), so that freeing it follows only references into what
            # lives: the order of freeing then cannot matter, cycles included.
            garbage = set(unreachable)
            for off in unreachable:
                cells = _cell_words(st, off)
                k, step = 0, REAP_STEP
                while k < len(cells):
                    try:
                        core._bracket(_let_go, st, cells[k:k + step], garbage)
                    except JournalFullError:
                        if step == 1:
                            raise
                        step = max(1, step // 2)
                        continue
                    k += step
            for off in unreachable:
                core._bracket(_bury_unreachable, st, off)
            reap(st)
        return {"objects": len(objs), "reachable": len(live), "freed": 0 if dry_run else
                len(unreachable), "unreachable": len(unreachable)}

    if dry_run:
        return core.run(run)  # type: ignore[no-any-return]
    return core.run(lambda: core._seq_call(run, ()))  # type: ignore[no-any-return]


def _cell_words(st: _State, off: int) -> list[int]:
    """Word indexes of the value cells an object holds (dict values, list and queue items; a
    dict key never holds a ref: shared objects are unhashable)."""
    w = st.core._w
    o = off >> 3
    kind = _kind_at(w, o)
    if kind == DICT:
        ent = w[o + D_ENTRIES] >> 3
        return [ent + ENTRY * e + 2 for e in range(min(w[o + D_USED], w[o + D_ECAP]))
                if w[ent + ENTRY * e + 1]]
    if kind == LIST:
        items = w[o + L_ITEMS] >> 3
        return list(range(items, items + min(w[o + L_LEN], w[o + L_CAP])))
    if kind == QUEUE:
        n, head, cap = w[o + Q_LEN], w[o + Q_HEAD], max(w[o + Q_CAP], 1)
        items = w[o + Q_ITEMS] >> 3
        return [items + (head + i) % cap for i in range(min(n, cap))]
    return []


def _let_go(st: _State, words: list[int], garbage: set[int]) -> None:
    """A step of gc(): each cell at ``words`` that names an object in ``garbage`` (itself or
    inside its blob) becomes None; references it held to live objects are dropped."""
    core = st.core
    w = core._w
    for i in words:
        c = w[i]
        refs = _refs_in(st, c)
        if not any(r in garbage for r in refs):
            continue
        for r in refs:
            if r not in garbage:
                _decref(st, r)
        if not c & 7:
            core.jfree(c)  # the blob
        core._j.set(i, codec.NONE_CELL)


def _bury_unreachable(st: _State, off: int) -> None:
    core = st.core
    o = off >> 3
    core._j.set(o + O_REFS, 0)
    core._j.set(o + O_FLOAT, 0)
    _bury(st, off)


def _objects_in_heap(st: _State, everything: bool = False) -> list[int]:
    """Offsets of the objects on the heap's list of all objects that are alive (serial not 0;
    ``everything``: those in the graveyard too), the list checked as it is walked: every entry
    a live allocation holding an object header, linked both ways, no cycle. O(objects)."""
    core = st.core
    w = core._w
    out = []
    off, prev = w[F.H_OBJ_ALL], 0
    limit = (w[F.H_BRK] - F.BLOCKS_OFF) // 8  # more entries than words: a cycle
    n = 0
    while off:
        n += 1
        where = f"{F.at('obj_all')} list, entry {n - 1}"
        try:
            size = core.live_size(off)
        except InvalidPointerError as e:
            raise CorruptHeapError(f"{where}: {off} is not a live allocation ({e})") from None
        o = off >> 3
        if size < HEADER_WORDS * 8 or not _kind_at(w, o):
            raise CorruptHeapError(f"{where}: offset {off} holds no object header")
        if w[o + O_ALL_PREV] != prev:
            raise CorruptHeapError(f"{where}: offset {off} links back to {w[o + O_ALL_PREV]}, "
                                   f"not {prev}")
        if everything or w[o + O_SERIAL]:
            out.append(off)
        if n > limit:
            raise CorruptHeapError(f"{where}: the list does not end (a cycle)")
        off, prev = w[o + O_ALL_NEXT], off
    return out


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(st: _State, off: int) -> list[int]:
    """Cells an object holds (dict keys and values, list and queue items)."""
    w = st.core._w
    o = off >> 3
    kind = _kind_at(w, o)
    if kind == DICT:
        ent = w[o + D_ENTRIES] >> 3
        cells = []
        for e in range(min(w[o + D_USED], w[o + D_ECAP])):
            b = ent + ENTRY * e
            if w[b + 1]:
                cells += (w[b + 1], w[b + 2])
        return cells
    if kind == LIST:
        n = min(w[o + L_LEN], w[o + L_CAP])
        items = w[o + L_ITEMS] >> 3
        return list(w[items:items + n])
    if kind == QUEUE:
        n, head, cap = w[o + Q_LEN], w[o + Q_HEAD], max(w[o + Q_CAP], 1)
        items = w[o + Q_ITEMS] >> 3
        return [w[items + (head + i) % cap] for i in range(min(n, cap))]
    return []


def _refs_in(st: _State, c: int) -> list[int]:
    """Objects a cell refers to (itself, or those inside a blob)."""
    if not c or c & 1 or c & 7 == 2:
        return []
    if c & 7 == 4:
        return [codec.ref_offset(c)]
    core = st.core
    n = core.live_size(c)
    return codec.blob_refs(core.region.b[c:c + n])


def _kept_here(st: _State, off: int) -> bool:
    """Whether this process still holds the floating object at ``off``: a live handle, a live
    array view, or a buffer (a memoryview cannot be watched: kept until the process ends). A
    finalizer cut short by an interrupt never buries its object: its dead referent says so."""
    if off in st.handles or _views_alive(st, off):
        return True
    fin = st.floating.get(off, _MISSING)
    if fin is _MISSING:
        return False
    return fin is None or fin.peek() is not None


def _mark(st: _State) -> tuple[dict[int, int], list[int]]:
    """(objects reachable -> references found to each, every object in the heap)."""
    core = st.core
    w = core._w
    every = _objects_in_heap(st, everything=True)
    objs = [off for off in every if w[(off >> 3) + O_SERIAL]]
    roots = []
    if w[F.H_OBJECTS]:
        roots.append(w[F.H_OBJECTS])
    for off in every:  # what the graveyard still holds is freed when its turn comes, not lost
        if not w[(off >> 3) + O_SERIAL]:
            for c in _children(st, off):
                roots += _refs_in(st, c)
    for off in objs:
        o = off >> 3
        if w[o + O_REFS] == 0 and (w[o + O_FLOAT] == st.pid and _kept_here(st, off) or
                                    w[o + O_FLOAT] != st.pid and _pid_alive(w[o + O_FLOAT])):
            roots.append(off)
    for off, h in list(st.handles.items()):
        if h._serial and off in objs:
            roots.append(off)
    alive = set(objs)
    roots += [off for off in st.to_bury if off in alive]  # buried at this process's next call
    found: dict[int, int] = {}
    stack = list(roots)
    seen = set()
    while stack:
        off = stack.pop()
        if off in seen:
            continue
        seen.add(off)
        found.setdefault(off, 0)
        for c in _children(st, off):
            for r in _refs_in(st, c):
                found[r] = found.get(r, 0) + 1
                stack.append(r)
    if w[F.H_OBJECTS]:
        found[w[F.H_OBJECTS]] = found.get(w[F.H_OBJECTS], 0) + 1  # the root entry
    return found, objs


class CheckReport(dict):  # type: ignore[type-arg]
    """What ``Heap.check()`` found besides damage: shared objects nothing reaches."""

    def __repr__(self) -> str:
        return (f"CheckReport(objects={self['objects']}, unreachable={self['unreachable']} -- "
                "left by a process that died holding handles, or by a Ctrl-C that cut a handle's "
                "finalizer short; heap.gc() frees them)")


def check(core: Core) -> CheckReport | None:
    """The object layer's part of ``Heap.check()`` (under the lock): every object reachable
    from the root is sound (header, reference count, arrays live and large enough, a dict's
    every entry found through its index, a list within its capacity) and every blob decodes.
    Returns a report when some objects are unreachable (gc() frees them); raises
    CorruptHeapError for damage. O(objects + cells)."""
    st = core.objects
    w = core._w
    if not w[F.H_OBJ_ALL] and not w[F.H_OBJECTS] and not w[F.H_OBJ_GRAVE]:
        return None
    if st is None:
        st = _state(None, core)
    live, objs = _mark(st)
    listed = set(objs)
    # References held by objects that are not reachable (garbage gc() has not freed yet, and
    # the graveyard's objects, whose cells are dropped a step at a time) count too.
    held = dict.fromkeys(live, 0)
    for off in _objects_in_heap(st, everything=True):
        if off not in live:
            for c in _children(st, off):
                for r in _refs_in(st, c):
                    if r in held:
                        held[r] += 1
    for off in live:
        _check_object(st, off, live[off] + held[off])
        if off not in listed:
            raise CorruptHeapError(f"offset {off}: a reachable {KINDS[_kind_at(w, off >> 3)]} "
                                   f"is not on the {F.at('obj_all')} list of all objects")
    unreachable = [off for off in objs if off not in live]
    if unreachable:
        return CheckReport(objects=len(objs), unreachable=len(unreachable),
                           offsets=unreachable[:20])
    return None


def _check_object(st: _State, off: int, refs_found: int) -> None:
    core = st.core
    w = core._w

    def bad(msg: str) -> CorruptHeapError:
        return CorruptHeapError(f"offset {off}: {msg}")

    try:
        size = core.live_size(off)
    except InvalidPointerError as e:
        raise bad(f"a ref names something that is not a live allocation ({e})") from None
    o = off >> 3
    kind = _kind_at(w, o)
    if not kind or kind not in KINDS:
        raise bad(f"a ref names something that is not a shared object (word {w[o]:#x})")
    if w[o + O_SERIAL] == 0:
        raise bad(f"a ref names a freed {KINDS[kind]}")
    if w[o + O_REFS] != refs_found and not (w[o + O_REFS] == 0 and w[o + O_FLOAT]):
        raise bad(f"{KINDS[kind]} reference count {w[o + O_REFS]} but {refs_found} references "
                  "found")

    def array(field: int, nbytes: int, what: str) -> None:
        p = w[o + field]
        try:
            have = core.live_size(p)
        except InvalidPointerError:
            raise bad(f"{KINDS[kind]}'s {what} {p} is not a live allocation") from None
        if have < nbytes:
            raise bad(f"{KINDS[kind]}'s {what} holds {have} bytes, {nbytes} needed")

    if kind == DICT:
        if size < DICT_WORDS * 8:
            raise bad("dict header too small")
        used, count, ecap, mask = w[o + D_USED], w[o + D_COUNT], w[o + D_ECAP], w[o + D_MASK]
        if not count <= used <= ecap or (mask + 1) & mask or ecap > (mask + 1):
            raise bad(f"dict counts used {used}, count {count}, ecap {ecap}, mask {mask} "
                      "disagree")
        array(D_ENTRIES, ecap * ENTRY * 8, "entries")
        array(D_INDEX, (mask + 1) * 8, "index")
        ent = w[o + D_ENTRIES] >> 3
        idx = w[o + D_INDEX] >> 3
        live = 0
        pointed = set()
        for i in range(mask + 1):
            e = w[idx + i]
            if e and e != DUMMY:
                if e > used:
                    raise bad(f"dict index slot {i} names entry {e - 1} past used {used}")
                if e in pointed:
                    raise bad(f"dict entry {e - 1} is in the index twice")
                pointed.add(e)
        for e in range(used):
            b = ent + ENTRY * e
            if w[b + 1]:
                live += 1
                if e + 1 not in pointed:
                    raise bad(f"dict entry {e} is not in the index")
                kc = w[b + 1]
                _check_cell(st, kc, off)
                if not (not kc & 7 and st.core._b[kc] == codec.BLOB_PICKLE and
                        not st.core.allow_pickle):  # (a pickled key is checked where it loads)
                    key = _load(st, kc)
                    if st.hasher(key) != w[b]:
                        raise bad(f"dict entry {e}: stored hash does not match its key")
                _check_cell(st, w[b + 2], off)
        if live != count:
            raise bad(f"dict count {count} but {live} live entries")
    elif kind in (LIST, QUEUE):
        n_at, items_at, cap_at = (L_LEN, L_ITEMS, L_CAP) if kind == LIST else \
            (Q_LEN, Q_ITEMS, Q_CAP)
        n, cap = w[o + n_at], w[o + cap_at]
        if n > cap:
            raise bad(f"{KINDS[kind]} length {n} past its capacity {cap}")
        array(items_at, cap * 8, "items")
        for c in _children(st, off):
            _check_cell(st, c, off)
    elif kind == ARRAY:
        dtype, shape, data, nbytes = _array_meta(w, off)
        if data % ARRAY_ALIGN or w[(data >> 3) - ARRAY_ALIGN // 8] != off:
            raise bad("array data is misaligned or does not name its header")
        try:
            have = core.live_size(data - ARRAY_ALIGN)
        except InvalidPointerError:
            raise bad("array data is not a live allocation") from None
        if have < ARRAY_ALIGN + nbytes:
            raise bad(f"array data holds {have - ARRAY_ALIGN} bytes, {nbytes} needed")


def _check_cell(st: _State, c: int, owner: int) -> None:
    t = c & 7
    if c & 1 or t in (2, 4):
        if t == 2:
            codec.from_cell(c)
        return
    if t or not c:
        raise CorruptHeapError(f"offset {owner}: cell {c:#x} is neither a value, a blob nor a "
                               "ref")
    try:
        n = st.core.live_size(c)
    except InvalidPointerError as e:
        raise CorruptHeapError(f"offset {owner}: a blob cell names {c}, not a live allocation "
                               f"({e})") from None
    codec.blob_length(st.core.region.b[c:c + n])


def _check_hook(core: Core) -> CheckReport | None:
    return check(core)
