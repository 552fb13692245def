"""Corruption fuzzing for heap format v2: a damaged heap file is refused, reported or harmless --
never silent wrong data, a crash or a hang.

The tool builds one realistic heap file: slots of every size class in their runs and blocks of
many sizes, some of each freed, reallocs across classes, large freed blocks whose pages went back
to the OS, growth past the first capacity, one transaction (so the file has a transaction log
with its stale records), one atomic bracket, the root entry set, and last a journaled operation
(a block carved from the wilderness, so the header journal holds its stale records). Every live
allocation is filled with random bytes over its whole usable size; those bytes are what it must
read back.

Each case damages a copy of that file in one way (``--list-kinds`` names them all: immutable and
mutable header fields, the operation journal and the transaction log with j_state set, block
tags and links, bins and their bitmaps, run headers, slot bitmaps, class lists and cache, the
page map, the allocation bitmap, bytes above zero_from, user bytes, free space, random bytes,
truncation and extension) and hands it to a forked checker process with a hang alarm. The
checker opens the copy read-only and runs ``check()``, then opens it read-write (which runs
recovery) and runs ``check()``; when both pass it verifies every live allocation (usable size
and bytes) and the header entries, runs a short workload -- slot and block mallocs, callocs that
must read zero, reallocs that must keep their bytes, frees, a transaction and an atomic bracket,
a growth now and then; no new allocation may overlap live data -- then ``check()`` again, a
reopen, ``check()`` and the verification again. Outcomes:

* ``refused``        open raised a pheap error;
* ``reported``       check() raised CorruptHeapError (or another pheap error; the table says);
* ``reported late``  open and check() passed, and all live data was intact, but the workload, the
  second check() or the reopen raised a pheap error (check() missed something the allocator
  tripped over later, loudly);
* ``harmless``       everything passed and every live byte reads as before;
* ``user bytes``     everything passed, and the only bytes that differ are the damage itself: the
  diff between the pristine and the damaged file lies entirely inside the payloads of live
  allocations (computed from the diff, not from the kind of damage), and those payloads read
  the damaged bytes;

and the failures:

* ``silent wrong data``     open and check() passed, but a live allocation reads other bytes,
  has another usable size or is no longer live, a header entry changed, calloc returned
  non-zero bytes, or an allocation overlapped live data or the heap's own metadata;
* ``crash``                 the checker died by a signal;
* ``hang``                  the alarm (HANG_SECONDS) killed it;
* ``unexpected exception``  anything raised that is not a pheap error.

Every damage is a single site -- one bit, one byte, one aligned word, or words of one structure
that holds no payload -- so a payload hit is never mixed with damage elsewhere. The exit status
is 1 if any failure occurred. Each case is reproducible alone: ``--case K`` runs case K of a
seed again and prints its diff (the exact bytes changed) and what the checker saw.

Small, in CI (tests/test_fuzz.py)::

    python3 tools/fuzz_corrupt.py -n 300 --seed 7 -v

Large, by hand::

    python3 tools/fuzz_corrupt.py -n 5000 --seed 7 -v
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pheap  # noqa: E402
from pheap import format as F  # noqa: E402

HANG_SECONDS = 60  #: a checker still running after this long counts as a hang
START_SIZE = 1 << 20  #: initial capacity of the pristine heap (it grows past this)
MAX_SIZE = 64 << 20  #: max_size of the pristine heap
M64 = (1 << 64) - 1
GOOD = ("refused", "reported", "reported late", "harmless", "user bytes")
FAILURES = ("silent wrong data", "crash", "hang", "unexpected exception")


class Silent(Exception):
    """The checker found silent wrong data (the message says what)."""


# ---------------------------------------------------------------------------------------------
# The pristine heap
# ---------------------------------------------------------------------------------------------


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.55:  # a slot of any class, anywhere in its class
        c = rng.randrange(F.CLASS_COUNT)
        return rng.randint(F.CLASS_SIZE[c - 1] + 1 if c else 0, F.CLASS_SIZE[c])
    if r < 0.93:
        return rng.randint(F.RUN_LIMIT + 1, 5000)
    return rng.randint(5000, 40_000)


def build(path: str, seed: int) -> None:
    """Write the pristine heap (see the module docstring) to ``path``."""
    rng = random.Random(f"build:{seed}")
    with pheap.open(path, "n", size=START_SIZE, max_size=MAX_SIZE) as h:
        live: list[int] = []

        def fill(off: int) -> None:
            h.write(off, rng.randbytes(h.usable_size(off)))

        for _ in range(4000):
            r = rng.random()
            if live and r < 0.33:
                h.free(live.pop(rng.randrange(len(live))))
                continue
            if live and r < 0.40:
                i = rng.randrange(len(live))
                live[i] = h.realloc(live[i], _size(rng))
                fill(live[i])
                continue
            if r < 0.45:
                live.append(h.calloc(rng.randint(1, 8), rng.choice((8, 24, 100, 700))))
            else:
                live.append(h.malloc(_size(rng)))
            fill(live[-1])
        # Large blocks freed between live ones: their pages go back to the OS (RELEASED).
        big = []
        for _ in range(3):
            big.append(h.malloc(rng.randint(140_000, 260_000)))
            live.append(h.malloc(600))
            fill(live[-1])
        for off in big:
            h.free(off)
        # A block freed at the top: brk drops, the bytes above it stay dirty below zero_from.
        top = h.malloc(30_000)
        fill(top)
        h.free(top)
        # One transaction: logged rewrites, a new slot and block, a free.
        with h.transaction() as tx:
            for off in rng.sample(live, 4):
                n = tx.usable_size(off)
                tx.write(off, rng.randbytes(min(n, 300)))
            for n in (200, 3000):
                off = tx.malloc(n)
                tx.write(off, rng.randbytes(tx.usable_size(off)))
                live.append(off)
            tx.free(live.pop(rng.randrange(len(live) - 2)))
        # One atomic bracket: a word of a live allocation, a new slot.
        with h.atomic() as s:
            off = next(o for o in live if s.usable_size(o) >= 8)
            s.set_u64(off, 0, rng.getrandbits(64))
            off = s.malloc(48)
            s.write(off, rng.randbytes(48))
            live.append(off)
        h.root_offset = next(o for o in live if h.usable_size(o) > F.RUN_LIMIT)
        # The last operation is a journaled one, a block carved from the wilderness (larger
        # than any free block, as a growing heap does): the header journal keeps its records.
        largest = max(b.size for b in h.walk() if b.free)
        live.append(h.malloc(largest + 64))
        fill(live[-1])
        h.check()


# ---------------------------------------------------------------------------------------------
# Facts about the pristine heap
# ---------------------------------------------------------------------------------------------


def word(buf: bytes | bytearray, i: int) -> int:
    """Word ``i`` (index, not offset) of ``buf``."""
    return struct.unpack_from("<Q", buf, i * 8)[0]


def put(buf: bytearray, i: int, v: int) -> None:
    """Store ``v`` (mod 2**64) in word ``i`` of ``buf``."""
    struct.pack_into("<Q", buf, i * 8, v & M64)


@dataclass
class Facts:
    """Where everything is in the pristine file."""

    size: int
    cap: int
    brk: int
    meta: int
    bitmap: int
    live: dict[int, tuple[int, bool]]  #: payload offset -> (usable bytes, is a slot)
    payload: list[tuple[int, int]]  #: sorted [start, end) of every live payload
    used_blocks: list[tuple[int, int]]  #: (block offset, size) of used non-run blocks
    free_blocks: list[tuple[int, int]]  #: (block offset, size)
    runs: list[tuple[int, int]]  #: (payload base, class)
    used_slots: list[tuple[int, int, int]]  #: (offset, run base, slot index)
    free_slots: list[tuple[int, int, int]]
    txlog: int
    txlog_end: int
    entries: dict[str, int] = field(default_factory=dict)

    def in_payload(self, off: int) -> bool:
        i = bisect.bisect_right(self.payload, (off, M64)) - 1
        return i >= 0 and self.payload[i][0] <= off < self.payload[i][1]


def facts_of(path: str, data: bytes) -> Facts:
    with pheap.open(path, "r") as h:
        walk = list(h.walk(slots=True))
    cap = word(data, F.H_CAPACITY)
    txlog = word(data, F.H_TXLOG)
    live: dict[int, tuple[int, bool]] = {}
    used_blocks, free_blocks, runs, used_slots, free_slots = [], [], [], [], []
    base = 0
    for b in walk:
        if b.kind == "run":
            base = b.offset
            runs.append((base, F.run_class(word(data, (base >> 3) - 1))))
        elif b.kind == "slot":
            c = runs[-1][1]
            idx = (b.offset - base - F.CLASS_FIRST[c]) // F.CLASS_SIZE[c]
            (free_slots if b.free else used_slots).append((b.offset, base, idx))
            if not b.free:
                live[b.offset] = (b.size, True)
        elif b.free:
            free_blocks.append((b.offset - 8, b.size))
        else:
            used_blocks.append((b.offset - 8, b.size))
            if b.offset != txlog:
                live[b.offset] = (b.size - 8, False)
    tsize = word(data, (txlog >> 3) - 1) & F.SIZE_MASK
    return Facts(len(data), cap, word(data, F.H_BRK), F.meta_off(cap), F.bitmap_off(cap), live,
                 sorted((o, o + u) for o, (u, _) in live.items()), used_blocks, free_blocks,
                 runs, used_slots, free_slots, txlog, txlog - 8 + tsize,
                 {name: word(data, i) for name, i in F.ENTRIES.items()})


# ---------------------------------------------------------------------------------------------
# Damage: each function changes one site of ``buf`` and returns a note of what it did
# ---------------------------------------------------------------------------------------------

Damage = Callable[[bytearray, Facts, random.Random], str]
KINDS: dict[str, Damage] = {}


def kind(fn: Damage) -> Damage:
    KINDS[fn.__name__.removeprefix("d_")] = fn
    return fn


def near(rng: random.Random, v: int) -> int:
    """A value a damaged word might hold instead of ``v``."""
    return rng.choice((0, v + 8, v - 8, v + F.PAGE, v - F.PAGE, v ^ 1 << rng.randrange(64),
                       rng.getrandbits(64), rng.getrandbits(20) * 8)) & M64


def set_word(buf: bytearray, i: int, v: int, what: str) -> str:
    old = word(buf, i)
    put(buf, i, v)
    return f"{what} (word at {i * 8}): {old:#x} -> {v & M64:#x}"


def one_site(buf: bytearray, rng: random.Random, lo: int, hi: int, what: str) -> str:
    """A bit flip, a random byte or a random aligned word somewhere in [lo, hi)."""
    how = rng.randrange(3)
    if how == 2 and hi - lo >= 8:
        i = rng.randrange((lo + 7) >> 3, hi >> 3)
        return set_word(buf, i, rng.getrandbits(64), what)
    pos = rng.randrange(lo, hi)
    old = buf[pos]
    buf[pos] = old ^ 1 << rng.randrange(8) if how == 0 else rng.randrange(256)
    return f"{what}: byte {pos} {old:#04x} -> {buf[pos]:#04x}"


def some_pointer(f: Facts, rng: random.Random, v: int) -> int:
    """An offset an entry or link might be damaged to: another live thing, a free thing, a run,
    the transaction log, near misses, random."""
    choices = [0, v + 8, v - 8, v ^ 1 << rng.randrange(64), rng.getrandbits(64), f.txlog,
               rng.choice(list(f.live)), rng.choice(f.used_slots)[0], rng.choice(f.runs)[0],
               f.brk, F.BLOCKS_OFF + 8]
    if f.free_blocks:
        choices.append(rng.choice(f.free_blocks)[0] + 8)
    if f.free_slots:
        choices.append(rng.choice(f.free_slots)[0])
    return rng.choice(choices) & M64


@kind
def d_magic(buf: bytearray, f: Facts, rng: random.Random) -> str:
    return one_site(buf, rng, 0, 8, "magic")


@kind
def d_immutable(buf: bytearray, f: Facts, rng: random.Random) -> str:
    return one_site(buf, rng, 8, F.CRC_END + 8, "immutable header field or its CRC")


@kind
def d_immutable_resealed(buf: bytearray, f: Facts, rng: random.Random) -> str:
    name, i = rng.choice([("version", F.H_VERSION), ("features", F.H_FEATURES),
                          ("byte_order", F.H_BYTE_ORDER), ("uuid", F.H_UUID),
                          ("ctl_off", F.H_CTL_OFF), ("blocks_off", F.H_BLOCKS_OFF),
                          ("created", F.H_CREATED), ("fl_count", F.H_FL_COUNT),
                          ("sl_count", F.H_SL_COUNT), ("class_count", F.H_CLASS_COUNT),
                          ("page", F.H_PAGE), ("secret", F.H_SECRET)])
    old = word(buf, i)
    v = {"version": rng.choice((0, 1, 3, 1 << 32)), "features": 1 << rng.randrange(64),
         "byte_order": int.from_bytes(old.to_bytes(8, "little"), "big")}.get(
        name, rng.choice((0, old + 1, old * 2, old ^ 1 << rng.randrange(64))))
    note = set_word(buf, i, v, f"{name}, CRC recomputed")
    put(buf, F.H_CRC, F.header_crc(buf))
    return note


def _header_kind(name: str, i: int,
                 values: Callable[[Facts, random.Random, int], list[int]]) -> None:
    def damage(buf: bytearray, f: Facts, rng: random.Random) -> str:
        old = word(buf, i)
        return set_word(buf, i, rng.choice([*values(f, rng, old), near(rng, old)]), name)

    KINDS[name] = damage


_MC = F.min_capacity()
_header_kind("capacity", F.H_CAPACITY, lambda f, r, v: [
    v - F.PAGE, v + F.PAGE, v - 65536, f.size + F.PAGE, _MC, 2 * v, v + 8])
_header_kind("brk", F.H_BRK, lambda f, r, v: [
    v - 8, v + 8, v - f.used_blocks[-1][1], v + F.PAGE, f.meta, f.meta + 8, F.BLOCKS_OFF,
    r.choice(f.free_blocks)[0] if f.free_blocks else v - 8])
_header_kind("zero_from", F.H_ZERO_FROM, lambda f, r, v: [
    f.brk, f.brk - 8, f.brk + 8, (f.brk + v) // 2 & -8, f.meta, f.meta + 8])
_header_kind("hole_from", F.H_HOLE_FROM, lambda f, r, v: [
    0, f.brk, F.BLOCKS_OFF, f.meta, f.meta + 8])
_header_kind("generation", F.H_GENERATION, lambda f, r, v: [0, 1, v + 1, v - 1])
_header_kind("entry_root", F.H_ROOT, lambda f, r, v: [some_pointer(f, r, v)] * 4)
_header_kind("entry_objects", F.H_OBJECTS, lambda f, r, v: [some_pointer(f, r, v)] * 4)
_header_kind("entry_txlog", F.H_TXLOG, lambda f, r, v: [some_pointer(f, r, v)] * 4)
_header_kind("max_size", F.H_MAX_SIZE, lambda f, r, v: [
    0, f.cap - F.PAGE, f.cap, f.cap + 1, f.cap + F.PAGE, _MC, 1, 1 << 63])
_header_kind("peak_brk", F.H_PEAK_BRK, lambda f, r, v: [f.brk - 8, f.brk, f.meta, f.meta + 8])
_header_kind("owner_pid", F.H_OWNER_PID, lambda f, r, v: [1, r.randrange(2, 1 << 22), 1 << 63])
_header_kind("owner_state", F.H_OWNER_STATE, lambda f, r, v: [F.STATE_REBUILD, 1, 3])
_header_kind("obj_seq", F.H_OBJ_SEQ, lambda f, r, v: [1, 3, v + 1, 1 << 63 | 1])
_header_kind("recoveries", F.H_RECOVERIES, lambda f, r, v: [1, v + 1, M64])
_header_kind("j_state_invalid", F.J_STATE, lambda f, r, v: [3, 4, 1 << r.randrange(2, 64), M64])


# -- the journals ---------------------------------------------------------------------------------


def word_record(i: int, old: int) -> list[int]:
    """A word record with a good check word."""
    return [i, old & M64, (i ^ old ^ F.J_MIX) & M64]


def range_record(off: int, data: bytes) -> list[int]:
    """A byte-range record with a good CRC."""
    n = len(data)
    pad = data + bytes(-n % 8)
    return [F.RANGE_FLAG | n, off, zlib.crc32(data) ^ off ^ n,
            *struct.unpack(f"<{len(pad) // 8}Q", pad)]


def live_word(f: Facts, rng: random.Random) -> int:
    off, (u, _) = rng.choice(list(f.live.items()))
    return (off >> 3) + rng.randrange(u >> 3)


def live_range(f: Facts, rng: random.Random) -> tuple[int, int]:
    off, (u, _) = rng.choice(list(f.live.items()))
    start = off + 8 * rng.randrange(u >> 3)
    return start, rng.randint(1, min(64, off + u - start))


def forged_live(f: Facts, rng: random.Random) -> list[int]:
    """1-3 records with good checks that would restore live payload bytes to other values."""
    out: list[int] = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            out += word_record(live_word(f, rng), rng.getrandbits(64))
        else:
            start, n = live_range(f, rng)
            out += range_record(start, rng.randbytes(n))
    return out


def meta_word(buf: bytearray, f: Facts, rng: random.Random) -> int:
    """Index of a word of the allocator's own state: tags, links, bins, runs, maps, header."""
    u = rng.choice(f.used_blocks)[0]
    b, size = rng.choice(f.free_blocks)
    base, c = rng.choice(f.runs)
    m = F.CLASS_WORDS[c]
    choices = [u >> 3, b >> 3, (b >> 3) + 1, (b >> 3) + 2, ((b + size) >> 3) - 1,
               F.C_HEADS + rng.randrange(F.FL_COUNT * F.SL_COUNT),
               F.C_SL_BITMAP + rng.randrange(F.FL_COUNT), F.C_FL_BITMAP,
               (base >> 3) + rng.randrange(3 * m), (base >> 3) - 1,
               F.C_CLASS_HEADS + c, F.C_CLASS_CACHE + c,
               (f.meta >> 3) + rng.randrange(F.page_map_bytes(f.cap) >> 3),
               (f.bitmap >> 3) + rng.randrange(F.bitmap_bytes(f.cap) >> 3),
               F.H_BRK, F.H_ZERO_FROM, F.H_CAPACITY, F.H_HOLE_FROM, F.H_ROOT, F.H_OBJECTS,
               F.H_TXLOG, F.H_PEAK_BRK, F.H_GENERATION, F.H_MAX_SIZE]
    return rng.choice(choices)


