"""The ``pheap`` command: inspect, check, repair and draw a heap file, show and collect its shared
objects, time it, and run the demo.

Commands (``pheap COMMAND --help`` lists the options of each)::

    pheap info FILE     header fields                        [--json]
    pheap stats FILE    bytes and counts of blocks, runs and slots; fragmentation   [--json]
    pheap check FILE    every invariant                      [-q] [--progress]
    pheap walk FILE     list the blocks                      [--free] [--slots] [--limit N] [--json]
    pheap map FILE      draw the heap: text, or -o FILE.svg / FILE.png   [--width N] [--rows N]
    pheap dump FILE [PATH]  the shared objects from the root dict, or the subtree at PATH
                        (root/users/bob/tags/0)   [--depth N] [--full] [--allow-pickle] [--json]
    pheap repair FILE   undo a dead process's operation, rebuild the bins from the boundary tags
                        [--backup] [--dry-run] [--timeout S] [--progress]
    pheap gc FILE       free the shared objects nothing reaches   [--dry-run] [--timeout S] [--json]
    pheap bench         pheap's shared dict against dict, Manager, shelve, sqlite3 and the peers
                        installed here   [--quick]
    pheap demo          worker processes fill one heap file's shared objects; one is SIGKILLed
                        mid-transaction; a new interpreter verifies   [--workers N] [--records N]

**Waiting.** The inspection commands (info, stats, check, walk, map, dump) take the heap lock
shared, so they never stop each other, and wait for a writer at most ``--timeout`` seconds
(default 10), then exit 6 naming the pid that holds it. ``--snapshot`` never waits: it inspects a
private copy of the file taken without the lock (``pheap.snapshot``); if a process was changing
the heap while it was copied, the copy may be mid-operation, and the command says so on stderr.
``gc`` is an ordinary operation beside live processes (it keeps what they hold), so it waits like
them, at most ``--timeout`` (default 10); it opens the file read-write, which, as for any writer,
first undoes an operation a dead process left in the journal (``--dry-run`` opens it read-only:
exit 5 then). ``repair`` waits only as long as its ``--timeout`` (default 0: it does not wait).

**dump** reads the objects cell by cell and never unpickles a stored pickle unless
``--allow-pickle`` is given (``<pickle, N bytes>`` otherwise); str and bytes past 60 characters are
cut (``--full``); shared dicts, lists, queues, counters and arrays show their kind, length and
offset, an object met again (a shared reference, a cycle) shows once: ``<same dict as root/a>``. A
PATH names dict keys by their str form and list, queue and tuple items by index; one that names
nothing exits 2. The whole tree is read under one hold of the lock, then printed.

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
                      write (.png without Pillow); dump: a PATH that names nothing in the heap
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
                      worker failed or a record read back wrong; bench: pheap's row failed or a
                      store read values back wrong
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
import os
import pickle
import shutil
import struct
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, NamedTuple, NoReturn

from . import __version__, _map, codec, objects
from . import format as F
from .allocator import BlockInfo, HeapStats
from .errors import (
    CorruptHeapError,
    DamagedJournalError,
    FormatError,
    InvalidPointerError,
    LockTimeoutError,
    NeedsRecoveryError,
    PheapError,
    UnpicklingNotAllowedError,
)
from .heap import Heap
from .heap import open as open_heap
from .heap import snapshot as snapshot_heap
from .journal import discard, pending_in_file
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
     "cannot write (.png without Pillow); dump: a PATH that names nothing in the heap"),
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
     "demo: a worker failed or a record read back wrong; bench: pheap's row failed or a store "
     "read values back wrong"),
    (EXIT_INTERRUPTED, "interrupted", "interrupted (Ctrl-C)"),
    (EXIT_PIPE, "pipe", "standard output was closed early (pheap walk FILE | head): output stops "
     "without a message, with the code a shell reports for SIGPIPE"),
)

#: the commands that take --snapshot (the others name only --timeout when the lock is busy)
SNAPSHOT_COMMANDS: Final = frozenset(("info", "stats", "check", "walk", "map", "dump"))
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
    journal is idle now (another process recovered it meanwhile). O(records)."""
    return pending_in_file(path)


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
    """Mark the journal idle without replaying it, under the heap lock (see journal.discard)."""
    with _file_lock(path, timeout, False, "repair") as fd:
        discard(fd)


