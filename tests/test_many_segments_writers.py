"""The fast paths for many segments write exactly what the plain ones write.

* :mod:`pipelines.writers.highdicom_speedups` (the one adapter to highdicom internals):
  the SR document and the BINARY SEG built both ways, every attribute compared;
* the SR outline from the segment's crop equals the outline traced on the whole slice
  (islands, holes, segments touching the image's edge);
* the overlay's contour by shifted ANDs equals ``ndimage.binary_erosion``'s, and an
  overlay image copied from the first equals one highdicom builds.
"""

from __future__ import annotations

import io

import contourpy
import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipelines import phantom as ph
from pipelines.postprocess import split_labels
from pipelines.types import ModelInfo, SegmentResult, WriterOptions
from pipelines.volume import load_series, to_source_slices
from pipelines.writers import build_overlay, build_seg, build_sr, highdicom_speedups
from pipelines.writers import overlay as overlay_writer
from pipelines.writers.sr import largest_outline
from pipelines.validation import validate_dataset

MODEL = ModelInfo(name="abdomen_ct_segmentation", version="0.3.1", backend="torch-cpu")


def _json(ds: pydicom.Dataset) -> dict:
    """Every attribute, nested ones too, but times and highdicom's random dimension UID."""
    def scrub(node):  # noqa: ANN001, ANN202
        if isinstance(node, list):
            return [scrub(v) for v in node]
        if not isinstance(node, dict):
            return node
        return {k: scrub(v) for k, v in node.items()
                if not (isinstance(v, dict) and v.get("vr") in ("DA", "TM", "DT"))
                and k != DIMENSION_ORGANIZATION_UID}
    return scrub(ds.to_json_dict(bulk_data_threshold=10**12))


#: Dimension Organization UID: highdicom makes a new one for each SEG.
DIMENSION_ORGANIZATION_UID = "00209164"


@pytest.fixture(scope="module")
def phantom():
    anatomy = ph.Anatomy.random(9)
    g = ph.SliceGeometry(rows=40, columns=44, slices=12, pixel_spacing=(8.0, 7.5), slice_spacing=9.0)
    vol = load_series(ph.ct_series(anatomy, g))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    segments = split_labels(ph.truth_at(anatomy, vol.index_to_lps(grid)), vol, ph.LABELS)
    return vol, segments


def test_fast_sr_document_is_the_plain_one(phantom, monkeypatch) -> None:
    vol, segments = phantom
    seg = build_seg(vol, segments, MODEL)
    built, walked = {}, {}
    walk = highdicom_speedups._referenced_uids  # the fast path's evidence check, its alone
    for fast in (False, True):
        monkeypatch.setattr(highdicom_speedups, "FAST", fast)
        monkeypatch.setattr("pipelines.writers.sr.new_uid", iter(["2.25.1", "2.25.2"] * 2).__next__)
        calls: list[int] = []
        monkeypatch.setattr(highdicom_speedups, "_referenced_uids",
                            lambda node, calls=calls: (calls.append(1), walk(node))[1])
        built[fast] = build_sr(vol, seg, segments, MODEL)
        walked[fast] = bool(calls)
    assert walked == {False: False, True: True}  # each build took the path it was asked for
    assert _json(built[True]) == _json(built[False])
    plain, fast = built[False].content, built[True].content
    assert type(plain) is type(fast) and len(plain) == len(fast) == 1
    back = hd.sr.Comprehensive3DSR.from_dataset(_roundtrip(built[True]))
    assert len(back.content.get_volumetric_roi_measurement_groups()) == \
        sum(not s.is_empty for s in segments)


def test_fast_sr_document_still_refuses_references_without_evidence(phantom) -> None:
    vol, segments = phantom
    seg = build_seg(vol, segments, MODEL)
    sr = build_sr(vol, seg, segments, MODEL)
    report = hd.sr.MeasurementReport.from_sequence([_root(sr)])
    with pytest.raises(ValueError, match="evidence"):
        highdicom_speedups.comprehensive_3d_sr(
            evidence=[seg], content=report, fast=True, series_instance_uid="2.25.3",
            series_number=1, sop_instance_uid="2.25.4", instance_number=1)


