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
  absent from most planes. For each frame kept it then flattens and bit-packs the
  mask (``_encode_pixels_native``, pydicom's ``pack_bits``) and builds the Per-frame
  Functional Groups item one ``Dataset.add`` at a time (``_get_pffg_item`` and the
  Segment Identification callback), and its look-up tables read them all back
  (``_build_luts``, which asks for ``number_of_frames`` five times a frame). With
  4,040 frames these were most of the BINARY SEG's 2.5 s. A subclass used for the
  construction only (:class:`_LabelMapSegmentation`) overrides those methods, each
  on the same call highdicom makes: absent segments get an empty plane without a
  comparison, present ones are packed at once from the label map (no public hook
  takes packed frames), the functional groups are made from their elements at once
  with the items of a plane and of a segment shared between frames, and the number
  of frames is read once. Frames are still chosen, ordered and joined by highdicom.
  The object returned is a plain :class:`highdicom.seg.Segmentation`.

One switch: the ``fast`` argument, default :data:`FAST` (highdicom is one of
:data:`TESTED_VERSIONS`, which ``pyproject.toml`` allows); with ``fast=False`` the
plain constructors run. ``tests/test_many_segments_writers.py`` writes the same
objects both ways and compares them (the SEG byte for byte as written).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag

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
    for name in _LabelMapSegmentation.STATE:  # the construction's, see the class
        seg.__dict__.pop(name, None)
    seg.__class__ = hd.seg.Segmentation  # type: ignore[assignment]  # the plain class from here on (see the class)
    return seg


#: What a segment absent from a plane gets: an emp#: What a segment absent from a plane gets: an empty frame, which highdicom leaves out
#: (``omit_empty_frames``, never turned off when some plane holds a segment) after
#: ``np.any`` on it, so it need not have the plane's size (a whole plane of zeros made
#: and scanned 24,000 times was a second with 104 segments).
_ABSENT = np.zeros((1, 1), dtype=bool)
_ABSENT.flags.writeable = False
#: What a segment present on a plane gets when its frame was packed already (see
#: :class:`_LabelMapSegmentation`): 8 pixels, not empty, so that highdicom keeps the
#: frame and hands exactly these 8 pixels (one byte's worth, nothing left over for the
#: next frame) to ``_encode_pixels_native``, which returns the packed frame instead.
_PACKED = np.ones(8, dtype=np.uint8)
_PACKED.flags.writeable = False

#: Tags of a Per-frame Functional Groups item, as highdicom's ``_get_pffg_item`` and
#: its BINARY Segmentation's ``_add_segment_identification`` write them.
_DIMENSION_INDEX_VALUES = BaseTag(0x0020_9157)
_FRAME_CONTENT_SEQUENCE = BaseTag(0x0020_9111)
_PLANE_POSITION_SEQUENCE = BaseTag(0x0020_9113)
_DERIVATION_IMAGE_SEQUENCE = BaseTag(0x0008_9124)
_DERIVATION_CODE_SEQUENCE = BaseTag(0x0008_9215)
_SOURCE_IMAGE_SEQUENCE = BaseTag(0x0008_2112)
_SEGMENT_IDENTIFICATION_SEQUENCE = BaseTag(0x0062_000A)
_REFERENCED_SEGMENT_NUMBER = BaseTag(0x0062_000B)


class _LabelMapSegmentation(hd.seg.Segmentation):
    """A Segmentation whose construction skips the planes a segment is absent from,
    packs each frame in one step and builds each frame's functional groups at once.

    highdicom 0.28's frame loop, for each segment and each plane: ``pixels =
    self._get_segment_pixel_array(plane, segment_number=...)``; if ``np.any(pixels)``:
    ``item = self._get_pffg_item(...)``, then its callback adds the Segment
    Identification to ``item``, then ``self._encode_pixels_native(...)`` of the
    flattened pixels joined to those left over from the previous frame. Here, on the
    same calls:

    * ``_get_segment_pixel_array``: the labels in each plane are read once (cached by
      the plane's address in the label map, which stays alive for the whole
      construction); a segment absent from a plane gets :data:`_ABSENT` at once. A
      segment present on a plane whose pixel count is a multiple of 8 (no frame's bits
      then share a byte with the next frame's) is packed at once from the label map
      (``np.packbits`` of ``plane == number``, DICOM's bit order: first pixel in the
      least significant bit) and highdicom is given :data:`_PACKED`; other sizes get
      highdicom's own binary plane;
    * ``_get_pffg_item``: see the method; it adds the Segment Identification, which the
      callback then leaves as it is;
    * ``_encode_pixels_native``: the frame packed before, else highdicom's packing.

    The frame in hand is kept in ``self.__dict__`` (set by the first call, read by the
    other two), with the caches, all named in :attr:`STATE` and removed after the
    construction.
    """

    #: The construction's state in the instance's ``__dict__``.
    STATE = ("_planes_labels", "_frame", "_shared_items", "_number_of_frames",
             "_identify_per_frame")

    @property
    def number_of_frames(self) -> int:
        """highdicom's ``number_of_frames`` (``self.get("NumberOfFrames", 1)``), read once
        while the look-up tables are built (:meth:`_build_luts` asks for it five times a
        frame, 20,000 pydicom look-ups with 4,040 frames)."""
        number = self.__dict__.get("_number_of_frames")
        return self.get("NumberOfFrames", 1) if number is None else number

    def _build_luts(self) -> None:
        """highdicom's, with the number of frames read once (it is set before)."""
        self.__dict__["_number_of_frames"] = self.get("NumberOfFrames", 1)
        try:
            super()._build_luts()
        finally:
            del self.__dict__["_number_of_frames"]

    def _get_segment_pixel_array(self, pixel_array: np.ndarray, segment_number: int,  # type: ignore[override]
                                 **kwargs: Any) -> np.ndarray:
        state = self.__dict__
        state["_frame"] = None
        if pixel_array.ndim != 2 or pixel_array.dtype.kind != "u":
            return hd.seg.Segmentation._get_segment_pixel_array(  # noqa: SLF001
                pixel_array, segment_number=segment_number, **kwargs)
        cache = state.setdefault("_planes_labels", {})
        key = (pixel_array.__array_interface__["data"][0], pixel_array.shape)
        labels = cache.get(key)
        if labels is None:
            labels = cache[key] = frozenset(
                np.flatnonzero(np.bincount(pixel_array[pixel_array != 0])).tolist())
        number = int(segment_number)
        if number not in labels:
            return _ABSENT
        if pixel_array.size % 8:
            state["_frame"] = (number, None)
            return hd.seg.Segmentation._get_segment_pixel_array(  # noqa: SLF001
                pixel_array, segment_number=segment_number, **kwargs)
        state["_frame"] = (number, np.packbits(pixel_array == number, bitorder="little").tobytes())
        return _PACKED

    def _get_pffg_item(self, dimension_index_values: list[int],  # type: ignore[override]
                       plane_position: hd.PlanePositionSequence,
                       derivation_source_image_items: Sequence[Dataset] | None,
                       coordinate_system: hd.CoordinateSystemNames | None,
                       derivation: hd.sr.CodedConcept) -> Dataset:
        """The Per-frame Functional Groups item of a frame, with what highdicom's static
        method and its Segment Identification callback put in it (same elements, values
        and value types).

        The Derivation Image item is made once per source plane and the Segment
        Identification item once per segment, and shared by the frames of that plane or
        segment (highdicom already shares a plane's Plane Position and Source Image
        items between its frames); each data set is made from its elements at once
        instead of one ``Dataset.add`` after another. A frame of a source image in the
        patient coordinate system with source image items; anything else is left to
        highdicom.
        """
        frame = self.__dict__.get("_frame")
        if coordinate_system != hd.CoordinateSystemNames.PATIENT \
                or not derivation_source_image_items or frame is None:
            return hd.seg.Segmentation._get_pffg_item(  # noqa: SLF001
                dimension_index_values, plane_position, derivation_source_image_items,
                coordinate_system, derivation)
        # items shared between frames: a plane's by its (source items, code) ids, a
        # segment's Segment Identification by its number
        shared = self.__dict__.setdefault("_shared_items", {})
        key = (id(derivation_source_image_items), id(derivation))
        derived = shared.get(key)
        if derived is None:  # the list and the code are kept alive with their ids
            derived = shared[key] = (derivation_source_image_items, derivation, DicomSequence([
                Dataset({_DERIVATION_CODE_SEQUENCE: DataElement(
                             _DERIVATION_CODE_SEQUENCE, "SQ", DicomSequence([derivation])),
                         _SOURCE_IMAGE_SEQUENCE: DataElement(
                             _SOURCE_IMAGE_SEQUENCE, "SQ",
                             DicomSequence(derivation_source_image_items))})]))
        identification = shared.get(frame[0])
        if identification is None:
            identification = shared[frame[0]] = DicomSequence([Dataset({
                _REFERENCED_SEGMENT_NUMBER: DataElement(
                    _REFERENCED_SEGMENT_NUMBER, "US", frame[0])})])
        content = Dataset({_DIMENSION_INDEX_VALUES: DataElement(
            _DIMENSION_INDEX_VALUES, "UL", MultiValue(int, dimension_index_values),
            already_converted=True)})
        item = Dataset({
            _DERIVATION_IMAGE_SEQUENCE: DataElement(_DERIVATION_IMAGE_SEQUENCE, "SQ", derived[2]),
            _FRAME_CONTENT_SEQUENCE: DataElement(
                _FRAME_CONTENT_SEQUENCE, "SQ", DicomSequence([content])),
            _PLANE_POSITION_SEQUENCE: DataElement(_PLANE_POSITION_SEQUENCE, "SQ", plane_position)})
        if self.__dict__.get("_identify_per_frame", True):  # one segment: in the shared groups
            item[_SEGMENT_IDENTIFICATION_SEQUENCE] = DataElement(
                _SEGMENT_IDENTIFICATION_SEQUENCE, "SQ", identification)
        return item

    def _init_multiframe_image(self, **kwargs: Any) -> None:  # type: ignore[override]
        """highdicom's, with its callback that adds each frame's Segment Identification
        left out where :meth:`_get_pffg_item` has added it already."""
        add_segment = kwargs.get("add_channel_callback")
        # highdicom puts a single segment's identification in the shared functional
        # groups and none in the frames' (its callback is then used once, for those)
        channels = kwargs.get("channel_values")
        self.__dict__["_identify_per_frame"] = channels is None or len(channels) != 1
        if add_segment is not None:
            def add_unless_added(item: Dataset, segment_number: int) -> Dataset:
                if _SEGMENT_IDENTIFICATION_SEQUENCE not in item:
                    return add_segment(item, segment_number)
                added = item[_SEGMENT_IDENTIFICATION_SEQUENCE].value
                if added is not self.__dict__["_shared_items"].get(int(segment_number)):
                    raise RuntimeError("highdicom's frame loop is not the one this module "
                                       "was written for; run it with fast=False")
                return item
            kwargs["add_channel_callback"] = add_unless_added
        super()._init_multiframe_image(**kwargs)

    def _encode_pixels_native(self, planes: np.ndarray) -> bytes:
        """The frame packed by :meth:`_get_segment_pixel_array` if it was, else highdicom's
        packing of ``planes``."""
        frame = self.__dict__.get("_frame")
        if frame is None or frame[1] is None:
            return super()._encode_pixels_native(planes)
        if planes.shape != _PACKED.shape:  # not the pixels highdicom was given for the frame
            raise RuntimeError("highdicom's frame loop is not the one this module was "
                               "written for; run it with fast=False")
        self.__dict__["_frame"] = (frame[0], None)  # packed once, written once
        return frame[1]
