"""Label maps on a series' grid: from a DICOM SEG, from an annotation tool's NIfTI, to NIfTI.

Every array here is on the grid of a :class:`~pipelines.types.Volume`: shape
(slices, rows, columns), index ``(k, i, j)`` mapped to LPS mm by ``volume.affine``.
NIfTI files are written in the usual (x, y, z) = (column, row, slice) axis order with a
RAS affine, so annotation tools (3D Slicer, ITK-SNAP) show them in place over the
image and a mask saved back from them is read onto the same grid.

A mask whose grid is not the series' grid (shape, spacing, origin or direction beyond
the tolerance) is refused with :class:`LabelGeometryError`: resampling a reference
label silently would train on a misplaced truth.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation, ornt_transform
from nibabel.spatialimages import SpatialImage

from pipelines.types import Volume
from registry.records import code_for_label
from trainer.errors import TrainingError

LOG = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: (k, i, j) -> (j, i, k): NIfTI's x runs along an image row, z along the slices.
_KIJ_TO_XYZ = (2, 1, 0)


class LabelGeometryError(TrainingError, ValueError):
    """A mask does not lie on the grid of the series it is meant for.

    Parameters
    ----------
    series_uid : str
        The series.
    problem : str
        What differs (shape, spacing, origin, direction), with both values.
    """

    def __init__(self, series_uid: str, problem: str) -> None:
        self.series_uid = series_uid
        self.problem = problem
        super().__init__(f"mask does not match the geometry of series {series_uid}: {problem}")


class LabelContentError(TrainingError, ValueError):
    """A label names no structure the task's model segments, or cannot be decoded."""

    def __init__(self, series_uid: str, problem: str) -> None:
        self.series_uid = series_uid
        self.problem = problem
        super().__init__(f"label of series {series_uid} unusable: {problem}")


def nifti_affine(volume_affine: np.ndarray) -> np.ndarray:
    """RAS affine of the (x, y, z) = (column, row, slice) array of a (k, i, j) LPS grid."""
    a = np.asarray(volume_affine, dtype=np.float64)
    perm = np.eye(4)[:, [*_KIJ_TO_XYZ, 3]]
    return LPS_TO_RAS @ a @ perm


def to_nifti(array: np.ndarray, volume_affine: np.ndarray, *, dtype: type | None = None
             ) -> nib.Nifti1Image:
    """A (slices, rows, columns) array on a volume's grid as a NIfTI-1 image (RAS).

    The caller's array is not modified.
    """
    arr = np.asarray(array)
    data = np.ascontiguousarray(np.transpose(arr, _KIJ_TO_XYZ))
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    img = nib.Nifti1Image(data, nifti_affine(volume_affine))
    img.header.set_xyzt_units("mm")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    return img


def mask_from_nifti(img: nib.spatialimages.SpatialImage, volume: Volume, *,
                    tolerance_mm: float = 0.05) -> np.ndarray:
    """Read a mask onto the series grid, refusing one whose grid differs.

    Any axis order or flip of the same grid is accepted (tools save in their own
    orientation); the voxel centres must coincide within ``tolerance_mm``.

    Parameters
    ----------
    img : nibabel image
        The mask (integer label values; 0 is background).
    volume : Volume
        The series it is meant for.
    tolerance_mm : float
        Largest distance of a voxel corner of the mask grid from the series grid, mm.

    Returns
    -------
    numpy.ndarray
        uint8 label values, shape ``volume.shape``.

    Raises
    ------
    LabelGeometryError
        If shape, spacing, origin or direction differ beyond the tolerance.
    LabelContentError
        If the mask holds values outside 0..255 or non-integers.
    """
    if not tolerance_mm > 0:
        raise ValueError(f"tolerance_mm must be > 0, got {tolerance_mm}")
    uid = volume.series_instance_uid
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise LabelGeometryError(uid, f"the mask has {len(img.shape)} dimensions, expected 3")
    want = nifti_affine(volume.affine)
    want_shape = tuple(volume.shape[a] for a in _KIJ_TO_XYZ)
    try:
        transform = ornt_transform(io_orientation(img.affine), io_orientation(want))
        img = img.as_reoriented(transform)
    except ValueError as exc:
        raise LabelGeometryError(uid, f"its axes cannot be matched to the series' ({exc})") from exc
    if tuple(img.shape) != want_shape:
        raise LabelGeometryError(uid, f"shape {tuple(img.shape)} (x, y, z), the series is "
                                 f"{want_shape} (columns, rows, slices)")
    got = np.asarray(img.affine, dtype=np.float64)
    corners = np.array([[x, y, z, 1.0] for x in (0, want_shape[0] - 1)
                        for y in (0, want_shape[1] - 1) for z in (0, want_shape[2] - 1)])
    off = float(np.abs((corners @ got.T - corners @ want.T)[:, :3]).max())
    if off > tolerance_mm:
        got_sp = np.linalg.norm(got[:3, :3], axis=0)
        want_sp = np.linalg.norm(want[:3, :3], axis=0)
        raise LabelGeometryError(
            uid, f"its grid is up to {off:.2f} mm off the series' (tolerance {tolerance_mm} mm): "
            f"spacing {np.round(got_sp, 3).tolist()} vs {np.round(want_sp, 3).tolist()} mm, "
            f"origin {np.round(got[:3, 3], 2).tolist()} vs {np.round(want[:3, 3], 2).tolist()} "
            "(RAS mm)")
    data = np.asanyarray(img.dataobj)
    if not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(data > 255) \
            or np.any(np.rint(data) != data):
        raise LabelContentError(uid, "mask values must be integers 0..255")
    return np.ascontiguousarray(np.transpose(data.astype(np.uint8), _KIJ_TO_XYZ))


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def match_label_values(names: tuple[str, ...] | list[str], model_labels: Mapping[int, str],
                       codes: tuple[str | None, ...] | None = None) -> dict[int, int]:
    """Map label positions (1-based: segment numbers, mask values) to model label values.

    A name matches a model label by name (case, ``_`` and ``-`` ignored) or by its
    SNOMED CT code; unmatched structures are left out.
    """
    by_name = {_key(n): v for v, n in model_labels.items()}
    by_code = {}
    for v, n in model_labels.items():
        c = code_for_label(n)
        if c is not None:
            by_code[c.value] = v
    out: dict[int, int] = {}
    for pos, name in enumerate(names, start=1):
        value = by_name.get(_key(name))
        if value is None and codes is not None and codes[pos - 1]:
            value = by_code.get(str(codes[pos - 1]))
        if value is not None:
            out[pos] = value
    return out


