"""The C-STORE fast paths give the same bytes as the slow ones and leak nothing.

* the hand-built File Meta Information equals pydicom's, byte for byte;
* the pynetdicom speed-ups (:mod:`dicom_node.speedups`) are installed by the server,
  store instances byte-exact over several associations at once, and give back the
  wake-up descriptor of every association that ended; pynetdicom's log-formatting
  handlers are not bound while its logger is at WARNING, and C-STORE Success
  responses are encoded by hand;
* a new patient/study/series directory is created with its parents (durably).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pydicom
import pynetdicom._config
import pytest
from pynetdicom import evt, transport
from pynetdicom.dimse import DIMSEServiceProvider

from dicom_client import send
from dicom_node.foundation.durable import write_durably
from dicom_node.wire.fast_receive import speedups, store_response
from dicom_node.wire.fast_receive.spooling import encode_file_meta, pydicom_file_meta
from dicom_node.wire.server import DicomServer
from dicom_node.settings import Settings
from node_harness import small_ct
from twin_archive import Archive
from waiting import wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("sop_instance_uid", "transfer_syntax", "calling_ae"),
    [
        ("1.2.3.4.5", "1.2.840.10008.1.2.1", "BENCHSCU"),  # even lengths
        ("1.2.3.4", "1.2.840.10008.1.2", "ODD"),  # odd UID and AE: padded
        ("1.2.3.45", "1.2.840.10008.1.2.4.50", ""),  # no calling AE: no (0002,0016)
        ("1." + "2" * 62, "1.2.840.10008.1.2.1.99", "SIXTEEN_CHARS_AE"),  # 64-char UID
    ],
)
def test_file_meta_by_hand_equals_pydicom(sop_instance_uid: str, transfer_syntax: str,
                                          calling_ae: str) -> None:
    expected = pydicom_file_meta(CT, sop_instance_uid, transfer_syntax, calling_ae)
    assert encode_file_meta(CT, sop_instance_uid, transfer_syntax, calling_ae) == expected


def test_file_meta_by_hand_declines_what_it_cannot_encode() -> None:
    assert encode_file_meta(CT, "1.2.3", "1.2.840.10008.1.2.1", "ÄRZTE") is None
    assert encode_file_meta(CT, "1." + "2" * 70, "1.2.840.10008.1.2.1", "") is None


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_speedups_store_byte_exact_over_parallel_associations_without_leaks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    archive = Archive(data)
    server = DicomServer(Settings(data_dir=data, port=0, bind_address="127.0.0.1",
                                  ae_title="DICOM_NODE"), archive.ingest)
    assert transport.AssociationSocket.recv is speedups._recv  # installed by the server
    server.start()
    try:
        # pynetdicom's DIMSE/PDU log formatting is unbound (its logger is at WARNING).
        for event in (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT):
            assert server._server.get_handlers(event) == []  # type: ignore[union-attr]
        # ... nor to the associations (pynetdicom's LOG_HANDLER_LEVEL), so C-STORE
        # Success responses take the hand-encoded path of dicom_node/wire/fast_receive/store_response.py.
        assert pynetdicom._config.LOG_HANDLER_LEVEL == "none"
        assert DIMSEServiceProvider.send_msg is store_response._send_msg
        baseline = _open_fds()
        study = pydicom.uid.generate_uid()
        batches = [[small_ct(patient_id=f"P{a}", study_uid=study, instance=i, size=64, seed=a)
                    for i in range(1, 11)] for a in range(4)]
        results: list[list[int]] = [[] for _ in batches]

        def run(k: int) -> None:
            results[k] = send(server.port, batches[k])

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [[0] * 10] * 4
        sent = {ds.SOPInstanceUID: ds for batch in batches for ds in batch}
        files = sorted((data / "archive").rglob("*.dcm"))
        assert len(files) == 40 == archive.twins.instance_count()
        for path in files:
            got = pydicom.dcmread(path)
            want = sent[got.SOPInstanceUID]
            assert got.PixelData == want.PixelData
            assert got.file_meta.SourceApplicationEntityTitle == "TEST_SCU"
        # Every association's wake-up descriptor is given back once it has ended.
        wait_until(f"open descriptors back to {baseline}", lambda: _open_fds() <= baseline, 10.0,
                   poll=0.05, explain=_open_fds)
    finally:
        server.stop()
        archive.close()


def test_write_durably_creates_missing_directories(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    final = tmp_path / "archive" / "p" / "study" / "series" / "x.dcm"
    write_durably(final, (b"abc", b"def"), tmp)
    write_durably(final.with_name("y.dcm"), (b"g",), tmp)
    assert final.read_bytes() == b"abcdef"
    assert final.with_name("y.dcm").read_bytes() == b"g"
    assert not list(tmp.iterdir())


def test_cached_set_uid_answers_as_pynetdicom_and_never_caches_a_bad_value(
        caplog: pytest.LogCaptureFixture) -> None:
    from pynetdicom import utils

    assert speedups.install()
    shipped = speedups._shipped_set_uid  # noqa: SLF001
    assert shipped is utils.set_uid
    for value in ("1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.4.50", "1.2.3"):
        first = speedups.cached_set_uid(value, "X")
        assert first == shipped(value, "X") and type(first) is type(shipped(value, "X"))
        assert speedups.cached_set_uid(value, "X") is first  # from the cache
    with pytest.raises(ValueError):
        speedups.cached_set_uid("", "X", allow_empty=False)
    caplog.set_level("WARNING", logger="pynetdicom")
    for _ in range(2):  # non-conformant: pynetdicom's warning every time, never cached
        assert speedups.cached_set_uid("1.02.3", "Y") == "1.02.3"
    assert sum("Non-conformant 'Y'" in r.getMessage() for r in caplog.records) == 2
    assert ("1.02.3", True, True) not in speedups._uid_cache  # noqa: SLF001
    assert speedups.cached_set_uid(None, "Z") is None


def test_freeze_heap_exempts_what_exists_from_full_collections() -> None:
    import subprocess
    import sys

    # A cycle made before freezing is exempt from full passes: made garbage afterwards, a
    # full collection neither scans nor frees it. A cycle made after freezing is freed.
    code = ("import gc, weakref; from dicom_node.wire.fast_receive import speedups; import pynetdicom, pydicom\n"
            "class Cell: pass\n"
            "before = Cell(); before.me = before; seen_before = weakref.ref(before)\n"
            "n = speedups.freeze_heap(); assert n > 10000, n\n"
            "del before\n"
            "after = Cell(); after.me = after; seen_after = weakref.ref(after); del after\n"
            "gc.collect()\n"
            "assert seen_before() is not None, 'a frozen object was collected'\n"
            "assert not any(o is seen_before() for o in gc.get_objects()), 'frozen yet scanned'\n"
            "assert seen_after() is None, 'garbage made after freezing was not collected'\n"
            "assert len(gc.get_objects()) < n, 'most objects are left to full passes'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
