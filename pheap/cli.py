"""The ``pheap`` command: inspect, check, repair and draw a heap file, and run the demo.

Commands (``pheap COMMAND --help`` lists the options of each)::

    pheap info FILE     header fields                        [--json]
    pheap stats FILE    bytes and counts of blocks, runs and slots; fragmentation   [--json]
    pheap check FILE    every invariant                      [-q] [--progress]
    pheap walk FILE     list the blocks                      [--free] [--slots] [--limit N] [--json]
    pheap map FILE      draw the heap: text, or -o FILE.svg / FILE.png   [--width N] [--rows N]
    pheap repair FILE   undo a dead process's operation, rebuild the bins from the boundary tags
                        [--backup] [--dry-run] [--timeout S] [--progress]
    pheap demo          worker processes share one persistent heap

``dump``, ``gc`` and ``bench`` join these with the object layer and the benchmark package: each is
one more row of ``COMMANDS``.

**Waiting.** The inspection commands (info, stats, check, walk, map) take the heap lock shared, so
they never stop each other, and wait for a writer at most ``--timeout`` seconds (default 10),
then exit 6 naming the pid that holds it. ``--snapshot`` never waits: it inspects a private copy
of the file taken without the lock (``pheap.snapshot``); if a process was changing the heap while
it was copied, the copy may be mid-operation, and the command says so on stderr. ``repair``
waits only as long as its ``--timeout`` (default 0: it does not wait).

**Output.** Paths are printed as given. Every user mistake (a missing file, a directory, a FIFO,
permission denied, not a heap, another version, bad arguments) is one line on stderr, ``pheap:
PATH: what``, and an exit code below; a traceback means a bug in pheap (exit 70). Progress of long
runs goes to stderr when it is a terminal, or with ``--progress``.

Exit codes, one table for every command (``pheap --help`` prints it as well):

====  ==============  =========================================================================
code  name            meaning
====  ==============  =========================================================================
0     ok              done; check: the heap is sound; repair: sound now (or already was)
1     damaged         a broken invariant (the message names offset and invariant), or a journal
                      whose records fail their checks; walk and map print up to the damage;
                      repair --dry-run: repair would rebuild the bins
2     usage           bad arguments or options; -o in a picture format this installation cannot
                      write (.png without Pillow)
3     unusable        a file that cannot be used: missing, a directory, a FIFO or device,
                      permission denied, not a heap, another format version, a damaged header
                      CRC, an output file that cannot be written
4     unrepaired      repair: still damaged, in a way it cannot fix (boundary tags, header
                      fields); it says what to do next; --dry-run: repair would stop so
5     needs-recovery  a process died inside an operation and its undo records are pending:
                      pheap repair undoes it (--snapshot shows the heap as it will be then)
6     busy            another process held the heap lock for all of --timeout; the message
                      names its pid
70    internal        a bug in pheap (the traceback is printed; please report it); demo: a
                      worker failed or a record read back wrong
130   interrupted     interrupted (Ctrl-C)
141   pipe            standard output was closed early (pheap walk FILE | head): output stops
                      without a message, with the code a shell reports for SIGPIPE
====  ==============  =========================================================================
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import mmap
import os
import shutil
import struct
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, NamedTuple, NoReturn

from . import __version__
from . import _map
from . import format as F
from .allocator import BlockInfo, HeapStats
from .errors import (
    CorruptHeapError,
    DamagedJournalError,
    FormatError,
    LockTimeoutError,
    NeedsRecoveryError,
    PheapError,
)
from .heap import Heap
from .heap import open as open_heap
from .heap import snapshot as snapshot_heap
from .journal import pending_records
from .lock import HeapLock

EXIT_OK: Final = 0  #: done; check: sound
EXIT_DAMAGED: Final = 1  #: a broken invariant or a damaged journal
EXIT_USAGE: Final = 2  #: bad arguments (argparse's code)
EXIT_UNUSABLE: Final = 3  #: the file cannot be used as a heap (or an output file not written)
EXIT_UNREPAIRED: Final = 4  #: repair cannot fix the damage
EXIT_NEEDS_RECOVERY: Final = 5  #: a dead process's undo records are pending
EXIT_BUSY: Final = 6  #: the lock was held for all of --timeout
EXIT_INTERNAL: Final = 70  #: a bug (sysexits' EX_SOFTWARE)
EXIT_INTERRUPTED: Final = 130  #: Ctrl-C (128 + SIGINT)
EXIT_PIPE: Final = 141  #: stdout closed early (128 + SIGPIPE)

#: The exit-code table of the module docstring, as data: (code, name, meaning). A test checks
#: that the two agree and that every command exits only with these.
EXIT_CODES: Final = (
    (EXIT_OK, "ok", "done; check: the heap is sound; repair: sound now (or already was)"),
    (EXIT_DAMAGED, "damaged", "a broken invariant (the message names offset and invariant), or "
     "a journal whose records fail their checks; walk and map print up to the damage; repair "
     "--dry-run: repair would rebuild the bins"),
    (EXIT_USAGE, "usage", "bad arguments or options; -o in a picture format this installation "
     "cannot write (.png without Pillow)"),
    (EXIT_UNUSABLE, "unusable", "a file that cannot be used: missing, a directory, a FIFO or "
     "device, permission denied, not a heap, another format version, a damaged header CRC, an "
     "output file that cannot be written"),
    (EXIT_UNREPAIRED, "unrepaired", "repair: still damaged, in a way it cannot fix (boundary "
     "tags, header fields); it says what to do next; --dry-run: repair would stop so"),
    (EXIT_NEEDS_RECOVERY, "needs-recovery", "a process died inside an operation and its undo "
     "records are pending: pheap repair undoes it (--snapshot shows the heap as it will be "
     "then)"),
    (EXIT_BUSY, "busy", "another process held the heap lock for all of --timeout; the message "
     "names its pid"),
    (EXIT_INTERNAL, "internal", "a bug in pheap (the traceback is printed; please report it); "
     "demo: a worker failed or a record read back wrong"),
    (EXIT_INTERRUPTED, "interrupted", "interrupted (Ctrl-C)"),
    (EXIT_PIPE, "pipe", "standard output was closed early (pheap walk FILE | head): output stops "
     "without a message, with the code a shell reports for SIGPIPE"),
)

INSPECT_TIMEOUT: Final = 10.0  #: seconds an inspection command waits for the lock by default
WAIT_NOTICE: Final = 0.5  #: seconds of waiting for the lock before saying so on stderr
#: what every --snapshot command says on stderr
SNAPSHOT_NOTE: Final = ("inspecting a snapshot: a private copy taken without the lock, which may "
                        "be mid-operation if a process was changing the heap meanwhile")
COPY_CHUNK: Final = 1 << 20  #: bytes per read of a backup copy
HOLE_GRAIN: Final = 1 << 16  #: a backup leaves a hole for every run of this many zero bytes


class CliError(Exception):
    """A failure the command reports in one message (no traceback) with an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Pending(CliError):
    """The heap's journal holds a dead process's work (``records`` undo records), or records
    that fail their checks (``damage``)."""

    def __init__(self, code: int, message: str, records: int, damage: str) -> None:
        super().__init__(code, message)
        self.records = records
        self.damage = damage


