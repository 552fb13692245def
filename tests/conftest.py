"""Shared fixtures: heaps of every kind, each checked when the test ends."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

import pheap

TRACE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces", "malloclab")


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