def _both_ways(vol, segments, monkeypatch, seg_type: str = "binary"):
    """The SEG built plainly and fast, with the same UIDs; and, for the fast build,
    whether the subclass ran and how many frames it packed itself."""
    built, subclassed, packed = {}, {}, {}
    make = highdicom_speedups._LabelMapSegmentation.__init__
    encode = highdicom_speedups._LabelMapSegmentation._encode_pixels_native
    for fast in (False, True):
        monkeypatch.setattr(highdicom_speedups, "FAST", fast)
        monkeypatch.setattr("pipelines.writers.seg.new_uid",
                            iter([f"2.25.{i}" for i in range(1, 400)]).__next__)
        calls: list[int] = []
        frames: list[bool] = []
        monkeypatch.setattr(highdicom_speedups._LabelMapSegmentation, "__init__",
                            lambda self, calls=calls, **kw: (calls.append(1), make(self, **kw))[1])

        def counted(self, planes, frames=frames):  # noqa: ANN001, ANN202
            frames.append((self.__dict__.get("_frame") or (0, None))[1] is not None)
            return encode(self, planes)
        monkeypatch.setattr(highdicom_speedups._LabelMapSegmentation, "_encode_pixels_native",
                            counted)
        built[fast] = build_seg(vol, segments, MODEL, options=WriterOptions(seg_type=seg_type))
        subclassed[fast], packed[fast] = bool(calls), sum(frames)
    return built, subclassed, packed


def _written(ds: pydicom.Dataset) -> bytes:
    """The file as written, its times and highdicom's random dimension UID made fixed."""
    def fix(_: pydicom.Dataset, elem: pydicom.DataElement) -> None:
        if elem.VR in ("DA", "TM", "DT"):
            elem.value = {"DA": "20260101", "TM": "120000", "DT": "20260101120000"}[elem.VR]
        if elem.keyword == "DimensionOrganizationUID":
            elem.value = "2.25.99"
    ds.walk(fix)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
def test_fast_binary_seg_is_the_plain_one(phantom, monkeypatch, seg_type: str) -> None:
    vol, segments = phantom
    built, subclassed, packed = _both_ways(vol, segments, monkeypatch, seg_type)
    # the fast construction ran where it applies (BINARY), and only when asked for
    assert subclassed == {False: False, True: seg_type == "binary"}
    # 40 x 44 pixels: every frame was packed by the fast path, none by highdicom
    assert packed == {False: 0, True: int(built[True].NumberOfFrames) if seg_type == "binary" else 0}
    assert type(built[True]) is hd.seg.Segmentation
    assert not set(highdicom_speedups._LabelMapSegmentation.STATE) & set(vars(built[True]))
    assert _json(built[True]) == _json(built[False])
    assert _written(built[True]) == _written(built[False])


def test_fast_binary_seg_of_frames_not_a_whole_number_of_bytes(monkeypatch) -> None:
    """41 x 43 pixels: a frame's last bits share a byte with the next frame's, so the
    frames are packed by highdicom, one stream, and the rest is still the fast path's."""
    anatomy = ph.Anatomy.random(4)
    g = ph.SliceGeometry(rows=41, columns=43, slices=6, pixel_spacing=(8.0, 7.5), slice_spacing=9.0)
    vol = load_series(ph.ct_series(anatomy, g))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    segments = split_labels(ph.truth_at(anatomy, vol.index_to_lps(grid)), vol, ph.LABELS)
    built, subclassed, packed = _both_ways(vol, segments, monkeypatch)
    assert subclassed == {False: False, True: True} and packed == {False: 0, True: 0}
    assert int(built[True].NumberOfFrames) > 6  # several segments on some slice
    assert _written(built[True]) == _written(built[False])
    back = hd.seg.Segmentation.from_dataset(_roundtrip(built[True]))
    labels = np.zeros(vol.shape, np.uint8)
    kept = sorted((s for s in segments if not s.is_empty), key=lambda s: s.label)
    for number, s in enumerate(kept, start=1):
        labels[s.mask] = number
    read = back.get_pixels_by_source_instance(
        [str(src.SOPInstanceUID) for src in vol.source_images], combine_segments=True)
    np.testing.assert_array_equal(read, to_source_slices(vol, labels))