def write_log(buf: bytearray, start: int, words: list[int]) -> None:
    for k, v in enumerate(words):
        put(buf, start + k, v)


def log_of(f: Facts, tx: bool) -> tuple[int, int]:
    """Word range [start, end) of the header journal or of the transaction log."""
    return (f.txlog >> 3, f.txlog_end >> 3) if tx else (F.J_RECORDS, F.J_END)


def _journal(buf: bytearray, f: Facts, rng: random.Random, tx: bool, recs: list[int],
             what: str) -> str:
    start, end = log_of(f, tx)
    assert len(recs) <= end - start, (len(recs), end - start)
    write_log(buf, start, recs)
    put(buf, F.J_STATE, F.J_TX if tx else F.J_OP)
    note = f"j_state {2 if tx else 1}, {what} at {start * 8}"
    if rng.random() < 0.5:  # as a dead holder would have left it
        put(buf, F.H_OWNER_PID, rng.randrange(2, 1 << 22))
        note += ", owner_pid set"
    return note


@kind
def d_journal_stale(buf: bytearray, f: Facts, rng: random.Random) -> str:
    return set_word(buf, F.J_STATE, F.J_OP, "j_state (the last operation's records are stale)")


@kind
def d_txlog_stale(buf: bytearray, f: Facts, rng: random.Random) -> str:
    return set_word(buf, F.J_STATE, F.J_TX, "j_state (the last transaction's log is stale)")


