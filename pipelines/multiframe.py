"""Enhanced (multi-frame) CT, MR and PET: frames from functional groups, one volume chosen.

An Enhanced CT/MR/PET image or a Legacy Converted Enhanced one holds many frames; the
geometry and the rescale of each frame live in the Shared and Per-Frame Functional
Groups (PS3.3 C.7.6.16): Plane Position (Patient), Plane Orientation (Patient), Pixel
Measures, Pixel Value Transformation, Frame Content, MR Echo, the frame type. This
module reads them once per instance into :class:`FrameInfo` value objects and

* groups the frames by what separates volumes: stack, temporal position, echo, image
  type (frame type and complex component: magnitude/phase, DIXON water/fat) and any
  other Dimension Index pointer of the instance (diffusion b-value, trigger delay ...);
* chooses the frames of one volume by a task's :class:`VolumeChoice` (default: the
  first temporal position, the first echo, ORIGINAL magnitude), or refuses with
  :class:`~pipelines.errors.AmbiguousVolumeError` naming the dimensions found;
* gives each chosen frame a *frame view*: a small header data set carrying the frame's
  Image Position/Orientation (Patient), Pixel Spacing, rescale and frame number
  (``ReferencedFrameNumber``) as single-frame attributes, so the selection rules and
  the geometry checks of :mod:`pipelines.volume` run on frames exactly as on slices.

Why not highdicom's ``Image.get_volume`` (0.28): it refuses a file with several
frames at one position (temporal positions, echoes) and has no filter by dimension;
it has neither this project's refusals (gantry tilt, missing slices, mixed
orientation, each with its fix) nor its resampling of uneven spacing. highdicom is
used where it fits: the SEG on multi-frame sources (per-frame Derivation Image with
Referenced Frame Number), the SR references, and the tests' Legacy Converted images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
)

from pipelines.errors import AmbiguousVolumeError, SelectionRulesError, UnsupportedImageError

LOG = logging.getLogger(__name__)

#: The multi-frame image storage SOP classes read per modality.
ENHANCED_SOP_CLASSES: dict[str, tuple[str, ...]] = {
    "CT": (str(EnhancedCTImageStorage), str(LegacyConvertedEnhancedCTImageStorage)),
    "MR": (str(EnhancedMRImageStorage), str(LegacyConvertedEnhancedMRImageStorage)),
    "PT": (str(EnhancedPETImageStorage), str(LegacyConvertedEnhancedPETImageStorage)),
}
#: Dimension Index pointers read by name (position in space, stack, time, echo, type).
_HANDLED_POINTERS = frozenset(Tag(k) for k in (
    "ImagePositionPatient", "InStackPositionNumber", "StackID", "TemporalPositionIndex",
    "EffectiveEchoTime", "FrameType", "ComplexImageComponent", "FrameAcquisitionNumber"))
_FRAME_TYPE_SEQUENCES = ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence",
                         "PETFrameTypeSequence")
_COMPLEX = frozenset({"MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "MIXED"})
#: Instance attributes every frame view carries (identity, selection, padding).
_VIEW_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID",
                  "StudyInstanceUID", "FrameOfReferenceUID", "Manufacturer",
                  "ManufacturerModelName", "SeriesDescription", "BodyPartExamined",
                  "ContributingEquipmentSequence", "Rows", "Columns", "AcquisitionNumber",
                  "SamplesPerPixel", "PixelPaddingValue", "PixelPaddingRangeLimit")


def is_multiframe(ds: Dataset) -> bool:
    """``True`` for an image whose frames are described by functional groups."""
    return "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds


@dataclass(frozen=True, kw_only=True, slots=True)
class FrameInfo:
    """One frame of a multi-frame image, from its shared and per-frame functional groups.

    Parameters
    ----------
    sop_instance_uid : str
        The instance the frame belongs to.
    number : int
        Frame number, 1-based (PS3.3 C.7.6.6).
    position : tuple of float or None
        Image Position (Patient) of the frame, LPS mm.
    orientation : tuple of float or None
        Image Orientation (Patient), 6 direction cosines.
    pixel_spacing : tuple of float or None
        Pixel Spacing (row, column), mm.
    thickness : float or None
        Slice Thickness, mm.
    slope, intercept : float
        Rescale of the stored values (Pixel Value Transformation; 1 and 0 without one).
    stack : str
        Stack ID ("" without one).
    temporal : int
        Temporal Position Index (0 without one).
    echo : float or None
        Effective Echo Time, ms (MR).
    image_type : tuple of str
        Frame Type values, then the Complex Image Component when there is one.
    others : tuple of (str, int)
        Other Dimension Index pointers of the instance and this frame's index value.
    """

    sop_instance_uid: str
    number: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    thickness: float | None
    slope: float
    intercept: float
    stack: str
    temporal: int
    echo: float | None
    image_type: tuple[str, ...]
    others: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError(f"number must be >= 1, got {self.number}")
        for name, size in (("position", 3), ("orientation", 6), ("pixel_spacing", 2)):
            value = getattr(self, name)
            if value is not None and len(value) != size:
                raise ValueError(f"frame {self.number}: {name} has {len(value)} values, not {size}")


def read_frames(ds: Dataset) -> tuple[FrameInfo, ...]:
    """Every frame of a multi-frame image, in frame-number order.

    Raises
    ------
    UnsupportedImageError
        If the Per-Frame Functional Groups do not have one item per frame, or a value
        in them cannot be read (a position that is not a number ...).
    """
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    count = int(ds.get("NumberOfFrames", 1) or 1)
    uid = str(ds.get("SOPInstanceUID", ""))
    if len(per_frame) not in (0, count):
        raise UnsupportedImageError(str(ds.get("SeriesInstanceUID", "")), uid,
                                    f"{len(per_frame)} per-frame functional group items for "
                                    f"{count} frames")
    others = _other_pointers(ds)
    try:
        return tuple(_frame(ds, uid, k + 1, per_frame[k] if per_frame else Dataset(), shared,
                            others) for k in range(count))
    except (ValueError, TypeError, IndexError, AttributeError) as exc:  # a malformed value
        raise UnsupportedImageError(str(ds.get("SeriesInstanceUID", "")), uid,
                                    f"functional groups cannot be read ({exc})") from exc


def _frame(ds: Dataset, uid: str, number: int, pf: Dataset, shared: Dataset,
           others: Sequence[tuple[int, str]]) -> FrameInfo:
    """One :class:`FrameInfo` from the frame's per-frame item and the shared item."""
    pos = _item(pf, shared, "PlanePositionSequence").get("ImagePositionPatient")
    iop = _item(pf, shared, "PlaneOrientationSequence").get("ImageOrientationPatient")
    measures = _item(pf, shared, "PixelMeasuresSequence")
    spacing, thick = measures.get("PixelSpacing"), measures.get("SliceThickness")
    pvt = _item(pf, shared, "PixelValueTransformationSequence")
    slope = pvt.get("RescaleSlope", ds.get("RescaleSlope", 1))
    intercept = pvt.get("RescaleIntercept", ds.get("RescaleIntercept", 0))
    content = _item(pf, shared, "FrameContentSequence")
    index_values = _values(content.get("DimensionIndexValues"))
    echo = _item(pf, shared, "MREchoSequence").get("EffectiveEchoTime")
    return FrameInfo(
        sop_instance_uid=uid, number=number,
        position=tuple(float(v) for v in pos) if pos else None,
        orientation=tuple(float(v) for v in iop) if iop else None,
        pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
        thickness=float(thick) if thick not in (None, "") else None,
        slope=float(slope if slope not in (None, "") else 1),
        intercept=float(intercept if intercept not in (None, "") else 0),
        stack=str(content.get("StackID", "") or ""),
        temporal=int(content.get("TemporalPositionIndex", 0) or 0),
        echo=float(echo) if echo not in (None, "") else None,
        image_type=_image_type(ds, pf, shared),
        others=tuple((label, int(index_values[i])) for i, label in others
                     if i < len(index_values)))


