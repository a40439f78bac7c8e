"""Label map -> one mask per label, connected-component clean-up, volumes in mL.

Each mask is cut to its bounding box (:class:`~pipelines.types.SegmentResult` holds a
crop): the boxes of all labels come from one pass over the label map
(:func:`scipy.ndimage.find_objects`), so 104 labels cost one scan plus their boxes,
never 104 whole-volume masks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from pipelines.types import SegmentResult, Volume

LOG = logging.getLogger(__name__)


def split_labels(label_map: np.ndarray, volume: Volume, labels: Mapping[int, str], *,
                 keep_components: Mapping[str, int] | None = None) -> tuple[SegmentResult, ...]:
    """Turn a label map on the volume's grid into one :class:`SegmentResult` per label.

    Parameters
    ----------
    label_map : numpy.ndarray
        Integer label values, shape ``volume.shape`` (slices, rows, columns). Not modified.
    volume : Volume
        The volume the labels were computed on (its affine gives the voxel volume).
    labels : mapping of int to str
        Label value -> name, background (0) excluded, e.g. ``{1: "spleen"}``.
    keep_components : mapping of str to int, optional
        For the named labels, keep only the N largest connected components (face
        connectivity), e.g. ``{"spleen": 1, "kidney": 2}``. Other labels are kept as
        they are.

    Returns
    -------
    tuple of SegmentResult
        In ascending label value, empty masks included (``volume_ml == 0``).

    Raises
    ------
    ValueError
        If the shapes differ, a label value is < 1, or ``keep_components`` names an
        unknown label or asks for fewer than one component.
    TypeError
        If ``label_map`` is not an integer array.
    """
    if label_map.shape != volume.shape:
        raise ValueError(f"label_map has shape {label_map.shape}, the volume {volume.shape}")
    if not np.issubdtype(label_map.dtype, np.integer) and label_map.dtype != np.bool_:
        raise TypeError(f"label_map must hold integers, got {label_map.dtype}")
    if any(int(v) < 1 for v in labels):
        raise ValueError("labels must not contain the background value 0")
    keep = dict(keep_components or {})
    unknown = set(keep) - set(labels.values())
    if unknown:
        raise ValueError(f"keep_components names labels that are not in labels: {sorted(unknown)}")
    if any(n < 1 for n in keep.values()):
        raise ValueError("keep_components values must be >= 1")
    boxes = ndimage.find_objects(_as_label_image(label_map), max_label=max(labels, default=0))
    out = []
    for value in sorted(labels):
        name = labels[value]
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            out.append(SegmentResult(label=int(value), name=name, volume_ml=0.0,
                                     crop=np.zeros((0, 0, 0), dtype=bool), origin=(0, 0, 0),
                                     grid_shape=volume.shape))
            continue
        crop = label_map[box] == value
        if name in keep:
            crop = largest_components(crop, keep[name])
            if not crop.any():  # cannot happen (the box holds the label), kept for clarity
                continue
            tight = _bounding_box(crop)
            crop = crop[tight]
            box = tuple(slice(b.start + t.start, b.start + t.stop) for b, t in zip(box, tight))
        out.append(SegmentResult(label=int(value), name=name, crop=crop,
                                 origin=tuple(b.start for b in box), grid_shape=volume.shape,
                                 volume_ml=float(np.count_nonzero(crop)) * volume.voxel_volume_ml))
    return tuple(out)


def _as_label_image(label_map: np.ndarray) -> np.ndarray:
    """The label map as an integer type :func:`scipy.ndimage.find_objects` takes (no copy
    for the usual uint8/uint16/int32 maps)."""
    if label_map.dtype == np.bool_:
        return label_map.view(np.uint8)
    if label_map.dtype.kind == "i" and label_map.size and int(label_map.min()) < 0:
        return np.where(label_map < 0, 0, label_map)
    return label_map


def largest_components(mask: np.ndarray, count: int = 1) -> np.ndarray:
    """Keep the ``count`` largest face-connected components of a boolean mask.

    Parameters
    ----------
    mask : numpy.ndarray
        bool array of any dimension. Not modified.
    count : int
        Number of components to keep (>= 1). Ties are broken by label order.

    Returns
    -------
    numpy.ndarray
        A new bool array of the same shape.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    box = _bounding_box(mask)
    labelled, n = ndimage.label(mask[box])
    if n <= count:
        out[box] = mask[box]
        return out
    sizes = np.bincount(labelled.ravel())[1:]
    keep = np.argsort(sizes, kind="stable")[::-1][:count] + 1
    out[box] = np.isin(labelled, keep)
    LOG.debug("kept %d of %d components (%d of %d voxels)", count, n,
              int(sizes[keep - 1].sum()), int(sizes.sum()))
    return out


def mask_volume_ml(mask: np.ndarray, volume: Volume) -> float:
    """Volume of a mask on the volume's grid, mL (voxel count x voxel volume)."""
    if mask.shape != volume.shape:
        raise ValueError(f"mask has shape {mask.shape}, the volume {volume.shape}")
    return float(np.count_nonzero(mask)) * volume.voxel_volume_ml


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)
