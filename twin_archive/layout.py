"""Where things live under the data directory.

::

    <data-dir>/
      index.sqlite            the archive index (WAL mode)
      archive.key             per-installation secret for patient folder names (0600)
      tmp/                    temporary files of writes in progress (cleaned at start)
      archive/<kk>/<patient-key>/<study-uid>/<series-uid>/<sop-uid>.<sha12>.dcm
      quarantine/             files start-up or ``archive verify --repair`` set aside

``patient-key`` is an HMAC-SHA256 of the Issuer of Patient ID and the Patient ID with
the installation's secret, so no PHI appears in a path and the folder name cannot be
reversed by hashing a list of medical record numbers. An instance without a Patient ID
goes to an *unidentified* twin keyed by its Issuer and Study Instance UID (another key
derived from the same secret, so it never meets a real patient's key). The content
hash in the file name lets a resent instance with different content sit beside the
first version. A UID that is not conformant is never a path component: its folder or
file is named by a hash of it (:func:`twin_archive.uids.path_component`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from twin_archive.errors import InvalidInstanceError
from twin_archive.uids import path_component

INDEX_NAME = "index.sqlite"
KEY_NAME = "archive.key"
ARCHIVE_DIR = "archive"
QUARANTINE_DIR = "quarantine"


def load_or_create_key(data_dir: Path) -> bytes:
    """Return the installation secret, creating it (mode 0600) on first use."""
    path = data_dir / KEY_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise InvalidInstanceError("archive.key", f"{path} is shorter than 32 bytes") from None
        return key
    key = secrets.token_bytes(32)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def patient_key(secret: bytes, patient_id: str, issuer: str = "") -> str:
    """Return the 32-hex-digit folder name of a patient (no PHI)."""
    mac = hmac.new(secret, f"{issuer}\x00{patient_id}".encode("utf-8", "surrogateescape"),
                   hashlib.sha256)
    return mac.hexdigest()[:32]


def unidentified_key(secret: bytes, study_uid: str, issuer: str = "") -> str:
    """The 32-hex-digit key of the unidentified twin of one study (no Patient ID sent).

    Derived with a key of its own (HMAC of the secret), so it cannot equal the key of
    any Patient ID, whatever characters that ID holds.
    """
    derived = hmac.new(secret, b"dicom-node unidentified twin", hashlib.sha256).digest()
    mac = hmac.new(derived, f"{issuer}\x00{study_uid}".encode("utf-8", "surrogateescape"),
                   hashlib.sha256)
    return mac.hexdigest()[:32]


def instance_relpath(
    key: str, study_uid: str, series_uid: str, sop_uid: str, sha256: str
) -> Path:
    """Return the path of an instance file relative to the data directory.

    A conformant UID names its folder or file as it is; any other is replaced by a
    hash of it (:func:`~twin_archive.uids.path_component`), so nothing from the wire
    can climb out of the archive or hide a control character in a path.

    Raises
    ------
    InvalidInstanceError
        If a UID is empty.
    ValueError
        If ``key`` is not 32 hex digits.
    """
    parts = []
    for keyword, value in (
        ("StudyInstanceUID", study_uid),
        ("SeriesInstanceUID", series_uid),
        ("SOPInstanceUID", sop_uid),
    ):
        if not value:
            raise InvalidInstanceError(keyword, "missing or empty")
        parts.append(path_component(value))
    if len(key) != 32 or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"key: expected 32 hex digits, got {key!r}")
    return Path(ARCHIVE_DIR, key[:2], key, parts[0], parts[1], f"{parts[2]}.{sha256[:12]}.dcm")
