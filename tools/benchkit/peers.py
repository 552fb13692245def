"""The peers the object benchmark measures pheap against, one adapter each.

Dicts: a plain ``dict`` (floor), ``multiprocessing.Manager().dict()``, ``UltraDict``,
``shelve`` (on the default dbm), ``sqlite3`` (WAL, ``synchronous=NORMAL``, a table ``kv(key
TEXT PRIMARY KEY, value TEXT)``), ``sqlitedict``, ``diskcache.Index``, py-``lmdb``. Lists:
``list`` (floor), ``Manager().list()``. Counters: an int (floor), ``multiprocessing.Value``
(with and without its lock held around ``+= 1``), ``Manager().Value``. Queues: ``queue.Queue``
(floor, threads only), ``multiprocessing.Queue``, ``Manager().Queue()``.

Peers run with their defaults unless the row's name says otherwise. Their durability differs:
lmdb fsyncs every write transaction; sqlite3 in WAL with ``synchronous=NORMAL`` survives a
process crash, not a power loss; diskcache uses sqlite3 the same way; shelve/dbm.dumb writes
through the OS; Manager, UltraDict and the floors keep nothing on disk. A peer that is not
installed shows as 'not available' with the import error.
"""

from __future__ import annotations

import contextlib
import os
import queue
from collections.abc import Callable
from typing import Any

from .procs import FORK, SHM_MADE
from .stores import (
    CounterSystem,
    DictSystem,
    ListSystem,
    QueueSystem,
    Store,
    import_problem,
)

LMDB_MAP_SIZE = 1 << 30  #: bytes of lmdb's map (a sparse file: costs nothing until used)
SQLITE_BUSY_S = 60.0  #: seconds sqlite3 waits for another writer's lock before it gives up

# ---------------------------------------------------------------------------------------------
# One Manager for the whole run (started outside any timing)
# ---------------------------------------------------------------------------------------------

_manager: Any = None


def manager() -> Any:
    """The run's ``multiprocessing.Manager()`` (fork start method), started on first use."""
    global _manager
    if _manager is None:
        _manager = FORK.Manager()
    return _manager


def shutdown_manager() -> None:
    """Stop the run's Manager, if one was started."""
    global _manager
    if _manager is not None:
        _manager.shutdown()
        _manager = None


def default_dbm() -> str:
    """The module ``dbm.open`` (and so ``shelve.open``) would use for a new file."""
    import dbm

    for name in dbm._names:  # the order dbm.open tries them in
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    return "?"


# ---------------------------------------------------------------------------------------------
# Dicts
# ---------------------------------------------------------------------------------------------


class PlainDict(DictSystem):
    name = "dict (floor)"
    floor = True

    def create(self, folder: str) -> Store:
        return Store({})


class ManagerDict(DictSystem):
    name = "Manager().dict()"
    two_processes = True
    inherit = True
    how = "proxy inherited"

    def create(self, folder: str) -> Store:
        return Store(manager().dict())


def _ultradict_class() -> Any:
    """UltraDict, noting the shared-memory segments it creates in SHM_MADE: with its default
    dynamic dumps it makes a new segment for each full dump and unlinks the old one, and it
    turns Python's resource tracker off for shared memory, so a segment that two processes'
    dumps race past is left behind; :func:`benchkit.procs.sweep_shm` removes those."""
    from UltraDict import UltraDict

    class NotedUltraDict(UltraDict):
        @staticmethod
        def get_memory(*, create: bool = True, name: str | None = None, size: int = 0) -> Any:
            mem = UltraDict.get_memory(create=create, name=name, size=size)
            if getattr(mem, "created_by_ultra", False):
                SHM_MADE.append(mem.name)
            return mem
    return NotedUltraDict


class UltraDictPeer(DictSystem):
    """UltraDict with its defaults (10 kB update stream, dynamic full dumps, no shared lock)."""

    name = "UltraDict"
    two_processes = True
    inherit = True
    how = "object inherited"

    def check(self) -> str | None:
        return import_problem("UltraDict")

    def create(self, folder: str) -> Store:
        return Store(_ultradict_class()())

    def close(self, store: Store) -> None:
        store.obj.unlink()


class ShelvePeer(DictSystem):
    """shelve on the default dbm; no dbm of shelve takes two writers at once: not in b."""

    persistent = True

    def __init__(self) -> None:
        self.name = f"shelve ({default_dbm()})"

    def create(self, folder: str) -> Store:
        import shelve

        return Store(shelve.open(os.path.join(folder, "shelf"), "n"))

    def handle(self, store: Store, folder: str) -> Any:
        return os.path.join(folder, "shelf")

    def reopen(self, handle: Any) -> Store:
        import shelve

        return Store(shelve.open(handle, "w"))

    def close(self, store: Store) -> None:
        store.obj.close()


