"""Issue 26 without a network: a result set against the prior one, the SR's time points,
the overlay's banner line and chart, the twin's history and the ``twin history`` command.

Two studies of one phantom patient a year apart, the spleen 50 % larger in the second
(:func:`two_studies`); the "model output" is the phantom's truth, so every volume and
every change is known.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from node_harness import incoming
from pipelines import phantom as ph
from pipelines.comparison import PriorResult, PriorSegment, banner_line, compare
from pipelines.postprocess import split_labels
from pipelines.types import ModelInfo
from pipelines.volume import load_series
from pipelines.writers import build_overlay, save_results, write_results
from pipelines.writers.history_plot import VolumePoint, history_image, plot_volumes, point_position
from twin_archive import Archive
from twin_archive.history import HistoryStore
from twin_archive.results import ResultStore, SegmentMeasure

MODEL = ModelInfo(name="spleen_ct_segmentation", version="0.5.8", backend="torch-cpu",
                  source="dicom-node registry", task="spleen-ct",
                  device_uid="2.25.301234567890123456789012345678901234")
GROWTH = 1.5  # the spleen's volume in the second study, times the first's
PIXELMED = "/usr/share/java/pixelmed.jar"
JAVA = ["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
        "-Djdk.xml.xpathTotalOpLimit=0", "-cp", PIXELMED]
REPO = Path(__file__).resolve().parents[1]


def grown(anatomy: ph.Anatomy, factor: float) -> ph.Anatomy:
    """The same patient with the spleen's volume times ``factor`` (radii scaled)."""
    spleen = anatomy.organs[-1]
    assert spleen.name == "spleen"
    s = factor ** (1 / 3)
    return dataclasses.replace(anatomy, organs=(*anatomy.organs[:-1], dataclasses.replace(
        spleen, radii=tuple(r * s for r in spleen.radii))))


def study(anatomy: ph.Anatomy, date: str, patient_id: str = "PRIOR-1") -> list[pydicom.Dataset]:
    g = ph.SliceGeometry(rows=40, columns=48, slices=14, pixel_spacing=(8.0, 7.5), slice_spacing=9.0)
    dss = ph.ct_series(anatomy, g, ph.StudyInfo(patient_id=patient_id))
    for ds in dss:
        ds.StudyDate = date
    return dss


def truth_result(dss: list[pydicom.Dataset], anatomy: ph.Anatomy, **kw):
    vol = load_series(dss)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    segments = split_labels(ph.truth_at(anatomy, vol.index_to_lps(grid)), vol, ph.LABELS)
    return vol, segments, write_results(vol, segments, MODEL, **kw)


@pytest.fixture(scope="module")
def two_studies():
    a1 = ph.Anatomy.random(7)
    first = study(a1, "20251203")
    v1, s1, r1 = truth_result(first, a1)
    prior = PriorResult(study_uid=v1.study_instance_uid, study_date=dt.date(2025, 12, 3),
                        segments=tuple(PriorSegment(name=s.name, volume_ml=s.volume_ml)
                                       for s in s1 if s.volume_ml > 0),
                        seg=r1.seg, model_version="0.5.8")
    a2 = grown(a1, GROWTH)
    second = study(a2, "20261203")
    vol = load_series(second)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    s2 = split_labels(ph.truth_at(a2, vol.index_to_lps(grid)), vol, ph.LABELS)
    comparison = compare([(s.name, s.volume_ml) for s in s2], dt.date(2026, 12, 3), prior)
    r2 = write_results(vol, s2, MODEL, comparison=comparison)
    return {"first": first, "second": second, "r1": r1, "r2": r2, "prior": prior,
            "comparison": comparison, "s1": s1, "s2": s2, "vol": vol}


def test_the_change_per_segment_is_the_phantoms(two_studies) -> None:
    c = two_studies["comparison"]
    assert c.interval_days == 365
    spleen = c.change("spleen")
    before = next(s.volume_ml for s in two_studies["s1"] if s.name == "spleen")
    assert spleen.prior_volume_ml == pytest.approx(before)
    # voxelised truth: the change is the phantom's +50 % to within the voxel grid's error
    assert spleen.change_pct == pytest.approx(50.0, abs=6.0)
    assert spleen.change_ml == pytest.approx(spleen.volume_ml - before, abs=1e-3)
    assert c.change("liver").change_pct == 0.0  # unchanged organs stay put
    line = banner_line(c)
    assert line.startswith(f"spleen {spleen.change_pct:+.0f} %;") and line.endswith("since 2025-12-03")
    assert banner_line(None, note="no comparison: PACS X did not answer") == \
        "no comparison: PACS X did not answer"


