"""Checks every result object before it may leave the node.

Two levels, both run on the encoded bytes (what a PACS would receive):

- a Python check, always: the object encodes and reads back (pydicom, then highdicom's
  ``segread`` / ``srread`` for SEG and SR), it is of the SOP class of its kind, its
  UIDs are valid, and what IHE AI Results needs is present (the algorithm's
  Contributing Equipment item with Device UID; each SEG segment's algorithm
  identification; the SR's TID 1500 template, procedure, volume measurements with
  UCUM units referencing SEG segments; the overlay's burned-in annotation flag);
- ``dciodvfy`` (dicom3tools) when it is installed: its ``Error`` lines. For a generated
  series (the overlay: one image per slice with a segment) :func:`validate_series`
  runs it on the first instance and the Python check on every instance.

An object with any error is not sent (the sender holds it with the reason).

Label Map Segmentation Storage (the LABELMAP SEG, DICOM 2024, Sup 243) is newer than
the ``dciodvfy`` of Debian 12 (dicom3tools 2022): it answers "Information Object Not
found" for such a SEG (it has no IOD to check it against, and reads its background
segment 0 as an error), and reads an SR's references to it as references to a
non-segmentation class. So a LABELMAP SEG that ``dciodvfy`` does not know is checked by
the Python checks alone (``checked_with`` says so), and an SR is given to ``dciodvfy``
with its references to Label Map Segmentation read as Segmentation Storage, the one
fact that ``dciodvfy`` lacks; a ``dciodvfy`` that knows the class checks both in full.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from pipelines.codes import PROCESSING_ALGORITHM, VOLUME
from pipelines.types import ResultDatasets
from pipelines.uids import is_valid_uid

LOG = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Label Map Segmentation Storage (the LABELMAP SEG).
LABELMAP_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
#: What ``dciodvfy`` answers for a SOP class it has no IOD for.
DCIODVFY_UNKNOWN_IOD = "Information Object Not found"
SR_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
                  "1.2.840.10008.5.1.4.1.1.88.34")
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
KINDS = ("seg", "sr", "overlay", "rtstruct")
#: RT Structure Set Storage.
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: Seconds one ``dciodvfy`` run may take.
DCIODVFY_TIMEOUT_S = 120.0


@dataclass(frozen=True, kw_only=True, slots=True)
class ValidationReport:
    """What the checks found in one object.

    Parameters
    ----------
    kind : str
        ``seg``, ``sr`` or ``overlay``.
    sop_instance_uid : str
    errors : tuple of str
        Each problem, prefixed by the checker (``python:`` or ``dciodvfy:``).
    checked_with : tuple of str
        The checkers that ran (``python``, and ``dciodvfy`` when installed).
    """

    kind: str
    sop_instance_uid: str
    errors: tuple[str, ...]
    checked_with: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def ok(self) -> bool:
        """``True`` when no checker found an error."""
        return not self.errors

    @property
    def reason(self) -> str:
        """The errors in one line (at most 1000 characters), empty when valid."""
        text = "; ".join(self.errors)
        return text if len(text) <= 1000 else text[:997] + "..."


def find_dciodvfy() -> str | None:
    """Path of ``dciodvfy``, or ``None`` when dicom3tools is not installed."""
    return shutil.which("dciodvfy")


def validate_dataset(ds: Dataset, kind: str, *, dciodvfy: str | None | bool = True
                     ) -> ValidationReport:
    """Check one result object.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The object as it would be stored and sent (not modified).
    kind : str
        ``seg``, ``sr`` or ``overlay``.
    dciodvfy : str, bool or None
        ``True``: run ``dciodvfy`` when installed; a path: run that one; ``False`` or
        ``None``: Python checks only.

    Returns
    -------
    ValidationReport

    Raises
    ------
    ValueError
        If ``kind`` is unknown.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    uid = str(ds.get("SOPInstanceUID", "") or "")
    errors: list[str] = []
    checked = ["python"]
    data = b""
    try:
        buf = BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        data = buf.getvalue()
        back = pydicom.dcmread(BytesIO(data))
    except Exception as exc:  # anything that stops encoding or decoding is the finding
        errors.append(f"python: does not encode and read back ({type(exc).__name__}: {exc})")
    else:
        errors.extend(f"python: {e}" for e in _python_checks(back, data, kind))
    exe = find_dciodvfy() if dciodvfy is True else (dciodvfy or None)
    if exe and data:
        if str(ds.get("SOPClassUID", "")) == LABELMAP_SEG_SOP_CLASS and predates_labelmap(exe):
            checked.append("dciodvfy: predates Label Map Segmentation, not checked")
        else:
            checked.append("dciodvfy")
            errors.extend(f"dciodvfy: {e}"
                          for e in run_dciodvfy(_as_dciodvfy_reads(ds, data, kind), exe))
    report = ValidationReport(kind=kind, sop_instance_uid=uid, errors=tuple(errors),
                              checked_with=tuple(checked))
    if not report.ok:
        LOG.error("%s %s failed validation: %s", kind, uid, report.reason)
    return report


