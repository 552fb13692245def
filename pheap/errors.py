"""The exception hierarchy.

Every error pheap raises on purpose derives from :class:`PheapError`, and each leaf also
derives from the builtin a caller would naturally catch, so ``except MemoryError`` or
``except ValueError`` keep working for code that does not know pheap::

    PheapError
    ├── FormatError(ValueError)            not a pheap heap, wrong version, bad CRC, not a file
    ├── CorruptHeapError(ValueError)       a broken invariant; the message names offset and which
    │   ├── NeedsRecoveryError             a dead process's work is pending in the journal
    │   └── DamagedJournalError            the journal's records fail their checks
    ├── InvalidPointerError(ValueError)    not a live block, or a range outside one
    ├── InvalidSizeError(ValueError)       negative, non-integer or unrepresentable size
    ├── HeapFullError(MemoryError)         no room: max_size reached, fixed heap full, disk full
    ├── JournalFullError(MemoryError)      an operation or atomic() bracket outgrew the journal
    │   └── TransactionTooLargeError       a transaction outgrew its undo log
    ├── LockTimeoutError(TimeoutError)     the heap lock was not acquired within ``timeout``
    ├── HeapInUseError(BlockingIOError)    flag 'n' on a heap another handle has open
    ├── ReadOnlyError(PermissionError)     a write to a heap opened with flag 'r'
    ├── TransactionStateError(RuntimeError)  a call not allowed inside (or outside) a bracket
    ├── NotSupportedError(OSError)         the platform lacks what the call needs (memfd)
    ├── HeapClosedError(ValueError)        use of a closed heap
    └── UnpicklingNotAllowedError(TypeError)  a stored pickle, pickling not allowed; not run

All exceptions pickle (they carry only their message), so they cross process pools intact.
"""

from __future__ import annotations

__all__ = [
    "PheapError",
    "FormatError",
    "CorruptHeapError",
    "NeedsRecoveryError",
    "DamagedJournalError",
    "InvalidPointerError",
    "InvalidSizeError",
    "HeapFullError",
    "JournalFullError",
    "TransactionTooLargeError",
    "LockTimeoutError",
    "HeapInUseError",
    "ReadOnlyError",
    "TransactionStateError",
    "NotSupportedError",
    "HeapClosedError",
    "UnpicklingNotAllowedError",
]


class PheapError(Exception):
    """Root of every error pheap raises on purpose."""


class FormatError(PheapError, ValueError):
    """The bytes are not a heap this version of pheap can open (magic, version, CRC, byte order,
    not a regular file)."""


class CorruptHeapError(PheapError, ValueError):
    """A heap invariant does not hold. The message names the offset and the invariant."""


class NeedsRecoveryError(CorruptHeapError):
    """A process died inside an operation and its undo records are pending: opening the heap
    read-write (or ``pheap repair``) undoes that operation."""


class DamagedJournalError(CorruptHeapError):
    """The journal's records fail their checks, so they cannot be replayed safely;
    ``pheap repair`` discards them and rebuilds what the boundary tags allow."""


class InvalidPointerError(PheapError, ValueError):
    """An offset that is not a live block or slot, or a byte range outside one."""


class InvalidSizeError(PheapError, ValueError):
    """A size, count or alignment that is negative, not an integer, or too large to represent."""


class HeapFullError(PheapError, MemoryError):
    """The heap cannot provide the requested space (max_size, fixed capacity, or a full disk)."""


class JournalFullError(PheapError, MemoryError):
    """An operation or an ``atomic()`` bracket changed more than the operation journal holds. It
    was rolled back; use ``heap.transaction()`` for large updates."""


class TransactionTooLargeError(JournalFullError):
    """A transaction needed more undo log than it had. It was rolled back; the next one gets a
    log large enough (or pass ``log_size`` to ``Heap.transaction``)."""

    needed: int = 0  #: bytes of log that would have held it so far (0: not known)


class LockTimeoutError(PheapError, TimeoutError):
    """The heap lock could not be taken within the timeout."""


class HeapInUseError(PheapError, BlockingIOError):
    """The heap is attached by another handle (in this or another process), so it cannot be
    replaced with flag ``'n'``."""


class ReadOnlyError(PheapError, PermissionError):
    """A modifying operation on a heap opened read-only."""


class TransactionStateError(PheapError, RuntimeError):
    """A call that is not allowed inside a transaction or bracket (or outside one)."""


class NotSupportedError(PheapError, OSError):
    """The platform lacks what the call needs (for example ``os.memfd_create``)."""


class HeapClosedError(PheapError, ValueError):
    """An operation on a heap that has been closed."""


class UnpicklingNotAllowedError(PheapError, TypeError):
    """A stored value is a pickle and pickling was not allowed; ``pickle`` was never called.

    Unpickling runs code chosen by whoever wrote the bytes, so it is refused unless the heap is
    opened with ``allow_pickle=True`` (do that only for heaps you trust)."""
