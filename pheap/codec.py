"""Value codec v1: how Python values become 64-bit cells and self-delimiting blobs, and back.

A pure module: it knows nothing about heaps, blocks or locks (the way diskcache keeps its ``Disk``
serializer apart from its ``Cache``). Containers living in a heap hold each value as one *cell*, an
unsigned 64-bit word; a value that does not fit in a cell is stored as a *blob* in a block of its
own and the cell is that block's offset. Shared objects (containers living in the heap) are
referred to by *ref* cells; this module builds and takes them apart but never interprets the
offset inside.

Cells are canonical for the values they hold: equal values of the same type have equal cells
(``cell('ab') == cell('ab')``), so a container may treat *equal cells* as *equal keys*. The
converse does not hold across types (``1 == 1.0 == True`` have different cells, or none): on equal
hashes with different cells, decode and compare with ``==``.

A cell ``c`` is read by its low bits; a blob starts with a tag byte, and its tag says where it
ends (the block holding it may be longer: the allocator rounds sizes up):

===============  =====  ===========  =======================================================
offset / bits    size   field        meaning
===============  =====  ===========  =======================================================
**cell**
bit 0 = 1        63 b   small int    ``c >> 1`` as a signed 63-bit int: ints in [-2**62, 2**62)
bits 0-2 = 0     64 b   blob offset  ``c`` is the 8-aligned offset of a blob block;
                                     ``c == 0`` is the empty slot, never a value
bits 0-2 = 4     61 b   ref          a shared object at offset ``c & ~7`` (nonzero)
bits 0-2 = 6                         reserved: refused
bits 0-2 = 2     61 b   immediate    bits 3-4 kind, bits 5-7 data length n (0..7),
                                     bits 8-63 the data, little-endian, zero past n
- kind 0         1 B    constant     n = 1; data byte 0 None, 1 False, 2 True; others refused
- kind 1         n B    short str    UTF-8 (surrogatepass) of a str, at most 7 bytes
- kind 2         n B    short bytes  bytes of at most 7 bytes
- kind 3                             reserved: refused
**blob**
0                1      tag          one of the rows below; tags 9-255 are reserved: refused
1                var    n            tags 1, 2, 3, 5, 6, 8: unsigned LEB128, minimal, <= 9 B
after tag        8      cell         tag 0 CELL: an immediate or ref cell, never 0 or a blob
after n          n      utf-8        tag 1 STR: UTF-8 (surrogatepass) of a str
after n          n      data         tag 2 BYTES: bytes (also bytearray, memoryview.tobytes())
after n          n      value        tag 3 INT: signed little-endian two's complement,
                                     minimal, n >= 1
after tag        8      value        tag 4 FLOAT: IEEE-754 binary64 LE, bit-exact (NaN, -0.0)
after n          var    n items      tag 5 TUPLE: n nested blobs, one after the other
after n          n      pickle       tag 6 PICKLE: ``pickle.dumps(v, protocol=5)``
after tag        16     value        tag 7 COMPLEX: real, then imaginary part, as FLOAT
after n          var    n items      tag 8 FROZENSET: n nested blobs, sorted by their bytes
===============  =====  ===========  =======================================================

Decisions, and why:

* **CELL (tag 0) is a blob too**, not only a tuple item, so ``encode`` is total: ``None``,
  ``True`` and ``False`` have no other blob. The grammar gets simpler as well: a tuple item is
  just a blob.
* **Inside tuples the encoder writes small ints and short str/bytes as nested INT/STR/BYTES
  blobs**, not as CELL items: 3 bytes instead of 9 for an int below 128, 2 + len instead of 9 for
  a short str (a tuple of 100 small ints takes 302 bytes, not 902). CELL items remain only for
  None, True, False and refs. The decoder accepts both forms everywhere, as the brief's grammar
  allows.
* **Strict on reading**: varints and INT values must be minimal, and an immediate's data must be
  zero past its length, so no field has two spellings (a small int may still be stored either as
  a CELL or as an INT blob: both are valid).
* **Nesting**: at most ``MAX_DEPTH`` (100) tuples/frozensets inside one another, on both sides.
  Encoding deeper raises ``ValueError``; decoding deeper raises ``CorruptHeapError``. This bounds
  the recursion (well under Python's default limit of 1000 frames) for blobs forged to be deep.
* **Types are kept exactly**: only the exact built-in types are stored natively. A subclass
  (``IntEnum``, a namedtuple, a ``str`` subclass) would come back as its base type, so it is
  pickled when pickling is allowed, refused otherwise.

Decoding treats its input as untrusted (a file written by anyone): any damage raises
:class:`~pheap.errors.CorruptHeapError`, a stored pickle without ``allow_pickle`` raises
:class:`~pheap.errors.UnpicklingNotAllowedError` (pickle is never called), every length is checked
against the buffer before use, so nothing is allocated beyond what the buffer holds, and the work is
linear in the buffer's length.

Hashing: :class:`StableHasher` gives every supported hashable value a 64-bit hash that is the same
in every process, run and Python version and agrees with ``==`` across types (``h(1) == h(1.0) ==
h(True)``), keyed by a per-heap secret (keyed BLAKE2b) so that colliding keys cannot be precomputed.

>>> c = cell("héllo")
>>> hex(c), from_cell(c)
('0x6f6c6ca9c368ca', 'héllo')
>>> blob = encode((1, "x" * 10, None))
>>> decode(blob)
(1, 'xxxxxxxxxx', None)
>>> blob_length(blob + b"rounding")
26
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from .errors import CorruptHeapError, InvalidPointerError, UnpicklingNotAllowedError

try:  # the BLAKE2 module itself: hashlib would load OpenSSL's bindings too (~2 ms of import)
    from _blake2 import blake2b as _blake2b
except ImportError:  # pragma: no cover - an interpreter without the builtin module
    from hashlib import blake2b as _blake2b

__all__ = [
    "cell",
    "from_cell",
    "is_blob_cell",
    "is_ref_cell",
    "ref_cell",
    "ref_offset",
    "encode",
    "decode",
    "blob_length",
    "blob_refs",
    "StableHasher",
    "EMPTY",
    "MAX_DEPTH",
]

Buffer = bytes | bytearray | memoryview  #: what decode and friends read from

# ---------------------------------------------------------------------------------------------
# Format constants: changing any of these changes the file format.
# ---------------------------------------------------------------------------------------------

CELL_BYTES: Final = 8  #: bytes of a cell: one word
CELL_MASK: Final = (1 << 64) - 1  #: a cell is an unsigned 64-bit word
EMPTY: Final = 0  #: the cell of an empty slot ("no value"); never the cell of a value
INT_BIT: Final = 1  #: bit 0 set: a small int
TAG_MASK: Final = 7  #: bits 0-2: the tag of a cell
TAG_BLOB: Final = 0  #: tag of a blob offset (8-aligned, so its low bits are already 0)
TAG_IMM: Final = 2  #: tag of an immediate (constant, short str, short bytes)
TAG_REF: Final = 4  #: tag of a reference to a shared object
TAG_RESERVED: Final = 6  #: tag kept for a later version; refused
SMALL_INT_MIN: Final = -(1 << 62)  #: smallest int held in a cell
SMALL_INT_END: Final = 1 << 62  #: first int too large for a cell
KIND_SHIFT: Final = 3  #: immediate kind: bits 3-4
KIND_MASK: Final = 3 << KIND_SHIFT  #: the kind bits, in place
KIND_CONST: Final = 0 << KIND_SHIFT  #: kind 0: None, False, True
KIND_STR: Final = 1 << KIND_SHIFT  #: kind 1: a str of at most 7 UTF-8 bytes
KIND_BYTES: Final = 2 << KIND_SHIFT  #: kind 2: bytes of at most 7 bytes
LEN_SHIFT: Final = 5  #: immediate data length: bits 5-7
DATA_SHIFT: Final = 8  #: immediate data: bytes 1..7 of the word (bits 8-63)
IMM_MAX: Final = 7  #: longest immediate data, bytes
NONE_CELL: Final = (0 << DATA_SHIFT) | (1 << LEN_SHIFT) | KIND_CONST | TAG_IMM  #: cell of None
FALSE_CELL: Final = (1 << DATA_SHIFT) | (1 << LEN_SHIFT) | KIND_CONST | TAG_IMM  #: cell of False
TRUE_CELL: Final = (2 << DATA_SHIFT) | (1 << LEN_SHIFT) | KIND_CONST | TAG_IMM  #: cell of True

BLOB_CELL: Final = 0  #: blob tag: an 8-byte immediate or ref cell
BLOB_STR: Final = 1  #: blob tag: varint length, UTF-8 (surrogatepass)
BLOB_BYTES: Final = 2  #: blob tag: varint length, data
BLOB_INT: Final = 3  #: blob tag: varint length, signed little-endian, minimal
BLOB_FLOAT: Final = 4  #: blob tag: 8 bytes IEEE-754 little-endian
BLOB_TUPLE: Final = 5  #: blob tag: varint count, nested blobs
BLOB_PICKLE: Final = 6  #: blob tag: varint length, pickle bytes
BLOB_COMPLEX: Final = 7  #: blob tag: two FLOAT payloads (real, imaginary)
BLOB_FROZENSET: Final = 8  #: blob tag: varint count, nested blobs sorted by their bytes
BLOB_TAGS: Final = 9  #: tags below this are known; 9..255 are reserved for later versions
VARINT_MAX_BYTES: Final = 9  #: longest varint accepted (63 bits); real lengths are far shorter
MAX_DEPTH: Final = 100  #: most tuples/frozensets nested in one another (recursion bound)
FLOAT_BYTES: Final = 8  #: payload of a FLOAT blob

# Hash inputs. Hashes may be stored in heaps (a shared dict's table), so these are format too.
HASH_PERSON: Final = b"pheap.codec.v1"  #: BLAKE2b personalization: the version of the scheme
HASH_NONE: Final = b"\x00"  #: hash domain of None (empty payload)
HASH_INT: Final = b"\x01"  #: domain of integral numbers: int, bool, 2.0, 2+0j (minimal signed LE)
HASH_FLOAT: Final = b"\x02"  #: domain of non-integral floats (and inf, one canonical NaN)
HASH_COMPLEX: Final = b"\x03"  #: domain of complex numbers with a nonzero imaginary part
HASH_STR: Final = b"\x04"  #: domain of str: UTF-8 (surrogatepass)
HASH_BYTES: Final = b"\x05"  #: domain of bytes
HASH_TUPLE: Final = b"\x06"  #: domain of tuples: the items' 8-byte hashes in order
HASH_FROZENSET: Final = b"\x07"  #: domain of frozensets: sum of item hashes mod 2**64, count

# ---------------------------------------------------------------------------------------------
# Tunables: safe to change, the format does not depend on them.
# ---------------------------------------------------------------------------------------------

PICKLE_PROTOCOL: Final = 5  #: protocol for PICKLE blobs (any protocol is read back)
HASH_KEY_MIN: Final = 16  #: shortest per-heap hash secret accepted, bytes (128 bits)
HASH_KEY_MAX: Final = 64  #: longest: BLAKE2b's key limit, bytes
HASH_CACHE_SIZE: Final = 1 << 13  #: entries per type in a hasher's cache before it is cleared
IMM_CACHE_SIZE: Final = 1 << 12  #: short str/bytes remembered per direction by cell/from_cell
HASH_CACHE_MAX_LEN: Final = 128  #: str/bytes/int payloads longer than this (bytes) aren't cached

# Layout sanity, checked at import (a failure here is a programming error, not a runtime one).
assert TAG_BLOB == 0 and EMPTY == 0  # a blob offset is the cell; 0 is NULL in the heap format
assert {TAG_BLOB, TAG_IMM, TAG_REF, TAG_RESERVED} == set(range(0, TAG_MASK + 1, 2))
assert SMALL_INT_END == 1 << (8 * CELL_BYTES - 2) and SMALL_INT_MIN == -SMALL_INT_END
assert IMM_MAX == CELL_BYTES - 1 and IMM_MAX < 1 << (DATA_SHIFT - LEN_SHIFT)
assert KIND_MASK >> KIND_SHIFT == 3 and LEN_SHIFT == KIND_SHIFT + 2
assert len({NONE_CELL, FALSE_CELL, TRUE_CELL}) == 3 and EMPTY not in (NONE_CELL, FALSE_CELL)
assert BLOB_TAGS == BLOB_FROZENSET + 1 and BLOB_CELL == 0
assert 7 * VARINT_MAX_BYTES == 63 and (1 << 63) - 1 <= CELL_MASK
assert struct.calcsize("<d") == FLOAT_BYTES
assert HASH_KEY_MIN <= HASH_KEY_MAX <= _blake2b.MAX_KEY_SIZE
assert len(HASH_PERSON) <= _blake2b.PERSON_SIZE

# ---------------------------------------------------------------------------------------------
# Precomputed pieces (derived from the constants above).
# ---------------------------------------------------------------------------------------------

_SIGN: Final = 1 << 63  #: the sign bit of a word
_STR_HEAD: Final = tuple(bytes((BLOB_STR, n)) for n in range(0x80))  #: STR headers, n < 128
_BYTES_HEAD: Final = tuple(bytes((BLOB_BYTES, n)) for n in range(0x80))  #: BYTES headers
_INT1: Final = tuple(bytes((BLOB_INT, 1, b & 0xFF)) for b in range(-128, 128))  #: INT, 1 byte
_STR_IMM: Final = tuple((n << LEN_SHIFT) | KIND_STR | TAG_IMM for n in range(IMM_MAX + 1))
_BYTES_IMM: Final = tuple((n << LEN_SHIFT) | KIND_BYTES | TAG_IMM for n in range(IMM_MAX + 1))
_NONE_BLOB: Final = bytes((BLOB_CELL,)) + NONE_CELL.to_bytes(CELL_BYTES, "little")
_FALSE_BLOB: Final = bytes((BLOB_CELL,)) + FALSE_CELL.to_bytes(CELL_BYTES, "little")
_TRUE_BLOB: Final = bytes((BLOB_CELL,)) + TRUE_CELL.to_bytes(CELL_BYTES, "little")
_CELL_TAG: Final = bytes((BLOB_CELL,))
_TAGGED_F64: Final = struct.Struct("<Bd")  #: FLOAT blob
_TAGGED_C128: Final = struct.Struct("<Bdd")  #: COMPLEX blob
_F64: Final = struct.Struct("<d")  #: FLOAT payload
_C128: Final = struct.Struct("<dd")  #: COMPLEX payload
_CANONICAL_NAN: Final = _F64.pack(float("nan"))  #: every NaN hashes as this one
_MISSING: Final = object()  #: "not in the table"
_CONSTANTS: Final = {NONE_CELL: None, FALSE_CELL: False, TRUE_CELL: True}  #: cell -> constant
#: Memos of short str -> cell and immediate cell -> value (str, bytes, constants): a dict hit
#: is twice as fast as building the value. Process-local, bounded by IMM_CACHE_SIZE.
_str_cells: dict[str, int] = {}
_imm_values: dict[int, object] = dict(_CONSTANTS)
_NATIVE: Final = "None, bool, int, float, complex, str, bytes, tuple, frozenset"

# ---------------------------------------------------------------------------------------------
# Cells.
# ---------------------------------------------------------------------------------------------


def cell(v: Any) -> int | None:
    """The immediate cell of ``v``, or None when ``v`` needs a blob (or is a shared object).

    Small ints (``-2**62 <= v < 2**62``), None, True, False, str whose UTF-8 is at most 7 bytes
    and bytes-likes of at most 7 bytes have one; the cell is canonical (equal values of one type,
    equal cells). Exact types only: an int or str subclass gets None. O(1).

    >>> cell(3), cell(-1) == 2**64 - 1, cell(2**62), cell(None) == cell(None), cell(1.0)
    (7, True, None, True, None)
    """
    t = type(v)
    if t is int:
        if 0 <= v < SMALL_INT_END:
            return (v << 1) | INT_BIT
        if SMALL_INT_MIN <= v < 0:
            return ((v << 1) | INT_BIT) & CELL_MASK
        return None
    if t is str:
        if len(v) > IMM_MAX:
            return None
        c = _str_cells.get(v)
        return c if c is not None else _short_str_cell(v)
    if v is None:
        return NONE_CELL
    if t is bool:
        return TRUE_CELL if v else FALSE_CELL
    if t is bytes or t is bytearray:
        n = len(v)
        if n > IMM_MAX:
            return None
        return (int.from_bytes(v, "little") << DATA_SHIFT) | _BYTES_IMM[n]
    if t is memoryview:
        if v.nbytes > IMM_MAX:
            return None
        return cell(v.tobytes())
    return None


def from_cell(c: int) -> object:
    """The value of the immediate cell ``c`` (small int, None, bool, short str, short bytes).

    Raises :class:`CorruptHeapError` (a ``ValueError``) for the empty cell 0, a blob offset, a
    ref, a reserved tag or kind, a word outside 64 bits, or an immediate that is not canonical
    (data past its length, bad UTF-8). O(1).

    >>> from_cell(7), from_cell(2**64 - 1), from_cell(cell("ab")), from_cell(cell(b"")) == b""
    (3, -1, 'ab', True)
    """
    if c & INT_BIT:
        if 0 < c < _SIGN:  # inlined: the commonest case, non-negative small ints
            return c >> 1
        if _SIGN <= c <= CELL_MASK:
            return (c >> 1) - _SIGN
        raise _not_a_word(c)
    v = _imm_values.get(c, _MISSING)
    if v is not _MISSING:
        return v
    return _immediate(c)


def _short_str_cell(v: str) -> int | None:
    """Cell of a str of at most 7 chars, or None when its UTF-8 is longer; remembered."""
    try:
        b = v.encode()  # strict is faster, and gives the same bytes when it succeeds
    except UnicodeEncodeError:
        b = v.encode("utf-8", "surrogatepass")
    n = len(b)
    if n > IMM_MAX:
        return None
    c = (int.from_bytes(b, "little") << DATA_SHIFT) | _STR_IMM[n]
    _remember_immediate(_str_cells, v, c)
    return c


def _immediate(c: int) -> object:
    """Value of the immediate cell ``c`` (not a small int); checked, then remembered."""
    if c & TAG_MASK != TAG_IMM or not 0 < c <= CELL_MASK:
        raise _not_immediate(c)
    kind = c & KIND_MASK
    n = (c >> LEN_SHIFT) & IMM_MAX
    if kind == KIND_STR:
        try:
            v: object = (c >> DATA_SHIFT).to_bytes(n, "little").decode("utf-8", "surrogatepass")
        except (OverflowError, UnicodeDecodeError):
            raise CorruptHeapError(f"cell {c:#x}: not a canonical short str") from None
    elif kind == KIND_BYTES:
        try:
            v = (c >> DATA_SHIFT).to_bytes(n, "little")
        except OverflowError:
            raise CorruptHeapError(f"cell {c:#x}: short bytes, data past its length") from None
    elif c in _CONSTANTS:  # only after the memo was cleared
        v = _CONSTANTS[c]
    else:
        raise CorruptHeapError(f"cell {c:#x}: unknown immediate (reserved kind or constant)")
    _remember_immediate(_imm_values, c, v)
    return v


def _remember_immediate(cache: dict, k: object, v: object) -> None:
    """Bounded memo of immediates: cleared wholesale when full (no LRU upkeep)."""
    if len(cache) >= IMM_CACHE_SIZE:
        cache.clear()
    cache[k] = v


def is_blob_cell(c: int) -> bool:
    """True when ``c`` is the (8-aligned, nonzero) offset of a blob block; the blob's offset is
    ``c`` itself. O(1).

    >>> is_blob_cell(4096), is_blob_cell(0), is_blob_cell(cell(1)), is_blob_cell(ref_cell(4096))
    (True, False, False, False)
    """
    return c != EMPTY and not c & TAG_MASK


def is_ref_cell(c: int) -> bool:
    """True when ``c`` refers to a shared object. O(1).

    >>> is_ref_cell(ref_cell(4096)), is_ref_cell(4096), is_ref_cell(cell(None))
    (True, False, False)
    """
    return c & TAG_MASK == TAG_REF


def ref_cell(off: int) -> int:
    """The cell referring to the shared object at offset ``off`` (nonzero, 8-aligned, below
    2**64); :class:`InvalidPointerError` otherwise. O(1).

    >>> ref_cell(4096)
    4100
    """
    if type(off) is not int or off & TAG_MASK or not 0 < off <= CELL_MASK:
        raise InvalidPointerError(f"ref_cell({off!r}): not a nonzero 8-aligned 64-bit offset")
    return off | TAG_REF


def ref_offset(c: int) -> int:
    """The offset of the shared object that the ref cell ``c`` refers to;
    :class:`InvalidPointerError` when ``c`` is not a ref cell. O(1).

    >>> ref_offset(ref_cell(4096))
    4096
    """
    if c & TAG_MASK != TAG_REF or not TAG_REF < c <= CELL_MASK:
        raise InvalidPointerError(f"cell {c!r} is not a ref cell")
    return c - TAG_REF


def _not_a_word(c: int) -> CorruptHeapError:
    return CorruptHeapError(f"cell {c!r} is not an unsigned 64-bit word")


def _not_immediate(c: int) -> CorruptHeapError:
    """The error for a cell ``from_cell`` cannot turn into a value."""
    if type(c) is not int or not 0 <= c <= CELL_MASK:
        return _not_a_word(c)
    if c == EMPTY:
        return CorruptHeapError("cell 0 is the empty slot, not a value")
    tag = c & TAG_MASK
    if tag == TAG_BLOB:
        return CorruptHeapError(f"cell {c:#x} is a blob offset, not an immediate: decode the blob")
    if tag == TAG_REF:
        return CorruptHeapError(f"cell {c:#x} refers to a shared object, not an immediate")
    return CorruptHeapError(f"cell {c:#x} has the reserved tag {tag}")


# ---------------------------------------------------------------------------------------------
# Encoding.
# ---------------------------------------------------------------------------------------------


def encode(
    v: Any,
    *,
    ref: Callable[[object], int | None] | None = None,
    allow_pickle: bool = False,
) -> bytes:
    """The blob of ``v``.

    Every supported value has a blob, including those that also have a cell (so a caller may force
    a blob: ``encode(5)`` is an INT blob, ``encode(None)`` a CELL blob). Natively: None, bool, int,
    float, complex, str, bytes (bytearray and memoryview are stored as bytes and come back as
    bytes), tuple and frozenset of these. An item of a tuple or frozenset that is none of those is
    offered to ``ref``, which returns its ref cell if it is a shared object, else None. The
    top-level value is offered to ``ref`` too (giving a 9-byte CELL blob), though a container
    would rather store the ref cell itself. Anything else is pickled when ``allow_pickle``,
    else ``TypeError`` names its type. Nesting deeper than ``MAX_DEPTH`` raises ``ValueError``.
    O(size of the value).

    >>> encode("abc"), encode(-1), encode(b"xy")
    (b'\\x01\\x03abc', b'\\x03\\x01\\xff', b'\\x02\\x02xy')
    >>> len(encode(tuple(range(100))))
    302
    """
    t = type(v)
    if t is str:
        b = v.encode("utf-8", "surrogatepass")
        n = len(b)
        return (_STR_HEAD[n] if n < 0x80 else _head(BLOB_STR, n)) + b
    if t is int:
        return _int_blob(v)
    if t is bytes:
        n = len(v)
        return (_BYTES_HEAD[n] if n < 0x80 else _head(BLOB_BYTES, n)) + v
    if t is float:
        return _TAGGED_F64.pack(BLOB_FLOAT, v)
    out: list[bytes] = []
    _put(v, out, ref, allow_pickle, 0)
    return b"".join(out)


def _put(
    v: Any,
    out: list[bytes],
    ref: Callable[[object], int | None] | None,
    allow_pickle: bool,
    depth: int,
) -> None:
    """Append the blob of ``v`` to ``out``; ``depth`` containers enclose it."""
    t = type(v)
    if t is int:
        out.append(_int_blob(v))
    elif t is str:
        b = v.encode("utf-8", "surrogatepass")
        n = len(b)
        out.append(_STR_HEAD[n] if n < 0x80 else bytes((BLOB_STR,)) + _varint(n))
        out.append(b)
    elif v is None:
        out.append(_NONE_BLOB)
    elif t is bool:
        out.append(_TRUE_BLOB if v else _FALSE_BLOB)
    elif t is float:
        out.append(_TAGGED_F64.pack(BLOB_FLOAT, v))
    elif t is tuple:
        if depth >= MAX_DEPTH:
            raise _too_deep_to_encode()
        out.append(_head(BLOB_TUPLE, len(v)))
        depth += 1
        for x in v:
            _put(x, out, ref, allow_pickle, depth)
    elif t is bytes or t is bytearray or t is memoryview:
        b = v.tobytes() if t is memoryview else v
        out.append(_head(BLOB_BYTES, len(b)))
        out.append(b)
    elif t is complex:
        out.append(_TAGGED_C128.pack(BLOB_COMPLEX, v.real, v.imag))
    elif t is frozenset:
        if depth >= MAX_DEPTH:
            raise _too_deep_to_encode()
        items = []
        for x in v:
            part: list[bytes] = []
            _put(x, part, ref, allow_pickle, depth + 1)
            items.append(b"".join(part))
        items.sort()  # iteration order follows str hashes, random per process: sort for one blob
        out.append(_head(BLOB_FROZENSET, len(items)))
        out.extend(items)
    else:
        r = ref(v) if ref is not None else None
        if r is not None:
            if type(r) is not int or r & TAG_MASK != TAG_REF or not TAG_REF < r <= CELL_MASK:
                raise ValueError(f"ref() gave {r!r} for a {_type_name(v)}, not a ref cell")
            out.append(_CELL_TAG + r.to_bytes(CELL_BYTES, "little"))
        elif allow_pickle:
            import pickle  # (imported on first use: most heaps never pickle)

            data = pickle.dumps(v, protocol=PICKLE_PROTOCOL)
            out.append(_head(BLOB_PICKLE, len(data)))
            out.append(data)
        else:
            raise TypeError(
                f"cannot store a value of type {_type_name(v)}: pheap stores {_NATIVE} natively "
                "(exact types, not subclasses); open the heap with allow_pickle=True to pickle "
                "other types (only heaps you trust: unpickling runs code)"
            )


def _int_blob(v: int) -> bytes:
    """INT blob of ``v``: the minimal signed little-endian bytes."""
    if -0x80 <= v < 0x80:
        return _INT1[v + 0x80]
    n = ((v if v >= 0 else ~v).bit_length() >> 3) + 1
    return _head(BLOB_INT, n) + v.to_bytes(n, "little", signed=True)


def _head(tag: int, n: int) -> bytes:
    """Tag byte and varint ``n``."""
    if n < 0x80:
        return bytes((tag, n))
    if n < 0x4000:
        return bytes((tag, (n & 0x7F) | 0x80, n >> 7))
    return bytes((tag,)) + _varint(n)


def _varint(n: int) -> bytes:
    """Unsigned LEB128 of ``n`` (7 bits a byte, low first, high bit = more follow)."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _type_name(v: object) -> str:
    t = type(v)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _too_deep_to_encode() -> ValueError:
    return ValueError(f"tuples/frozensets nested deeper than MAX_DEPTH={MAX_DEPTH}")


