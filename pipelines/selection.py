"""Which series a pipeline runs on: selection rules as data, and the decision with a reason.

Rules come from the configuration as a plain mapping (TOML/JSON), are validated once by
:meth:`SelectionRules.from_dict`, and are applied to the headers of one series by
:func:`matches`. Whatever the rules say, a series is never selected when

* the node itself produced it (:func:`is_node_output`: Manufacturer or Contributing
  Equipment is :data:`~pipelines.types.NODE_MANUFACTURER`), or
* it is a result or document object (SEG, SR, KO, PR, RT..., secondary capture).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from pipelines.errors import PipelineError, SelectionRulesError, SeriesGeometryError
from pipelines.multiframe import ENHANCED_SOP_CLASSES, VolumeChoice, expand_frames
from pipelines.types import NODE_MANUFACTURER

LOG = logging.getLogger(__name__)

#: Modalities of results and documents: never inferred on, and not allowed in rules.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "KO", "PR", "RTSTRUCT", "RTPLAN", "RTDOSE",
                                  "RTRECORD", "REG", "DOC", "PLAN", "AU", "ECG"})
#: Prefix of the Secondary Capture SOP Class UIDs (PS3.4 B.5): never inferred on.
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_ORIENTATION_TOLERANCE = 1e-3


@dataclass(frozen=True, kw_only=True, slots=True)
class SelectionDecision:
    """Whether a series is selected, and why (in words, no patient data)."""

    matched: bool
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class SelectionRules:
    """The series a pipeline accepts.

    Parameters
    ----------
    name : str
        Name of the rule set, used in reasons and logs.
    modality : str
        Required Modality (e.g. ``CT``); a result modality (SEG, SR, ...) is refused.
    sop_class_uids : tuple of str
        Accepted SOP Class UIDs (default: CT Image Storage, Enhanced CT and Legacy
        Converted Enhanced CT Image Storage).
    body_part_patterns : tuple of str
        Shell-style patterns (``ABDOMEN*``), case-insensitive, one must match
        Body Part Examined. Empty: any body part.
    accept_missing_body_part : bool
        Whether a series without Body Part Examined passes ``body_part_patterns``.
    series_description_patterns : tuple of str
        Regular expressions (searched, case-insensitive); one must match Series
        Description. Empty: any description.
    exclude_series_description_patterns : tuple of str
        Regular expressions; a match refuses the series (``scout``, ``dose report``).
    require_original : bool
        Image Type value 1 must be ORIGINAL in every instance.
    exclude_image_types : tuple of str
        Image Type values that refuse the series (default ``LOCALIZER``).
    min_slices : int
        Least number of distinct instances (>= 1).
    single_orientation : bool
        All instances must share one Image Orientation (Patient).
    max_slice_thickness_mm : float or None
        Largest Slice Thickness (mm) accepted; where an instance has none, the spacing
        between its neighbours along the slice normal is taken. ``None``: any thickness.
    manufacturers : tuple of str
        Shell-style patterns, case-insensitive, one of which must match Manufacturer.
        Empty: any manufacturer.
    volume : VolumeChoice
        Which volume of a multi-frame (Enhanced) series is segmented: stack, temporal
        position, echo, image type (default: the first temporal position and echo,
        ORIGINAL magnitude). The other checks then apply to that volume's frames as
        if they were single-frame images; a series that does not give one volume is
        refused, naming the dimensions found.

    Raises
    ------
    SelectionRulesError
        If a value is of the wrong kind, out of range or an invalid pattern.
    """

    name: str = "default"
    modality: str = "CT"
    sop_class_uids: tuple[str, ...] = (str(CTImageStorage), *ENHANCED_SOP_CLASSES["CT"])
    body_part_patterns: tuple[str, ...] = ()
    accept_missing_body_part: bool = False
    series_description_patterns: tuple[str, ...] = ()
    exclude_series_description_patterns: tuple[str, ...] = ()
    require_original: bool = True
    exclude_image_types: tuple[str, ...] = ("LOCALIZER",)
    min_slices: int = 1
    single_orientation: bool = True
    max_slice_thickness_mm: float | None = None
    manufacturers: tuple[str, ...] = ()
    volume: VolumeChoice = field(default_factory=VolumeChoice)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SelectionRulesError("name", "a non-empty string", self.name)
        if not isinstance(self.modality, str) or not re.fullmatch(r"[A-Z0-9_ ]{1,16}", self.modality):
            raise SelectionRulesError("modality", "an upper-case DICOM modality such as 'CT'",
                                      self.modality)
        if self.modality in NON_IMAGE_MODALITIES:
            raise SelectionRulesError("modality", "an image modality (results and documents "
                                      f"{sorted(NON_IMAGE_MODALITIES)} are never inferred on)",
                                      self.modality)
        for key in ("sop_class_uids", "body_part_patterns", "series_description_patterns",
                    "exclude_series_description_patterns", "exclude_image_types",
                    "manufacturers"):
            value = getattr(self, key)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                raise SelectionRulesError(key, "a list of non-empty strings", value)
        if not self.sop_class_uids:
            raise SelectionRulesError("sop_class_uids", "at least one SOP Class UID", [])
        bad_sc = [u for u in self.sop_class_uids if u.startswith(SECONDARY_CAPTURE_PREFIX)]
        if bad_sc:
            raise SelectionRulesError("sop_class_uids", "no Secondary Capture SOP class", bad_sc)
        for key in ("series_description_patterns", "exclude_series_description_patterns"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SelectionRulesError(key, f"valid regular expressions ({exc})",
                                              pattern) from exc
        for key in ("accept_missing_body_part", "require_original", "single_orientation"):
            if not isinstance(getattr(self, key), bool):
                raise SelectionRulesError(key, "true or false", getattr(self, key))
        if isinstance(self.min_slices, bool) or not isinstance(self.min_slices, int) \
                or self.min_slices < 1:
            raise SelectionRulesError("min_slices", "an integer >= 1", self.min_slices)
        thick = self.max_slice_thickness_mm
        if thick is not None and (isinstance(thick, bool) or not isinstance(thick, int | float)
                                  or not 0 < thick <= 1000):
            raise SelectionRulesError("max_slice_thickness_mm", "a number of mm > 0 (at most 1000)",
                                      thick)
        if not isinstance(self.volume, VolumeChoice):
            raise SelectionRulesError("volume", "a VolumeChoice", type(self.volume).__name__)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SelectionRules:
        """Build rules from a plain mapping (a TOML table or a JSON object).

        Lists become tuples; keys not listed above are refused, so that a typo does
        not silently widen the selection.

        Raises
        ------
        SelectionRulesError
            If a key is unknown or a value invalid.
        """
        if not isinstance(data, Mapping):
            raise SelectionRulesError("(rules)", "a table of rule keys", type(data).__name__)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SelectionRulesError(unknown[0], f"one of {sorted(known)}")
        kwargs: dict[str, object] = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = tuple(value)
            if key in ("modality",) and isinstance(value, str):
                value = value.strip().upper()
            if key == "volume" and not isinstance(value, VolumeChoice):
                value = VolumeChoice.from_dict(value)  # type: ignore[arg-type]
            if key == "exclude_image_types" and isinstance(value, tuple):
                value = tuple(v.strip().upper() if isinstance(v, str) else v for v in value)
            kwargs[key] = value
        return cls(**kwargs)  # type: ignore[arg-type]


def is_node_output(ds: Dataset) -> bool:
    """``True`` when ``ds`` was created by this node (SEG, SR, overlay), by its marker.

    The marker is :data:`~pipelines.types.NODE_MANUFACTURER` as Manufacturer or as the
    Manufacturer of any Contributing Equipment item (kept when a PACS or viewer
    re-writes the object).
    """
    if str(ds.get("Manufacturer", "")).strip() == NODE_MANUFACTURER:
        return True
    return any(str(item.get("Manufacturer", "")).strip() == NODE_MANUFACTURER
               for item in ds.get("ContributingEquipmentSequence", []))


def matches(rules: SelectionRules, series: Iterable[Dataset]) -> SelectionDecision:
    """Decide whether one series (its headers) is selected by ``rules``.

    The checks of :data:`_CHECKS` run in order; the first that refuses decides.

    Parameters
    ----------
    rules : SelectionRules
        The rule set.
    series : iterable of pydicom.dataset.Dataset
        Headers of the instances of one series (pixel data not needed).

    Returns
    -------
    SelectionDecision
        ``matched`` and the first reason that decided it.
    """
    items = list(series)
    reason = _refuse_kind(rules, items)
    if reason is None:
        try:
            items = expand_frames(items, rules.volume)
        except PipelineError as exc:  # several volumes, malformed functional groups
            reason = f"{exc.problem}; {exc.fix}" if isinstance(exc, SeriesGeometryError) \
                else str(exc)
    for check in _CHECKS:
        reason = reason or check(rules, items)
        if reason is not None:
            return SelectionDecision(matched=False, reason=f"rules {rules.name!r}: {reason}")
    count = _image_count(items)
    frames = any("ReferencedFrameNumber" in ds for ds in items)
    what = f"{count} frames of a multi-frame image" if frames else f"{count} instances"
    return SelectionDecision(matched=True, reason=f"rules {rules.name!r}: matched ({what})")


def _image_count(items: list[Dataset]) -> int:
    """Distinct images: instances, and each frame of a multi-frame instance."""
    return len({(str(ds.get("SOPInstanceUID", "")), ds.get("ReferencedFrameNumber"))
                for ds in items})


def _refuse_kind(rules: SelectionRules, items: list[Dataset]) -> str | None:
    """Nothing, the node's own output, result objects, secondary captures."""
    if not items:
        return "no instances"
    if any(is_node_output(ds) for ds in items):
        return f"produced by this node (marker {NODE_MANUFACTURER!r}); never inferred on"
    modalities = {str(ds.get("Modality", "")) for ds in items}
    if modalities & NON_IMAGE_MODALITIES:
        return f"modality {sorted(modalities & NON_IMAGE_MODALITIES)} is a result/document object"
    if any(str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_PREFIX) for ds in items):
        return "secondary capture images are never inferred on"
    return None