def mask_from_seg(path: Path, volume: Volume, model_labels: Mapping[int, str]) -> np.ndarray:
    """Decode a DICOM SEG onto the grid of the series it references.

    Frames are matched to the series' images by their source-image references
    (highdicom), or to the frames of a multi-frame source by Referenced Frame Number;
    images without a frame are background. Segments are matched to the
    model's labels by name or SNOMED CT code.

    Returns
    -------
    numpy.ndarray
        uint8 model label values, shape ``volume.shape``.

    Raises
    ------
    LabelContentError
        If no segment names a label of the model, or the SEG's frames cannot be mapped
        onto the series' images.
    """
    uid = volume.series_instance_uid
    seg = hd.seg.segread(str(path))
    numbers, names, codes = [], [], []
    for item in seg.SegmentSequence:
        numbers.append(int(item.SegmentNumber))
        names.append(str(item.get("SegmentLabel", "")))
        prop = item.get("SegmentedPropertyTypeCodeSequence")
        codes.append(str(prop[0].CodeValue) if prop else None)
    mapping = match_label_values(names, model_labels, tuple(codes))
    if not mapping:
        raise LabelContentError(uid, f"its segments {names} name none of the model's labels "
                                f"{sorted(model_labels.values())}")
    wanted = [numbers[p - 1] for p in sorted(mapping)]
    try:
        if volume.source_frame_numbers:  # a multi-frame source: its frames, in slice order
            stack = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=volume.sop_instance_uids[0],
                source_frame_numbers=list(volume.source_frame_numbers), segment_numbers=wanted,
                assert_missing_frames_are_empty=True, skip_overlap_checks=True, dtype=np.uint8)
        else:
            stack = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=list(volume.sop_instance_uids), segment_numbers=wanted,
                assert_missing_frames_are_empty=True, skip_overlap_checks=True, dtype=np.uint8)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LabelContentError(uid, f"its frames cannot be mapped onto the series ({exc})") from exc
    src = np.zeros((stack.shape[0], *volume.shape[1:]), dtype=np.uint8)
    for channel, pos in enumerate(sorted(mapping)):
        src[stack[..., channel] > 0] = mapping[pos]
    if volume.is_source_grid:
        return src
    positions = np.asarray(volume.source_grid_positions)
    nearest = np.abs(positions[None, :] - np.arange(volume.shape[0])[:, None]).argmin(axis=1)
    return np.ascontiguousarray(src[nearest])


def mask_from_file(path: Path, volume: Volume, model_labels: Mapping[int, str],
                   segments: tuple[str, ...]) -> np.ndarray:
    """An imported NIfTI label (mask value n = ``segments[n-1]``) as model label values."""
    img = nib.load(str(path))
    if not isinstance(img, SpatialImage):
        raise LabelContentError(volume.series_instance_uid, f"{path.name} is not a NIfTI image "
                                f"(nibabel reads it as {type(img).__name__})")
    mask = mask_from_nifti(img, volume)
    mapping = match_label_values(segments, model_labels)
    if not mapping:
        raise LabelContentError(volume.series_instance_uid, f"its labels {list(segments)} name "
                                f"none of the model's labels {sorted(model_labels.values())}")
    out = np.zeros_like(mask)
    for pos, value in mapping.items():
        out[mask == pos] = value
    return out
