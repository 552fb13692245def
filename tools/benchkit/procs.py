"""Child processes and shared-memory segments, always cleaned up.

:func:`run_children` forks one child per job, gathers each child's result dict through a queue
with a deadline, and reaps every child with a timeout (a child still alive then is killed): a
hung peer costs one row, never the run. :data:`SHM_MADE` records the shared-memory segments a
peer creates behind our back (UltraDict's dumps), and :func:`sweep_shm` unlinks the ones left.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Sequence
from typing import Any

from .stores import describe

FORK = multiprocessing.get_context("fork")  #: the start method of every child here

#: names of shared-memory segments made by peers in this process (children send theirs back)
SHM_MADE: list[str] = []


def child_timeout(budget: float | None) -> float:
    """Seconds a child may take, or wait at a barrier, before it counts as hung."""
    return 60 + 20 * budget if budget else 1800


def _child(i: int, fn: Callable[..., dict], args: tuple, q: Any, barrier: Any) -> None:
    SHM_MADE.clear()  # the parent's list came along with the fork
    try:
        res = fn(*args)
    except BaseException as e:  # noqa: BLE001 - report everything; let the other child go
        res = {"error": describe(e)}
        if barrier is not None:
            try:
                barrier.abort()
            except Exception:  # noqa: BLE001
                pass
    res["shm"] = list(SHM_MADE)
    q.put((i, res))


def reap(procs: Sequence[Any], timeout: float = 10.0) -> None:
    """Join every process; one still running after ``timeout`` s is killed (ours only)."""
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout)


def run_children(jobs: Sequence[tuple[Callable[..., dict], tuple]], timeout: float,
                 barrier: Any = None) -> list[dict]:
    """Fork one child per ``(fn, args)``, all at once; return their ``fn(*args)`` dicts in order.

    A child that raised returns ``{"error": ...}`` (and aborts ``barrier``, so that the others
    do not wait for it); one that did not answer within ``timeout`` s ``{"error": ..., "hung":
    True}``. Every child is reaped before this returns.
    """
    q = FORK.Queue()
    gc.collect()  # the children start with a clean heap, and none collects the parent's garbage
    procs = [FORK.Process(target=_child, args=(i, fn, args, q, barrier), daemon=True)
             for i, (fn, args) in enumerate(jobs)]
    results: list[dict | None] = [None] * len(jobs)
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for _ in jobs:
            try:
                i, r = q.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            results[i] = r
    finally:
        reap(procs)
        q.close()
        q.join_thread()
    out = []
    for i, r in enumerate(results):
        if r is None:
            r = {"error": f"child hung or died (exit code {procs[i].exitcode})", "hung": True}
        SHM_MADE.extend(r.pop("shm", ()))
        out.append(r)
    return out


def sweep_shm() -> None:
    """Unlink the segments in SHM_MADE that are still there (peers' leftovers)."""
    from multiprocessing import shared_memory

    for name in dict.fromkeys(SHM_MADE):
        try:
            seg = shared_memory.SharedMemory(name=name)
        except (FileNotFoundError, OSError, ValueError):
            continue  # already unlinked, as it should be
        seg.close()
        try:
            seg.unlink()
        except FileNotFoundError:
            pass
    SHM_MADE.clear()


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident set size of process ``pid`` (this one by default), from /proc (None elsewhere)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
