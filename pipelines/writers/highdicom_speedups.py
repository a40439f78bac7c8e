"""The one place that reaches into highdicom's internals, to write many segments fast.

Two parts, each writing exactly what highdicom's own constructor writes (the tests
build the same objects both ways and compare every attribute):

* :func:`comprehensive_3d_sr` - the SR document around a TID 1500 content tree.
  highdicom 0.28's :class:`highdicom.sr.Comprehensive3DSR` constructor deep-copies the
  whole content tree, re-types every item of the copy
  (``ContentItem._from_dataset_derived``) and walks the tree again to check that every
  referenced instance is in the evidence (``collect_evidence``). With 104 segments the
  tree holds some 4,000 image references (each segment's source images) and those
  three passes were three quarters of the SR's time. Here the document is built on the
  tree's root alone (same concept name, template and continuity, no children), which
  gives every attribute the constructor writes, including the evidence sequences (made
  from ``evidence``, not from the tree); then the real children are put in place
  (``ContentSequence``, public pydicom) and what
  :attr:`~highdicom.sr.Comprehensive3DSR.content` returns is set (the private
  ``_content``, as the constructor sets it: a root
  :class:`~highdicom.sr.ContentSequence` of the tree's root item; the tree is the
  caller's, already typed, so there is nothing to copy). The evidence check is kept,
  as a plain walk of the tree.
* :func:`segmentation` - a BINARY SEG from a label map. highdicom 0.28 writes a
  BINARY SEG segment by segment, and for each segment compares every plane with its
  number and tests the result for emptiness
  (``Segmentation._get_segment_pixel_array`` and ``np.any`` in
  ``_init_multiframe_image``): 104 segments x 300 planes of 512 x 512, most of them
  absent from most planes. Here ``_get_segment_pixel_array`` is overridden in a
  subclass used for the construction only: for a segment absent from a plane it
  returns an empty plane without comparing (the labels of each plane are read once),
  which highdicom then leaves out as before. The object returned is a plain
  :class:`highdicom.seg.Segmentation`.

One switch: the ``fast`` argument, default :data:`FAST` (highdicom is one of
:data:`TESTED_VERSIONS`, which ``pyproject.toml`` allows); with ``fast=False`` the
plain constructors run. ``tests/test_many_segments_writers.py`` writes the same
objects both ways and compares them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

#: highdicom versions the fast mode was tested with.
TESTED_VERSIONS = ("0.28.",)
#: Whether :func:`comprehensive_3d_sr` takes the fast path by default.
FAST = hd.__version__.startswith(TESTED_VERSIONS)


def comprehensive_3d_sr(*, evidence: Sequence[Dataset], content: hd.sr.MeasurementReport,
                        fast: bool | None = None, **kwargs: Any) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR of ``content``, as ``hd.sr.Comprehensive3DSR(...)`` writes it.

    Parameters
    ----------
    evidence : sequence of pydicom.dataset.Dataset
        The instances the tree references (and any other evidence).
    content : highdicom.sr.MeasurementReport
        The content tree; in the fast mode it becomes part of the document (not copied).
    fast : bool, optional
        The fast mode (default :data:`FAST`).
    **kwargs
        The other arguments of :class:`highdicom.sr.Comprehensive3DSR`.

    Raises
    ------
    ValueError
        If the tree references an instance that is not in ``evidence``.
    """
    if not (FAST if fast is None else fast):
        return hd.sr.Comprehensive3DSR(evidence=evidence, content=content, **kwargs)
    root = content[0]
    missing = set(_referenced_uids(root)) - {str(e.SOPInstanceUID) for e in evidence}
    if missing:
        raise ValueError(f"no evidence was given for referenced instance(s) {sorted(missing)}")
    stub = Dataset()
    for element in root:  # the root item's attributes, as the constructor copies them
        if element.keyword != "ContentSequence":
            stub[element.tag] = element
    stub.ContentSequence = DicomSequence()
    sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=stub, **kwargs)
    sr.ContentSequence = root.ContentSequence
    sr._content = hd.sr.ContentSequence([root], is_root=True)  # type: ignore[list-item]  # noqa: SLF001 - root is the tree's typed ContentItem; highdicom annotates MeasurementReport's items as Dataset
    return sr