def _note(text: str) -> None:
    print(f"pheap: {text}", file=sys.stderr, flush=True)


def _as_given(text: str, path: str) -> str:
    """A core message about ``path`` with the path as the user gave it (the core absolutises)."""
    if not path:
        return text
    full = os.path.abspath(path)
    return text.replace(full, path) if full != path else text


def _about(path: str, text: str) -> str:
    """``'PATH: text'``, unless the text already starts with the path."""
    text = _as_given(text, path)
    return text if not path or text.startswith(f"{path}:") else f"{path}: {text}"


# ---------------------------------------------------------------------------------------------
# Reading the file without the heap's help: the holder's pid, the journal. Each of these is a
# stop-gap for a core call that does not exist yet (named in each docstring).
# ---------------------------------------------------------------------------------------------


def _header_word(path: str, index: int) -> int:
    """Word ``index`` of the header as the file holds it now, without the lock (0 on any
    error): who holds the lock, whether the journal is in flight."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        raw = os.pread(fd, F.WORD, index * F.WORD)
        return struct.unpack("<Q", raw)[0] if len(raw) == F.WORD else 0
    except OSError:
        return 0
    finally:
        os.close(fd)


def _holder(path: str) -> str:
    pid = _header_word(path, F.H_OWNER_PID)
    return f"pid {pid}" if pid else "another process"


def _journal_state(path: str) -> tuple[int, str] | None:
    """(undo records pending, '') or (-1, why the records fail their checks); None when the
    journal is idle now (another process recovered it meanwhile). O(records).

    Wanted from the core: ``Heap.pending_journal() -> int`` that works on a read-only heap
    (NeedsRecoveryError carrying the count would do).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size & ~(F.PAGE - 1)
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    w = memoryview(mm).cast("Q")
    try:
        if not w[F.J_STATE]:
            return None
        return len(pending_records(w, len(w))), ""
    except DamagedJournalError as e:
        return -1, str(e)
    finally:
        w.release()
        mm.close()


@contextmanager
def _file_lock(path: str, timeout: float, shared: bool, command: str) -> Iterator[int]:
    """Hold the heap lock of ``path`` without opening the heap (no recovery runs): for copying
    or mending the file itself. Yields a descriptor of the file (read-write unless shared)."""
    flags = (os.O_RDONLY if shared else os.O_RDWR) | os.O_CLOEXEC
    lk = HeapLock(lambda: os.open(path, flags), shared=shared)
    try:
        try:
            lk.acquire(timeout, lambda: _header_word(path, F.H_OWNER_PID))
        except LockTimeoutError as e:
            raise _busy(path, e, command) from None
        try:
            yield lk.fd
        finally:
            lk.release()
    finally:
        lk.close()


def _discard_journal(path: str, timeout: float) -> None:
    """Mark the journal idle without replaying it: its records fail their checks, so restoring
    them could write garbage. The operation they describe stays half done; the rebuild that
    follows indexes what the boundary tags say.

    Wanted from the core: ``Heap.repair(discard_damaged_journal=True)`` (or
    ``pheap.repair(path, ...)``), since no open of such a heap succeeds.
    """
    with _file_lock(path, timeout, False, "repair") as fd:
        os.pwrite(fd, struct.pack("<Q", 0), F.J_STATE * F.WORD)
        os.fsync(fd)


