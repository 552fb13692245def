"""pheap: a persistent, shared-memory heap in pure Python.

Small slots in runs and large blocks in TLSF bins with boundary tags, whose whole state lives
inside a memory mapping (a file, a memfd or an anonymous shared region) and refers to blocks by
offset, so every process that maps the region sees the same heap, today and after a reopen
tomorrow.

>>> import pheap
>>> h = pheap.anonymous(1 << 20)
>>> a = h.malloc(24)
>>> h.write(a, b"shared across fork")
>>> h.read(a, 6)
b'shared'
>>> h.free(a)
>>> h.check()
"""

from .allocator import BlockInfo, HeapStats
from .errors import (
    CorruptHeapError,
    DamagedJournalError,
    FormatError,
    HeapClosedError,
    HeapFullError,
    HeapInUseError,
    InvalidPointerError,
    InvalidSizeError,
    JournalFullError,
    LockTimeoutError,
    NeedsRecoveryError,
    NotSupportedError,
    PheapError,
    ReadOnlyError,
    TransactionStateError,
    TransactionTooLargeError,
    UnpicklingNotAllowedError,
)
from .heap import DEFAULT_SIZE, Heap, Session, anonymous, memfd, open, snapshot
from .objects import SharedCounter, SharedDict, SharedList, SharedObject, SharedQueue

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "Heap",
    "Session",
    "SharedObject",
    "SharedDict",
    "SharedList",
    "SharedQueue",
    "SharedCounter",
    "open",
    "snapshot",
    "anonymous",
    "memfd",
    "DEFAULT_SIZE",
    "BlockInfo",
    "HeapStats",
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
