"""Tests of pheap.cli: every command's output and documented exit code, repair with --dry-run and
--backup, and the module run as a program."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

import pheap
from pheap import cli
from pheap import format as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
MIB = 1 << 20


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def heap_file(tmp_path):
    """A sound heap: blocks A..F of 112 bytes with B and D free, and a root."""
    path = str(tmp_path / "cli.heap")
    with pheap.open(path, "n", size=MIB) as h:
        offs = {k: h.malloc(100) for k in "ABCDEF"}
        for k, p in offs.items():
            h.write(p, k.encode() * 100)
        h.free(offs["B"])
        h.free(offs["D"])
        h.root_offset = offs["A"]
    return path, offs


def poke(path: str, off: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<Q", value))


def peek(path: str, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack("<Q", f.read(8))[0]


def damage_bins(path: str, offs: dict) -> None:
    """Bin-only damage: D's prev link (D is the head of its bin, so prev must be 0)."""
    poke(path, offs["D"] - 8 + 16, offs["A"] - 8)


def damage_tags(path: str, offs: dict) -> None:
    """Tag damage that no rebuild can fix: C's header claims 16 bytes."""
    poke(path, offs["C"] - 8, 16)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Sound heaps
# ---------------------------------------------------------------------------------------------


def test_info(heap_file, capsys):
    path, offs = heap_file
    code, out, _ = run(capsys, "info", path)
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["capacity"].strip() == str(MIB)
    assert fields["root"].strip() == str(offs["A"])
    assert fields["format_version"].strip() == "1"
    with pheap.open(path, "r") as h:
        assert fields["uuid"].strip() == h.info()["uuid"]


def test_info_json(heap_file, capsys):
    path, offs = heap_file
    code, out, _ = run(capsys, "info", "--json", path)
    assert code == 0
    info = json.loads(out)
    assert info["root"] == offs["A"] and info["capacity"] == MIB
    assert info["file_bytes"] == os.path.getsize(path) and info["disk_bytes"] > 0
    assert info["readonly"] is True  # info opens read-only


def test_stats(heap_file, capsys):
    path, _ = heap_file
    code, out, _ = run(capsys, "stats", path)
    assert code == 0
    assert "4 blocks" in out and "2 blocks" in out and "fragmentation" in out
    code, out, _ = run(capsys, "stats", "--json", path)
    assert code == 0
    s = json.loads(out)
    assert s["used_blocks"] == 4 and s["free_blocks"] == 2 and s["free_bytes"] == 224


def test_check_sound(heap_file, capsys):
    path, _ = heap_file
    code, out, err = run(capsys, "check", path)
    assert code == 0 and "ok" in out and "4 used, 2 free" in out
    code, out, err = run(capsys, "check", "-q", path)
    assert code == 0 and out == ""


def test_walk(heap_file, capsys):
    path, offs = heap_file
    code, out, _ = run(capsys, "walk", path)
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert [int(r[0]) for r in rows] == sorted(offs.values())
    assert [r[2] for r in rows] == ["used", "free", "used", "free", "used", "used"]
    assert all(int(r[1]) == 112 for r in rows)
    code, out, _ = run(capsys, "walk", "--free", path)
    assert [int(line.split()[0]) for line in out.splitlines()] == [offs["B"], offs["D"]]
    code, out, _ = run(capsys, "walk", "--limit", "2", path)
    assert code == 0 and len(out.splitlines()) == 2


def test_map(heap_file, capsys):
    path, _ = heap_file
    code, out, _ = run(capsys, "map", "--width", "40", path)
    assert code == 0
    lines = out.splitlines()
    assert "bytes per cell" in lines[0]
    row = lines[1]
    assert len(row) == 42 and row[0] == row[-1] == "|"
    assert row[1] in "#+"  # the blocks are at the start of the block area
    assert row[-2] == " "  # the wilderness at the end
    code, out, _ = run(capsys, "map", "--width", "200", path)
    assert code == 0 and len(out.splitlines()) == 1 + 3  # rows of 80 cells


