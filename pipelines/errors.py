"""Errors of the pipelines room.

Every refusal says what was found and how to fix it, so that the message can be shown
to hospital IT as it is. Messages never contain patient data; they name series and
instances by UID only.
"""

from __future__ import annotations

from dicom_node.foundation.errors import DicomNodeError


class PipelineError(DicomNodeError):
    """Base class of pipeline errors."""


class SeriesGeometryError(PipelineError, ValueError):
    """A series cannot be turned into a volume without risking a misaligned result.

    Parameters
    ----------
    series_uid : str
        Series Instance UID of the refused series (may be empty when unknown).
    problem : str
        What was found, with numbers.
    fix : str
        What the sender or the operator can do about it.
    """

    def __init__(self, series_uid: str, problem: str, fix: str) -> None:
        self.series_uid = series_uid
        self.problem = problem
        self.fix = fix
        where = f"series {series_uid}: " if series_uid else ""
        super().__init__(f"{where}{problem}; {fix}")


class EmptySeriesError(SeriesGeometryError):
    """No instance was given."""

    def __init__(self) -> None:
        super().__init__("", "no instances were given", "pass the files or data sets of one series")


class TooFewSlicesError(SeriesGeometryError):
    """Fewer than two slices: no slice spacing can be derived."""

    def __init__(self, series_uid: str, count: int) -> None:
        self.count = count
        super().__init__(series_uid, f"{count} slice(s), at least 2 are needed to build a volume",
                         "send the whole series (a localiser or a single slice is not a volume)")


class MissingAttributeError(SeriesGeometryError):
    """An instance lacks an attribute that geometry or intensity depends on."""

    def __init__(self, series_uid: str, sop_instance_uid: str, keyword: str) -> None:
        self.sop_instance_uid = sop_instance_uid
        self.keyword = keyword
        super().__init__(series_uid, f"instance {sop_instance_uid} has no {keyword}",
                         "only images with a complete Image Plane module can be used; "
                         "check the scanner's export settings")


class MixedSeriesError(SeriesGeometryError):
    """The instances do not all belong to one series or one frame of reference."""

    def __init__(self, series_uid: str, keyword: str, values: object) -> None:
        self.keyword = keyword
        self.values = values
        super().__init__(series_uid, f"instances disagree on {keyword} ({values})",
                         "pass the instances of exactly one series")


class UnsupportedImageError(SeriesGeometryError):
    """The images are of a kind the volume builder does not read (multi-frame, colour ...)."""

    def __init__(self, series_uid: str, sop_instance_uid: str, problem: str) -> None:
        self.sop_instance_uid = sop_instance_uid
        super().__init__(series_uid, f"instance {sop_instance_uid}: {problem}",
                         "send single-frame greyscale images (e.g. CT Image Storage)")


class MixedOrientationError(SeriesGeometryError):
    """The series holds slices of more than one orientation (e.g. a localiser mixed in)."""

    def __init__(self, series_uid: str, counts: dict[tuple[float, ...], int]) -> None:
        self.counts = counts
        listed = ", ".join(f"{n} slice(s) with {list(o)}" for o, n in counts.items())
        super().__init__(series_uid, f"{len(counts)} different Image Orientation (Patient) values: "
                         f"{listed}",
                         "send one orientation per series (split the series, or drop the "
                         "localiser/reformatted images from it)")


class InconsistentGeometryError(SeriesGeometryError):
    """Slices differ in matrix size or pixel spacing."""

    def __init__(self, series_uid: str, keyword: str, values: object) -> None:
        self.keyword = keyword
        self.values = values
        super().__init__(series_uid, f"slices differ in {keyword} ({values})",
                         "send a series reconstructed with one matrix and field of view")


