"""DICOM series to volume: sort along the slice normal, check geometry, rescale to HU.

A series becomes a :class:`~pipelines.types.Volume` only when its geometry is
unambiguous. Each way a series can go wrong is either handled exactly or refused with a
:class:`~pipelines.errors.SeriesGeometryError` subclass that says what and how to fix:

========================================  ==========================================
found                                     what happens
========================================  ==========================================
slices in any order (arrival, instance)   sorted by position along the slice normal
the same instance twice (re-sent)         kept once
compressed transfer syntax                decoded (pylibjpeg / pyjpegls)
per-slice rescale slope / intercept       applied per slice
flipped or oblique orientation            exact affine from the orientation cosines
uneven spacing (no gap > 1.5x median)     resampled along the normal onto a regular
                                          grid (linear interpolation), source slices
                                          keep their fractional grid position
gap > 1.5x median spacing                 :class:`MissingSlicesError`
two instances at one position             :class:`DuplicatePositionError`
more than one orientation                 :class:`MixedOrientationError`
gantry tilt / sheared stack               :class:`GantryTiltError`
matrix or pixel spacing differs           :class:`InconsistentGeometryError`
several series / frames of reference      :class:`MixedSeriesError`
Enhanced / Legacy Converted multi-frame   frames from the functional groups
                                          (:mod:`pipelines.multiframe`), then as above
several volumes in one multi-frame series the task's ``volume`` rule picks one; else
                                          :class:`AmbiguousVolumeError`
colour, multi-frame without functional    :class:`UnsupportedImageError`
groups, single- and multi-frame mixed
========================================  ==========================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.tag import Tag

from pipelines.errors import (
    DuplicatePositionError,
    EmptySeriesError,
    GantryTiltError,
    InconsistentGeometryError,
    MissingAttributeError,
    MissingSlicesError,
    MixedOrientationError,
    MixedSeriesError,
    SeriesGeometryError,
    TooFewSlicesError,
    UnsupportedImageError,
)
from pipelines.multiframe import VolumeChoice, is_multiframe, volume_views
from pipelines.types import Volume

LOG = logging.getLogger(__name__)

_PIXEL_TAGS = frozenset({Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")})
#: HU written where the image holds Pixel Padding Value (outside the reconstruction).
PADDING_HU = -1000.0


@dataclass(frozen=True, kw_only=True, slots=True)
class GeometryTolerances:
    """How far a series may deviate from an ideal stack before it is refused or resampled.

    Parameters
    ----------
    orientation : float
        Largest difference of any direction cosine between slices that still counts
        as the same orientation (1e-3 is about 0.06 degrees).
    pixel_spacing_mm : float
        Largest difference in Pixel Spacing between slices, mm.
    duplicate_mm : float
        Slices closer than this along the normal occupy the same position, mm.
    tilt_fraction_of_pixel : float
        Largest in-plane drift of a slice position relative to the first slice,
        as a fraction of the smaller pixel spacing (beyond it: gantry tilt).
    gap_factor : float
        A gap larger than ``gap_factor`` times the median spacing means missing slices.
    uneven_fraction_of_spacing : float
        Largest distance of a slice from the regular grid (first to last slice), as a
        fraction of the mean spacing, below which the stack is used as it is; above it
        the stack is resampled.
    """

    orientation: float = 1e-3
    pixel_spacing_mm: float = 1e-3
    duplicate_mm: float = 1e-2
    tilt_fraction_of_pixel: float = 0.25
    gap_factor: float = 1.5
    uneven_fraction_of_spacing: float = 0.05

    def __post_init__(self) -> None:
        for name in ("orientation", "pixel_spacing_mm", "duplicate_mm", "tilt_fraction_of_pixel",
                     "uneven_fraction_of_spacing"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.gap_factor > 1:
            raise ValueError(f"gap_factor must be > 1, got {self.gap_factor}")


def load_series(items: Iterable[Dataset | str | os.PathLike[str]], *,
                tolerances: GeometryTolerances | None = None,
                volume: VolumeChoice | None = None) -> Volume:
    """Build a volume in HU from the images of one series (single- or multi-frame).

    Parameters
    ----------
    items : iterable of pydicom.dataset.Dataset or path
        The instances of one series, in any order. Data sets are not modified.
    tolerances : GeometryTolerances, optional
        Geometry tolerances; the defaults suit CT.
    volume : VolumeChoice, optional
        Which volume of a multi-frame series (stack, temporal position, echo, image
        type); default: the first temporal position and echo, ORIGINAL magnitude.
        Ignored for single-frame series.

    Returns
    -------
    Volume
        ``array`` float32 HU (slices, rows, columns), read-only; ``affine`` from voxel
        index (k, i, j) to LPS mm; source headers sorted along the slice normal (for a
        multi-frame image: its header once per frame, with ``source_frame_numbers``).

    Raises
    ------
    SeriesGeometryError
        One of its subclasses when the series cannot be stacked without risk of
        misalignment (see the module docstring for the list).
    """
    tol = tolerances or GeometryTolerances()
    datasets = [it if isinstance(it, Dataset) else pydicom.dcmread(os.fspath(it)) for it in items]
    if not datasets:
        raise EmptySeriesError()
    series_uid = str(datasets[0].get("SeriesInstanceUID", ""))
    datasets = _unique_instances(datasets, series_uid)
    _check_uids(datasets, series_uid)
    if any(is_multiframe(ds) for ds in datasets):
        owners, views = _multiframe_views(datasets, series_uid, volume or VolumeChoice())
    else:
        _check_images(datasets, series_uid)
        owners, views = datasets, datasets
    if len(views) < 2:
        raise TooFewSlicesError(series_uid, len(views))
    row_dir, col_dir, normal = _orientation(views, series_uid, tol)
    rows, cols, spacing_rc = _matrix(views, series_uid, tol)

    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in views])
    offsets = positions @ normal
    order = np.argsort(offsets, kind="stable")
    views, owners = [views[i] for i in order], [owners[i] for i in order]
    positions, offsets = positions[order], offsets[order]
    median = _check_stacking(views, positions, offsets, normal, spacing_rc, series_uid, tol)

    hu = _read_pixels(owners, views, rows, cols, series_uid)
    hu, step, grid_positions = _regular_grid(hu, offsets, median, series_uid, tol)
    affine = np.eye(4)
    affine[:3, 0] = normal * step
    affine[:3, 1] = col_dir * spacing_rc[0]
    affine[:3, 2] = row_dir * spacing_rc[1]
    affine[:3, 3] = positions[0]
    hu.flags.writeable = False
    first = owners[0]
    headers = {str(ds.SOPInstanceUID): _header(ds) for ds in owners if is_multiframe(ds)}
    return Volume(array=hu, affine=affine,
                  frame_of_reference_uid=str(first.FrameOfReferenceUID),
                  study_instance_uid=str(first.StudyInstanceUID),
                  series_instance_uid=series_uid,
                  source_images=tuple(headers.get(str(ds.SOPInstanceUID)) or _header(ds)
                                      for ds in owners),
                  source_grid_positions=grid_positions,
                  source_frame_numbers=tuple(int(v.ReferencedFrameNumber) for v in views)
                  if headers else ())


def _multiframe_views(datasets: list[Dataset], series_uid: str, choice: VolumeChoice
                      ) -> tuple[list[Dataset], list[Dataset]]:
    """(owning instance, frame view) of each frame of the chosen volume.

    Raises
    ------
    UnsupportedImageError
        Single- and multi-frame images mixed, colour, no pixel data, or the volume's
        frames spread over several instances (a SEG can reference one multi-frame
        source only).
    AmbiguousVolumeError
        If the frames do not make one volume under ``choice``.
    """
    single = [ds for ds in datasets if not is_multiframe(ds)]
    if single:
        raise UnsupportedImageError(series_uid, str(single[0].SOPInstanceUID),
                                    "single-frame and multi-frame images in one series")
    for ds in datasets:
        _check_pixels(ds, series_uid)
    pairs = volume_views(datasets, choice, series_uid)
    owners = {str(ds.SOPInstanceUID) for ds, _ in pairs}
    if len(owners) > 1:
        raise UnsupportedImageError(series_uid, sorted(owners)[0],
                                    f"the volume's frames lie in {len(owners)} multi-frame "
                                    "instances; one multi-frame instance per volume is read")
    views = [view for _, view in pairs]
    for view in views:
        _check_geometry_keywords(view, series_uid)
    return [ds for ds, _ in pairs], views


def _check_stacking(datasets: list[Dataset], positions: np.ndarray, offsets: np.ndarray,
                    normal: np.ndarray, spacing_rc: tuple[float, float], series_uid: str,
                    tol: GeometryTolerances) -> float:
    """Refuse duplicate positions, a gantry tilt and missing slices (slices sorted along
    the normal); returns the median slice spacing, mm.

    Raises
    ------
    DuplicatePositionError, GantryTiltError, MissingSlicesError
    """
    gaps = np.diff(offsets)
    dup = np.flatnonzero(gaps < tol.duplicate_mm)
    if dup.size:
        a, b = datasets[dup[0]], datasets[dup[0] + 1]
        raise DuplicatePositionError(series_uid, float(offsets[dup[0]]),
                                     (str(a.SOPInstanceUID), str(b.SOPInstanceUID)),
                                     (a.get("AcquisitionNumber"), b.get("AcquisitionNumber")))
    lateral = (positions - positions[0]) - np.outer(offsets - offsets[0], normal)
    drift = float(np.linalg.norm(lateral, axis=1).max())
    if drift > tol.tilt_fraction_of_pixel * min(spacing_rc):
        end = float(np.linalg.norm(lateral[-1]))
        angle = float(np.degrees(np.arctan2(end, offsets[-1] - offsets[0])))
        raise GantryTiltError(series_uid, angle, drift)
    median = float(np.median(gaps))
    big = np.flatnonzero(gaps > tol.gap_factor * median)
    if big.size:
        k = int(big[0])
        raise MissingSlicesError(series_uid, float(offsets[k]), float(offsets[k + 1]), median)
    return median


def _regular_grid(hu: np.ndarray, offsets: np.ndarray, median: float, series_uid: str,
                  tol: GeometryTolerances) -> tuple[np.ndarray, float, tuple[float, ...]]:
    """The slices on a regular grid along the normal: as they are when their spacing is
    even, else resampled; returns the array, its step (mm) and each source slice's
    position on the grid."""
    mean = float(offsets[-1] - offsets[0]) / (len(offsets) - 1)
    deviation = float(np.abs(offsets - (offsets[0] + mean * np.arange(len(offsets)))).max())
    if deviation <= tol.uneven_fraction_of_spacing * mean:
        return hu, mean, tuple(float(k) for k in range(len(offsets)))
    # a step close to the median that fits first to last slice exactly
    step = float(offsets[-1] - offsets[0]) / max(1, round((offsets[-1] - offsets[0]) / median))
    LOG.info("series %s: uneven slice spacing (up to %.3f mm off a regular grid); resampling "
             "onto %.3f mm along the normal", series_uid, deviation, step)
    hu, grid_positions = _resample_along_normal(hu, offsets, step)
    return hu, step, grid_positions


def to_source_slices(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """Map a mask on the volume's grid to the source slices (nearest grid slice).

    Parameters
    ----------
    volume : Volume
        The volume the mask was computed on.
    mask : numpy.ndarray
        Array of shape ``volume.shape``.

    Returns
    -------
    numpy.ndarray
        Shape (number of source images, rows, columns), slice ``n`` belongs to
        ``volume.source_images[n]``. The input itself when the grid is the source
        slices (never a modified copy of it).

    Raises
    ------
    ValueError
        If ``mask`` does not have the volume's shape.
    """
    if mask.shape != volume.shape:
        raise ValueError(f"mask has shape {mask.shape}, the volume {volume.shape}")
    if volume.is_source_grid:
        return mask
    return mask[volume.source_grid_slices()]


def _unique_instances(datasets: list[Dataset], series_uid: str) -> list[Dataset]:
    seen: dict[str, Dataset] = {}
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            raise MissingAttributeError(series_uid, "(unknown)", "SOPInstanceUID")
        if uid in seen:
            LOG.debug("series %s: instance %s given twice, keeping one", series_uid, uid)
            continue
        seen[uid] = ds
    return list(seen.values())


def _check_uids(datasets: list[Dataset], series_uid: str) -> None:
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in datasets}
        if "" in values:
            bad = next(ds for ds in datasets if not ds.get(keyword, ""))
            raise MissingAttributeError(series_uid, str(bad.SOPInstanceUID), keyword)
        if len(values) > 1:
            raise MixedSeriesError(series_uid, keyword, sorted(values))


def _check_images(datasets: list[Dataset], series_uid: str) -> None:
    """Single-frame, grey, with geometry and pixels."""
    for ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise UnsupportedImageError(series_uid, str(ds.SOPInstanceUID), f"multi-frame image "
                                        f"({ds.NumberOfFrames} frames) without functional groups "
                                        "is not supported")
        _check_pixels(ds, series_uid)
        _check_geometry_keywords(ds, series_uid)


def _check_pixels(ds: Dataset, series_uid: str) -> None:
    uid = str(ds.SOPInstanceUID)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedImageError(series_uid, uid, "colour image (SamplesPerPixel "
                                    f"{ds.SamplesPerPixel}) is not supported")
    for keyword in ("Rows", "Columns", "PixelData"):
        if keyword not in ds or ds[keyword].value in (None, "", b""):
            raise MissingAttributeError(series_uid, uid, keyword)


def _check_geometry_keywords(ds: Dataset, series_uid: str) -> None:
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds or ds[keyword].value in (None, "", b""):
            frame = ds.get("ReferencedFrameNumber")
            where = f" (frame {frame})" if frame is not None else ""
            raise MissingAttributeError(series_uid, f"{ds.SOPInstanceUID}{where}", keyword)


def _orientation(datasets: list[Dataset], series_uid: str, tol: GeometryTolerances
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if iops.shape[1] != 6:
        raise MissingAttributeError(series_uid, str(datasets[0].SOPInstanceUID),
                                    "ImageOrientationPatient (6 values)")
    if np.abs(iops - iops[0]).max() > tol.orientation:
        groups: list[np.ndarray] = []
        counts: dict[tuple[float, ...], int] = {}
        for v in iops:
            for g in groups:
                if np.abs(v - g).max() <= tol.orientation:
                    break
            else:
                groups.append(v)
                g = v
            key = tuple(round(float(x), 4) for x in g)
            counts[key] = counts.get(key, 0) + 1
        raise MixedOrientationError(series_uid, counts)
    mean = iops.mean(axis=0)
    row, col = mean[:3], mean[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if abs(nr - 1) > 1e-2 or abs(nc - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise SeriesGeometryError(series_uid, f"Image Orientation (Patient) {list(mean)} is not two "
                                  "orthogonal unit vectors", "fix the images' orientation header")
    row = row / nr
    col = col - (col @ row) * row  # remove the rounding error of the written cosines
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _matrix(datasets: list[Dataset], series_uid: str, tol: GeometryTolerances
            ) -> tuple[int, int, tuple[float, float]]:
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise InconsistentGeometryError(series_uid, "Rows/Columns", sorted(sizes))
    spacings = np.array([[float(v) for v in ds.PixelSpacing] for ds in datasets])
    if np.abs(spacings - spacings[0]).max() > tol.pixel_spacing_mm:
        raise InconsistentGeometryError(series_uid, "PixelSpacing",
                                        sorted({tuple(s) for s in spacings.tolist()}))
    if spacings.min() <= 0:
        raise InconsistentGeometryError(series_uid, "PixelSpacing", spacings[0].tolist())
    rows, cols = next(iter(sizes))
    return rows, cols, (float(spacings[0, 0]), float(spacings[0, 1]))


def _read_pixels(owners: list[Dataset], views: list[Dataset], rows: int, cols: int,
                 series_uid: str) -> np.ndarray:
    """HU of each slice (``views[k]`` of instance ``owners[k]``), decoded one frame at a time.

    Decoded with pydicom.pixels.pixel_array, not ds.pixel_array: the latter caches the
    decoded array on each data set (another 2 bytes per voxel held by the caller's data
    sets for as long as they live), and modifies them. A frame of a multi-frame image
    is decoded alone (``index``), never the whole image; its rescale is the frame's
    Pixel Value Transformation (carried by its view).
    """
    out = np.empty((len(views), rows, cols), dtype=np.float32)
    for k, (ds, view) in enumerate(zip(owners, views, strict=True)):
        frame = view.get("ReferencedFrameNumber") if view is not ds else None
        try:
            stored = pixel_array(ds) if frame is None else pixel_array(ds, index=int(frame) - 1)
        except Exception as exc:  # decoder missing or corrupt data: say which instance
            raise UnsupportedImageError(series_uid, str(ds.SOPInstanceUID),
                                        f"pixel data cannot be decoded "
                                        f"({ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}"
                                        ) from exc
        if stored.shape != (rows, cols):
            raise UnsupportedImageError(series_uid, str(ds.SOPInstanceUID),
                                        f"decoded pixels have shape {stored.shape}")
        if frame is None:
            out[k] = apply_modality_lut(stored, ds)
        else:
            np.multiply(stored, float(view.RescaleSlope), out=out[k], casting="unsafe")
            out[k] += float(view.RescaleIntercept)
        pad = ds.get("PixelPaddingValue")
        if pad is not None:
            limit = ds.get("PixelPaddingRangeLimit", pad)
            lo, hi = min(pad, limit), max(pad, limit)
            out[k][(stored >= lo) & (stored <= hi)] = PADDING_HU
    return out


def _resample_along_normal(hu: np.ndarray, offsets: np.ndarray, step: float
                           ) -> tuple[np.ndarray, tuple[float, ...]]:
    """Linear interpolation along axis 0 onto ``offsets[0] + k * step`` (mm)."""
    n = int(round((offsets[-1] - offsets[0]) / step)) + 1
    target = np.minimum(offsets[0] + step * np.arange(n), offsets[-1])
    upper = np.clip(np.searchsorted(offsets, target, side="right"), 1, len(offsets) - 1)
    lower = upper - 1
    w = ((target - offsets[lower]) / (offsets[upper] - offsets[lower])).astype(np.float32)
    out = np.empty((n, *hu.shape[1:]), dtype=np.float32)
    for k in range(n):  # slice by slice: no (n, rows, cols) temporaries
        np.multiply(hu[lower[k]], 1.0 - w[k], out=out[k])
        out[k] += w[k] * hu[upper[k]]
    return out, tuple(float(p) for p in (offsets - offsets[0]) / step)


def _header(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` without pixel data (elements are shared, not copied)."""
    hdr = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            hdr.add(elem)
    if hasattr(ds, "file_meta"):
        hdr.file_meta = ds.file_meta
    return hdr
