"""Check that a received data set can be parsed to its end, in bounded memory.

DESIGN decision 1 answers Success only for an instance the archive can read back. A
data set whose last value runs past the data (Pixel Data declared 2 GiB, 512 bytes
present), whose sequence or item is never closed, or whose sequences nest deeper than
:data:`MAX_DEPTH`, is refused (C000) with the reason, and never archived.

:func:`walk` follows the element headers from the first byte to the last: each value
is skipped by its length (checked against what is left of the data set and of its
enclosing item or sequence), sequences and items are followed on an explicit stack
(no recursion, so 10,000 nested levels are a refusal, not a ``RecursionError``),
encapsulated pixel data fragment by fragment. Only headers are read, through
``pread``-style random access, so a 1 GiB instance costs a few kilobytes here.

Why by hand: pydicom's reader is lenient on purpose (a value shorter than its length
is read with a warning, as far as the file goes), recurses once per nested sequence,
and a full read holds every value in memory (``defer_size`` still reads the
structure of what it defers later, and a ``stop_before_pixels`` read does not look at
what follows the pixel data). The archive still reads the header with pydicom, up to
the pixel data; this walk is what tells it the rest is whole.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from twin_archive.errors import InvalidInstanceError

#: Deepest sequence nesting accepted (real SR content trees use about ten levels).
MAX_DEPTH = 64

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"))

# Container kinds on the stack.
_DATASET, _ITEM_DEFINED, _ITEM_UNDEFINED, _SEQ_DEFINED, _SEQ_UNDEFINED, _FRAGMENTS = range(6)
_HOLDS_ELEMENTS = (_DATASET, _ITEM_DEFINED, _ITEM_UNDEFINED)


@dataclass(frozen=True, kw_only=True, slots=True)
class Walked:
    """What :func:`walk` learnt: a whole data set.

    Attributes
    ----------
    has_pixels : bool
        Pixel Data (or Float/Double Float Pixel Data) at the top level.
    elements : int
        Data elements read, at every level.
    depth : int
        Deepest sequence nesting met.
    """

    has_pixels: bool
    elements: int
    depth: int


def _implicit_sq(tag: int) -> bool:
    """True when the data dictionary says ``tag`` is a sequence (Implicit VR)."""
    from pydicom.datadict import dictionary_VR

    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def walk(pread: Callable[[int, int], bytes], size: int, *, implicit: bool, little: bool,
         max_depth: int = MAX_DEPTH) -> Walked:
    """Follow a data set of ``size`` bytes from its first element to its last.

    Long because it is one state machine over an explicit stack (data set, items,
    sequences, pixel fragments) whose states share the read position, the enclosing
    limit and the stack, run once per element on the C-STORE path: split into
    functions, each element would pay calls and the shared state would travel
    through their arguments.

    Parameters
    ----------
    pread : callable
        ``pread(offset, n)``: ``n`` bytes of the data set at ``offset`` (fewer only at
        its end).
    size : int
        Bytes in the data set (without File Meta Information).
    implicit, little : bool
        The transfer syntax's encoding.
    max_depth : int
        Deepest sequence nesting accepted.

    Raises
    ------
    InvalidInstanceError
        The data set cannot be parsed to its end; the message says where and why.
    """
    end_char = "<" if little else ">"
    tag_struct = struct.Struct(end_char + "HH")
    u16 = struct.Struct(end_char + "H")
    u32 = struct.Struct(end_char + "L")
    # (kind, limit): a defined-length container ends exactly at limit; an undefined
    # one must close (delimiter) before the limit of what encloses it.
    stack: list[tuple[int, int, bool]] = []
    pos = 0
    elements = 0
    depth = deepest = 0
    has_pixels = False

    def fail(why: str) -> InvalidInstanceError:
        return InvalidInstanceError("DataSet", f"cannot be parsed to its end: {why} (at byte {pos})")

    def read(n: int, limit: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > limit:
            raise fail(f"{what} runs past the end of the data" if limit == size
                       else f"{what} runs past the end of its item or sequence")
        data = pread(pos, n)
        if len(data) != n:
            raise fail(f"{what} runs past the end of the data")
        pos += n
        return data

    if not implicit and size >= 6:
        # As pydicom reads it: a data set whose first element has no valid VR is
        # Implicit VR whatever the transfer syntax says (GDCM wrote some such files).
        vr0 = pread(4, 2)
        if not (len(vr0) == 2 and vr0.isalpha() and vr0.isupper()):
            implicit = True

    stack.append((_DATASET, size, implicit))

    def enter_sequence(kind: int, limit: int, inner_implicit: bool) -> None:
        nonlocal depth, deepest
        depth += 1
        deepest = max(deepest, depth)
        if depth > max_depth:
            raise fail(f"sequences nested deeper than {max_depth} levels")
        stack.append((kind, limit, inner_implicit))

    while True:
        kind, limit, implicit = stack[-1]
        if pos == limit and kind in (_DATASET, _ITEM_DEFINED, _SEQ_DEFINED):
            if kind == _DATASET:
                break
            stack.pop()
            if kind == _SEQ_DEFINED:
                depth -= 1
            continue
        if pos == limit:
            raise fail("a sequence or item is not closed before the end of the data"
                       if limit == size else "an item or sequence is not closed")
        group, element = tag_struct.unpack(read(4, limit, "an element tag"))
        tag = group << 16 | element
        elements += 1
        if kind in _HOLDS_ELEMENTS:
            if tag == _ITEM_END:
                read(4, limit, "an item delimiter")
                if kind != _ITEM_UNDEFINED:
                    raise fail("an item delimiter outside an item of undefined length")
                stack.pop()
                continue
            if group == 0xFFFE:
                raise fail(f"item tag ({group:04X},{element:04X}) among data elements")
            if implicit:
                vr = b""
                length = u32.unpack(read(4, limit, "an element length"))[0]
            else:
                vr = read(2, limit, "an element VR")
                if vr in _LONG_VRS:
                    read(2, limit, "an element header")
                    length = u32.unpack(read(4, limit, "an element length"))[0]
                else:
                    length = u16.unpack(read(2, limit, "an element length"))[0]
            if kind == _DATASET and tag in _PIXEL_TAGS:
                has_pixels = True
            if length == _UNDEFINED:
                if tag in _PIXEL_TAGS:
                    stack.append((_FRAGMENTS, limit, implicit))
                elif vr in (b"SQ", b"UN") or implicit:
                    # UN of undefined length holds Implicit VR Little Endian (PS3.5 6.2.2).
                    enter_sequence(_SEQ_UNDEFINED, limit, implicit or vr == b"UN")
                else:
                    raise fail(f"undefined length on ({group:04X},{element:04X}) "
                               f"{vr.decode(errors='replace')}")
                continue
            if pos + length > limit:
                raise fail(f"the value of ({group:04X},{element:04X}) declares {length} bytes, "
                           f"{limit - pos} are left")
            if length and (vr == b"SQ" or (implicit and _implicit_sq(tag))):
                enter_sequence(_SEQ_DEFINED, pos + length, implicit)
                continue
            pos += length
            continue
        # In a sequence or in encapsulated pixel data: items, then (undefined) the delimiter.
        length = u32.unpack(read(4, limit, "an item length"))[0]
        if tag == _SEQ_END:
            if kind == _SEQ_DEFINED:
                raise fail("a sequence delimiter in a sequence of defined length")
            stack.pop()
            if kind == _SEQ_UNDEFINED:
                depth -= 1
            continue
        if tag != _ITEM:
            raise fail(f"({group:04X},{element:04X}) where an item was expected")
        if kind == _FRAGMENTS:
            if length == _UNDEFINED or pos + length > limit:
                raise fail(f"a pixel data fragment declares {length} bytes, {limit - pos} are left")
            pos += length
            continue
        if length == _UNDEFINED:
            stack.append((_ITEM_UNDEFINED, limit, implicit))
        elif pos + length > limit:
            raise fail(f"an item declares {length} bytes, {limit - pos} are left")
        else:
            stack.append((_ITEM_DEFINED, pos + length, implicit))
    return Walked(has_pixels=has_pixels, elements=elements, depth=deepest)
