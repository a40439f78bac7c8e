"""C-STORE into the real node (subprocess) from pynetdicom and dcmtk clients."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
from pydicom.filereader import read_preamble

from dicom_client import archive_files, echo, iter_pixel_test_files, send, stored_rows
from node_harness import NodeProcess, small_ct

SUCCESS, CANNOT_UNDERSTAND, DOES_NOT_MATCH, OUT_OF_RESOURCES = 0x0000, 0xC000, 0xA900, 0xA700
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, after its File Meta group."""
    with path.open("rb") as fh:
        read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return fh.read()


def _storescu(port: int, *files: Path, aet: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["storescu", "-v", "-R", "-aet", aet, "-aec", "DICOM_NODE", "127.0.0.1",
                             str(port), *map(str, files)], capture_output=True, text=True,
                            env=DCMTK_ENV, timeout=120)
    result.stdout += result.stderr  # dcmtk logs to stderr
    return result


def test_every_pydicom_pixel_file_is_stored_unchanged_or_refused_with_reason(node: NodeProcess) -> None:
    files = list(iter_pixel_test_files())
    assert len(files) > 40  # compressed syntaxes, big endian, deflate, RLE, JPEG-LS, JPEG 2000 ...
    stored: dict[str, Path] = {}
    unsendable = []
    seen_syntaxes = set()
    for path in files:
        ds = pydicom.dcmread(path)
        ts = str(ds.file_meta.TransferSyntaxUID)
        try:
            status = send(node.port, [path])[0]
        except ValueError:  # pynetdicom cannot encode this file: try dcmtk
            result = _storescu(node.port, path)
            if "Sending Store Request" not in result.stdout:  # malformed on purpose: no client sends it
                unsendable.append(path.name)
                continue
            status = SUCCESS if "Received Store Response (Success)" in result.stdout else (
                CANNOT_UNDERSTAND if "CannotUnderstand" in result.stdout else -1)
        if ds.file_meta.MediaStorageSOPClassUID != ds.SOPClassUID:
            assert status == DOES_NOT_MATCH, path.name  # the request says one class, the data another
            continue
        if "truncated" in path.name:  # a value runs past the end: never acknowledged (issue 13)
            assert status == CANNOT_UNDERSTAND, path.name
            assert "cannot be parsed to its end" in node.log()
            continue
        if not all(str(ds.get(k, "") or "").strip() for k in ("StudyInstanceUID", "SeriesInstanceUID")):
            assert status == CANNOT_UNDERSTAND, path.name  # cannot be grouped at all
            continue
        # Kept (issue 13): no Patient ID (an unidentified twin), or a request whose SOP
        # Instance UID differs from the data set's (filed under the data set's).
        assert status == SUCCESS, path.name
        stored[str(ds.SOPInstanceUID) + ts + path.name] = path
        seen_syntaxes.add(ts)
    assert unsendable == []
    # Every stored file: data set bytes and transfer syntax exactly as sent.
    rows = stored_rows(node.data_dir)
    by_sha = {r["sha256"]: r for r in rows}
    import hashlib

    for path in stored.values():
        sent = _dataset_bytes(path)
        row = by_sha.get(hashlib.sha256(sent).hexdigest())
        assert row is not None, f"{path.name}: no archived instance has the bytes that were sent"
        on_disk = node.data_dir / str(row["path"])
        assert _dataset_bytes(on_disk) == sent, path.name
        meta = pydicom.dcmread(on_disk, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert row["transfer_syntax_uid"] == str(meta.TransferSyntaxUID)
        assert meta.SourceApplicationEntityTitle.strip() in ("TEST_SCU", "STORESCU")
    names = {pydicom.uid.UID(t).name for t in seen_syntaxes}
    for expected in ("JPEG Baseline (Process 1)", "JPEG-LS Lossless Image Compression",
                     "JPEG 2000 Image Compression (Lossless Only)", "RLE Lossless",
                     "Explicit VR Big Endian",
                     "Implicit VR Little Endian"):
        assert any(expected in n for n in names), (expected, names)
    assert echo(node.port) == SUCCESS


def test_deflated_instance_is_stored_as_sent(node: NodeProcess, tmp_path: Path) -> None:
    path = tmp_path / "deflated.dcm"
    ds = small_ct(patient_id="DEFLATE")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert send(node.port, [path]) == [SUCCESS]
    (row,) = stored_rows(node.data_dir)
    assert row["transfer_syntax_uid"] == pydicom.uid.DeflatedExplicitVRLittleEndian
    on_disk = node.data_dir / str(row["path"])
    assert _dataset_bytes(on_disk) == _dataset_bytes(path)
    assert pydicom.dcmread(on_disk).PixelData == ds.PixelData


def test_dcmtk_storescu_series_and_echoscu(node: NodeProcess, tmp_path: Path) -> None:
    files = []
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for i in range(1, 11):
        path = tmp_path / f"{i}.dcm"
        small_ct(study_uid=study, series_uid=series, instance=i).save_as(path, enforce_file_format=True)
        files.append(path)
    result = _storescu(node.port, *files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Received Store Response (Success)") == 10
    rows = stored_rows(node.data_dir)
    assert len(rows) == 10 and all(r["calling_ae"] == "STORESCU" for r in rows)
    ping = subprocess.run(["echoscu", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert ping.returncode == 0, ping.stderr


def test_identical_resend_is_idempotent_and_changed_content_keeps_both(node: NodeProcess) -> None:
    ds = small_ct(patient_id="RESEND")
    assert send(node.port, [ds, ds]) == [SUCCESS, SUCCESS]
    assert len(stored_rows(node.data_dir)) == 1
    changed = small_ct(patient_id="RESEND", study_uid=ds.StudyInstanceUID,
                       series_uid=ds.SeriesInstanceUID, seed=99)
    changed.SOPInstanceUID = ds.SOPInstanceUID
    changed.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    assert send(node.port, [changed]) == [SUCCESS]
    rows = stored_rows(node.data_dir)
    assert [(r["version"], r["current"]) for r in rows] == [(1, 0), (2, 1)]
    assert rows[0]["path"] != rows[1]["path"]
    assert all((node.data_dir / str(r["path"])).is_file() for r in rows)
    assert f"instance {ds.SOPInstanceUID} resent with different content" in node.log()
    # The first version's file is untouched.
    first = pydicom.dcmread(node.data_dir / str(rows[0]["path"]))
    assert first.PixelData == ds.PixelData


def test_bad_instances_get_the_right_status_and_leave_nothing(node: NodeProcess, tmp_path: Path) -> None:
    no_study = small_ct()
    del no_study.StudyInstanceUID
    empty_series = small_ct()
    empty_series.SeriesInstanceUID = ""
    no_pixels = small_ct()
    del no_pixels.PixelData
    statuses = send(node.port, [no_study, empty_series, no_pixels])
    assert statuses == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND, DOES_NOT_MATCH]
    log = node.log()
    assert "StudyInstanceUID: missing or empty" in log
    assert "SeriesInstanceUID: missing or empty" in log
    assert "CT Image Storage without Pixel Data" in log
    assert stored_rows(node.data_dir) == [] and archive_files(node.data_dir) == []
    assert send(node.port, [small_ct()]) == [SUCCESS]  # and the node goes on serving


def test_traversal_uid_never_leaves_the_data_directory(node: NodeProcess, tmp_path: Path) -> None:
    """Kept as a PACS would (issue 13), under hashed names: never a path component."""
    victim = tmp_path / "etc"
    victim.mkdir()
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        ds = small_ct()
        setattr(ds, keyword, "../../../../etc/x")
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = "../../../../etc/x"
        path = tmp_path / f"{keyword}.dcm"
        ds.save_as(path, enforce_file_format=True)
        result = _storescu(node.port, path)
        assert "Received Store Response (Success)" in result.stdout, result.stdout
    rows = stored_rows(node.data_dir)
    assert len(rows) == 3 and all(r["uid_flags"] for r in rows)
    for row in rows:
        assert ".." not in str(row["path"]) and "etc" not in str(row["path"])
        assert node.data_dir.resolve() in (node.data_dir / str(row["path"])).resolve().parents
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and node.data_dir not in p.parents
               and p.suffix != ".dcm" and not p.name.endswith((".log", ".toml"))]
    assert outside == []
    assert not Path("/etc/x").exists()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _limit_file_size_to_2_mib() -> None:
    """In the node's process (preexec): files over 2 MiB fail with EFBIG, no SIGXFSZ."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


def test_disk_full_answers_out_of_resources_and_the_node_goes_on(tmp_path: Path) -> None:
    """A real ENOSPC: the data directory on a 3 MiB tmpfs (as root), else a file-size limit."""
    mnt = tmp_path / "small"
    mounted = _mount_tmpfs(mnt, "3m")
    # not root: the kernel's per-process file size limit gives EFBIG instead
    preexec = None if mounted else _limit_file_size_to_2_mib
    proc = NodeProcess(mnt / "data", config="min_free_mb = 0\n", preexec_fn=preexec, workers=0)
    proc.log_path = tmp_path / "node.log"
    try:
        proc.start()
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        big = [small_ct(study_uid=study, series_uid=series, instance=i, size=256) for i in range(1, 41)]
        statuses = send(proc.port, big)
        assert statuses[0] == SUCCESS
        assert OUT_OF_RESOURCES in statuses
        first_fail = statuses.index(OUT_OF_RESOURCES)
        assert set(statuses[:first_fail]) == {SUCCESS}
        assert "out of resources" in proc.log()
        rows = stored_rows(proc.data_dir)
        assert len(rows) == statuses.count(SUCCESS)
        for row in rows:  # every acknowledged instance is complete
            assert pydicom.dcmread(proc.data_dir / str(row["path"])).PixelData
        assert list((proc.data_dir / "tmp").iterdir()) == []
        assert echo(proc.port) == SUCCESS
    finally:
        proc.stop()
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)


def test_free_space_reserve_refuses_with_out_of_resources(tmp_path: Path) -> None:
    proc = NodeProcess(tmp_path / "data", config="min_free_mb = 100000000\n", workers=0).start()
    try:
        assert send(proc.port, [small_ct()]) == [OUT_OF_RESOURCES]
        assert "below the reserve" in proc.log()
        assert echo(proc.port) == SUCCESS
    finally:
        proc.stop()