# ---------------------------------------------------------------------------------------------
# Decoding. Every read is bounds-checked against ``size`` before it happens: the input is
# untrusted, and an IndexError or a short slice must never pass for data.
# ---------------------------------------------------------------------------------------------


def decode(
    buf: Buffer,
    *,
    deref: Callable[[int], object] | None = None,
    allow_pickle: bool = False,
) -> object:
    """The value of the blob at the start of ``buf`` (bytes after the blob are ignored).

    ``deref(offset)`` turns each ref inside it into the live shared object; a ref met without
    ``deref`` raises ``TypeError``. A PICKLE blob is loaded only with ``allow_pickle``; otherwise
    :class:`UnpicklingNotAllowedError` is raised and pickle is never called. Damaged input raises
    :class:`CorruptHeapError`; exceptions from ``deref`` and from pickle (other than
    ``UnpicklingError`` and ``EOFError``, which count as damage) pass through. ``buf`` is bytes,
    bytearray, mmap or a flat memoryview of unsigned bytes (format ``'B'``); when it is not bytes,
    an error leaves no frame holding it (see ``_unpin``), so a view of a mapping is not kept
    exported by a saved exception. O(len(buf)).

    >>> decode(b"\\x01\\x03abc"), decode(encode(2**100)), decode(encode(frozenset({1})))
    ('abc', 1267650600228229401496703205376, frozenset({1}))
    """
    if type(buf) is bytes:  # the common case inlined: a str blob of less than 16 KiB
        size = len(buf)
        if size > 1 and buf[0] == BLOB_STR:
            n = buf[1]
            q = 2
            if n >= 0x80:  # a two-byte length, unless it is longer or not minimal
                m = buf[2] if size > 2 else 0
                n = (n & 0x7F) | (m << 7) if 0 < m < 0x80 else size
                q = 3
            if n <= size - q:
                try:
                    return str(buf[q : q + n], "utf-8", "surrogatepass")
                except UnicodeDecodeError as e:
                    raise _bad_utf8(e, q) from None
        return _read(buf, 0, len(buf), 0, deref, allow_pickle)[0]
    try:
        return _read(_bytes_view(buf), 0, len(buf), 0, deref, allow_pickle)[0]
    except BaseException as exc:
        del buf  # see _unpin
        _unpin(exc)
        raise


