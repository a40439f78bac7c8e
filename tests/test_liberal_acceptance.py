"""Issue 13 item 3: keep what a PACS keeps, safely.

Odd UIDs (a hex digest, letters, over 64 characters, path characters) are stored under
hashed names and flagged; an instance without a Patient ID goes to an unidentified
twin of its study, which ``twin merge`` attaches to the right patient (audited);
control characters in identifiers are kept but escaped wherever printed or logged.
Refused only: what cannot be parsed, or lacks a Study/Series/SOP Instance UID.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest

from dicom_client import send, stored_rows
from node_harness import NodeProcess, incoming, small_ct
from waiting import wait_until
from twin_archive import Archive, InvalidInstanceError, printable
from twin_archive.audit import AuditLog

SUCCESS, CANNOT_UNDERSTAND, DOES_NOT_MATCH = 0x0000, 0xC000, 0xA900
ODD_UIDS = {
    "SOPInstanceUID": hashlib.sha256(b"anonymised").hexdigest(),  # an anonymiser's digest
    "StudyInstanceUID": "1.2.3.abc",
    "SeriesInstanceUID": "1." + "2" * 70,
}


def test_printable_escapes_controls_and_keeps_letters() -> None:
    assert printable("A\x00B\x1b[2J\nC\u202e\x7f") == "A\\x00B\\x1b[2J\\x0aC\\u202e\\x7f"
    assert printable("Müller^Zoë 山田") == "Müller^Zoë 山田"


def test_odd_uids_are_kept_under_hashed_names_and_flagged(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        results = []
        for keyword, value in [*ODD_UIDS.items(), ("SeriesInstanceUID", "../../../../etc/x"),
                               ("SOPInstanceUID", "1.2/3\x00\x1b")]:
            ds = small_ct(patient_id="ODD-1")
            setattr(ds, keyword, value)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = value
            results.append(archive.ingest.store(incoming(ds)))
        for r in results:
            path = (tmp_path / r.path).resolve()
            assert tmp_path.resolve() in path.parents and path.is_file()
            assert "etc" not in r.path and "\x00" not in r.path and "abc" not in r.path
        rows = {r["sop_instance_uid"]: r for r in stored_rows(tmp_path)}
        assert len(rows) == 5
        assert rows[ODD_UIDS["SOPInstanceUID"]]["uid_flags"] == "SOPInstanceUID"
        assert rows[ODD_UIDS["SOPInstanceUID"]]["path"].split("/")[-1].startswith("nc-")
        assert rows["1.2/3\x00\x1b"]["uid_flags"] == "SOPInstanceUID"  # kept as received
        detail = archive.twins.twin("ODD-1")
        flagged = sum(se.nonconformant_uids for st in detail.studies for se in st.series)
        assert flagged == 5
        # Refused: no Study/Series/SOP Instance UID at all.
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            ds = small_ct()
            delattr(ds, keyword)
            with pytest.raises(InvalidInstanceError, match=f"{keyword}: missing or empty"):
                archive.ingest.store(incoming(ds))


def test_missing_patient_id_makes_an_unidentified_twin_that_merge_attaches(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", workers=0).start()
    try:
        anon = [small_ct(patient_id=""), small_ct(patient_id="")]
        del anon[1].PatientID
        anon[1].StudyInstanceUID = anon[0].StudyInstanceUID
        anon[1].SeriesInstanceUID = anon[0].SeriesInstanceUID
        other_study = small_ct(patient_id="")
        known = small_ct(patient_id="MRN-7")
        assert send(node.port, [*anon, other_study, known]) == [SUCCESS] * 4
        twins = json.loads(node.cli("twin", "list", "--json").stdout)
        unidentified = [t for t in twins if t["unidentified"]]
        assert len(unidentified) == 2  # one per study (Issuer + Study Instance UID)
        [source] = [t["patient_key"] for t in unidentified if t["instances"] == 2]
        listing = node.cli("twin", "list").stdout
        assert f"(unidentified) {source}" in listing
        shown = node.cli("twin", "show", source).stdout
        assert "UNIDENTIFIED twin" in shown and "twin merge" in shown
        refused = node.cli("twin", "merge", source, "MRN-7", "--by", "dr who", check=False)
        assert refused.returncode == 2  # --reason is required
        merged = node.cli("twin", "merge", source, "MRN-7", "--by", "clerk",
                          "--reason", "order 42 reconciled")
        assert "is now part of twin" in merged.stdout
        detail = json.loads(node.cli("twin", "show", "MRN-7", "--json").stdout)
        assert len(detail["studies"]) == 2 and detail["twin"]["instances"] == 3
        assert detail["merges"][0]["source_key"] == source
        assert source not in node.cli("twin", "list").stdout
        # A later instance of that study, still without Patient ID, joins the patient.
        late = small_ct(patient_id="", study_uid=anon[0].StudyInstanceUID)
        assert send(node.port, [late]) == [SUCCESS]
        detail = json.loads(node.cli("twin", "show", "MRN-7", "--json").stdout)
        assert detail["twin"]["instances"] == 4
        again = node.cli("twin", "merge", source, "MRN-7", "--by", "x", "--reason", "y",
                         check=False)
        assert again.returncode != 0 and "already merged" in again.stderr
    finally:
        node.stop()
    with AuditLog(node.data_dir) as log:
        [event] = log.entries(event_type="twin-merged")
    assert event.what == source and event.who == "clerk"
    assert event.detail["reason"] == "order 42 reconciled" and "MRN-7" not in json.dumps(
        event.detail)


def test_control_characters_are_kept_but_escaped_in_output_and_log(node: NodeProcess) -> None:
    evil = "EV\x00IL\x1b[2J\nX"
    ds = small_ct(patient_id=evil)
    ds.PatientName = "Bad\x1b]0;owned\x07^Name"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "9.9\nFAKE LOG LINE"
    assert send(node.port, [ds, ds]) == [SUCCESS, SUCCESS]
    rows = stored_rows(node.data_dir)
    assert [r["sop_instance_uid"] for r in rows] == ["9.9\nFAKE LOG LINE"]  # as received
    listing = node.cli("twin", "list").stdout
    assert "EV\\x00IL\\x1b[2J\\x0aX" in listing and "\x1b" not in listing and "\x00" not in listing
    [twin] = json.loads(node.cli("twin", "list", "--json").stdout)
    assert twin["patient_id"] == evil  # as received
    shown = node.cli("twin", "show", twin["patient_key"]).stdout  # (a NUL cannot be an argument)
    assert "\x1b" not in shown and "\x07" not in shown and "Bad\\x1b]0;owned\\x07^Name" in shown
    # the duplicate's log line, escaped (the log may be written after the response)
    log = wait_until("the duplicate's log line", lambda: (lambda text: text if "9.9\\x0aFAKE LOG LINE"
                                                          in text else None)(node.log()), 10)
    assert not any(line.startswith("FAKE LOG LINE") for line in log.splitlines())


def _truncated(path: Path) -> bool:
    """pydicom's truncated test files (the front door refuses those: issue 13 item 2)."""
    return "truncated" in path.name or "too_short" in path.name


