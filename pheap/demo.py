"""``pheap demo``: worker processes fill the shared objects of one heap file at once, one of
them is SIGKILLed inside a transaction and replaced, and a new interpreter verifies every record.

The README's first command runs it: it shows what pheap is for (several processes changing
shared objects in one persistent file, all or nothing even when one is killed) and checks it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Final

from . import _map
from .cli import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK
from .heap import open as open_heap

__all__ = ["run_demo"]




def _demo_key(worker: int, i: int) -> str:
    return f"{worker}:{i}"


def _demo_value(worker: int, i: int) -> str:
    return f"worker {worker} record {i}"


def _demo_worker(path: str, worker: int, records: int, kill_at: int, report: Any) -> None:
    """One worker of the demo: open the heap file by its path, resume after the last record
    the heap holds from this worker, and add the rest, one transaction each. At record
    ``kill_at`` it SIGKILLs itself inside the transaction (-1: never)."""
    try:
        with open_heap(path, "w") as h:
            root = h.root
            records_, log, done = root["records"], root["log"], root["done"]
            start = 0
            while _demo_key(worker, start) in records_:  # what an earlier run of mine finished
                start += 1
            if report is not None:
                report.put(start)
            for i in range(start, records):
                key = _demo_key(worker, i)
                with h.transaction():  # all three, or (even after a SIGKILL) none of them
                    records_[key] = _demo_value(worker, i)
                    log.append(key)
                    if i == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    done.add(1)
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too: the parent says so
        sys.exit(EXIT_INTERRUPTED)


#: The demo's check, run by a new interpreter: argv is the file, workers, records.
DEMO_VERIFY: Final = r"""
import sys, time
import pheap
path, workers, records = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
total = workers * records
t0 = time.perf_counter()
with pheap.open(path, "w") as h:  # read-write: an opener undoes what a dead process left
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    root = h.root
    found = root["records"].copy()
    log = root["log"].copy()
    done = root["done"].value
    wrong = [k for k in (f"{w}:{i}" for w in range(workers) for i in range(records))
             if found.get(k) != "worker {} record {}".format(*k.split(":"))]
    if wrong or len(found) != total:
        sys.exit(f"  WRONG: {len(wrong)} of {total} records missing or wrong (first: "
                 f"{wrong[:3]}); the dict holds {len(found)}")
    nxt = [0] * workers
    for k in log:
        w, i = map(int, k.split(":"))
        if i != nxt[w]:
            sys.exit(f"  WRONG: the log has {k} where {w}:{nxt[w]} was due")
        nxt[w] += 1
    if nxt != [records] * workers or done != total:
        sys.exit(f"  WRONG: the log holds {sum(nxt)} records, done says {done}, for {total}")
    took = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = h.check()
    checked = time.perf_counter() - t0
    info, st = h.info(), h.stats()
if report:
    sys.exit(f"  WRONG: check() found unreachable objects: {report!r}")
print(f"    opened in {opened * 1e3:.2f} ms; the killed worker's unfinished transaction was "
      f"undone ({info['recoveries']} recovery)" if info["recoveries"] == 1 else
      f"    opened in {opened * 1e3:.2f} ms; {info['recoveries']} recoveries")
print(f"    verified {total} records in {took:.2f} s: all in 'records', in 'log' in order, "
      f"'done' = {done}")
print(f"    check(): clean in {checked:.2f} s ({st.used_blocks:,} allocations, "
      f"fragmentation {st.fragmentation:.1%})")
"""


def _demo_fail(text: str, path: str) -> int:
    print(f"  {text}; the heap is kept at {path} (pheap check, pheap dump)", file=sys.stderr)
    return EXIT_INTERNAL


def run_demo(workers: int, records: int, path: str | None) -> int:
    """The demo: worker processes fill the shared objects of one heap file at once, one of
    them is SIGKILLed inside a transaction and replaced, and a new interpreter verifies every
    record. Returns an exit code (70 when a worker or a record went wrong: the file is kept)."""
    import multiprocessing

    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="pheap-demo-")
        path = os.path.join(tmp, "demo.heap")
    total = workers * records
    victim, kill_at = workers - 1, records // 2
    print(f"pheap demo: {workers} worker process{'es' if workers > 1 else ''} share one heap "
          f"file, {path}")
    print("  its root holds a dict 'records', a list 'log' and a counter 'done'; each worker "
          f"opens\n  the file and adds {records:,} records, one transaction each: "
          "records[key] = value,\n  log.append(key), done.add(1)")
    with open_heap(path, "n") as h:
        h.root.update(records=h.dict(), log=h.list(), done=h.counter())
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_demo_worker, args=(path, w, records,
                                                    kill_at if w == victim else -1, None))
             for w in range(workers)]
    for p in procs:
        p.start()
    procs[victim].join()
    if procs[victim].exitcode != -signal.SIGKILL:
        return _demo_fail(f"worker {victim} ended with exit code {procs[victim].exitcode}, "
                          "not killed", path)
    report = ctx.SimpleQueue()
    procs[victim] = ctx.Process(target=_demo_worker, args=(path, victim, records, -1, report))
    procs[victim].start()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        return _demo_fail(f"workers failed with exit codes {failed}", path)
    resumed = report.get() if not report.empty() else -1
    print(f"  worker {victim} SIGKILLed itself inside its transaction for record {kill_at:,}; "
          f"a new\n  process took its place and resumed from the heap at record {resumed:,}")
    print(f"  {total:,} records ({3 * total:,} operations) by {workers + 1} processes in "
          f"{elapsed:.2f} s: {total / elapsed:,.0f} records/s, {3 * total / elapsed:,.0f} ops/s")
    if resumed != kill_at:
        return _demo_fail(f"the new process resumed at record {resumed}, not {kill_at}", path)
    print("  every process has closed the file; a new interpreter opens it and checks:")
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", DEMO_VERIFY, path, str(workers), str(records)],
                         env=env, capture_output=True, text=True)
    sys.stdout.write(res.stdout)
    if res.returncode != 0:
        sys.stdout.flush()
        sys.stderr.write(res.stderr)
        return _demo_fail("verification FAILED", path)
    st = os.stat(path)
    size = f"{_map.human(st.st_size)} ({_map.human(st.st_blocks * 512)} on disk)"
    if tmp is None:
        print(f"  the file: {path}, {size}; look inside: pheap dump {path} --depth 1")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"  the file: {size}, a temporary one, removed now (--path FILE keeps it)")
    print("  ok")
    return EXIT_OK
