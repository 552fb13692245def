"""A tiny persistent key-value store: a hash table of offsets in one heap file, updated in
transactions so that a crash never leaves half an update.

    python3 examples/persistent_store.py [FILE]

Run it twice: the second run finds the first run's keys.
"""

import os
import struct
import sys
import tempfile
import zlib

import pheap

BUCKETS = 1024
ENTRY = struct.Struct("<QQI")  # next entry, value offset, value length; the key follows


class Store:
    def __init__(self, path: str) -> None:
        self.heap = pheap.open(path, "c")
        with self.heap.transaction():
            if not self.heap.root_offset:
                self.heap.root_offset = self.heap.calloc(BUCKETS, 8)

    def _bucket(self, key: bytes) -> int:
        return self.heap.root_offset + 8 * (zlib.crc32(key) % BUCKETS)

    def _find(self, key: bytes) -> tuple[int, int]:
        """(address of the link that points at the entry, entry offset or 0)."""
        h = self.heap
        link = self._bucket(key)
        (entry,) = struct.unpack("<Q", h.read(link, 8))
        while entry:
            nxt, _voff, _vlen = ENTRY.unpack(h.read(entry, ENTRY.size))
            (klen,) = struct.unpack("<I", h.read(entry + ENTRY.size, 4))
            if h.read(entry + ENTRY.size + 4, klen) == key:
                return link, entry
            link, entry = entry, nxt
        return link, 0

    def put(self, key: bytes, value: bytes) -> None:
        h = self.heap
        with h.transaction():  # all of it, or none of it
            link, entry = self._find(key)
            voff = h.malloc(len(value))
            h.write(voff, value)
            if entry:
                _nxt, old, _ = ENTRY.unpack(h.read(entry, ENTRY.size))
                h.free(old)
                h.write(entry + 8, struct.pack("<QI", voff, len(value)))
            else:
                entry = h.malloc(ENTRY.size + 4 + len(key))
                (head,) = struct.unpack("<Q", h.read(self._bucket(key), 8))
                h.write(entry, ENTRY.pack(head, voff, len(value)) + struct.pack("<I", len(key))
                        + key)
                h.write(self._bucket(key), struct.pack("<Q", entry))

    def get(self, key: bytes) -> bytes | None:
        with self.heap.lock():
            _link, entry = self._find(key)
            if not entry:
                return None
            _nxt, voff, vlen = ENTRY.unpack(self.heap.read(entry, ENTRY.size))
            return self.heap.read(voff, vlen)

    def close(self) -> None:
        self.heap.close()


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(),
                                                              "pheap-store-example.heap")
    store = Store(path)
    runs = int(store.get(b"runs") or b"0") + 1
    store.put(b"runs", str(runs).encode())
    for i in range(1000):
        store.put(f"key{i}".encode(), f"value {i} from run {runs}".encode())
    assert store.get(b"key7") == f"value 7 from run {runs}".encode()
    store.heap.check()
    print(f"{path}: run {runs}; key7 = {store.get(b'key7')!r}; "
          f"{store.heap.stats().used_blocks} live blocks")
    store.close()


if __name__ == "__main__":
    main()