def test_a_prior_must_be_earlier() -> None:
    prior = PriorResult(study_uid="1.2.3", study_date=dt.date(2026, 1, 1),
                        segments=(PriorSegment(name="spleen", volume_ml=100.0),))
    with pytest.raises(ValueError, match="not before"):
        compare([("spleen", 120.0)], dt.date(2026, 1, 1), prior)
    with pytest.raises(ValueError, match="volume_ml"):
        PriorSegment(name="spleen", volume_ml=float("nan"))
    zero = PriorResult(study_uid="1.2.3", study_date=dt.date(2025, 1, 1),
                       segments=(PriorSegment(name="spleen", volume_ml=0.0),))
    c = compare([("spleen", 12.0), ("liver", 0.0)], dt.date(2026, 1, 1), zero)
    assert c.change("spleen").change_pct is None and c.change("liver") is None
    assert banner_line(c) == "spleen +12.0 mL since 2025-01-01"


def test_sr_with_the_prior_is_clean_and_says_it_the_dicom_way(two_studies, tmp_path) -> None:
    r2, prior = two_studies["r2"], two_studies["prior"]
    [sr_path] = [p for p in save_results(r2, tmp_path) if p.name.startswith("SR_")]
    run = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=120)
    assert [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")] == []
    out = subprocess.run([*JAVA, "com.pixelmed.validate.DicomSRValidator", str(sr_path)],
                         capture_output=True, text=True, timeout=300)
    lines = (out.stdout + out.stderr).splitlines()
    assert "Found Root Template TID_1500 (MeasurementReport)" in lines
    assert [ln for ln in lines if ln.startswith("Error")] == []
    sr = hd.sr.srread(sr_path)
    # the prior study is evidence: another study, so Pertinent Other Evidence
    other = sr.PertinentOtherEvidenceSequence
    assert [str(i.StudyInstanceUID) for i in other] == [prior.study_uid]
    refs = {str(s.ReferencedSOPInstanceUID) for i in other for se in i.ReferencedSeriesSequence
            for s in se.ReferencedSOPSequence}
    assert refs == {str(prior.seg.SOPInstanceUID)}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    by_tracking: dict[str, list] = {}
    for g in groups:
        by_tracking.setdefault(str(g.tracking_uid), []).append(g)
    spleen_uid = next(str(i.TrackingUID) for i in r2.seg.SegmentSequence
                      if str(i.SegmentLabel) == "spleen")
    pair = by_tracking[spleen_uid]
    assert len(pair) == 2  # today and the prior: one finding tracked over two time points
    seen = {}
    for g in pair:
        items = {str(i.ConceptNameCodeSequence[0].CodeValue): i for i in g[0].ContentSequence}
        assert str(items["C2348792"].TextValue) in ("2025-12-03", "2026-12-03")  # Time Point
        seen[str(items["C2348792"].TextValue)] = (
            str(items["126070"].TextValue),  # Subject Time Point Identifier
            g.get_measurements()[0].value, g.referenced_segment.referenced_sop_instance_uid)
    assert seen["2025-12-03"][0] == prior.study_uid
    assert seen["2026-12-03"][0] == two_studies["vol"].study_instance_uid
    spleen = two_studies["comparison"].change("spleen")
    assert float(seen["2025-12-03"][1]) == pytest.approx(spleen.prior_volume_ml, abs=1e-3)
    assert float(seen["2026-12-03"][1]) == pytest.approx(spleen.volume_ml, abs=1e-3)
    assert seen["2025-12-03"][2] == prior.seg.SOPInstanceUID
    assert seen["2026-12-03"][2] == r2.seg.SOPInstanceUID


def test_without_the_prior_seg_the_sr_carries_only_todays_time_point(two_studies) -> None:
    prior = dataclasses.replace(two_studies["prior"], seg=None)
    c = compare([(s.name, s.volume_ml) for s in two_studies["s2"]], dt.date(2026, 12, 3), prior)
    r = write_results(two_studies["vol"], two_studies["s2"], MODEL, comparison=c)
    assert "PertinentOtherEvidenceSequence" not in r.sr
    groups = hd.sr.Comprehensive3DSR.from_dataset(r.sr).content \
        .get_volumetric_roi_measurement_groups()
    assert len(groups) == len([s for s in two_studies["s2"] if s.volume_ml > 0])


def _red_rows(px: np.ndarray) -> int:
    red = ((px == (200, 0, 0)).all(axis=2)).mean(axis=1) > 0.5
    return int(red.sum())


def test_overlay_banner_gains_the_comparison_line(two_studies) -> None:
    vol, segs = two_studies["vol"], two_studies["s2"]
    plain = build_overlay(vol, segs, MODEL)
    noted = build_overlay(vol, segs, MODEL, note=banner_line(two_studies["comparison"]))
    assert len(plain) == len(noted)
    a, b = plain[0].pixel_array, noted[0].pixel_array
    assert _red_rows(b) > _red_rows(a)  # the banner strip grew by the line
    assert b.shape[0] > a.shape[0] and b.shape[1] == a.shape[1]
    # the written overlay (write_results with a comparison) has the line too
    assert two_studies["r2"].overlay[0].pixel_array.shape == b.shape


def test_chart_points_are_where_the_volumes_say(tmp_path) -> None:
    points = [VolumePoint(segment="spleen", study_date=dt.date(2024, 12, 1), volume_ml=150.0),
              VolumePoint(segment="spleen", study_date=dt.date(2025, 12, 3), volume_ml=200.0),
              VolumePoint(segment="spleen", study_date=dt.date(2026, 12, 3), volume_ml=300.0),
              VolumePoint(segment="liver", study_date=dt.date(2025, 12, 3), volume_ml=1400.0)]
    rgb = plot_volumes(points)
    path = tmp_path / "h.png"
    Image.fromarray(rgb, "RGB").save(path)
    opened = np.asarray(Image.open(path).convert("RGB"))
    from pipelines.writers.history_plot import segment_colour

    for p in points:
        x, y = point_position(points, p)
        colour = segment_colour(p.segment, 0 if p.segment == "spleen" else 1)
        assert tuple(opened[y, x]) == colour, p
    # higher volume, higher on the picture; later date, further right
    ys = [point_position(points, p)[1] for p in points[:3]]
    xs = [point_position(points, p)[0] for p in points[:3]]
    assert ys[0] > ys[1] > ys[2] and xs[0] < xs[1] < xs[2]


def test_chart_is_one_more_image_of_the_overlay_series(two_studies, tmp_path) -> None:
    overlay = two_studies["r2"].overlay
    points = [VolumePoint(segment="spleen", study_date=dt.date(2025, 12, 3), volume_ml=60.0),
              VolumePoint(segment="spleen", study_date=dt.date(2026, 12, 3), volume_ml=90.0)]
    img = history_image(points, overlay)
    assert img.SeriesInstanceUID == overlay[0].SeriesInstanceUID
    assert int(img.InstanceNumber) == len(overlay) + 1
    from pipelines.validation import validate_series

    assert [r.reason for r in validate_series([img], "overlay") if not r.ok] == []
    path = tmp_path / "chart.dcm"
    img.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    assert [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")] == []
    with pytest.raises(ValueError, match="two time points"):
        history_image(points[:1], overlay)


def _record(archive: Archive, results: ResultStore, dss, volumes: dict[str, float], key: str):
    for ds in dss:
        archive.ingest.store(incoming(ds))
    twin_key = archive.twins.find_twin_keys(str(dss[0].PatientID))[0]
    return results.record(
        job_key=key, patient_key=twin_key, study_uid=str(dss[0].StudyInstanceUID),
        source_series_uid=str(dss[0].SeriesInstanceUID), source_last_received="x",
        source_instances=len(dss), task="spleen-ct", model_name="m", model_version="v1",
        backend="cpu", segments=tuple(SegmentMeasure(name=k, volume_ml=v) for k, v in volumes.items()),
        timings={}, objects=())


def test_history_store_and_twin_history_command(tmp_path, two_studies) -> None:
    data = tmp_path / "data"
    archive = Archive(data)
    results = ResultStore(data)
    a = ph.Anatomy.random(3)
    older = study(a, "20241201", "HIST-1")
    first = study(a, "20251203", "HIST-1")
    second = study(a, "20261203", "HIST-1")
    _record(archive, results, second, {"spleen": 300.0}, "k3")  # recorded out of date order
    _record(archive, results, older, {"spleen": 150.0}, "k1")
    r2 = _record(archive, results, first, {"spleen": 200.0, "liver": 1400.0}, "k2")
    key = r2.patient_key
    with HistoryStore(data) as store:
        points = store.history(key, "spleen-ct")
        assert [(p.study_date, p.segment, p.volume_ml) for p in points] == [
            ("2024-12-01", "spleen", 150.0), ("2025-12-03", "spleen", 200.0),
            ("2025-12-03", "liver", 1400.0), ("2026-12-03", "spleen", 300.0)]
        prior = store.prior_result(key, "spleen-ct", str(second[0].StudyInstanceUID))
        assert prior.result.id == r2.id and prior.study_date == dt.date(2025, 12, 3)
        assert store.prior_result(key, "spleen-ct", str(older[0].StudyInstanceUID)) is None
        assert store.prior_result(key, "other-task", str(second[0].StudyInstanceUID)) is None
        assert store.mark_retrieved([str(older[0].SeriesInstanceUID), "1.2.404"], source="PACS",
                                    for_study_uid=str(second[0].StudyInstanceUID)) == 1
        assert store.is_retrieved(str(older[0].SeriesInstanceUID))
        assert store.studies_within(key, str(second[0].StudyInstanceUID),
                                    dt.date(2025, 1, 1)) == [str(first[0].StudyInstanceUID)]
    archive.close()
    results.close()
    png = tmp_path / "history.png"
    run = subprocess.run([sys.executable, "-m", "dicom_node", "--data-dir", str(data), "twin",
                          "history", "HIST-1", "--task", "spleen-ct", "--json", "--plot", str(png)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)["points"]
    spleen = [r for r in rows if r["segment"] == "spleen"]
    assert [(r["change_ml"], r["change_pct"], r["interval_days"]) for r in spleen] == [
        (None, None, None), (50.0, 33.3, 367), (100.0, 50.0, 365)]
    assert spleen[0]["retrieved"] is True and spleen[2]["retrieved"] is False
    picture = np.asarray(Image.open(png).convert("RGB"))
    from pipelines.writers.history_plot import VolumePoint as VP
    from pipelines.writers.history_plot import segment_colour

    drawn = [VP(segment=r["segment"], study_date=dt.date.fromisoformat(r["study_date"]),
                volume_ml=r["volume_ml"]) for r in rows]
    for p in drawn:
        x, y = point_position(drawn, p)
        assert tuple(picture[y, x]) == segment_colour(p.segment, 0 if p.segment == "spleen" else 1)
    text = subprocess.run([sys.executable, "-m", "dicom_node", "--data-dir", str(data), "twin",
                           "history", "HIST-1"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert text.returncode == 0, text.stderr
    assert "+100.0 mL +50 %" in text.stdout and "(prior from the PACS)" in text.stdout


def test_a_retrieved_prior_reaches_training_only_if_the_patient_donates(tmp_path) -> None:
    """Consent unchanged (issue 26, item 4): a prior retrieved from the PACS is a study of
    the twin like any other; labelled, it is in a dataset only while the patient donates."""
    from dicom_node.tasks import default_tasks
    from learning_helpers import labelled_patients
    from trainer.dataset import build_dataset
    from twin_archive.labels import LabelStore

    data = tmp_path / "data"
    archive = Archive(data)
    labels = LabelStore(data)
    labelled_patients(archive, labels, ["PRIOR-C"], seed=11, donors=0)
    key = archive.twins.find_twin_keys("PRIOR-C")[0]
    detail = archive.twins.twin("PRIOR-C")
    ct = [se.series_uid for st in detail.studies for se in st.series if se.modality == "CT"]
    with HistoryStore(data) as store:
        assert store.mark_retrieved(ct, source="PACS", for_study_uid="1.2.3") == 1
        assert store.is_retrieved(ct[0])
    rules = default_tasks()[0].rules
    assert build_dataset(archive, labels, "spleen-ct", rules).items == ()  # does not donate
    archive.twins.set_consent("PRIOR-C", donate=True, by="test")
    items = build_dataset(archive, labels, "spleen-ct", rules).items
    assert [i.series_uid for i in items] == ct and items[0].patient_key == key
    labels.close()
    archive.close()


def test_the_study_date_is_read_as_the_twin_reads_it_when_it_picks_the_prior() -> None:
    """The twin picks a prior by its Study Date (``study_day``: ``YYYYMMDD``, ``YYYY-MM-DD``,
    ``YYYY.MM.DD``); the pipeline reads today's date the same way, so a prior found for
    a series with an old-style date is compared, not dropped as 'Study Date absent'."""
    from pipelines.comparison import study_date_of
    from twin_archive.history import study_day

    for text in ("20261203", "2026-12-03", "2026.12.03", "", "2026", "20261340"):
        ds = pydicom.Dataset()
        ds.StudyDate = text
        assert study_date_of(ds) == study_day(text), text
    assert study_date_of(pydicom.Dataset()) is None
