"""Corrections back through the PACS: a SEG stored into Orthanc with DICOMweb STOW-RS (as
OHIF's segmentation export does) is forwarded to the node by the harness's Lua
``OnStoredInstance`` and becomes a label with its creator's name; the node's own SEGs
stored into Orthanc (by Manufacturer, or by Contributing Equipment after a PACS
re-wrote them) are not forwarded.

Real parts: Orthanc 1.10 with the Debian DICOMweb plugin, the node as a subprocess,
highdicom SEGs on a generated series the node holds.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from loop_helpers import labels_now, node_json, pacs, small_study, storescu, write_files
from node_harness import NodeProcess
from orthanc.server import lua_forward_corrections
from waiting import wait_until

pytestmark = pytest.mark.orthanc

CREATOR = "Doe^Jane"


def _seg(source: list, manufacturer: str) -> hd.seg.Segmentation:
    mask = np.zeros((len(source), 128, 128), dtype=bool)
    mask[5:15, 40:80, 40:80] = True
    ds = hd.seg.Segmentation(
        source_images=source, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="spleen",
            segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept("78961009", "SCT", "Spleen"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=generate_uid(), series_number=300, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=manufacturer, manufacturer_model_name="OHIF Viewer",
        software_versions="3.13.2", device_serial_number="1", content_creator_name=CREATOR)
    return ds


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_lua_forwards_only_segs_and_rejects_a_bad_modality_name() -> None:
    lua = lua_forward_corrections("node")
    assert 'local TARGET = "node"' in lua and "1.2.840.10008.5.1.4.1.1.66.4" in lua
    assert "DICOM-NODE AI" in lua and "SendToModality(instanceId, TARGET)" in lua
    with pytest.raises(ValueError):
        lua_forward_corrections('node"); os.exit(')


def test_seg_stowed_into_orthanc_becomes_a_label_with_its_creator(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    # A SEG becomes a label of the configured tasks whose declared segments or model
    # labels its segments name: the shipped spleen-ct declares Spleen (issue 27), so no
    # model needs to be registered for the radiologist's first SEG to count.
    node = NodeProcess(data, extra_args=["--stable-after", "1.0"]).start()
    try:
        source = small_study("CORR-0001", slices=20)
        storescu(node.port, write_files(source, tmp_path / "source"), node.ae_title)
        with pacs(tmp_path / "orthanc", dicomweb=True,
                           known_modalities={"node": (node.ae_title, "127.0.0.1", node.port)},
                           forward_corrections_to="node") as orthanc:
            ours = _seg(source, "DICOM-NODE AI")  # the node's own SEG, echoed into the PACS
            rewritten = _seg(source, "PACS VENDOR")  # ours, re-written by a PACS that kept
            item = Dataset()  # the node in the Contributing Equipment Sequence
            item.Manufacturer = "DICOM-NODE AI"
            rewritten.ContributingEquipmentSequence = [item]
            corrected = _seg(source, "OHIF")
            answer = orthanc.stow([_bytes(ours), _bytes(rewritten), _bytes(corrected)])
            assert len(answer["00081199"]["Value"]) == 3  # Referenced SOP Sequence: all stored

            wait_until("the corrected SEG as a label", lambda: any(
                lab.seg_sop_instance_uid == corrected.SOPInstanceUID
                for lab in labels_now(node.data_dir, current_only=True)), 60)
            [got] = [lab for lab in node_json(node, "labels", "list")
                     if lab["seg_sop_instance_uid"] == corrected.SOPInstanceUID]
            assert got["content_creator"] == CREATOR
            assert got["series_uid"] == str(source[0].SeriesInstanceUID)
            assert got["segments"] == ["spleen"]
            assert got["tasks"] == ["spleen-ct"] and got["unclaimed"] is None
            listing = node.cli("labels", "list").stdout
            assert CREATOR in listing and str(source[0].SeriesInstanceUID) in listing
            forwarded = re.findall(r"forwarding SEG (\S+)", orthanc.log_tail(400))
            assert len(forwarded) == 1  # the node's own SEGs stayed in the PACS
        assert str(ours.SeriesInstanceUID) not in node.log()
        assert str(rewritten.SeriesInstanceUID) not in node.log()
    finally:
        node.stop()