@kind
def d_journal_forged(buf: bytearray, f: Facts, rng: random.Random) -> str:
    return _journal(buf, f, rng, False, forged_live(f, rng) + [0],
                    "records with good checks over live payload")


@kind
def d_txlog_forged(buf: bytearray, f: Facts, rng: random.Random) -> str:
    return _journal(buf, f, rng, True, forged_live(f, rng) + [0],
                    "records with good checks over live payload")


@kind
def d_journal_forged_meta(buf: bytearray, f: Facts, rng: random.Random) -> str:
    recs: list[int] = []
    for _ in range(rng.randint(1, 3)):
        i = meta_word(buf, f, rng)
        recs += word_record(i, rng.choice((0, near(rng, word(buf, i)), rng.getrandbits(64))))
    return _journal(buf, f, rng, rng.random() < 0.3, recs + [0],
                    f"records with good checks over allocator words {recs[0::3]}")


def _valid_recs(buf: bytearray, f: Facts, rng: random.Random) -> list[int]:
    if rng.random() < 0.5:
        return forged_live(f, rng)
    i = meta_word(buf, f, rng)
    return word_record(i, near(rng, word(buf, i)))


@kind
def d_journal_bad_check(buf: bytearray, f: Facts, rng: random.Random) -> str:
    tx = rng.random() < 0.3
    recs = _valid_recs(buf, f, rng)
    # Damage the first record: its old value or check word (a word record), its offset or
    # check word (a range record), or a low bit of a word record's index (never making it 0).
    k = rng.choice((0, 1, 2) if not recs[0] & F.RANGE_FLAG else (1, 2))
    bit = rng.randrange(64)
    if k == 0:
        bit = rng.randrange(recs[0].bit_length() - 1) if recs[0] > 1 else 1
    recs[k] ^= 1 << bit
    return _journal(buf, f, rng, tx, recs + [0], f"a record with a bad check (word {k}, bit "
                                                 f"{bit} flipped)")