def _refuse_modality(rules: SelectionRules, items: list[Dataset]) -> str | None:
    """Modality, SOP class and one series."""
    modalities = {str(ds.get("Modality", "")) for ds in items}
    if modalities != {rules.modality}:
        return f"modality {sorted(modalities)} is not {rules.modality}"
    sop_classes = {str(ds.get("SOPClassUID", "")) for ds in items}
    if not sop_classes <= set(rules.sop_class_uids):
        return f"SOP class {sorted(sop_classes - set(rules.sop_class_uids))} not accepted"
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in items}
    if len(series_uids) != 1:
        return f"instances of {len(series_uids)} series given, expected one"
    return None


def _refuse_image_type(rules: SelectionRules, items: list[Dataset]) -> str | None:
    for ds in items:
        image_type = [str(v).upper() for v in _values(ds.get("ImageType"))]
        if rules.require_original and (not image_type or image_type[0] != "ORIGINAL"):
            return f"Image Type {image_type or 'missing'} is not ORIGINAL"
        excluded = set(image_type) & set(rules.exclude_image_types)
        if excluded:
            return f"Image Type contains {sorted(excluded)}"
    return None


def _refuse_body_part(rules: SelectionRules, items: list[Dataset]) -> str | None:
    if not rules.body_part_patterns:
        return None
    parts = {str(ds.get("BodyPartExamined", "") or "").strip().upper() for ds in items}
    for part in parts:
        if not part:
            if not rules.accept_missing_body_part:
                return "Body Part Examined is missing"
        elif not any(fnmatch.fnmatchcase(part, p.upper()) for p in rules.body_part_patterns):
            return f"Body Part Examined {part!r} matches none of {list(rules.body_part_patterns)}"
    return None


