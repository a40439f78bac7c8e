"""Issue 26: priors from a real Orthanc as Query/Retrieve SCP (C-FIND, C-GET here; C-MOVE
to the node's AE in ``test_priors_e2e``), bounded by studies, bytes and rate, audited;
a PACS that never answers costs ``priors_timeout_s``, not the result."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.wire.priors import PriorRetriever, PriorSettings, rules_take, FoundSeries
from dicom_node.settings import Destination
from dicom_node.tasks import default_tasks
from loop_helpers import pacs, small_study, storescu, write_files
from node_harness import free_port, incoming
from orthanc.server import OrthancServer
from twin_archive import Archive, audit
from twin_archive.history import HistoryStore

pytestmark = pytest.mark.orthanc

NODE_AE = "DICOM_NODE"
RULES = default_tasks()[0].rules


def _study(patient_id: str, date: str, *, slices: int = 20, seed: int = 5, modality: str = "CT"):
    dss = small_study(patient_id, slices=slices, size=64, seed=seed, modality=modality)
    for ds in dss:
        ds.StudyDate = date
    return dss


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancServer, dict]]:
    tmp = tmp_path_factory.mktemp("qr")
    with pacs(tmp / "orthanc", known_modalities={"node": (NODE_AE, "127.0.0.1", free_port())}) as server:
        studies = {}
        for date in ("20231201", "20241201", "20251201"):
            dss = _study("QR-1", date)
            studies[date] = dss
            storescu(server.dicom_port, write_files(dss, tmp / date), server.aet)
        mr = _study("QR-1", "20251201", modality="MR")  # not the task's: never retrieved
        for ds in mr:
            ds.StudyInstanceUID = studies["20251201"][0].StudyInstanceUID
        storescu(server.dicom_port, write_files(mr, tmp / "mr"), server.aet)
        other = _study("QR-OTHER", "20251101")  # another patient: never asked for
        storescu(server.dicom_port, write_files(other, tmp / "other"), server.aet)
        studies["mr"], studies["other"] = mr, other
        yield server, studies


def _twin(tmp_path: Path) -> tuple[Path, Archive, list, str]:
    data = tmp_path / "data"
    archive = Archive(data)
    today = _study("QR-1", "20261201", seed=6)
    for ds in today:
        archive.ingest.store(incoming(ds))
    key = archive.twins.find_twin_keys("QR-1")[0]
    return data, archive, today, key


def _retriever(data: Path, archive: Archive, port: int, *, max_studies: int = 3,
               max_bytes: int = 10**9, per_hour: int = 100, timeout_s: float = 10.0,
               retrieve: str = "get") -> PriorRetriever:
    settings = PriorSettings(years=5, max_studies=max_studies, max_bytes=max_bytes,
                             per_hour=per_hour, timeout_s=timeout_s, node_ae_title=NODE_AE)
    dest = Destination(ae_title="ORTHANC", host="127.0.0.1", port=port, query=True,
                       retrieve=retrieve)
    return PriorRetriever(settings=settings, destinations=[dest], ingest=archive.ingest,
                          history=HistoryStore(data), data_dir=data)


def test_c_find_then_c_get_brings_the_most_recent_priors_into_the_twin(orthanc, tmp_path) -> None:
    server, studies = orthanc
    data, archive, today, key = _twin(tmp_path)
    retriever = _retriever(data, archive, server.dicom_port, max_studies=2)
    assert retriever.wanted(key, str(today[0].StudyInstanceUID), dt.date(2026, 12, 1)) == ""
    got = retriever.retrieve(patient_id="QR-1", issuer="", patient_key=key,
                             study_uid=str(today[0].StudyInstanceUID), today=dt.date(2026, 12, 1),
                             rules=RULES)
    assert got.answered and got.note == "" and got.source == "ORTHANC"
    wanted = {str(studies[d][0].SeriesInstanceUID) for d in ("20251201", "20241201")}
    assert {f.series_uid for f in got.series} == wanted  # the two most recent; CT only
    assert got.bytes > 20 * 64 * 64 * 2
    history = HistoryStore(data)
    for uid in wanted:
        arrival = history.series_arrival(uid)
        assert arrival is not None and arrival[2] == 20  # every instance, durable in the twin
        assert history.is_retrieved(uid)
    assert history.series_arrival(str(studies["20231201"][0].SeriesInstanceUID)) is None
    assert history.series_arrival(str(studies["mr"][0].SeriesInstanceUID)) is None
    assert history.series_arrival(str(studies["other"][0].SeriesInstanceUID)) is None
    # now the twin has a prior within the window: no more asking
    assert retriever.wanted(key, str(today[0].StudyInstanceUID), dt.date(2026, 12, 1)) == \
        "a prior within the window is in the twin"
    with audit.AuditLog(data) as log:
        [entry] = log.entries(event_type=audit.AuditEvent.PRIORS_RETRIEVED)
    assert entry.what == key and entry.detail["series"] == 2 and "QR-1" not in str(entry.detail)
    archive.close()


def test_bytes_and_rate_bound_a_retrieval(orthanc, tmp_path) -> None:
    server, studies = orthanc
    data, archive, today, key = _twin(tmp_path)
    retriever = _retriever(data, archive, server.dicom_port, max_bytes=1, per_hour=1)
    got = retriever.retrieve(patient_id="QR-1", issuer="", patient_key=key,
                             study_uid=str(today[0].StudyInstanceUID), today=dt.date(2026, 12, 1),
                             rules=RULES)
    # the first series (the most recent study) is fetched, then the bound stops the rest
    assert [f.series_uid for f in got.series] == [str(studies["20251201"][0].SeriesInstanceUID)]
    again = retriever.retrieve(patient_id="QR-1", issuer="", patient_key=key,
                               study_uid=str(today[0].StudyInstanceUID),
                               today=dt.date(2026, 12, 1), rules=RULES)
    assert not again.answered and "priors_per_hour (1) reached" in again.note
    archive.close()


def test_an_issuer_that_differs_is_not_the_patient(orthanc, tmp_path) -> None:
    server, _ = orthanc
    data, archive, today, key = _twin(tmp_path)
    retriever = _retriever(data, archive, server.dicom_port)
    got = retriever.retrieve(patient_id="QR-OTHER-ID", issuer="HOSP-B", patient_key=key,
                             study_uid=str(today[0].StudyInstanceUID), today=dt.date(2026, 12, 1),
                             rules=RULES)
    assert got.answered and got.series == () and "has no prior" in got.note
    archive.close()


@pytest.fixture
def silent_pacs() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(5)
    for s in held:
        s.close()
    server.close()


def test_a_pacs_that_never_answers_costs_the_timeout_only(silent_pacs, tmp_path) -> None:
    data, archive, today, key = _twin(tmp_path)
    retriever = _retriever(data, archive, silent_pacs, timeout_s=1.5, retrieve="move")
    t0 = time.monotonic()
    got = retriever.retrieve(patient_id="QR-1", issuer="", patient_key=key,
                             study_uid=str(today[0].StudyInstanceUID), today=dt.date(2026, 12, 1),
                             rules=RULES)
    took = time.monotonic() - t0
    assert not got.answered and "did not answer" in got.note and got.series == ()
    assert took < 1.5 + 3.0, took
    with audit.AuditLog(data) as log:
        [entry] = log.entries(event_type=audit.AuditEvent.PRIORS_RETRIEVED)
    assert entry.outcome == audit.AuditOutcome.MINOR_FAILURE and entry.detail["error"]
    archive.close()


@pytest.fixture
def garbled_pacs() -> Iterator[int]:
    """A pynetdicom Q/R SCP whose SERIES-level C-FIND answer has a Number of Series
    Related Instances that is no integer."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag
    from pynetdicom import AE, evt
    from dicom_node.wire.priors import FIND

    def on_find(event: object) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier  # type: ignore[attr-defined]
        answer = Dataset()
        answer.QueryRetrieveLevel = query.QueryRetrieveLevel
        answer.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        if query.QueryRetrieveLevel == "STUDY":
            answer.PatientID, answer.StudyDate = "QR-1", "20250101"
        else:
            answer.SeriesInstanceUID, answer.Modality = "1.2.826.0.1.3680043.8.498.2", "CT"
            answer[0x00201209] = RawDataElement(Tag(0x00201209), "IS", 4, b"many", 0, False,
                                                True)
        yield 0xFF00, answer
        yield 0x0000, None

    ae = AE(ae_title="GARBLED")
    ae.add_supported_context(FIND)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    yield int(server.server_address[1])
    server.shutdown()


