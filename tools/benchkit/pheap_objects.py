"""pheap's rows in the object benchmark: everything pheap-specific in tools/bench_objects.py.

The benchmark uses this API of pheap (``pheap.objects``; where a part is missing or fails its
probe, its rows print ``pheap: not available (...)`` and the run goes on):

- ``h = pheap.open(path, "n", size=...)`` a new heap file; ``pheap.open(path, "w")`` reopens it
  (in another process too); ``h.close()``.
- ``h.dict()`` a new shared dict (str keys and values here); ``h.root`` the heap's root, itself
  a shared dict: ``h.root["name"] = h.dict()``, and a process that reopens the file finds it
  at ``h.root["name"]``.
- ``h.list()``: ``append(x)``, ``l[i]``, ``len(l)``.
- ``h.queue()``: ``put(x)``, ``get(timeout=s)`` raising ``queue.Empty``, ``qsize()``.
- ``h.counter()``: ``add(n)``, ``value``.
- ``h.ndarray(shape, dtype)``: a numpy array in the heap.
- ``h.stats().used_bytes``: bytes in live blocks, headers included.

Children are forked and use the parent's live heap and objects (the rows that say
'inherited'), or reopen the file by path and find the object under ``h.root`` (the rows named
``h.root[...]``). :func:`probe` tries each part once on a scratch heap and says why one is not
there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from .stores import (
    CounterSystem,
    DictSystem,
    ListSystem,
    QueueSystem,
    Store,
    describe,
)

HEAP_SIZE = 64 << 20  #: initial size of every heap of the dict/list/counter/queue sections
NAME = "bench"  #: the key under h.root where a shared object is published
FEATURES = ("open", "dict", "root", "list", "queue", "counter", "ndarray", "stats")

_probed: dict[str, str | None] | None = None


def _module() -> Any:
    """The pheap module (every use of pheap here goes through this; the tests put a stand-in
    with the same API in its place)."""
    import pheap

    return pheap


def _version() -> str:
    return f"pheap {getattr(_module(), '__version__', '?')}"


def _try(h: Any, feature: str) -> str | None:
    """Use ``feature`` of heap ``h`` once; None if it works, else why not."""
    if not hasattr(h, feature):
        return f"no h.{feature}{'' if feature == 'root' else '()'} in {_version()}"
    if feature == "ndarray":
        try:
            import numpy  # noqa: F401
        except ImportError as e:
            return f"import numpy failed: {describe(e)}"
    attr = feature
    try:
        if feature == "dict":
            d = h.dict()
            d["k000000001"] = "v"
            ok = d["k000000001"] == "v" and len(d) == 1
            del d["k000000001"]
        elif feature == "root":
            r = h.root
            if not (hasattr(r, "__setitem__") and hasattr(r, "__getitem__")):
                return f"h.root gives {type(r).__name__}, not a shared dict, in {_version()}"
            r["probe"] = 1
            ok = r["probe"] == 1
            del r["probe"]
        elif feature == "list":
            lst = h.list()
            lst.append("x")
            ok = lst[0] == "x" and len(lst) == 1
        elif feature == "queue":
            q = h.queue()
            q.put("x")
            ok = q.qsize() == 1 and q.get(timeout=1) == "x"
        elif feature == "counter":
            c = h.counter()
            c.add(2)
            ok = c.value == 2
        elif feature == "ndarray":
            a = h.ndarray((4,), "float64")
            a[:] = 1.5
            ok = float(a.sum()) == 6.0
            del a
        else:  # stats
            ok = isinstance(h.stats().used_bytes, int)
    except Exception as e:  # noqa: BLE001 - whatever it is, the row says it
        return f"h.{attr} failed: {describe(e)}"
    return None if ok else f"h.{attr} gave a wrong result"


def probe() -> dict[str, str | None]:
    """For each of FEATURES: None if it works here, else one line saying why not. Once a run."""
    global _probed
    if _probed is not None:
        return _probed
    try:
        pheap = _module()
    except Exception as e:  # noqa: BLE001
        why = f"import pheap failed: {describe(e)}"
        _probed = dict.fromkeys(FEATURES, why)
        return _probed
    if not callable(getattr(pheap, "open", None)):
        _probed = dict.fromkeys(FEATURES, "no pheap.open()")
        return _probed
    folder = tempfile.mkdtemp(prefix="pheap-probe-")
    path = os.path.join(folder, "probe.heap")
    res: dict[str, str | None] = {}
    try:
        h = pheap.open(path, "n", size=HEAP_SIZE)
    except Exception as e:  # noqa: BLE001
        _probed = dict.fromkeys(FEATURES, f"pheap.open(path, 'n', size=...) failed: {describe(e)}")
        os.rmdir(folder)
        return _probed
    try:
        res["open"] = None
        for f in FEATURES[1:]:
            res[f] = _try(h, f)
    finally:
        h.close()
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    _probed = res
    return res


def reset_probe() -> None:
    """Forget the probe's answers (a new run probes again)."""
    global _probed
    _probed = None