def _referenced_uids(node: Dataset) -> Iterator[str]:
    """SOP Instance UIDs of the IMAGE and COMPOSITE items anywhere under ``node``."""
    stack, seen = [node], set()
    while stack:
        for item in stack.pop().get("ContentSequence", ()):
            if id(item) in seen:  # an item shared by several parents (the same source image)
                continue
            seen.add(id(item))
            if "ReferencedSOPSequence" in item and item.ValueType in ("IMAGE", "COMPOSITE"):
                yield str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if "ContentSequence" in item:
                stack.append(item)


def segmentation(*, pixel_array: np.ndarray, segmentation_type: hd.seg.SegmentationTypeValues,
                 fast: bool | None = None, **kwargs: Any) -> hd.seg.Segmentation:
    """``hd.seg.Segmentation(pixel_array=..., segmentation_type=..., **kwargs)``, faster for
    a BINARY SEG of a label map with many segments.

    Parameters
    ----------
    pixel_array : numpy.ndarray
        As highdicom takes it; the fast path applies to a label map (planes x rows x
        columns of unsigned integers) written as BINARY with ``omit_empty_frames``.
    segmentation_type : highdicom.seg.SegmentationTypeValues
        The SEG type.
    fast : bool, optional
        The fast mode (default :data:`FAST`).
    **kwargs
        The other arguments of :class:`highdicom.seg.Segmentation`.
    """
    use_fast = (FAST if fast is None else fast) \
        and segmentation_type == hd.seg.SegmentationTypeValues.BINARY \
        and pixel_array.ndim == 3 and pixel_array.dtype.kind == "u" \
        and kwargs.get("omit_empty_frames", True) and bool(pixel_array.any())
    if not use_fast:
        return hd.seg.Segmentation(pixel_array=pixel_array, segmentation_type=segmentation_type,
                                   **kwargs)
    seg = _LabelMapSegmentation(pixel_array=pixel_array, segmentation_type=segmentation_type,
                                **kwargs)
    del seg._planes_labels  # noqa: SLF001 - the construction's cache, see the class
    seg.__class__ = hd.seg.Segmentation  # type: ignore[assignment]  # the plain class from here on (see the class)
    return seg


#: What a segment absent from a plane gets: an empty frame, which highdicom leaves out
#: (``omit_empty_frames``, never turned off when some plane holds a segment) after
#: ``np.any`` on it, so it need not have the plane's size (a whole plane of zeros made
#: and scanned 24,000 times was a second with 104 segments).
_ABSENT = np.zeros((1, 1), dtype=bool)
_ABSENT.flags.writeable = False


class _LabelMapSegmentation(hd.seg.Segmentation):
    """A Segmentation whose construction skips the planes a segment is absent from.

    highdicom calls ``self._get_segment_pixel_array(plane, segment_number=..., ...)`` once
    per segment and plane, and leaves out the frames that come back empty. The labels
    in each plane are read once (cached by the plane's address in the label map, which
    stays alive for the whole construction); a segment absent from a plane gets an
    empty plane back at once.
    """

    def _get_segment_pixel_array(self, pixel_array: np.ndarray, segment_number: int,  # type: ignore[override]
                                 **kwargs: Any) -> np.ndarray:
        cache = self.__dict__.setdefault("_planes_labels", {})
        if pixel_array.ndim != 2 or pixel_array.dtype.kind != "u":
            return hd.seg.Segmentation._get_segment_pixel_array(  # noqa: SLF001
                pixel_array, segment_number=segment_number, **kwargs)
        key = (pixel_array.__array_interface__["data"][0], pixel_array.shape)
        labels = cache.get(key)
        if labels is None:
            labels = cache[key] = frozenset(
                np.flatnonzero(np.bincount(pixel_array[pixel_array != 0])).tolist())
        if int(segment_number) not in labels:
            return _ABSENT
        return hd.seg.Segmentation._get_segment_pixel_array(  # noqa: SLF001
            pixel_array, segment_number=segment_number, **kwargs)
