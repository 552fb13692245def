"""All of pheap's benchmarks in one run, written to one Markdown file (docs/benchmarks.md).

Project rule: every figure in the docs comes from ONE generated benchmark file that names the
command that made it. This is the command, and the file it writes is that file. Commands (from
the repository root)::

    python tools/bench_all.py                 # full run: docs/benchmarks.md (tens of minutes)
    python tools/bench_all.py --quick         # a few minutes, noisier
    python tools/bench_all.py --tiny -o x.md  # a smoke run for the tests (seconds; no figures
                                              # to quote)

The file: a title; the exact command line and the date; the environment (CPU, cores, load
average, Python, pheap version, the peers' versions); then the allocator benchmark
(tools/bench_alloc.py) and the object benchmark (tools/bench_objects.py), each with a paragraph
on how to read it and its output verbatim in a code block. Both run in this process, one after
the other, through the same ``benchkit`` functions as their own command lines, with the sizes
of ``--quick``/``--tiny`` or the full ones, and ``--repeats`` repeats if given. Progress goes to
standard output.

Exit status: 0; 2 if the object benchmark flagged a pheap row (the file is written anyway and
says so).
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import re
import shlex
import signal
import sqlite3
import sys
import time
from typing import TextIO

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this pheap
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchkit

from benchkit import alloc_suites, env, object_suites  # noqa: E402
from benchkit.report import Out  # noqa: E402
from benchkit.traces import TRACE_DIR, TRACE_DIR_SHOWN  # noqa: E402

DEFAULT_OUT = os.path.join("docs", "benchmarks.md")
TITLE = "# pheap benchmarks"

#: A smoke run (the tests): every section, tiny sizes, one repeat. Its figures mean nothing.
TINY_ALLOC = alloc_suites.AllocConfig(1, 1, 0.002, (100,), 100, 1, 1.0, (100, 200), 200, 1,
                                      1, 0.05, 1, 0.002, (100,))
TINY_OBJECTS = object_suites.ObjConfig(40, 40, 200, 1, 3000, 0.5, 10.0, 1)

ALLOC_HEADING = "## 1. The allocator: pheap against multiprocessing.heap and a first-fit free list"
OBJECTS_HEADING = "## 2. Shared objects: pheap against what users would pick instead"

ALLOC_HOW = (
    "How to read it. Every contender runs in the same process, on the same inputs, in the "
    "same run, so the ratios hold where the absolute figures belong to this machine. "
    "Section 2 replays the CS:APP malloc-lab traces: *utilization* is the trace's peak live "
    "payload divided by the allocator's high-water mark (higher is better; `pheap whole` also "
    "counts pheap's fixed header, control block and metadata), and throughput is trace ops per "
    "second (Kops/s, higher is better); `pheap/ff` and `pheap/mp` are pheap's figure divided by "
    "first-fit's and multiprocessing.heap's (> 1: pheap better). Section 3 gives microseconds per "
    "malloc+free pair (lower is better): `mp/this` > 1 means faster than multiprocessing.heap, "
    "`/floor` compares with the design's 0.47 us target, and the system-call rows (an flock "
    "pair, an lseek) show what taking the heap lock per operation costs by itself; 3c is "
    "pheap's per-op time as the live set grows (flat is the goal), 3d the lock shared by two "
    "processes. Section 4 is the price of crash safety: the slot fast path (one word store) "
    "against a journaled block operation, durability='power' (msync per commit), a small "
    "transaction, and the time to open a heap whose last user was killed mid-operation. "
    "`pheap Allocator` is the allocator called directly under one held lock (the algorithm "
    "and its journal, no lock system call per op); `pheap Heap` rows are the public API. "
    "Figures are medians of the repeats; `spread` is (max - min) / median, a measure of the "
    "noise.")

OBJECTS_HOW = (
    "How to read it. Each table is one task done by pheap's shared objects and by the peers a "
    "user would reach for (multiprocessing's Manager, Queue, Value and shared_memory, shelve, "
    "sqlite3, and sqlitedict, diskcache, lmdb and UltraDict where installed). Cells are "
    "microseconds per operation (lower is better) unless the header says otherwise; `/ref` "
    "columns divide a row's figure by the reference row's, pheap's when it has one (> 1: "
    "slower than pheap, or more bytes in h). A `(floor)` row is the plain in-process Python "
    "object: what sharing adds is the distance to it. `*` marks a figure cut short by the "
    "per-phase time budget (measured over the ops done, listed under the table). The `check` "
    "column verifies every result: `!!! LOST` or `!!! WRONG` flags a store that lost updates or "
    "read back wrong values (the racy Manager().Value and bare mp.Value rows are there to show "
    "exactly that), `!!! FAILED` one that raised (with the error; figures, if any, are over "
    "what it did before), and a flagged row is never called fastest nor the reference. "
    "`not available (why)` is a peer that is not installed or cannot run here. Figures are "
    "medians of the repeats; `spread` is (max - min) / median, the largest over a row's "
    "columns: on a busy machine, a guide to how far to trust a ratio.")


def load_average() -> str:
    """'1.23, 0.98, 0.77' (1, 5, 15 minutes), or '?' where the system does not tell."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def environment_lines() -> list[str]:
    """The environment of the run, as Markdown list items."""
    cpu = env.cpu_model() or platform.processor() or "?"
    commit = env.git_describe()
    return [
        f"- CPU: {cpu}; {os.cpu_count()} cores ({env.usable_cpus()} usable by this process)",
        f"- load average at the start (1, 5, 15 min): {load_average()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}) on "
        f"{platform.system()} {platform.release()} ({platform.machine()})",
        f"- {env.pheap_version()}" + (f" at commit {commit}" if commit else ""),
        f"- peers: {env.package_versions(object_suites.PEER_DISTS)}; sqlite "
        f"{sqlite3.sqlite_version}",
    ]


