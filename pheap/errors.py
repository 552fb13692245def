"""The exception hierarchy.

Every error pheap raises on purpose derives from :class:`PheapError`, and each leaf also
derives from the builtin a caller would naturally catch, so ``except MemoryError`` or
``except ValueError`` keep working for code that does not know pheap::

    PheapError
    ├── FormatError(ValueError)         not a pheap heap, wrong version, bad CRC, byte order
    ├── CorruptHeapError(ValueError)    a broken invariant; the message names offset and which
    ├── InvalidPointerError(ValueError) an offset that is not a live block (double free, ...)
    ├── InvalidSizeError(ValueError)    negative, non-integer or unrepresentable size/alignment
    ├── HeapFullError(MemoryError)      no room: max_size reached, fixed heap full, disk full
    ├── TransactionTooLargeError(MemoryError)  a transaction outgrew its undo log
    ├── LockTimeoutError(TimeoutError)  the heap lock was not acquired within ``timeout``
    ├── ReadOnlyError(PermissionError)  a write to a heap opened with flag 'r'
    ├── HeapClosedError(ValueError)     use of a closed heap
    └── UnpicklingNotAllowedError(TypeError)  a stored pickle, pickling not allowed; not run

All exceptions pickle (they carry only their message), so they cross process pools intact.
"""

from __future__ import annotations

__all__ = [
    "PheapError",
    "FormatError",
    "CorruptHeapError",
    "InvalidPointerError",
    "InvalidSizeError",
    "HeapFullError",
    "TransactionTooLargeError",
    "LockTimeoutError",
    "ReadOnlyError",
    "HeapClosedError",
    "UnpicklingNotAllowedError",
]


class PheapError(Exception):
    """Root of every error pheap raises on purpose."""


class FormatError(PheapError, ValueError):
    """The bytes are not a heap this version of pheap can open (magic, version, CRC, byte order)."""


class CorruptHeapError(PheapError, ValueError):
    """A heap invariant does not hold. The message names the offset and the invariant."""


class InvalidPointerError(PheapError, ValueError):
    """An offset given to free/realloc/usable_size is not the start of a live block."""


class InvalidSizeError(PheapError, ValueError):
    """A size, count or alignment that is negative, not an integer, or too large to represent."""


class HeapFullError(PheapError, MemoryError):
    """The heap cannot provide the requested space (max_size, fixed capacity, or a full disk)."""


class TransactionTooLargeError(PheapError, MemoryError):
    """A transaction needed more undo log than it had. It was rolled back; the next one gets a
    log large enough (or pass ``log_size`` to ``Heap.transaction``)."""


class LockTimeoutError(PheapError, TimeoutError):
    """The heap lock could not be taken within the timeout."""


class ReadOnlyError(PheapError, PermissionError):
    """A modifying operation on a heap opened read-only."""


class HeapClosedError(PheapError, ValueError):
    """An operation on a heap that has been closed."""


class UnpicklingNotAllowedError(PheapError, TypeError):
    """A stored value is a pickle and pickling was not allowed; ``pickle`` was never called.

    Unpickling runs code chosen by whoever wrote the bytes, so it is refused unless the heap is
    opened with ``allow_pickle=True`` (do that only for heaps you trust)."""
