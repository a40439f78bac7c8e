"""A small pynetdicom client for the tests: send data sets or files, return statuses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification


def _context_of(item: Dataset | Path) -> tuple[str, str]:
    if isinstance(item, Path):
        meta = dcmread(item, stop_before_pixels=True)
        return str(meta.file_meta.MediaStorageSOPClassUID), str(meta.file_meta.TransferSyntaxUID)
    return str(item.SOPClassUID), str(item.file_meta.TransferSyntaxUID)


def send(port: int, items: Sequence[Dataset | Path], *, calling_ae: str = "TEST_SCU",
         called_ae: str = "DICOM_NODE") -> list[int]:
    """Send ``items`` over one association; return one status per item.

    Raises
    ------
    ConnectionRefusedError
        If the association is rejected or cannot be opened.
    """
    ae = AE(ae_title=calling_ae)
    for sop_class, ts in sorted({_context_of(i) for i in items}):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionRefusedError(f"association rejected/aborted (calling AE {calling_ae})")
    statuses = []
    # Files are sent as their bytes, without decoding and re-encoding (pynetdicom's
    # module-level switch; restored afterwards).
    from pynetdicom import _config

    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for item in items:
            rsp = assoc.send_c_store(item)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return statuses


def echo(port: int, *, calling_ae: str = "TEST_SCU", called_ae: str = "DICOM_NODE") -> int:
    """C-ECHO; returns the status, or -1 if no association."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return -1
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()


def stored_rows(data_dir: Path) -> list[dict[str, object]]:
    """Every instance row of the node's index, read with plain sqlite3."""
    import sqlite3

    conn = sqlite3.connect(data_dir / "index.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM instances ORDER BY id")]
    finally:
        conn.close()


def archive_files(data_dir: Path) -> list[Path]:
    """Every file under the archive folder."""
    root = data_dir / "archive"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def iter_pixel_test_files() -> Iterable[Path]:
    """pydicom's own test files (shipped in the wheel) that carry pixel data and file meta.

    Listed from the package folder directly: ``get_testdata_files`` would try to
    download the optional pydicom-data set, and nothing is downloaded here.
    """
    import pydicom.data

    root = Path(pydicom.data.__file__).parent / "test_files"
    for name in sorted(root.rglob("*.dcm")):
        try:
            ds = dcmread(name)
        except Exception:
            continue
        if "PixelData" in ds and "TransferSyntaxUID" in ds.file_meta and "SOPClassUID" in ds:
            yield Path(name)


def store_pdus(assoc: Any, ds: Dataset, max_pdu: int = 16384, message_id: int = 1) -> list[Any]:
    """The P-DATA primitives of a C-STORE request for ``ds`` (Explicit VR Little Endian),
    on the association's first accepted context: for tests that send part of a message."""
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return list(msg.encode_msg(assoc.accepted_contexts[0].context_id, max_pdu))
