"""A spawn process pool writes into a memfd heap it received as an argument.

    python3 examples/pool_memfd.py

Pickling a memfd heap sends its descriptor (the way multiprocessing sends descriptors), so even
workers started with ``spawn`` map the same memory. A file heap would be re-opened by path.
"""

import multiprocessing

import pheap


def square_into(heap: pheap.Heap, i: int) -> int:
    off = heap.malloc(16)
    heap.write(off, (i * i).to_bytes(16, "little"))
    return off


def main() -> None:
    heap = pheap.memfd()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        offs = pool.starmap(square_into, [(heap, i) for i in range(100)])
    squares = [int.from_bytes(heap.read(off, 16), "little") for off in offs]
    assert squares == [i * i for i in range(100)]
    heap.check()
    print(f"2 spawned workers wrote 100 squares into one memfd heap; sum {sum(squares)}")


if __name__ == "__main__":
    main()