@kind
def d_journal_bad_crc(buf: bytearray, f: Facts, rng: random.Random) -> str:
    tx = rng.random() < 0.3
    start, n = live_range(f, rng)
    recs = range_record(start, rng.randbytes(n))
    k = rng.randrange(3, len(recs))  # a data word: flip a bit inside the n bytes
    recs[k] ^= 1 << rng.randrange(min(64, 8 * (n - 8 * (k - 3))))
    return _journal(buf, f, rng, tx, recs + [0], "a range record whose data fails its CRC")


@kind
def d_journal_past_log(buf: bytearray, f: Facts, rng: random.Random) -> str:
    tx = rng.random() < 0.3
    start, end = log_of(f, tx)
    size = end - start
    how = 0 if tx else rng.randrange(3)
    if how == 0:  # a range record longer than what is left of the log
        n = 8 * size - rng.randrange(0, 16)
        recs = [F.RANGE_FLAG | n, live_range(f, rng)[0], 0]
        return _journal(buf, f, rng, tx, recs, f"a {n}-byte range record past the log")
    if how == 1:  # valid word records, then a record start in the last two words
        recs = []
        for _ in range(size // 3):
            recs += word_record(live_word(f, rng), rng.getrandbits(64))
        recs += [live_word(f, rng)] * (size - len(recs))
        return _journal(buf, f, rng, False, recs, "valid records filling the log, no end")
    q = (size - 4) // 3  # q word records and one range record fill the log exactly
    recs = []
    for _ in range(q):
        recs += word_record(live_word(f, rng), rng.getrandbits(64))
    data_words = size - 3 * q - 3
    recs += range_record(live_range(f, rng)[0] & -8, rng.randbytes(8 * data_words))
    return _journal(buf, f, rng, False, recs, "valid records exactly filling the log, no end")


@kind
def d_journal_forbidden(buf: bytearray, f: Facts, rng: random.Random) -> str:
    tx = rng.random() < 0.3
    start, end = log_of(f, tx)
    words = f.size >> 3
    how = rng.randrange(8)
    if how == 0:
        recs = word_record(rng.randrange(1, F.H_CAPACITY), rng.getrandbits(64))  # 0 ends
    elif how == 1:
        recs = word_record(rng.randrange(F.J_STATE, F.J_END), rng.getrandbits(64))
    elif how == 2:
        recs = word_record(rng.randrange(F.H_OWNER_PID, F.H_JOURNAL), rng.getrandbits(64))
    elif how == 3:
        recs = word_record(words + rng.randrange(1 << 20), rng.getrandbits(64))
    elif how == 4:
        recs = word_record(rng.choice((F.H_CAPACITY, F.H_BRK)),
                           rng.choice((f.cap + 8, f.size + F.PAGE, 1 << 40, 12345)))
    elif how == 5:
        recs = range_record(rng.randrange(0, F.BLOCKS_OFF - 64), rng.randbytes(64))
    elif how == 6:
        recs = range_record(f.size - rng.randrange(0, 32), rng.randbytes(64))
    else:
        recs = range_record(start * 8 + 8 * rng.randrange(4), rng.randbytes(64))
    return _journal(buf, f, rng, tx, recs + [0], f"a record naming what no undo may touch "
                                                 f"(case {how})")


@kind
def d_txlog_entry(buf: bytearray, f: Facts, rng: random.Random) -> str:
    put(buf, F.J_STATE, F.J_TX)
    v = f.txlog
    while v == f.txlog:  # another log than the one whose records are stale (txlog_stale)
        v = some_pointer(f, rng, f.txlog)
    return set_word(buf, F.H_TXLOG, v, "j_state 2 and txlog")


# -- blocks and bins ------------------------------------------------------------------------------


@kind
def d_block_header(buf: bytearray, f: Facts, rng: random.Random) -> str:
    b, size = rng.choice(f.used_blocks + f.free_blocks)
    h = word(buf, b >> 3)
    v = rng.choice((h ^ F.FREE, h ^ F.PREV_FREE, h ^ 4, h + 8, h - 8, h + F.PAGE, h - F.PAGE,
                    (h & 7) | 2 * size, h | rng.randrange(1, 40) << F.CLASS_SHIFT,
                    h ^ 1 << rng.randrange(64), 0, rng.getrandbits(64)))
    return set_word(buf, b >> 3, v, f"header of {'free' if h & 1 else 'used'} block {b}")


@kind
def d_block_footer(buf: bytearray, f: Facts, rng: random.Random) -> str:
    b, size = rng.choice(f.free_blocks)
    i = ((b + size) >> 3) - 1
    return set_word(buf, i, near(rng, size), f"footer of free block {b}")


@kind
def d_free_links(buf: bytearray, f: Facts, rng: random.Random) -> str:
    b, size = rng.choice(f.free_blocks)
    which = rng.choice((1, 2))
    i = (b >> 3) + which
    v = rng.choice((0, b, rng.choice(f.free_blocks)[0], rng.choice(f.used_blocks)[0],
                    near(rng, word(buf, i)), rng.choice(f.runs)[0] - 8))
    return set_word(buf, i, v, f"{'next' if which == 1 else 'prev'} link of free block {b}")


@kind
def d_bins(buf: bytearray, f: Facts, rng: random.Random) -> str:
    how = rng.randrange(4)
    heads = range(F.C_HEADS, F.C_HEADS + F.FL_COUNT * F.SL_COUNT)
    if how == 0:
        full = [i for i in heads if word(buf, i)]
        i = rng.choice(full)
        v = rng.choice((0, rng.choice(f.free_blocks)[0], rng.choice(f.used_blocks)[0],
                        near(rng, word(buf, i))))
        return set_word(buf, i, v, "head of a non-empty bin")
    if how == 1:
        i = rng.choice([i for i in heads if not word(buf, i)])
        return set_word(buf, i, rng.choice(f.free_blocks)[0], "head of an empty bin")
    i = F.C_FL_BITMAP if how == 2 else F.C_SL_BITMAP + rng.randrange(F.FL_COUNT)
    return set_word(buf, i, word(buf, i) ^ 1 << rng.randrange(64),
                    "first-level bitmap" if how == 2 else "second-level bitmap")


# -- runs -----------------------------------------------------------------------------------------


@kind
def d_run_header(buf: bytearray, f: Facts, rng: random.Random) -> str:
    base, c = rng.choice(f.runs)
    i = (base >> 3) - 1
    h = word(buf, i)
    other = rng.choice([k for k in range(F.CLASS_COUNT) if k != c])
    v = rng.choice((h & ~(0xFF << F.CLASS_SHIFT) | other << F.CLASS_SHIFT,
                    h & ~(0xFF << F.CLASS_SHIFT) | rng.randrange(F.CLASS_COUNT, 256)
                    << F.CLASS_SHIFT, h & ~F.RUN, h | F.FREE, h + F.PAGE, h - F.PAGE,
                    h ^ F.PREV_FREE, h ^ 1 << rng.randrange(64)))
    return set_word(buf, i, v, f"header of the class-{F.CLASS_SIZE[c]} run at {base - 8}")


@kind
def d_run_bitmap(buf: bytearray, f: Facts, rng: random.Random) -> str:
    how = rng.randrange(5)
    if how == 0:  # a bit past the slot count
        runs = [(b, c) for b, c in f.runs if F.CLASS_MASKS[c][-1] != M64]
        base, c = rng.choice(runs)
        j = F.CLASS_WORDS[c] - 1
        mask = F.CLASS_MASKS[c][j]
        bit = rng.randrange(mask.bit_length(), 64)
        i = (base >> 3) + j
        return set_word(buf, i, word(buf, i) | 1 << bit, f"slot bitmap of run {base - 8}: bit "
                                                         f"{bit} past the {F.CLASS_SLOTS[c]} slots")
    if how == 1:  # a live slot marked free
        p, base, idx = rng.choice(f.used_slots)
        i = (base >> 3) + (idx >> 6)
        return set_word(buf, i, word(buf, i) | 1 << (idx & 63),
                        f"slot bitmap: live slot {p} marked free")
    if how == 2 and f.free_slots:  # a free slot marked used
        p, base, idx = rng.choice(f.free_slots)
        i = (base >> 3) + (idx >> 6)
        return set_word(buf, i, word(buf, i) & ~(1 << (idx & 63)),
                        f"slot bitmap: free slot {p} marked used")
    base, c = rng.choice(f.runs)
    j = rng.randrange(F.CLASS_WORDS[c])
    i = (base >> 3) + j
    v = rng.choice((0, F.CLASS_MASKS[c][j], word(buf, i) ^ 1 << rng.randrange(64)))
    return set_word(buf, i, v, f"slot bitmap word {j} of run {base - 8}")


@kind
def d_run_links(buf: bytearray, f: Facts, rng: random.Random) -> str:
    base, c = rng.choice(f.runs)
    m = F.CLASS_WORDS[c]
    same = [b for b, k in f.runs if k == c and b != base]
    how = rng.randrange(4)
    if how < 2:  # next or prev word of a bitmap word
        j = rng.randrange(m)
        i = (base >> 3) + j + m * (1 + how)
        v = rng.choice((0, (base >> 3) + j, (rng.choice(same) >> 3) if same else 1,
                        near(rng, word(buf, i)), (rng.choice(f.runs)[0] >> 3)))
        return set_word(buf, i, v, f"{'next' if how == 0 else 'prev'} link of bitmap word {j} "
                                   f"of run {base - 8}")
    if how == 2:
        i = F.C_CLASS_HEADS + c
        v = rng.choice((0, base >> 3, (rng.choice(same) >> 3) if same else 0,
                        rng.choice(f.runs)[0] >> 3, near(rng, word(buf, i))))
        return set_word(buf, i, v, f"class-{F.CLASS_SIZE[c]} list head")
    i = F.C_CLASS_CACHE + c
    v = rng.choice((0, base, rng.choice(same) if same else base, rng.choice(f.runs)[0],
                    rng.choice(f.used_blocks)[0] + 8 & -F.PAGE, near(rng, word(buf, i))))
    return set_word(buf, i, v, f"class-{F.CLASS_SIZE[c]} cache")


@kind
def d_page_map(buf: bytearray, f: Facts, rng: random.Random) -> str:
    pm = f.meta
    how = rng.randrange(3)
    if how == 0:  # a page of a run
        base, c = rng.choice(f.runs)
        page = (base >> 12) + rng.randrange(F.CLASS_PAGES[c])
        v = rng.choice((0, F.page_map_byte(rng.randrange(F.CLASS_COUNT), 0),
                        F.page_map_byte(c, rng.randrange(1, 4)), 31, rng.randrange(256)))
    elif how == 1:  # a page of a block
        b, size = rng.choice(f.used_blocks + f.free_blocks)
        page = (b + 8 + rng.randrange(max(size - 8, 1))) >> 12
        v = F.page_map_byte(rng.randrange(F.CLASS_COUNT), rng.randrange(2))
    else:  # any byte of the page map, past the capacity's pages included
        page = rng.randrange(F.page_map_bytes(f.cap))
        v = rng.randrange(1, 256)
    old = buf[pm + page]
    buf[pm + page] = v
    return f"page-map byte of page {page} (offset {pm + page}): {old:#x} -> {v:#x}"


@kind
def d_alloc_bitmap(buf: bytearray, f: Facts, rng: random.Random) -> str:
    how = rng.randrange(4)
    if how == 0:
        b = rng.choice(f.used_blocks)[0]
    elif how == 1:
        b = rng.choice(f.free_blocks)[0]
    elif how == 2:
        b = rng.choice(f.used_slots + f.free_slots)[0]
    else:
        b = rng.randrange(F.BLOCKS_OFF >> 3, f.cap >> 3) << 3
    pos = f.bitmap + (b >> 6)
    old = buf[pos]
    buf[pos] ^= 1 << ((b >> 3) & 7)
    return f"allocation-bitmap bit of offset {b} (byte {pos}): {old:#04x} -> {buf[pos]:#04x}"


# -- bytes ----------------------------------------------------------------------------------------


@kind
def d_above_zero_from(buf: bytearray, f: Facts, rng: random.Random) -> str:
    zf = word(buf, F.H_ZERO_FROM)
    pos = rng.randrange(zf, f.meta)
    old = buf[pos]
    buf[pos] = rng.randrange(1, 256)
    return f"byte {pos} above zero_from {zf}: {old:#04x} -> {buf[pos]:#04x}"


@kind
def d_user_bytes(buf: bytearray, f: Facts, rng: random.Random) -> str:
    off, (u, _) = rng.choice(list(f.live.items()))
    return one_site(buf, rng, off, off + u, f"payload of live allocation {off}")


@kind
def d_free_space(buf: bytearray, f: Facts, rng: random.Random) -> str:
    how = rng.randrange(3)
    zf = word(buf, F.H_ZERO_FROM)
    if how == 0 and f.free_slots:
        p, base, idx = rng.choice(f.free_slots)
        c = next(c for b, c in f.runs if b == base)
        return one_site(buf, rng, p, p + F.CLASS_SIZE[c], f"free slot {p}")
    if how == 1 or zf <= f.brk:
        b, size = rng.choice([x for x in f.free_blocks if x[1] > 32])
        return one_site(buf, rng, b + 24, b + size - 8, f"inside free block {b}")
    return one_site(buf, rng, f.brk, zf, "wilderness below zero_from")


@kind
def d_random_bytes(buf: bytearray, f: Facts, rng: random.Random) -> str:
    return one_site(buf, rng, 0, len(buf), "anywhere")


@kind
def d_truncate(buf: bytearray, f: Facts, rng: random.Random) -> str:
    n = rng.choice((0, 7, F.HEADER_SIZE - 1, F.HEADER_SIZE, F.BLOCKS_OFF, rng.randrange(len(buf)),
                    len(buf) - F.PAGE, len(buf) - 1, f.brk, f.meta))
    del buf[n:]
    return f"file truncated to {n} bytes (was {f.size})"


@kind
def d_extend(buf: bytearray, f: Facts, rng: random.Random) -> str:
    tail = rng.choice((b"\1", bytes(F.PAGE), rng.randbytes(F.PAGE), rng.randbytes(65536),
                       bytes(1 << 20)))
    buf += tail
    return f"file extended by {len(tail)} bytes ({'zero' if not any(tail) else 'random'})"


# ---------------------------------------------------------------------------------------------
# The diff
# ---------------------------------------------------------------------------------------------


def diff(a: bytes, b: bytes) -> list[tuple[int, bytes, bytes]]:
    """The byte ranges where ``b`` differs from ``a``: (offset, old bytes, new bytes); a length
    change is one more range at the shorter length."""
    out: list[tuple[int, bytes, bytes]] = []
    n = min(len(a), len(b))
    step = 4096
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        if a[lo:hi] == b[lo:hi]:
            continue
        i = lo
        while i < hi:
            if a[i] != b[i]:
                j = i
                while j < hi and a[j] != b[j]:
                    j += 1
                if out and out[-1][0] + len(out[-1][1]) == i:
                    o, x, y = out.pop()
                    out.append((o, x + a[i:j], y + b[i:j]))
                else:
                    out.append((i, a[i:j], b[i:j]))
                i = j
            else:
                i += 1
    if len(a) != len(b):
        out.append((n, a[n:n + 16], b[n:n + 16]))
    return out


def describe(d: list[tuple[int, bytes, bytes]], size_a: int, size_b: int) -> str:
    if size_a != size_b:
        head = f"file length {size_a} -> {size_b}"
        d = d[:-1]
    else:
        head = ""
    parts = [f"[{o}] {x.hex()} -> {y.hex()}" if len(x) <= 32 else
             f"[{o}..{o + len(x)}) {len(x)} bytes: {x[:16].hex()}... -> {y[:16].hex()}..."
             for o, x, y in d[:12]]
    if len(d) > 12:
        parts.append(f"... {len(d) - 12} more ranges")
    return "; ".join(([head] if head else []) + parts)


# ---------------------------------------------------------------------------------------------
# The checker (runs in a forked child)
# ---------------------------------------------------------------------------------------------


class Spans:
    """Disjoint byte ranges [start, end), for overlap queries."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: dict[int, int] = {}

    def add(self, a: int, b: int) -> None:
        bisect.insort(self.starts, a)
        self.ends[a] = b

    def remove(self, a: int) -> None:
        del self.starts[bisect.bisect_left(self.starts, a)]
        del self.ends[a]

    def hit(self, a: int, b: int) -> int | None:
        """Start of a range overlapping [a, b), or None."""
        i = bisect.bisect_left(self.starts, b) - 1
        if i >= 0 and self.ends[self.starts[i]] > a:
            return self.starts[i]
        return None


@dataclass
class Alloc:
    usable: int
    data: bytes
    slot: bool

    def span(self, off: int) -> tuple[int, int]:
        return (off if self.slot else off - 8), off + self.usable


def verify(h: pheap.Heap, expect: dict[int, Alloc], entries: dict[str, int], when: str,
           lenient: bool = False) -> None:
    """Every live allocation has its usable size and bytes, every entry its value; raises
    Silent. ``lenient`` (after the heap reported damage): allocations it refuses to read are
    skipped, but bytes that read wrong are still silent wrong data."""
    with h.lock() as s:
        for off, a in expect.items():
            try:
                n = s.usable_size(off)
                got = s.read(off, a.usable) if n == a.usable else b""
            except pheap.InvalidPointerError as e:
                if lenient:
                    continue
                raise Silent(f"{when}: live allocation {off} ({a.usable} B) is no longer live: "
                             f"{e}") from None
            except pheap.PheapError:
                if lenient:
                    continue
                raise
            if n != a.usable:
                raise Silent(f"{when}: live allocation {off} has usable size {n}, was {a.usable}")
            if got != a.data:
                i = next(k for k in range(len(got)) if got[k] != a.data[k])
                raise Silent(f"{when}: live allocation {off} ({a.usable} B): byte {i} (offset "
                             f"{off + i}) reads {got[i]:#04x}, expected {a.data[i]:#04x}")
        for name, v in entries.items():
            cur = s.entry(name)
            if cur != v:
                raise Silent(f"{when}: header entry {name!r} is {cur}, was {v}")


class Workload:
    """A short workload on a heap that passed open and check(), watching for silent damage."""

    def __init__(self, h: pheap.Heap, path: str, expect: dict[int, Alloc], f: Facts,
                 rng: random.Random) -> None:
        self.h = h
        self.fd = os.open(path, os.O_RDONLY)
        self.expect = expect
        self.f = f
        self.rng = rng
        self.prot = Spans()
        self.prot.add(0, F.BLOCKS_OFF)
        for off, a in expect.items():
            self.prot.add(*a.span(off))
        self.pinned = set(f.entries.values())
        self.new: list[int] = []
        self.ops: list[str] = []

    def close(self) -> None:
        os.close(self.fd)

    def header(self, i: int) -> int:
        return struct.unpack("<Q", os.pread(self.fd, 8, i * 8))[0]

    def fresh(self, s: pheap.Session, p: int, n: int, slot: bool, what: str) -> Alloc:
        """Vet a new allocation of ``n`` bytes at ``p`` (not yet in ``prot``)."""
        u = s.usable_size(p)
        if u < n:
            raise Silent(f"{what}({n}) returned {p} with usable size {u}")
        a = Alloc(u, b"", slot)
        lo, hi = a.span(p)
        cap = self.header(F.H_CAPACITY)
        if lo < F.BLOCKS_OFF or hi > F.meta_off(cap):
            raise Silent(f"{what}({n}) returned [{lo}, {hi}), outside the block area "
                         f"[{F.BLOCKS_OFF}, {F.meta_off(cap)})")
        other = self.prot.hit(lo, hi)
        if other is not None:
            raise Silent(f"{what}({n}) returned [{lo}, {hi}), overlapping live data at {other}")
        # The transaction log, when the entry names a used block that is not a run and not a
        # tracked allocation (those are in prot already): the next transaction writes there.
        t = self.header(F.H_TXLOG)
        hdr = self.header((t >> 3) - 1) if 8 < t < cap and not t & 7 else F.FREE
        te = t - 8 + (hdr & F.SIZE_MASK)
        if t not in self.expect and not hdr & (F.FREE | F.RUN) and \
                hdr & F.SIZE_MASK >= F.MIN_BLOCK and te <= self.header(F.H_BRK):
            if lo < te and t - 8 < hi:
                raise Silent(f"{what}({n}) returned [{lo}, {hi}), overlapping the transaction "
                             f"log [{t - 8}, {te})")
        return a

    def adopt(self, s: pheap.Session, p: int, a: Alloc) -> None:
        """Fill new allocation ``p`` with fresh bytes and protect it."""
        a.data = self.rng.randbytes(a.usable)
        s.write(p, a.data)
        self.expect[p] = a
        self.prot.add(*a.span(p))
        self.new.append(p)

    def drop(self, p: int) -> None:
        a = self.expect.pop(p)
        self.prot.remove(a.span(p)[0])
        if p in self.new:
            self.new.remove(p)

    def victim(self, new: bool) -> int | None:
        pool = self.new if new else [o for o in self.expect if o not in self.pinned]
        return self.rng.choice(pool) if pool else None

    # -- operations ------------------------------------------------------------------------------

    def malloc(self, s: pheap.Session, n: int) -> None:
        p = s.malloc(n)
        self.adopt(s, p, self.fresh(s, p, n, n <= F.RUN_LIMIT, "malloc"))

    def calloc(self, s: pheap.Session, count: int, size: int) -> None:
        n = count * size
        p = s.calloc(count, size)
        a = self.fresh(s, p, n, n <= F.RUN_LIMIT, "calloc")
        got = s.read(p, n)
        if got.count(0) != n:
            i = next(k for k, x in enumerate(got) if x)
            raise Silent(f"calloc({count}, {size}) returned {p} whose byte {i} is {got[i]:#04x}")
        self.adopt(s, p, a)

    def free(self, s: pheap.Session, p: int) -> None:
        s.free(p)
        self.drop(p)

    def realloc(self, s: pheap.Session, p: int, n: int) -> None:
        old = self.expect[p]
        self.prot.remove(old.span(p)[0])
        try:
            q = s.realloc(p, n)
        except BaseException:
            self.prot.add(*old.span(p))
            raise
        del self.expect[p]
        if p in self.new:
            self.new.remove(p)
        a = self.fresh(s, q, n, old.slot if q == p else n <= F.RUN_LIMIT, "realloc")
        keep = min(old.usable, n)
        got = s.read(q, keep)
        if got != old.data[:keep]:
            i = next(k for k in range(keep) if got[k] != old.data[k])
            raise Silent(f"realloc({p}, {n}) -> {q} lost byte {i}: {got[i]:#04x}, expected "
                         f"{old.data[i]:#04x}")
        self.adopt(s, q, a)

    def run(self) -> None:
        rng = self.rng
        plan = ["slot"] * rng.randint(3, 6) + ["block"] * rng.randint(2, 4) + \
            ["calloc_slot", "calloc_block", "free_old", "free_old", "free_new", "realloc",
             "realloc", "transaction", "atomic"]
        if rng.random() < 0.25:
            plan.append("grow")
        rng.shuffle(plan)
        for op in plan:
            self.ops.append(op)
            try:
                self.step(op)
            except (pheap.HeapFullError, pheap.JournalFullError) as e:
                self.ops[-1] += f" ({type(e).__name__})"

    def step(self, op: str) -> None:
        rng = self.rng
        h = self.h
        if op == "transaction":
            return self.bracket(h.transaction())
        if op == "atomic":
            return self.bracket(h.atomic())
        with h.lock() as s:
            if op == "slot":
                self.malloc(s, _slot_size(rng))
            elif op == "block":
                self.malloc(s, rng.randint(F.RUN_LIMIT + 1, 20_000))
            elif op == "calloc_slot":
                self.calloc(s, rng.randint(1, 7), rng.choice((1, 8, 24, 56)))
            elif op == "calloc_block":
                self.calloc(s, rng.randint(1, 9), rng.choice((100, 512, 3000)))
            elif op == "grow":
                self.calloc(s, 1, self.f.meta - self.f.brk + rng.randint(8, 300_000))
            elif op in ("free_old", "free_new"):
                p = self.victim(op == "free_new")
                if p is not None:
                    self.free(s, p)
            elif op == "realloc":
                p = self.victim(rng.random() < 0.3)
                if p is not None:
                    self.realloc(s, p, rng.choice((_slot_size(rng),
                                                   rng.randint(F.RUN_LIMIT + 1, 9000))))
        return None

    def bracket(self, ctx: AbstractContextManager[pheap.Session]) -> None:
        """A transaction or atomic bracket: a logged rewrite of live bytes, a word store, a new
        slot and block, a free of something allocated in it; applied to the model on commit."""
        rng = self.rng
        before = dict(self.expect)
        prot_before = (list(self.prot.starts), dict(self.prot.ends))
        new_before = list(self.new)
        try:
            with ctx as s:
                p = self.victim(False)
                if p is not None:
                    a = self.expect[p]
                    k = min(a.usable, 64)
                    start = rng.randrange(a.usable - k + 1) & -8
                    data = rng.randbytes(k)
                    s.write(p, data, start)
                    self.expect[p] = Alloc(a.usable, a.data[:start] + data +
                                           a.data[start + k:], a.slot)
                    v = rng.getrandbits(64)
                    s.set_u64(p, 0, v)
                    d = self.expect[p].data
                    self.expect[p] = Alloc(a.usable, struct.pack("<Q", v) + d[8:], a.slot)
                self.malloc(s, _slot_size(rng))
                self.malloc(s, rng.randint(F.RUN_LIMIT + 1, 1500))
                self.free(s, self.new[-1])
        except BaseException:
            self.expect.clear()
            self.expect.update(before)
            self.prot.starts, self.prot.ends = prot_before
            self.new[:] = new_before
            raise


def _slot_size(rng: random.Random) -> int:
    return rng.randint(0, F.RUN_LIMIT)


def phase_read(path: str, expect: dict[int, Alloc], entries: dict[str, int]) -> str:
    """Open read-only and check; when both pass, verify. Returns the outcome."""
    try:
        h = pheap.open(path, "r")
    except pheap.PheapError:
        return "refused"
    try:
        try:
            h.check()
        except pheap.PheapError:
            return "reported"
        try:
            verify(h, expect, entries, "read-only open")
        except pheap.PheapError:
            return "reported late"
    finally:
        h.close()
    return "ok"


def phase_write(path: str, expect: dict[int, Alloc], entries: dict[str, int], f: Facts,
                rng: random.Random, log: dict[str, object]) -> str:
    """Open read-write (recovery) and check; when both pass, verify, run the workload, check,
    verify, reopen, check and verify. Returns the outcome."""
    try:
        h = pheap.open(path, "w")
    except pheap.PheapError as e:
        log["error"] = f"{type(e).__name__}: {e}"
        return "refused"
    late: pheap.PheapError | None = None
    wl = None
    try:
        try:
            h.check()
        except pheap.PheapError as e:
            log["error"] = f"{type(e).__name__}: {e}"
            return "reported"
        try:
            verify(h, expect, entries, "read-write open")
            wl = Workload(h, path, expect, f, rng)
            try:
                wl.run()
            finally:
                log["ops"] = wl.ops
                wl.close()
            h.check()
            verify(h, expect, entries, "after the workload")
        except pheap.PheapError as e:
            late = e
            try:
                verify(h, expect, entries, "after a late report", lenient=True)
            except pheap.PheapError:
                pass
    finally:
        h.close()
    if late is None:
        try:
            with pheap.open(path, "w") as h:
                h.check()
                verify(h, expect, entries, "after a reopen")
        except pheap.PheapError as e:
            late = e
    if late is not None:
        log["error"] = f"{type(late).__name__}: {late}"
        return "reported late"
    return "harmless"


def examine(path: str, f: Facts, source: bytes, rng: random.Random) -> dict[str, object]:
    """The checker: the outcome of the damaged file at ``path``. ``source`` holds the bytes every
    live allocation must read (the pristine file, or the damaged one for a payload-only diff)."""
    log: dict[str, object] = {}
    expect = {off: Alloc(u, source[off:off + u], slot) for off, (u, slot) in f.live.items()}
    try:
        r = phase_read(path, {o: Alloc(a.usable, a.data, a.slot) for o, a in expect.items()},
                       f.entries)
        log["read-only"] = r
        out = phase_write(path, expect, f.entries, f, rng, log)
    except Silent as e:
        out = "silent wrong data"
        log["detail"] = str(e)
    except pheap.PheapError as e:  # raised where the phases do not expect one
        out = "reported late"
        log["error"] = f"{type(e).__name__}: {e}"
    except BaseException as e:  # anything else is the finding
        out = "unexpected exception"
        log["detail"] = f"{type(e).__name__}: {e}\n" + "".join(
            traceback.format_exception(e)[-6:])
    log["outcome"] = out
    return log


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    k: int
    kind: str
    note: str
    diff: str
    payload_only: bool
    path: str
    rfd: int = -1
    result: dict[str, object] = field(default_factory=dict)
    outcome: str = ""


def make_case(k: int, seed: int, pristine: bytes, f: Facts, kinds: list[str],
              path: str) -> tuple[Case, bytearray]:
    """Damage a copy of ``pristine`` the way case ``k`` does (kinds in turn, the rest random)."""
    rng = random.Random(f"case:{seed}:{k}")
    name = kinds[k % len(kinds)]
    for _ in range(20):
        buf = bytearray(pristine)
        note = KINDS[name](buf, f, rng)
        if buf != pristine:
            break
    else:
        raise RuntimeError(f"case {k}: damage {name} kept changing nothing")
    return new_case(k, name, note, pristine, buf, f, path), buf


def new_case(k: int, name: str, note: str, pristine: bytes, buf: bytes | bytearray, f: Facts,
             path: str) -> Case:
    """A case for damaged bytes ``buf``, its diff computed and judged: payload only or not."""
    d = diff(pristine, buf)
    payload_only = bool(d) and len(buf) == len(pristine) and all(
        f.in_payload(i) for o, x, _ in d for i in range(o, o + len(x)))
    return Case(k, name, note, describe(d, len(pristine), len(buf)), payload_only, path)


def classify(case: Case, buf: bytes | bytearray, seed: int, pristine: bytes, f: Facts) -> Case:
    """Run the checker of one case and wait for its outcome (what the tests use)."""
    pid = start(case, buf, seed, pristine, f)
    _, status = os.waitpid(pid, 0)
    finish(case, status)
    return case


def start(case: Case, buf: bytearray, seed: int, pristine: bytes, f: Facts) -> int:
    """Write the damaged file and fork its checker; return the checker's pid."""
    with open(case.path, "wb") as fh:
        fh.write(buf)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the checker
        code = 70
        try:
            os.close(r)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a parent's handler (pytest's) goes
            signal.alarm(HANG_SECONDS)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))
            rng = random.Random(f"work:{seed}:{case.k}")
            res = examine(case.path, f, bytes(buf) if case.payload_only else pristine, rng)
            data = pickle.dumps({k: (v if not isinstance(v, str) else v[:3000])
                                 for k, v in res.items()})
            os.write(w, data)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    case.rfd = r
    return pid