def _refuse_manufacturer(rules: SelectionRules, items: list[Dataset]) -> str | None:
    if not rules.manufacturers:
        return None
    makers = {str(ds.get("Manufacturer", "") or "").strip() for ds in items}
    for maker in makers:
        if not any(fnmatch.fnmatchcase(maker.upper(), p.upper()) for p in rules.manufacturers):
            return (f"Manufacturer {maker or '(missing)'!r} matches none of "
                    f"{list(rules.manufacturers)}")
    return None


def _refuse_description(rules: SelectionRules, items: list[Dataset]) -> str | None:
    descriptions = {str(ds.get("SeriesDescription", "") or "") for ds in items}
    for text in descriptions:
        if rules.series_description_patterns and not any(
                re.search(p, text, re.IGNORECASE) for p in rules.series_description_patterns):
            return (f"Series Description {text!r} matches none of "
                    f"{list(rules.series_description_patterns)}")
        hit = next((p for p in rules.exclude_series_description_patterns
                    if re.search(p, text, re.IGNORECASE)), None)
        if hit is not None:
            return f"Series Description {text!r} matches excluded pattern {hit!r}"
    return None


def _refuse_orientation(rules: SelectionRules, items: list[Dataset]) -> str | None:
    if not rules.single_orientation:
        return None
    iops = [ds.get("ImageOrientationPatient") for ds in items]
    if any(v is None or len(v) != 6 for v in iops):
        return "Image Orientation (Patient) is missing"
    arr = np.array([[float(x) for x in v] for v in iops])
    if np.abs(arr - arr[0]).max() > _ORIENTATION_TOLERANCE:
        return "more than one Image Orientation (Patient) in the series"
    return None


