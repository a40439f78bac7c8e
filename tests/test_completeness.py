"""Results the moment the series ends: MPPS and learned completeness (issue 29, items 1-2).

The real node (subprocess) gets MPPS from pynetdicom as the scanner's MPPS SCU over real
associations, and images from dcmtk ``storescu``. With the quiet period set long
(``stable_after`` 60 s), a series whose MPPS COMPLETED lists every instance received
gets its job (and, with a model and a real Orthanc, its SEG and SR) at once; the MPPS is
passed on to a pynetdicom MPPS SCP standing in for the PACS (Orthanc has no MPPS SCP).
DISCONTINUED, a COMPLETED that lists an instance that never comes, and malformed or
out-of-order messages are checked with the status each must get. A scanner's series
size is learned: its third series completes early, a shorter one from it still waits,
a late instance re-opens an early one (counted in ``status`` and ``/metrics``) and the
scanner that re-opens too often loses its early start.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from loop_helpers import install_model, pacs, results_in_orthanc, small_study, storescu, write_files
from node_harness import NodeProcess, free_port
from waiting import wait_until

STATION = "CT-ROOM-1"


# ------------------------------------------------------------------ the scanner's side
def _associate(port: int, calling: str = "SCANNER") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    return assoc


def n_create(port: int, step_uid: str, *, study_uid: str, status: str | None = "IN PROGRESS",
             drop: str = "") -> int:
    """Send an N-CREATE; return the status the node answered."""
    ds = Dataset()
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    ds.PerformedStationAETitle = "SCANNER"
    ds.PerformedStationName = STATION
    ds.PerformedProcedureStepID = "PPS-1"
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = "20261206", "120000"
    item = Dataset()
    item.StudyInstanceUID = study_uid
    ds.ScheduledStepAttributesSequence = DicomSequence([item])
    ds.PerformedSeriesSequence = DicomSequence([])
    if drop:
        delattr(ds, drop)
    assoc = _associate(port)
    try:
        rsp, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, step_uid)
    finally:
        assoc.release()
    return int(rsp.Status)


def performed(series: dict[str, list[Dataset]], extra: dict[str, list[str]] | None = None
              ) -> DicomSequence:
    """A Performed Series Sequence listing every instance of ``series`` (and ``extra`` UIDs)."""
    items = []
    for uid, datasets in series.items():
        item = Dataset()
        item.SeriesInstanceUID = uid
        item.SeriesDescription = "abdomen"
        refs = []
        for ds in datasets:
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            refs.append(ref)
        for sop in (extra or {}).get(uid, []):
            ref = Dataset()
            ref.ReferencedSOPClassUID = datasets[0].SOPClassUID
            ref.ReferencedSOPInstanceUID = sop
            refs.append(ref)
        item.ReferencedImageSequence = DicomSequence(refs)
        items.append(item)
    return DicomSequence(items)


def n_set(port: int, step_uid: str, status: str | None, series: DicomSequence | None = None) -> int:
    """Send an N-SET; return the status the node answered."""
    ds = Dataset()
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = "20261206", "121000"
    if series is not None:
        ds.PerformedSeriesSequence = series
    assoc = _associate(port)
    try:
        rsp, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, step_uid)
    finally:
        assoc.release()
    return int(rsp.Status)


# ------------------------------------------------------------------ the node's side
def decisions(data_dir: Path) -> dict[str, tuple[str, str]]:
    """Series UID -> (decision, completed_by) from the node's queue (read from outside)."""
    path = data_dir / "queue.sqlite"
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {u: (d, b) for u, d, b in conn.execute(
            "SELECT series_uid, decision, completed_by FROM monitored_series")}
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def series(patient: str, slices: int, *, seed: int = 5, description: str = "abdomen") -> list[Dataset]:
    datasets = small_study(patient, slices=slices, size=32, seed=seed)
    for ds in datasets:
        ds.StationName = STATION
        ds.SeriesDescription = description
    return datasets


def _send(node: NodeProcess, datasets: list[Dataset], folder: Path) -> float:
    storescu(node.port, write_files(datasets, folder))
    return time.monotonic()