def finish(case: Case, status: int) -> None:
    """Classify the checker's exit."""
    chunks = []
    while True:
        chunk = os.read(case.rfd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(case.rfd)
    code = os.waitstatus_to_exitcode(status)
    if code == -signal.SIGALRM:
        case.outcome = "hang"
    elif code < 0:
        case.outcome = "crash"
        case.result = {"detail": f"killed by {signal.Signals(-code).name}"}
    elif code or not chunks:
        case.outcome = "unexpected exception"
        case.result = {"detail": f"checker exited with status {code}"}
    else:
        case.result = pickle.loads(b"".join(chunks))
        case.outcome = str(case.result["outcome"])
        if case.outcome == "harmless" and case.payload_only:
            case.outcome = "user bytes"


def prepare(directory: str, seed: int) -> tuple[bytes, Facts]:
    """Build the pristine heap of ``seed`` in ``directory``; return its bytes and facts."""
    base = os.path.join(directory, "pristine.heap")
    build(base, seed)
    with open(base, "rb") as fh:
        pristine = fh.read()
    return pristine, facts_of(base, pristine)


def run(n: int, seed: int, jobs: int, kinds: list[str], verbose: bool, only: int | None = None,
        json_path: str | None = None, keep: str | None = None, trace: bool = False) -> int:
    tmp = tempfile.mkdtemp(prefix="pheap-fuzz-")
    try:
        t0 = time.perf_counter()
        pristine, f = prepare(tmp, seed)
        t_build = time.perf_counter() - t0
        todo = [only] if only is not None else list(range(n))
        free_paths = [os.path.join(tmp, f"case{j}.heap") for j in range(jobs)]
        running: dict[int, Case] = {}
        done: list[Case] = []

        def reap() -> None:
            pid, status = os.wait()
            case = running.pop(pid)
            finish(case, status)
            if case.outcome in FAILURES and keep:
                os.makedirs(keep, exist_ok=True)
                shutil.copyfile(case.path, os.path.join(keep, f"case{case.k}-{case.kind}.heap"))
            free_paths.append(case.path)
            done.append(case)
            if case.outcome in FAILURES or only is not None or trace:
                report(case, sys.stderr)

        t0 = time.perf_counter()
        for k in todo:
            while len(running) >= jobs:
                reap()
            case, buf = make_case(k, seed, pristine, f, kinds, free_paths.pop())
            running[start(case, buf, seed, pristine, f)] = case
        while running:
            reap()
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done.sort(key=lambda c: c.k)
    outcomes = Counter(c.outcome for c in done)
    by_kind: dict[str, Counter[str]] = {}
    for c in done:
        by_kind.setdefault(c.kind, Counter())[c.outcome] += 1
    failures = sum(outcomes[o] for o in FAILURES)
    print(f"fuzz: {len(done)} damaged files in {elapsed:.1f} s (pristine heap: {f.size} bytes, "
          f"{len(f.live)} live allocations, {len(f.runs)} runs, built in {t_build:.1f} s), "
          f"seed {seed}, {jobs} jobs")
    print("  outcomes: " + ", ".join(f"{outcomes[o]} {o}" for o in GOOD) +
          "; failures: " + ", ".join(f"{outcomes[o]} {o}" for o in FAILURES))
    if verbose:
        cols = GOOD + FAILURES
        print(f"  {'kind':22}" + "".join(f"{o.replace(' ', '_')[:11]:>12}" for o in cols))
        for name in sorted(by_kind):
            print(f"  {name:22}" + "".join(f"{by_kind[name][o]:>12}" for o in cols))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"seed": seed, "n": len(done), "outcomes": dict(outcomes),
                       "by_kind": {k: dict(v) for k, v in by_kind.items()},
                       "failures": [{"case": c.k, "kind": c.kind, "outcome": c.outcome,
                                     "note": c.note, "diff": c.diff,
                                     "detail": c.result.get("detail", "")}
                                    for c in done if c.outcome in FAILURES],
                       "cases": [[c.k, c.kind, c.outcome, c.note] for c in done]}, fh, indent=1)
    return 1 if failures else 0


