"""C-STORE data sets written to the archive's temporary folder as they arrive.

pynetdicom can write a C-STORE's data set to a file fragment by fragment instead of
assembling it in memory (``_config.STORE_RECV_CHUNKED_DATASET``; the handler then gets
``event.dataset_path``). It opens that file with :func:`tempfile.NamedTemporaryFile`
in the system's temporary folder and writes a File Meta Information group built with
pydicom. :func:`install` keeps pynetdicom's own receive path and changes, for the
associations the node's AE accepts and nothing else, where that file goes and what
writes it: a :class:`twin_archive.spool.Spool` in the archive's temporary folder (same
file system, so it is renamed into place, never copied), which hashes each fragment
and starts its write-back while the next is still on the wire, with the File Meta
Information the node has always written (:func:`encode_file_meta`, calling AE title
included).

Why: over one association the node answers each C-STORE only after the file is
durable, so the time from the last fragment to the answer is what limits the rate.
With the data set already written, hashed and mostly on its way to the disk, that
time is the ``fdatasync`` of the tail, the directory ``fsync`` and the index commit.

Every spool ends: the C-STORE handler hands it to the archive, which commits or
discards it; a spool whose request was never handled (association aborted or
connection lost mid-transfer) is discarded when the connection closes
(:func:`discard_unclaimed`, bound to ``EVT_CONN_CLOSE``); a crash leaves a ``*.part``
file that the archive removes at the next start.

If pynetdicom no longer has the names this relies on, nothing is installed (logged
once at WARNING) and the node receives data sets in memory as before.
"""

from __future__ import annotations

import logging
import struct
import threading
import weakref
from pathlib import Path
from typing import Any

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom import _config
from pynetdicom import dimse_messages as _messages
from pynetdicom import dul as _dul
from pynetdicom.dsutils import create_file_meta as _pynetdicom_create_file_meta
from pynetdicom.dsutils import split_dataset

from twin_archive import InvalidInstanceError
from twin_archive.spool import Spool

LOG = logging.getLogger(__name__)

_PREAMBLE = b"\x00" * 128 + b"DICM"
_META_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"

_install_lock = threading.Lock()
_installed = False
#: The spool folder of each AE that spools (the node's; weak: AEs come and go in tests).
_spool_dirs: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()
#: pynetdicom's ``NamedTemporaryFile``, kept for everything that is not the node's.
_messages_named_temporary_file: Any = None


def _short_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                     calling_ae: str) -> bytes | None:
    """Preamble, ``DICM`` and File Meta Information for a received instance, by hand.

    Byte for byte what :func:`pydicom_file_meta` gets from pydicom (a test compares
    them) in a few microseconds instead of a few hundred: Explicit VR Little Endian,
    UIDs padded with NUL, the AE title with a space, pynetdicom's implementation UID
    and version name, (0002,0016) only when the calling AE title is known.

    Returns
    -------
    bytes or None
        None when a value is not plain ASCII or too long for its VR; the caller then
        takes pydicom's path, which validates and reports it.
    """
    values = (sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_ae)
    if not all(v.isascii() and len(v) <= 64 for v in values):
        return None
    parts = [
        _META_VERSION,
        _short_element(0x0002, b"UI", sop_class_uid.encode(), b"\x00"),
        _short_element(0x0003, b"UI", sop_instance_uid.encode(), b"\x00"),
        _short_element(0x0010, b"UI", transfer_syntax_uid.encode(), b"\x00"),
        _short_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode(), b"\x00"),
        _short_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode(), b" "),
    ]
    if calling_ae:
        parts.append(_short_element(0x0016, b"AE", calling_ae.encode(), b" "))
    body = b"".join(parts)
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
    return _PREAMBLE + group_length + body


def pydicom_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                      calling_ae: str) -> bytes:
    """The same as :func:`encode_file_meta`, by pydicom (the slow path, for odd values)."""
    meta = _pynetdicom_create_file_meta(sop_class_uid=UID(sop_class_uid),
                                        sop_instance_uid=UID(sop_instance_uid),
                                        transfer_syntax=UID(transfer_syntax_uid))
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae
    buf = DicomBytesIO()
    buf.write(_PREAMBLE)
    _pydicom_write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


class _MetaRequest:
    """What pynetdicom asks to be written as File Meta; the spool writes it by hand."""

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> None:
        self.values = (str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax))


def spools_for(ae: Any) -> Path | None:
    """The spool folder of ``ae`` when its accepted associations spool, else None."""
    return _spool_dirs.get(ae)


def spool_dir(assoc: Any) -> Path | None:
    """The spool folder when ``assoc`` is one the node accepted, else None."""
    return spools_for(assoc.ae) if assoc.is_acceptor else None


def _spooling_association() -> tuple[Any, Path] | None:
    """The association (and spool folder) when the current thread receives for the node."""
    dul = threading.current_thread()
    if not isinstance(dul, _dul.DULServiceProvider):
        return None
    assoc = dul.assoc
    folder = spool_dir(assoc)
    return (assoc, folder) if folder is not None else None


def open_spool(assoc: Any, folder: Path) -> SpoolFile:
    """A new spool for a data set arriving on ``assoc``, discarded if it is never handled."""
    spool = Spool(folder)
    spools = assoc.__dict__.setdefault("_dicom_node_spools", [])
    spools[:] = [s for s in spools if s.pending]  # forget the ones already handled
    spools.append(spool)
    return SpoolFile(spool, (assoc.requestor.ae_title or "").strip())


