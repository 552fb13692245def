"""Every example runs and prints what it promises."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def number(pattern: str, text: str) -> int:
    m = re.search(pattern, text, re.M)
    assert m, f"{pattern!r} not in:\n{text}"
    return int(m.group(1))


@pytest.mark.timeout(150)
def test_allocator_tour(tmp_path):
    path = str(tmp_path / "tour.heap")
    out = run("examples/allocator_tour.py", path)
    assert "WRONG" not in out and "0 wrong claims" in out
    p1, p2, p3 = (number(rf"^p{i} = malloc\(\d+\) -> (\d+)", out) for i in (1, 2, 3))
    p4, p5 = (number(rf"^p{i} = malloc\(\d+\) -> (\d+)", out) for i in (4, 5))
    assert p3 == p1 + 8 and p4 == p3 + 8  # 8 B slots side by side: p4 skips p2's 16 B slot
    assert p5 == p2  # the 16 B class reuses p2's freed slot
    a, b, c, d = (number(rf"^{x} = malloc\(\d+\) -> (\d+)", out) for x in "abcd")
    assert (b, c, d) == (a + 1008, b + 2008, b)  # end to end; d splits b's hole
    assert re.search(rf"^free\(b\) .* {b}:2008\. ", out, re.M)
    assert re.search(rf"^d = malloc.* {b}:512\* {b + 512}:1496\. {c}:1008\*", out, re.M)
    assert re.search(rf"^free\(d\) .* {a}:3016\. {c}:1008\* \|", out, re.M)  # coalesced
    assert re.search(r"^free\(c\) .*\)\s+\| wild", out, re.M)  # no block left: all wilderness
    touched = number(r"^\s+(\d+) KiB allocated \(growth", out)
    freed = number(r"^free\(big\): (\d+) KiB allocated", out)
    trimmed = number(r"^trim\(\): (\d+) KiB allocated", out)
    assert touched > 64 * 1024 and freed < touched - 60 * 1024 and trimmed < freed
    assert ": ok" in run("-m", "pheap.cli", "check", path)


@pytest.mark.timeout(150)
def test_fork_sharing():
    out = run("examples/fork_sharing.py", "3")
    assert "WRONG" not in out and "heap check: ok" in out
    assert "ok: counter: 1000000 cells written, of 1000000" in out
    assert "ok: dict: 3 reports from 3 other processes" in out
    assert "ok: matrix: sum 333332833333500000 == sum of i*i for i < 1000000" in out
    bands = re.findall(r"^  worker (\d) \(pid \d+\): rows (\d+)-(\d+), sum of squares (\d+)$",
                       out, re.M)
    assert [(int(w), int(lo), int(hi)) for w, lo, hi, _ in bands] == [
        (0, 0, 332), (1, 333, 665), (2, 666, 999)]
    for _, lo, hi, total in bands:  # each band's squares, as the worker summed them
        assert int(total) == sum(i * i for i in range(int(lo) * 1000, (int(hi) + 1) * 1000))


@pytest.mark.timeout(150)
def test_notes_commands(tmp_path):
    path = str(tmp_path / "notes.heap")
    notes = lambda *args: run("examples/notes.py", path, *args)
    assert notes("add", "buy milk", "--tag", "home", "--tag", "today") == "added note 1\n"
    assert notes("add", "write report", "--tag", "work") == "added note 2\n"
    assert notes("add", "call mum", "--tag", "home") == "added note 3\n"
    assert notes("done", "1") == "   1 [x] buy milk #home #today\n"
    assert notes("list") == "   2 [ ] write report #work\n   3 [ ] call mum #home\n"
    assert notes("list", "--all").splitlines()[0] == "   1 [x] buy milk #home #today"
    assert notes("tag", "home").splitlines() == ["   1 [x] buy milk #home #today",
                                                 "   3 [ ] call mum #home"]
    out = notes("stats")
    assert "3 notes, 2 open, 1 done, 3 tags;" in out and "consistent: ok; heap check: ok" in out
    res = subprocess.run([sys.executable, "examples/notes.py", path, "done", "9"], env=ENV,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 1 and "no note 9" in res.stderr
    assert "3 notes, 2 open" in notes("stats")


@pytest.mark.timeout(250)
def test_notes_survive_kill_9(tmp_path):
    path = str(tmp_path / "notes.heap")
    for rnd in range(1, 5):
        proc = subprocess.Popen([sys.executable, "examples/notes.py", path, "stress"],
                                stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        last = 0
        for line in proc.stdout:
            last = number(r"^committed note (\d+)$", line)
            if last >= 300 * rnd:
                break
        time.sleep(random.uniform(0, 0.005))  # somewhere in its cycle: mostly in a transaction
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # what it printed before it died
        proc.wait()
        proc.stdout.close()
        for line in rest.splitlines():
            last = number(r"^committed note (\d+)$", line)
        out = run("examples/notes.py", path, "stats")
        total = number(r"^(\d+) notes, ", out)
        # every committed note is there; one more if it died between a commit and its print
        assert last <= total <= last + 1, out
        assert f"{total} notes, {total} open, 0 done" in out and "consistent: ok" in out
    listed = run("examples/notes.py", path, "list").splitlines()
    assert len(listed) == total
    assert listed[-1].startswith(f"{total:4} [ ] stress note {total} ")
    assert ": ok" in run("-m", "pheap.cli", "check", path)


@pytest.mark.timeout(150)
def test_producer_consumer_separate_processes(tmp_path):
    path = str(tmp_path / "jobs.heap")
    cmd = [sys.executable, "examples/producer_consumer.py", path]
    start = lambda *args: subprocess.Popen(cmd + list(args), stdout=subprocess.PIPE, text=True,
                                           env=ENV, cwd=ROOT)
    consumers = [start("consume") for _ in range(2)]  # first: they wait for the jobs
    producer = start("produce", "3000")
    out = producer.communicate(timeout=120)[0]
    took = [number(r"^consumer \d+: took (\d+) jobs$", c.communicate(timeout=60)[0])
            for c in consumers]
    assert producer.returncode == 0 and [c.returncode for c in consumers] == [0, 0], out
    assert sum(took) == 3000, took
    assert "ok: each of the 3000 jobs taken exactly once" in out
    assert "ok: sum of squares 9004500500 == n(n+1)(2n+1)/6" in out
    assert "heap check: ok" in out and "WRONG" not in out
    again = subprocess.run(cmd + ["produce", "10"], env=ENV, capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    assert again.returncode == 1 and "was used before" in again.stderr


@pytest.mark.timeout(150)
def test_producer_consumer_demo():
    out = run("examples/producer_consumer.py", "demo", "2000")
    took = [int(n) for n in re.findall(r"^consumer \d+: took (\d+) jobs$", out, re.M)]
    assert len(took) == 2 and sum(took) == 2000, out
    assert "ok: each of the 2000 jobs taken exactly once" in out
    assert "ok: sum of squares 2668667000 == n(n+1)(2n+1)/6" in out and "WRONG" not in out


@pytest.mark.timeout(150)
def test_pool_numpy():
    out = run("examples/pool_numpy.py", "--mb", "2", "--workers", "2")
    assert "2 arrays of 250,000 float64 (2 MB each) in a memfd heap; 8 tasks for a spawn pool " \
           "of 2 workers" in out
    assert re.search(r"^  handles \(zero-copy\): +\d+\.\d+ s$", out, re.M)  # timings: printed,
    assert re.search(r"^  pickled arrays: +\d+\.\d+ s +\(\d+\.\dx as long; 4 MB sent and 2 MB "
                     r"sent back each time\)$", out, re.M)  # not judged
    assert "ok: the heap's result equals the parent's np.hypot for all 250,000 elements" in out
    assert "ok: the pickled way's result too" in out
    assert "ok: the workers' partial sums add up" in out
    assert "heap check: ok" in out and "WRONG" not in out


@pytest.mark.timeout(150)
def test_demo_command():
    out = run("-m", "pheap.cli", "demo", "--workers", "2", "--records", "2000")
    assert "verified 4000 records" in out and "ok" in out
