"""A SEG type per destination (issue 25 item 4): ``seg_type`` on each ``[[destinations]]``.

When the destinations that take the SEG ask for different types, a job writes a SEG of
each type and, for each, an SR that references it; each destination gets the SEG of its
type and that SR, the overlay is shared. When they agree, one SEG and one SR.

The unit tests use a phantom result (:func:`tests.loop_helpers.phantom_result`); the
end-to-end tests a worker in this process on the demo model, a real sender and two real
Orthancs (one BINARY PACS, one that takes Label Map Segmentation Storage).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.settings import Destination, job_seg_types, seg_type_for
from pipelines import phantom as ph
from pipelines.postprocess import split_labels
from pipelines.types import ModelInfo, WriterOptions
from pipelines.validation import find_dciodvfy, predates_labelmap, validate_results
from pipelines.volume import load_series
from pipelines.writers import write_results

MODEL = ModelInfo(name="spleen_ct_segmentation", version="2", task="spleen-ct",
                  device_uid="2.25.99887766554433221100")
BINARY_SEG = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"


def _dest(name: str, seg_type: str, send: tuple[str, ...] = ("seg", "sr", "overlay"),
          port: int = 104) -> Destination:
    return Destination(name=name, ae_title=name.upper(), host="127.0.0.1", port=port,
                       send=send, seg_type=seg_type)


def test_the_seg_types_a_job_writes_and_which_each_destination_gets() -> None:
    pacs, research = _dest("pacs", "binary"), _dest("research", "labelmap")
    sr_only = _dest("reports", "labelmap", send=("sr",))
    assert job_seg_types([pacs, pacs]) == ("binary",)
    assert job_seg_types([research]) == ("labelmap",)
    assert job_seg_types([research, pacs]) == ("binary", "labelmap")
    # the SR needs a SEG: binary when no destination takes the SEG
    assert job_seg_types([sr_only]) == ("binary",) and job_seg_types([]) == ("binary",)
    assert seg_type_for(research, ("binary", "labelmap")) == "labelmap"
    assert seg_type_for(sr_only, ("binary",)) == "binary"
    with pytest.raises(ValueError, match="written"):
        seg_type_for(pacs, ())


@pytest.fixture(scope="module")
def phantom():
    anatomy = ph.Anatomy.random(4)
    g = ph.SliceGeometry(rows=32, columns=32, slices=8, pixel_spacing=(10.0, 10.0),
                         slice_spacing=12.0)
    vol = load_series(ph.ct_series(anatomy, g))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    return vol, split_labels(ph.truth_at(anatomy, vol.index_to_lps(grid)), vol, ph.LABELS)


def test_a_labelmap_seg_and_its_sr_pass_the_checks_before_sending(phantom) -> None:
    """Found here: the checks knew only Segmentation Storage, so a LABELMAP SEG (and the
    SR referencing it, by dciodvfy of 2022, which predates Label Map Segmentation) was
    held back from every destination: ``seg_type = "labelmap"`` never sent anything."""
    vol, segments = phantom
    results = write_results(vol, segments, MODEL, options=WriterOptions(
        seg_type="labelmap", write_overlay=False))
    assert results.seg.SOPClassUID == LABELMAP_SEG
    reports = validate_results(results)
    assert [r.errors for r in reports] == [(), ()]
    assert reports[0].checked_with[0] == "python" and reports[1].checked_with == (
        "python", "dciodvfy")  # the SR in full, its Label Map references read as SEG
    if predates_labelmap(find_dciodvfy() or ""):
        assert reports[0].checked_with[1:] == (
            "dciodvfy: predates Label Map Segmentation, not checked",)
    # what dciodvfy finds besides the Label Map class is still found
    del results.sr.CompletionFlag
    (sr_report,) = validate_results(results)[1:]
    assert any(e.startswith("dciodvfy:") and "CompletionFlag" in e for e in sr_report.errors)


def _record_two_types(data_dir: Path, phantom, job_key: str = "job-2"):
    """A result recorded as the worker records one for a BINARY and a LABELMAP
    destination: a SEG and an SR of each type, then the overlay (shared)."""
    from twin_archive import Archive
    from twin_archive.results import ResultStore, SegmentMeasure

    vol, segments = phantom
    pairs = [write_results(vol, segments, MODEL, options=WriterOptions(seg_type=t, write_overlay=(t == "binary")))
             for t in ("binary", "labelmap")]
    with Archive(data_dir) as archive:
        archive.db.execute("INSERT OR IGNORE INTO twins (patient_key, patient_id, donate)"
                           " VALUES ('k', 'PAT-1', 0)")
        archive.db.conn.commit()
    store = ResultStore(data_dir)
    try:
        result = store.record(
            job_key=job_key, patient_key="k", study_uid=vol.study_instance_uid,
            source_series_uid=vol.series_instance_uid, source_last_received="t",
            source_instances=len(vol.source_images), task=MODEL.task, model_name=MODEL.name,
            model_version=MODEL.version, backend="torch-cpu",
            segments=tuple(SegmentMeasure(name=s.name, volume_ml=s.volume_ml) for s in segments),
            timings={}, objects=[(k, ds) for p in pairs for k, ds in (("seg", p.seg), ("sr", p.sr))])
        result = store.add_objects(result.id, [("overlay", ds) for ds in pairs[0].overlay],
                                   timings={})
    finally:
        store.close()
    return pairs, result


def test_each_destination_is_queued_the_seg_of_its_type_and_the_sr_that_references_it(
        tmp_path: Path, phantom) -> None:
    from dicom_node.queue.sender import Sender

    pairs, result = _record_two_types(tmp_path, phantom)
    binary, labelmap = pairs
    assert result.seg_types == ("binary", "labelmap")
    assert result.seg_type_of_objects() == {
        binary.seg.SOPInstanceUID: "binary", binary.sr.SOPInstanceUID: "binary",
        labelmap.seg.SOPInstanceUID: "labelmap", labelmap.sr.SOPInstanceUID: "labelmap"}
    pacs, research = _dest("pacs", "binary", port=1), _dest("research", "labelmap", port=2)
    reports = _dest("reports", "labelmap", send=("sr",), port=3)  # SR of its type
    sender = Sender(tmp_path, ae_title="NODE")
    try:
        added = sender.enqueue(result, [pacs, research, reports])
        again = sender.enqueue(result, [pacs, research, reports])  # a re-run: nothing twice
        sends = sender.list(limit=1000)
    finally:
        sender.close()
    overlay = {str(ds.SOPInstanceUID) for ds in binary.overlay}
    by_dest: dict[str, set[str]] = {}
    for s in sends:
        by_dest.setdefault(s.destination, set()).add(s.sop_instance_uid)
    assert by_dest[pacs.key] == {binary.seg.SOPInstanceUID, binary.sr.SOPInstanceUID, *overlay}
    assert by_dest[research.key] == {labelmap.seg.SOPInstanceUID, labelmap.sr.SOPInstanceUID,
                                     *overlay}
    assert by_dest[reports.key] == {labelmap.sr.SOPInstanceUID}
    assert added == len(sends) == 2 * (2 + len(overlay)) + 1 and again == 0


# ---------------------------------------------------------------- end to end, real Orthancs
#: dciodvfy 2022's findings on a LABELMAP SEG and on an SR that references one: it
#: predates Label Map Segmentation Storage (see :mod:`pipelines.validation`).
DCIODVFY_PREDATES_LABELMAP = {
    "Error - Information Object Not found",
    "Error - SegmentNumber not monotonically increasing from one by one - have "
    "SegmentSequence item number 1 (from one) with SegmentNumber of 0",
    "Error - Shall not be present for Referenced SOP Class that is not segmentation - "
    "attribute <ReferencedSegmentNumber>"}


@pytest.fixture(scope="module")
def two_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, object]]:
    """A BINARY PACS (Orthanc as it comes: DCMTK 3.6.7 knows no Label Map class) and one
    that takes Label Map Segmentation Storage (``UnknownSopClassAccepted``)."""
    from tests.loop_helpers import pacs

    tmp = tmp_path_factory.mktemp("seg-type-pacs")
    with pacs(tmp / "binary", aet="BINARY_PACS") as binary, \
            pacs(tmp / "labelmap", aet="LABELMAP_PACS",
                 extra_config={"UnknownSopClassAccepted": True}) as labelmap:
        yield binary, labelmap


def _pacs_dest(orthanc, seg_type: str, name: str) -> Destination:
    return Destination(name=name, ae_title=orthanc.aet, host="127.0.0.1",
                       port=orthanc.dicom_port, seg_type=seg_type, confirm="none")


class _Node:
    """The node's stores, a monitor, a worker and a sender on one data directory."""

    def __init__(self, data: Path, destinations: list[Destination]) -> None:
        from dicom_node.queue.jobs import JobQueue
        from dicom_node.queue.monitor import StabilityMonitor
        from dicom_node.queue.sender import Sender
        from dicom_node.runtime.worker import Worker
        from dicom_node.tasks import default_tasks
        from tests.loop_helpers import install_model
        from twin_archive import Archive
        from twin_archive.results import ResultStore

        install_model(data)
        self.archive = Archive(data)
        self.jobs = JobQueue(data)
        self.results = ResultStore(data)
        self.sender = Sender(data, ae_title="DICOM_NODE", network_timeout_s=30)
        self.monitor = StabilityMonitor(self.archive, self.jobs, default_tasks(),
                                        stable_after_s=0.01)
        self.worker = Worker(archive=self.archive, jobs=self.jobs, results=self.results,
                             sender=self.sender, destinations=destinations,
                             tasks=default_tasks())

    def claim(self, study: list) -> object:
        from tests.learning_helpers import store_all
        from tests.waiting import wait_until

        store_all(self.archive, study)
        uid = str(study[0].SeriesInstanceUID)
        wait_until("the series to go quiet", lambda: [
            d for d in self.monitor.poll() if d.series_uid == uid], 30, poll=0.05)
        return wait_until("the job", self.jobs.claim, 10, poll=0.05)

    def send_all(self) -> None:
        from tests.waiting import wait_until

        wait_until("every queued object sent", lambda: (self.sender.send_due() or True)
                   and self.sender.pending() == 0, 120, poll=0.2)

    def close(self) -> None:
        for closeable in (self.sender, self.results, self.jobs, self.archive):
            closeable.close()