def _node(tmp_path: Path, stable_after: float, extra: str = "", workers: int = 0) -> NodeProcess:
    data = tmp_path / "data"
    return NodeProcess(data, workers=workers, config=f"stable_after = {stable_after}\n{extra}")


@pytest.fixture
def quiet_node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node whose quiet period is 3 s (no inference worker)."""
    node = _node(tmp_path, 3.0).start()
    yield node
    node.stop()


# ------------------------------------------------------------------ an MPPS SCP as the PACS
class MppsPacs:
    """A pynetdicom MPPS SCP that records what it receives (the PACS behind the node)."""

    def __init__(self, port: int | None = None) -> None:
        self.received: list[tuple[str, str, str]] = []  # (N-CREATE/N-SET, step, status)
        self.refuse: dict[str, int] = {}  # step -> the status its N-SET gets
        self.port = port or free_port()
        self.ae = AE(ae_title="PACS_MPPS")
        self.ae.add_supported_context(ModalityPerformedProcedureStep)
        handlers = [(evt.EVT_N_CREATE, self._create), (evt.EVT_N_SET, self._set)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=handlers)
        self.lock = threading.Lock()

    def _create(self, event: Any) -> tuple[int, Dataset]:
        ds = event.attribute_list
        with self.lock:
            self.received.append(("N-CREATE", str(event.request.AffectedSOPInstanceUID),
                                  str(ds.PerformedProcedureStepStatus)))
        return 0x0000, ds

    def _set(self, event: Any) -> tuple[int, None]:
        ds = event.modification_list
        with self.lock:
            self.received.append(("N-SET", str(event.request.RequestedSOPInstanceUID),
                                  str(ds.get("PerformedProcedureStepStatus", ""))))
        return self.refuse.get(str(event.request.RequestedSOPInstanceUID), 0x0000), None

    def stop(self) -> None:
        self.server.shutdown()


# ------------------------------------------------------------------ the tests
@pytest.mark.orthanc
def test_mpps_completed_gives_the_result_without_waiting_the_quiet_period(tmp_path: Path) -> None:
    """IN PROGRESS, images, COMPLETED: SEG and SR in Orthanc long before the 60 s quiet
    period; the MPPS reaches the PACS's MPPS SCP in order."""
    mpps_pacs = MppsPacs()
    with pacs(tmp_path / "orthanc") as orthanc:
        data = tmp_path / "data"
        data.mkdir()
        install_model(data)
        config = (f'forward_mpps = "PACS_MPPS@127.0.0.1:{mpps_pacs.port}"\n'
                  "[[destinations]]\n"
                  f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
                  'send = ["seg", "sr"]\n')
        node = NodeProcess(data, workers=1, config="stable_after = 60\n" + config).start()
        try:
            datasets = small_study("MPPS-1", slices=24, size=64)
            study, uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
            step = generate_uid()
            assert n_create(node.port, step, study_uid=study) == 0x0000
            _send(node, datasets, tmp_path / "s1")
            start = time.monotonic()
            assert n_set(node.port, step, "COMPLETED", performed({uid: datasets})) == 0x0000
            wait_until("the series decided by MPPS", lambda: decisions(data).get(uid), 10,
                       poll=0.05)
            assert decisions(data)[uid] == ("queued", "mpps")
            assert time.monotonic() - start < 5.0  # not 60 s
            wait_until("SEG and SR in Orthanc", lambda: (lambda r: r["seg"] and r["sr"])(
                results_in_orthanc(orthanc, study)), 50, poll=0.5)
            assert time.monotonic() - start < 55.0, "the result waited for the quiet period"
            wait_until("the MPPS passed on", lambda: len(mpps_pacs.received) == 2, 20, poll=0.1)
            assert mpps_pacs.received == [("N-CREATE", step, "IN PROGRESS"),
                                          ("N-SET", step, "COMPLETED")]
            assert f"series {uid} complete early (mpps: MPPS step {step} COMPLETED" in node.log()
        finally:
            node.stop()
            mpps_pacs.stop()