@functools.lru_cache(maxsize=4)
def predates_labelmap(exe: str) -> bool:
    """Whether the ``dciodvfy`` at ``exe`` has no IOD for Label Map Segmentation Storage
    (asked once per process, with a data set of that class and nothing else)."""
    probe = Dataset()
    probe.file_meta = FileMetaDataset()
    probe.file_meta.MediaStorageSOPClassUID = UID(LABELMAP_SEG_SOP_CLASS)
    probe.file_meta.MediaStorageSOPInstanceUID = UID("2.25.1")
    probe.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    probe.SOPClassUID, probe.SOPInstanceUID = LABELMAP_SEG_SOP_CLASS, "2.25.1"
    buf = BytesIO()
    pydicom.dcmwrite(buf, probe, enforce_file_format=True)
    return DCIODVFY_UNKNOWN_IOD in run_dciodvfy(buf.getvalue(), exe)


def _as_dciodvfy_reads(ds: Dataset, data: bytes, kind: str) -> bytes:
    """``data``, or for an SR that references a LABELMAP SEG, the SR with those
    references read as Segmentation Storage (see the module's docstring)."""
    if kind != "sr" or LABELMAP_SEG_SOP_CLASS.encode() not in data:
        return data
    copy = pydicom.dcmread(BytesIO(data))
    for elem in copy.iterall():
        if elem.keyword == "ReferencedSOPClassUID" and elem.value == LABELMAP_SEG_SOP_CLASS:
            elem.value = SEG_SOP_CLASS
    buf = BytesIO()
    pydicom.dcmwrite(buf, copy, enforce_file_format=True)
    return buf.getvalue()


def validate_results(results: ResultDatasets, *, dciodvfy: str | None | bool = True
                     ) -> tuple[ValidationReport, ...]:
    """Check the SEG, the SR and every overlay image, in :meth:`ResultDatasets.all` order."""
    kinds = ["seg", "sr", *(["overlay"] * len(results.overlay))]
    return tuple(validate_dataset(ds, kind, dciodvfy=dciodvfy)
                 for ds, kind in zip(results.all(), kinds, strict=True))