def capture(run: object, *args: object) -> tuple[int, str]:
    """``run(out, *args)`` with ``out`` writing to a string (and echoing to stdout): (exit
    status, text)."""
    buf = io.StringIO()
    rc = run(Out(buf), *args)  # type: ignore[operator]
    return rc, buf.getvalue()


def code_block(text: str) -> list[str]:
    """``text`` verbatim in a fenced block (a fence longer than any backtick run inside)."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text.rstrip("\n"), fence]


def _duration(s: float) -> str:
    """'42 s' or '23 min'."""
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


def write_report(fh: TextIO, command: str, size_note: str, alloc_text: str, obj_text: str,
                 obj_rc: int, started: datetime.datetime, env_lines: list[str],
                 total_s: float) -> None:
    when = started.strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        TITLE,
        "",
        f"Generated by `{command}` on {when} (from the repository root; it took "
        f"{_duration(total_s)}). Every benchmark figure quoted in the docs comes from this "
        f"file: run the same command to regenerate it.",
        "",
        "Environment:",
        "",
        *env_lines,
        "",
        size_note,
        "",
        "The machine is shared: other work ran during the benchmarks (each section's "
        "environment and last lines say how much). Ratios between rows of one table, measured "
        "in the same run and interleaved, hold better than the absolute figures.",
        "",
    ]
    if obj_rc:
        flagged = [ln.split(":", 1)[1].strip() for ln in obj_text.splitlines()
                   if ln.startswith("pheap FLAGGED:")]
        lines += [f"**The object benchmark flagged a pheap row**: {', '.join(flagged) or '?'} "
                  f"(its `check` cell says why).", ""]
    lines += [ALLOC_HEADING, "", ALLOC_HOW, "", *code_block(alloc_text), "",
              OBJECTS_HEADING, "", OBJECTS_HOW, "", *code_block(obj_text), ""]
    fh.write("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the --quick sizes of both benchmarks (a few minutes)")
    size.add_argument("--tiny", action="store_true",
                      help="a smoke run for the tests (seconds; figures mean nothing)")
    ap.add_argument("-o", "--out", metavar="PATH", default=DEFAULT_OUT,
                    help=f"the Markdown file to write (default: {DEFAULT_OUT})")
    ap.add_argument("--repeats", type=int, help="repeats of every measurement (median)")
    ap.add_argument("--seed", type=int, default=1, help="seed of every random size and order")
    ap.add_argument("--traces", metavar="DIR",
                    help=f"folder of malloc-lab traces (default: {TRACE_DIR_SHOWN} relative "
                         "to the repository root)")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be at least 1")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python tools/bench_all.py" + "".join(" " + shlex.quote(a) for a in argv)

    if args.tiny:
        acfg, ocfg, size_note = TINY_ALLOC, TINY_OBJECTS, (
            "Size: --tiny, a smoke run: one repeat of tiny workloads. Its figures mean nothing.")
    elif args.quick:
        acfg, ocfg, size_note = alloc_suites.QUICK, object_suites.QUICK, (
            "Size: --quick: fewer repeats and smaller workloads than the full run; noisier.")
    else:
        acfg, ocfg, size_note = alloc_suites.FULL, object_suites.FULL, (
            "Size: full (the default sizes of both benchmarks).")
    if args.repeats is not None:
        r = args.repeats
        acfg = acfg._replace(trace_repeats=r, pair_repeats=r, churn_repeats=r, scale_repeats=r,
                             lock_repeats=r, crash_repeats=r)
        ocfg = ocfg._replace(repeats=r)
        size_note += f" Repeats: {r} for every measurement (--repeats)."
    trace_dir = os.path.abspath(args.traces) if args.traces else TRACE_DIR
    shown = "the folder given with --traces" if args.traces else TRACE_DIR_SHOWN

    main_pid = os.getpid()

    def on_sigterm(*_: object) -> None:
        if os.getpid() == main_pid:
            raise SystemExit(143)  # cleanup (children, temp files, segments) still runs
        os._exit(143)  # a forked child
    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        started = datetime.datetime.now(datetime.timezone.utc)
        env_lines = environment_lines()
        t0 = time.perf_counter()
        _, alloc_text = capture(alloc_suites.run, acfg, args.seed, command, trace_dir, shown)
        obj_rc, obj_text = capture(object_suites.run, ocfg, object_suites.SECTIONS, args.seed,
                                   command)
        total = time.perf_counter() - t0
    finally:
        signal.signal(signal.SIGTERM, old)
    folder = os.path.dirname(args.out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        write_report(fh, command, size_note, alloc_text, obj_text, obj_rc, started, env_lines,
                     total)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return obj_rc


if __name__ == "__main__":
    sys.exit(main())