def _read(
    buf: Buffer,
    p: int,
    size: int,
    depth: int,
    deref: Callable[[int], object] | None,
    allow_pickle: bool,
) -> tuple[object, int]:
    """(value, end) of the blob at ``buf[p:size]``; ``depth`` containers enclose it."""
    if p >= size:
        raise _truncated(p, size)
    tag = buf[p]
    p += 1
    if tag <= BLOB_INT and tag != BLOB_CELL:  # STR, BYTES, INT: a length, then that many bytes
        n = buf[p] if p < size else 0x80
        if n < 0x80:  # _length() inlined for one-byte lengths: a third faster on tuples
            p += 1
            if n > size - p:
                raise _overrun(n, p, size)
        else:
            n, p = _length(buf, p, size)
        e = p + n
        if tag == BLOB_STR:
            try:
                return str(buf[p:e], "utf-8", "surrogatepass"), e
            except UnicodeDecodeError as exc:
                raise _bad_utf8(exc, p) from None
        if tag == BLOB_INT:
            if n == 1:
                b = buf[p]
                return (b - 0x100 if b >= 0x80 else b), e
            _check_minimal_int(buf, p, e)
            return int.from_bytes(buf[p:e], "little", signed=True), e
        return bytes(buf[p:e]), e
    if tag == BLOB_CELL:
        e = p + CELL_BYTES
        if e > size:
            raise _truncated(e, size)
        c = int.from_bytes(buf[p:e], "little")
        if c & TAG_MASK == TAG_REF and c != TAG_REF:
            if deref is None:
                raise TypeError(
                    f"the blob refers to the shared object at {c - TAG_REF:#x}; "
                    "decode() needs deref= to resolve it"
                )
            return deref(c - TAG_REF), e
        _check_item_cell(c, p)
        return from_cell(c), e
    if tag == BLOB_TUPLE or tag == BLOB_FROZENSET:
        if depth >= MAX_DEPTH:
            raise CorruptHeapError(f"blob: containers nested deeper than {MAX_DEPTH} at byte {p}")
        n, p = _length(buf, p, size)  # each item takes at least one byte: bounds the count
        items: list[object] = []
        depth += 1
        for _ in range(n):
            # Small ints and short str inlined (twice as fast on tuples of them); else recurse.
            k = size - p - 2  # bytes after a tag and a one-byte length
            if k >= 0:
                t = buf[p]
                m = buf[p + 1]
                if t == BLOB_INT and m == 1 and k:
                    b = buf[p + 2]
                    items.append(b - 0x100 if b >= 0x80 else b)
                    p += 3
                    continue
                if t == BLOB_STR and m <= k and m < 0x80:
                    q = p + 2
                    p = q + m
                    try:
                        items.append(str(buf[q:p], "utf-8", "surrogatepass"))
                    except UnicodeDecodeError as exc:
                        raise _bad_utf8(exc, q) from None
                    continue
            x, p = _read(buf, p, size, depth, deref, allow_pickle)
            items.append(x)
        if tag == BLOB_TUPLE:
            return tuple(items), p
        try:
            return frozenset(items), p
        except TypeError as exc:
            raise CorruptHeapError(f"blob: frozenset ending at byte {p}: {exc}") from None
    if tag == BLOB_FLOAT:
        e = p + FLOAT_BYTES
        if e > size:
            raise _truncated(e, size)
        return _F64.unpack_from(buf, p)[0], e
    if tag == BLOB_COMPLEX:
        e = p + 2 * FLOAT_BYTES
        if e > size:
            raise _truncated(e, size)
        return complex(*_C128.unpack_from(buf, p)), e
    if tag == BLOB_PICKLE:
        n, p = _length(buf, p, size)
        e = p + n
        if not allow_pickle:
            raise UnpicklingNotAllowedError(
                f"the value at byte {p - 1} is a pickle ({n} bytes) and pickling is not allowed; "
                "open the heap with allow_pickle=True to load it (only heaps you trust: "
                "unpickling runs code)"
            )
        import pickle

        try:
            return pickle.loads(buf[p:e]), e
        except (pickle.UnpicklingError, EOFError) as exc:
            raise CorruptHeapError(f"blob: damaged pickle at byte {p}: {exc}") from None
    raise CorruptHeapError(f"blob: unknown tag {tag} at byte {p - 1} (from a newer pheap?)")