def validate_series(datasets: Sequence[Dataset], kind: str, *, dciodvfy: str | None | bool = True
                    ) -> tuple[ValidationReport, ...]:
    """Check the instances of one generated series (the overlay): the Python checks on
    every instance, ``dciodvfy`` on the first only; if the first fails ``dciodvfy``,
    every instance is reported with its errors.

    Why this is enough: the instances of a series the node generates come from one
    writer call with one template and differ only in pixel data, Instance Number,
    position and the referenced source image, which the Python checks read back on
    every instance (encoding, UIDs, references, pixel data, IHE AIR attributes).
    ``dciodvfy`` checks the IOD's structure, identical across them, and costs a
    subprocess and a file per instance (figures in ``benchmarks/README.md``). An instance that fails any check is still never sent.

    Returns
    -------
    tuple of ValidationReport
        One per data set, in order.
    """
    if not datasets:
        return ()
    first = validate_dataset(datasets[0], kind, dciodvfy=dciodvfy)
    structural = tuple(e for e in first.errors if e.startswith("dciodvfy:"))
    via_first = ("dciodvfy (first instance)",) if "dciodvfy" in first.checked_with else ()
    out = [first]
    for ds in datasets[1:]:
        rep = validate_dataset(ds, kind, dciodvfy=False)
        out.append(ValidationReport(
            kind=kind, sop_instance_uid=rep.sop_instance_uid,
            errors=(*rep.errors, *(f"{e} (first instance of the series)" for e in structural)),
            checked_with=(*rep.checked_with, *via_first)))
    return tuple(out)


