"""CS:APP malloc-lab traces: parse, replay, and load the folder of them.

A trace file is four header numbers (suggested heap size, number of ids, number of ops, weight),
then one op a line: ``a id bytes`` (allocate), ``r id bytes`` (reallocate), ``f id`` (free).
Utilization of an allocator on a trace = the trace's peak live payload (``Trace.peak_live``: the
largest sum, over time, of the requested bytes of the live blocks) / the allocator's high-water
mark.

The traces are not part of the project (their copyright is not ours): they are the ``*.rep``
files of the CS:APP malloc lab (Bryant and O'Hallaron's course material), read from the folder
``$PHEAP_TRACES`` names, else from ``shared/traces/malloclab`` beside the repository.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from time import perf_counter
from typing import Any, NamedTuple

from .env import ROOT

TRACE_DIR = os.environ.get("PHEAP_TRACES") or \
    os.path.normpath(os.path.join(ROOT, "..", "shared", "traces", "malloclab"))
TRACE_DIR_SHOWN = "the malloc-lab trace folder"  #: how reports name TRACE_DIR (no local path)
TINY_TRACES = ("short1-bal", "short2-bal")  #: left out of averages (a few KiB of payload)

OP_ALLOC, OP_REALLOC, OP_FREE = 0, 1, 2  #: op kinds in Trace.ops


class Trace(NamedTuple):
    """One parsed trace file."""

    name: str  #: file name without ``.rep``
    suggested_heap: int  #: header line 1
    n_ids: int  #: header line 2: ids are 0 .. n_ids - 1
    n_ops: int  #: header line 3 (equals len(ops))
    weight: int  #: header line 4
    ops: list[tuple[int, int, int]]  #: (OP_ALLOC | OP_REALLOC | OP_FREE, id, bytes); 0 bytes: free
    peak_live: int  #: largest sum over time of the requested bytes of the live blocks


def parse_trace(path: str) -> Trace:
    """Read a CS:APP malloc-lab trace: four header numbers, then ``a id n``, ``r id n``, ``f id``.

    Validates as it reads (ValueError naming the line): ids in range, no ``a`` of a live id, no
    ``r``/``f`` of a dead one, the op count matching the header. Computes the peak live payload.
    """
    name = os.path.basename(path).removesuffix(".rep")
    with open(path, encoding="ascii") as fh:
        lines = fh.read().splitlines()
    header: list[int] = []
    ops: list[tuple[int, int, int]] = []
    live: dict[int, int] = {}
    cur = peak = 0
    n_ids = 0
    for lineno, line in enumerate(lines, 1):
        t = line.split()
        if not t:
            continue
        where = f"{name}.rep line {lineno}"
        try:
            if len(header) < 4:
                if len(t) != 1:
                    raise ValueError("header lines hold one number each")
                header.append(int(float(t[0])) if len(header) == 3 else int(t[0]))
                n_ids = header[1] if len(header) >= 2 else 0
                continue
            kind = {"a": OP_ALLOC, "r": OP_REALLOC, "f": OP_FREE}.get(t[0])
            if kind is None or len(t) != (2 if kind == OP_FREE else 3):
                raise ValueError(f"expected 'a id n', 'r id n' or 'f id', got {line.strip()!r}")
            i = int(t[1])
            if not 0 <= i < n_ids:
                raise ValueError(f"id {i} outside [0, {n_ids})")
            if kind == OP_FREE:
                if i not in live:
                    raise ValueError(f"free of id {i}, which is not live")
                cur -= live.pop(i)
                ops.append((OP_FREE, i, 0))
                continue
            n = int(t[2])
            if n < 0:
                raise ValueError(f"negative size {n}")
            if kind == OP_ALLOC:
                if i in live:
                    raise ValueError(f"alloc of id {i}, which is live")
            elif i not in live:
                raise ValueError(f"realloc of id {i}, which is not live")
            cur += n - live.get(i, 0)
            live[i] = n
            peak = max(peak, cur)
            ops.append((kind, i, n))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if len(header) < 4:
        raise ValueError(f"{name}.rep: {len(header)} header lines, expected 4")
    if len(ops) != header[2]:
        raise ValueError(f"{name}.rep: header says {header[2]} ops, found {len(ops)}")
    return Trace(name, header[0], header[1], header[2], header[3], ops, peak)


def replay(trace: Trace, malloc: Callable[[int], Any], realloc: Callable[[Any, int], Any],
           free: Callable[[Any], Any]) -> float:
    """Run the trace's ops through the three functions; return the seconds the loop took."""
    h: list[Any] = [0] * trace.n_ids
    ops = trace.ops
    t0 = perf_counter()
    for k, i, n in ops:
        if k == 0:
            h[i] = malloc(n)
        elif k == 1:
            h[i] = realloc(h[i], n)
        else:
            free(h[i])
    return perf_counter() - t0


def trace_files(folder: str = TRACE_DIR) -> list[str]:
    """The ``*.rep`` files in ``folder``, sorted; empty when the folder is absent."""
    return sorted(glob.glob(os.path.join(folder, "*.rep")))


def load_traces(files: list[str]) -> tuple[list[Trace], list[str]]:
    """Parse ``files``: (the traces, one line per file that could not be read or parsed)."""
    traces, skipped = [], []
    for f in files:
        try:
            traces.append(parse_trace(f))
        except (OSError, ValueError) as e:
            skipped.append(f"skipped {os.path.basename(f)}: {e}")
    return traces, skipped