def test_mpps_discontinued_waits_for_the_quiet_period(quiet_node: NodeProcess,
                                                      tmp_path: Path) -> None:
    node = quiet_node
    datasets = series("DISC-1", 6)
    uid, step = str(datasets[0].SeriesInstanceUID), generate_uid()
    assert n_create(node.port, step, study_uid=str(datasets[0].StudyInstanceUID)) == 0x0000
    sent = _send(node, datasets, tmp_path / "s")
    assert n_set(node.port, step, "DISCONTINUED", performed({uid: datasets})) == 0x0000
    wait_until("the series decided", lambda: decisions(node.data_dir).get(uid), 20, poll=0.1)
    assert time.monotonic() - sent >= 2.5  # the quiet period (3 s), not at once
    assert decisions(node.data_dir)[uid][1] == "quiet"
    assert f"MPPS step {step} from SCANNER: DISCONTINUED" in node.log()
    # Nothing may follow a DISCONTINUED: the step may no longer be updated (0110).
    assert n_set(node.port, step, "COMPLETED", performed({uid: datasets})) == 0x0110


def test_mpps_completed_listing_an_instance_that_never_comes(quiet_node: NodeProcess,
                                                             tmp_path: Path) -> None:
    node = quiet_node
    datasets = series("MISS-1", 6)
    uid, step, ghost = str(datasets[0].SeriesInstanceUID), generate_uid(), generate_uid()
    assert n_create(node.port, step, study_uid=str(datasets[0].StudyInstanceUID)) == 0x0000
    sent = _send(node, datasets, tmp_path / "s")
    assert n_set(node.port, step, "COMPLETED", performed({uid: datasets}, {uid: [ghost]})) == 0
    time.sleep(1.0)
    assert uid not in decisions(node.data_dir)  # waits: one listed instance is not in
    wait_until("the series decided", lambda: decisions(node.data_dir).get(uid), 20, poll=0.1)
    assert time.monotonic() - sent >= 2.5
    assert decisions(node.data_dir)[uid][1] == "quiet"
    log = node.log()
    assert f"MPPS step {step} COMPLETED lists 1 instance(s) never received ({ghost})" in log
    assert "WARNING" in next(line for line in log.splitlines() if ghost in line and "never" in line)


@pytest.mark.parametrize("fast_receive", [True, False], ids=["fast", "plain"])
def test_mpps_refuses_malformed_and_out_of_order_messages(node: NodeProcess) -> None:
    """Each refusal with its PS3.7 status; nothing is kept of a refused message (both
    receive modes: the fast C-STORE lane leaves DIMSE-N messages to pynetdicom)."""
    study = generate_uid()
    unknown = generate_uid()
    assert n_set(node.port, unknown, "COMPLETED", performed({})) == 0x0112  # never created
    step = generate_uid()
    assert n_create(node.port, step, study_uid=study, status="COMPLETED") == 0x0106
    assert n_create(node.port, step, study_uid=study, status=None) == 0x0120
    assert n_create(node.port, step, study_uid=study) == 0x0000
    assert n_create(node.port, step, study_uid=study) == 0x0111  # duplicate
    assert n_set(node.port, step, "FINISHED") == 0x0106  # not a status of PS3.3
    assert n_set(node.port, step, "COMPLETED") == 0x0121  # no Performed Series Sequence
    no_uid = DicomSequence([Dataset()])
    assert n_set(node.port, step, "COMPLETED", no_uid) == 0x0121  # an item without its UID
    assert n_set(node.port, step, None) == 0x0000  # other attributes: still IN PROGRESS
    datasets = small_study("BAD-1", slices=2, size=16)
    assert n_set(node.port, step, "COMPLETED", performed(
        {str(datasets[0].SeriesInstanceUID): datasets})) == 0x0000
    assert n_set(node.port, step, "IN PROGRESS") == 0x0110  # after COMPLETED
    log = node.log()
    assert "MPPS N-SET %s from SCANNER refused (0x0112)" % unknown in log
    assert "is COMPLETED: it may no longer be updated" in log


