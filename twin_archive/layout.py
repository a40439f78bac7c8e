"""Where things live under the data directory.

::

    <data-dir>/
      index.sqlite            the archive index (WAL mode)
      archive.key             per-installation secret for patient folder names (0600)
      tmp/                    temporary files of writes in progress (cleaned at start)
      archive/<kk>/<patient-key>/<study-uid>/<series-uid>/<sop-uid>.<sha12>.dcm

``patient-key`` is an HMAC-SHA256 of the Issuer of Patient ID and the Patient ID with
the installation's secret, so no PHI appears in a path and the folder name cannot be
reversed by hashing a list of medical record numbers. The content hash in the file
name lets a resent instance with different content sit beside the first version.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from twin_archive.errors import InvalidInstanceError
from twin_archive.uids import uid_problem

INDEX_NAME = "index.sqlite"
KEY_NAME = "archive.key"


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
    mac = hmac.new(secret, f"{issuer}\x00{patient_id}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


def instance_relpath(
    key: str, study_uid: str, series_uid: str, sop_uid: str, sha256: str
) -> Path:
    """Return the path of an instance file relative to the data directory.

    Raises
    ------
    InvalidInstanceError
        If any UID is not a valid UID (so it cannot climb out of the archive).
    """
    for keyword, value in (
        ("StudyInstanceUID", study_uid),
        ("SeriesInstanceUID", series_uid),
        ("SOPInstanceUID", sop_uid),
    ):
        problem = uid_problem(value)
        if problem:
            raise InvalidInstanceError(keyword, problem)
    if len(key) != 32 or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"key: expected 32 hex digits, got {key!r}")
    return Path("archive", key[:2], key, study_uid, series_uid, f"{sop_uid}.{sha256[:12]}.dcm")