class SpoolFile:
    """What pynetdicom takes for its ``NamedTemporaryFile``: writes go to a :class:`Spool`.

    pynetdicom writes the preamble and ``DICM`` itself, then the File Meta, then each
    fragment of the data set; :func:`encode_file_meta` writes preamble and File Meta
    together, so the writes before it are dropped.
    """

    def __init__(self, spool: Spool, calling_ae: str) -> None:
        self.spool = spool
        self.calling_ae = calling_ae
        self.name = spool.name
        self._meta_written = False

    def write_meta(self, meta: bytes) -> None:
        self.spool.write_meta(meta)
        self._meta_written = True

    def write_file_meta(self, sop_class_uid: str, sop_instance_uid: str,
                        transfer_syntax_uid: str) -> None:
        """Write preamble and File Meta Information (by hand; pydicom for odd values).

        A value neither can encode is kept as the spool's error (answered when the
        request is handled), not raised: this runs in the network thread.
        """
        values = (sop_class_uid, sop_instance_uid, transfer_syntax_uid, self.calling_ae)
        encoded = encode_file_meta(*values)
        if encoded is None:
            try:
                encoded = pydicom_file_meta(*values)
            except Exception as exc:  # noqa: BLE001 - kept, answered later
                self.spool.error = InvalidInstanceError("File Meta Information",
                                                        f"cannot be encoded ({exc})")
        self.write_meta(encoded or b"")

    def write(self, data: bytes) -> int:
        if not self._meta_written:
            return len(data)  # pynetdicom's preamble and "DICM"
        return self.spool.write(data)

    @property
    def file(self) -> SpoolFile:
        return self  # pynetdicom calls .file.flush() after each fragment

    def flush(self) -> None:
        """Nothing buffered: each fragment is written at once."""

    def close(self) -> None:
        self.spool.close()


def _temporary_file(*args: Any, **kwargs: Any) -> Any:
    """``NamedTemporaryFile`` as pynetdicom calls it; a spool for the node's associations."""
    found = _spooling_association()
    if found is None:
        return _messages_named_temporary_file(*args, **kwargs)
    return open_spool(*found)


def _create_file_meta(**kwargs: Any) -> Any:
    if _spooling_association() is None:
        return _pynetdicom_create_file_meta(**kwargs)
    return _MetaRequest(**kwargs)


def _write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
    if not (isinstance(fp, SpoolFile) and isinstance(file_meta, _MetaRequest)):
        _pydicom_write_file_meta_info(fp, file_meta, *args, **kwargs)
        return
    fp.write_file_meta(*file_meta.values)


def discard_unclaimed(event: Any) -> int:
    """``EVT_CONN_CLOSE``: remove the spools of requests that were never handled.

    Returns
    -------
    int
        How many were removed.
    """
    removed = sum(s.discard() for s in event.assoc.__dict__.pop("_dicom_node_spools", []))
    if removed:
        LOG.info("association with %s ended during a transfer: %d unfinished data set(s) "
                 "removed, none was acknowledged", event.assoc.requestor.ae_title, removed)
    return removed


def release_ended(assoc: Any) -> int:
    """After ``assoc``'s threads ended: discard its unhandled spools, close its socket.

    Returns
    -------
    int
        Spools removed.
    """
    removed = sum(s.discard() for s in assoc.__dict__.pop("_dicom_node_spools", []))
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None and sock.fileno() != -1:
        try:
            sock.close()
        except OSError:
            pass
    if removed:
        LOG.info("association with %s ended abnormally: %d unfinished data set(s) removed, "
                 "none was acknowledged", (assoc.requestor.ae_title or "?").strip(), removed)
    return removed


def received_dataset(event: Any) -> bytes:
    """The encoded data set of a C-STORE that arrived on an association the node
    requested (a C-GET's instances), File Meta Information left out.

    pynetdicom keeps it in memory unless ``_config.STORE_RECV_CHUNKED_DATASET`` is set;
    that switch is process-wide and :func:`install` sets it (to spool what the node
    accepts), so in a process that also listens a C-GET's instances arrive as files
    (``event.dataset_path``) that pynetdicom does not remove on the requesting side:
    read and removed here. ``event.encoded_dataset`` would be empty then.
    """
    if not _config.STORE_RECV_CHUNKED_DATASET:
        return bytes(event.encoded_dataset(include_meta=False))
    path = Path(event.dataset_path)
    try:
        _, offset = split_dataset(path)
        with path.open("rb") as fp:
            fp.seek(offset)
            return fp.read()
    finally:
        path.unlink(missing_ok=True)


def _compatible() -> str | None:
    if not hasattr(_config, "STORE_RECV_CHUNKED_DATASET"):
        return "no _config.STORE_RECV_CHUNKED_DATASET"
    for name in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info"):
        if not hasattr(_messages, name):
            return f"pynetdicom.dimse_messages has no {name}"
    return None



def install(ae: Any, spool_dir: Path) -> bool:
    """Spool the data sets of C-STOREs that ``ae`` accepts into ``spool_dir``.

    Returns
    -------
    bool
        True when spooling is on for ``ae``; False when this pynetdicom does not fit
        (logged at WARNING; data sets are then received in memory).
    """
    global _installed, _messages_named_temporary_file
    with _install_lock:
        if not _installed:
            problem = _compatible()
            if problem is not None:
                LOG.warning("receiving into memory, not spooling (%s)", problem)
                return False
            _messages_named_temporary_file = _messages.NamedTemporaryFile
            _messages.NamedTemporaryFile = _temporary_file  # type: ignore[attr-defined]
            _messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined]
            _messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined]
            _config.STORE_RECV_CHUNKED_DATASET = True
            _installed = True
        _spool_dirs[ae] = Path(spool_dir)
        return True
