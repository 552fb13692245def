"""The ``pheap`` command: inspect, check, repair and draw a heap file, and run the demo.

Exit codes (stable, for scripts):

====  ==============================================================
code  meaning
====  ==============================================================
0     success; for ``check``: the heap is sound
1     ``check``: the heap is damaged (the message names offset and invariant)
2     usage error (argparse)
3     the file cannot be opened as a heap (not a heap, wrong version, bad CRC, missing)
4     ``repair``: the heap is still damaged after repair
5     ``check``: a process died inside an operation and the journal is pending (opening the
      heap read-write, or ``pheap repair``, undoes it)
====  ==============================================================
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Sequence

from . import __version__
from . import format as F
from .errors import CorruptHeapError, DamagedJournalError, FormatError, PheapError
from .format import validate_header
from .heap import Heap
from .heap import open as open_heap

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2
EXIT_UNREADABLE = 3
EXIT_UNREPAIRED = 4
EXIT_NEEDS_RECOVERY = 5


def _pending_journal(path: str) -> int:
    """Undo records a dead process left in the journal (0 when none), read without locking."""
    from .journal import pending_records
    from .region import Region

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, F.HEADER_SIZE, 0)
        validate_header(head, os.fstat(fd).st_size, path)
        (state,) = struct.unpack_from("<Q", head, F.J_STATE * 8)
        if not state:
            return 0
        (cap,) = struct.unpack_from("<Q", head, F.H_CAPACITY * 8)
        region = Region.open_file(path, os.fstat(fd).st_size & ~(F.PAGE - 1), readonly=True)
        try:
            return max(1, len(pending_records(region.w, region.size >> 3)))
        except CorruptHeapError:
            return -1  # a journal that cannot be replayed: repair discards it
        finally:
            region.close()
    finally:
        os.close(fd)


def _discard_journal(path: str) -> None:
    """Mark the journal empty without replaying it (repair of a damaged journal)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("<Q", 0), F.J_STATE * 8)
        os.fsync(fd)
    finally:
        os.close(fd)