class GantryTiltError(SeriesGeometryError):
    """Slice positions do not advance along the slice normal (gantry tilt or shear)."""

    def __init__(self, series_uid: str, angle_deg: float, drift_mm: float) -> None:
        self.angle_deg = angle_deg
        self.drift_mm = drift_mm
        super().__init__(series_uid,
                         f"slice positions advance at {angle_deg:.2f} degrees to the slice normal "
                         f"(in-plane drift {drift_mm:.2f} mm across the stack: gantry tilt or a "
                         "sheared stack)",
                         "reconstruct the series without tilt (or with tilt correction) on the "
                         "scanner, or send an axial reformat")


class DuplicatePositionError(SeriesGeometryError):
    """Two different instances occupy the same slice position (several acquisitions)."""

    def __init__(self, series_uid: str, position_mm: float, sop_uids: tuple[str, str],
                 acquisitions: tuple[object, ...]) -> None:
        self.position_mm = position_mm
        self.sop_uids = sop_uids
        self.acquisitions = acquisitions
        super().__init__(series_uid,
                         f"instances {sop_uids[0]} and {sop_uids[1]} both lie at {position_mm:.3f} "
                         f"mm along the slice normal (AcquisitionNumber values {acquisitions})",
                         "the series holds several acquisitions or repeated scans at the same "
                         "positions; send each acquisition as its own series")


class MissingSlicesError(SeriesGeometryError):
    """A gap between neighbouring slices is larger than 1.5 times the median spacing."""

    def __init__(self, series_uid: str, start_mm: float, end_mm: float, median_mm: float) -> None:
        self.start_mm = start_mm
        self.end_mm = end_mm
        self.median_mm = median_mm
        super().__init__(series_uid,
                         f"gap of {end_mm - start_mm:.3f} mm between the slices at {start_mm:.3f} and "
                         f"{end_mm:.3f} mm along the normal, median spacing {median_mm:.3f} mm",
                         "the series looks incomplete: wait for the missing instances (or "
                         "resend the series) before running the pipeline")


class AmbiguousVolumeError(SeriesGeometryError):
    """A multi-frame series holds several volumes and the task's ``volume`` rule does not
    pick exactly one (several stacks, temporal positions, echoes or image types).

    Parameters
    ----------
    series_uid : str
        Series Instance UID.
    dimensions : str
        The dimensions found, in words (``temporal position x2, echo x2``).
    problem : str
        Why no single volume could be chosen.
    """

    def __init__(self, series_uid: str, dimensions: str, problem: str) -> None:
        self.dimensions = dimensions
        super().__init__(series_uid, f"{problem} (dimensions found: {dimensions})",
                         "set the task's volume rule (stack, temporal_position, echo, "
                         "image_type) to choose one volume")


class SelectionRulesError(PipelineError, ValueError):
    """A selection rule set (from the configuration) is invalid.

    Parameters
    ----------
    key : str
        The offending key.
    expected : str
        What the key must hold, in words.
    got : object, optional
        The value found.
    """

    def __init__(self, key: str, expected: str, got: object = None) -> None:
        self.key = key
        self.expected = expected
        self.got = got
        found = f", got {got!r}" if got is not None else ""
        super().__init__(f"selection rules: {key}: expected {expected}{found}")


class WriterError(PipelineError):
    """A result object (SEG, SR, overlay) cannot be written."""


class EmptyResultError(WriterError, ValueError):
    """Every segment is empty: there is nothing to write as SEG, SR or overlay."""

    def __init__(self, series_uid: str, names: tuple[str, ...]) -> None:
        self.series_uid = series_uid
        self.names = names
        super().__init__(f"series {series_uid}: all segments are empty ({', '.join(names) or 'none'}); "
                         "no SEG/SR/overlay is written - record the job as 'nothing found'")


class ExportError(PipelineError, RuntimeError):
    """An optimised artifact (ONNX, TensorRT) could not be built or does not agree
    with PyTorch.

    Parameters
    ----------
    version : str
        The model version.
    artifact : str
        ``onnx``, ``tensorrt`` or ``triton``.
    problem : str
        What went wrong.
    """

    def __init__(self, version: str, artifact: str, problem: str) -> None:
        self.version = version
        self.artifact = artifact
        super().__init__(f"{artifact} artifact of {version}: {problem}")