def test_learned_size_completes_the_third_series_early(tmp_path: Path) -> None:
    """Two series of 8 from one scanner and protocol: the third of 8 completes after the
    guard, not the quiet period; one of 5 still waits; a late instance re-opens the early
    one (counted per scanner in status and /metrics), and at the limit (1) the scanner
    loses its early start."""
    metrics = free_port()
    node = _node(tmp_path, 4.0, f"early_guard_s = 0.3\nearly_reopen_limit = 1\n"
                                f"metrics_port = {metrics}\nmetrics_bind = \"127.0.0.1\"\n").start()
    data = node.data_dir
    try:
        for n in (1, 2):
            ds = series(f"LRN-{n}", 8, seed=n)
            _send(node, ds, tmp_path / f"s{n}")
            wait_until(f"series {n} decided", lambda: str(ds[0].SeriesInstanceUID) in decisions(
                data), 20, poll=0.1)
            assert decisions(data)[str(ds[0].SeriesInstanceUID)] [1] == "quiet"
        third = series("LRN-3", 8, seed=3)
        uid3 = str(third[0].SeriesInstanceUID)
        sent = _send(node, third, tmp_path / "s3")
        wait_until("the third series decided", lambda: uid3 in decisions(data), 10, poll=0.05)
        assert time.monotonic() - sent < 3.5  # not the 4 s quiet period
        assert decisions(data)[uid3][1] == "learned"
        short = series("LRN-4", 5, seed=4)
        uid4 = str(short[0].SeriesInstanceUID)
        sent = _send(node, short, tmp_path / "s4")
        wait_until("the short series decided", lambda: uid4 in decisions(data), 20, poll=0.1)
        assert time.monotonic() - sent >= 3.5
        assert decisions(data)[uid4] [1] == "quiet"
        # A late ninth instance re-opens the third series: decided again by the quiet period.
        late = series("LRN-3", 9, seed=3)[8:]
        for ds in late:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = third[0].StudyInstanceUID, uid3
            ds.FrameOfReferenceUID = third[0].FrameOfReferenceUID
        _send(node, late, tmp_path / "late")
        wait_until("the re-opened series decided again", lambda: decisions(data)[uid3][1] == "quiet",
                   20, poll=0.1)
        assert f"series {uid3} completed early (learned) was re-opened" in node.log()
        assert "early_reopen_limit = 1" in node.log()
        status = json.loads(node.cli("status", "--json").stdout)["completeness"]
        [scanner] = status["scanners"]
        assert scanner == {"scanner": f"TEST_SCU/{STATION}", "early": 1, "reopened": 1,
                           "early_start": False}
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        assert f'dicom_node_series_reopened_total{{scanner="TEST_SCU/{STATION}"}} 1.0' in text
        assert f'dicom_node_scanner_early_start{{scanner="TEST_SCU/{STATION}"}} 0.0' in text
        assert "re-opened - early start OFF" in node.cli("status").stdout
        # No early start any more: a series that declares its size (Images in Acquisition)
        # waits for the quiet period all the same.
        fifth = series("LRN-5", 8, seed=5)
        for ds in fifth:
            ds.ImagesInAcquisition = 8
        uid5 = str(fifth[0].SeriesInstanceUID)
        sent = _send(node, fifth, tmp_path / "s5")
        wait_until("the fifth series decided", lambda: uid5 in decisions(data), 20, poll=0.1)
        assert time.monotonic() - sent >= 3.5
        assert decisions(data)[uid5] [1] == "quiet"
    finally:
        node.stop()