class _Progress:
    """A one-line progress indicator on stderr (only when it is a terminal, or when asked)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.last = -1

    def __call__(self, fraction: float) -> None:
        pct = int(fraction * 100)
        if self.enabled and pct != self.last:
            self.last = pct
            print(f"\r{self.label}: {pct:3d}%", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.last >= 0:
            print(file=sys.stderr)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _open(path: str, flag: str = "r") -> Heap:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    return open_heap(path, flag)


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args.file) as h:
        info = h.info()
        info["file_bytes"] = os.path.getsize(args.file)
        info["disk_bytes"] = os.stat(args.file).st_blocks * 512
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:16} {v}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args.file) as h:
        st = h.stats()
    if args.json:
        print(json.dumps(st._asdict(), indent=2))
        return EXIT_OK
    print(f"capacity        {_human(st.capacity)} ({st.capacity} bytes)")
    print(f"block area      {_human(st.block_area)} (peak brk {st.peak_brk})")
    print(f"used            {st.used_blocks} blocks, {_human(st.used_bytes)} "
          f"({_human(st.payload_bytes)} payload)")
    print(f"free            {st.free_blocks} blocks, {_human(st.free_bytes)} "
          f"+ {_human(st.wilderness)} wilderness")
    print(f"largest free    {_human(st.largest_free)}")
    print(f"fragmentation   {st.fragmentation:.1%}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    pending = _pending_journal(args.file)
    if pending < 0:
        print(f"{args.file}: DAMAGED: the journal holds records that cannot be replayed; "
              "`pheap repair --backup` discards it", file=sys.stderr)
        return EXIT_DAMAGED
    if pending:
        print(f"{args.file}: NEEDS RECOVERY: a process died inside an operation; the journal "
              f"holds {pending} undo records. Opening it read-write (or `pheap repair`) undoes "
              "that operation.", file=sys.stderr)
        return EXIT_NEEDS_RECOVERY
    progress = _Progress("checking", args.progress or sys.stderr.isatty())
    try:
        with _open(args.file) as h:
            t0 = time.perf_counter()
            h.check(progress)
            st = h.stats()
    except CorruptHeapError as e:
        progress.done()
        print(f"{args.file}: DAMAGED: {e}", file=sys.stderr)
        return EXIT_DAMAGED
    progress.done()
    if not args.quiet:
        print(f"{args.file}: ok ({st.used_blocks} used, {st.free_blocks} free blocks, "
              f"checked in {time.perf_counter() - t0:.3f} s)")
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    pending = _pending_journal(args.file)
    damage = None
    if not pending:
        try:
            with _open(args.file) as h:
                h.check()
        except CorruptHeapError as e:
            damage = str(e)
        if damage is None:
            print(f"{args.file}: sound, nothing to repair")
            return EXIT_OK
    plan = []
    if pending < 0:
        plan.append("discard the journal, whose records cannot be replayed")
    elif pending:
        plan.append(f"undo the operation a dead process left in the journal ({pending} "
                    "records)")
    if damage:
        plan.append(f"rebuild the bins and bitmaps from the boundary tags (found: {damage})")
    else:
        plan.append("then check, and rebuild the bins from the tags if still damaged")
    if args.dry_run:
        print(f"{args.file}: dry run, nothing changed. Repair would:")
        for step in plan:
            print(f"  - {step}")
        return EXIT_NEEDS_RECOVERY if pending else EXIT_DAMAGED
    if args.backup:
        backup = args.file + ".bak"
        shutil.copyfile(args.file, backup)
        print(f"backup written to {backup}")
    try:
        try:
            with _open(args.file, "w") as h:  # opening read-write undoes the journal
                report = h.repair()
        except DamagedJournalError as e:
            # The journal itself is damaged: it cannot be replayed, so it is discarded (the
            # operation it described stays half done; the rebuild below indexes what the tags say).
            _discard_journal(args.file)
            print(f"{args.file}: discarded a damaged journal ({e})")
            with _open(args.file, "w") as h:
                report = h.repair()
    except CorruptHeapError as e:
        print(f"{args.file}: still damaged after repair: {e}", file=sys.stderr)
        return EXIT_UNREPAIRED
    if pending:
        print(f"{args.file}: undid the interrupted operation from the journal")
    print(f"{args.file}: {report}")
    return EXIT_OK


def cmd_walk(args: argparse.Namespace) -> int:
    with _open(args.file) as h:
        shown = 0
        for blk in h.walk():
            if args.free and not blk.free:
                continue
            print(f"{blk.offset:>14} {blk.size:>12} {'free' if blk.free else 'used'}")
            shown += 1
            if args.limit and shown >= args.limit:
                break
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    """Draw the block area as a row of characters: '#' used, '.' free, ' ' wilderness."""
    with _open(args.file) as h:
        info = h.info()
        blocks = list(h.walk())
    start, end = F.BLOCKS_OFF, F.bitmap_off(info["capacity"])
    width = args.width
    cells = [[0, 0] for _ in range(width)]  # bytes used, bytes free per cell
    span = max(1, (end - start + width - 1) // width)
    for blk in blocks:
        b0 = blk.offset - 8
        b1 = b0 + blk.size
        i = (b0 - start) // span
        while b0 < b1 and i < width:
            cell_end = start + (i + 1) * span
            part = min(b1, cell_end) - b0
            cells[i][1 if blk.free else 0] += part
            b0 += part
            i += 1
    line = []
    for used, free in cells:
        if used == 0 and free == 0:
            line.append(" ")
        elif used >= free:
            line.append("#" if used * 2 >= span else "+")
        else:
            line.append(".")
    print(f"{args.file}: {_human(end - start)} block area, {span} bytes per cell; "
          "'#' used, '+' partly used, '.' free, ' ' wilderness")
    for i in range(0, width, 80):
        print("|" + "".join(line[i:i + 80]) + "|")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workers, args.records, args.path)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pheap", description="Inspect, check and repair pheap heap "
                                "files, or run the demo.")
    p.add_argument("--version", action="version", version=f"pheap {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="header fields of a heap")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("stats", help="used/free bytes and blocks, fragmentation")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("check", help="verify every invariant (exit 1 when damaged)")
    s.add_argument("file")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing when sound")
    s.add_argument("--progress", action="store_true",
                   help="show progress on stderr (default: when stderr is a terminal)")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("repair", help="rebuild bins and bitmaps from the boundary tags")
    s.add_argument("file")
    s.add_argument("--dry-run", action="store_true", help="report, change nothing")
    s.add_argument("--backup", action="store_true", help="copy the file to FILE.bak first")
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("walk", help="list blocks: offset, size, used/free")
    s.add_argument("file")
    s.add_argument("--free", action="store_true", help="free blocks only")
    s.add_argument("--limit", type=_positive, default=0, help="stop after N blocks")
    s.set_defaults(func=cmd_walk)

    s = sub.add_parser("map", help="draw the block area")
    s.add_argument("file")
    s.add_argument("--width", type=_positive, default=160, help="characters (default 160)")
    s.set_defaults(func=cmd_map)

    s = sub.add_parser("demo", help="worker processes share one persistent heap")
    s.add_argument("--workers", type=int, default=4, help="processes (default 4)")
    s.add_argument("--records", type=int, default=20000, help="records per worker")
    s.add_argument("--path", default=None, help="heap file (default: a temporary one)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pheap`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (FormatError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"pheap: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    except CorruptHeapError as e:  # opening found damage before any check ran
        print(f"pheap: {args.file}: DAMAGED: {e}", file=sys.stderr)
        return EXIT_DAMAGED
    except PheapError as e:
        print(f"pheap: {e}", file=sys.stderr)
        return EXIT_UNREADABLE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
