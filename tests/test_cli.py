"""Tests of pheap.cli (and pheap._map, which draws for it): every command on a real heap file,
the exit-code table against every command, user mistakes as one line naming the path, a lock
held by another process (bounded waits naming its pid, --snapshot), a closed pipe, damaged heaps
and a pending journal, the map as text, SVG and PNG, the demo, and the module run as a program.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

import pheap
from conftest import reap
from pheap import _map, cli, journal
from pheap import format as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
MIB = 1 << 20
SVG = "{http://www.w3.org/2000/svg}"
CODES = {code for code, _, _ in cli.EXIT_CODES}


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def poke(path: str, off: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<Q", value))


def peek(path: str, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack("<Q", f.read(8))[0]


def make_heap(path: str) -> dict:
    """The known heap: blocks A..F of 1000 bytes with B and D free, ten 24-byte slots with
    four of them freed again, a root (A) and a transaction log block."""
    with pheap.open(path, "n", size=MIB) as h:
        offs = {k: h.malloc(1000) for k in "ABCDEF"}
        for k, p in offs.items():
            h.write(p, k.encode() * 1000)
        small = [h.malloc(24) for _ in range(10)]
        for p in small[::3]:
            h.free(p)
        h.free(offs["B"])
        h.free(offs["D"])
        h.root_offset = offs["A"]
        with h.transaction():  # leaves a transaction log block behind
            h.write(offs["C"], b"C")
    return offs


@pytest.fixture
def heap_file(tmp_path):
    path = str(tmp_path / "cli.heap")
    return path, make_heap(path)


def known(path: str) -> tuple[list, int, pheap.HeapStats]:
    """(blocks with slots, txlog offset, stats) of a heap, through the public API."""
    with pheap.open(path, "r") as h:
        return list(h.walk(slots=True)), peek(path, F.H_TXLOG * 8), h.stats()


def damage_bins(path: str, offs: dict) -> None:
    """Bin-only damage: D's prev link (D is the head of its bin, so prev must be 0)."""
    poke(path, offs["D"] - 8 + 16, offs["A"] - 8)


def damage_tags(path: str, offs: dict) -> None:
    """Tag damage that no rebuild can fix: C's header claims 16 bytes."""
    poke(path, offs["C"] - 8, 16)


def crash_inside_an_operation(path: str) -> None:
    """A child SIGKILLed in the middle of a malloc: its undo records stay in the journal."""
    pid = os.fork()
    if pid == 0:
        try:
            journal.set_crashpoint("write", 5)  # the 3rd journaled word of the next operation
            with pheap.open(path, "w") as h:
                h.malloc(5000)
        finally:
            os._exit(3)
    assert reap(pid) == -signal.SIGKILL
    assert peek(path, F.J_STATE * 8) != 0