def _tags_damage(h: Heap) -> str:
    """Why the bins cannot be rebuilt from the boundary tags ('' when they can). O(blocks).
    (The allocator's tag walk, which ``Heap`` does not offer: a user never needs it.)"""
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

    This reads the handle's allocator under the lock rather than ``Heap.walk()``, which lists
    every block before yielding (so one bad tag would hide all the good blocks before it) and
    does not give a run's fill or the transaction log's offset.
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


def _busy(path: str, e: LockTimeoutError, command: str, waited: float = 0.0) -> CliError:
    """The one-line error for a heap whose lock stayed held (``waited``: the whole wait, when
    it was made of several tries)."""
    if waited:
        e = LockTimeoutError(f"heap lock not acquired within {waited:g} s: {_holder(path)} "
                             "holds it")
    if command not in SNAPSHOT_COMMANDS:
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
            raise _busy(path, e, command, timeout) from None
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
            report = h.check(progress)
        finally:
            progress.done()
        took = time.perf_counter() - t0
        st = h.stats()
    if not args.quiet:
        blocks = st.used_blocks - st.used_slots
        print(f"{path}: ok ({blocks} used blocks, {st.used_slots} used slots in "
              f"{_n(st.runs, 'run')}, {st.free_blocks} free blocks; checked in {took:.3f} s)")
        if report:
            print(f"{path}: {report['unreachable']} of {_n(report['objects'], 'shared object')} "
                  "unreachable, left by processes that died holding them: `pheap gc "
                  f"{path}` frees them")
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
# dump: the object tree from the root
# ---------------------------------------------------------------------------------------------

DUMP_CUT: Final = 60  #: characters of a str (bytes of a bytes, characters of a repr) shown
ARRAY_FIRST: Final = 8  #: values of an array shown
BUFFER_FIRST: Final = 16  #: bytes of a buffer shown


class _Ref(NamedTuple):
    """A shared object named by a ref cell (or by a ref inside a tuple blob)."""

    offset: int


class _Pickled:
    """A stored pickle: not loaded (the default), loaded, or failing to load."""

    __slots__ = ("nbytes", "loaded", "value", "error")

    def __init__(self, nbytes: int, loaded: bool = False, value: Any = None,
                 error: str = "") -> None:
        self.nbytes, self.loaded, self.value, self.error = nbytes, loaded, value, error

    def __repr__(self) -> str:
        if self.error:
            return f"<pickle, {self.nbytes} bytes: does not load here: {self.error}>"
        return f"<pickle, {self.nbytes} bytes>"


class _Node(NamedTuple):
    """What dump shows of one value: ``kind`` is dict, list, queue, counter, array, buffer,
    tuple (one holding shared objects), same (an object shown already), pickle or value."""

    kind: str
    offset: int = 0
    length: int = 0
    value: Any = None  #: value: the value; counter: its value; same: the first path; pickle
    #: the _Pickled; array: (dtype, shape, first values or None)
    children: list[tuple[Any, Any]] | None = None  #: (key or index, value): shown below it
    cut: bool = False  #: a container with items below --depth


def _path_part(key: Any) -> str:
    """A dict key or index as a PATH component: its str form, with % and / escaped."""
    return str(key).replace("%", "%25").replace("/", "%2F")


def _varint_at(buf: memoryview, p: int) -> tuple[int, int]:
    """(n, end) of the LEB128 varint at ``buf[p:]`` (codec's blob lengths)."""
    n = shift = 0
    while True:
        if p >= len(buf) or shift > 63:
            raise CorruptHeapError(f"blob: bad varint at byte {p}")
        b = buf[p]
        p += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, p


def _has_ref(v: Any) -> bool:
    return type(v) is _Ref or type(v) is tuple and any(_has_ref(x) for x in v)