def _refuse_geometry(rules: SelectionRules, items: list[Dataset]) -> str | None:
    """Number of instances and slice thickness."""
    count = _image_count(items)
    if count < rules.min_slices:
        noun = "frame(s)" if any("ReferencedFrameNumber" in ds for ds in items) else "instance(s)"
        return f"{count} {noun}, at least {rules.min_slices} required"
    if rules.max_slice_thickness_mm is not None:
        thickness = slice_thickness_mm(items)
        if thickness is None:
            return "slice thickness unknown (no Slice Thickness, no Image Position (Patient))"
        if thickness > rules.max_slice_thickness_mm + 1e-6:
            return f"slice thickness {thickness:g} mm is above {rules.max_slice_thickness_mm:g} mm"
    return None


#: The checks of :func:`matches`, in the order they decide: each returns why the series
#: is refused, or None.
_CHECKS: tuple[Callable[[SelectionRules, list[Dataset]], str | None], ...] = (
    _refuse_modality, _refuse_image_type, _refuse_body_part,
    _refuse_manufacturer, _refuse_description, _refuse_orientation, _refuse_geometry)


def slice_thickness_mm(items: list[Dataset]) -> float | None:
    """The thickest slice of a series, mm: Slice Thickness where every instance has it,
    otherwise the largest spacing between neighbouring Image Positions along the normal."""
    values = [ds.get("SliceThickness") for ds in items]
    if values and all(v not in (None, "") for v in values):
        try:
            return max(float(v) for v in values)
        except (TypeError, ValueError):
            pass
    try:
        iop = [float(x) for x in items[0].ImageOrientationPatient]
        normal = np.cross(iop[:3], iop[3:])
        pos = sorted(float(np.dot(normal, [float(x) for x in ds.ImagePositionPatient]))
                     for ds in items)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    gaps = np.diff(pos)
    return float(gaps.max()) if gaps.size else None


def _values(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [value]