def _image_type(ds: Dataset, pf: Dataset, shared: Dataset) -> tuple[str, ...]:
    """Frame Type (else Image Type) values, then the Complex Image Component."""
    for keyword in _FRAME_TYPE_SEQUENCES:
        item = _item(pf, shared, keyword)
        if len(item):
            values = [str(v).upper() for v in _values(item.get("FrameType"))]
            component = str(item.get("ComplexImageComponent", "") or "").upper()
            return tuple(values + ([component] if component else []))
    return tuple(str(v).upper() for v in _values(ds.get("ImageType")))


def _other_pointers(ds: Dataset) -> list[tuple[int, str]]:
    """(position in Dimension Index Values, label) of the pointers not read by name."""
    out = []
    for i, item in enumerate(ds.get("DimensionIndexSequence") or []):
        pointer = item.get("DimensionIndexPointer")
        if pointer is None or Tag(pointer) in _HANDLED_POINTERS:
            continue
        label = str(item.get("DimensionDescriptionLabel", "") or "") \
            or keyword_for_tag(Tag(pointer)) or str(Tag(pointer))
        out.append((i, label))
    return out


def _first(seq: object) -> Dataset:
    try:
        return seq[0] if seq else Dataset()  # type: ignore[index]
    except (IndexError, TypeError):
        return Dataset()