def run_dciodvfy(data: bytes, exe: str) -> list[str]:
    """``Error`` lines of ``dciodvfy`` on an encoded Part 10 object.

    A checker that cannot run (missing, timed out) is reported as an error: an object
    that could not be checked is not known to be valid.
    """
    fd, tmp = tempfile.mkstemp(suffix=".dcm", prefix="dicom-node-validate-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        run = subprocess.run([exe, tmp], capture_output=True, text=True, timeout=DCIODVFY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"could not run ({exc})"]
    finally:
        os.unlink(tmp)
    lines = (run.stdout + run.stderr).splitlines()
    return [ln.removeprefix("Error - ").strip() for ln in lines if ln.startswith("Error")]


def _python_checks(ds: Dataset, data: bytes, kind: str) -> list[str]:
    errors: list[str] = []
    sop_class = str(ds.get("SOPClassUID", ""))
    expected = {"seg": (SEG_SOP_CLASS, LABELMAP_SEG_SOP_CLASS), "sr": SR_SOP_CLASSES,
                "overlay": (SC_SOP_CLASS,),
                "rtstruct": (RTSTRUCT_SOP_CLASS,)}[kind]
    if sop_class not in expected:
        errors.append(f"SOP Class UID {sop_class!r} is not one of a {kind}")
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not is_valid_uid(ds.get(keyword)):
            errors.append(f"{keyword} is missing or not a valid UID")
    for keyword in ("PatientID", "StudyDate", "Modality", "Manufacturer", "SeriesNumber",
                    "InstanceNumber"):
        if keyword not in ds:
            errors.append(f"{keyword} is missing")
    errors.extend(_algorithm_equipment(ds))
    try:
        if kind == "seg":
            errors.extend(_seg_checks(data))
        elif kind == "sr":
            errors.extend(_sr_checks(data))
        elif kind == "rtstruct":
            errors.extend(_rtstruct_checks(data))
        else:
            errors.extend(_overlay_checks(ds))
    except Exception as exc:  # a reader that refuses the object is the finding
        errors.append(f"highdicom cannot read it back ({type(exc).__name__}: {exc})")
    return errors


def _algorithm_equipment(ds: Dataset) -> list[str]:
    """IHE AIR: a Contributing Equipment item for the algorithm, with its identity."""
    items = [e for e in ds.get("ContributingEquipmentSequence", [])
             if any(c.get("CodeValue") == PROCESSING_ALGORITHM.value
                    and c.get("CodingSchemeDesignator") == PROCESSING_ALGORITHM.scheme_designator
                    for c in e.get("PurposeOfReferenceCodeSequence", []))]
    if len(items) != 1:
        return [f"expected one Contributing Equipment item 'Processing Algorithm', found {len(items)}"]
    item = items[0]
    errors = [f"algorithm equipment lacks {k}" for k in
              ("Manufacturer", "ManufacturerModelName", "SoftwareVersions") if not item.get(k)]
    if not is_valid_uid(item.get("DeviceUID")):
        errors.append("algorithm equipment lacks a valid Device UID")
    return errors


def _seg_checks(data: bytes) -> list[str]:
    seg = hd.seg.segread(BytesIO(data))
    errors = []
    if int(seg.get("NumberOfFrames", 0) or 0) < 1:
        errors.append("SEG has no frames")
    numbers = list(seg.segment_numbers)
    if not numbers:
        errors.append("SEG has no segments")
    for n in numbers:
        desc = seg.get_segment_description(n)
        if desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC.value or \
                str(desc.algorithm_type) == "AUTOMATIC":
            alg = desc.get("SegmentationAlgorithmIdentificationSequence", [])
            if not alg or not all(alg[0].get(k) for k in ("AlgorithmName", "AlgorithmVersion",
                                                            "AlgorithmFamilyCodeSequence")):
                errors.append(f"segment {n} lacks its algorithm identification (name, family, version)")
        if not desc.get("TrackingUID"):
            errors.append(f"segment {n} has no Tracking UID (the SR measurement refers to it)")
    return errors


def _sr_checks(data: bytes) -> list[str]:
    sr = hd.sr.srread(BytesIO(data))
    errors = []
    templates = [str(t.TemplateIdentifier) for t in sr.get("ContentTemplateSequence", [])]
    if templates != ["1500"]:
        errors.append(f"SR content template is {templates}, expected TID 1500")
    if not isinstance(sr.content, hd.sr.MeasurementReport):  # highdicom reads TID 1500 only so
        return errors
    groups = sr.content.get_volumetric_roi_measurement_groups()
    if not groups:
        errors.append("SR has no volumetric ROI measurement group")
    for i, group in enumerate(groups, start=1):
        if group.referenced_segment is None:
            errors.append(f"measurement group {i} references no SEG segment")
        volumes = group.get_measurements(name=VOLUME)
        if not volumes:
            errors.append(f"measurement group {i} has no volume")
        for m in volumes:
            if m.unit.scheme_designator != "UCUM":
                errors.append(f"measurement group {i}: unit {m.unit.value!r} is not UCUM")
    procedure = [i for i in sr.content[0].ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    if not procedure:
        errors.append("SR has no Procedure Reported")
    return errors


def _rtstruct_checks(data: bytes) -> list[str]:
    """Read back: ROIs, one contour list and one observation each, contour data whole."""
    ds = pydicom.dcmread(BytesIO(data))
    errors = []
    rois = ds.get("StructureSetROISequence", [])
    if not rois:
        errors.append("RTSTRUCT has no ROI")
    numbers = [int(r.ROINumber) for r in rois]
    for name in ("ROIContourSequence", "RTROIObservationsSequence"):
        if sorted(int(i.ReferencedROINumber) for i in ds.get(name, [])) != sorted(numbers):
            errors.append(f"{name} does not name each ROI once")
    for item in ds.get("ROIContourSequence", []):
        for c in item.get("ContourSequence", []):
            if len(c.ContourData) != 3 * int(c.NumberOfContourPoints):
                errors.append(f"ROI {item.ReferencedROINumber}: contour data and point count differ")
                break
    if not ds.get("ReferencedFrameOfReferenceSequence"):
        errors.append("RTSTRUCT references no Frame of Reference")
    return errors


def _overlay_checks(ds: Dataset) -> list[str]:
    errors = []
    if ds.get("BurnedInAnnotation") != "YES":
        errors.append("overlay does not declare Burned In Annotation YES")
    if not ds.get("SourceImageSequence"):
        errors.append("overlay references no source image")
    pixels = ds.pixel_array
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        errors.append(f"overlay pixel data is not RGB (shape {pixels.shape})")
    return errors


def invalid(reports: Iterable[ValidationReport]) -> dict[str, str]:
    """``{SOP Instance UID: reason}`` of the reports with errors."""
    return {r.sop_instance_uid: r.reason for r in reports if not r.ok}
