"""Corruption fuzzing: damaged heap files are refused or reported, never a hang or a crash.

Builds a realistic heap file (a random workload with a transaction log, free blocks in many bins,
released pages), then for each iteration copies it, damages the copy in one of several ways, and
in a forked child (with an alarm) opens it and runs ``check()`` -- read-only first, then
read-write, which also runs journal recovery. Outcomes per file:

* ``refused``  -- open raised FormatError/CorruptHeapError (the header could not be trusted);
* ``detected`` -- check() raised CorruptHeapError naming the damage;
* ``harmless`` -- check() passed (the damage hit user bytes or free space, which hold no
  invariant; nothing checks user payloads);
* ``BUG``      -- any other exception, a hang (alarm) or a dead interpreter (signal).

Exits non-zero if any BUG occurred. Small, in CI (tests/test_fuzz.py)::

    python3 tools/fuzz_corrupt.py -n 300 --seed 1

Large, by hand (the figures in the issue notes)::

    python3 tools/fuzz_corrupt.py -n 10000 --seed 1
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pheap  # noqa: E402
from pheap import format as F  # noqa: E402

HANG_SECONDS = 20
EXIT = {0: "harmless", 10: "refused", 11: "detected"}


def build(path: str, seed: int) -> dict:
    """A heap with used and free blocks in many bins, a txlog, released pages; return facts."""
    rng = random.Random(seed)
    with pheap.open(path, "n", size=1 << 20) as h:
        live = []
        for i in range(3000):
            if live and rng.random() < 0.4:
                h.free(live.pop(rng.randrange(len(live))))
            else:
                n = rng.choice((rng.randint(1, 300), rng.randint(1, 5000), 200_000
                                if rng.random() < 0.01 else 40))
                off = h.malloc(n)
                h.write(off, bytes([i % 251]) * min(n, 64))
                live.append(off)
        with h.transaction():
            h.write(live[0], b"tx")
        h.root_offset = live[0]
        blocks = list(h.walk())
        info = h.info()
    return {"blocks": blocks, "brk": info["brk"], "capacity": info["capacity"]}


def word(buf: bytearray, i: int, v: int) -> None:
    struct.pack_into("<Q", buf, i * 8, v & 0xFFFFFFFFFFFFFFFF)


def corrupt(buf: bytearray, facts: dict, rng: random.Random) -> tuple[bytearray, str]:
    """Damage ``buf`` one way; return it (maybe resized) and the kind of damage."""
    free = [b for b in facts["blocks"] if b.free]
    used = [b for b in facts["blocks"] if not b.free]
    kind = rng.choice(["bitflips", "header_field", "immutable", "version", "feature", "truncate",
                       "cycle", "journal", "control", "tag", "footer", "bitmap", "page",
                       "link", "txlog", "magic"])
    if kind == "bitflips":
        hi = rng.choice((F.BLOCKS_OFF, facts["brk"] + 64, len(buf)))
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(0, min(hi, len(buf)))
            buf[pos] ^= 1 << rng.randrange(8)
    elif kind == "header_field":
        i = rng.choice((F.H_CAPACITY, F.H_BRK, F.H_ZERO_FROM, F.H_HOLE_FROM, F.H_GENERATION,
                        F.H_ROOT, F.H_MAX_SIZE, F.H_PEAK_BRK, F.H_TXLOG, F.H_OWNER_STATE))
        word(buf, i, rng.choice((0, 1, 7, 2 ** 63, rng.getrandbits(64),
                                 rng.randrange(len(buf) * 2))))
    elif kind == "immutable":
        pos = rng.randrange(0, F.CRC_END)
        buf[pos] ^= 1 << rng.randrange(8)
    elif kind in ("version", "feature"):
        if kind == "version":
            word(buf, F.H_VERSION, rng.choice((0, 2, 99, 2 ** 40)))
        else:
            word(buf, F.H_FEATURES, 1 << rng.randrange(64))
        word(buf, F.H_CRC, zlib.crc32(bytes(buf[:F.CRC_END])))  # a well-formed other version
    elif kind == "truncate":
        buf = buf[:rng.choice((0, 7, 100, F.HEADER_SIZE - 1, F.HEADER_SIZE, F.BLOCKS_OFF,
                               rng.randrange(len(buf))))]
    elif kind == "cycle" and free:
        b = rng.choice(free)
        target = rng.choice(free)
        word(buf, (b.offset >> 3), target.offset - 8)  # next link of b points back into the list
    elif kind == "journal":
        state = rng.choice((1, 2, 3, rng.getrandbits(64)))
        word(buf, F.J_STATE, state)
        for k in range(rng.randint(0, 6)):
            word(buf, F.J_ENTRIES + 2 * k, rng.choice((rng.randrange(len(buf) // 8 + 100),
                                                       F.RANGE_FLAG | rng.randrange(1 << 20),
                                                       rng.getrandbits(64))))
            word(buf, F.J_ENTRIES + 2 * k + 1, rng.getrandbits(64))
    elif kind == "control":
        i = rng.randrange(F.C_FL_BITMAP, F.CTL_END // 8)
        word(buf, i, rng.choice((0, rng.getrandbits(64), rng.choice(facts["blocks"]).offset)))
    elif kind == "tag":
        b = rng.choice(facts["blocks"])
        word(buf, (b.offset >> 3) - 1, rng.choice((0, 8, b.size ^ 8, b.size | 1, b.size + 4096,
                                                   rng.getrandbits(64), b.size ^ 2)))
    elif kind == "footer" and free:
        b = rng.choice(free)
        word(buf, ((b.offset - 8 + b.size) >> 3) - 1, rng.getrandbits(20) * 8)
    elif kind == "bitmap":
        bmo = F.bitmap_off(facts["capacity"])
        pos = rng.randrange(bmo, facts["capacity"])
        buf[pos] ^= 1 << rng.randrange(8)
    elif kind == "page":
        start = rng.randrange(0, len(buf) // F.PAGE) * F.PAGE
        fill = bytes(F.PAGE) if rng.random() < 0.5 else rng.randbytes(F.PAGE)
        buf[start:start + F.PAGE] = fill
    elif kind == "link" and free:
        b = rng.choice(free)
        word(buf, (b.offset >> 3) + 1, rng.choice((0, 8, rng.getrandbits(64),
                                                   rng.choice(used).offset - 8 if used else 0)))
    elif kind == "txlog":
        word(buf, F.J_STATE, 2)
        word(buf, F.H_TXLOG, rng.choice((0, 8, rng.getrandbits(64),
                                         rng.choice(facts["blocks"]).offset)))
    elif kind == "magic":
        buf[rng.randrange(8)] ^= 0xFF
    else:
        kind = "bitflips"
        buf[rng.randrange(len(buf))] ^= 1
    return buf, kind


def examine(path: str) -> int:
    """In a child: open read-only and check, then read-write (recovery) and check."""
    try:
        with pheap.open(path, "r") as h:
            h.check()
        with pheap.open(path, "w") as h:
            h.check()
            h.free(h.malloc(100))  # the allocator still works on what check() accepted
            h.check()
    except (pheap.FormatError, FileNotFoundError) as e:
        return 10 if e else 10
    except pheap.CorruptHeapError:
        return 11
    except pheap.PheapError as e:  # e.g. HeapFullError on a heap whose max_size was damaged
        return 11 if "max_size" in str(e) or isinstance(e, pheap.HeapFullError) else 12
    return 0


def run(n: int, seed: int, verbose: bool = False) -> int:
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="pheap-fuzz-")
    base = os.path.join(tmp, "base.heap")
    facts = build(base, seed)
    pristine = bytearray(open(base, "rb").read())
    outcomes: Counter[str] = Counter()
    by_kind: Counter[tuple[str, str]] = Counter()
    bugs = []
    path = os.path.join(tmp, "x.heap")
    t0 = time.perf_counter()
    for k in range(n):
        buf, kind = corrupt(bytearray(pristine), facts, rng)
        with open(path, "wb") as f:
            f.write(buf)
        pid = os.fork()
        if pid == 0:
            code = 13
            try:
                signal.alarm(HANG_SECONDS)
                code = examine(path)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 12
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code in EXIT:
            outcome = EXIT[code]
        elif code == -signal.SIGALRM:
            outcome = "BUG: hang"
        elif code < 0:
            outcome = f"BUG: killed by signal {-code}"
        else:
            outcome = "BUG: unexpected exception"
        outcomes[outcome] += 1
        by_kind[(kind, outcome)] += 1
        if outcome.startswith("BUG"):
            keep = os.path.join(tmp, f"bug-{k}-{kind}.heap")
            shutil.copyfile(path, keep)
            bugs.append((k, kind, outcome, keep))
            print(f"  {outcome} on file {k} ({kind}); kept as {keep}", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    print(f"fuzz: {n} corrupted files in {elapsed:.1f} s, seed {seed}: " +
          ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())))
    if verbose:
        for (kind, outcome), v in sorted(by_kind.items()):
            print(f"  {kind:14} {outcome:12} {v}")
    if not bugs:
        shutil.rmtree(tmp)
    return 1 if bugs else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=300, help="corrupted files")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true", help="outcomes per kind of damage")
    args = ap.parse_args(argv)
    return run(args.n, args.seed, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
