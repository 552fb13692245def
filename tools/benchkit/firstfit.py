"""The first-fit baseline: the textbook explicit free list (CS:APP 9.9) over a bytearray.

What a plain, unsegregated allocator does on the same inputs: the benchmarks run it beside pheap's
allocator and ``multiprocessing.heap``. Pure Python, no dependencies, checked by
tests/test_bench_tools.py against a model.
"""

from __future__ import annotations

_USED = 1  #: header bit 0: the block is in use
_PREV_USED = 2  #: header bit 1: the block just before this one is in use (or there is none)
_MIN = 32  #: header + next + prev + footer: the smallest block that can be free
_BASE = 8  #: the first block starts here, so that offset 0 can mean "no block"


class FirstFit:
    """The classic explicit-free-list malloc (CS:APP 9.9) over a bytearray: a baseline.

    Blocks fill ``buf[8:brk]``; a block's size is a multiple of 8, at least 32, header included.
    Header word = size | USED | PREV_USED. A used block is ``[header][payload]``; a free block is
    ``[header][next][prev] ... [footer = size]`` and sits in one doubly linked free list, newest
    first. ``malloc`` takes the first block of the list that fits and splits off a remainder of
    32 bytes or more; ``free`` merges with both neighbours through the boundary tags, and a block
    freed at the end lowers ``brk``; when nothing fits, the block is carved at ``brk`` and the
    bytearray doubles as needed. ``realloc`` shrinks in place, grows in place at ``brk`` or into a
    free next block, else moves. Offsets are payload offsets into ``buf`` (never 0); ``peak`` is
    the high-water mark of ``brk``. A freed offset is checked for the USED bit only.

    >>> ff = FirstFit(); p = ff.malloc(100); ff.buf[p:p + 5] = b"hello"; q = ff.malloc(10)
    >>> ff.free(p); ff.malloc(50) == p, ff.peak
    (True, 152)
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.buf = bytearray(max(capacity, 64) + 7 & -8)
        self._w = memoryview(self.buf).cast("Q")
        self.brk = _BASE
        self.peak = _BASE
        self.head = 0  #: first block of the free list (0 = empty)

    def _grow(self, end: int) -> None:
        self._w.release()  # a bytearray cannot resize while a view of it exists
        self.buf.extend(bytes(max(end, 2 * len(self.buf)) - len(self.buf)))
        self._w = memoryview(self.buf).cast("Q")

    def _push(self, b: int) -> None:
        w = self._w
        h = self.head
        w[(b >> 3) + 1] = h
        w[(b >> 3) + 2] = 0
        if h:
            w[(h >> 3) + 2] = b
        self.head = b

    def _unlink(self, b: int) -> None:
        w = self._w
        nxt = w[(b >> 3) + 1]
        prv = w[(b >> 3) + 2]
        if prv:
            w[(prv >> 3) + 1] = nxt
        else:
            self.head = nxt
        if nxt:
            w[(nxt >> 3) + 2] = prv

    def _carve(self, s: int) -> int:
        b = self.brk
        end = b + s
        if end > len(self.buf):
            self._grow(end)
        self._w[b >> 3] = s | _USED | _PREV_USED  # the block below brk is never free
        self.brk = end
        if end > self.peak:
            self.peak = end
        return b + 8

    def malloc(self, n: int) -> int:
        """Allocate ``n`` bytes; return the payload offset. O(free blocks): first fit."""
        if n < 0:
            raise ValueError(f"negative size {n}")
        s = (n + 15) & -8
        if s < _MIN:
            s = _MIN
        w = self._w
        b = self.head
        while b:
            size = w[b >> 3] & -8
            if size >= s:
                break
            b = w[(b >> 3) + 1]
        else:
            return self._carve(s)
        self._unlink(b)
        rem = size - s
        if rem >= _MIN:
            w[b >> 3] = s | _USED | _PREV_USED  # the block before a free block is used
            r = b + s
            w[r >> 3] = rem | _PREV_USED  # the block after r already has PREV_USED clear
            w[((r + rem) >> 3) - 1] = rem
            self._push(r)
        else:
            w[b >> 3] = size | _USED | _PREV_USED
            w[(b + size) >> 3] |= _PREV_USED  # a free block never touches brk: a block follows
        return b + 8

    def _used_block(self, p: int) -> int:
        if type(p) is not int or p & 7 or p < _BASE + 8 or p >= self.brk \
                or not self._w[(p - 8) >> 3] & _USED:
            raise ValueError(f"first-fit: {p} is not a live block")
        return p - 8

    def free(self, p: int) -> None:
        """Free the block at ``p``, merging it with free neighbours. O(1)."""
        b = self._used_block(p)
        w = self._w
        hdr = w[b >> 3]
        size = hdr & -8
        nb = b + size
        if not hdr & _PREV_USED:
            psize = w[(b >> 3) - 1]
            b -= psize
            self._unlink(b)
            size += psize
        if nb == self.brk:
            self.brk = b
            return
        nh = w[nb >> 3]
        if nh & _USED:
            w[nb >> 3] = nh & ~_PREV_USED
        else:
            self._unlink(nb)
            size += nh & -8
        w[b >> 3] = size | _PREV_USED
        w[((b + size) >> 3) - 1] = size
        self._push(b)

    def realloc(self, p: int, n: int) -> int:
        """Resize the block at ``p`` to ``n`` bytes, keeping its contents; return its offset."""
        if p == 0:
            return self.malloc(n)
        if n < 0:
            raise ValueError(f"negative size {n}")
        b = self._used_block(p)
        w = self._w
        hdr = w[b >> 3]
        size = hdr & -8
        s = max(_MIN, (n + 15) & -8)
        flags = hdr & (_USED | _PREV_USED)
        if s <= size:  # shrink: cut off the tail as a used block and free it (it coalesces)
            if size - s >= _MIN:
                w[b >> 3] = s | flags
                w[(b + s) >> 3] = (size - s) | _USED | _PREV_USED
                self.free(b + s + 8)
            return p
        nb = b + size
        if nb == self.brk:  # the last block: move brk
            end = b + s
            if end > len(self.buf):
                self._grow(end)
                w = self._w
            w[b >> 3] = s | flags
            self.brk = end
            if end > self.peak:
                self.peak = end
            return p
        nh = w[nb >> 3]
        total = size + (nh & -8)
        if not nh & _USED and total >= s:  # absorb the free next block
            self._unlink(nb)
            rem = total - s
            if rem >= _MIN:
                w[b >> 3] = s | flags
                r = b + s
                w[r >> 3] = rem | _PREV_USED
                w[((r + rem) >> 3) - 1] = rem
                self._push(r)
            else:
                w[b >> 3] = total | flags
                w[(b + total) >> 3] |= _PREV_USED
            return p
        q = self.malloc(n)  # may grow buf; slices below see the new bytes
        self.buf[q:q + size - 8] = self.buf[p:p + size - 8]
        self.free(p)
        return q

    def usable_size(self, p: int) -> int:
        """Payload bytes of the live block at ``p``."""
        b = self._used_block(p)
        return (self._w[b >> 3] & -8) - 8

    def check(self) -> None:
        """Walk every block and the free list; raise RuntimeError naming a broken invariant."""
        w = self._w

        def bad(off: int, msg: str) -> RuntimeError:
            return RuntimeError(f"first-fit: offset {off}: {msg}")

        free_blocks: set[int] = set()
        b = _BASE
        prev_free = False
        while b < self.brk:
            hdr = w[b >> 3]
            size = hdr & -8
            if size < _MIN or b + size > self.brk:
                raise bad(b, f"size {size} below {_MIN} or past brk {self.brk}")
            if bool(hdr & _PREV_USED) == prev_free:
                raise bad(b, "PREV_USED disagrees with the previous block")
            if hdr & _USED:
                prev_free = False
            else:
                if prev_free:
                    raise bad(b, "two adjacent free blocks")
                if w[((b + size) >> 3) - 1] != size:
                    raise bad(b, "footer differs from the header")
                free_blocks.add(b)
                prev_free = True
            b += size
        if prev_free:
            raise bad(b, "the block below brk is free")
        seen: set[int] = set()
        x, prev = self.head, 0
        while x:
            if x not in free_blocks or x in seen:
                raise bad(x, "free list links to a non-free block, or loops")
            if w[(x >> 3) + 2] != prev:
                raise bad(x, "prev link is not the previous list node")
            seen.add(x)
            prev, x = x, w[(x >> 3) + 1]
        if seen != free_blocks:
            raise bad(min(free_blocks - seen), "free block missing from the free list")
