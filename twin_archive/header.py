"""What the store path reads from an instance before writing it: its header and identity.

An incoming instance (:class:`~twin_archive.records.IncomingInstance`, bytes in memory
or a spool on disk) is read up to its pixel data (:func:`parse`): the fast path reads
the raw bytes the spool keeps in memory, the slow path walks the data set to its end
(:mod:`twin_archive.dataset_walk`) and reads it with pydicom; both give the same
answers. :func:`identify` then checks the identifiers the archive groups by and
refuses only what cannot be grouped at all (issue 13).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from twin_archive.dataset_walk import Walked, walk
from twin_archive.errors import InvalidInstanceError, SopClassMismatchError
from twin_archive.records import IncomingInstance
from twin_archive.text import printable
from twin_archive.uids import uid_problem

LOG = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True, kw_only=True, slots=True)
class Header:
    """What the store path learns from a data set before writing it."""

    fields: dict[str, str]
    has_pixels: bool
    has_rows_columns: bool
    #: Why the native Pixel Data is shorter than the image attributes say, or "".
    pixel_problem: str = ""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


# Every attribute the store path reads (identification, validation, index columns),
# read once per instance by :func:`_fields`.
_FIELD_KEYWORDS = (
    "PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "SOPClassUID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "Modality",
    "BodyPartExamined", "SeriesDescription", "SeriesNumber", "Manufacturer",
    "ManufacturerModelName", "FrameOfReferenceUID", "InstanceNumber",
)
_FIELD_TAGS = tuple((kw, int(Tag(kw))) for kw in _FIELD_KEYWORDS)
_PIXEL_TAGS = frozenset(int(Tag(kw)) for kw in _PIXEL_KEYWORDS)
_ROWS, _COLUMNS = int(Tag("Rows")), int(Tag("Columns"))
_PIXEL_DATA = int(Tag("PixelData"))
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQ_DELIM = {True: b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", False: b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"}


def _ascii_text(raw: bytes) -> str | None:
    """The value of a raw single-valued text element, as ``_text`` would give it.

    Only for the plain case: 7-bit ASCII, no backslash (value multiplicity > 1), no
    escape (ISO 2022 code extensions), no NUL but one trailing pad byte. Anything else
    returns ``None`` and goes through pydicom, which applies the Specific Character
    Set and the VR's own rules.
    """
    if raw.endswith(b"\x00"):
        raw = raw[:-1]
    if not raw.isascii() or b"\\" in raw or b"\x1b" in raw or b"\x00" in raw:
        return None
    return raw.decode("ascii").strip()


def _fields(ds: Dataset) -> dict[str, str]:
    """Read every attribute the store path needs, in one pass over the data set.

    Equivalent to ``_text(ds, keyword)`` for each keyword (a test compares them), but
    plain ASCII values are taken from the raw bytes without building pydicom elements.
    """
    out: dict[str, str] = {}
    elements = ds._dict  # noqa: SLF001 - raw elements, before pydicom converts them
    for keyword, tag in _FIELD_TAGS:
        elem = elements.get(tag)  # type: ignore[call-overload]
        if elem is None:
            out[keyword] = ""
            continue
        if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH:
            if not elem.value:
                text: str | None = ""
            else:
                text = _ascii_text(bytes(elem.value))
            if text is not None:
                out[keyword] = text
                continue
        out[keyword] = _text(ds, keyword)
    return out


def _scan(fp: BinaryIO, start: int, size: int, implicit: bool, little: bool,
          tail: Callable[[int], bytes], *, need_pixels: bool, walked: bool = False) -> Header | None:
    """Read a data set from ``fp`` (at ``start``, ``size`` bytes) up to its pixel data.

    With ``need_pixels`` (``fp`` holds only the first part of the data set), a result
    is given only when the pixel data element was reached inside it. None whenever the
    result might differ from a full parse (see :func:`parse_fast`). With
    ``walked`` the data set is known to parse to its end (:mod:`twin_archive.dataset_walk`):
    what follows the pixel data is not looked at, and values over 1 MiB before it are
    skipped, not read.
    """
    stop: list[tuple[int, int]] = []
    native: list[bool] = []  # the pixel data met is native Pixel Data (defined length)

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            stop.append((fp.tell() - start, length))  # positioned at the value
            native.append(tag == _PIXEL_DATA and length != _UNDEFINED_LENGTH)
            return True
        return False

    try:
        with fp:
            ds = read_dataset(fp, implicit, little, stop_when=at_pixels,
                              defer_size=(1 << 20) if walked else None)
            end = fp.tell() - start
        if not stop and need_pixels:
            return None
        if walked:
            pass
        elif stop:
            value_at, length = stop[0]
            if length == _UNDEFINED_LENGTH:
                delimiter = _SEQ_DELIM[little]
                if tail(len(delimiter)) != delimiter:
                    return None
            elif value_at + length != size:
                return None  # trailing elements or truncated pixel data
        elif end != size:
            return None
        fields = _fields(ds)
        pixel_problem = pixel_shortfall(ds, stop[0][1]) if native and native[0] else ""
    except Exception:  # noqa: BLE001 - the full parse reports it properly
        return None
    elements = ds._dict  # noqa: SLF001
    return Header(
        fields=fields,
        has_pixels=bool(stop),
        has_rows_columns=_ROWS in elements and _COLUMNS in elements,
        pixel_problem=pixel_problem,
    )


def pixel_shortfall(ds: Dataset, length: int) -> str:
    """Why ``length`` bytes of native Pixel Data are too few for the image ``ds`` (its
    header, read up to the pixel data), or "".

    Rows x Columns x Samples per Pixel x Number of Frames x Bits Allocated / 8 bytes
    (PS3.5 8.1.1; two thirds of it for YBR_FULL_422). Encapsulated pixel data (undefined
    length), Float/Double Float Pixel Data, images missing those attributes, and data
    sets that take the full parse (elements after the pixel data, deflated) are not
    judged here.
    """
    try:
        rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return ""
    needed = (rows * columns * samples * frames * bits + 7) // 8
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        needed = needed * 2 // 3  # two chroma samples per two pixels (PS3.3 C.7.6.3.1.2)
    if length >= needed:
        return ""
    return (f"Pixel Data holds {length} bytes; {rows} x {columns} pixels x {samples} "
            f"sample(s) x {frames} frame(s) at {bits} bits allocated need {needed}")


def parse(incoming: IncomingInstance) -> Header:
    """Read an instance up to its pixel data, having checked that it parses to its end.

    Raises
    ------
    InvalidInstanceError
        The data set cannot be parsed to its end, or its header cannot be decoded.
    """
    parsed = parse_fast(incoming)
    if parsed is not None:
        if UID(incoming.transfer_syntax_uid).is_compressed:
            walk_to_end(incoming)  # fragments of encapsulated pixel data, to the end
        return parsed
    # Anything else is first followed to its end (bounded memory, no recursion;
    # twin_archive/dataset_walk.py), then its header read up to the pixel data.
    walked = walk_to_end(incoming)
    ds = _parse_full(incoming)
    try:
        fields = {kw: _text(ds, kw) for kw in _FIELD_KEYWORDS}
    except Exception as exc:  # a malformed value deep in the data set
        raise InvalidInstanceError("DataSet", f"cannot be decoded ({exc})") from exc
    return Header(
        fields=fields,
        has_pixels=walked.has_pixels,
        has_rows_columns="Rows" in ds and "Columns" in ds,
    )


def walk_to_end(incoming: IncomingInstance) -> Walked:
    """Check that the data set parses to its end (raises InvalidInstanceError)."""
    try:
        ts = UID(incoming.transfer_syntax_uid)
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    except (ValueError, AttributeError) as exc:
        raise InvalidInstanceError("TransferSyntaxUID", f"unknown ({exc})") from exc
    spool = incoming.spool
    if ts.is_deflated:  # inflated in memory (rare; its header is read the same way)
        raw = spool.path.read_bytes()[spool.meta_length:] if spool is not None else incoming.dataset
        try:
            data = zlib.decompress(raw, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise InvalidInstanceError("DataSet", f"cannot be inflated ({exc})") from exc
        return walk(lambda at, n: data[at:at + n], len(data), implicit=False, little=True)
    if spool is not None:
        return walk(spool.read_at, spool.size, implicit=implicit, little=little)
    data = incoming.dataset
    return walk(lambda at, n: data[at:at + n], len(data), implicit=implicit, little=little)


def _parse_full(incoming: IncomingInstance) -> Dataset:
    """The header up to the pixel data (values over 1 MiB left on disk)."""
    try:
        if incoming.spool is not None:
            return pydicom.dcmread(incoming.spool.path, stop_before_pixels=True,
                                   defer_size="1 MiB")
        return pydicom.dcmread(BytesIO(incoming.file_meta + incoming.dataset),
                               stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError,
            RecursionError) as exc:
        raise InvalidInstanceError("DataSet", f"cannot be parsed ({exc})") from exc


def parse_fast(incoming: IncomingInstance) -> Header | None:
    """Read the data set up to its pixel data, without copying or decoding pixels.

    Returns ``None`` whenever the result might differ from a full parse (deflated
    or unknown transfer syntax, anything unusual at or after the pixel data, any
    parse or decode error); the caller then takes the full, slow path, which gives
    the same answers and the same error messages as before.
    """
    try:
        ts = UID(incoming.transfer_syntax_uid)
        if ts.is_deflated or not ts.is_transfer_syntax:
            return None
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    except (ValueError, AttributeError):
        return None
    spool = incoming.spool
    if spool is None:
        return _scan(BytesIO(incoming.dataset), 0, len(incoming.dataset), implicit, little,
                     lambda n: incoming.dataset[-n:], need_pixels=False)
    # Most headers end well inside the first bytes the spool keeps in memory: read
    # them there (a file read through pydicom costs about 60 system calls).
    parsed = _scan(BytesIO(spool.head), 0, spool.size, implicit, little, spool.tail,
                   need_pixels=True)
    if parsed is not None:
        return parsed
    # A longer header, or elements after the pixel data: walked to its end (bounded
    # memory), then read from the file up to the pixel data.
    walk_to_end(incoming)
    return _scan(spool.open_dataset(), spool.meta_length, spool.size, implicit, little,
                 spool.tail, need_pixels=False, walked=True)


def identify(parsed: Header, incoming: IncomingInstance) -> dict[str, str]:
    """The instance's identifiers; refuses only what cannot be grouped at all.

    Returns ``patient_id``, ``issuer``, ``study_uid``, ``series_uid``, ``sop_uid``,
    ``sop_class``, ``uid_flags`` and ``unidentified`` (``"1"`` or ``""``).

    Kept as a PACS keeps them (issue 13): an empty or missing Patient ID files the
    instance into the unidentified twin of its study; a Study, Series or SOP
    Instance UID that is not conformant is flagged (``uid_flags``) and never used
    as a path. Refused: a missing or empty Study, Series or SOP Instance UID.
    """
    f = parsed.fields
    ident = {
        "patient_id": f["PatientID"],
        "issuer": f["IssuerOfPatientID"],
        "study_uid": f["StudyInstanceUID"],
        "series_uid": f["SeriesInstanceUID"],
        "sop_uid": f["SOPInstanceUID"],
        "sop_class": f["SOPClassUID"],
    }
    ident["uid_flags"] = _uid_flags(ident)
    ident["unidentified"] = "" if ident["patient_id"] else "1"
    _check_sop_class(parsed, ident, incoming)
    return ident


def _uid_flags(ident: dict[str, str]) -> str:
    """Keywords of the grouping UIDs that are not conformant, comma-separated.

    Raises
    ------
    InvalidInstanceError
        A SOP Instance, Study or Series Instance UID is missing or empty.
    """
    flags = []
    for keyword, name in (
        ("SOPInstanceUID", "sop_uid"),
        ("StudyInstanceUID", "study_uid"),
        ("SeriesInstanceUID", "series_uid"),
    ):
        if not ident[name]:
            raise InvalidInstanceError(keyword, "missing or empty: the instance cannot be "
                                       "grouped into a study and series")
        if uid_problem(ident[name]):
            flags.append(keyword)
    return ",".join(flags)


def _check_sop_class(parsed: Header, ident: dict[str, str], incoming: IncomingInstance) -> None:
    """Check the data set against the SOP class it was sent as (an image has pixels).

    Raises
    ------
    InvalidInstanceError
        The SOP Class UID is missing or not a UID.
    SopClassMismatchError
        The data set's SOP class is not the one it was sent as, or an image lacks
        Pixel Data or Rows/Columns.
    """
    sop_class, sop_uid = ident["sop_class"], ident["sop_uid"]
    problem = uid_problem(sop_class or None)
    if problem:
        raise InvalidInstanceError("SOPClassUID", problem)
    if sop_class != incoming.sop_class_uid:
        raise SopClassMismatchError(
            sop_uid, f"data set has SOP Class {sop_class} but was sent as {incoming.sop_class_uid}"
        )
    if sop_uid != incoming.sop_instance_uid:
        # Kept, as a PACS keeps it (issue 13), under the data set's own UID: that is
        # what every reader of the file sees.
        LOG.warning("archive: instance %s sent as %s (the request's Affected SOP Instance "
                    "UID differs from the data set's); kept under the data set's",
                    printable(sop_uid), printable(incoming.sop_instance_uid))
    if UID(sop_class).name.endswith("Image Storage") and "Multi-frame" not in UID(sop_class).name:
        if not parsed.has_pixels:
            raise SopClassMismatchError(sop_uid, f"{UID(sop_class).name} without Pixel Data")
        if not parsed.has_rows_columns:
            raise SopClassMismatchError(sop_uid, f"{UID(sop_class).name} without Rows/Columns")