def report(case: Case, out: object) -> None:
    lines = [f"case {case.k} ({case.kind}): {case.outcome.upper()}",
             f"  damage: {case.note}", f"  diff:   {case.diff}"]
    for key in ("read-only", "error", "detail", "ops"):
        if key in case.result:
            lines.append(f"  {key}: {case.result[key]}")
    print("\n".join(lines), file=out)  # type: ignore[call-overload]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("-n", type=int, default=300, help="damaged files (default 300)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the heap and the damage")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                    help="checkers running at once (default: the CPU count)")
    ap.add_argument("-v", "--verbose", action="store_true", help="outcomes per kind of damage")
    ap.add_argument("--kinds", help="comma-separated kinds of damage to use (default: all)")
    ap.add_argument("--list-kinds", action="store_true", help="print the kinds of damage")
    ap.add_argument("--case", type=int, help="run case K of the seed alone and describe it")
    ap.add_argument("--json", help="write the figures and every failure to this file")
    ap.add_argument("--keep", help="copy each failing damaged file into this directory")
    ap.add_argument("--trace", action="store_true", help="describe every case, not only failures")
    args = ap.parse_args(argv)
    if args.list_kinds:
        print("\n".join(sorted(KINDS)))
        return 0
    kinds = sorted(KINDS) if not args.kinds else args.kinds.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kinds {unknown}; --list-kinds names them")
    if args.n < 1 or args.jobs < 1:
        ap.error("-n and --jobs must be at least 1")
    return run(args.n, args.seed, args.jobs, kinds, args.verbose, args.case, args.json,
               args.keep, args.trace)


if __name__ == "__main__":
    sys.exit(main())