def _tags_damage(h: Heap) -> str:
    """Why the bins cannot be rebuilt from the boundary tags ('' when they can). O(blocks).

    Wanted from the core: ``Heap.check_tags() -> None`` (raising CorruptHeapError), or
    ``Heap.repair(dry_run=True) -> str``.
    """
    with h.lock():
        try:
            h._core.check_tags()
        except CorruptHeapError as e:
            return str(e)
    return ""


class Survey(NamedTuple):
    """One walk of a heap under its lock, for walk and map."""

    capacity: int
    brk: int
    txlog: int  #: offset of the transaction log block (0: none)
    root: int
    blocks: list[BlockInfo]  #: in address order (slots after their run, when asked)
    runs: dict[int, tuple[int, int, int]]  #: run offset -> (slot bytes, slots, used slots)
    damage: str  #: why the walk stopped before brk ('' when it did not)
    stats: HeapStats | None  #: None when not asked for, or damaged


def _survey(h: Heap, slots: bool = False, keep: Callable[[BlockInfo], bool] | None = None,
            limit: int = 0, stats: bool = False) -> Survey:
    """Walk the heap under one hold of its lock: the blocks ``keep`` accepts (at most ``limit``
    when not 0), each run's fill, and up to the damage when a tag is bad. O(blocks + runs),
    + O(slots) with ``slots``.

    Wanted from the core: ``Heap.walk()`` yielding lazily up to the first bad tag (it lists
    every block first, so one bad tag hides all the good ones), BlockInfo of a run carrying its
    slot size and used slots, and ``txlog`` in ``Heap.info()``. Until then this reads the
    allocator of the handle under the lock.
    """
    core = h._core
    with h.lock():
        w = core._w
        blocks: list[BlockInfo] = []
        runs: dict[int, tuple[int, int, int]] = {}
        damage = ""
        try:
            for b in core.walk(slots):
                if b.kind == "run":
                    runs[b.offset] = _run_fill(w, b.offset)
                if keep is None or keep(b):
                    blocks.append(b)
                    if limit and len(blocks) >= limit:
                        break
        except CorruptHeapError as e:
            damage = str(e)
        st = None
        if stats and not damage:
            try:
                st = core.stats()
            except CorruptHeapError as e:
                damage = str(e)
        return Survey(int(core._cap), int(w[F.H_BRK]), int(w[F.H_TXLOG]), int(w[F.H_ROOT]),
                      blocks, runs, damage, st)


def _run_fill(w: memoryview, off: int) -> tuple[int, int, int]:
    """(slot bytes, slots, used slots) of the run whose payload is at ``off``."""
    c = F.run_class(w[(off >> 3) - 1])
    if c >= F.CLASS_COUNT:
        raise CorruptHeapError(f"offset {off - 8}: run class {c} unknown")
    free = sum(bin(w[(off >> 3) + j] & m).count("1") for j, m in enumerate(F.CLASS_MASKS[c]))
    return F.CLASS_SIZE[c], F.CLASS_SLOTS[c], F.CLASS_SLOTS[c] - free


# ---------------------------------------------------------------------------------------------
# Opening: with a bounded wait, or a snapshot; every failure becomes one line and a code
# ---------------------------------------------------------------------------------------------


def _busy(path: str, e: LockTimeoutError, command: str) -> CliError:
    if command == "repair":
        hint = "--timeout SECONDS waits for it"
    else:
        hint = (f"`pheap {command} --snapshot {path}` inspects a copy now; --timeout SECONDS "
                "waits longer")
    return CliError(EXIT_BUSY, f"{path}: busy: {e} ({hint})")


def _pending_error(path: str) -> _Pending | None:
    """The error for a heap whose journal is pending (None: it is idle again)."""
    state = _journal_state(path)
    if state is None:
        return None
    n, damage = state
    if n < 0:
        return _Pending(EXIT_DAMAGED, f"{path}: DAMAGED: the journal's undo records fail their "
                        f"checks ({_as_given(damage, path)}); `pheap repair --backup {path}` "
                        "discards them and rebuilds what the boundary tags allow", n, damage)
    return _Pending(EXIT_NEEDS_RECOVERY, f"{path}: NEEDS RECOVERY: a process died inside an "
                    f"operation and left {n} undo records in the journal; `pheap repair {path}` "
                    "undoes it (--snapshot shows the heap as it will be then)", n, "")


def _open(path: str, flag: str, timeout: float, command: str) -> Heap:
    """Open the heap, waiting at most ``timeout`` s for its lock (this and every later
    acquisition through the handle); after WAIT_NOTICE s of waiting, say so on stderr."""
    for _attempt in range(3):
        try:
            if timeout <= WAIT_NOTICE:
                h = open_heap(path, flag, lock_timeout=timeout)
            else:
                try:
                    h = open_heap(path, flag, lock_timeout=WAIT_NOTICE)
                except LockTimeoutError:
                    _note(f"{path}: waiting up to {timeout:g} s for the heap lock "
                          f"({_holder(path)} holds it)")
                    h = open_heap(path, flag, lock_timeout=timeout - WAIT_NOTICE)
            h.lock_timeout = timeout
            return h
        except LockTimeoutError as e:
            raise _busy(path, e, command) from None
        except NeedsRecoveryError:
            err = _pending_error(path)
            if err is not None:
                raise err from None
            # Recovered by another process since: open again.
    raise CliError(EXIT_NEEDS_RECOVERY, f"{path}: NEEDS RECOVERY: the journal stays pending")