def test_mpps_forwarded_in_order_once_the_pacs_is_up_and_a_refusal_is_not_resent(
        tmp_path: Path) -> None:
    """The PACS's MPPS SCP is down while the scanner creates and completes two steps:
    once it is up, both arrive, each N-CREATE before its N-SET; an N-SET the PACS refuses
    is left failed (logged), not sent again."""
    pacs_port = free_port()
    node = _node(tmp_path, 30.0, f'forward_mpps = "PACS_MPPS@127.0.0.1:{pacs_port}"\n'
                                 "send_backoff_initial_s = 0.2\nsend_backoff_max_s = 0.5\n").start()
    mpps_pacs = None
    try:
        first, second = generate_uid(), generate_uid()
        datasets = series("FWD-1", 2)
        listed = performed({str(datasets[0].SeriesInstanceUID): datasets})
        assert n_create(node.port, first, study_uid=generate_uid()) == 0
        assert n_set(node.port, first, "COMPLETED", listed) == 0
        assert n_create(node.port, second, study_uid=generate_uid()) == 0
        wait_until("a failed attempt logged", lambda: "not passed on" in node.log(), 20, poll=0.1)
        mpps_pacs = MppsPacs(pacs_port)  # on the port the node was told about
        wait_until("three messages passed on", lambda: len(mpps_pacs.received) == 3, 30, poll=0.1)
        assert mpps_pacs.received == [("N-CREATE", first, "IN PROGRESS"), ("N-SET", first, "COMPLETED"),
                                      ("N-CREATE", second, "IN PROGRESS")]
        mpps_pacs.refuse[second] = 0x0110
        assert n_set(node.port, second, "DISCONTINUED", listed) == 0  # the node takes it
        wait_until("the refusal logged", lambda: "refused by PACS_MPPS" in node.log(), 20, poll=0.1)
        time.sleep(1.5)  # past the back-off: nothing is sent again
        assert [m for m in mpps_pacs.received if m[1] == second] == [
            ("N-CREATE", second, "IN PROGRESS"), ("N-SET", second, "DISCONTINUED")]
    finally:
        node.stop()
        if mpps_pacs is not None:
            mpps_pacs.stop()


def test_an_mpps_step_survives_a_kill_and_completes_after_the_restart(tmp_path: Path) -> None:
    """N-CREATE and the images, then SIGKILL: after the restart the N-SET COMPLETED is
    taken (the step was kept) and the series is complete at once, not after 60 s."""
    node = _node(tmp_path, 60.0).start()
    try:
        datasets = series("KILL-1", 4)
        uid, step = str(datasets[0].SeriesInstanceUID), generate_uid()
        assert n_create(node.port, step, study_uid=str(datasets[0].StudyInstanceUID)) == 0
        _send(node, datasets, tmp_path / "s")
        node.kill()
        node.start()
        start = time.monotonic()
        assert n_set(node.port, step, "COMPLETED", performed({uid: datasets})) == 0
        wait_until("the series decided", lambda: uid in decisions(node.data_dir), 10, poll=0.05)
        assert time.monotonic() - start < 5.0
        assert decisions(node.data_dir)[uid][1] == "mpps"
    finally:
        node.stop()


def test_what_a_header_says_about_its_series_size() -> None:
    """Scanner = calling AE (the stored file's meta) / Station Name; protocol = Series
    Description with frames per instance and temporal positions; declared size = Images
    in Acquisition in instances."""
    from pydicom.dataset import FileMetaDataset

    from dicom_node.queue.completeness import shape_of

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.SourceApplicationEntityTitle = "CT1 "
    ds.StationName, ds.SeriesDescription = "ROOM-1", "Abdomen 2.5mm"
    assert shape_of(ds).scanner == "CT1/ROOM-1"
    assert (shape_of(ds).protocol, shape_of(ds).declared) == ("Abdomen 2.5mm", None)
    ds.ImagesInAcquisition = 120
    assert shape_of(ds).declared == 120
    ds.NumberOfFrames, ds.NumberOfTemporalPositions = 40, 3
    shape = shape_of(ds)
    assert (shape.protocol, shape.declared) == ("Abdomen 2.5mm frames=40 temporal=3", 3)
    ds.ImagesInAcquisition = 0
    assert shape_of(ds).declared is None


def test_images_in_acquisition_completes_a_series_early_and_only_at_that_size(
        tmp_path: Path) -> None:
    node = _node(tmp_path, 4.0, "learn_from_series = 0\n").start()
    try:
        full, short = series("DECL-1", 6, seed=1), series("DECL-2", 4, seed=2)
        for ds in full + short:
            ds.ImagesInAcquisition = 6
        sent = _send(node, full, tmp_path / "full")
        uid = str(full[0].SeriesInstanceUID)
        wait_until("the full series decided", lambda: uid in decisions(node.data_dir), 10, poll=0.05)
        assert time.monotonic() - sent < 3.5  # the quiet period (4 s) cannot be this early
        assert decisions(node.data_dir)[uid][1] == "declared"
        sent = _send(node, short, tmp_path / "short")
        uid = str(short[0].SeriesInstanceUID)
        wait_until("the short series decided", lambda: uid in decisions(node.data_dir), 20, poll=0.1)
        assert time.monotonic() - sent >= 3.5
        assert decisions(node.data_dir)[uid][1] == "quiet"
    finally:
        node.stop()


