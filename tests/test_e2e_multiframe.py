"""End to end: a Legacy Converted Enhanced CT through a real node to a real Orthanc (issue 24).

The phantom's single-frame slices, converted by highdicom into one multi-frame instance,
are sent to the node (subprocess) with the shipped demo model; the SEG, SR and overlay
come back in Orthanc, each clean for ``dciodvfy``; every SEG frame names its source frame;
and the mask equals the one the same model gives on the single-frame slices.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_client import send
from loop_helpers import (
    dciodvfy_errors,
    install_model,
    node_json,
    pacs,
    queued_sends,
    results_in_orthanc,
    small_study,
    write_files,
)
from dicom_node.tasks import default_tasks
from node_harness import NodeProcess
from pipelines.inference import load_model
from pipelines.run import run_series
from registry.store import Registry
from waiting import wait_until

pytestmark = pytest.mark.orthanc  # starts a real Orthanc

RESULT_TIMEOUT = 180.0


def test_legacy_converted_ct_gets_frame_referencing_results_in_orthanc(tmp_path: Path) -> None:
    slices = small_study("E2E-MF", slices=40)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices, series_instance_uid=generate_uid(), series_number=5,
        sop_instance_uid=generate_uid(), instance_number=1)
    [path] = write_files([mf], tmp_path / "mf")
    study_uid = str(mf.StudyInstanceUID)
    data = tmp_path / "data"
    data.mkdir()
    install_model(data)
    with pacs(tmp_path / "orthanc") as orthanc:
        config = ("[[destinations]]\n"
                  f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
                  'send = ["seg", "sr", "overlay"]\n')
        node = NodeProcess(data, config=config, extra_args=["--stable-after", "1.5"]).start()
        try:
            # dcmtk's storescu does not propose Legacy Converted Enhanced CT by default
            assert send(node.port, [path], called_ae=node.ae_title) == [0]
            found = wait_until("SEG, SR and overlay in Orthanc", lambda: (
                lambda f: f if f["seg"] and f["sr"] and f["overlay"] else None)(
                    results_in_orthanc(orthanc, study_uid)), RESULT_TIMEOUT)
            wait_until("every send delivered", lambda: not queued_sends(node.data_dir), 60)
            found = results_in_orthanc(orthanc, study_uid)
            [result] = node_json(node, "twin", "show", "E2E-MF")["results"]
            files = {}
            for kind in ("seg", "sr", "overlay"):
                for inst in found[kind]:
                    files.setdefault(kind, []).append(tmp_path / f"{kind}-{inst}.dcm")
                    files[kind][-1].write_bytes(orthanc.instance_file(inst))
                    assert dciodvfy_errors(files[kind][-1]) == [], f"{kind} fails dciodvfy"
        finally:
            node.stop()
    assert result["segments"][0]["volume_ml"] > 0
    seg = hd.seg.segread(files["seg"][0])
    refs = [item.DerivationImageSequence[0].SourceImageSequence[0]
            for item in seg.PerFrameFunctionalGroupsSequence]
    assert {str(r.ReferencedSOPInstanceUID) for r in refs} == {str(mf.SOPInstanceUID)}
    assert all(1 <= int(r.ReferencedFrameNumber) <= int(mf.NumberOfFrames) for r in refs)
    overlay_frames = {int(pydicom.dcmread(p).SourceImageSequence[0].ReferencedFrameNumber)
                      for p in files["overlay"]}
    assert overlay_frames == {int(r.ReferencedFrameNumber) for r in refs}
    # the same model on the single-frame slices: the same mask, frame by frame
    with Registry(data) as reg:
        model = load_model(reg.get(result["model_version"]), registry=reg)
        single = run_series(slices, model, rules=default_tasks()[0].rules)
        multi = run_series([mf], model, rules=default_tasks()[0].rules)
    np.testing.assert_array_equal(multi.segment("spleen").mask, single.segment("spleen").mask)
    mask = seg.get_pixels_by_source_frame(
        str(mf.SOPInstanceUID), list(multi.volume.source_frame_numbers), combine_segments=True,
        assert_missing_frames_are_empty=True) > 0
    assert np.array_equal(mask, single.segment("spleen").mask)