def _snapshot(path: str) -> Heap:
    in_flight = _header_word(path, F.J_STATE)
    h = snapshot_heap(path)
    note = f"{path}: {SNAPSHOT_NOTE}"
    if in_flight:
        note += ("; the file's journal was in flight when it was copied (a process inside an "
                 "operation, or one that died in it): the copy shows that operation undone")
    _note(note)
    return h


@contextmanager
def _inspect(args: argparse.Namespace) -> Iterator[Heap]:
    """The heap to inspect: a snapshot, or the file opened read-only with a bounded wait."""
    h = _snapshot(args.file) if args.snapshot else _open(args.file, "r", args.timeout,
                                                         args.command)
    try:
        yield h
    finally:
        h.close()


class _Progress:
    """A one-line percentage on stderr, when it is a terminal or when asked."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.shown = -1

    def __call__(self, fraction: float) -> None:
        pct = int(fraction * 100)
        if self.enabled and pct != self.shown:
            self.shown = pct
            print(f"\r{self.label}: {pct:3d}%", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.shown >= 0:
            print(file=sys.stderr, flush=True)
            self.shown = -1


def _progress(args: argparse.Namespace, label: str) -> _Progress:
    return _Progress(label, bool(getattr(args, "progress", False)) or sys.stderr.isatty())


# ---------------------------------------------------------------------------------------------
# info, stats, check
# ---------------------------------------------------------------------------------------------


def _n(count: int, noun: str) -> str:
    """``'1 run'``, ``'2 runs'``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="seconds")