def test_mpps_completed_before_a_slow_transfer_still_completes_the_series_at_once(
        quiet_node: NodeProcess, tmp_path: Path) -> None:
    """The N-SET COMPLETED comes first and the images trickle in for longer than the
    quiet period (3 s) in all: the step is not given up while its instances arrive, and
    the series is complete by MPPS the moment the last one is in."""
    node = quiet_node
    datasets = series("SLOW-1", 6)
    uid, step = str(datasets[0].SeriesInstanceUID), generate_uid()
    assert n_create(node.port, step, study_uid=str(datasets[0].StudyInstanceUID)) == 0
    assert n_set(node.port, step, "COMPLETED", performed({uid: datasets})) == 0
    for k in range(3):
        time.sleep(1.5)
        sent = _send(node, datasets[2 * k:2 * k + 2], tmp_path / f"part{k}")
    wait_until("the series decided", lambda: uid in decisions(node.data_dir), 10, poll=0.05)
    assert time.monotonic() - sent < 2.5  # the quiet period (3 s) cannot be this early
    assert decisions(node.data_dir)[uid][1] == "mpps"
    assert "never received" not in node.log()


def test_mpps_on_a_full_disk_is_refused_as_a_resource_limitation_and_taken_after(
        tmp_path: Path) -> None:
    """The queue cannot be written (the disk is full): N-CREATE and N-SET are answered
    0213 (resource limitation, one ERROR line each), not pynetdicom's traceback and 0110;
    with space back the scanner's retry is taken. (The audit log's own write failing on
    the full disk is logged as it was before; not this test's subject.)"""
    import subprocess

    from test_front_door_ops import _fill
    from test_scp_store import _mount_tmpfs

    # the data directory is the small disk; the node's log (beside it) is not, so the
    # lines about the full disk are not lost to it
    mnt = tmp_path / "data"
    assert _mount_tmpfs(mnt, "32m"), "this test needs root to mount a tmpfs"
    try:
        node = NodeProcess(mnt, workers=0, config="min_free_mb = 0\n").start()
        try:
            step, study = generate_uid(), generate_uid()
            filler = mnt / "filler"
            _fill(filler)
            assert n_create(node.port, step, study_uid=study) == 0x0213
            filler.unlink()
            assert n_create(node.port, step, study_uid=study) == 0  # the retry is taken
            _fill(filler)
            assert n_set(node.port, step, "DISCONTINUED") == 0x0213
            filler.unlink()
            assert n_set(node.port, step, "DISCONTINUED") == 0
            log = node.log()
            assert f"MPPS N-CREATE {step} from SCANNER not kept (0x0213" in log
            assert "Exception in the handler" not in log  # pynetdicom's traceback and 0110
        finally:
            node.stop()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_pacs_that_stalls_on_mpps_does_not_hold_the_node_at_stop(tmp_path: Path) -> None:
    """The PACS takes the association and never answers the N-CREATE: the node stops in
    seconds (the forward is aborted) and the message stays queued for the next start."""
    stall = threading.Event()
    pacs_port = free_port()
    ae = AE(ae_title="PACS_MPPS")
    ae.add_supported_context(ModalityPerformedProcedureStep)

    def never_answers(event: Any) -> tuple[int, None]:
        stall.wait(60)
        return 0x0110, None

    server = ae.start_server(("127.0.0.1", pacs_port), block=False,
                             evt_handlers=[(evt.EVT_N_CREATE, never_answers)])
    node = _node(tmp_path, 30.0, f'forward_mpps = "PACS_MPPS@127.0.0.1:{pacs_port}"\n').start()
    try:
        step = generate_uid()
        assert n_create(node.port, step, study_uid=generate_uid()) == 0
        wait_until("the forward in flight", lambda: len(server.active_associations) == 1, 20,
                   poll=0.1)
        start = time.monotonic()
        assert node.stop() == 0
        assert time.monotonic() - start < 6.0, time.monotonic() - start
        conn = sqlite3.connect(f"file:{node.data_dir / 'queue.sqlite'}?mode=ro", uri=True)
        try:
            assert conn.execute("SELECT state FROM mpps_forwards").fetchall() == [("queued",)]
        finally:
            conn.close()
    finally:
        stall.set()
        node.stop()
        server.shutdown()


