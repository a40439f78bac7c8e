"""Shadow mode (issue 16 item 3) with the real node and a real Orthanc as the PACS.

A candidate in shadow runs on the live series of its task: its SEG and SR are stored
in the twin and never sent (Orthanc receives the active model's SEG only), and
``models show`` reports one shadow series and its agreement with the active version.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.learning.shadow import agreement, promote_after_shadow, summarize
from dicom_node.queue.sender import Sender
from waiting import wait_until
from loop_helpers import install_model, pacs, results_in_orthanc, small_study, storescu, \
    write_files
from node_harness import NodeProcess
from pipelines.demo_model import DEMO_BUNDLE
from pipelines.types import SegmentResult
from registry.store import Registry
from twin_archive import Archive
from twin_archive.learning import LabelAgreement, Scanner, ShadowResult, ShadowStore
from twin_archive.reconcile import stray_files


def _seg(name: str, mask: np.ndarray) -> SegmentResult:
    return SegmentResult(label=1, name=name, mask=mask, volume_ml=float(mask.sum()) / 1000)


def test_agreement_per_label_and_summary_per_scanner() -> None:
    a = np.zeros((4, 10, 10), bool)
    a[1:3, 2:8, 2:8] = True
    b = np.zeros_like(a)
    b[1:3, 2:8, 2:5] = True
    (spleen,) = agreement([_seg("spleen", a)], [_seg("spleen", b)])
    assert spleen.dice == pytest.approx(2 * 36 / (72 + 36), abs=1e-4)
    assert spleen.volume_diff_ml == pytest.approx(-0.036)
    (gone,) = agreement([_seg("spleen", a)], [])  # the candidate found nothing
    assert gone.dice == 0.0 and gone.shadow_ml == 0.0
    sc1, sc2 = Scanner(manufacturer="A", station="CT-1"), Scanner(manufacturer="A", station="CT-2")

    def res(i: int, sc: Scanner, d: float) -> ShadowResult:
        return ShadowResult(id=i, job_key=f"j{i}", source_series_uid="1.2", task="spleen-ct",
                            shadow_version="spleen-ct-v2", active_version="spleen-ct-v1",
                            active_result_id=i, scanner=sc, created_at="", min_dice=d,
                            agreement=(LabelAgreement(name="spleen", dice=d, active_ml=100,
                                                      shadow_ml=98),), objects=())
    s = summarize("spleen-ct-v2", [res(1, sc1, 0.95), res(2, sc1, 0.9), res(3, sc2, 0.5)],
                  in_shadow=True, min_agreement=0.8)
    assert s.series == 3 and s.disagreements == 1
    by = {x.scanner.station: x for x in s.by_scanner}
    assert by["CT-1"].series == 2 and by["CT-1"].mean_dice == {"spleen": 0.925}
    assert by["CT-2"].disagreements == 1 and by["CT-1"].mean_volume_diff_ml == {"spleen": -2.0}


@pytest.mark.slow
@pytest.mark.orthanc
def test_candidate_in_shadow_stores_its_result_and_sends_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    v1 = install_model(data)
    with Registry(data) as reg:
        v2 = reg.import_bundle(DEMO_BUNDLE, task="spleen-ct", by="test",
                               reason="a candidate to try in shadow").version
    with pacs(tmp_path / "orthanc") as orthanc:
        config = ("send_backoff_initial_s = 0.5\ntrain_enabled = false\n[[destinations]]\n"
                  f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
                  'send = ["seg", "sr"]\n')
        node = NodeProcess(data, config=config, extra_args=["--stable-after", "1.5"]).start(timeout=240)
        try:
            out = node.cli("models", "shadow", v2, "--by", "test", "--reason", "try it")
            assert "in shadow mode" in out.stdout
            datasets = small_study("SH-1", slices=32, size=96, seed=11)
            for ds in datasets:
                ds.StationName = "CT-EAST"
            study_uid = str(datasets[0].StudyInstanceUID)
            storescu(node.port, write_files(datasets, tmp_path / "sh1"), node.ae_title)

            def shadowed() -> list[ShadowResult]:
                store = ShadowStore(data)
                try:
                    return store.for_version(v2)
                finally:
                    store.close()

            # polled in process: every CLI call imports torch (~30 s on a loaded 2-core box)
            (stored,) = wait_until("one shadow result", shadowed, 240, poll=2.0)
            wait_until("SEG and SR in Orthanc", lambda: (lambda f: f if f["seg"] and f["sr"]
                                                         else None)(
                results_in_orthanc(orthanc, study_uid)), 120)

            def sends() -> list:
                sender = Sender(data, ae_title="DICOM_NODE")
                try:
                    return sender.list()
                finally:
                    sender.close()

            wait_until("every send delivered",
                       lambda: all(x.state.value == "sent" for x in sends()), 60)
            found = results_in_orthanc(orthanc, study_uid)
            with Archive(data) as archive:
                [result] = archive.twins.twin("SH-1").results
            assert result["model_version"] == v1
            assert stored.active_result_id == result["id"] and stored.active_version == v1
            # Orthanc holds the active model's SEG and SR only
            assert len(found["seg"]) == 1 and len(found["sr"]) == 1
            seg_tags = orthanc.instance_tags(found["seg"][0])
            assert seg_tags["SeriesInstanceUID"] == result["seg_series_uid"]
            shadow_files = [data / o["path"] for o in stored.objects]
            assert [o["kind"] for o in stored.objects] == ["seg", "sr"]
            assert all(f.is_file() and f.parent.name == "shadow" for f in shadow_files)
            shadow_uids = {o["sop_instance_uid"] for o in stored.objects}
            sent_uids = {x.sop_instance_uid for x in sends()}
            assert len(sent_uids) == 2 and not (shadow_uids & sent_uids)
            for f in shadow_files:  # made by the candidate, kept in the twin
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                assert ds.StudyInstanceUID == study_uid
                assert ds.SeriesDescription.startswith("AI SHADOW")
            shown = json.loads(node.cli("models", "show", v2, "--json").stdout)
            sh = shown["shadow"]
            assert sh["in_shadow"] and sh["series"] == 1 and sh["disagreements"] == 0
            (sc,) = sh["by_scanner"]
            assert "CT-EAST" in sc["scanner"] and sc["series"] == 1
            assert sc["mean_dice"]["spleen"] == 1.0  # the same weights as the active version
            assert sc["mean_volume_diff_ml"]["spleen"] == 0.0
            text = node.cli("models", "show", v2).stdout
            assert "shadow        on: 1 series, 0 disagreement(s)" in text
            assert "spleen Dice 1.000 (+0.0 mL)" in text
            # the served series' figures were recorded for its scanner
            (drift,) = json.loads(node.cli("drift", "--json").stdout)
            assert drift["scanner"]["station"] == "CT-EAST" and drift["series"] == 1
            # stop it: the next series is not shadowed
            assert "stopped" in node.cli("models", "shadow", v2, "--stop").stdout
            with Registry(data) as reg:
                assert not reg.in_shadow(v2)
        finally:
            node.stop()
    # the shadow files are indexed: the start-up reconciliation leaves them where they are
    with Archive(data) as archive:
        assert stray_files(archive.ingest) == []
    # train_promote_after_shadow: a candidate waiting for 1 shadow series is promoted
    with Registry(data) as reg:
        reg.hold(v2, by="trainer", reason="awaiting shadow series: promoted after 1 live series "
                 "in shadow without a disagreement; mean Dice 0.9 reaches min_dice 0.7")
        reg.set_shadow(v2, on=True, by="test")
    lines = promote_after_shadow(data, series=1, min_agreement=0.8, by="test")
    assert lines and "promoted" in lines[0]
    with Registry(data) as reg:
        assert reg.active("spleen-ct").version == v2  # type: ignore[union-attr]
