"""Object benchmark: pheap's shared objects against what users would pick instead, one run.

pheap's ``h.dict()``, ``h.root``, ``h.list()``, ``h.counter()``, ``h.queue()`` and
``h.ndarray()`` against ``multiprocessing.Manager()`` dict/list/Value/Queue,
``multiprocessing.Queue``/``Value``/``shared_memory``, ``shelve``, ``sqlite3`` (WAL,
synchronous=NORMAL), and where they import ``sqlitedict``, ``diskcache.Index``, py-``lmdb`` and
``UltraDict``; keys are 10-character str, values 100-character str. Commands (from the
repository root)::

    python3 tools/bench_objects.py --quick          # smoke run, well under a minute
    python3 tools/bench_objects.py                  # full run, several minutes
    python3 tools/bench_objects.py --sections a,c --repeats 7 -o objects.txt

Sections: a. dict set/get/delete in one process; b. dict across 2 forked processes (one writes,
the other reads; then both write their own keys); c. persistent store: put, close, reopen, get;
d. list append and index read; e. counter add, 1 and 2 processes; f. queue put+get round trip,
and producer -> consumer across 2 processes; g. a float64 array (100 MB; 20 MB in --quick)
summed by 2 pool workers; h. memory: bytes per entry of a dict of 10**6 (10**5 in --quick)
10-char str -> int entries.

Each table: an environment line first; medians of ``--repeats`` (systems round-robin, the order
rotating each repeat, a fresh store per repeat, the garbage collector off in timed loops); a
``--budget`` per timed phase ('*' marks a cell it cut); ratio columns against pheap's row (when
pheap has it, else Manager's or the section's usual choice); a check column (values read back
and counted: LOST/WRONG rows are flagged, never 'fastest'). A system that cannot run here shows
as 'not available (why)'; pheap's rows as 'pheap: not available (why)' if a probe of its API fails
(the code is ``tools/benchkit``: ``object_suites`` the sections, ``peers`` the peers,
``pheap_objects`` everything pheap-specific). Exit status: 0; 2 if a pheap row failed or was
flagged.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this pheap
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchkit

from benchkit import object_suites  # noqa: E402
from benchkit.report import Out  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="well under a minute: fewer keys, a 20 MB array, 10**5 entries")
    ap.add_argument("--sections", default=object_suites.SECTIONS,
                    help="which sections, e.g. a,c,h (default: all of a-h)")
    ap.add_argument("--repeats", type=int, help="repeats of each measurement (median)")
    ap.add_argument("--budget", type=float,
                    help="seconds per timed phase before a system is cut short (0: none)")
    ap.add_argument("--keys", type=int, help="keys (a, c), list items (d), queue items (f)")
    ap.add_argument("--xkeys", type=int, help="keys per process in b")
    ap.add_argument("--adds", type=int, help="adds per process in e")
    ap.add_argument("--array-mb", type=int, help="MB of the array in g")
    ap.add_argument("--entries", type=int, help="entries of the dict in h")
    ap.add_argument("--seed", type=int, default=1, help="seed of every random order")
    ap.add_argument("-o", "--output", metavar="FILE", help="also write the report to FILE")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)
    sections = "".join(x for x in args.sections.replace(",", "") if not x.isspace())
    if not sections or any(x not in object_suites.SECTIONS for x in sections):
        ap.error(f"--sections takes letters of {object_suites.SECTIONS}, e.g. a,c")
    cfg = object_suites.QUICK if args.quick else object_suites.FULL
    over = {f: getattr(args, f) for f in ("repeats", "budget", "keys", "xkeys", "adds",
                                          "array_mb", "entries") if getattr(args, f) is not None}
    if any(v < (0 if f == "budget" else 1) for f, v in over.items()):
        ap.error("sizes and --repeats must be at least 1, --budget at least 0")
    cfg = cfg._replace(**over)
    cmd = "python3 tools/bench_objects.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
        if not (args.output and a in (args.output, "-o", "--output")))
    main_pid = os.getpid()

    def on_sigterm(*_: object) -> None:
        if os.getpid() == main_pid:
            raise SystemExit(143)  # cleanup (children, temp files, segments) still runs
        os._exit(143)  # a forked child
    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.output:
            with open(args.output, "w", encoding="utf-8") as fh:
                return object_suites.run(Out(fh), cfg, sections, args.seed, cmd, args.verbose)
        return object_suites.run(Out(), cfg, sections, args.seed, cmd, args.verbose)
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