def test_a_c_find_answer_that_cannot_be_read_is_no_traceback(garbled_pacs, tmp_path) -> None:
    data, archive, today, key = _twin(tmp_path)
    retriever = _retriever(data, archive, garbled_pacs, timeout_s=5)
    got = retriever.retrieve(patient_id="QR-1", issuer="", patient_key=key,
                             study_uid=str(today[0].StudyInstanceUID), today=dt.date(2026, 12, 1),
                             rules=RULES)
    # the count is not known, so the rules do not judge by it; the C-GET is then refused
    # (the SCP has no GET context) and said so
    assert not got.answered and "refused the C-GET" in got.note, got.note
    archive.close()


def test_the_rules_decide_from_the_c_find_answer() -> None:
    base = dict(study_uid="1", series_uid="2", study_date=dt.date(2025, 1, 1), modality="CT",
                body_part="ABDOMEN", description="Abdomen 2.5mm", manufacturer="X", instances=80)
    assert rules_take(RULES, FoundSeries(**base))
    assert not rules_take(RULES, FoundSeries(**{**base, "modality": "MR"}))
    assert not rules_take(RULES, FoundSeries(**{**base, "description": "Scout"}))
    assert not rules_take(RULES, FoundSeries(**{**base, "instances": 3}))
    assert not rules_take(RULES, FoundSeries(**{**base, "body_part": "HEAD"}))


