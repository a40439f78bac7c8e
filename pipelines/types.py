"""Value objects shared by the pipeline steps (volume -> infer -> post-process -> write).

Arrays inside value objects are treated as read-only: no step mutates an array it was
given, and :func:`pipelines.volume.load_series` hands out a non-writeable ``array``.
Classes that hold arrays compare by identity (``eq=False``): comparing voxel data
element-wise is never what a caller wants from ``==``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
from pydicom.dataset import Dataset

from pipelines.uids import is_valid_uid, stable_uid

LOG = logging.getLogger(__name__)

#: Manufacturer written into every object the node creates (SEG, SR, overlay) and into
#: their Contributing Equipment Sequence. :func:`pipelines.selection.is_node_output`
#: recognises it, so the node never infers on its own results (DESIGN decision 4).
NODE_MANUFACTURER = "DICOM-NODE AI"
#: Manufacturer's Model Name written with :data:`NODE_MANUFACTURER`.
NODE_MODEL_NAME = "dicom-node"
#: Device Serial Number (type 1 in SEG); one value per installation is not tracked here.
NODE_DEVICE_SERIAL = "0"

try:
    NODE_SOFTWARE_VERSION = metadata.version("dicom-node")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    NODE_SOFTWARE_VERSION = "0+unknown"

#: Segmentation types the SEG writer offers (``WriterOptions.seg_type``).
SEG_TYPES = ("binary", "labelmap")

#: Warning burned into every overlay image.
OVERLAY_BANNER = "AI RESULT - NOT FOR DIAGNOSIS"


def _lo(name: str, value: str, *, required: bool = True) -> str:
    """Check a value that goes into a DICOM LO element (64 characters, no backslash)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{name} must not be empty")
    if len(value) > 64 or "\\" in value:
        raise ValueError(f"{name} must be at most 64 characters without backslash, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Volume:
    """A CT series on a regular grid, in Hounsfield units.

    Parameters
    ----------
    array : numpy.ndarray
        float32 HU values, shape (slices, rows, columns).
    affine : numpy.ndarray
        4x4 float64 matrix mapping a voxel index ``(k, i, j, 1)`` (slice, row, column)
        to patient coordinates ``(x, y, z, 1)`` in LPS, mm. Its columns are the slice
        step (along the slice normal), the row step (along the image column direction)
        and the column step (along the image row direction), each scaled by the
        spacing in mm.
    frame_of_reference_uid, study_instance_uid, series_instance_uid : str
        Identity of the source series.
    source_images : tuple of pydicom.dataset.Dataset
        Headers (no pixel data) of the source slices, sorted along the slice normal
        (ascending position along ``cross(row direction, column direction)``).
    source_grid_positions : tuple of float
        For each source image, its slice index ``k`` on this grid (fractional when
        the series was resampled onto a regular grid). ``0, 1, 2, ...`` when the grid
        is the source slices themselves.
    source_frame_numbers : tuple of int, optional
        For a volume read from a multi-frame image: for each source image (the same
        multi-frame header repeated), the number (1-based) of its frame. Empty for
        single-frame sources.

    Raises
    ------
    ValueError
        If the shapes, the affine or the UIDs are invalid.
    TypeError
        If ``array`` is not a float32 numpy array.
    """

    array: np.ndarray
    affine: np.ndarray
    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    source_images: tuple[Dataset, ...]
    source_grid_positions: tuple[float, ...]
    source_frame_numbers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.array, np.ndarray) or self.array.dtype != np.float32:
            raise TypeError("array must be a float32 numpy array")
        if self.array.ndim != 3 or min(self.array.shape) < 1:
            raise ValueError(f"array must be 3-D (slices, rows, columns), got {self.array.shape}")
        aff = np.asarray(self.affine)
        if aff.shape != (4, 4) or not np.allclose(aff[3], (0, 0, 0, 1)) or not np.all(np.isfinite(aff)):
            raise ValueError("affine must be a finite 4x4 matrix with last row (0, 0, 0, 1)")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise ValueError("affine must be invertible")
        for name in ("frame_of_reference_uid", "study_instance_uid", "series_instance_uid"):
            if not is_valid_uid(getattr(self, name)):
                raise ValueError(f"{name} is not a valid UID: {getattr(self, name)!r}")
        if len(self.source_images) != len(self.source_grid_positions) or not self.source_images:
            raise ValueError("source_images and source_grid_positions must have the same, "
                             "non-zero length")
        n = self.array.shape[0]
        if any(not (-0.5 <= p <= n - 0.5) for p in self.source_grid_positions):
            raise ValueError("source_grid_positions must lie on the grid (0 .. slices-1)")
        for ds in self.source_instances:
            if (int(ds.Rows), int(ds.Columns)) != self.array.shape[1:]:
                raise ValueError("source image matrix does not match the array's rows/columns")
        if self.source_frame_numbers:
            if len(self.source_frame_numbers) != len(self.source_images):
                raise ValueError("source_frame_numbers must have one frame per source image")
            if any(not 1 <= int(f) <= int(ds.get("NumberOfFrames", 1) or 1) for f, ds in
                   zip(self.source_frame_numbers, self.source_images, strict=True)):
                raise ValueError("source_frame_numbers must be frames of their source images")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        s = self.array.shape
        return (s[0], s[1], s[2])

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along (slice, row, column) index axes, mm."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel, mL (1 mL = 1000 mm^3)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit vector (LPS) of increasing slice index."""
        v = self.affine[:3, 0]
        return v / np.linalg.norm(v)

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """SOP Instance UIDs of the source images, in slice order."""
        return tuple(str(ds.SOPInstanceUID) for ds in self.source_images)

    @property
    def source_instances(self) -> tuple[Dataset, ...]:
        """The distinct source instances (headers), in slice order of their first frame."""
        seen: dict[str, Dataset] = {}
        for ds in self.source_images:
            seen.setdefault(str(ds.SOPInstanceUID), ds)
        return tuple(seen.values())

    def source_frame(self, n: int) -> int | None:
        """Frame number of source image ``n`` in its instance; ``None`` when single-frame."""
        return int(self.source_frame_numbers[n]) if self.source_frame_numbers else None

    @property
    def is_source_grid(self) -> bool:
        """``True`` when grid slice ``k`` is source image ``k`` (no resampling)."""
        return (len(self.source_grid_positions) == self.array.shape[0]
                and all(abs(p - k) < 1e-6 for k, p in enumerate(self.source_grid_positions)))

    def source_grid_slices(self) -> np.ndarray:
        """For each source image, the index of its nearest grid slice (intp array)."""
        return np.clip(np.rint(np.asarray(self.source_grid_positions)), 0,
                       self.array.shape[0] - 1).astype(np.intp)

    def index_to_lps(self, index: np.ndarray) -> np.ndarray:
        """Map voxel indices (..., 3) as (k, i, j) to LPS coordinates (..., 3), mm."""
        idx = np.asarray(index, dtype=np.float64)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map LPS points (..., 3), mm, to fractional voxel indices (..., 3) as (k, i, j)."""
        pts = np.asarray(points, dtype=np.float64) - self.affine[:3, 3]
        return pts @ np.linalg.inv(self.affine[:3, :3]).T


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelInfo:
    """The model that produced a result, as written into SEG, SR and overlay.

    Parameters
    ----------
    name : str
        Model name (e.g. the MONAI bundle name), at most 64 characters.
    version : str
        Model version (the bundle's ``metadata.json`` version), at most 64 characters.
    backend : str, optional
        Inference backend that ran it (``tensorrt``, ``onnxruntime-cuda``, ``torch-cpu``),
        recorded as an algorithm parameter (DESIGN decision 9).
    source : str, optional
        Where the model comes from (e.g. ``MONAI Model Zoo``), at most 64 characters.
    task : str, optional
        The task the model serves (``spleen-ct``); written as Manufacturer's Model Name
        of the algorithm in the Contributing Equipment Sequence (IHE AIR). Defaults to
        ``name``.
    device_uid : str, optional
        Device UID of this model version, from the registry (a new version has a new
        one); written into the Contributing Equipment Sequence and as the SR's device
        observer UID. When empty, a UID derived from ``name`` and ``version`` is used.

    Raises
    ------
    ValueError
        If a value does not fit its DICOM element or ``device_uid`` is not a UID.
    """

    name: str
    version: str
    backend: str = ""
    source: str = ""
    task: str = ""
    device_uid: str = ""

    def __post_init__(self) -> None:
        _lo("name", self.name)
        _lo("version", self.version)
        _lo("backend", self.backend, required=False)
        _lo("source", self.source, required=False)
        _lo("task", self.task, required=False)
        if self.device_uid and not is_valid_uid(self.device_uid):
            raise ValueError(f"device_uid must be a DICOM UID, got {self.device_uid!r}")

    @property
    def model_name(self) -> str:
        """Manufacturer's Model Name of the algorithm: the task, else the model name."""
        return self.task or self.name

    @property
    def algorithm_device_uid(self) -> str:
        """The registry's Device UID, or one derived from name and version."""
        return self.device_uid or str(stable_uid("model-version", self.name, self.version))


@dataclass(frozen=True, kw_only=True, slots=True, eq=False, init=False)
class SegmentResult:
    """One segmented structure on a volume's grid, held as a bounding-box crop.

    Memory is proportional to the structure's bounding box, not to the volume: 104
    whole-volume masks of a 512 x 512 x 300 CT would be 8 GB of bool, their crops
    are a few hundred MB at most (they are disjoint when they come from a label map).

    Parameters
    ----------
    label : int
        Label value in the model's output (1 .. 65535); becomes the segment's identity.
    name : str
        Label name (``spleen``); mapped to SNOMED CT by :mod:`pipelines.codes`.
    mask : numpy.ndarray, optional
        bool array of the whole grid, shape (slices, rows, columns). Kept as it is
        (no copy); give either ``mask`` or ``crop`` with ``origin`` and ``grid_shape``.
    crop : numpy.ndarray, optional
        bool array of the bounding box whose first voxel is ``origin``.
    origin : tuple of int, optional
        Grid index (k, i, j) of ``crop[0, 0, 0]``.
    grid_shape : tuple of int, optional
        Shape of the whole grid, (slices, rows, columns).
    volume_ml : float
        Volume of the mask, mL.

    Raises
    ------
    TypeError
        If the mask or crop is not a boolean 3-D array.
    ValueError
        If ``label`` or ``volume_ml`` is out of range, ``name`` is empty, or the crop
        does not lie inside the grid.
    """

    label: int
    name: str
    crop: np.ndarray
    origin: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    volume_ml: float

    def __init__(self, *, label: int, name: str, volume_ml: float, mask: np.ndarray | None = None,
                 crop: np.ndarray | None = None, origin: tuple[int, int, int] | None = None,
                 grid_shape: tuple[int, int, int] | None = None) -> None:
        if (mask is None) == (crop is None):
            raise ValueError("give either mask (the whole grid) or crop with origin and grid_shape")
        if mask is not None:
            crop, origin, grid_shape = mask, (0, 0, 0), tuple(np.shape(mask))  # type: ignore[assignment]
        elif origin is None or grid_shape is None:
            raise ValueError("crop needs origin and grid_shape")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise TypeError(f"label must be an int, got {type(label).__name__}")
        if not 1 <= int(label) <= 65535:
            raise ValueError(f"label must be in 1..65535, got {label}")
        _lo("name", name)
        if not isinstance(crop, np.ndarray) or crop.dtype != np.bool_ or crop.ndim != 3:
            raise TypeError("mask must be a 3-D numpy array of dtype bool")
        origin = tuple(int(o) for o in origin)  # type: ignore[assignment]
        grid_shape = tuple(int(g) for g in grid_shape)  # type: ignore[assignment]
        if len(origin) != 3 or len(grid_shape) != 3 or any(
                o < 0 or o + c > g for o, c, g in zip(origin, crop.shape, grid_shape, strict=True)):
            raise ValueError(f"crop {crop.shape} at {origin} does not lie inside the grid {grid_shape}")
        if not math.isfinite(volume_ml) or volume_ml < 0:
            raise ValueError(f"volume_ml must be finite and >= 0, got {volume_ml}")
        for key, value in (("label", int(label)), ("name", name), ("crop", crop), ("origin", origin),
                           ("grid_shape", grid_shape), ("volume_ml", volume_ml)):
            object.__setattr__(self, key, value)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the whole grid (slices, rows, columns)."""
        return self.grid_shape

    @property
    def box(self) -> tuple[slice, slice, slice]:
        """Where the crop lies on the grid (index slices along k, i, j)."""
        o, c = self.origin, self.crop.shape
        return (slice(o[0], o[0] + c[0]), slice(o[1], o[1] + c[1]), slice(o[2], o[2] + c[2]))

    @property
    def mask(self) -> np.ndarray:
        """The mask on the whole grid (bool, ``grid_shape``).

        Allocates a whole-grid array unless the crop is the whole grid; the writers
        use :attr:`crop` and :attr:`box` instead.
        """
        if self.crop.shape == self.grid_shape:
            return self.crop
        full = np.zeros(self.grid_shape, dtype=bool)
        full[self.box] = self.crop
        return full

    @property
    def is_empty(self) -> bool:
        """``True`` when no voxel is set."""
        return not bool(self.crop.any())

    def present_slices(self) -> np.ndarray:
        """bool per grid slice (``grid_shape[0]``): whether the segment has a voxel there."""
        out = np.zeros(self.grid_shape[0], dtype=bool)
        out[self.box[0]] = self.crop.any(axis=(1, 2))
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class WriterOptions:
    """How result objects are labelled (series numbers, descriptions, overlay look).

    Parameters
    ----------
    seg_series_number, sr_series_number, overlay_series_number, rtstruct_series_number : int
        Series Number of each new result series (1 .. 2**31-1).
    series_description_prefix : str
        Prefix of each result's Series Description (``AI`` -> ``AI SEG spleen_ct``).
    procedure_code : tuple of str or None
        (code value, coding scheme designator, code meaning) of the imaging procedure
        reported in the SR; ``None`` (default) derives it from the source images
        (:func:`pipelines.codes.procedure_reported`).
    window_center, window_width : float
        Grey window of the overlay images, HU.
    contour_width_px : int
        Width of the burned-in contours, 1 or 2 pixels (of the source matrix).
    min_overlay_width_px : int
        Overlay images narrower than this are enlarged by an integer factor so that
        the banner stays legible.
    write_overlay : bool
        Whether to create the overlay series (configurable per destination).
    seg_type : str
        ``binary`` (default: Segmentation Storage, every PACS and viewer takes it) or
        ``labelmap`` (Label Map Segmentation Storage: one frame per slice, much
        smaller with many labels; only for destinations that accept that SOP class).
    """

    seg_series_number: int = 9001
    sr_series_number: int = 9002
    overlay_series_number: int = 9003
    rtstruct_series_number: int = 9004
    series_description_prefix: str = "AI"
    procedure_code: tuple[str, str, str] | None = None
    window_center: float = 40.0
    window_width: float = 400.0
    contour_width_px: int = 1
    min_overlay_width_px: int = 256
    write_overlay: bool = True
    seg_type: str = "binary"

    def __post_init__(self) -> None:
        if self.seg_type not in SEG_TYPES:
            raise ValueError(f"seg_type must be one of {', '.join(SEG_TYPES)}, got {self.seg_type!r}")
        for name in ("seg_series_number", "sr_series_number", "overlay_series_number",
                     "rtstruct_series_number"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 1 <= v <= 2**31 - 1:
                raise ValueError(f"{name} must be an int in 1..2**31-1, got {v!r}")
        if self.procedure_code is not None and (len(self.procedure_code) != 3 or not all(
                isinstance(p, str) and p for p in self.procedure_code)):
            raise ValueError("procedure_code must be (value, scheme designator, meaning), all non-empty")
        if not self.window_width > 0:
            raise ValueError(f"window_width must be > 0 HU, got {self.window_width}")
        if self.contour_width_px not in (1, 2):
            raise ValueError(f"contour_width_px must be 1 or 2, got {self.contour_width_px}")
        if not 1 <= self.min_overlay_width_px <= 4096:
            raise ValueError(f"min_overlay_width_px must be in 1..4096, got {self.min_overlay_width_px}")
        _lo("series_description_prefix", self.series_description_prefix, required=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class ResultDatasets:
    """The DICOM objects of one result: a SEG, its SR and an optional overlay series.

    All share the source study; each is its own new series.
    """

    seg: Dataset
    sr: Dataset
    overlay: tuple[Dataset, ...] = field(default_factory=tuple)

    def all(self) -> tuple[Dataset, ...]:
        """Every data set, SEG first, then SR, then the overlay images."""
        return (self.seg, self.sr, *self.overlay)