def _length(buf: Buffer, p: int, size: int) -> tuple[int, int]:
    """(n, end) of the varint at ``buf[p:]``; n is checked to fit in what follows it."""
    if p >= size:
        raise _truncated(p, size)
    n = buf[p]
    p += 1
    if n >= 0x80:
        n, p = _varint_tail(buf, p, size, n)
    if n > size - p:
        raise _overrun(n, p, size)
    return n, p


def _overrun(n: int, p: int, size: int) -> CorruptHeapError:
    return CorruptHeapError(
        f"blob: length {n} at byte {p} runs past the end of the {size}-byte buffer"
    )


def _varint_tail(buf: Buffer, p: int, size: int, first: int) -> tuple[int, int]:
    """Rest of a varint whose first byte ``first`` (>= 0x80) is at ``p - 1``."""
    n = first & 0x7F
    shift = 7
    for _ in range(VARINT_MAX_BYTES - 1):
        if p >= size:
            raise _truncated(p, size)
        b = buf[p]
        p += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            if b == 0:
                raise CorruptHeapError(f"blob: non-minimal varint ending at byte {p - 1}")
            return n, p
        shift += 7
    raise CorruptHeapError(f"blob: varint longer than {VARINT_MAX_BYTES} bytes at byte {p}")


def _check_minimal_int(buf: Buffer, p: int, e: int) -> None:
    """INT payload ``buf[p:e]`` is at least one byte and has no redundant sign byte on top."""
    if e - p < 2:
        if e == p:
            raise CorruptHeapError(f"blob: INT of zero bytes at byte {p}")
        return
    top = buf[e - 1]
    below = buf[e - 2]
    if (top == 0 and below < 0x80) or (top == 0xFF and below >= 0x80):
        raise CorruptHeapError(f"blob: non-minimal INT ending at byte {e}")