@contextlib.contextmanager
def lock_held(path: str, release_after: float | None = None):
    """A forked child holds the heap lock (until the block ends, or for ``release_after``
    seconds); yields its pid. The child is always reaped."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.close(ready_r)
            os.close(stop_w)
            with pheap.open(path, "w") as h, h.lock():
                os.write(ready_w, b"x")
                if release_after is None:
                    os.read(stop_r, 1)  # until the parent writes or closes
                else:
                    time.sleep(release_after)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(stop_r)
    try:
        assert os.read(ready_r, 1) == b"x", "the child did not take the lock"
        yield pid
    finally:
        os.close(stop_w)
        os.close(ready_r)
        assert reap(pid) == 0


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_about(err: str, path: str) -> bool:
    """Whether stderr is exactly one line, ``pheap: PATH: ...``."""
    return err.count("\n") == 1 and err.startswith(f"pheap: {path}: ")


# ---------------------------------------------------------------------------------------------
# The exit-code table: one, documented twice, true for every command
# ---------------------------------------------------------------------------------------------


def test_exit_code_table_in_the_docstring_is_the_table_in_the_code():
    doc = cli.__doc__
    rows = re.findall(r"^(\d+)\s+([a-z-]+)\s+(.*(?:\n {22}.*)*)", doc, re.M)
    assert [(int(c), n) for c, n, _ in rows] == [(c, n) for c, n, _ in cli.EXIT_CODES]
    for (_, _, text), (_, _, meaning) in zip(rows, cli.EXIT_CODES, strict=True):
        assert " ".join(text.split()) == meaning
    constants = {v for k, v in vars(cli).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert constants == CODES


def test_help_prints_the_table(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "exit codes" in out
    for c, name, _ in cli.EXIT_CODES:
        assert re.search(rf"^  {c}\s+{name}\s", out, re.M), (c, name)
    for name, *_ in cli.COMMANDS:
        assert name in out


SCENARIOS = ["sound", "missing", "directory", "fifo", "not-a-heap", "version", "truncated",
             "busy", "pending", "bad-journal", "bins", "tags", "bad-argument"]
COMMAND_ARGS = {"info": ["info"], "stats": ["stats"], "check": ["check"], "walk": ["walk"],
                "map": ["map"], "dump": ["dump"], "repair": ["repair"],
                "dry-run": ["repair", "--dry-run"], "gc": ["gc"], "gc-dry-run": ["gc", "--dry-run"]}
#: commands that wait for the lock (--timeout, default 10 s) rather than not at all
WAITING = ("info", "stats", "check", "walk", "map", "dump", "gc", "gc-dry-run")
ALL = dict.fromkeys(COMMAND_ARGS)


def expect(**codes: int) -> dict:
    return {cmd: codes.get(cmd.replace("-", "_"), codes.get("others")) for cmd in ALL}


#: scenario -> command -> exit code, as the table in cli's docstring says
EXPECTED = {
    "sound": expect(others=0),
    "missing": expect(others=3),
    "directory": expect(others=3),
    "fifo": expect(others=3),
    "not-a-heap": expect(others=3),
    "version": expect(others=3),
    "truncated": expect(others=1, repair=4, dry_run=4),
    "busy": expect(others=6),
    "pending": expect(others=5, repair=0, gc=0),  # gc opens read-write: undoes it, like any writer
    "bad-journal": expect(others=1, repair=0),
    "bins": expect(others=0, check=1, dry_run=1),  # only check looks at the bins
    "tags": expect(info=0, dump=0, others=1, repair=4, dry_run=4),  # dump: no objects to read
    "bad-argument": expect(others=2),
}


@pytest.fixture
def scenario_file(request, tmp_path):
    """A path in the state the scenario names (a holder process for 'busy')."""
    name = request.param
    path = str(tmp_path / "s.heap")
    offs = make_heap(path) if name not in ("missing", "directory", "fifo", "not-a-heap") else {}
    if name == "directory":
        os.mkdir(path)
    elif name == "fifo":
        os.mkfifo(path)
    elif name == "not-a-heap":
        with open(path, "wb") as f:
            f.write(b"hello world\n" * 500)
    elif name == "version":
        poke(path, F.H_VERSION * 8, 9)
    elif name == "truncated":
        os.truncate(path, MIB // 2)
    elif name in ("pending", "bad-journal"):
        crash_inside_an_operation(path)
        if name == "bad-journal":
            check_word = (F.J_RECORDS + 2) * 8
            poke(path, check_word, peek(path, check_word) ^ 1)
    elif name == "bins":
        damage_bins(path, offs)
    elif name == "tags":
        damage_tags(path, offs)
    if name == "busy":
        with lock_held(path) as pid:
            yield path, pid
    else:
        yield path, None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario_file", SCENARIOS, indirect=True)
@pytest.mark.parametrize("command", list(COMMAND_ARGS))
def test_every_command_exits_as_the_table_says(scenario_file, command, capsys, request):
    path, holder = scenario_file
    scenario = request.node.callspec.params["scenario_file"]
    argv = COMMAND_ARGS[command] + [path]
    if scenario == "bad-argument":
        argv = COMMAND_ARGS[command] + ["--no-such-option", path]
    elif scenario == "busy" and command in WAITING:
        argv = COMMAND_ARGS[command] + ["--timeout", "0.3", path]
    t0 = time.monotonic()
    code, out, err = run(capsys, *argv)
    took = time.monotonic() - t0
    want = EXPECTED[scenario][command]
    assert code == want, (scenario, command, out, err)
    assert code in CODES
    assert "Traceback" not in err
    planned = command == "dry-run" and code in (1, 4, 5)  # a plan on stdout, not an error
    if planned:
        assert out.startswith(f"{path}: dry run, nothing changed") and err == ""
    elif code in (2, 3, 5, 6) or code == 1 and command not in ("walk", "map"):
        assert err.count("\n") == 1, err  # one line
    if code in (3, 5, 6) and not planned:
        assert err.startswith(f"pheap: {path}: "), err
    if scenario == "busy":
        assert f"pid {holder}" in err and took < 0.3 + 2  # the timeout, or no wait (repair)


# ---------------------------------------------------------------------------------------------
# Sound heaps: what each command prints
# ---------------------------------------------------------------------------------------------


def test_info(heap_file, capsys):
    path, offs = heap_file
    code, out, err = run(capsys, "info", path)
    assert code == 0 and err == ""
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["path"] == path
    assert fields["capacity"] == f"{MIB} (1.0 MiB)"
    assert fields["root"] == str(offs["A"])
    assert fields["format_version"] == "2"
    assert fields["journal_pending"] == "no"
    with pheap.open(path, "r") as h:
        info = h.info()
    assert fields["uuid"] == info["uuid"]
    created = datetime.datetime.fromisoformat(fields["created"])
    assert abs(created.timestamp() - info["created_ns"] / 1e9) < 1  # ISO, not nanoseconds
    assert created.tzinfo is not None


def test_info_json(heap_file, capsys):
    path, offs = heap_file
    code, out, _ = run(capsys, "info", "--json", path)
    assert code == 0
    info = json.loads(out)
    assert info["root"] == offs["A"] and info["capacity"] == MIB
    assert info["path"] == path and info["snapshot"] is False
    assert isinstance(info["created_ns"], int)  # nanoseconds kept in JSON, and ISO beside them
    assert datetime.datetime.fromisoformat(info["created"]).timestamp() == \
        pytest.approx(info["created_ns"] / 1e9, abs=1)
    assert info["file_bytes"] == os.path.getsize(path) and info["disk_bytes"] > 0
    assert info["readonly"] is True  # info opens read-only


def test_paths_are_printed_as_given(heap_file, capsys, monkeypatch):
    path, _ = heap_file
    monkeypatch.chdir(os.path.dirname(path))
    code, out, _ = run(capsys, "info", "cli.heap")
    assert code == 0 and out.startswith("path             cli.heap\n")
    code, out, _ = run(capsys, "check", "cli.heap")
    assert code == 0 and out.startswith("cli.heap: ok")
    code, _, err = run(capsys, "check", "./nope.heap")
    assert code == 3 and err == "pheap: ./nope.heap: No such file or directory\n"
    os.mkdir("adir")
    code, _, err = run(capsys, "stats", "adir")
    assert code == 3 and err == "pheap: adir: is a directory, not a heap file\n"


def test_stats(heap_file, capsys):
    path, _ = heap_file
    _, _, st = known(path)
    code, out, _ = run(capsys, "stats", path)
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["used"].startswith(f"{st.used_blocks} allocations ({st.used_blocks - 6} "
                                    "blocks, 6 slots)")
    assert lines["runs"].startswith(f"1 run, 4.0 KiB: 6 slots used, {st.free_slots} free")
    assert lines["free"].startswith(f"{st.free_blocks} blocks")
    assert lines["fragmentation"] == f"{st.fragmentation:.1%}"
    code, out, _ = run(capsys, "stats", "--json", path)
    assert code == 0
    s = json.loads(out)
    assert {k: s[k] for k in st._fields} == st._asdict()
    assert s["used_slots"] == 6 and s["runs"] == 1 and s["snapshot"] is False
    assert s["metadata_bytes"] == st.metadata_bytes


def test_check_sound(heap_file, capsys):
    path, _ = heap_file
    code, out, err = run(capsys, "check", path)
    assert code == 0 and err == ""
    assert out.startswith(f"{path}: ok (") and "6 used slots in 1 run" in out
    code, out, err = run(capsys, "check", "-q", path)
    assert code == 0 and out == "" and err == ""


def test_check_progress(heap_file, capsys):
    path, _ = heap_file
    code, _, err = run(capsys, "check", "--progress", path)
    assert code == 0
    assert f"\rchecking {path}: 100%" in err and err.endswith("\n")
    code, _, err = run(capsys, "check", path)  # stderr is not a terminal here: no progress
    assert code == 0 and err == ""


def walk_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def test_walk(heap_file, capsys):
    path, offs = heap_file
    blocks, txlog, _ = known(path)
    top = [b for b in blocks if b.kind != "slot"]
    code, out, _ = run(capsys, "walk", path)
    assert code == 0
    rows = walk_rows(out)
    assert [(int(r[0]), int(r[1]), r[2] == "free", r[3]) for r in rows] == \
        [tuple(b) for b in top]
    by_off = {int(r[0]): " ".join(r[4:]) for r in rows}
    assert by_off[offs["A"]] == "(root)"
    assert by_off[txlog] == "(transaction log)"
    run_off = next(b.offset for b in top if b.kind == "run")
    assert by_off[run_off] == "24-byte slots, 6/167 used"

    code, out, _ = run(capsys, "walk", "--free", path)
    assert [int(r[0]) for r in walk_rows(out)] == [b.offset for b in top if b.free]
    code, out, _ = run(capsys, "walk", "--limit", "2", path)
    assert code == 0 and [int(r[0]) for r in walk_rows(out)] == [offs["A"], offs["B"]]


def test_walk_slots_and_json(heap_file, capsys):
    path, _ = heap_file
    blocks, txlog, _ = known(path)
    code, out, _ = run(capsys, "walk", "--slots", path)
    assert code == 0
    rows = walk_rows(out)
    assert [(int(r[0]), r[3]) for r in rows] == [(b.offset, b.kind) for b in blocks]
    slot_lines = [line for line in out.splitlines() if line.split()[3] == "slot"]
    assert len(slot_lines) == 167 and all(line.startswith("  ") for line in slot_lines)
    code, out, _ = run(capsys, "walk", "--slots", "--free", path)
    assert [int(r[0]) for r in walk_rows(out)] == [b.offset for b in blocks if b.free]

    code, out, _ = run(capsys, "walk", "--json", "--slots", path)
    assert code == 0
    items = [json.loads(line) for line in out.splitlines()]  # JSON lines
    assert [(d["offset"], d["size"], d["free"], d["kind"]) for d in items] == \
        [tuple(b) for b in blocks]
    run_item = next(d for d in items if d["kind"] == "run")
    assert (run_item["slot_size"], run_item["slots"], run_item["used_slots"]) == (24, 167, 6)
    assert next(d for d in items if d["offset"] == txlog)["role"] == "txlog"


def test_walk_stops_at_tag_damage_after_printing_what_it_can(heap_file, capsys):
    path, offs = heap_file
    damage_tags(path, offs)
    code, out, err = run(capsys, "walk", path)
    assert code == 1
    assert [int(r[0]) for r in walk_rows(out)] == [offs["A"], offs["B"]]
    assert err.startswith(f"pheap: {path}: DAMAGED: offset {offs['C'] - 8}: ")
    assert "the walk stops there" in err and err.count("\n") == 1


def test_version_and_usage(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and pheap.__version__ in out
    assert run(capsys)[0] == 2
    code, _, err = run(capsys, "check")
    assert code == 2 and err.count("\n") == 1 and "FILE" in err
    assert run(capsys, "frobnicate", "x")[0] == 2


@pytest.mark.parametrize("argv, words", [
    (["map", "--width", "abc"], "argument --width: 'abc' is not a whole number"),
    (["map", "--width", "5"], "argument --width: must be at least 10, not 5"),
    (["walk", "--limit", "0"], "argument --limit: must be at least 1, not 0"),
    (["info", "--timeout", "soon"], "argument --timeout: 'soon' is not a number of seconds"),
    (["info", "--timeout", "-1"], "argument --timeout: must be a finite number of seconds"),
    (["stats", "--timeout", "nan"], "argument --timeout: must be a finite number of seconds"),
    (["check", "--timeout", "1", "--snapshot"], "not allowed with argument"),
    (["demo", "--workers", "0"], "argument --workers: must be at least 1, not 0"),
])
def test_bad_arguments_are_one_line(capsys, tmp_path, argv, words):
    code, out, err = run(capsys, *argv, *([] if argv[0] == "demo" else [str(tmp_path / "x")]))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and words in err, err
    assert "_" not in err.split(":")[1]  # no Python names (`invalid _positive value`)


def test_default_timeouts():
    p = cli.build_parser()
    for cmd in ("info", "stats", "check", "walk", "map", "dump", "gc"):
        assert p.parse_args([cmd, "f"]).timeout == 10.0
    assert p.parse_args(["repair", "f"]).timeout == 0.0  # repair waits only when asked


# ---------------------------------------------------------------------------------------------
# User mistakes: one line naming the path, exit 3, no traceback
# ---------------------------------------------------------------------------------------------

INSPECT = ["info", "stats", "check", "walk", "map", "dump"]


@pytest.mark.parametrize("command", INSPECT + ["repair", "gc"])
@pytest.mark.parametrize("content", [b"", b"hello world\n" * 500, b"\x93PHEAP\r\n" + bytes(5000)])
def test_not_a_heap(tmp_path, capsys, command, content):
    path = str(tmp_path / "foreign.bin")
    with open(path, "wb") as f:
        f.write(content)
    code, out, err = run(capsys, command, path)
    assert code == 3, (out, err)
    assert one_line_about(err, path)
    assert file_bytes(path) == content


@pytest.mark.parametrize("command", INSPECT + ["repair", "gc"])
def test_wrong_version(heap_file, capsys, command):
    path, _ = heap_file
    poke(path, F.H_VERSION * 8, 9)
    before = file_bytes(path)
    code, _, err = run(capsys, command, path)
    assert code == 3 and "version 9" in err and one_line_about(err, path)
    assert file_bytes(path) == before


@pytest.mark.parametrize("argv", [[c] for c in INSPECT] + [["info", "--snapshot"],
                                                           ["repair"], ["gc"]])
def test_directory_and_fifo(tmp_path, capsys, argv):
    d = str(tmp_path / "adir")
    os.mkdir(d)
    code, _, err = run(capsys, *argv, d)
    assert code == 3 and err == f"pheap: {d}: is a directory, not a heap file\n"
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    code, _, err = run(capsys, *argv, fifo)  # returns: nothing opens a FIFO and waits
    assert code == 3 and one_line_about(err, fifo) and "not a regular file" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["info", "check", "repair"])
def test_permission_denied(heap_file, command):
    """Run as an unprivileged user when we are root (root reads any file); else chmod 000."""
    path, _ = heap_file
    os.chmod(path, 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(r)
            sys.stderr = os.fdopen(w, "w")
            sys.stdout = open(os.devnull, "w")
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            code = cli.main([command, path])
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    assert reap(pid) == 3
    assert err == f"pheap: {path}: Permission denied\n"


# ---------------------------------------------------------------------------------------------
# Another process holds the lock
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_inspection_commands_time_out_naming_the_holder(heap_file, capsys):
    path, _ = heap_file
    with lock_held(path) as pid:
        for cmd in INSPECT:
            t0 = time.monotonic()
            code, out, err = run(capsys, cmd, "--timeout", "0.8", path)
            took = time.monotonic() - t0
            assert code == 6, (cmd, err)
            assert 0.7 < took < 0.8 + 2, (cmd, took)
            assert one_line_about(err.splitlines()[-1] + "\n", path)
            assert f"waiting up to 0.8 s for the heap lock (pid {pid} holds it)" in err
            assert "busy: heap lock not acquired within 0.8 s" in err  # the whole wait
            assert f"pid {pid} holds it" in err
            assert f"`pheap {cmd} --snapshot {path}`" in err
            assert out == ""


@pytest.mark.timeout(60)
def test_snapshot_inspects_a_held_heap_without_waiting(heap_file, capsys):
    path, _ = heap_file
    blocks, _, st = known(path)
    with lock_held(path):
        for cmd in INSPECT:
            t0 = time.monotonic()
            code, out, err = run(capsys, cmd, "--snapshot", path)
            assert code == 0, (cmd, err)
            assert time.monotonic() - t0 < 5
            assert "snapshot" in err and "mid-operation" in err and err.count("\n") == 1
        code, out, _ = run(capsys, "stats", "--json", "--snapshot", path)
        assert json.loads(out)["used_blocks"] == st.used_blocks
        assert json.loads(out)["snapshot"] is True
        code, out, _ = run(capsys, "walk", "--snapshot", path)
        assert len(out.splitlines()) == sum(b.kind != "slot" for b in blocks)


@pytest.mark.timeout(60)
def test_an_inspection_waits_for_a_holder_that_lets_go(heap_file, capsys):
    path, _ = heap_file
    with lock_held(path, release_after=1.5) as pid:
        t0 = time.monotonic()
        code, out, err = run(capsys, "info", "--timeout", "30", path)
        assert code == 0 and out.startswith("path")
        assert 1.0 < time.monotonic() - t0 < 20
        assert err == (f"pheap: {path}: waiting up to 30 s for the heap lock (pid {pid} holds "
                       "it)\n")


@pytest.mark.timeout(60)
def test_repair_waits_only_with_timeout(heap_file, capsys):
    path, offs = heap_file
    damage_bins(path, offs)
    with lock_held(path) as pid:
        t0 = time.monotonic()
        code, _, err = run(capsys, "repair", path)
        assert code == 6 and time.monotonic() - t0 < 1.5
        assert f"pid {pid} holds it" in err and "--timeout SECONDS waits for it" in err
        t0 = time.monotonic()
        code, _, err = run(capsys, "repair", "--timeout", "0.7", path)
        assert code == 6 and 0.6 < time.monotonic() - t0 < 5
        assert f"pid {pid} holds it" in err
    assert run(capsys, "repair", path)[0] == 0  # free again


# ---------------------------------------------------------------------------------------------
# A closed pipe, and other ways out
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_closed_pipe_ends_quietly(tmp_path):
    path = str(tmp_path / "many.heap")
    with pheap.open(path, "n", size=4 * MIB) as h:
        for _ in range(6000):
            h.malloc(8)  # 6000 slot rows of --slots: far more than a pipe buffer holds
    proc = subprocess.Popen([sys.executable, "-m", "pheap.cli", "walk", "--slots", path],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()
        proc.stdout.close()  # `| head -n 1`
        err = proc.stderr.read()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert first.split()[3] == b"run"
    assert code == cli.EXIT_PIPE == 141
    assert err == b""  # no traceback, no "Exception ignored" at exit


@pytest.mark.timeout(60)
def test_a_pipe_closed_before_a_short_output_ends_quietly(heap_file):
    """The output fits the buffer, so it fails at the final flush, and the interpreter would
    flush it again at exit and complain ("Exception ignored ... BrokenPipeError")."""
    path, _ = heap_file
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes anything
    try:
        res = subprocess.run([sys.executable, "-m", "pheap.cli", "info", path], env=ENV,
                             stdout=w, stderr=subprocess.PIPE, timeout=50)
    finally:
        os.close(w)
    assert res.returncode == 141
    assert res.stderr == b""


def test_a_bug_prints_its_traceback_and_exits_70(heap_file, capsys, monkeypatch):
    path, _ = heap_file

    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pheap.Heap, "info", broken)
    code, _, err = run(capsys, "info", path)
    assert code == 70
    assert "Traceback" in err and "RuntimeError: a bug" in err and "please report" in err


def test_ctrl_c_exits_130(heap_file, capsys, monkeypatch):
    path, _ = heap_file

    def interrupted(self, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pheap.Heap, "check", interrupted)
    code, _, err = run(capsys, "check", path)
    assert code == 130 and err.endswith("pheap: interrupted\n") and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# The map: text, SVG, PNG
# ---------------------------------------------------------------------------------------------


def test_map_text(heap_file, capsys, monkeypatch):
    path, _ = heap_file
    monkeypatch.delenv("COLUMNS", raising=False)
    code, out, _ = run(capsys, "map", path)
    assert code == 0
    lines = out.splitlines()
    assert re.fullmatch(rf"{re.escape(path)}: 1\.0 MiB mapping, \d+ bytes per character", lines[0])
    rows = lines[1:17]
    assert len(rows) == 16  # the default
    assert all(len(r) == 80 and r[0] == r[-1] == "|" for r in rows[:-1])  # fits 80 columns
    body = "".join(r[1:-1] for r in rows)
    assert body.startswith("MMMMM")  # header page and control block
    assert body.endswith("MMMMM")  # page map and allocation bitmap
    for ch in "#.rJ ":
        assert ch in body, ch
    assert body.index("#") < body.index("r") < body.index("J")  # blocks, run, log: address order
    assert "'r' run, slots mostly free" in out and "fragmentation" in out
    assert all(len(line) <= 80 for line in lines[1:])

    code, out, _ = run(capsys, "map", "--width", "40", "--rows", "3", path)
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert code == 0 and len(rows) == 3 and {len(r) for r in rows[:-1]} == {42}
    monkeypatch.setenv("COLUMNS", "60")
    code, out, _ = run(capsys, "map", path)
    assert {len(r) for r in out.splitlines() if r.startswith("|")} <= {60}


def svg_rects(svg_path: str) -> tuple[ET.Element, list[ET.Element]]:
    root = ET.parse(svg_path).getroot()  # parses: well-formed XML
    assert root.tag == f"{SVG}svg"
    blocks = next(g for g in root.iter(f"{SVG}g") if g.get("id") == "blocks")
    return root, blocks.findall(f"{SVG}rect")


def test_map_svg_has_a_rectangle_per_block(heap_file, capsys, tmp_path):
    path, offs = heap_file
    blocks, txlog, st = known(path)
    top = [b for b in blocks if b.kind != "slot"]
    out_path = str(tmp_path / "heap.svg")
    code, out, err = run(capsys, "map", path, "-o", out_path)
    assert code == 0 and err == ""
    assert out == f"{path}: map written to {out_path} ({len(top)} blocks)\n"
    root, rects = svg_rects(out_path)
    offsets: dict[str, set[int]] = {}
    for r in rects:
        offsets.setdefault(r.get("class"), set()).add(int(r.get("data-offset")))
    assert offsets["used"] == {b.offset for b in top if not b.free and b.kind == "block"
                               and b.offset != txlog}
    assert offsets["free"] == {b.offset for b in top if b.free}
    assert offsets["run"] | offsets["run-free"] == {b.offset for b in top if b.kind == "run"}
    assert offsets["journal"] == {txlog}
    assert len(offsets["meta"]) == 4  # header, control block, page map, allocation bitmap
    assert len(offsets["wild"]) == 1
    assert "damaged" not in offsets
    # The widths add up to the whole mapping, at one scale.
    scale = 1024 / (MIB / 32)
    assert sum(float(r.get("width")) for r in rects) == pytest.approx(MIB * scale, rel=1e-6)
    # The run's used share is its fill: 6 of 167 slots.
    run_used = sum(float(r.get("width")) for r in rects if r.get("class") == "run")
    assert run_used == pytest.approx(4096 * 6 / 167 * scale, abs=8 * scale)
    text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert f"pheap map of {path}" in text
    assert "capacity 1.0 MiB" in text and f"fragmentation {st.fragmentation:.1%}" in text
    assert "1 run (6/167 slots used" in text
    for _, _, legend in _map.KINDS.values():
        assert legend in text
    tips = [r.find(f"{SVG}title").text for r in rects if r.get("class") == "used"]
    assert f"used block at {offs['A']}: 1008 bytes (root)" in tips


def test_map_svg_of_many_blocks_is_drawn_at_pixel_resolution(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "many.heap")
    with pheap.open(path, "n", size=MIB) as h:
        ps = [h.malloc(600) for _ in range(400)]
        for p in ps[::2]:
            h.free(p)
    monkeypatch.setattr(_map, "MAX_EXACT", 50)
    out_path = str(tmp_path / "many.svg")
    code, out, _ = run(capsys, "map", path, "-o", out_path, "--width", "300", "--rows", "4")
    assert code == 0 and "drawn at pixel resolution" in out
    _, rects = svg_rects(out_path)
    assert len(rects) <= 300 * 4
    assert {r.get("class") for r in rects} >= {"meta", "used", "free", "wild"}
    assert sum(float(r.get("width")) for r in rects) == pytest.approx(300 * 4, rel=0.01)


def test_map_of_a_damaged_heap_draws_up_to_the_damage(heap_file, capsys, tmp_path):
    path, offs = heap_file
    damage_tags(path, offs)
    out_path = str(tmp_path / "d.svg")
    code, out, err = run(capsys, "map", path, "-o", out_path)
    assert code == 1 and "drawn up to there" in err
    _, rects = svg_rects(out_path)
    damaged = [r for r in rects if r.get("class") == "damaged"]
    assert damaged and int(damaged[0].get("data-offset")) == offs["C"] - 8
    code, out, err = run(capsys, "map", path)
    assert code == 1 and "!" in out


def test_map_png(heap_file, capsys, tmp_path):
    """With Pillow: a PNG of the scene; without: one clear line suggesting .svg, exit 2."""
    path, _ = heap_file
    out_path = str(tmp_path / "heap.png")
    code, out, err = run(capsys, "map", path, "-o", out_path)
    if _map.have_png():
        from PIL import Image

        assert code == 0 and err == "" and "map written" in out
        with Image.open(out_path) as img:
            assert img.format == "PNG" and img.size[0] == 2 * _map.MARGIN + _map.LABEL_WIDTH + 1024
            rgb = img.convert("RGB")
            colours = {rgb.getpixel((x, y)) for x in range(0, img.size[0], 7)
                       for y in range(0, img.size[1], 3)}
        for kind in ("meta", "used", "free", "journal", "wild"):
            hexa = _map.KINDS[kind][1]
            assert tuple(int(hexa[i:i + 2], 16) for i in (1, 3, 5)) in colours, kind
    else:
        assert_no_pillow_error(code, out, err, out_path)


def assert_no_pillow_error(code, out, err, out_path):
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Pillow" in err and ".svg" in err and out_path in err
    assert not os.path.exists(out_path)


def test_map_png_without_pillow(heap_file, capsys, tmp_path, monkeypatch):
    path, _ = heap_file
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    out_path = str(tmp_path / "heap.png")
    assert_no_pillow_error(*run(capsys, "map", path, "-o", out_path), out_path)


def test_map_output_mistakes(heap_file, capsys, tmp_path):
    path, _ = heap_file
    code, _, err = run(capsys, "map", path, "-o", str(tmp_path / "x.gif"))
    assert code == 2 and "unknown picture format '.gif'" in err and err.count("\n") == 1
    bad = str(tmp_path / "no" / "such" / "dir.svg")
    code, _, err = run(capsys, "map", path, "-o", bad)
    assert code == 3 and err == f"pheap: {bad}: No such file or directory\n"


# ---------------------------------------------------------------------------------------------
# Damage and repair
# ---------------------------------------------------------------------------------------------


def test_check_damaged_bins(heap_file, capsys):
    path, offs = heap_file
    damage_bins(path, offs)
    before = file_bytes(path)
    code, out, err = run(capsys, "check", path)
    assert code == 1 and out == ""
    assert err.startswith(f"pheap: {path}: DAMAGED: offset {offs['D'] - 8}")
    assert f"`pheap repair --dry-run {path}` tells whether repair can fix it" in err
    assert file_bytes(path) == before  # check never writes


def test_repair_sound_heap_changes_nothing(heap_file, capsys):
    path, _ = heap_file
    before = file_bytes(path)
    code, out, _ = run(capsys, "repair", path)
    assert code == 0 and out == f"{path}: sound, nothing to repair\n"
    assert file_bytes(path) == before
    assert not os.path.exists(path + ".bak")


def test_repair_dry_run_changes_nothing(heap_file, capsys):
    path, offs = heap_file
    damage_bins(path, offs)
    before = file_bytes(path)
    code, out, _ = run(capsys, "repair", "--dry-run", path)
    assert code == 1
    assert out.startswith(f"{path}: dry run, nothing changed. Repair would:\n")
    assert "rebuild the bins" in out and "which are sound" in out
    assert file_bytes(path) == before
    assert not os.path.exists(path + ".bak")
    assert run(capsys, "check", path)[0] == 1  # still damaged


def test_repair_with_backup_fixes_bin_damage(heap_file, capsys):
    path, offs = heap_file
    damage_bins(path, offs)
    damaged = file_bytes(path)
    code, out, err = run(capsys, "repair", "--backup", path)
    assert code == 0, err
    assert file_bytes(path + ".bak") == damaged
    assert os.stat(path + ".bak").st_mode & 0o777 == os.stat(path).st_mode & 0o777
    assert os.stat(path + ".bak").st_blocks < os.stat(path).st_blocks // 2  # holes stay holes
    lines = out.splitlines()
    assert lines[0] == f"{path}: backup written to {path}.bak"
    assert "rebuilt the bins from the boundary tags" in lines[1]
    assert lines[-1] == f"{path}: sound now"
    assert run(capsys, "check", path)[0] == 0
    with pheap.open(path, "w") as h:
        for k in "ACEF":
            assert h.read(offs[k], 1000) == k.encode() * 1000
        assert h.root_offset == offs["A"]
        assert {h.malloc(1000), h.malloc(1000)} == {offs["B"], offs["D"]}  # the free blocks work
        h.check()
    poke(path, F.CTL_OFF, 0)  # damage again (the first-level bitmap): a second backup ...
    code, out, _ = run(capsys, "repair", "--backup", path)
    assert code == 0 and f"backup written to {path}.bak.1" in out
    assert file_bytes(path + ".bak") == damaged  # ... never replaces the first


@pytest.mark.parametrize("damage", ["alloc-bit", "bitmap", "lost-block"])
def test_repair_fixes_other_index_damage(heap_file, capsys, damage):
    path, offs = heap_file
    if damage == "alloc-bit":  # E's allocation bitmap bit cleared
        b = offs["E"] - 8
        word_off = F.bitmap_off(MIB) + (b >> 9) * 8
        poke(path, word_off, peek(path, word_off) & ~(1 << ((b >> 3) & 63)))
    elif damage == "bitmap":  # the first-level bitmap loses its bits
        poke(path, F.CTL_OFF, 0)
    else:  # the bin of the 1008-byte blocks forgets its head
        poke(path, F.bin_index(*F.size_class(1008)) * 8, 0)
    assert run(capsys, "check", path)[0] == 1
    code, out, err = run(capsys, "repair", path)
    assert code == 0, err
    assert not os.path.exists(path + ".bak")
    assert run(capsys, "check", path)[0] == 0


def test_repair_of_tag_damage_exits_4_with_advice(heap_file, capsys):
    path, offs = heap_file
    damage_tags(path, offs)
    code, out, _ = run(capsys, "repair", "--dry-run", path)
    assert code == 4 and f"stop: offset {offs['C'] - 8}" in out
    before = file_bytes(path)
    code, out, err = run(capsys, "repair", path)
    assert code == 4, (code, out, err)
    assert err.startswith(f"pheap: {path}: still damaged after repair: offset {offs['C'] - 8}")
    assert "changed nothing" in err
    assert f"`pheap walk {path}`" in err and f"pheap map {path}" in err  # where
    assert f"pheap.snapshot({path!r})" in err  # copy the data out
    assert "`pheap repair --backup`" in err  # there was no backup: say how to keep one
    # The blocks, bins and bitmaps are as they were (a person needs them to see what was where).
    assert file_bytes(path)[F.CTL_OFF:] == before[F.CTL_OFF:]
    code, out, err = run(capsys, "repair", "--backup", path)
    assert code == 4 and f"{path}.bak is the file as it was before this repair" in err
    assert f"cp {path}.bak {path}" in err
    with pheap.snapshot(path) as h:  # the advice holds: the data can be read out
        assert h.read(offs["A"], 1000) == b"A" * 1000


@pytest.mark.timeout(60)
def test_pending_journal_check_exits_5_and_repair_undoes_it(heap_file, capsys):
    path, offs = heap_file
    _, _, st = known(path)
    crash_inside_an_operation(path)
    before = file_bytes(path)
    code, out, err = run(capsys, "check", path)
    assert code == 5 and out == ""
    assert err == (f"pheap: {path}: NEEDS RECOVERY: a process died inside an operation and left "
                   f"2 undo records in the journal; `pheap repair {path}` undoes it (--snapshot "
                   "shows the heap as it will be then)\n")
    code, out, err = run(capsys, "stats", "--json", "--snapshot", path)
    assert code == 0 and json.loads(out)["used_blocks"] == st.used_blocks  # the undo, in a copy
    assert "the copy shows that operation undone" in err
    code, out, err = run(capsys, "repair", "--dry-run", path)
    assert code == 5
    assert "undo the operation a dead process left in the journal (2 undo records)" in out
    assert "then the heap is sound" in out
    assert file_bytes(path) == before  # neither check nor a dry run writes
    code, out, err = run(capsys, "repair", path)
    assert code == 0, err
    assert out == (f"{path}: undid the operation a dead process left in the journal (2 undo "
                   f"records)\n{path}: sound now\n")
    assert peek(path, F.J_STATE * 8) == 0
    assert run(capsys, "check", path)[0] == 0
    with pheap.open(path, "r") as h:
        assert h.stats().used_blocks == st.used_blocks  # the malloc was undone
        for k in "ACEF":
            assert h.read(offs[k], 1000) == k.encode() * 1000


@pytest.mark.timeout(60)
def test_a_pending_journal_over_damaged_tags_is_undone_then_exits_4(heap_file, capsys):
    path, offs = heap_file
    crash_inside_an_operation(path)
    damage_tags(path, offs)
    code, out, _ = run(capsys, "repair", "--dry-run", path)
    assert code == 5  # the journal first: its undo is what any opener does
    assert "undo the operation" in out and f"stop: offset {offs['C'] - 8}" in out
    code, out, err = run(capsys, "repair", path)
    assert code == 4
    assert "so it stopped after undoing the journal." in err
    assert peek(path, F.J_STATE * 8) == 0
    assert run(capsys, "check", path)[0] == 1  # damaged, no longer pending


@pytest.mark.timeout(60)
def test_a_damaged_journal_is_discarded_by_repair(heap_file, capsys):
    path, _ = heap_file
    crash_inside_an_operation(path)
    check_word = (F.J_RECORDS + 2) * 8
    poke(path, check_word, peek(path, check_word) ^ 1)
    code, _, err = run(capsys, "check", path)
    assert code == 1 and "the journal's undo records fail their checks" in err
    assert f"`pheap repair --backup {path}` discards them" in err
    code, out, _ = run(capsys, "repair", "--dry-run", path)
    assert code == 1 and "discard the journal" in out
    code, out, err = run(capsys, "repair", path)
    assert code == 0, err
    assert f"{path}: discarded the journal, whose records fail their checks" in out
    assert out.endswith(f"{path}: sound now\n")
    assert peek(path, F.J_STATE * 8) == 0
    assert run(capsys, "check", path)[0] == 0


# ---------------------------------------------------------------------------------------------
# dump: the object tree
# ---------------------------------------------------------------------------------------------

# Dicts here hold at most four keys: while pheap.objects' probe of a dict's first index table
# (8 slots) can end before it finds an empty slot (a CorruptHeapError on the 5th or 6th insert,
# about once in a hundred heaps), fewer keys keep these tests from meeting it.

BLOB = b"\x00\x01" * 100  #: 200 bytes whose repr takes 800 characters


def make_objects(path: str) -> dict:
    """A heap of shared objects: nested dicts and lists, a queue holding a tuple, a counter, a
    long str and bytes, pickles (one inside a tuple), an int key and a str key that read the
    same, a key with / and %, a second path to one dict, a list that holds itself. Returns
    {name: offset} of the shared objects."""
    from fractions import Fraction

    with pheap.open(path, "n", size=MIB, allow_pickle=True) as h:
        root = h.root
        root["users"] = {"bob": {"tags": ["admin", "ops"], "age": 42},
                         "amy": {"tags": [], "a/b%": 1, 5: "int five", "5": "str five"}}
        jobs = h.queue()
        jobs.put("first")
        jobs.put((1, "two"))
        root["jobs"] = jobs
        root["stats"] = {"hits": h.counter(7), "note": "x" * 500, "blob": BLOB,
                         "pickles": {"frac": Fraction(1, 3), "pair": (1, Fraction(2, 3))}}
        loop = h.list([1])
        loop.append(loop)  # a list that holds itself
        root["links"] = {"same": root["users"], "cycle": loop}  # a second path to users
        users, stats, links = root["users"], root["stats"], root["links"]
        return {"root": root.offset, "users": users.offset, "bob": users["bob"].offset,
                "tags": users["bob"]["tags"].offset, "amy": users["amy"].offset,
                "amytags": users["amy"]["tags"].offset, "jobs": root["jobs"].offset,
                "stats": stats.offset, "hits": stats["hits"].offset,
                "pickles": stats["pickles"].offset, "links": links.offset,
                "cycle": links["cycle"].offset}


@pytest.fixture
def objects_file(tmp_path):
    path = str(tmp_path / "objects.heap")
    return path, make_objects(path)


def pickle_bytes(key: str) -> int:
    """Bytes of the pickle stored under root/stats/KEY."""
    import pickle
    from fractions import Fraction

    return len(pickle.dumps(Fraction(1, 3) if key == "frac" else Fraction(2, 3), protocol=5))


def test_dump_prints_the_tree(objects_file, capsys, monkeypatch):
    import pickle

    path, o = objects_file
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    code, out, err = run(capsys, "dump", path)
    assert code == 0, err
    n = pickle_bytes("frac")
    assert out.splitlines() == [
        f"root: dict, 4 items, offset {o['root']}",
        f"  'users': dict, 2 items, offset {o['users']}",
        f"    'bob': dict, 2 items, offset {o['bob']}",
        f"      'tags': list, 2 items, offset {o['tags']}",
        "        0: 'admin'",
        "        1: 'ops'",
        "      'age': 42",
        f"    'amy': dict, 4 items, offset {o['amy']}",
        f"      'tags': list, 0 items, offset {o['amytags']}",
        "      'a/b%': 1",
        "      5: 'int five'",
        "      '5': 'str five'",
        f"  'jobs': queue, 2 items, offset {o['jobs']}",
        "    0: 'first'",
        "    1: (1, 'two')",
        f"  'stats': dict, 4 items, offset {o['stats']}",
        f"    'hits': counter 7, offset {o['hits']}",
        f"    'note': {'x' * 60!r}... (500 chars)",
        f"    'blob': {BLOB[:11]!r}... (200 bytes)",  # as many bytes as fit 60 characters
        f"    'pickles': dict, 2 items, offset {o['pickles']}",
        f"      'frac': <pickle, {n} bytes>",
        f"      'pair': (1, <pickle, {pickle_bytes('pair')} bytes>)",
        f"  'links': dict, 2 items, offset {o['links']}",
        "    'same': <same dict as root/users>",
        f"    'cycle': list, 2 items, offset {o['cycle']}",
        "      0: 1",
        "      1: <same list as root/links/cycle>",
    ]
    assert err == (f"pheap: {path}: 2 values cut short (--full shows them whole); 2 pickles not "
                   "loaded (--allow-pickle loads them: only for files you trust, unpickling runs "
                   "code)\n")


def test_dump_full_and_allow_pickle(objects_file, capsys):
    path, _ = objects_file
    code, out, err = run(capsys, "dump", "--full", "--allow-pickle", path, "root/stats")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[2] == f"  'note': {'x' * 500!r}"
    assert lines[3] == f"  'blob': {BLOB!r}"
    assert lines[5] == f"    'frac': Fraction(1, 3) (unpickled, {pickle_bytes('frac')} bytes)"
    assert lines[6] == "    'pair': (1, Fraction(2, 3))"


def test_dump_a_pickle_that_does_not_load_here(tmp_path, capsys):
    import types

    mod = types.ModuleType("pheap_test_gone")
    exec("class Gone:\n    pass\n", mod.__dict__)
    sys.modules["pheap_test_gone"] = mod
    path = str(tmp_path / "gone.heap")
    try:
        with pheap.open(path, "n", size=MIB, allow_pickle=True) as h:
            h.root["gone"] = mod.Gone()
    finally:
        del sys.modules["pheap_test_gone"]
    code, out, err = run(capsys, "dump", "--allow-pickle", path, "gone")
    assert code == 0 and err == ""
    assert re.fullmatch(r"root/gone: <pickle, \d+ bytes: does not load here: "
                        r"ModuleNotFoundError: No module named 'pheap_test_gone'>\n", out), out


@pytest.mark.parametrize("given, want", [
    ("root/users/bob/tags/0", "root/users/bob/tags/0: 'admin'"),
    ("users/bob/tags/-1", "root/users/bob/tags/-1: 'ops'"),  # root/ may be left out
    ("/root/users/bob/age/", "root/users/bob/age: 42"),
    ("root/users/amy/a%2Fb%25", "root/users/amy/a%2Fb%25: 1"),
    ("root/users/amy/5", "root/users/amy/5: 'str five'"),  # the str key, when both read '5'
    ("root/jobs/1/1", "root/jobs/1/1: 'two'"),  # into a tuple in a queue
    ("root/stats/hits", "root/stats/hits: counter 7, offset {hits}"),
    ("root/links/same/bob/tags/1", "root/links/same/bob/tags/1: 'ops'"),
    ("links/cycle/1/1/0", "root/links/cycle/1/1/0: 1"),  # round the cycle
])
def test_dump_path_selects_a_subtree(objects_file, capsys, given, want):
    path, o = objects_file
    code, out, err = run(capsys, "dump", path, given)
    assert code == 0, err
    assert out == want.format(**o) + "\n"


def test_dump_path_after_options(objects_file, capsys):
    path, _ = objects_file
    code, out, _ = run(capsys, "dump", path, "--depth", "0", "users/bob")
    assert code == 0 and out.startswith("root/users/bob: dict, 2 items")
    assert run(capsys, "dump", path, "users", "bob")[0] == 2  # one PATH only


@pytest.mark.parametrize("given, words", [
    ("root/users/carol", "root/users/carol: no such key in the dict at root/users (2 keys: "
                         "'bob', 'amy')"),
    ("root/users/bob/tags/2", "root/users/bob/tags/2: index 2 out of range: the list at "
                              "root/users/bob/tags has 2 items"),
    ("root/users/bob/tags/first", "the list at root/users/bob/tags takes an index, not 'first'"),
    ("root/users/bob/age/x", "root/users/bob/age is a int, not a container"),
    ("root/stats/hits/0", "root/stats/hits is a counter: a PATH goes into dicts, lists, queues"),
    ("root/stats/pickles/frac/0", "root/stats/pickles/frac is a pickle, not a container"),
    ("root/users/amy/tags/0", "index 0 out of range: the list at root/users/amy/tags has 0 items"),
])
def test_dump_a_path_that_names_nothing_exits_2(objects_file, capsys, given, words):
    path, _ = objects_file
    code, out, err = run(capsys, "dump", path, given)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and words in err, err
    assert err.endswith("(`pheap dump FILE` shows the tree)\n")


def test_dump_depth(objects_file, capsys):
    path, o = objects_file
    code, out, _ = run(capsys, "dump", "--depth", "1", path)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 5
    assert lines[1] == f"  'users': dict, 2 items, offset {o['users']} (not shown: below --depth 1)"
    code, out, _ = run(capsys, "dump", "--depth", "1", path, "links")
    assert out.splitlines()[1] == f"  'same': dict, 2 items, offset {o['users']} (not shown: " \
        "below --depth 1)"  # not shown before, so not 'the same as' anything
    code, out, _ = run(capsys, "dump", "--depth", "2", path)
    lines = out.splitlines()
    assert f"    'bob': dict, 2 items, offset {o['bob']} (not shown: below --depth 2)" in lines
    assert "    'same': <same dict as root/users>" in lines
    assert f"    'cycle': list, 2 items, offset {o['cycle']} (not shown: below --depth 2)" in lines
    code, out, _ = run(capsys, "dump", "--depth", "0", path)
    assert out == f"root: dict, 4 items, offset {o['root']} (not shown: below --depth 0)\n"


def test_dump_json(objects_file, capsys):
    path, o = objects_file
    code, out, err = run(capsys, "dump", "--json", path)
    assert code == 0
    doc = json.loads(out)
    assert doc["file"] == path and doc["path"] == "root"
    v = doc["value"]
    assert list(v) == ["users", "jobs", "stats", "links"]
    assert v["users"]["bob"] == {"tags": ["admin", "ops"], "age": 42}
    assert v["users"]["amy"] == {"tags": [], "a/b%": 1, "5": "int five", "<str '5'>": "str five"}
    assert v["jobs"] == ["first", [1, "two"]]
    stats = v["stats"]
    assert stats["hits"] == 7
    assert stats["note"] == f"<str, 500 chars: {'x' * 60!r}...>"
    assert stats["blob"].startswith("<bytes b'\\x00\\x01") and stats["blob"].endswith(
        "... (200 bytes)>")
    assert stats["pickles"] == {"frac": f"<pickle, {pickle_bytes('frac')} bytes>",
                                "pair": [1, f"<pickle, {pickle_bytes('pair')} bytes>"]}
    assert v["links"] == {"same": "<same dict as root/users>",
                          "cycle": [1, "<same list as root/links/cycle>"]}
    code, out, _ = run(capsys, "dump", "--json", "--full", "--allow-pickle", path, "stats")
    doc = json.loads(out)
    assert doc["path"] == "root/stats"
    assert doc["value"]["note"] == "x" * 500
    assert doc["value"]["pickles"]["frac"] == "<Fraction(1, 3)>"
    code, out, _ = run(capsys, "dump", "--json", "--depth", "1", path)
    v = json.loads(out)["value"]
    assert v["users"] == f"<dict, 2 items, offset {o['users']} (not shown: below --depth 1)>"
    code, out, _ = run(capsys, "dump", "--json", path, "users/bob/age")
    assert json.loads(out) == {"file": path, "path": "root/users/bob/age", "value": 42}


def test_dump_values_json_cannot_hold(tmp_path, capsys):
    path = str(tmp_path / "odd.heap")
    with pheap.open(path, "n", size=MIB) as h:
        h.root["odd"] = [float("nan"), float("inf"), 1 + 2j, frozenset({1}), b"hi", 10 ** 5000,
                         (None, True, 1.5)]
    code, out, _ = run(capsys, "dump", "--json", path, "odd")
    assert code == 0
    assert json.loads(out)["value"] == ["<float nan>", "<float inf>", "<complex (1+2j)>",
                                        "<frozenset({1})>", "<bytes b'hi'>",
                                        "<int of 16610 bits>", [None, True, 1.5]]
    code, out, _ = run(capsys, "dump", path, "odd/5")
    assert out == "root/odd/5: <int of 16610 bits: --full prints every digit>\n"
    code, out, _ = run(capsys, "dump", "--full", path, "odd/5")
    assert out == "root/odd/5: 1" + "0" * 5000 + "\n"  # every digit
    code, out, _ = run(capsys, "dump", "--json", "--full", path, "odd/5")
    assert '"value": 1' + "0" * 5000 + "\n}" in out


def test_dump_arrays_and_buffers(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    path = str(tmp_path / "arrays.heap")
    with pheap.open(path, "n", size=MIB) as h:
        a = h.ndarray((3, 4), "float32")
        a[:] = np.arange(12).reshape(3, 4)
        h.root["a"] = a
        b = h.buffer(40)
        b[:4] = b"abcd"
        h.root["b"] = b
        h.root["again"] = h.root["a"]
        h.root["v"] = h.ndarray(3, "int64")
    code, out, _ = run(capsys, "dump", path)
    lines = out.splitlines()
    assert re.fullmatch(r"  'a': array float32 \(3, 4\), offset \d+: \[0\.0, 1\.0, 2\.0, 3\.0, "
                        r"4\.0, 5\.0, 6\.0, 7\.0, \.\.\.\]", lines[1]), lines[1]
    assert re.fullmatch(r"  'b': buffer, 40 bytes, offset \d+: b'abcd(\\x00){12}'\.\.\.",
                        lines[2]), lines[2]
    assert lines[3] == "  'again': <same array as root/a>"
    assert re.fullmatch(r"  'v': array int64 \(3,\), offset \d+: \[0, 0, 0\]", lines[4])
    code, out, _ = run(capsys, "dump", "--json", path)
    v = json.loads(out)["value"]
    assert v["a"].startswith("<array float32 (3, 4), offset ") and v["again"].startswith("<same")


def test_dump_a_heap_without_objects(heap_file, capsys):
    path, _ = heap_file  # raw blocks only: no root dict
    code, out, err = run(capsys, "dump", path)
    assert code == 0 and err == ""
    assert out == f"{path}: no objects (the heap has no root dict)\n"
    code, out, _ = run(capsys, "dump", "--json", path)
    assert json.loads(out) == {"file": path, "path": "root", "value": {}}
    code, out, err = run(capsys, "dump", path, "users")
    assert code == 2 and "root/users: the heap has no objects" in err


def test_dump_of_damaged_objects_exits_1(objects_file, capsys):
    path, o = objects_file
    poke(path, o["bob"], 0)  # bob's kind word: no longer an object
    code, out, err = run(capsys, "dump", path)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and f"{path}: DAMAGED: offset {o['bob']}: a ref names " \
        "something that is not a live shared object" in err
    assert run(capsys, "dump", path, "stats")[0] == 0  # what the damage does not touch


@pytest.mark.timeout(60)
def test_dump_and_gc_time_out_naming_the_holder(objects_file, capsys):
    path, _ = objects_file
    with lock_held(path) as pid:
        for argv in (["dump"], ["dump", "--json"], ["gc"], ["gc", "--dry-run"]):
            t0 = time.monotonic()
            code, out, err = run(capsys, *argv, "--timeout", "0.8", path)
            took = time.monotonic() - t0
            assert code == 6 and out == "", (argv, err)
            assert 0.7 < took < 0.8 + 2, (argv, took)
            assert f"waiting up to 0.8 s for the heap lock (pid {pid} holds it)" in err
            assert err.splitlines()[-1].startswith(f"pheap: {path}: busy: ")
            assert f"pid {pid} holds it" in err.splitlines()[-1]
            hint = f"`pheap dump --snapshot {path}`" if argv[0] == "dump" else \
                "--timeout SECONDS waits for it"
            assert hint in err
        code, out, err = run(capsys, "dump", "--snapshot", path, "users/bob/tags/0")
        assert code == 0 and out == "root/users/bob/tags/0: 'admin'\n" and "snapshot" in err


@pytest.mark.timeout(120)
def test_dump_into_a_closed_pipe_ends_quietly(tmp_path):
    path = str(tmp_path / "long.heap")
    with pheap.open(path, "n", size=4 * MIB) as h:
        h.root["many"] = list(range(30000))  # 30000 lines: far more than a pipe buffer holds
    for argv in (["dump", path], ["dump", "--json", path]):
        proc = subprocess.Popen([sys.executable, "-m", "pheap.cli", *argv], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            first = proc.stdout.readline()
            proc.stdout.close()  # `| head -n 1`
            err = proc.stderr.read()
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert first.startswith(b"root: dict, 1 item") or first == b"{\n"
        assert code == 141 and err == b"", (argv, err)


# ---------------------------------------------------------------------------------------------
# gc
# ---------------------------------------------------------------------------------------------


def leave_floating_objects(path: str, nested: bool = False) -> None:
    """A child makes three shared objects and stores none of them, then dies without closing:
    they float, kept by a process that is gone. ``nested``: the list holds the dict."""
    pid = os.fork()
    if pid == 0:
        try:
            h = pheap.open(path, "w")
            d, lst, _c = h.dict({"x": "y" * 300}), h.list([1, 2, 3]), h.counter(5)
            if nested:
                lst.append(d)
        finally:
            os._exit(0)
    assert reap(pid) == 0


def test_gc_frees_what_a_dead_process_left(objects_file, capsys):
    path, o = objects_file
    leave_floating_objects(path)
    with pheap.open(path, "r") as h:
        assert h.check()["unreachable"] == 3
    code, out, _ = run(capsys, "check", path)
    assert code == 0 and out.splitlines()[1] == (
        f"{path}: 3 of 15 shared objects unreachable, left by processes that died holding "
        f"them: `pheap gc {path}` frees them")
    before = file_bytes(path)
    code, out, err = run(capsys, "gc", "--dry-run", path)
    assert code == 0 and err == ""
    assert out == (f"{path}: 15 shared objects, 12 reachable (from the root, or kept by a live "
                   "process); 3 unreachable, left by processes that died holding them: gc would "
                   "free them (dry run, nothing changed)\n")
    assert file_bytes(path) == before
    code, out, _ = run(capsys, "gc", "--json", "--dry-run", path)
    assert json.loads(out) == {"objects": 15, "reachable": 12, "unreachable": 3, "freed": 0,
                               "bytes_freed": 0, "path": path, "dry_run": True}
    code, out, err = run(capsys, "gc", path)
    assert code == 0 and err == ""
    assert re.fullmatch(rf"{re.escape(path)}: 15 shared objects, 12 reachable \(from the root, or "
                        r"kept by a live process\); freed 3 unreachable, left by processes that "
                        r"died holding them \(\d+(\.\d)? [KM]?i?B\)\n", out), out
    with pheap.open(path, "r") as h:
        assert h.check() is None
        assert h.root["users"]["bob"]["tags"] == ["admin", "ops"]  # what is reachable stays
    code, out, _ = run(capsys, "gc", "--json", path)
    assert json.loads(out)["unreachable"] == 0 and json.loads(out)["freed"] == 0
    code, out, _ = run(capsys, "gc", path)
    assert out == (f"{path}: 12 shared objects, 12 reachable (from the root, or kept by a live "
                   "process); nothing to free\n")


@pytest.mark.timeout(60)
def test_gc_keeps_what_a_live_process_holds(objects_file, capsys):
    path, _ = objects_file
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(stop_w)
            h = pheap.open(path, "w")
            d = h.dict(a=1)  # floats, kept by this process while it lives
            os.write(ready_w, b"x")
            os.read(stop_r, 1)
            assert d["a"] == 1
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(stop_r)
    try:
        assert os.read(ready_r, 1) == b"x"
        code, out, _ = run(capsys, "gc", path)
        assert code == 0 and "13 shared objects, 13 reachable" in out and "nothing to free" in out
    finally:
        os.close(stop_w)
        os.close(ready_r)
        assert reap(pid) == 0
    code, out, _ = run(capsys, "gc", path)  # its holder is gone: now it goes
    assert code == 0 and "freed 1 unreachable" in out


def test_gc_frees_unreachable_objects_that_refer_to_each_other(objects_file, capsys):
    path, _ = objects_file
    leave_floating_objects(path, nested=True)
    code, out, err = run(capsys, "gc", path)
    assert code == 0, err
    assert "freed 3 unreachable" in out
    assert run(capsys, "check", path)[0] == 0


def test_gc_of_a_heap_without_objects(heap_file, capsys):
    path, _ = heap_file
    before = file_bytes(path)
    code, out, _ = run(capsys, "gc", path)
    assert code == 0 and out == (f"{path}: 0 shared objects, 0 reachable (from the root, or kept "
                                 "by a live process); nothing to free\n")
    assert run(capsys, "check", path)[0] == 0
    assert len(file_bytes(path)) == len(before)


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_bench_tiny_run_prints_the_table(capsys, monkeypatch):
    from pheap import _bench

    code, out, err = run(capsys, "bench", "--keys", "200", "--repeats", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert re.fullmatch(r"pheap bench: 200 str keys -> 100-char str values, one process; median "
                        r"of 1 round-robin repeat \(\d+ s\)", lines[0]), lines[0]
    assert re.fullmatch(rf"Python \d+\.\d+\.\d+ \(\w+\), \d+ CPUs, load average [\d. ]+, "
                        rf"pheap {re.escape(pheap.__version__)}, .+", lines[1]), lines[1]
    assert re.fullmatch(r"store +set (µs|us)/op +get (µs|us)/op +del (µs|us)/op +vs pheap",
                        lines[2]), lines[2]
    names = [name for name, _, _ in _bench.SYSTEMS]
    rows = lines[3:3 + len(names)]
    number = r"\d+\.\d\d"
    row = re.compile(rf"(.+?) +({number}) +({number}) +({number}) +(\d+\.\d\dx)( \*)?")
    seen = []
    for line in rows:
        m = row.fullmatch(line)
        if m:
            seen.append(m.group(1).split(" (")[0])
        else:
            assert line.endswith(" not installed") or "could not run: " in line, line
            seen.append(line.split(" (")[0].split("  ")[0].strip())
    assert {n.split(" (")[0] for n in names} == {s.split(" (")[0] for s in seen}
    assert row.fullmatch(rows[0]).group(1) == "pheap h.dict(), file heap"
    assert row.fullmatch(rows[0]).group(5) == "1.00x"
    for plain in ("dict", "multiprocessing.Manager().dict()", "shelve", "sqlite3"):
        assert any(row.fullmatch(r) and r.startswith(plain) for r in rows), plain
    notes = " ".join(lines)
    assert "synchronous=NORMAL" in notes and "a commit per set and per delete" in notes
    assert lines[-1] == "The full benchmarks live in the repository's tools/bench_all.py."
    # peers that do not import are one 'not installed' line each, and the run goes on
    monkeypatch.setattr(_bench, "_importable", lambda module: module is None)
    code, out, _ = run(capsys, "bench", "--keys", "50", "--repeats", "1")
    assert code == 0
    for name, module, _ in _bench.SYSTEMS:
        if module is not None:
            assert re.search(rf"^{re.escape(name)} +not installed$", out, re.M), name


def test_bench_options(capsys):
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and "--quick" in out and "--keys" not in out  # the tiny sizes are hidden
    p = cli.build_parser()
    assert p.parse_args(["bench", "--quick"]).quick
    code, _, err = run(capsys, "bench", "--keys", "0")
    assert code == 2 and "must be at least 1" in err


# ---------------------------------------------------------------------------------------------
# demo, and the module as a program
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_demo(tmp_path, capfd):
    path = str(tmp_path / "demo.heap")
    code = cli.main(["demo", "--workers", "2", "--records", "200", "--path", path])
    out, err = capfd.readouterr()  # (fd level: the workers are processes of their own)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) <= 20 and lines[-1] == "  ok", out
    assert lines[0] == f"pheap demo: 2 worker processes share one heap file, {path}"
    assert "worker 1 SIGKILLed itself inside its transaction for record 100" in out
    assert "resumed from the heap at record 100" in out
    assert re.search(r"400 records \(1,200 operations\) by 3 processes in [\d.]+ s: [\d,]+ "
                     r"records/s, [\d,]+ ops/s", out), out
    assert "the killed worker's unfinished transaction was undone (1 recovery)" in out
    assert "verified 400 records" in out and "'done' = 400" in out
    assert re.search(r"check\(\): clean in [\d.]+ s", out)
    assert f"the file: {path}, " in out and "MiB" in out
    assert err == ""
    with pheap.open(path, "r") as h:  # what the demo says is there, is there
        assert h.check() is None
        root = h.root
        assert len(root["records"]) == 400 and len(root["log"]) == 400
        assert root["done"].value == 400
        assert root["records"]["1:150"] == "worker 1 record 150"
        assert h.info()["recoveries"] == 1
    assert cli.main(["check", path]) == 0
    code = cli.main(["demo", "--path", path])  # never over an existing file
    _, err = capfd.readouterr()
    assert code == 3 and one_line_about(err, path) and "already exists" in err


@pytest.mark.timeout(120)
def test_demo_keeps_the_heap_when_a_record_reads_back_wrong(tmp_path, capfd, monkeypatch):
    path = str(tmp_path / "demo.heap")
    from pheap import demo

    monkeypatch.setattr(demo, "_demo_value", lambda w, i: f"worker {w} record {i + (i == 7)}")
    code = cli.main(["demo", "--workers", "1", "--records", "20", "--path", path])
    out, err = capfd.readouterr()
    assert code == 70, out
    assert "WRONG: 1 of 20 records missing or wrong (first: ['0:7'])" in err
    assert f"verification FAILED; the heap is kept at {path}" in err
    assert os.path.exists(path)


@pytest.mark.timeout(60)
def test_module_entry_point(heap_file, tmp_path):
    path, _ = heap_file
    res = subprocess.run([sys.executable, "-m", "pheap.cli", "check", path], env=ENV,
                         capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{path}: ok")
    missing = str(tmp_path / "missing.heap")
    res = subprocess.run([sys.executable, "-m", "pheap.cli", "info", "--json", missing],
                         env=ENV, capture_output=True, text=True, timeout=50)
    assert res.returncode == 3
    assert res.stderr == f"pheap: {missing}: No such file or directory\n"
