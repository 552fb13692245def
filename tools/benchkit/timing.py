"""Timing: the garbage collector off around a timed loop, loop counts calibrated to a target
duration, budgets that cut a slow system short, and the round-robin order of repeats.

Every timed loop times itself with ``time.perf_counter`` (CLOCK_MONOTONIC on Linux, so two
processes' readings compare) and runs with the garbage collector off, after a collection, as
``timeit`` does.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from time import perf_counter
from typing import Any, TypeVar

T = TypeVar("T")


@contextmanager
def gc_off(collect: bool = True) -> Iterator[None]:
    """The garbage collector off inside (after one collection unless ``collect`` is False)."""
    enabled = gc.isenabled()
    if collect:
        gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def timed(fn: Callable[..., float], *args: Any) -> float:
    """``fn(*args)`` (which times itself) with the garbage collector off."""
    with gc_off():
        return fn(*args)


def calibrate(run: Callable[[int], float], target_s: float) -> int:
    """A loop count for which ``run(n)`` takes about ``target_s`` seconds."""
    n = 64
    while True:
        dt = timed(run, n)
        if dt >= target_s / 8 or n >= 1 << 26:
            return max(16, int(n * target_s / max(dt, 1e-9)))
        n *= 4


def rotated(xs: Sequence[T], r: int) -> list[T]:
    """``xs`` started at position ``r`` (mod its length): the order of repeat ``r``, so that a
    burst of other load does not always hit the same system first or last.

    >>> rotated("abc", 0), rotated("abc", 1), rotated("abc", 5)
    (['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'])
    """
    k = r % len(xs) if xs else 0
    return list(xs[k:]) + list(xs[:k])


CHUNK = 64  #: ops between two looks at the clock in a budgeted loop


def budgeted(step: Callable[[int, int], None], n: int, budget: float | None) -> tuple[float, int]:
    """Run ``step(a, b)`` over ``range(n)`` in chunks of CHUNK until done or ``budget`` seconds
    pass (None or 0: no budget); return (seconds, ops done). No GC control: callers wrap it."""
    t0 = perf_counter()
    deadline = t0 + budget if budget else float("inf")
    i = 0
    while i < n:
        j = min(n, i + CHUNK)
        step(i, j)
        i = j
        if perf_counter() > deadline:
            break
    return perf_counter() - t0, i