def test_fast_binary_seg_of_more_than_255_segments(monkeypatch) -> None:
    """300 segments: the label map is uint16; still every frame packed by the fast path
    and the file highdicom writes."""
    g = ph.SliceGeometry(rows=40, columns=48, slices=4, pixel_spacing=(8.0, 7.5), slice_spacing=9.0)
    vol = load_series(ph.ct_series(ph.Anatomy.random(7), g))
    labels = np.zeros(vol.shape, np.uint16)
    for v in range(1, 301):  # 2 x 2 blocks, 75 a slice, 6 of them on a second slice
        k, i, j = v % 4, 2 * ((v // 4) // 12) + 4, 3 * ((v // 4) % 12) + 5
        labels[k, i:i + 2, j:j + 2] = v
        if v % 50 == 0:
            labels[(k + 1) % 4, i + 20:i + 22, j:j + 2] = v
    segments = split_labels(labels, vol, {v: f"structure {v}" for v in range(1, 301)})
    built, subclassed, packed = _both_ways(vol, segments, monkeypatch)
    assert subclassed == {False: False, True: True}
    assert len(built[True].SegmentSequence) == 300  # a uint16 label map given to highdicom
    assert packed == {False: 0, True: 306} == {False: 0, True: int(built[True].NumberOfFrames)}
    assert _written(built[True]) == _written(built[False])


@pytest.mark.parametrize("order_seed", [None, 5])
def test_fast_binary_seg_of_a_multiframe_source_with_other_frames(monkeypatch, order_seed) -> None:
    """An Enhanced MR of 2 temporal positions x 2 echoes (frames stored in order, then
    shuffled): each SEG frame derives from its source frame, whose Derivation Image
    item, shared by the frames of a plane in the fast build, the node then trims to
    the volume's own frame (``seg._keep_volume_frames``) - written as the plain build."""
    anatomy = ph.Anatomy.random(6)
    g = ph.SliceGeometry(rows=40, columns=48, slices=8, pixel_spacing=(8.0, 7.5), slice_spacing=9.0)
    order = None if order_seed is None else np.random.default_rng(order_seed).permutation(32)
    vol = load_series([ph.enhanced_mr(anatomy, g, frame_order=order)])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    segments = split_labels(ph.truth_at(anatomy, vol.index_to_lps(grid)), vol, ph.LABELS)
    built, subclassed, packed = _both_ways(vol, segments, monkeypatch)
    assert subclassed == {False: False, True: True}
    assert packed == {False: 0, True: int(built[True].NumberOfFrames)}
    assert int(built[True].NumberOfFrames) > g.slices  # planes of several frames
    for item in built[True].PerFrameFunctionalGroupsSequence:
        assert len(item.DerivationImageSequence[0].SourceImageSequence) == 1
    assert _written(built[True]) == _written(built[False])


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _root(sr: pydicom.Dataset) -> pydicom.Dataset:
    root = pydicom.Dataset()
    for keyword in ("ConceptNameCodeSequence", "ContentSequence", "ValueType",
                    "ContinuityOfContent", "ContentTemplateSequence"):
        setattr(root, keyword, getattr(sr, keyword))
    return root


def _outline_on_whole_slice(volume, mask: np.ndarray):
    """The outline as it was traced before it was taken from the crop (whole slices)."""
    counts = mask.reshape(mask.shape[0], -1).sum(axis=1)
    n = int(np.argmax(counts))
    labels, _ = ndimage.label(mask[n])
    region = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:])))
    lines = contourpy.contour_generator(z=np.pad(region.astype(float), 1),
                                        line_type="Separate").lines(0.5)
    line = max(lines, key=lambda a: abs(0.5 * float(np.dot(a[:, 0], np.roll(a[:, 1], -1))
                                                    - np.dot(a[:, 1], np.roll(a[:, 0], -1)))))
    return n, line - 0.5, float(region.sum())


@pytest.mark.parametrize("seed", range(6))
def test_outline_from_the_crop_is_the_whole_slice_outline(phantom, seed: int) -> None:
    vol, _ = phantom
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random(vol.shape) > 0.55, iterations=1)
    mask[:, :, :3] |= rng.random((vol.shape[0], vol.shape[1], 3)) > 0.3  # on the image's edge
    k, i, j = np.nonzero(mask)
    crop = mask[k.min():k.max() + 1, i.min():i.max() + 1, j.min():j.max() + 1]
    s = SegmentResult(label=1, name="liver", crop=crop, origin=(k.min(), i.min(), j.min()),
                      grid_shape=vol.shape, volume_ml=1.0)
    outline = largest_outline(vol, s)
    n, points, pixels = _outline_on_whole_slice(vol, mask)
    assert outline.source_image is vol.source_images[n]
    np.testing.assert_array_equal(outline.points[:len(points)], points.astype(np.float32))
    assert outline.area_mm2 == pytest.approx(pixels * vol.spacing_mm[1] * vol.spacing_mm[2])


