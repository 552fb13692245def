"""What the object benchmark measures every system through: the keys and values, the base
classes of the systems (one per kind of object: dict, list, counter, queue), and ``describe``.

A *system* is one row of a table: a store a user might pick (``Manager().dict()``, sqlite3,
pheap's ``h.dict()`` ...). ``check()`` says whether it can run here; ``create(folder)`` makes a
fresh, empty one for each repeat (a folder of its own, removed after the repeat) and returns a
:class:`Store`: ``obj``, the object the timed loops drive (a mapping, a list, a counter, a
queue), and what to close. Peers live in :mod:`benchkit.peers`, pheap in
:mod:`benchkit.pheap_objects`; the sections in :mod:`benchkit.object_suites`.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

KEY_LEN = 10  #: characters of every key
VALUE_LEN = 100  #: characters of every value


def key(i: int, prefix: str = "k") -> str:
    """The i-th key: a one-letter prefix and 9 digits (10 characters).

    >>> key(42), len(key(42)), key(7, "b")
    ('k000000042', 10, 'b000000007')
    """
    return f"{prefix}{i:09d}"


def value(k: str) -> str:
    """The 100-character str value stored under key ``k`` (it names its key, so a value read
    back under the wrong key is caught).

    >>> v = value("k000000042"); len(v), v[:20]
    (100, 'value of k000000042 ')
    """
    return f"value of {k} ".ljust(VALUE_LEN, ".")


def keys_values(n: int, prefix: str = "k") -> tuple[list[str], list[str]]:
    ks = [key(i, prefix) for i in range(n)]
    return ks, [value(k) for k in ks]


def describe(e: BaseException) -> str:
    """'Type: first line of the message', or where it was raised when the message is empty."""
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    if msg:
        return f"{type(e).__name__}: {msg}"
    tb = traceback.extract_tb(e.__traceback__)
    if tb:
        f = tb[-1]
        return f"{type(e).__name__} at {os.path.basename(f.filename)}:{f.lineno} in {f.name}()"
    return type(e).__name__


def import_problem(module: str) -> str | None:
    """None if ``module`` imports, else 'import X failed: ...'."""
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - any failure to import means 'not here'
        return f"import {module} failed: {describe(e)}"
    return None


class Store:
    """An open store: ``obj`` is what the benchmark drives; ``res`` what the system closes."""

    __slots__ = ("obj", "res")

    def __init__(self, obj: Any, res: Any = None) -> None:
        self.obj, self.res = obj, res


class System:
    """One row: a store of some kind. Instances hold settings only."""

    name = "?"
    floor = False  #: a reference point (a plain dict ...), never 'fastest'

    def check(self) -> str | None:
        """None if it can run here, else one line saying why not."""
        return None

    def create(self, folder: str) -> Store:
        """A new, empty store in ``folder`` (a fresh folder of its own)."""
        raise NotImplementedError

    def close(self, store: Store) -> None:
        """Let go of a store this process created (and destroy it, for memory-only stores)."""


class DictSystem(System):
    """A mapping with str keys and str values: sections a (one process), b (two processes) and
    c (persistent: close, reopen, read back)."""

    one_process = True  #: takes part in section a
    two_processes = False  #: takes part in section b
    persistent = False  #: takes part in section c (survives close + reopen)
    inherit = False  #: section b: children use the parent's live object (else they reopen)
    how = ""  #: section b: a few words on how children get at the store

    def begin(self, store: Store, phase: str) -> None:
        """Timed, before a phase ('set', 'get', 'del'): where a mode opens a transaction."""

    def end(self, store: Store, phase: str) -> None:
        """Timed, after a phase: where a mode commits."""

    def handle(self, store: Store, folder: str) -> Any:
        """What a process that reopens the store is given (children are forked: anything)."""
        return folder

    def reopen(self, handle: Any) -> Store:
        """Open the existing store from ``handle``: in a child, or in the parent after a close."""
        raise NotImplementedError(f"{self.name} cannot be reopened")

    def detach(self, store: Store) -> None:
        """A process that reopened the store lets go of it (never destroys it)."""
        self.close(store)


class ListSystem(System):
    """A list of str: append, and read by index (section d)."""


class CounterSystem(System):
    """An integer counter (section e). ``adder(store)`` returns a function that adds 1."""

    two_processes = True

    def adder(self, store: Store) -> Callable[[], None]:
        raise NotImplementedError

    def value(self, store: Store) -> int:
        raise NotImplementedError


class QueueSystem(System):
    """A FIFO queue of str (section f): ``put(x)`` and ``get(timeout=...)`` raising
    ``queue.Empty``."""

    two_processes = True