def test_version_and_usage(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0
    assert pheap.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as ei:
        cli.main([])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        cli.main(["check"])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        cli.main(["frobnicate", "x"])
    assert ei.value.code == 2


# ---------------------------------------------------------------------------------------------
# Unreadable files: exit 3; damaged heaps: exit 1
# ---------------------------------------------------------------------------------------------

COMMANDS = ["info", "stats", "check", "walk", "map", "repair"]


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_file(tmp_path, capsys, command):
    path = str(tmp_path / "nope.heap")
    code, out, err = run(capsys, command, path)
    assert code == 3
    assert "nope.heap" in err
    assert not os.path.exists(path)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("content", [b"", b"hello world\n" * 500, b"\x93PHEAP\r\n" + bytes(5000)])
def test_not_a_heap(tmp_path, capsys, command, content):
    path = str(tmp_path / "foreign.bin")
    with open(path, "wb") as f:
        f.write(content)
    code, out, err = run(capsys, command, path)
    assert code == 3, (out, err)
    assert err.startswith("pheap: ")
    assert file_bytes(path) == content


@pytest.mark.parametrize("command", COMMANDS)
def test_wrong_version(heap_file, capsys, command):
    path, _ = heap_file
    poke(path, F.H_VERSION * 8, 9)
    before = file_bytes(path)
    code, _, err = run(capsys, command, path)
    assert code == 3 and "version 9" in err
    assert file_bytes(path) == before


def test_directory(tmp_path, capsys):
    code, _, err = run(capsys, "check", str(tmp_path))
    assert code == 3


@pytest.mark.parametrize("command", ["info", "check"])
def test_truncated_file_is_damaged(heap_file, capsys, command):
    path, _ = heap_file
    os.truncate(path, MIB // 2)
    code, _, err = run(capsys, command, path)
    assert code == 1
    assert "offset 128" in err and "DAMAGED" in err


def test_check_damaged_bins(heap_file, capsys):
    path, offs = heap_file
    damage_bins(path, offs)
    before = file_bytes(path)
    code, out, err = run(capsys, "check", path)
    assert code == 1
    assert "DAMAGED" in err and f"offset {offs['D'] - 8}" in err
    assert file_bytes(path) == before  # check never writes


def test_check_damaged_tags(heap_file, capsys):
    path, offs = heap_file
    damage_tags(path, offs)
    code, _, err = run(capsys, "check", path)
    assert code == 1 and f"offset {offs['C'] - 8}" in err


# ---------------------------------------------------------------------------------------------
# repair
# ---------------------------------------------------------------------------------------------


def test_repair_sound_heap_changes_nothing(heap_file, capsys):
    path, _ = heap_file
    before = file_bytes(path)
    code, out, _ = run(capsys, "repair", path)
    assert code == 0 and "nothing to repair" in out
    assert file_bytes(path)[F.CTL_OFF:] == before[F.CTL_OFF:]
    assert not os.path.exists(path + ".bak")


def test_repair_dry_run_changes_nothing(heap_file, capsys):
    path, offs = heap_file
    damage_bins(path, offs)
    before = file_bytes(path)
    code, out, _ = run(capsys, "repair", "--dry-run", path)
    assert code == 1
    assert "dry run" in out
    assert file_bytes(path) == before
    assert not os.path.exists(path + ".bak")
    code, _, _ = run(capsys, "check", path)
    assert code == 1  # still damaged


def test_repair_with_backup_fixes_bin_damage(heap_file, capsys):
    path, offs = heap_file
    damage_bins(path, offs)
    damaged = file_bytes(path)
    code, out, err = run(capsys, "repair", "--backup", path)
    assert code == 0, err
    assert file_bytes(path + ".bak") == damaged
    assert "backup written" in out
    code, _, _ = run(capsys, "check", path)
    assert code == 0
    with pheap.open(path, "w") as h:
        h.check()
        for k in "ACEF":
            assert h.read(offs[k], 100) == k.encode() * 100
        assert h.root_offset == offs["A"]
        assert {h.malloc(100), h.malloc(100)} == {offs["B"], offs["D"]}  # the free blocks work
        h.check()


@pytest.mark.parametrize("damage", ["alloc-bit", "bitmap", "lost-block"])
def test_repair_fixes_other_index_damage(heap_file, capsys, damage):
    path, offs = heap_file
    with pheap.open(path, "r") as h:
        cap = h.capacity
    if damage == "alloc-bit":  # E's allocation bitmap bit cleared
        b = offs["E"] - 8
        word_off = F.bitmap_off(cap) + (b >> 9) * 8
        poke(path, word_off, peek(path, word_off) & ~(1 << ((b >> 3) & 63)))
    elif damage == "bitmap":  # the first-level bitmap loses its only bit
        poke(path, F.CTL_OFF, 0)
    else:  # the bin of 112-byte blocks forgets its head
        poke(path, F.bin_index(*F.size_class(112)) * 8, 0)
    assert run(capsys, "check", path)[0] == 1
    code, out, err = run(capsys, "repair", path)
    assert code == 0, err
    assert not os.path.exists(path + ".bak")
    assert run(capsys, "check", path)[0] == 0


def test_repair_of_tag_damage_exits_4_and_leaves_the_file(heap_file, capsys):
    path, offs = heap_file
    damage_tags(path, offs)
    before = file_bytes(path)
    code, out, err = run(capsys, "repair", path)
    assert code == 4, (code, out, err)
    assert f"offset {offs['C'] - 8}" in out + err
    # The failed repair leaves the blocks, the bins and the allocation bitmap as it found them
    # (a person now needs them to see what was where).
    assert file_bytes(path)[F.CTL_OFF:] == before[F.CTL_OFF:]


CRASHER = """
import sys, pheap
from pheap import journal
journal.set_crashpoint("write", 7)  # SIGKILL at the 4th word the next operation changes
with pheap.open(sys.argv[1], "w") as h:
    h.malloc(100)
"""


@pytest.mark.timeout(60)
def test_repair_undoes_an_interrupted_operation(heap_file, capsys):
    path, offs = heap_file
    res = subprocess.run([sys.executable, "-c", CRASHER, path], env=ENV, capture_output=True,
                         text=True, timeout=50)
    assert res.returncode == -9, res.stderr  # killed inside the operation
    assert peek(path, F.J_STATE * 8) != 0  # the journal holds its undo records
    before = file_bytes(path)
    code, out, err = run(capsys, "check", path)
    assert code == 5 and "NEEDS RECOVERY" in err
    code, out, err = run(capsys, "repair", "--dry-run", path)
    assert code == 5 and "dry run" in out
    assert file_bytes(path) == before
    code, out, err = run(capsys, "repair", path)
    assert code == 0, err
    assert peek(path, F.J_STATE * 8) == 0
    assert run(capsys, "check", path)[0] == 0
    with pheap.open(path, "r") as h:
        assert h.stats().used_blocks == 4  # the malloc was undone
        for k in "ACEF":
            assert h.read(offs[k], 100) == k.encode() * 100


# ---------------------------------------------------------------------------------------------
# As a program
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_module_entry_point(heap_file, tmp_path):
    path, _ = heap_file
    res = subprocess.run([sys.executable, "-m", "pheap.cli", "check", path], env=ENV,
                         capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout
    res = subprocess.run([sys.executable, "-m", "pheap.cli", "info", "--json",
                          str(tmp_path / "missing.heap")], env=ENV, capture_output=True,
                         text=True, timeout=50)
    assert res.returncode == 3 and "missing.heap" in res.stderr