class _ObjectReader:
    """Reads shared objects cell by cell, under the heap lock, through the object header table
    of :mod:`pheap.objects` (never through handles): refs come back as offsets, a stored pickle
    is loaded only when allowed, damage raises CorruptHeapError naming the offset, and each
    object is expanded once (a second path to it, or a cycle, shows as the same object).

    Wanted from the object layer: ``objects.read(core, off) -> (kind, cells)`` and a decode
    that leaves refs as offsets and pickles as bytes; until then this reads the format.
    """

    def __init__(self, core: Any, allow_pickle: bool, depth: int | None) -> None:
        self.core = core
        self.w = core._w
        self.allow_pickle = allow_pickle
        self.depth = depth
        self.seen: dict[int, tuple[str, str]] = {}  #: offset -> (kind, first path)
        self.pickles = 0  #: pickles met and not loaded

    # -- cells and blobs ---------------------------------------------------------------------

    def value(self, c: int) -> Any:
        """The value of cell ``c``: a Python value, a _Ref or a _Pickled."""
        if c & 1 or c & 7 == codec.TAG_IMM:
            return codec.from_cell(c)
        if c & 7 == codec.TAG_REF:
            return _Ref(codec.ref_offset(c))
        if c & 7 or not c:
            raise CorruptHeapError(f"cell {c:#x} is neither a value, a blob nor a ref")
        try:
            buf = self.core.payload(c)
        except InvalidPointerError:
            raise CorruptHeapError(f"a blob cell names offset {c}, not a live allocation") \
                from None
        try:
            return self.blob(memoryview(buf))
        except CorruptHeapError as e:
            raise CorruptHeapError(f"offset {c}: {e}") from None

    def blob(self, buf: memoryview) -> Any:
        """The value of the blob at the start of ``buf``; pickles as _Pickled (loaded when
        allowed), inside tuples too."""
        if buf[0] == codec.BLOB_PICKLE:
            n, p = _varint_at(buf, 1)
            if p + n > len(buf):
                raise CorruptHeapError(f"blob: pickle of {n} bytes runs past its block")
            if not self.allow_pickle:
                self.pickles += 1
                return _Pickled(n)
            try:
                return _Pickled(n, True, pickle.loads(buf[p:p + n]))
            except Exception as e:  # noqa: BLE001 - any failure of pickle: shown, not raised
                why = f"{type(e).__name__}: {e}".splitlines()[0]
                return _Pickled(n, error=why[:DUMP_CUT * 2])
        if buf[0] in (codec.BLOB_TUPLE, codec.BLOB_FROZENSET):
            try:
                return codec.decode(buf, deref=_Ref, allow_pickle=self.allow_pickle)
            except UnpicklingNotAllowedError:
                return self._container(buf)  # a pickle inside: item by item
            except CorruptHeapError:
                raise
            except Exception:  # noqa: BLE001 - a pickle inside that does not load here
                if not self.allow_pickle:
                    raise
                return self._container(buf)
        return codec.decode(buf, deref=_Ref)

    def _container(self, buf: memoryview) -> Any:
        n, p = _varint_at(buf, 1)
        items = []
        for _ in range(n):
            if p >= len(buf):
                raise CorruptHeapError("blob: a tuple's items run past its block")
            end = p + codec.blob_length(buf[p:])
            items.append(self.blob(buf[p:end]))
            p = end
        if buf[0] == codec.BLOB_TUPLE:
            return tuple(items)
        try:
            return frozenset(items)
        except TypeError:
            return tuple(items)

    # -- objects -----------------------------------------------------------------------------

    def kind(self, off: int) -> int:
        """The kind of the shared object at ``off`` (checked to be one)."""
        try:
            self.core.live_size(off)
        except InvalidPointerError:
            raise CorruptHeapError(f"offset {off}: a ref names something that is not a live "
                                   "allocation") from None
        o = off >> 3
        kind = objects._kind_at(self.w, o)
        if kind not in objects.KINDS or not self.w[o + objects.O_SERIAL]:
            raise CorruptHeapError(f"offset {off}: a ref names something that is not a live "
                                   "shared object")
        return kind

    def items(self, off: int, kind: int) -> list[tuple[Any, Any]]:
        """(key, value) of a dict, (index, value) of a list or queue (from its head)."""
        w = self.w
        o = off >> 3
        if kind == objects.DICT:
            used, ecap = w[o + objects.D_USED], w[o + objects.D_ECAP]
            if used > ecap:
                raise CorruptHeapError(f"offset {off}: dict uses {used} of {ecap} entries")
            self._array(off, w[o + objects.D_ENTRIES], ecap * objects.ENTRY * 8)
            ent = w[o + objects.D_ENTRIES] >> 3
            out = []
            for e in range(used):
                b = ent + objects.ENTRY * e
                if w[b + 1]:
                    out.append((self.value(w[b + 1]), self.value(w[b + 2])))
            return out
        if kind == objects.LIST:
            n, cap = w[o + objects.L_LEN], w[o + objects.L_CAP]
            if n > cap:
                raise CorruptHeapError(f"offset {off}: list length {n} past its capacity {cap}")
            self._array(off, w[o + objects.L_ITEMS], cap * 8)
            items = w[o + objects.L_ITEMS] >> 3
            return [(i, self.value(w[items + i])) for i in range(n)]
        n, head, cap = w[o + objects.Q_LEN], w[o + objects.Q_HEAD], w[o + objects.Q_CAP]
        if n > cap or (cap and head >= cap):
            raise CorruptHeapError(f"offset {off}: queue of {n} items from {head} in {cap}")
        self._array(off, w[o + objects.Q_ITEMS], cap * 8)
        items = w[o + objects.Q_ITEMS] >> 3
        return [(i, self.value(w[items + (head + i) % cap])) for i in range(n)]

    def _array(self, off: int, p: int, nbytes: int) -> None:
        if not nbytes:
            return
        try:
            have = self.core.live_size(p)
        except InvalidPointerError:
            raise CorruptHeapError(f"offset {off}: its items at {p} are not a live "
                                   "allocation") from None
        if have < nbytes:
            raise CorruptHeapError(f"offset {off}: its items hold {have} bytes, {nbytes} "
                                   "needed")

    def node(self, v: Any, path: str, depth: int) -> _Node:
        """What to show of value ``v`` met at ``path``, ``depth`` levels below the start."""
        if type(v) is _Pickled:
            return _Node("pickle", length=v.nbytes, value=v)
        if type(v) is tuple and _has_ref(v):
            items = list(enumerate(v))
            if self.depth is not None and depth >= self.depth:
                return _Node("tuple", length=len(v), cut=bool(v))
            return _Node("tuple", length=len(v), children=items)
        if type(v) is not _Ref:
            return _Node("value", value=v)
        off = v.offset
        kind = self.kind(off)
        name = objects.KINDS[kind]
        first = self.seen.get(off)
        o = off >> 3
        w = self.w
        if kind == objects.ARRAY:
            try:
                dtype, shape, data, nbytes = objects._array_meta(w, off)
            except UnicodeDecodeError:
                raise CorruptHeapError(f"offset {off}: array dtype is not text") from None
            name = "buffer" if dtype == "|mv" else "array"
            if first is not None:
                return _Node("same", off, value=(name, first[1]))
            self.seen[off] = (name, path)
            if data + nbytes > self.core._cap:
                raise CorruptHeapError(f"offset {off}: array data runs past the mapping")
            return _Node(name, off, nbytes, (dtype, shape, self._first(dtype, data, nbytes)))
        if first is not None:
            return _Node("same", off, value=(name, first[1]))
        if kind == objects.COUNTER:
            self.seen[off] = (name, path)
            return _Node("counter", off, value=objects._from_i64(w[o + objects.C_VALUE]))
        length = w[o + {objects.DICT: objects.D_COUNT, objects.LIST: objects.L_LEN,
                        objects.QUEUE: objects.Q_LEN}[kind]]
        if self.depth is not None and depth >= self.depth:
            return _Node(name, off, length, cut=bool(length))  # not expanded: not 'seen'
        self.seen[off] = (name, path)
        return _Node(name, off, length, children=self.items(off, kind))

    def _first(self, dtype: str, data: int, nbytes: int) -> Any:
        """The first values of an array (None without numpy), or a buffer's first bytes."""
        if dtype == "|mv":
            return bytes(self.core.region.mm[data:data + min(nbytes, BUFFER_FIRST)])
        try:
            import numpy as np
        except ImportError:
            return None
        try:
            dt = np.dtype(dtype)
        except (TypeError, ValueError):
            raise CorruptHeapError(f"array dtype {dtype!r} is not a numpy type") from None
        n = min(nbytes // max(dt.itemsize, 1), ARRAY_FIRST)
        raw = bytes(self.core.region.mm[data:data + n * dt.itemsize])
        return np.frombuffer(raw, dtype=dt).tolist()

    def find(self, parts: list[str]) -> tuple[Any, str]:
        """(value, canonical path) that PATH components ``parts`` name from the root."""
        root = int(self.w[F.H_OBJECTS])
        v: Any = _Ref(root) if root else {}
        path = "root"
        for part in parts:
            name = part.replace("%2F", "/").replace("%2f", "/").replace("%25", "%")
            if type(v) is _Ref:
                kind = self.kind(v.offset)
                what = objects.KINDS[kind]
                if kind == objects.DICT:
                    v = self._key(self.items(v.offset, kind), name, path)
                elif kind in (objects.LIST, objects.QUEUE):
                    v = self._index(self.items(v.offset, kind), name, path, what)
                else:
                    raise _no_path(f"{path} is a {what}: a PATH goes into dicts, lists, "
                                   "queues and tuples")
            elif type(v) is tuple:
                v = self._index(list(enumerate(v)), name, path, "tuple")
            elif type(v) is dict:  # the root of a heap without objects
                raise _no_path(f"{path}/{part}: the heap has no objects")
            else:
                what = "pickle" if type(v) is _Pickled else type(v).__name__
                raise _no_path(f"{path} is a {what}, not a container: nothing at "
                               f"{path}/{part}")
            path = f"{path}/{part}"
        return v, path

    @staticmethod
    def _key(items: list[tuple[Any, Any]], name: str, path: str) -> Any:
        hits = [(k, v) for k, v in items if str(k) == name]
        if len(hits) > 1:
            exact = [(k, v) for k, v in hits if type(k) is str]
            if len(exact) != 1:
                raise _no_path(f"{path}/{_path_part(name)}: several keys of the dict at {path} "
                               f"read {name!r}: " + ", ".join(repr(k) for k, _ in hits))
            hits = exact
        if not hits:
            some = ", ".join(_short(k, False)[0] for k, _ in items[:5])
            raise _no_path(f"{path}/{_path_part(name)}: no such key in the dict at {path} ("
                           + (f"{_n(len(items), 'key')}: {some}" if items else "it is empty")
                           + (", ..." if len(items) > 5 else "") + ")")
        return hits[0][1]

    @staticmethod
    def _index(items: list[tuple[Any, Any]], name: str, path: str, what: str) -> Any:
        try:
            i = int(name)
        except ValueError:
            raise _no_path(f"{path}/{name}: the {what} at {path} takes an index, not "
                           f"{name!r}") from None
        if not -len(items) <= i < len(items):
            raise _no_path(f"{path}/{name}: index {i} out of range: the {what} at {path} has "
                           f"{_n(len(items), 'item')}")
        return items[i][1]


def _no_path(text: str) -> CliError:
    return CliError(EXIT_USAGE, f"{text} (`pheap dump FILE` shows the tree)")


def _safe_repr(v: Any) -> str:
    try:
        return repr(v)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        if type(v) is int:
            return f"<int of {v.bit_length()} bits: --full prints every digit>"
        raise
    except Exception as e:  # noqa: BLE001 - an unpickled object's own repr failing
        return f"<{type(v).__name__}: repr failed: {type(e).__name__}>"


def _short(v: Any, full: bool) -> tuple[str, bool]:
    """(text of ``v``, whether it was cut): str and bytes past DUMP_CUT characters or bytes,
    and other values whose repr is longer, are cut unless ``full``."""
    t = type(v)
    if (t is str or t is bytes) and not full and (len(v) > DUMP_CUT + 20 or
                                                   len(repr(v)) > DUMP_CUT + 20):
        k = DUMP_CUT
        while k > 1 and len(repr(v[:k])) > DUMP_CUT + 3:  # escapes take up to 4 each
            k = k * 2 // 3
        return f"{v[:k]!r}... ({len(v)} {'chars' if t is str else 'bytes'})", True
    if t is _Pickled:
        if not v.loaded:
            return repr(v), False
        text, cut = _short(v.value, full)
        return f"{text} (unpickled, {v.nbytes} bytes)", cut
    r = _safe_repr(v)
    if len(r) > DUMP_CUT + 20 and not full:
        return f"{r[:DUMP_CUT]}... ({len(r)} chars of repr)", True
    return r, False


def _array_text(node: _Node) -> str:
    dtype, shape, first = node.value
    if node.kind == "buffer":
        more = "..." if node.length > len(first) else ""
        return f"buffer, {node.length} bytes, offset {node.offset}: {first!r}{more}"
    dims = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
    try:
        import numpy as np

        dtype = np.dtype(dtype).name
    except (ImportError, TypeError, ValueError):
        pass
    head = f"array {dtype} {dims}, offset {node.offset}"
    if first is None:
        return head + " (numpy is not installed: values not shown)"
    count = math.prod(shape)
    return head + ": [" + ", ".join(map(repr, first)) + (", ...]" if count > len(first)
                                                         else "]")


class _DumpText:
    """Lines of the tree: ``KEY: what``, indented by depth."""

    def __init__(self, full: bool, depth: int | None) -> None:
        self.full, self.depth = full, depth
        self.lines: list[str] = []
        self.cut = 0  #: values cut short

    def describe(self, node: _Node) -> str:
        if node.kind in ("dict", "list", "queue", "tuple"):
            text = f"{node.kind}, {_n(node.length, 'item')}"
            if node.kind != "tuple":
                text += f", offset {node.offset}"
            else:
                text += ", holding shared objects"
            if node.cut:
                text += f" (not shown: below --depth {self.depth})"
            return text
        if node.kind == "counter":
            return f"counter {node.value}, offset {node.offset}"
        if node.kind in ("array", "buffer"):
            return _array_text(node)
        if node.kind == "same":
            kind, first = node.value
            return f"<same {kind} as {first}>"
        text, cut = _short(node.value, self.full)
        self.cut += cut
        return text

    def enter(self, depth: int, label: str, node: _Node) -> None:
        self.lines.append(f"{'  ' * depth}{label}: {self.describe(node)}")

    def leave(self, depth: int, node: _Node) -> None:
        pass


class _DumpJson:
    """The tree as one JSON document (indented); values JSON cannot hold are tagged strings
    in angle brackets."""

    def __init__(self, full: bool, depth: int | None) -> None:
        self.full, self.depth = full, depth
        self.text = _DumpText(full, depth)  # for the tags
        self.parts: list[str] = []
        self.stack: list[list[Any]] = []  #: per open container: [is a dict, items, keys]
        self.cut = 0

    def _key(self, key: Any) -> str:
        keys = self.stack[-1][2]
        k = key if type(key) is str else str(key)
        if k in keys:
            k = f"<{type(key).__name__} {_safe_repr(key)}>"
        keys.add(k)
        return k

    def _put(self, key: Any, text: str) -> None:
        if self.stack:
            top = self.stack[-1]
            self.parts.append("," if top[1] else "")
            top[1] += 1
            self.parts.append("\n" + "  " * (len(self.stack) + 1))
            if top[0]:
                self.parts.append(json.dumps(self._key(key)) + ": ")
        self.parts.append(text)

    def value(self, v: Any) -> Any:
        """``v`` as something json.dumps takes (tags for the rest)."""
        t = type(v)
        if v is None or t is bool or t is int:
            if t is int and v.bit_length() > 13000 and not self.full:  # > 4000 digits
                return f"<int of {v.bit_length()} bits>"
            return v
        if t is float:
            return v if math.isfinite(v) else f"<float {v!r}>"
        if t is str:
            if len(v) > DUMP_CUT and not self.full:
                self.cut += 1
                return f"<str, {len(v)} chars: {v[:DUMP_CUT]!r}...>"
            return v
        if t is tuple:
            return [self.value(x) for x in v]
        if t is _Pickled and v.loaded:
            return self.value(v.value)
        text, cut = _short(v, self.full)
        self.cut += cut
        if t is _Pickled or text.startswith(t.__name__):
            return text if t is _Pickled else f"<{text}>"
        return f"<{t.__name__} {text}>"

    def enter(self, depth: int, key: Any, node: _Node) -> None:
        if node.children is not None:
            self._put(key, "{" if node.kind == "dict" else "[")
            self.stack.append([node.kind == "dict", 0, set()])
            return
        if node.kind == "value" or node.kind == "pickle":
            self._put(key, json.dumps(self.value(node.value)))
        elif node.kind == "counter":
            self._put(key, json.dumps(node.value))
        elif node.kind in ("dict", "queue", "list", "tuple") and not node.length:
            self._put(key, "{}" if node.kind == "dict" else "[]")
        elif node.kind == "same":
            self._put(key, json.dumps(self.text.describe(node)))
        else:
            self._put(key, json.dumps(f"<{self.text.describe(node)}>"))

    def leave(self, depth: int, node: _Node) -> None:
        top = self.stack.pop()
        end = "}" if top[0] else "]"
        self.parts.append(("\n" + "  " * (len(self.stack) + 1) if top[1] else "") + end)


def _dump_walk(reader: _ObjectReader, value: Any, path: str, out: Any, json_keys: bool) -> None:
    """Show ``value`` (found at ``path``) and everything below it through ``out``, depth
    first, without recursion (shared objects nest as deep as anyone made them)."""
    node = reader.node(value, path, 0)
    out.enter(0, path, node)
    if node.children is None:
        return
    stack: list[tuple[_Node, str, Iterator[tuple[Any, Any]]]] = [(node, path, iter(node.children))]
    while stack:
        parent, ppath, it = stack[-1]
        item = next(it, None)
        if item is None:
            stack.pop()
            out.leave(len(stack), parent)
            continue
        key, v = item
        cpath = f"{ppath}/{_path_part(key)}"
        child = reader.node(v, cpath, len(stack))
        label = key if json_keys else (str(key) if parent.kind != "dict" else
                                       _short(key, False)[0])
        out.enter(len(stack), label, child)
        if child.children is not None:
            stack.append((child, cpath, iter(child.children)))


@contextmanager
def _int_digits(limit: int | None) -> Iterator[None]:
    """Lift the limit on digits of int <-> str conversions (0: none) while dump renders."""
    get = getattr(sys, "get_int_max_str_digits", None)
    if limit is None or get is None:
        yield
        return
    before = get()
    sys.set_int_max_str_digits(limit)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(before)


def cmd_dump(args: argparse.Namespace) -> int:
    path = args.file
    given = (args.path or "root").strip("/")
    parts = given.split("/") if given else []
    if parts and parts[0] == "root":
        parts = parts[1:]
    out: _DumpText | _DumpJson = (_DumpJson if args.json else _DumpText)(args.full, args.depth)
    with _inspect(args) as h, _int_digits(0 if args.full else None):
        core = h._core

        def read() -> tuple[bool, int]:
            reader = _ObjectReader(core, args.allow_pickle, args.depth)
            if not core._w[F.H_OBJECTS] and not parts:
                return False, 0
            try:
                value, where = reader.find(parts)
                _dump_walk(reader, value, where, out, args.json)
            except IndexError:  # a word past the mapping: damage the checks above missed
                raise CorruptHeapError("an object's fields point past the mapping") from None
            return True, reader.pickles

        found, pickles = core.run(read)
    if not found:
        if args.json:
            print(json.dumps({"file": path, "path": "root", "value": {}}, indent=2))
        else:
            print(f"{path}: no objects (the heap has no root dict)")
        return EXIT_OK
    if isinstance(out, _DumpJson):
        sys.stdout.write(f'{{\n  "file": {json.dumps(path)},\n  "path": '
                         f'{json.dumps("/".join(["root", *parts]))},\n  "value": ')
        text = "".join(out.parts)
        for i in range(0, len(text), COPY_CHUNK):
            sys.stdout.write(text[i:i + COPY_CHUNK])
        sys.stdout.write("\n}\n")
    else:
        for i in range(0, len(out.lines), 4096):
            sys.stdout.write("\n".join(out.lines[i:i + 4096]) + "\n")
    sys.stdout.flush()
    notes = []
    if out.cut:
        notes.append(f"{_n(out.cut, 'value')} cut short (--full shows them whole)")
    if pickles:
        notes.append(f"{_n(pickles, 'pickle')} not loaded (--allow-pickle loads them: only for "
                     "files you trust, unpickling runs code)")
    if notes:
        _note(f"{path}: " + "; ".join(notes))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# gc: free the shared objects nothing reaches
# ---------------------------------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace) -> int:
    path = args.file
    with _open(path, "r" if args.dry_run else "w", args.timeout, "gc") as h:
        with h.lock():  # one hold: the counts and the bytes freed belong together
            before = h.stats().used_bytes
            counts = dict(h.gc(dry_run=args.dry_run))
            counts["bytes_freed"] = before - h.stats().used_bytes
    if args.json:
        print(json.dumps(dict(counts, path=path, dry_run=bool(args.dry_run)), indent=2))
        return EXIT_OK
    n, kept, lost = counts["objects"], counts["reachable"], counts["unreachable"]
    head = f"{path}: {_n(n, 'shared object')}, {kept} reachable (from the root, or kept by " \
        "a live process)"
    if not lost:
        print(f"{head}; nothing to free")
    elif args.dry_run:
        print(f"{head}; {lost} unreachable, left by processes that died holding them: "
              f"gc would free them (dry run, nothing changed)")
    else:
        print(f"{head}; freed {lost} unreachable, left by processes that died holding them "
              f"({_map.human(counts['bytes_freed'])})")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    size = dict(_bench.QUICK if args.quick else _bench.FULL)
    for k in ("keys", "repeats", "budget"):
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    progress = _progress(args, "pheap bench")
    show = progress.enabled

    def step(text: str) -> None:
        if show:
            print(f"\r{text[:70]:<70}", end="", file=sys.stderr, flush=True)

    try:
        code = _bench.run(int(size["keys"]), int(size["repeats"]), float(size["budget"]),
                          progress=step)
    finally:
        if show:
            print(f"\r{'':<70}\r", end="", file=sys.stderr, flush=True)
    return EXIT_OK if code == 0 else EXIT_INTERNAL


def cmd_demo(args: argparse.Namespace) -> int:
    if args.path is not None and os.path.lexists(args.path):
        raise CliError(EXIT_UNUSABLE, f"{args.path}: already exists; the demo writes a new heap "
                       "there: give a path that does not exist yet")
    from .demo import run_demo

    return run_demo(args.workers, args.records, args.path)


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


def _opt_dump(s: argparse.ArgumentParser) -> None:
    s.add_argument("path", metavar="PATH", nargs="?", default=None,
                   help="the subtree to show (default root): dict keys by their str form, "
                   "list, queue and tuple items by index, separated by /, e.g. "
                   "root/users/bob/tags/0 (a leading root/ may be left out; %%2F is a / inside "
                   "a key, %%25 a %%)")
    s.add_argument("--depth", type=_whole(0), default=None, metavar="N",
                   help="show N levels below PATH (default: all)")
    s.add_argument("--full", action="store_true",
                   help=f"show long values whole (default: str and bytes past {DUMP_CUT} "
                   "characters or bytes are cut, with their length)")
    s.add_argument("--allow-pickle", action="store_true",
                   help="load stored pickles to show them (default: shown as <pickle, N "
                   "bytes>; unpickling runs code: only for files you trust)")
    s.add_argument("--json", action="store_true",
                   help="print one JSON document: {file, path, value}; values JSON cannot hold "
                   "(bytes, NaN, pickles, arrays, shared references) are strings in <angle "
                   "brackets>")


def _opt_gc(s: argparse.ArgumentParser) -> None:
    s.add_argument("--dry-run", action="store_true",
                   help="count what gc would free and change nothing (opens the heap "
                   "read-only)")
    s.add_argument("--timeout", type=_seconds, default=INSPECT_TIMEOUT, metavar="SECONDS",
                   help=f"wait at most this long for a process that holds the heap lock, then "
                   f"exit 6 naming it (default {INSPECT_TIMEOUT:g})")
    _opt_json(s)


def _opt_bench(s: argparse.ArgumentParser) -> None:
    s.add_argument("--quick", action="store_true",
                   help="2000 keys, 3 repeats: well under a minute (default: 20000 keys, 5 "
                   "repeats: a few minutes)")
    s.add_argument("--keys", type=_whole(1), default=None, help=argparse.SUPPRESS)
    s.add_argument("--repeats", type=_whole(1), default=None, help=argparse.SUPPRESS)
    s.add_argument("--budget", type=_seconds, default=None, help=argparse.SUPPRESS)
    _opt_progress(s)


def _opt_demo(s: argparse.ArgumentParser) -> None:
    s.add_argument("--workers", type=_whole(1), default=4, help="processes (default 4)")
    s.add_argument("--records", type=_whole(1), default=20000,
                   help="records per worker (default 20000)")
    s.add_argument("--path", default=None,
                   help="heap file to create and keep (default: a temporary one, removed after)")


#: Every command: (name, function, one-line help, option adders). Inspection commands take
#: _opt_access (--timeout/--snapshot).
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
    ("dump", cmd_dump, "print the shared objects from the root dict (or the subtree PATH "
     "names)", (_opt_file, _opt_dump, _opt_access)),
    ("gc", cmd_gc, "free the shared objects nothing reaches (left by processes that died)",
     (_opt_file, _opt_gc)),
    ("bench", cmd_bench, "time pheap's shared dict against dict, Manager, shelve, sqlite3 "
     "and the peers installed here", (_opt_bench,)),
    ("demo", cmd_demo, "worker processes fill one heap file's shared dict, list and counter; "
     "one is SIGKILLed mid-transaction and replaced; a new interpreter verifies every record",
     (_opt_demo,)),
]


def exit_code_table() -> str:
    """The exit codes as text (the epilog of ``pheap --help``)."""
    lines = ["exit codes (every command):"]
    for code, name, meaning in EXIT_CODES:
        lines.extend(textwrap.wrap(meaning, 96, initial_indent=f"  {code:<4} {name:<15} ",
                                   subsequent_indent=" " * 22))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pheap", description="Inspect, check, repair and draw pheap heap files, "
                "show and collect\ntheir shared objects, time pheap, or run the demo.",
                epilog=exit_code_table(),
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
        args, extra = parser.parse_known_args(argv)
        if extra and args.command == "dump" and args.path is None and \
                not extra[0].startswith("-"):
            args.path = extra.pop(0)  # dump FILE --option PATH: argparse took FILE alone
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
