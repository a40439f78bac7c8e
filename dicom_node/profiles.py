"""Output profiles of destinations: which objects a PACS gets, in which transfer syntaxes.

A destination lists the transfer syntaxes it accepts, most preferred first, by alias
(``explicit``, ``implicit``, ``deflated``, ``rle``, ``jpeg-ls-lossless``,
``jpeg2000-lossless``) or by UID; at least one must be uncompressed so that every
object can always be sent. The sender proposes, per SOP class it is about to send,
one presentation context per syntax that fits those objects (pixel compression only
for 8/16-bit images; the BINARY SEG, 1 bit, and the SR are sent uncompressed or
deflated), and sends each object in the most preferred syntax the peer accepted,
falling back to an uncompressed one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

if TYPE_CHECKING:
    from pynetdicom.presentation import PresentationContext

# pynetdicom is imported by the sender when it builds its contexts: the settings import
# this module, and commands that never touch the network (``infer``) start without it.

LOG = logging.getLogger(__name__)

#: Transfer syntaxes the sender can produce, by alias, in the order a suggestion uses.
TRANSFER_SYNTAXES: dict[str, UID] = {
    "jpeg-ls-lossless": JPEGLSLossless,
    "jpeg2000-lossless": JPEG2000Lossless,
    "rle": RLELossless,
    "deflated": DeflatedExplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
}
ALIASES: dict[str, str] = {str(uid): alias for alias, uid in TRANSFER_SYNTAXES.items()}
#: Syntaxes every object can be sent in.
UNCOMPRESSED: frozenset[str] = frozenset({str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)})
#: Syntaxes that compress pixel data (8 or 16 bits allocated only).
PIXEL_CODECS: frozenset[str] = frozenset({str(JPEGLSLossless), str(JPEG2000Lossless), str(RLELossless)})
#: A destination's syntaxes when its table names none.
DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))

#: SOP classes of each result kind (what ``destinations test`` asks a peer about).
KIND_SOP_CLASSES: dict[str, tuple[str, ...]] = {
    "seg": ("1.2.840.10008.5.1.4.1.1.66.4",),  # Segmentation Storage
    "sr": ("1.2.840.10008.5.1.4.1.1.88.34",),  # Comprehensive 3D SR Storage
    "overlay": ("1.2.840.10008.5.1.4.1.1.7",),  # Secondary Capture Image Storage
    "rtstruct": ("1.2.840.10008.5.1.4.1.1.481.3",),  # RT Structure Set Storage
}


def parse_transfer_syntax(value: object) -> str:
    """A transfer syntax UID from an alias or a UID.

    Raises
    ------
    ValueError
        If ``value`` is neither a known alias nor a UID of a syntax the sender can write.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    text = value.strip()
    if text.lower() in TRANSFER_SYNTAXES:
        return str(TRANSFER_SYNTAXES[text.lower()])
    if text in ALIASES:
        return text
    raise ValueError(f"{value!r} is not one of {', '.join(TRANSFER_SYNTAXES)} (or their UIDs)")


def check_transfer_syntaxes(values: Iterable[object]) -> tuple[str, ...]:
    """Parse a destination's list: known, no repeats, at least one uncompressed.

    Raises
    ------
    ValueError
        Naming the problem.
    """
    out = tuple(parse_transfer_syntax(v) for v in values)
    if not out:
        raise ValueError("the list is empty")
    if len(set(out)) != len(out):
        raise ValueError("a transfer syntax is listed twice")
    if not UNCOMPRESSED & set(out):
        raise ValueError('at least one uncompressed syntax ("explicit" or "implicit") is needed')
    return out


def alias(uid: str) -> str:
    """The alias of a syntax UID (the UID itself when it has none)."""
    return ALIASES.get(str(uid), str(uid))


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectShape:
    """What decides which syntaxes fit an object: its SOP class and its pixels.

    Parameters
    ----------
    sop_class_uid : str
    bits_allocated : int
        0 when the object has no pixel data (SR).
    """

    sop_class_uid: str
    bits_allocated: int

    @staticmethod
    def of(ds: Dataset) -> ObjectShape:
        """The shape of a data set."""
        bits = int(ds.get("BitsAllocated", 0) or 0) if "PixelData" in ds else 0
        return ObjectShape(sop_class_uid=str(ds.SOPClassUID), bits_allocated=bits)


