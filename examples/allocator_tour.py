"""The malloc textbook tour, on a heap file: slots, holes, splitting, coalescing, and memory
given back to the OS.

    python3 examples/allocator_tour.py [FILE]      (FILE: keep the heap, for `pheap map FILE`)

After each step one line maps the heap in address order (from ``h.walk(slots=True)``): a run of
small slots as ``run@OFFSET(SLOT_SIZE: USED/SLOTS)``, a block as ``OFFSET:SIZE`` (``*`` used,
``.`` free; the offset is what malloc returned, the size includes the 8-byte header), then
``wild``, the untouched wilderness above the last block. The tour checks every claim it makes
and exits 1 if one is wrong.
"""

import os
import sys
import tempfile

import pheap

MiB = 1 << 20
failures = []


def block_map(h: pheap.Heap) -> str:
    parts = []
    for b in h.walk(slots=True):
        if b.kind == "run":
            parts.append([b.offset, 0, 0, 0])  # offset, slot size, used slots, slots
        elif b.kind == "slot":
            run = parts[-1]
            run[1:] = b.size, run[2] + (not b.free), run[3] + 1
        else:
            parts.append(f"{b.offset}:{b.size}{'.' if b.free else '*'}")
    text = [p if isinstance(p, str) else f"run@{p[0]}({p[1]}B: {p[2]}/{p[3]})" for p in parts]
    return " ".join(text + [f"| wild {h.stats().wilderness}"])


def step(h: pheap.Heap, what: str, fn, *args):
    result = fn(*args)
    print(f"{what if result is None else f'{what} -> {result}':<25} {block_map(h)}")
    return result


def claim(ok: bool, text: str) -> None:
    print(f"   {'ok' if ok else 'WRONG'}: {text}")
    if not ok:
        failures.append(text)


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "tour.heap")
    h = pheap.open(path, "n")
    allocated = lambda: os.stat(path).st_blocks * 512 // 1024  # KiB the file takes on disk
    print(f"a new {h.capacity // 1024} KiB heap file\n\n"
          "-- small requests (up to 448 B) are slots in runs, one size class per run")
    p1 = step(h, "p1 = malloc(3)", h.malloc, 3)
    p2 = step(h, "p2 = malloc(10)", h.malloc, 10)
    p3 = step(h, "p3 = malloc(3)", h.malloc, 3)
    claim(h.usable_size(p1) == 8 and h.usable_size(p2) == 16 and p3 == p1 + 8,
          "p1 and p3 are neighbouring 8 B slots of one run; p2 is a 16 B slot of another")
    step(h, "free(p2)", h.free, p2)
    p4 = step(h, "p4 = malloc(8)", h.malloc, 8)
    claim(p4 == p3 + 8, "p4 does not take p2's hole: an 8 B request is served from the 8 B run")
    p5 = step(h, "p5 = malloc(12)", h.malloc, 12)
    claim(p5 == p2, "p5 is in p2's class (16 B) and gets p2's freed slot back")

    print("\n-- larger requests are blocks with boundary tags, laid end to end")
    a = step(h, "a = malloc(1000)", h.malloc, 1000)
    b = step(h, "b = malloc(2000)", h.malloc, 2000)
    c = step(h, "c = malloc(1000)", h.malloc, 1000)
    claim(b == a + 1008 and c == b + 2008, "each block is an 8 B header + its payload")
    step(h, "free(b)", h.free, b)
    d = step(h, "d = malloc(500)", h.malloc, 500)
    claim(d == b, "d takes b's hole, which is split: 512 B used, 1496 B stay free")
    step(h, "free(a)", h.free, a)
    step(h, "free(d)", h.free, d)
    claim(any(x.offset == a and x.size == c - a and x.free for x in h.walk()),
          f"d coalesced with both free neighbours: one free block of {c - a} B at a")
    step(h, "free(c)", h.free, c)
    claim(not [x for x in h.walk() if x.kind == "block"], "c was last: all merged into 'wild'")
    step(h, "free(p1, p3, p4, p5)", lambda: [h.free(p) for p in (p1, p3, p4, p5)] and None)
    st = h.stats()
    print(f"   stats: {st.used_blocks} live allocations, {st.runs} runs kept for reuse "
          f"({st.free_slots} free slots), {st.free_blocks} free blocks")

    print(f"\n-- a big block, and pages given back (the file: {os.path.getsize(path) // 1024} "
          f"KiB long, {allocated()} KiB allocated on disk)")
    big, guard = h.malloc(64 * MiB), h.malloc(1000)  # guard: keeps big a block when freed
    view = h.view(big, 64 * MiB)
    view[::4096] = b"x" * (64 * MiB // 4096)  # touch every page
    del view
    before = allocated()
    print(f"big = malloc(64 MiB) -> {big}, every page touched: the heap grew to "
          f"{h.capacity // MiB} MiB,\n   {before} KiB allocated (growth reserves its disk blocks: "
          "a full disk fails malloc, not a write)")
    h.free(big)
    after = allocated()
    print(f"free(big): {after} KiB allocated")
    claim(after < before - 60 * 1024, "freeing a large block punched its pages out of the file")
    h.free(guard)
    print(f"free(guard): {allocated()} KiB allocated (pages above the last block: kept for reuse)")
    h.trim()
    trimmed = allocated()
    print(f"trim(): {trimmed} KiB allocated (the file is still {os.path.getsize(path) // MiB} "
          "MiB long)")
    claim(trimmed < after, "trim() gave back the empty runs and the pages above the last block")
    h.check()
    h.close()
    print(f"\nheap check: ok; {len(failures)} wrong claims")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