def unavailable(*features: str) -> str | None:
    """'pheap: not available (why)' for the first of ``features`` that is missing, else None."""
    p = probe()
    for f in features:
        if p.get(f):
            return f"pheap: not available ({p[f]})"
    return None


def create_heap(path: str, size: int = HEAP_SIZE) -> Any:
    return _module().open(path, "n", size=size)


def reopen_heap(path: str) -> Any:
    return _module().open(path, "w")


def used_bytes(h: Any) -> int:
    """Bytes in live blocks of heap ``h``, headers included (``h.stats().used_bytes``)."""
    return int(h.stats().used_bytes)


def ndarray(h: Any, n: int) -> Any:
    """A float64 array of ``n`` elements in heap ``h``."""
    return h.ndarray((n,), "float64")


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


class PheapDict(DictSystem):
    """``h.dict()`` on a new heap file; in section b the children use the parent's live heap
    and dict (fork)."""

    name = "pheap h.dict()"
    two_processes = True
    inherit = True
    how = "heap and dict inherited"

    def check(self) -> str | None:
        return unavailable("dict")

    def create(self, folder: str) -> Store:
        h = create_heap(os.path.join(folder, "d.heap"))
        return Store(h.dict(), h)

    def close(self, store: Store) -> None:
        store.res.close()


class PheapRoot(DictSystem):
    """The heap's root dict itself (section a)."""

    name = "pheap h.root"

    def check(self) -> str | None:
        return unavailable("root")

    def create(self, folder: str) -> Store:
        h = create_heap(os.path.join(folder, "r.heap"))
        return Store(h.root, h)

    def close(self, store: Store) -> None:
        store.res.close()


class PheapNamed(DictSystem):
    """``h.root[NAME] = h.dict()``; reopened by path with ``pheap.open(path, 'w')``: the
    children of section b, and the reopen of section c."""

    name = f'pheap h.root["{NAME}"]'
    one_process = False
    two_processes = True
    persistent = True
    how = "reopened by path"

    def check(self) -> str | None:
        return unavailable("dict", "root")

    def create(self, folder: str) -> Store:
        h = create_heap(os.path.join(folder, "n.heap"))
        d = h.dict()
        h.root[NAME] = d
        return Store(d, h)

    def handle(self, store: Store, folder: str) -> Any:
        return os.path.join(folder, "n.heap")

    def reopen(self, handle: Any) -> Store:
        h = reopen_heap(handle)
        return Store(h.root[NAME], h)

    def close(self, store: Store) -> None:
        store.res.close()


class PheapList(ListSystem):
    name = "pheap h.list()"

    def check(self) -> str | None:
        return unavailable("list")

    def create(self, folder: str) -> Store:
        h = create_heap(os.path.join(folder, "l.heap"))
        return Store(h.list(), h)

    def close(self, store: Store) -> None:
        store.res.close()


class PheapCounter(CounterSystem):
    name = "pheap h.counter()"

    def check(self) -> str | None:
        return unavailable("counter")

    def create(self, folder: str) -> Store:
        h = create_heap(os.path.join(folder, "c.heap"))
        return Store(h.counter(), h)

    def adder(self, store: Store) -> Callable[[], None]:
        c_add = store.obj.add

        def add() -> None:
            c_add(1)
        return add

    def value(self, store: Store) -> int:
        return int(store.obj.value)

    def close(self, store: Store) -> None:
        store.res.close()


class PheapQueue(QueueSystem):
    name = "pheap h.queue()"

    def check(self) -> str | None:
        return unavailable("queue")

    def create(self, folder: str) -> Store:
        h = create_heap(os.path.join(folder, "q.heap"))
        return Store(h.queue(), h)

    def close(self, store: Store) -> None:
        store.res.close()