@pytest.mark.parametrize(("width", "factor"), [(1, 1), (2, 1), (3, 1), (1, 2), (2, 3)])
def test_overlay_contour_is_the_erosion_edge(width: int, factor: int) -> None:
    rng = np.random.default_rng(width * 10 + factor)
    plane = ndimage.binary_opening(rng.random((30, 34)) > 0.5)
    plane[0, :] = plane[:, -1] = True  # touching the box's edge
    s = SegmentResult(label=1, name="liver", crop=plane[None], origin=(0, 5, 6),
                      grid_shape=(1, 40, 44), volume_ml=1.0)
    rgb = np.zeros((40 * factor, 44 * factor, 3), np.uint8)
    overlay_writer._draw_contour(rgb, s, 0, factor, width, (255, 0, 0))
    full = np.zeros((40, 44), bool)
    full[5:35, 6:40] = plane
    full = np.repeat(np.repeat(full, factor, axis=0), factor, axis=1)
    edge = full & ~ndimage.binary_erosion(full, ndimage.generate_binary_structure(2, 1),
                                          iterations=width, border_value=0)
    np.testing.assert_array_equal(rgb[..., 0] == 255, edge)


def test_overlay_images_after_the_first_are_what_highdicom_builds(phantom) -> None:
    vol, segments = phantom
    images = build_overlay(vol, segments, MODEL)
    assert len(images) > 2
    first, second = images[0], images[1]
    plain = overlay_writer._sc_image(  # the same image, built by highdicom
        _series_of(first, vol), second.pixel_array, second.SourceImageSequence[0], 2)
    def even(uid: object) -> int:
        return len(str(uid)) + len(str(uid)) % 2

    # the group length as highdicom counts it, for each image's own UID
    assert int(second.file_meta.FileMetaInformationGroupLength) - even(second.SOPInstanceUID) \
        == int(plain.file_meta.FileMetaInformationGroupLength) - even(plain.SOPInstanceUID)
    for ds in (plain, second):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.42"
    assert _json(second) == _json(plain)
    np.testing.assert_array_equal(_roundtrip(second).pixel_array, plain.pixel_array)


def _series_of(first: pydicom.Dataset, vol):
    from pipelines.writers.seg import contributing_equipment

    opts = WriterOptions()
    factor = max(1, -(-opts.min_overlay_width_px // vol.shape[2]))
    return overlay_writer._OverlaySeries(
        volume=vol, model=MODEL, opts=opts, series_uid=str(first.SeriesInstanceUID),
        description=str(first.SeriesDescription), equipment=contributing_equipment("AI overlay", MODEL),
        pixel_spacing=(vol.spacing_mm[1] / factor, vol.spacing_mm[2] / factor),
        orientation=overlay_writer._patient_orientation(vol))


def test_fast_binary_seg_of_one_segment_is_the_plain_one_and_valid(phantom, monkeypatch) -> None:
    """One segment (the spleen task's SEG): highdicom puts its Segment Identification in
    the shared functional groups, so no frame may carry one of its own (dciodvfy:
    "Functional Group Sequence already used in SharedFunctionalGroupsSequence")."""
    vol, segments = phantom
    (spleen,) = [s for s in segments if s.name == "spleen"]
    built, subclassed, packed = _both_ways(vol, [spleen], monkeypatch)
    assert subclassed == {False: False, True: True}
    assert packed == {False: 0, True: int(built[True].NumberOfFrames)}
    shared = built[True].SharedFunctionalGroupsSequence[0]
    assert "SegmentIdentificationSequence" in shared
    assert not any("SegmentIdentificationSequence" in f
                   for f in built[True].PerFrameFunctionalGroupsSequence)
    assert _written(built[True]) == _written(built[False])
    assert validate_dataset(built[True], "seg").ok