def _check_item_cell(c: int, p: int) -> None:
    """A CELL blob holds an immediate or a ref (refs are handled by the caller)."""
    if c & INT_BIT:
        return
    tag = c & TAG_MASK
    if tag == TAG_IMM:
        return  # from_cell checks the rest
    if tag == TAG_BLOB:
        what = "the empty cell" if c == EMPTY else f"a blob offset ({c:#x})"
        raise CorruptHeapError(f"blob: {what} in a CELL at byte {p}: blobs are self-contained")
    if tag == TAG_REF:
        raise CorruptHeapError(f"blob: a ref to offset 0 at byte {p}")
    raise CorruptHeapError(f"blob: cell {c:#x} with the reserved tag {tag} at byte {p}")


def _truncated(p: int, size: int) -> CorruptHeapError:
    return CorruptHeapError(f"blob: truncated, needs byte {p} of a {size}-byte buffer")


def _bad_utf8(exc: UnicodeDecodeError, p: int) -> CorruptHeapError:
    return CorruptHeapError(f"blob: bad UTF-8 in the str at byte {p}: {exc.reason}")


def blob_length(buf: Buffer) -> int:
    """Bytes that the blob at the start of ``buf`` occupies (the rest of ``buf`` is slack).

    Checks the structure (tags, lengths, cells, nesting), not the contents (UTF-8 is not
    decoded); damage raises :class:`CorruptHeapError`. Never calls pickle. O(len(buf)).

    >>> blob_length(encode("abc") + b"\\x00" * 5)
    5
    """
    try:
        return _walk(_bytes_view(buf), 0, len(buf), 0, None)
    except BaseException as exc:
        del buf  # see _unpin
        _unpin(exc)
        raise


