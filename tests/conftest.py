"""Shared fixtures: heaps of every kind, each checked when the test ends."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

import pheap

#: the CS:APP malloc-lab traces (*.rep): $PHEAP_TRACES, else shared/traces/malloclab beside
#: the repository (they are not part of it)
TRACE_DIR = os.environ.get("PHEAP_TRACES") or \
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces", "malloclab")


@pytest.fixture
def heap_path(tmp_path) -> str:
    return str(tmp_path / "t.heap")


@pytest.fixture(params=["file", "memfd", "anon"])
def any_heap(request, tmp_path) -> Iterator[pheap.Heap]:
    """A fresh heap of each kind; its invariants are checked after the test."""
    if request.param == "file":
        h = pheap.open(str(tmp_path / "t.heap"), "n", size=1 << 20)
    elif request.param == "memfd":
        h = pheap.memfd(1 << 20)
    else:
        h = pheap.anonymous(8 << 20)
    yield h
    if not h.closed:
        h.check()
        h.close()


def reap(pid: int, timeout: float = 30.0) -> int:
    """Wait for child ``pid`` and return its exit code (-signal when killed); a child still
    running after ``timeout`` seconds is SIGKILLed and the test fails."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout} s")
        time.sleep(0.005)


def core(h: pheap.Heap):
    """The engine behind a handle (mapping, lock, journal, allocator)."""
    return h._core


def words(h: pheap.Heap):
    """The word view of the heap's mapping."""
    return h._core._w


def span(h: pheap.Heap, p: int) -> tuple[int, int]:
    """Bytes [start, end) the allocation at ``p`` occupies: a slot's own bytes, or a block's
    header and payload."""
    with h.lock():
        start, end = h._core.containing(p, 0)
        if not h._core._b[h._core._meta + (p >> 12)]:
            start -= 8
    return start, end


def is_slot(h: pheap.Heap, p: int) -> bool:
    """Whether ``p`` is a slot of a run (not a block)."""
    with h.lock():
        return bool(h._core._b[h._core._meta + (p >> 12)])