def test_forget_leaves_no_mpps_of_the_patient(tmp_path: Path) -> None:
    """DESIGN decision 12: an erased twin leaves no identifier behind, also in the MPPS
    kept and queued for the PACS (the N-CREATE carries the patient's name and ID) and in
    the learned sizes of its series."""
    from pydicom.uid import CTImageStorage
    from pynetdicom.dsutils import encode

    from dicom_node.queue.completeness import Completeness, SeriesShape
    from dicom_node.foundation.database import write
    from dicom_node.queue.jobs import connect_queue
    from dicom_node.queue.mpps import MppsSteps, read_create, read_set
    from test_retention import _bytes_everywhere, _cli, _series
    from twin_archive import Archive

    pid, name = "MPPS-FORGET-81", "Mppsforget^Olga"
    with Archive(tmp_path) as archive:
        study, series_uid = _series(archive, pid, name=name)
        _series(archive, "MPPS-KEEP-1")
    db = connect_queue(tmp_path)
    steps = MppsSteps(db, forward_to="PACS@127.0.0.1:1")
    create = Dataset()
    create.PatientName, create.PatientID = name, pid
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    item = Dataset()
    item.StudyInstanceUID = study
    create.ScheduledStepAttributesSequence = DicomSequence([item])
    step = generate_uid()
    steps.create(step, read_create(create), calling_ae="CT1", raw=encode(create, False, True))
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    done.PerformedSeriesSequence = performed({series_uid: [small_ct_ref(CTImageStorage)]})
    steps.update(step, read_set(done), raw=encode(done, False, True))
    with write(db) as conn:
        Completeness(db, learn_from=2, reopen_limit=3).record(
            conn, series_uid, SeriesShape(scanner="CT1/R", protocol="p"), 3, "2026")
    db.conn.close()
    assert _bytes_everywhere(tmp_path, pid.encode())  # it is there before
    out = _cli(tmp_path, "twin", "forget", pid, "--by", "dpo", "--reason", "request 43")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _bytes_everywhere(tmp_path, pid.encode()) == []
    assert _bytes_everywhere(tmp_path, b"Mppsforget") == []
    assert _bytes_everywhere(tmp_path, series_uid.encode()) == []
    assert _bytes_everywhere(tmp_path, step.encode()) == []


def test_forget_leaves_no_mpps_step_of_the_patient_that_lists_none_of_its_series(
        tmp_path: Path) -> None:
    """A step still IN PROGRESS (no Performed Series yet), or one whose series never
    came, carries the patient's ID and name in its N-CREATE queued for the PACS, or names
    the patient's study: forgetting the patient removes it too; another patient's queued
    message stays."""
    from pynetdicom.dsutils import encode

    from dicom_node.queue.jobs import connect_queue
    from dicom_node.queue.mpps import MppsSteps, read_create
    from test_retention import _bytes_everywhere, _cli, _series
    from twin_archive import Archive

    pid, name = "MPPS-FORGET-82", "Mppsforget^Nora"
    with Archive(tmp_path) as archive:
        study, _ = _series(archive, pid, name=name)
        _series(archive, "MPPS-KEEP-2")

    def create(patient_id: str, patient_name: str, study_uid: str) -> Dataset:
        ds = Dataset()
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        item = Dataset()
        item.StudyInstanceUID = study_uid
        ds.ScheduledStepAttributesSequence = DicomSequence([item])
        return ds

    db = connect_queue(tmp_path)
    forwarded = MppsSteps(db, forward_to="PACS@127.0.0.1:1")
    unsent = create(pid, name, generate_uid())  # a study the node has not received yet
    in_progress = generate_uid()
    forwarded.create(in_progress, read_create(unsent), calling_ae="CT1",
                     raw=encode(unsent, False, True))
    kept = create("MPPS-KEEP-2", "Keep^Me", generate_uid())
    other = generate_uid()
    forwarded.create(other, read_create(kept), calling_ae="CT1", raw=encode(kept, False, True))
    of_study = generate_uid()  # not forwarded: only the study names the patient
    MppsSteps(db).create(of_study, read_create(create(pid, name, study)), calling_ae="CT2")
    db.conn.close()
    out = _cli(tmp_path, "twin", "forget", pid, "--by", "dpo", "--reason", "request 45")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _bytes_everywhere(tmp_path, pid.encode()) == []
    assert _bytes_everywhere(tmp_path, b"Mppsforget") == []
    assert _bytes_everywhere(tmp_path, in_progress.encode()) == []
    assert _bytes_everywhere(tmp_path, of_study.encode()) == []
    conn = sqlite3.connect(f"file:{tmp_path / 'queue.sqlite'}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT step_uid, state FROM mpps_forwards").fetchall() == [
            (other, "queued")]
    finally:
        conn.close()