def blob_refs(buf: Buffer) -> list[int]:
    """Offsets of the shared objects that the blob at the start of ``buf`` refers to, in order,
    nested tuples and frozensets included (pickles are not looked into). Checks the structure
    like :func:`blob_length`. O(len(buf)).

    >>> shared = lambda v: ref_cell(4096) if isinstance(v, list) else None  # lists stand in
    >>> blob_refs(encode((1, ("a", []), []), ref=shared))
    [4096, 4096]
    """
    refs: list[int] = []
    try:
        _walk(_bytes_view(buf), 0, len(buf), 0, refs)
    except BaseException as exc:
        del buf  # see _unpin
        _unpin(exc)
        raise
    return refs


def _unpin(exc: BaseException) -> None:
    """Clear the locals of the finished frames in the tracebacks of ``exc`` and its causes.

    Each of those frames holds ``buf``; when it is a view of an mmap, an exception kept alive
    (``sys.last_value`` in a REPL, a saved error, a log record) would keep the mapping exported,
    and the heap could then be neither grown nor closed (``BufferError``). The traceback keeps
    its file and line numbers. The caller deletes its own ``buf``: an executing frame cannot be
    cleared.
    """
    import traceback  # (on an error path only: it costs ~2 ms of import)

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


def _bytes_view(buf: Buffer) -> Buffer:
    """``buf``, once checked to index as bytes (a memoryview of another shape would not)."""
    if type(buf) is memoryview and (buf.format != "B" or buf.ndim != 1):
        raise TypeError(
            f"need a flat buffer of unsigned bytes, not a memoryview of format {buf.format!r} "
            f"and {buf.ndim} dimensions"
        )
    return buf