def _item(pf: Dataset, shared: Dataset, keyword: str) -> Dataset:
    """The functional group ``keyword``'s item: per-frame first, then shared, else empty."""
    if keyword in pf:
        return _first(pf[keyword].value)
    return _first(shared.get(keyword))


def _values(value: object) -> list[int | float | str]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    return list(value)  # type: ignore[call-overload]


@dataclass(frozen=True, kw_only=True, slots=True)
class VolumeChoice:
    """Which volume of a multi-frame series a task segments (the task's ``volume`` rule).

    Parameters
    ----------
    stack : str or None
        Stack ID to take; ``None``: the series must hold one stack.
    temporal_position : int
        Ordinal of the temporal position, 1 = the first (by Temporal Position Index).
    echo : int
        Ordinal of the echo, 1 = the shortest Effective Echo Time.
    image_type : tuple of str
        Values the frame type must hold (CT and PET frames count as MAGNITUDE).
        Default ``("ORIGINAL", "MAGNITUDE")``; ``("WATER",)`` picks a DIXON water image.

    Raises
    ------
    SelectionRulesError
        If a value is out of range (the key is named ``volume.<key>``).
    """

    stack: str | None = None
    temporal_position: int = 1
    echo: int = 1
    image_type: tuple[str, ...] = ("ORIGINAL", "MAGNITUDE")

    def __post_init__(self) -> None:
        if self.stack is not None and (not isinstance(self.stack, str) or not self.stack.strip()):
            raise SelectionRulesError("volume.stack", "a Stack ID (non-empty string)", self.stack)
        for key in ("temporal_position", "echo"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SelectionRulesError(f"volume.{key}", "an integer >= 1 (1 = the first)", value)
        if not isinstance(self.image_type, tuple) or not self.image_type or not all(
                isinstance(v, str) and v.strip() for v in self.image_type):
            raise SelectionRulesError("volume.image_type", "a non-empty list of image type values",
                                      self.image_type)
        object.__setattr__(self, "image_type", tuple(v.strip().upper() for v in self.image_type))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> VolumeChoice:
        """The choice from a TOML table (``volume = {echo = 2}``).

        Raises
        ------
        SelectionRulesError
            If a key is unknown or a value invalid.
        """
        if not isinstance(data, Mapping):
            raise SelectionRulesError("volume", "a table (stack, temporal_position, echo, "
                                      "image_type)", data)
        known = ("stack", "temporal_position", "echo", "image_type")
        for key in data:
            if key not in known:
                raise SelectionRulesError(f"volume.{key}", f"one of {list(known)}")
        kwargs = dict(data)
        value = kwargs.get("image_type")
        if isinstance(value, (list, str)):
            kwargs["image_type"] = (value,) if isinstance(value, str) else tuple(value)
        return cls(**kwargs)  # type: ignore[arg-type]

    def describe(self) -> str:
        """The choice in words."""
        stack = f"stack {self.stack}" if self.stack is not None else "the only stack"
        return (f"{stack}, temporal position {self.temporal_position}, echo {self.echo}, "
                f"image type {'/'.join(self.image_type)}")


def describe_dimensions(frames: Sequence[FrameInfo]) -> str:
    """The dimensions of a set of frames in words (counts of each kind of value)."""
    echoes = sorted({f.echo for f in frames if f.echo is not None})
    types = sorted({"/".join(f.image_type) for f in frames})
    parts = [f"{len(frames)} frames",
             f"{len({f.stack for f in frames})} stack(s)",
             f"{len({f.temporal for f in frames})} temporal position(s)",
             f"{max(1, len(echoes))} echo(es)"
             + (f" (TE {', '.join(f'{e:g}' for e in echoes)} ms)" if len(echoes) > 1 else ""),
             f"{len(types)} image type(s) ({'; '.join(types)})"]
    labels = sorted({label for f in frames for label, _ in f.others})
    for label in labels:
        values = {dict(f.others).get(label) for f in frames}
        parts.append(f"{len(values)} {label} value(s)")
    return ", ".join(parts)


def choose_frames(frames: Sequence[FrameInfo], choice: VolumeChoice, series_uid: str
                  ) -> tuple[FrameInfo, ...]:
    """The frames of the one volume ``choice`` picks from ``frames``.

    Raises
    ------
    AmbiguousVolumeError
        If no frame fits the choice or more than one volume is left.
    """
    dims = describe_dimensions(frames)
    wanted = set(choice.image_type)
    left = [f for f in frames if wanted <= _type_values(f)]
    if not left:
        raise AmbiguousVolumeError(series_uid, dims, "no frame is of image type "
                                   + "/".join(choice.image_type))
    if choice.stack is not None:
        left = [f for f in left if f.stack == choice.stack]
        if not left:
            raise AmbiguousVolumeError(series_uid, dims, f"no stack {choice.stack!r}")
    for attr, ordinal, name in (("temporal", choice.temporal_position, "temporal position"),
                                ("echo", choice.echo, "echo")):
        values = sorted({getattr(f, attr) for f in left}, key=lambda v: (v is not None, v or 0))
        if ordinal > len(values):
            raise AmbiguousVolumeError(series_uid, dims, f"no {name} {ordinal} "
                                       f"({len(values)} found)")
        left = [f for f in left if getattr(f, attr) == values[ordinal - 1]]
    rest = {(f.stack, f.image_type, f.others) for f in left}
    if len(rest) > 1:
        differ = [name for i, name in enumerate(("stacks", "image types", "other dimensions"))
                  if len({r[i] for r in rest}) > 1]
        raise AmbiguousVolumeError(series_uid, dims, "more than one volume fits the volume rule "
                                   f"({', '.join(differ)} differ)")
    return tuple(left)


def _type_values(frame: FrameInfo) -> set[str]:
    values = set(frame.image_type)
    if not values & _COMPLEX:
        values.add("MAGNITUDE")  # CT, PET: real-valued magnitude images
    return values


def frame_view(ds: Dataset, frame: FrameInfo) -> Dataset:
    """A header data set of one frame, with its geometry as single-frame attributes.

    Carries the instance's identity and selection attributes, the frame's Image
    Position/Orientation (Patient), Pixel Spacing, Slice Thickness, Rescale
    Slope/Intercept, Image Type (the frame type) and its number as Referenced Frame
    Number. No pixel data; elements of ``ds`` are shared, not copied.
    """
    view = Dataset()
    for keyword in _VIEW_KEYWORDS:
        if keyword in ds:
            view.add(ds[keyword])
    if "BodyPartExamined" not in view:
        part = _body_part(ds)
        if part:
            view.BodyPartExamined = part
    view.ReferencedFrameNumber = frame.number
    if frame.position is not None:
        view.ImagePositionPatient = list(frame.position)
    if frame.orientation is not None:
        view.ImageOrientationPatient = list(frame.orientation)
    if frame.pixel_spacing is not None:
        view.PixelSpacing = list(frame.pixel_spacing)
    if frame.thickness is not None:
        view.SliceThickness = frame.thickness
    view.RescaleSlope = frame.slope
    view.RescaleIntercept = frame.intercept
    view.ImageType = list(frame.image_type)
    return view


def _body_part(ds: Dataset) -> str:
    """Body part from the shared Frame Anatomy's region (Legacy Converted images move
    Body Part Examined there): its code meaning, upper case."""
    anatomy = _first(_first(ds.get("SharedFunctionalGroupsSequence")).get("FrameAnatomySequence"))
    region = _first(anatomy.get("AnatomicRegionSequence"))
    return str(region.get("CodeMeaning", "") or "").strip().upper()[:16]


def volume_views(datasets: Sequence[Dataset], choice: VolumeChoice, series_uid: str
                 ) -> list[tuple[Dataset, Dataset]]:
    """(instance, frame view) of every frame of the chosen volume of a series' multi-frame
    instances, in instance then frame order.

    Raises
    ------
    AmbiguousVolumeError
        If the frames do not give one volume under ``choice``.
    UnsupportedImageError
        If the functional groups are malformed.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    frames = [f for ds in datasets for f in read_frames(ds)]
    chosen = choose_frames(frames, choice, series_uid)
    if len(chosen) < len(frames):
        LOG.info("series %s: %d of %d frames chosen (%s)", series_uid, len(chosen), len(frames),
                 choice.describe())
    return [(by_uid[f.sop_instance_uid], frame_view(by_uid[f.sop_instance_uid], f))
            for f in chosen]


def expand_frames(datasets: Sequence[Dataset], choice: VolumeChoice) -> list[Dataset]:
    """The series as single-frame headers: each multi-frame instance replaced by the
    frame views of the chosen volume; single-frame instances as they are.

    Raises
    ------
    AmbiguousVolumeError
        If the multi-frame instances do not give one volume under ``choice``.
    """
    multi = [ds for ds in datasets if is_multiframe(ds)]
    if not multi:
        return list(datasets)
    series_uid = str(multi[0].get("SeriesInstanceUID", ""))
    views = [view for _, view in volume_views(multi, choice, series_uid)]
    return [ds for ds in datasets if not is_multiframe(ds)] + views
