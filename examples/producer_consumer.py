"""Unrelated processes cooperate through a heap file: a producer fills a shared queue, consumers
started on their own take jobs from it, and shared counters add up the work.

    python3 examples/producer_consumer.py FILE consume        (as many as you like, any time)
    python3 examples/producer_consumer.py FILE produce N
    python3 examples/producer_consumer.py demo [N]            (1 producer + 2 consumers)

Use a new FILE for each run. No process is forked from another: each one opens FILE and finds
the queue and counters in ``h.root`` with ``setdefault``, whoever comes first making them. A
consumer takes jobs (numbers) until it meets the sentinel ``None``, which it puts back for the
next consumer. The producer then waits until every job is done and checks that each was taken
exactly once and that the sum of squares the consumers added up is right; it exits 1 if not.
"""

import os
import subprocess
import sys
import tempfile
import time

import pheap


def say(line: str) -> None:
    """Print a line in one write, so that processes sharing a terminal never mix lines."""
    print(line + "\n", end="", flush=True)


def shared(path: str):
    h = pheap.open(path, "c")  # created atomically by the first process to get here
    root = h.root
    return h, root.setdefault("jobs", h.queue()), root.setdefault("done", h.counter()), \
        root.setdefault("total", h.counter()), root.setdefault("taken", h.list())


def consume(path: str) -> int:
    h, jobs, done, total, taken = shared(path)
    mine = 0
    while (job := jobs.get()) is not None:  # waits while the queue is empty
        taken.append(job)
        total.add(job * job)
        done.add(1)  # last: when `done` reaches N, every job's record is in
        mine += 1
    jobs.put(None)  # the sentinel, for the next consumer
    say(f"consumer {os.getpid()}: took {mine} jobs")
    return 0


def produce(path: str, n: int) -> int:
    h, jobs, done, total, taken = shared(path)
    if done.value or len(taken):
        sys.exit(f"{path} was used before: give a new file")
    t = time.perf_counter()
    for job in range(1, n + 1):
        jobs.put(job)
    jobs.put(None)
    say(f"producer {os.getpid()}: put {n} jobs and the sentinel; waiting for consumers")
    while done.value < n:
        time.sleep(0.01)
    say(f"all {n} jobs done in {time.perf_counter() - t:.2f} s")
    checks = [(sorted(taken) == list(range(1, n + 1)), f"each of the {n} jobs taken exactly once"),
              (total.value == n * (n + 1) * (2 * n + 1) // 6,
               f"sum of squares {total.value} == n(n+1)(2n+1)/6")]
    for ok, text in checks:
        say(f"{'ok' if ok else 'WRONG'}: {text}")
    h.check()
    say("heap check: ok")
    return 0 if all(ok for ok, _ in checks) else 1


def demo(n: int) -> int:
    path = os.path.join(tempfile.mkdtemp(), "jobs.heap")
    me = [sys.executable, os.path.abspath(__file__), path]
    say(f"demo: 2 consumers, then 1 producer of {n} jobs, each a process of its own")
    procs = [subprocess.Popen(me + ["consume"]) for _ in range(2)]
    procs.append(subprocess.Popen(me + ["produce", str(n)]))
    codes = [p.wait() for p in procs]
    os.unlink(path)
    return max(codes)


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["demo"]:
        return demo(int(args[1]) if len(args) > 1 else 10_000)
    if len(args) == 2 and args[1] == "consume":
        return consume(args[0])
    if len(args) == 3 and args[1] == "produce":
        return produce(args[0], int(args[2]))
    sys.exit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    sys.exit(main())