def _received(orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The SEGs and SRs a PACS holds of one study, read back from it."""
    found: dict[str, list[pydicom.Dataset]] = {"seg": [], "sr": [], "other": []}
    for inst in orthanc.post_json("/tools/find", {"Level": "Instance", "Query": {
            "StudyInstanceUID": study_uid}}) or []:
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(inst)))
        kind = ("seg" if ds.Modality == "SEG" else "sr" if ds.Modality == "SR" else "other")
        found[kind].append(ds)
    return found


def _evidence(sr: pydicom.Dataset) -> set[str]:
    return {str(sop.ReferencedSOPInstanceUID)
            for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}


def _dciodvfy(ds: pydicom.Dataset, folder: Path) -> list[str]:
    from tests.loop_helpers import dciodvfy_errors

    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return dciodvfy_errors(path)


@pytest.mark.orthanc
def test_each_pacs_gets_the_seg_of_its_type_and_the_sr_of_that_seg_even_after_a_crash(
        two_pacs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two destinations, BINARY and LABELMAP. The node stops (here: the queueing raises)
    after the job recorded its results and before it queued them; the job's re-run
    queues each PACS its own SEG and SR from what the twin holds, and a further re-run
    queues nothing twice. The twin keeps one result: one measurement of the study;
    erasing the patient removes both SEGs and both SRs."""
    from tests.loop_helpers import small_study
    from twin_archive.erasure import Erasure
    from twin_archive.history import HistoryStore

    binary_pacs, labelmap_pacs = two_pacs
    node = _Node(tmp_path / "data", [_pacs_dest(binary_pacs, "binary", "pacs"),
                                     _pacs_dest(labelmap_pacs, "labelmap", "research")])
    study = small_study("SEGTYPE-1", slices=24, size=96, seed=6)
    study_uid = str(study[0].StudyInstanceUID)
    try:
        job = node.claim(study)
        enqueue = node.sender.enqueue
        monkeypatch.setattr(node.sender, "enqueue", lambda *a, **k: (_ for _ in ()).throw(
            OSError("node stopped")))
        with pytest.raises(OSError, match="node stopped"):
            node.worker.run(job)
        monkeypatch.setattr(node.sender, "enqueue", enqueue)
        assert node.sender.list(limit=100) == []  # recorded, nothing queued
        again = node.worker.run(job)
        assert again.note == "already recorded"
        node.send_all()
        sends = len(node.sender.list(limit=1000))
        assert node.worker.run(job).note == "already recorded"
        assert len(node.sender.list(limit=1000)) == sends  # nothing queued twice
        result = node.results.by_job_key(job.key)
        assert result is not None and result.seg_types == ("binary", "labelmap")
        assert [o.kind for o in result.objects].count("seg") == 2
        assert [o.kind for o in result.objects].count("sr") == 2
        points = HistoryStore(tmp_path / "data").history(result.patient_key, job.task)
        assert len(points) == len(result.segments)  # one measurement of the study
    finally:
        node.close()
    for orthanc, seg_type, sop_class in ((binary_pacs, "BINARY", BINARY_SEG),
                                         (labelmap_pacs, "LABELMAP", LABELMAP_SEG)):
        got = _received(orthanc, study_uid)
        (seg,), (sr,) = got["seg"], got["sr"]
        assert seg.SOPClassUID == sop_class
        assert hd.seg.Segmentation.from_dataset(seg).segmentation_type.value == seg_type
        report = hd.sr.srread(io.BytesIO(_bytes(sr)))
        refs = {str(g.referenced_segment.referenced_sop_instance_uid) for g in
                report.content.get_volumetric_roi_measurement_groups()}
        assert refs == {str(seg.SOPInstanceUID)} and str(seg.SOPInstanceUID) in _evidence(sr)
        assert got["other"], "the overlay is shared"
        for ds in (seg, sr, got["other"][0]):
            errors = _dciodvfy(ds, tmp_path)
            allowed = DCIODVFY_PREDATES_LABELMAP if seg_type == "LABELMAP" and ds is not \
                got["other"][0] else set()
            assert set(errors) <= allowed, errors
    # the two PACS hold each other's SEG and SR not at all, and share the overlay
    b, lm = _received(binary_pacs, study_uid), _received(labelmap_pacs, study_uid)
    assert {d.SOPInstanceUID for d in b["seg"] + b["sr"]}.isdisjoint(
        {d.SOPInstanceUID for d in lm["seg"] + lm["sr"]})
    assert {d.SOPInstanceUID for d in b["other"]} == {d.SOPInstanceUID for d in lm["other"]}
    files = [o.path for o in result.objects]
    assert all(p.is_file() for p in files)
    with Erasure(tmp_path / "data") as erasure:
        erasure.erase(result.patient_key)
    assert not any(p.exists() for p in files)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.orthanc
def test_destinations_that_agree_get_one_seg_and_one_sr(two_pacs, tmp_path: Path) -> None:
    """The common case costs nothing more: one SEG, one SR, the same to both PACS."""
    from tests.loop_helpers import small_study

    binary_pacs, labelmap_pacs = two_pacs
    node = _Node(tmp_path / "data", [_pacs_dest(binary_pacs, "binary", "a"),
                                     _pacs_dest(labelmap_pacs, "binary", "b")])
    study = small_study("SEGTYPE-2", slices=24, size=96, seed=7)
    try:
        job = node.claim(study)
        node.worker.run(job)
        node.send_all()
        result = node.results.by_job_key(job.key)
    finally:
        node.close()
    assert result is not None and result.seg_types == ("binary",)
    assert [o.kind for o in result.objects if o.kind in ("seg", "sr")] == ["seg", "sr"]
    assert "other_seg_types_s" not in result.timings
    got = [_received(o, str(study[0].StudyInstanceUID)) for o in two_pacs]
    assert [[d.SOPInstanceUID for d in g["seg"] + g["sr"]] for g in got] == [
        [o.sop_instance_uid for o in result.objects if o.kind in ("seg", "sr")]] * 2


def test_the_sr_of_each_type_references_the_prior_seg_and_earlier_sr_of_its_type(
        tmp_path: Path, phantom) -> None:
    """With a prior result that has a SEG of each type, the SR of each type references
    the prior's SEG of that type (the one its destinations received); the earlier SRs
    it supersedes are those of its type, or all when none is."""
    import datetime as dt

    from dicom_node.runtime.prior_results import PriorLookup, as_prior_result
    from dicom_node.runtime.worker import _of_type
    from twin_archive.history import PriorRecord

    pairs, result = _record_two_types(tmp_path, phantom)
    record = PriorRecord(result=result, study_date=dt.date(2025, 12, 3))
    lookup = PriorLookup(prior=as_prior_result(record), note="", seconds=0.0, record=record)
    assert lookup.prior is not None and lookup.prior.seg.SOPClassUID == BINARY_SEG  # the first
    for seg_type, pair in zip(("binary", "labelmap"), pairs, strict=True):
        prior = lookup.for_seg_type(seg_type)
        assert prior is not None and prior.seg.SOPInstanceUID == pair.seg.SOPInstanceUID
    binary_sr, labelmap_sr = (p.sr for p in pairs)
    earlier = [("binary", binary_sr), ("labelmap", labelmap_sr)]
    assert _of_type(earlier, "labelmap") == [labelmap_sr]
    assert _of_type(earlier[:1], "labelmap") == [binary_sr]  # it got the BINARY one before