def _walk(buf: Buffer, p: int, size: int, depth: int, refs: list[int] | None) -> int:
    """End of the blob at ``buf[p:size]``, checking its structure; ref offsets go to ``refs``."""
    if p >= size:
        raise _truncated(p, size)
    tag = buf[p]
    p += 1
    if tag == BLOB_STR or tag == BLOB_BYTES or tag == BLOB_PICKLE:
        n, p = _length(buf, p, size)
        return p + n
    if tag == BLOB_INT:
        n, p = _length(buf, p, size)
        _check_minimal_int(buf, p, p + n)
        return p + n
    if tag == BLOB_CELL:
        e = p + CELL_BYTES
        if e > size:
            raise _truncated(e, size)
        c = int.from_bytes(buf[p:e], "little")
        if c & TAG_MASK == TAG_REF and c != TAG_REF:
            if refs is not None:
                refs.append(c - TAG_REF)
        else:
            _check_item_cell(c, p)
            from_cell(c)
        return e
    if tag == BLOB_TUPLE or tag == BLOB_FROZENSET:
        if depth >= MAX_DEPTH:
            raise CorruptHeapError(f"blob: containers nested deeper than {MAX_DEPTH} at byte {p}")
        n, p = _length(buf, p, size)
        for _ in range(n):
            p = _walk(buf, p, size, depth + 1, refs)
        return p
    if tag == BLOB_FLOAT or tag == BLOB_COMPLEX:
        e = p + (FLOAT_BYTES if tag == BLOB_FLOAT else 2 * FLOAT_BYTES)
        if e > size:
            raise _truncated(e, size)
        return e
    raise CorruptHeapError(f"blob: unknown tag {tag} at byte {p - 1} (from a newer pheap?)")


# ---------------------------------------------------------------------------------------------
# Stable hashing.
# ---------------------------------------------------------------------------------------------

#: Subclasses hashed as their base when they keep the base's ``__eq__`` and ``__hash__``, and how
#: to get the base value out of them without calling anything the subclass overrides.
_BASES: Final[tuple[tuple[type, Callable[[Any], Any]], ...]] = (
    (str, str.__str__),
    (int, int.__int__),
    (float, float.__float__),
    (bytes, lambda v: memoryview(v).tobytes()),
    (tuple, lambda v: tuple.__getitem__(v, slice(None))),
    (frozenset, frozenset.copy),
    (complex, lambda v: complex(complex.real.__get__(v), complex.imag.__get__(v))),
)