def cmd_info(args: argparse.Namespace) -> int:
    path = args.file
    with _inspect(args) as h:
        info = h.info()
    st = os.stat(path)
    info.update(path=path, created=_iso(info["created_ns"]), file_bytes=st.st_size,
                disk_bytes=st.st_blocks * 512, snapshot=bool(args.snapshot))
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    rows = [
        ("path", path),
        ("format_version", info["format_version"]),
        ("uuid", info["uuid"]),
        ("created", info["created"]),
        ("capacity", f"{info['capacity']} ({_map.human(info['capacity'])})"),
        ("max_size", f"{info['max_size']} (unlimited)" if not info["max_size"] else
         f"{info['max_size']} ({_map.human(info['max_size'])})"),
        ("brk", info["brk"]),
        ("peak_brk", info["peak_brk"]),
        ("generation", info["generation"]),
        ("root", info["root"]),
        ("objects", info["objects"]),
        ("recoveries", info["recoveries"]),
        ("journal_pending", "yes" if info["journal_pending"] else "no"),
        ("file_bytes", f"{info['file_bytes']} ({_map.human(info['file_bytes'])})"),
        ("disk_bytes", f"{info['disk_bytes']} ({_map.human(info['disk_bytes'])})"),
    ]
    for k, v in rows:
        print(f"{k:16} {v}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _inspect(args) as h:
        st = h.stats()
    if args.json:
        d = dict(st._asdict(), metadata_bytes=st.metadata_bytes, path=args.file,
                 snapshot=bool(args.snapshot))
        print(json.dumps(d, indent=2))
        return EXIT_OK
    hm = _map.human
    blocks = st.used_blocks - st.used_slots
    print(f"capacity        {hm(st.capacity)} ({st.capacity} bytes)")
    print(f"used            {st.used_blocks} allocations ({blocks} blocks, {st.used_slots} "
          f"slots), {hm(st.used_bytes)} ({hm(st.payload_bytes)} payload)")
    print(f"runs            {_n(st.runs, 'run')}, {hm(st.run_bytes)}: {st.used_slots} slots "
          f"used, {st.free_slots} free")
    print(f"free            {st.free_blocks} blocks, {hm(st.free_bytes)} "
          f"+ {hm(st.wilderness)} wilderness")
    print(f"largest free    {hm(st.largest_free)}")
    print(f"fragmentation   {st.fragmentation:.1%}")
    print(f"block area      {hm(st.block_area)} (peak {hm(st.peak_brk - F.BLOCKS_OFF)})")
    print(f"metadata        {hm(st.metadata_bytes)}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    path = args.file
    progress = _progress(args, f"checking {path}")
    with _inspect(args) as h:
        t0 = time.perf_counter()
        try:
            h.check(progress)
        finally:
            progress.done()
        took = time.perf_counter() - t0
        st = h.stats()
    if not args.quiet:
        blocks = st.used_blocks - st.used_slots
        print(f"{path}: ok ({blocks} used blocks, {st.used_slots} used slots in "
              f"{_n(st.runs, 'run')}, {st.free_blocks} free blocks; checked in {took:.3f} s)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# walk and map
# ---------------------------------------------------------------------------------------------


def _role(b: BlockInfo, sv: Survey) -> str:
    if b.kind != "slot" and b.offset == sv.txlog:
        return "txlog"
    if b.offset == sv.root:
        return "root"
    return ""


def cmd_walk(args: argparse.Namespace) -> int:
    keep = (lambda b: b.free) if args.free else None
    with _inspect(args) as h:
        sv = _survey(h, args.slots, keep, args.limit)
    out: list[str] = []
    for b in sv.blocks:
        role = _role(b, sv)
        if args.json:
            d: dict[str, Any] = b._asdict()
            if b.kind == "run":
                d["slot_size"], d["slots"], d["used_slots"] = sv.runs[b.offset]
            if role:
                d["role"] = role
            out.append(json.dumps(d))
        else:
            extra = ""
            if b.kind == "run":
                size, n, used = sv.runs[b.offset]
                extra = f" {size}-byte slots, {used}/{n} used"
            if role:
                extra += f" ({'transaction log' if role == 'txlog' else role})"
            indent = "  " if b.kind == "slot" else ""
            out.append(f"{indent}{b.offset:>12} {b.size:>10} {'free' if b.free else 'used'} "
                       f"{b.kind}{extra}")
        if len(out) >= 4096:
            sys.stdout.write("\n".join(out) + "\n")
            out.clear()
    if out:
        sys.stdout.write("\n".join(out) + "\n")
    if sv.damage:
        raise CorruptHeapError(sv.damage + " (the walk stops there)")
    return EXIT_OK


def _segments(sv: Survey) -> list[_map.Segment]:
    """The mapping from 0 to its capacity as segments, in address order."""
    S = _map.Segment
    segs = [S(0, F.CTL_OFF, "meta", 0, "header page: format fields and the operation journal"),
            S(F.CTL_OFF, F.BLOCKS_OFF, "meta", F.CTL_OFF, "control block: bin heads, bitmaps")]
    end = F.BLOCKS_OFF
    for b in sv.blocks:
        start = b.offset - F.BLOCK_OVERHEAD
        end = start + b.size
        if b.kind == "run":
            size, n, used = sv.runs[b.offset]
            segs.append(S(start, end, "run", b.offset, f"run at {b.offset}: {b.size} bytes, "
                          f"{size}-byte slots, {used}/{n} used", used / n if n else 0.0))
        elif b.free:
            segs.append(S(start, end, "free", b.offset, f"free block at {b.offset}: {b.size} "
                          "bytes"))
        elif b.offset == sv.txlog:
            segs.append(S(start, end, "journal", b.offset, f"transaction log at {b.offset}: "
                          f"{b.size} bytes"))
        else:
            segs.append(S(start, end, "used", b.offset, f"used block at {b.offset}: {b.size} "
                          f"bytes{' (root)' if b.offset == sv.root else ''}"))
    if sv.damage and end < sv.brk:
        segs.append(S(end, sv.brk, "damaged", end, f"not walkable: {sv.damage}"))
    meta = F.meta_off(sv.capacity)
    bitmap = F.bitmap_off(sv.capacity)
    segs.append(S(max(end, sv.brk), meta, "wild", sv.brk, f"wilderness: {meta - sv.brk} bytes"))
    segs.append(S(meta, bitmap, "meta", meta, "page map: one byte per page"))
    segs.append(S(bitmap, sv.capacity, "meta", bitmap, "allocation bitmap: one bit per word"))
    return segs


def _figures(sv: Survey) -> list[str]:
    """Two lines of figures for the map (the damage instead, when the walk stopped)."""
    st = sv.stats
    if st is None:
        return [f"capacity {_map.human(sv.capacity)}; DAMAGED: {sv.damage}"]
    hm = _map.human
    slots = st.used_slots + st.free_slots
    journal = sum(b.size for b in sv.blocks if b.offset == sv.txlog and b.kind == "block")
    return [f"capacity {hm(st.capacity)}; used {hm(st.used_bytes)} in "
            f"{_n(st.used_blocks, 'allocation')}; free {hm(st.free_bytes)} in "
            f"{_n(st.free_blocks, 'block')} + {hm(st.wilderness)} wilderness; fragmentation "
            f"{st.fragmentation:.1%}",
            f"{_n(st.runs, 'run')} ({st.used_slots}/{slots} slots used, {hm(st.run_bytes)}); "
            + (f"transaction log {hm(journal)}; " if journal else "no transaction log; ")
            + f"metadata {hm(st.metadata_bytes)}"]


def cmd_map(args: argparse.Namespace) -> int:
    path = args.file
    out = args.output
    if out is not None:
        ext = os.path.splitext(out)[1].lower()
        if ext not in (".svg", ".png"):
            raise CliError(EXIT_USAGE, f"{out}: unknown picture format '{ext or out}': -o takes "
                           "FILE.svg, or FILE.png with Pillow installed")
        if ext == ".png" and not _map.have_png():
            raise CliError(EXIT_USAGE, f"{out}: a PNG needs Pillow, which is not installed "
                           "(pip install Pillow); write FILE.svg instead, which needs nothing")
    with _inspect(args) as h:
        sv = _survey(h, stats=True)
    segs = _segments(sv)
    if out is None:
        width = args.width or max(10, _terminal_width() - 2)
        span, rows = _map.text_map(segs, sv.capacity, width, args.rows or 16)
        print(f"{path}: {_map.human(sv.capacity)} mapping, {span} bytes per character"
              + (" (snapshot)" if args.snapshot else ""))
        print("\n".join(rows))
        print("\n".join(_map.text_legend(width + 2)))
        for line in _figures(sv):
            print("\n".join(_map.wrap_items(line.split("; "), "; ", width + 2)))
    else:
        title = f"pheap map of {path}" + (" (snapshot: may be mid-operation)"
                                         if args.snapshot else "")
        scene = _map.picture(segs, sv.capacity, title, _figures(sv), args.width or 1024,
                             args.rows or 32)
        if out.lower().endswith(".svg"):
            with open(out, "w", encoding="utf-8") as f:
                f.write(_map.svg(scene))
        else:
            _map.png(scene, out)
        print(f"{path}: map written to {out} ({len(sv.blocks)} blocks"
              + ("" if scene.exact else ", drawn at pixel resolution") + ")")
    if sv.damage:
        raise CorruptHeapError(sv.damage + " (drawn up to there)")
    return EXIT_OK


def _terminal_width() -> int:
    """Columns of the terminal (COLUMNS when set; 80 when output is not a terminal)."""
    return shutil.get_terminal_size((80, 24)).columns


# ---------------------------------------------------------------------------------------------
# repair
# ---------------------------------------------------------------------------------------------


class _Diagnosis(NamedTuple):
    state: str  #: "sound", "damaged", "pending" (a dead process's work) or "journal" (damaged)
    damage: str = ""  #: what check found (after the undo, for "pending")
    unfixable: str = ""  #: why repair cannot fix it ('' when it can)
    records: int = 0  #: undo records pending


def _look(h: Heap, progress: _Progress) -> tuple[str, str]:
    """(what check finds, why the tags cannot be rebuilt from): '' for none."""
    try:
        h.check(progress)
        return "", ""
    except CorruptHeapError as e:
        return str(e), _tags_damage(h)
    finally:
        progress.done()


def _diagnose(path: str, timeout: float, progress: _Progress) -> _Diagnosis:
    """What repair would find, changing nothing."""
    try:
        h = _open(path, "r", timeout, "repair")
    except _Pending as p:
        if p.records < 0:
            return _Diagnosis("journal", p.damage)
        with snapshot_heap(path) as copy:  # the same undo, on a private copy
            damage, unfixable = _look(copy, progress)
        return _Diagnosis("pending", damage, unfixable, p.records)
    except CorruptHeapError as e:  # the header fields: nothing to rebuild them from
        return _Diagnosis("damaged", str(e), str(e))
    with h:
        damage, unfixable = _look(h, progress)
    return _Diagnosis("damaged" if damage else "sound", damage, unfixable)


def _backup(path: str, timeout: float, progress: _Progress) -> str:
    """Copy the heap file beside itself (FILE.bak, or FILE.bak.N: never over an older backup)
    under the heap lock held shared, so that no writer changes it meanwhile; holes stay holes.
    Returns the backup's name."""
    dest = f"{path}.bak"
    n = 0
    while os.path.lexists(dest):
        n += 1
        dest = f"{path}.bak.{n}"
    with _file_lock(path, timeout, True, "repair") as src:
        size = os.fstat(src).st_size
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                      os.fstat(src).st_mode & 0o777)
        try:
            zero = bytes(HOLE_GRAIN)
            pos = 0
            while pos < size:
                chunk = os.pread(src, min(COPY_CHUNK, size - pos), pos)
                if not chunk:
                    break
                for i in range(0, len(chunk), HOLE_GRAIN):
                    piece = chunk[i:i + HOLE_GRAIN]
                    if piece != zero[:len(piece)]:
                        os.pwrite(out, piece, pos + i)
                pos += len(chunk)
                progress(pos / size)
            os.ftruncate(out, size)
            os.fsync(out)
        except BaseException:
            os.close(out)
            os.unlink(dest)
            raise
        finally:
            progress.done()
        os.close(out)
    return dest


def _advice(path: str, damage: str, backup: str | None, journal: str) -> str:
    """What to do after a repair that could not make the heap sound; ``journal`` is what it did
    to the journal first ("undoing", "discarding" or '')."""
    lines = [f"{path}: still damaged after repair: {_as_given(damage, path)}",
             "  Repair rebuilds the bins, page map and bitmaps from the boundary tags (block "
             "headers) and the header fields; these are damaged themselves, so it stopped "
             + (f"after {journal} the journal." if journal else "and changed nothing."),
             "  What now:",
             f"  - see where: `pheap walk {path}` lists the blocks up to the damage, "
             f"`pheap map {path} -o map.svg` draws it;",
             f"  - copy out what you need: pheap.snapshot({path!r}) or pheap.open({path!r}, "
             "'r') still read() the blocks the allocation bitmap names;"]
    if backup:
        lines.append(f"  - put back a copy: {backup} is the file as it was before this repair "
                     f"(cp {backup} {path}); a copy from before the damage is better.")
    else:
        lines.append("  - put back a copy from before the damage, if you have one (next time, "
                     "`pheap repair --backup` keeps the file as repair found it).")
    return "\n".join(lines)


def cmd_repair(args: argparse.Namespace) -> int:
    path = args.file
    progress = _progress(args, f"checking {path}")
    d = _diagnose(path, args.timeout, progress)
    if d.state == "sound":
        print(f"{path}: sound, nothing to repair")
        return EXIT_OK
    if args.dry_run:
        return _plan(path, d)
    backup = None
    if args.backup:
        backup = _backup(path, args.timeout, _progress(args, f"backing up {path}"))
        print(f"{path}: backup written to {backup}")
    journal = ""
    if d.state == "journal":
        _discard_journal(path, args.timeout)
        journal = "discarding"
        print(f"{path}: discarded the journal, whose records fail their checks "
              f"({_as_given(d.damage, path)})")
    for attempt in range(2):
        try:
            with _open(path, "w", args.timeout, "repair") as h:  # opening undoes the journal
                if d.state == "pending":
                    journal = "undoing"
                report = h.repair()
            break
        except DamagedJournalError as e:  # damaged since we looked: discard it after all
            if attempt:
                raise
            _discard_journal(path, args.timeout)
            journal = "discarding"
            print(f"{path}: discarded the journal, whose records fail their checks ({e})")
        except CorruptHeapError as e:
            raise CliError(EXIT_UNREPAIRED, _advice(path, str(e), backup, journal)) from None
    if d.state == "pending":
        print(f"{path}: undid the operation a dead process left in the journal ({d.records} "
              "undo records)")
    if not report.startswith("sound"):
        print(f"{path}: {_as_given(report, path)}")
    print(f"{path}: sound now")
    return EXIT_OK


def _plan(path: str, d: _Diagnosis) -> int:
    """Print what repair would do (--dry-run); exit as the heap stands."""
    steps = []
    code = EXIT_OK
    if d.state == "journal":
        steps.append(f"discard the journal, whose undo records fail their checks ({d.damage}), "
                     "then check the heap and rebuild its bins if the boundary tags allow")
        code = EXIT_DAMAGED
    else:
        if d.state == "pending":
            steps.append(f"undo the operation a dead process left in the journal ({d.records} "
                         "undo records)")
            code = EXIT_NEEDS_RECOVERY
        if d.damage and d.unfixable:
            steps.append(f"stop: {d.unfixable}: the boundary tags or header fields are damaged, "
                         "and nothing can be rebuilt from them")
            code = EXIT_NEEDS_RECOVERY if d.state == "pending" else EXIT_UNREPAIRED
        elif d.damage:
            steps.append("rebuild the bins, class lists, page map and allocation bitmap from "
                         f"the boundary tags, which are sound (check found: {d.damage})")
            code = EXIT_NEEDS_RECOVERY if d.state == "pending" else EXIT_DAMAGED
        else:
            steps.append("then the heap is sound")
    print(f"{path}: dry run, nothing changed. Repair would:")
    for s in steps:
        print(f"  - {_as_given(s, path)}")
    return code


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.path is not None and os.path.lexists(args.path):
        raise CliError(EXIT_UNUSABLE, f"{args.path}: already exists; the demo writes a new heap "
                       "there: give a path that does not exist yet")
    return EXIT_OK if run_demo(args.workers, args.records, args.path) == 0 else EXIT_INTERNAL


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``pheap walk: argument --limit: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _whole(lo: int) -> Callable[[str], int]:
    def whole(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, not {n}")
        return n

    return whole


def _seconds(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not t >= 0 or math.isinf(t):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, not {text}")
    return t


def _opt_file(s: argparse.ArgumentParser) -> None:
    s.add_argument("file", metavar="FILE", help="the heap file")


def _opt_json(s: argparse.ArgumentParser) -> None:
    s.add_argument("--json", action="store_true", help="print JSON")


def _opt_json_lines(s: argparse.ArgumentParser) -> None:
    s.add_argument("--json", action="store_true",
                   help="print JSON Lines: one object per block or slot (offset, size, free, "
                   "kind; a run's slot_size, slots, used_slots; role: root or txlog)")


def _opt_access(s: argparse.ArgumentParser) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--timeout", type=_seconds, default=INSPECT_TIMEOUT, metavar="SECONDS",
                   help=f"wait at most this long for a process that holds the heap lock, then "
                   f"exit 6 naming it (default {INSPECT_TIMEOUT:g})")
    g.add_argument("--snapshot", action="store_true",
                   help="do not take the lock: inspect a private copy of the file, which may be "
                   "mid-operation if a process is changing the heap")


def _opt_progress(s: argparse.ArgumentParser) -> None:
    s.add_argument("--progress", action="store_true",
                   help="show progress on stderr (default: when stderr is a terminal)")


def _opt_check(s: argparse.ArgumentParser) -> None:
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing when sound")


def _opt_walk(s: argparse.ArgumentParser) -> None:
    s.add_argument("--free", action="store_true", help="free blocks (and free slots) only")
    s.add_argument("--slots", action="store_true", help="list the slots of each run after it")
    s.add_argument("--limit", type=_whole(1), default=0, metavar="N",
                   help="stop after N rows")


def _opt_map(s: argparse.ArgumentParser) -> None:
    s.add_argument("-o", "--output", metavar="FILE",
                   help="write a picture: FILE.svg, or FILE.png when Pillow is installed "
                   "(default: a text map on the terminal)")
    s.add_argument("--width", type=_whole(10), default=0, metavar="N",
                   help="characters per row of the text map (default: the terminal's width, 78 "
                   "when output is not a terminal), or pixels per row of a picture (default "
                   "1024)")
    s.add_argument("--rows", type=_whole(1), default=0, metavar="N",
                   help="rows (default: 16 of text, 32 in a picture)")


def _opt_repair(s: argparse.ArgumentParser) -> None:
    s.add_argument("--dry-run", action="store_true",
                   help="say what repair would do and change nothing; exit as the heap stands "
                   "(0 sound, 1 repairable damage, 4 not repairable, 5 journal pending)")
    s.add_argument("--backup", action="store_true",
                   help="first copy the file to FILE.bak (FILE.bak.N when that exists)")
    s.add_argument("--timeout", type=_seconds, default=0.0, metavar="SECONDS",
                   help="wait at most this long for a process that holds the heap lock "
                   "(default 0: do not wait)")


def _opt_demo(s: argparse.ArgumentParser) -> None:
    s.add_argument("--workers", type=_whole(1), default=4, help="processes (default 4)")
    s.add_argument("--records", type=_whole(1), default=20000,
                   help="records per worker (default 20000)")
    s.add_argument("--path", default=None,
                   help="heap file to create and keep (default: a temporary one, removed after)")


#: Every command: (name, function, one-line help, option adders). Inspection commands take
#: _opt_access (--timeout/--snapshot). ``dump`` (object layer), ``gc`` and ``bench`` will be rows
#: here too.
COMMANDS: Final[list[tuple[str, Callable[[argparse.Namespace], int], str,
                           tuple[Callable[[argparse.ArgumentParser], None], ...]]]] = [
    ("info", cmd_info, "header fields", (_opt_file, _opt_json, _opt_access)),
    ("stats", cmd_stats, "bytes and counts of used and free blocks, runs and slots; "
     "fragmentation", (_opt_file, _opt_json, _opt_access)),
    ("check", cmd_check, "verify every invariant (exit 1 when damaged)",
     (_opt_file, _opt_check, _opt_progress, _opt_access)),
    ("walk", cmd_walk, "list blocks: offset, size, used/free, kind",
     (_opt_file, _opt_walk, _opt_json_lines, _opt_access)),
    ("map", cmd_map, "draw the heap: text on the terminal, or an SVG/PNG picture",
     (_opt_file, _opt_map, _opt_access)),
    ("repair", cmd_repair, "undo a dead process's operation; rebuild the bins from the tags",
     (_opt_file, _opt_repair, _opt_progress)),
    ("demo", cmd_demo, "worker processes share one persistent heap", (_opt_demo,)),
]


def exit_code_table() -> str:
    """The exit codes as text (the epilog of ``pheap --help``)."""
    lines = ["exit codes (every command):"]
    for code, name, meaning in EXIT_CODES:
        lines.extend(textwrap.wrap(meaning, 96, initial_indent=f"  {code:<4} {name:<15} ",
                                   subsequent_indent=" " * 22))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pheap", description="Inspect, check, repair and draw pheap heap files, or "
                "run the demo.", epilog=exit_code_table(),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"pheap {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, func, text, options in COMMANDS:
        s = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                           epilog="exit codes: `pheap --help` lists them")
        for add in options:
            add(s)
        s.set_defaults(func=func)
    return p


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _failure(e: BaseException, args: argparse.Namespace) -> tuple[int, str] | None:
    """(exit code, one message) for an error a command let through; None for a bug."""
    path = getattr(args, "file", None) or ""
    if isinstance(e, CliError):
        return e.code, str(e)
    if isinstance(e, LockTimeoutError):
        return EXIT_BUSY, str(_busy(path, e, args.command))
    if isinstance(e, NeedsRecoveryError):
        err = _pending_error(path)
        return (err.code, str(err)) if err else (EXIT_NEEDS_RECOVERY, _about(path, str(e)))
    if isinstance(e, DamagedJournalError) and path:  # seen by --snapshot, whose copy recovers
        err = _pending_error(path)
        if err is not None:
            return err.code, str(err)
    if isinstance(e, CorruptHeapError):
        where = (" (in the snapshot, which may be mid-operation: run it without --snapshot to "
                 "be sure)") if getattr(args, "snapshot", False) else ""
        hint = "" if args.command == "repair" else \
            f"; `pheap repair --dry-run {path}` tells whether repair can fix it"
        return EXIT_DAMAGED, f"{path}: DAMAGED: {_as_given(str(e), path)}{where}{hint}"
    if isinstance(e, FormatError):
        return EXIT_UNUSABLE, _about(path, str(e))
    if isinstance(e, OSError) and not isinstance(e, PheapError):
        name = e.filename if isinstance(e.filename, str) else path
        if path and os.path.abspath(name) == os.path.abspath(path):
            name = path
        return EXIT_UNUSABLE, f"{name}: {e.strerror or e}"
    if isinstance(e, PheapError):
        return EXIT_UNUSABLE, _about(path, str(e))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pheap`` command; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here at the latest
        return code
    except BrokenPipeError:
        # The reader is gone (`pheap walk FILE | head`): stop quietly. stdout now points at
        # /dev/null so that the interpreter's flush at exit has nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        _note("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        failure = _failure(e, args)
        if failure is None:
            traceback.print_exc()
            _note(f"internal error (a bug in pheap {__version__}; please report it with the "
                  "traceback above)")
            return EXIT_INTERNAL
        code, message = failure
        print(f"pheap: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