def test_every_pydicom_file_with_its_uids_is_kept(node: NodeProcess) -> None:
    """pydicom's shipped files (compressed, odd, no Patient ID): every one that is not
    truncated and carries Study, Series and SOP Instance UIDs is kept."""
    warnings.simplefilter("ignore")
    kept, refused, checked = [], [], 0
    # Listed from the package folder: get_testdata_files() would try to download the
    # optional pydicom-data set, and nothing is downloaded here.
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - not a Part 10 file: no client sends it
            continue
        if ("TransferSyntaxUID" not in ds.file_meta or "SOPClassUID" not in ds
                or "MediaStorageSOPClassUID" not in ds.file_meta or _truncated(path)):
            continue
        if ds.file_meta.MediaStorageSOPClassUID != ds.SOPClassUID:
            continue  # the request would claim another SOP class: A900 (not a form issue)
        try:
            [status] = send(node.port, [path])
        except (ValueError, ConnectionRefusedError):  # no context pynetdicom can propose
            continue
        checked += 1
        has_uids = all(str(ds.get(k, "") or "").strip()
                       for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        if has_uids:
            assert status == SUCCESS, (path.name, hex(status))
            kept.append(path.name)
        else:
            assert status == CANNOT_UNDERSTAND, (path.name, hex(status))
            refused.append(path.name)
    assert checked > 60 and len(kept) > 50
    assert "ExplVR_BigEnd.dcm" in kept and "rtdose.dcm" in kept  # no Patient ID; UIDs differ
    log = node.log()
    assert "kept under the data set's" in log