class StableHasher:
    """A 64-bit hash of values that is the same in every process, run and Python version.

    ``h = StableHasher(secret)``; ``h(v)`` is an unsigned 64-bit int. Python's ``hash()`` cannot
    serve a heap shared between processes and kept on disk: it is salted per process for str and
    bytes (and for None before 3.12 and NaN since 3.10), and the tuple algorithm is not promised
    across versions. Here each value is reduced to a canonical byte string and hashed with BLAKE2b
    keyed by ``secret`` (a per-heap secret of 16..64 bytes), so whoever does not know the secret
    cannot precompute keys that collide.

    Agrees with ``==``: equal values hash equal, across types too (``h(1) == h(1.0) == h(True)
    == h(1 + 0j)``, ``h((1, "a")) == h((1.0, "a"))``), so a shared dict can behave like dict. str
    and bytes of the same content differ. Supported: None, bool, int, float, complex, str, bytes,
    and tuples and frozensets of them, plus subclasses of these that keep the base ``__eq__`` and
    ``__hash__`` (``IntEnum``, ``StrEnum``). Unhashable values raise ``TypeError`` like ``hash()``;
    other hashable types raise ``TypeError`` too, as they have no stable hash.

    Cost: str, bytes and ints up to ``HASH_CACHE_MAX_LEN`` bytes are remembered in a process-local
    cache per type (keyed by exact type, then value; cleared when it reaches ``HASH_CACHE_SIZE``
    entries), so a repeated key costs one dict hit. Measured (timeit, best of 7) on the 2-core
    development machine, CPython 3.11: a cached str 0.12 µs, a cached int 0.13 µs; cold, a
    10-char str 0.73 µs and an int 0.83 µs (keyed BLAKE2b alone, built per call: 0.56 µs; here
    a keyed prototype is copied instead, which skips hashing the key block); a tuple of two
    cached items 1.7 µs. O(size of the value) cold, O(1) cached.

    >>> h = StableHasher(b"0123456789abcdef")
    >>> h("key") == h("key"), h(1) == h(1.0) == h(True), h("a") == h(b"a"), h(2**64) < 2**64
    (True, True, False, True)
    """

    __slots__ = ("_proto", "_strs", "_bytes", "_ints", "_none", "_nan")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError(f"hash key must be bytes, not {_type_name(key)}")
        key = bytes(key)
        if not HASH_KEY_MIN <= len(key) <= HASH_KEY_MAX:
            raise ValueError(
                f"hash key of {len(key)} bytes: need {HASH_KEY_MIN}..{HASH_KEY_MAX} random bytes"
            )
        self._proto = _blake2b(digest_size=CELL_BYTES, key=key, person=HASH_PERSON)
        self._strs: dict[str, int] = {}
        self._bytes: dict[bytes, int] = {}
        self._ints: dict[int, int] = {}
        self._none = self._digest(HASH_NONE)
        self._nan = self._digest(HASH_FLOAT + _CANONICAL_NAN)

    def __call__(self, v: Any) -> int:
        """The stable 64-bit hash of ``v``; see the class. O(1) for a cached str or int."""
        t = type(v)
        if t is str:
            h = self._strs.get(v)
            return h if h is not None else self._str(v)
        if t is int:
            h = self._ints.get(v)
            return h if h is not None else self._int(v)
        if t is bytes:
            return self._bytes_hash(v)
        return self._any(v, 0)

    def _digest(self, data: bytes) -> int:
        h = self._proto.copy()
        h.update(data)
        return int.from_bytes(h.digest(), "little")

    def _str(self, v: str) -> int:
        b = v.encode("utf-8", "surrogatepass")
        h = self._digest(HASH_STR + b)
        if len(b) <= HASH_CACHE_MAX_LEN:
            _remember(self._strs, v, h)
        return h

    def _bytes_hash(self, v: bytes) -> int:
        h = self._bytes.get(v)
        if h is None:
            h = self._digest(HASH_BYTES + v)
            if len(v) <= HASH_CACHE_MAX_LEN:
                _remember(self._bytes, v, h)
        return h

    def _int(self, v: int) -> int:
        n = ((v if v >= 0 else ~v).bit_length() >> 3) + 1
        h = self._digest(HASH_INT + v.to_bytes(n, "little", signed=True))
        if n <= HASH_CACHE_MAX_LEN:
            _remember(self._ints, v, h)
        return h

    def _float(self, v: float) -> int:
        if v.is_integer():  # 2.0 == 2: the int's hash (False for inf and NaN)
            return self(int(v))
        if v != v:
            return self._nan
        return self._digest(HASH_FLOAT + _F64.pack(v))

    def _any(self, v: Any, depth: int) -> int:
        t = type(v)
        if t is str or t is int:
            return self(v)
        if v is None:
            return self._none
        if t is bool:
            return self(int(v))
        if t is float:
            return self._float(v)
        if t is tuple:
            if depth >= MAX_DEPTH:
                raise _too_deep_to_encode()
            hs = [self._any(x, depth + 1).to_bytes(CELL_BYTES, "little") for x in v]
            return self._digest(HASH_TUPLE + b"".join(hs))
        if t is bytes:
            return self._bytes_hash(v)
        if t is complex:
            re, im = v.real, v.imag
            if im == 0:
                return self._float(re)  # 2+0j == 2.0 == 2
            parts = [_F64.pack(x + 0.0) if x == x else _CANONICAL_NAN for x in (re, im)]
            return self._digest(HASH_COMPLEX + b"".join(parts))  # + 0.0 makes -0.0 0.0
        if t is frozenset:
            if depth >= MAX_DEPTH:
                raise _too_deep_to_encode()
            total = sum(self._any(x, depth + 1) for x in v) & CELL_MASK
            return self._digest(
                HASH_FROZENSET
                + total.to_bytes(CELL_BYTES, "little")
                + len(v).to_bytes(CELL_BYTES, "little")
            )
        for base, to_base in _BASES:
            if isinstance(v, base):
                if t.__eq__ is base.__eq__ and t.__hash__ is base.__hash__:
                    return self._any(to_base(v), depth)
                break
        if t.__hash__ is None:
            raise TypeError(f"unhashable type: '{t.__qualname__}'")
        raise TypeError(
            f"no stable hash for type {_type_name(v)}: keys must be {_NATIVE} "
            "(or subclasses keeping the base __eq__ and __hash__)"
        )


def _remember(cache: dict, k: object, h: int) -> None:
    """Put ``k -> h`` in a bounded cache: cleared wholesale when full (cheap, no LRU upkeep)."""
    if len(cache) >= HASH_CACHE_SIZE:
        cache.clear()
    cache[k] = h