def fits(syntax: str, shape: ObjectShape) -> bool:
    """Whether the sender can write an object of ``shape`` in ``syntax``."""
    if syntax in PIXEL_CODECS:
        return shape.bits_allocated in (8, 16)
    return syntax in UNCOMPRESSED or syntax == str(DeflatedExplicitVRLittleEndian)


def contexts_for(shapes: Iterable[ObjectShape], syntaxes: Sequence[str]) -> list[PresentationContext]:
    """One presentation context per (SOP class, fitting syntax) of the objects to send.

    Only the SOP classes of ``shapes`` are proposed, each with the syntaxes of the
    destination that fit at least one of its objects; separate contexts let the peer
    accept an uncompressed syntax while refusing a compressed one.
    """
    from pynetdicom import build_context

    wanted: dict[str, list[str]] = {}
    for shape in shapes:
        row = wanted.setdefault(shape.sop_class_uid, [])
        for ts in syntaxes:
            if ts not in row and fits(ts, shape):
                row.append(ts)
    contexts: list[PresentationContext] = []
    for sop, row in sorted(wanted.items()):
        ordered = [ts for ts in syntaxes if ts in row]
        contexts.extend(build_context(sop, [ts]) for ts in ordered)
    return contexts


def choose(shape: ObjectShape, preferred: Sequence[str], accepted: Iterable[str]) -> list[str]:
    """Syntaxes to try for one object, best first: preferred, fitting and accepted.

    Uncompressed ones come last, as the fallback.
    """
    ok = set(accepted)
    tries = [ts for ts in preferred if ts in ok and fits(ts, shape)]
    compressed = [ts for ts in tries if ts not in UNCOMPRESSED]
    plain = [ts for ts in tries if ts in UNCOMPRESSED]
    return compressed + plain


def encode_as(ds: Dataset, syntax: str) -> Dataset:
    """A copy of ``ds`` in ``syntax`` (pixel data compressed when it is a codec).

    Raises
    ------
    ValueError
        If ``syntax`` does not fit the object.
    """
    if not fits(syntax, ObjectShape.of(ds)):
        raise ValueError(f"{alias(syntax)} does not fit SOP class {ds.SOPClassUID}")
    if str(ds.file_meta.TransferSyntaxUID) == syntax:
        return ds
    out = ds.copy()
    # pydicom annotates Dataset.copy as returning a Dataset; it is copy.copy(self), the same class.
    out.file_meta = ds.file_meta.copy()  # type: ignore[assignment]
    if syntax in PIXEL_CODECS:
        out.compress(UID(syntax), generate_instance_uid=False)  # lossless: the same instance
    else:
        out.file_meta.TransferSyntaxUID = UID(syntax)
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class Suggestion:
    """A profile suggested from what a peer accepted.

    Parameters
    ----------
    send : tuple of str
        Result kinds whose SOP class the peer accepts uncompressed.
    transfer_syntaxes : tuple of str
        Accepted syntax aliases, compressed first, usable by at least one kind.
    """

    send: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]

    def toml(self, name: str, ae_title: str, host: str, port: int) -> str:
        """The ``[[destinations]]`` table of this profile."""
        kinds = ", ".join(f'"{k}"' for k in self.send)
        syntaxes = ", ".join(f'"{s}"' for s in self.transfer_syntaxes)
        return (f'[[destinations]]\nname = "{name}"\nae_title = "{ae_title}"\nhost = "{host}"\n'
                f"port = {port}\nsend = [{kinds}]\ntransfer_syntaxes = [{syntaxes}]\n")


def suggest(accepted: dict[str, set[str]]) -> Suggestion:
    """Suggest a profile from ``{sop_class_uid: accepted syntax UIDs}``.

    The RTSTRUCT is suggested only to a peer that takes it and refuses the SEG (the
    contours are the SEG's segments again: a peer that shows the SEG needs no copy).
    """
    send = tuple(kind for kind, sops in KIND_SOP_CLASSES.items()
                 if any(accepted.get(sop, set()) & UNCOMPRESSED for sop in sops))
    if "seg" in send:
        send = tuple(k for k in send if k != "rtstruct")
    usable: set[str] = set()
    for kind in send:
        for sop in KIND_SOP_CLASSES[kind]:
            usable |= accepted.get(sop, set())
    order = [str(uid) for uid in TRANSFER_SYNTAXES.values()]
    return Suggestion(send=send, transfer_syntaxes=tuple(alias(ts) for ts in order if ts in usable))