class SqliteMap:
    """A sqlite3 table ``kv(key TEXT PRIMARY KEY, value TEXT)`` as a mapping; WAL journal,
    ``synchronous=NORMAL``. ``autocommit``: every statement is its own transaction; else one
    transaction runs until :meth:`commit`."""

    def __init__(self, path: str, autocommit: bool) -> None:
        import sqlite3

        self.con = sqlite3.connect(path, timeout=SQLITE_BUSY_S,
                                   isolation_level=None if autocommit else "DEFERRED")
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT)")
        if not autocommit:
            self.con.commit()
        self._ex = self.con.execute

    def __setitem__(self, k: str, v: str) -> None:
        self._ex("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (k, v))

    def __getitem__(self, k: str) -> str:
        row = self._ex("SELECT value FROM kv WHERE key = ?", (k,)).fetchone()
        if row is None:
            raise KeyError(k)
        return row[0]

    def __delitem__(self, k: str) -> None:
        if self._ex("DELETE FROM kv WHERE key = ?", (k,)).rowcount == 0:
            raise KeyError(k)

    def __len__(self) -> int:
        return self._ex("SELECT COUNT(*) FROM kv").fetchone()[0]

    def commit(self) -> None:
        self.con.commit()

    def close(self) -> None:
        self.con.commit()
        self.con.close()


class SqlitePeer(DictSystem):
    persistent = True
    how = "reopened by path"

    def __init__(self, autocommit: bool) -> None:
        self.autocommit = autocommit
        self.name = "sqlite3 WAL, commit/op" if autocommit else "sqlite3 WAL, 1 commit/phase"
        # Two writers need a commit per op: one long write transaction each would lock the
        # other out until sqlite's busy timeout.
        self.two_processes = autocommit
        self.one_process = autocommit

    def create(self, folder: str) -> Store:
        return Store(SqliteMap(os.path.join(folder, "kv.sqlite"), self.autocommit))

    def end(self, store: Store, phase: str) -> None:
        if not self.autocommit and phase != "get":
            store.obj.commit()

    def handle(self, store: Store, folder: str) -> Any:
        return os.path.join(folder, "kv.sqlite")

    def reopen(self, handle: Any) -> Store:
        return Store(SqliteMap(handle, self.autocommit))

    def close(self, store: Store) -> None:
        store.obj.close()


class SqliteDictPeer(DictSystem):
    """sqlitedict: its autocommit mode hands every op to a writer thread and waits for it."""

    persistent = True

    def __init__(self, autocommit: bool) -> None:
        self.autocommit = autocommit
        self.name = "sqlitedict, autocommit" if autocommit else "sqlitedict, 1 commit/phase"
        self.one_process = autocommit
        self.persistent = not autocommit

    def check(self) -> str | None:
        return import_problem("sqlitedict")

    def create(self, folder: str) -> Store:
        return self.reopen(os.path.join(folder, "sd.sqlite"))

    def end(self, store: Store, phase: str) -> None:
        if not self.autocommit and phase != "get":
            store.obj.commit()

    def handle(self, store: Store, folder: str) -> Any:
        return os.path.join(folder, "sd.sqlite")

    def reopen(self, handle: Any) -> Store:
        from sqlitedict import SqliteDict

        return Store(SqliteDict(handle, autocommit=self.autocommit))

    def close(self, store: Store) -> None:
        store.obj.close()


class DiskcachePeer(DictSystem):
    name = "diskcache.Index"
    persistent = True
    two_processes = True
    how = "reopened by path"

    def check(self) -> str | None:
        return import_problem("diskcache")

    def create(self, folder: str) -> Store:
        import diskcache

        return Store(diskcache.Index(os.path.join(folder, "index")))

    def handle(self, store: Store, folder: str) -> Any:
        return os.path.join(folder, "index")

    def reopen(self, handle: Any) -> Store:
        import diskcache

        return Store(diskcache.Index(handle))

    def close(self, store: Store) -> None:
        store.obj.cache.close()


class LmdbMap:
    """py-lmdb as a mapping of str to str (UTF-8 bytes inside). ``txn`` None: every op in its
    own transaction; else every op in ``txn`` (opened and committed by the system)."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.txn: Any = None

    def __setitem__(self, k: str, v: str) -> None:
        if self.txn is not None:
            self.txn.put(k.encode(), v.encode())
            return
        with self.env.begin(write=True) as txn:
            txn.put(k.encode(), v.encode())

    def __getitem__(self, k: str) -> str:
        if self.txn is not None:
            raw = self.txn.get(k.encode())
        else:
            with self.env.begin() as txn:
                raw = txn.get(k.encode())
        if raw is None:
            raise KeyError(k)
        return bytes(raw).decode()

    def __delitem__(self, k: str) -> None:
        if self.txn is not None:
            ok = self.txn.delete(k.encode())
        else:
            with self.env.begin(write=True) as txn:
                ok = txn.delete(k.encode())
        if not ok:
            raise KeyError(k)

    def __len__(self) -> int:
        return self.env.stat()["entries"]


class LmdbPeer(DictSystem):
    """py-lmdb with its defaults (``sync=True``: every write transaction is fsynced)."""

    persistent = True
    how = "reopened by path"

    def __init__(self, txn_per_op: bool) -> None:
        self.txn_per_op = txn_per_op
        self.name = "lmdb, txn/op" if txn_per_op else "lmdb, 1 txn/phase"
        self.two_processes = txn_per_op  # one write txn per phase would lock the other out
        self.one_process = txn_per_op

    def check(self) -> str | None:
        return import_problem("lmdb")

    def _open(self, path: str) -> Store:
        import lmdb

        env = lmdb.open(path, map_size=LMDB_MAP_SIZE)
        return Store(LmdbMap(env), env)

    def create(self, folder: str) -> Store:
        return self._open(os.path.join(folder, "lmdb"))

    def begin(self, store: Store, phase: str) -> None:
        if not self.txn_per_op:
            store.obj.txn = store.res.begin(write=phase != "get")

    def end(self, store: Store, phase: str) -> None:
        if not self.txn_per_op:
            store.obj.txn.commit()
            store.obj.txn = None

    def handle(self, store: Store, folder: str) -> Any:
        return os.path.join(folder, "lmdb")

    def reopen(self, handle: Any) -> Store:
        return self._open(handle)

    def close(self, store: Store) -> None:
        store.res.close()


def dict_peers() -> list[DictSystem]:
    """Every dict peer, pheap's rows not included."""
    return [PlainDict(), ManagerDict(), UltraDictPeer(), ShelvePeer(), SqlitePeer(True),
            SqlitePeer(False), SqliteDictPeer(True), SqliteDictPeer(False), DiskcachePeer(),
            LmdbPeer(True), LmdbPeer(False)]


# ---------------------------------------------------------------------------------------------
# Lists
# ---------------------------------------------------------------------------------------------


class PlainList(ListSystem):
    name = "list (floor)"
    floor = True

    def create(self, folder: str) -> Store:
        return Store([])


class ManagerList(ListSystem):
    name = "Manager().list()"

    def create(self, folder: str) -> Store:
        return Store(manager().list())


def list_peers() -> list[ListSystem]:
    return [PlainList(), ManagerList()]


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------


class _Box:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class PlainCounter(CounterSystem):
    name = "int += 1 (floor)"
    floor = True
    two_processes = False

    def create(self, folder: str) -> Store:
        return Store(_Box())

    def adder(self, store: Store) -> Callable[[], None]:
        box = store.obj

        def add() -> None:
            box.n += 1
        return add

    def value(self, store: Store) -> int:
        return store.obj.n


class MpValueCounter(CounterSystem):
    """``multiprocessing.Value('q')`` (lock=True, the default). ``locked``: ``with
    v.get_lock(): v.value += 1`` (correct across processes); else a bare ``v.value += 1``,
    which takes the lock for the read and again for the write, not around both."""

    def __init__(self, locked: bool) -> None:
        self.locked = locked
        self.name = "mp.Value, get_lock() held" if locked else "mp.Value, bare += 1"

    def create(self, folder: str) -> Store:
        return Store(FORK.Value("q", 0))

    def adder(self, store: Store) -> Callable[[], None]:
        v = store.obj
        if self.locked:
            lock = v.get_lock()

            def add() -> None:
                with lock:
                    v.value += 1
        else:
            def add() -> None:
                v.value += 1
        return add

    def value(self, store: Store) -> int:
        return store.obj.value


class ManagerValueCounter(CounterSystem):
    """``Manager().Value('q', 0)``: ``v.value += 1`` is a get and a set, two round trips to
    the manager, with no lock around them (a Manager Value has none)."""

    name = "Manager().Value, += 1"

    def create(self, folder: str) -> Store:
        return Store(manager().Value("q", 0))

    def adder(self, store: Store) -> Callable[[], None]:
        v = store.obj

        def add() -> None:
            v.value += 1
        return add

    def value(self, store: Store) -> int:
        return store.obj.value


def counter_peers() -> list[CounterSystem]:
    return [PlainCounter(), MpValueCounter(True), MpValueCounter(False), ManagerValueCounter()]


# ---------------------------------------------------------------------------------------------
# Queues
# ---------------------------------------------------------------------------------------------


class PlainQueue(QueueSystem):
    name = "queue.Queue (floor)"
    floor = True
    two_processes = False  # threads only

    def create(self, folder: str) -> Store:
        return Store(queue.Queue())


class MpQueue(QueueSystem):
    name = "mp.Queue"

    def create(self, folder: str) -> Store:
        return Store(FORK.Queue())

    def close(self, store: Store) -> None:
        store.obj.close()
        with contextlib.suppress(Exception):
            store.obj.join_thread()


class ManagerQueue(QueueSystem):
    name = "Manager().Queue()"

    def create(self, folder: str) -> Store:
        return Store(manager().Queue())


def queue_peers() -> list[QueueSystem]:
    return [PlainQueue(), MpQueue(), ManagerQueue()]
