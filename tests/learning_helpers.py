"""Helpers of the nightly-learning tests: tiny phantom studies, radiologist SEGs, a tiny bundle.

Nothing here is a mock: studies are rendered phantoms, SEGs are built with highdicom
from the phantom's exact truth (as a radiologist's viewer would send them), the bundle
is the real Model Zoo spleen configuration made small enough for a 2-core CI machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import torch
from monai.networks.nets import UNet
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines import phantom as ph
from dicom_node.learning.label_intake import intake_seg_series
from node_harness import incoming
from twin_archive import Archive
from twin_archive.labels import LabelStore

REFERENCE = Path("/work/shared/reference/monai-bundles/spleen_ct_segmentation")
_local = Path(__file__).resolve().parents[2] / "shared" / "reference" / "monai-bundles" / \
    "spleen_ct_segmentation"
if _local.is_dir():
    REFERENCE = _local

#: The tiny network of the tests (channels, strides, residual units).
TINY_NET = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
SIZE, SLICES = 64, 32
PIXEL_MM, SLICE_MM = 6.0, 5.0


def tiny_bundle(dest: Path, seed: int = 0) -> Path:
    """The real spleen bundle configs with a tiny UNet, the phantom grid kept as the model
    grid (6 x 6 x 5 mm), a 32-voxel sliding window, and seeded random weights."""
    shutil.copytree(REFERENCE / "configs", dest / "configs")
    path = dest / "configs" / "inference.json"
    cfg = json.loads(path.read_text())
    cfg["network_def"].update(TINY_NET)
    for t in cfg["preprocessing"]["transforms"]:
        if t["_target_"] == "Spacingd":
            t["pixdim"] = [PIXEL_MM, PIXEL_MM, SLICE_MM]
    cfg["inferer"]["roi_size"] = [32, 32, 32]
    cfg["inferer"]["sw_batch_size"] = 2
    cfg["inferer"]["overlap"] = 0.25
    path.write_text(json.dumps(cfg, indent=1))
    (dest / "models").mkdir()
    torch.manual_seed(seed)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, norm="batch", **TINY_NET)
    torch.save(net.state_dict(), dest / "models" / "model.pt")
    return dest


def geometry(slices: int = SLICES, size: int = SIZE) -> ph.SliceGeometry:
    """The tiny phantom grid (64 x 64 x 32 at 6 x 6 x 5 mm)."""
    return ph.SliceGeometry(rows=size, columns=size, slices=slices,
                            pixel_spacing=(PIXEL_MM, PIXEL_MM), slice_spacing=SLICE_MM)


def phantom_study(patient_id: str, seed: int, *, slices: int = SLICES
                  ) -> tuple[list[Dataset], np.ndarray]:
    """A tiny abdominal CT series of its own study, and its exact spleen mask
    (uint8 (slices, rows, columns), slice k = instance k + 1)."""
    g = geometry(slices)
    anatomy = ph.Anatomy.random(seed)
    info = ph.StudyInfo(patient_id=patient_id, patient_name=f"Learn^{patient_id}")
    datasets = ph.ct_series(anatomy, g, info)
    spleen = next(v for v, n in ph.LABELS.items() if n == "spleen")
    truth = (ph.truth_labels(anatomy, g) == spleen).astype(np.uint8)
    return datasets, truth


def radiologist_seg(datasets: list[Dataset], mask: np.ndarray, *,
                    creator: str = "Radiologist^Rita", label: str = "Spleen") -> Dataset:
    """A manual DICOM SEG of ``mask`` on ``datasets`` as a viewer would send it (not ours)."""
    return hd.seg.Segmentation(
        source_images=list(datasets), pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label=label, segmented_property_category=codes.SCT.Organ,
            segmented_property_type=codes.SCT.Spleen,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Viewer Vendor", manufacturer_model_name="Reading Room",
        software_versions="7.1", device_serial_number="42", content_creator_name=creator,
        omit_empty_frames=True, series_description="Spleen corrected")


def store_all(archive: Archive, datasets: list[Dataset], calling_ae: str = "TEST_SCU") -> None:
    """Store data sets through the archive's own store path (as C-STORE does)."""
    for ds in datasets:
        archive.ingest.store(incoming(ds, calling_ae=calling_ae))


def labelled_patients(archive: Archive, labels: LabelStore, pids: list[str], *, seed: int,
                      donors: int | None = None) -> None:
    """For each patient: a phantom study stored from ``CT_SCANNER``, the radiologist's SEG
    of its truth stored from ``READING_ROOM`` and taken as a label; the first ``donors``
    patients (all by default) donate."""
    for i, pid in enumerate(pids):
        datasets, truth = phantom_study(pid, seed=seed + i)
        store_all(archive, datasets, "CT_SCANNER")
        seg = radiologist_seg(datasets, truth)
        store_all(archive, [seg], "READING_ROOM")
        decision = intake_seg_series(archive.twins.series_files(str(seg.SeriesInstanceUID)), labels)
        assert decision.decision == "label", decision.reason
        if donors is None or i < donors:
            archive.twins.set_consent(pid, donate=True, by="test")


def organ_seg(datasets: list, anatomy: ph.Anatomy, g: ph.SliceGeometry,
              organs: tuple[tuple[str, object], ...]) -> Dataset:
    """A manual SEG with one segment per ``(organ, SNOMED code)`` from the phantom's exact
    truth; segments are labelled with the organ's name in title case, except the liver,
    labelled "Hepar" (so that only its code names it)."""
    truth = ph.truth_labels(anatomy, g)
    value = {n: v for v, n in ph.LABELS.items()}
    masks = np.stack([(truth == value[name]).astype(np.uint8) for name, _ in organs], axis=-1)
    return hd.seg.Segmentation(
        source_images=list(datasets), pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=i, segment_label=label, segmented_property_category=codes.SCT.Organ,
            segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
            for i, (label, code) in enumerate(
                ((n.title() if n != "liver" else "Hepar", c) for n, c in organs), start=1)],
        series_instance_uid=hd.UID(), series_number=301, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Viewer Vendor", manufacturer_model_name="Reading Room",
        software_versions="7.1", device_serial_number="42",
        content_creator_name="Radiologist^Rita", omit_empty_frames=True)