@pytest.mark.parametrize("patient_id", ["", "QR-*", "QR-?", "A\\B"])
def test_no_query_that_would_match_other_patients(orthanc, tmp_path, patient_id) -> None:
    """An unidentified twin (no Patient ID) or an ID with a wildcard would match other
    patients' studies in a C-FIND: the PACS is not asked at all."""
    server, _ = orthanc
    data, archive, today, key = _twin(tmp_path)
    retriever = _retriever(data, archive, server.dicom_port)
    got = retriever.retrieve(patient_id=patient_id, issuer="", patient_key=key,
                             study_uid=str(today[0].StudyInstanceUID), today=dt.date(2026, 12, 1),
                             rules=RULES)
    assert not got.answered and got.series == () and "matches one patient only" in got.note
    with audit.AuditLog(data) as log:
        assert log.entries(event_type=audit.AuditEvent.PRIORS_RETRIEVED) == []
    archive.close()


def test_a_pacs_that_does_not_know_the_node_fails_the_move_and_says_so(orthanc, tmp_path) -> None:
    server, _ = orthanc
    data, archive, today, key = _twin(tmp_path)
    retriever = _retriever(data, archive, server.dicom_port, retrieve="move")
    retriever.settings = dataclasses.replace(retriever.settings, node_ae_title="UNKNOWN_AE")
    got = retriever.retrieve(patient_id="QR-1", issuer="", patient_key=key,
                             study_uid=str(today[0].StudyInstanceUID), today=dt.date(2026, 12, 1),
                             rules=RULES)
    assert not got.answered and "C-MOVE" in got.note and "UNKNOWN_AE" in got.note, got.note
    # marked before it was asked for: had part of it arrived, its result would not be sent
    assert HistoryStore(data).is_retrieved(str(orthanc[1]["20251201"][0].SeriesInstanceUID))
    archive.close()


def test_destination_query_keys_are_read_and_checked(tmp_path) -> None:
    from dicom_node.foundation.errors import ConfigError
    from dicom_node.settings import load_settings, parse_destination

    flag = parse_destination("ARCHIVE@pacs.local:11112")  # --destination: never asked for priors
    assert (flag.query, flag.retrieve) == (False, "move")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\nquery = true\n'
                   'retrieve = "get"\n')
    [dest] = load_settings(config_path=cfg, env={}).destinations
    assert (dest.query, dest.retrieve) == (True, "get")
    cfg.write_text('[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\n'
                   'retrieve = "fetch"\n')
    with pytest.raises(ConfigError, match="destinations.0..retrieve"):
        load_settings(config_path=cfg, env={})


def test_c_get_stores_every_instance_when_pynetdicom_receives_into_files(
        orthanc, tmp_path, monkeypatch) -> None:
    """The defect CI found: a listener in the same process (the node's fast receive path)
    sets pynetdicom's process-wide ``STORE_RECV_CHUNKED_DATASET``; a C-GET's instances then
    arrived as files and were read as empty data sets (Orthanc ended with A702). Each is
    now read from its file, and the file removed."""
    from pynetdicom import _config

    server, studies = orthanc
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    data, archive, today, key = _twin(tmp_path)
    retriever = _retriever(data, archive, server.dicom_port, max_studies=1)
    got = retriever.retrieve(patient_id="QR-1", issuer="", patient_key=key,
                             study_uid=str(today[0].StudyInstanceUID), today=dt.date(2026, 12, 1),
                             rules=RULES)
    assert got.answered and got.note == ""
    [series] = got.series
    assert series.series_uid == str(studies["20251201"][0].SeriesInstanceUID)
    arrival = HistoryStore(data).series_arrival(series.series_uid)
    assert arrival is not None and arrival[2] == 20
    assert list(scratch.iterdir()) == []  # no file left behind by the C-GET
    archive.close()