def small_ct_ref(sop_class: str) -> Dataset:
    """A stand-in instance for :func:`performed` (its SOP class and a new SOP Instance UID)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    return ds


def test_forward_mpps_names_a_destination_or_an_address(tmp_path: Path) -> None:
    from dicom_node.foundation.errors import ConfigError
    from dicom_node.settings import load_settings, resolve_forward

    cfg = tmp_path / "c.toml"
    cfg.write_text('forward_mpps = "PACS"\n[[destinations]]\nname = "PACS"\nae_title = "ORTHANC"\n'
                   'host = "127.0.0.1"\nport = 4242\n')
    s = load_settings(cfg, env={})
    assert resolve_forward(s.forward_mpps, s.destinations).key == "ORTHANC@127.0.0.1:4242"
    assert load_settings(env={}, overrides={"forward_mpps": "RIS@10.0.0.7:104"}).forward_mpps
    for bad in ("NOPE", "RIS@host:99999"):
        with pytest.raises(ConfigError, match="forward_mpps"):
            load_settings(env={}, overrides={"forward_mpps": bad})


def test_an_mpps_message_too_large_to_pass_on_is_refused_as_a_resource_limitation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``forward_mpps`` set, each message is kept whole for the PACS: one past
    ``MAX_FORWARD_BYTES`` is answered 0213 and neither kept nor queued; a small one is."""
    from dicom_node.queue import mpps_handlers
    from dicom_node.runtime.listener_services import listener_services
    from dicom_node.settings import Settings
    from dicom_node.wire.server import DicomServer
    from twin_archive import Archive

    monkeypatch.setattr(mpps_handlers, "MAX_FORWARD_BYTES", 4096)
    port = free_port()
    settings = Settings(data_dir=tmp_path, port=port, bind_address="127.0.0.1",
                        ae_title="DICOM_NODE", forward_mpps=f"PACS@127.0.0.1:{free_port()}")
    big, small = generate_uid(), generate_uid()
    listed = performed({"1.2.3": series("BIG-1", 1)}, extra={"1.2.3": [
        generate_uid() for _ in range(100)]})
    with Archive(tmp_path) as archive:
        server = DicomServer(settings, archive.ingest, services=listener_services(settings))
        server.start()
        try:
            assert n_create(port, big, study_uid=generate_uid()) == 0
            assert n_set(port, big, "COMPLETED", listed) == 0x0213
            assert n_create(port, small, study_uid=generate_uid()) == 0
        finally:
            server.stop(0.0)
    conn = sqlite3.connect(tmp_path / "queue.sqlite")
    try:
        steps = dict(conn.execute("SELECT step_uid, status FROM mpps_steps"))
        forwards = conn.execute("SELECT step_uid, kind FROM mpps_forwards ORDER BY id").fetchall()
    finally:
        conn.close()
    assert steps == {big: "IN PROGRESS", small: "IN PROGRESS"}
    assert forwards == [(big, "create"), (small, "create")]
