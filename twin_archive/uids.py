"""Validation of identifiers that arrive over the network, and the path names they get.

A conformant UID (PS3.5 9.1: digits and dots, at most 64 characters, no empty
component) may name a file or folder of the archive. Leading zeros in a component are
tolerated (they occur in the wild and are harmless in a path). Anything else a PACS
would still keep (a hex digest from an anonymiser, letters, over 64 characters, path
characters, control characters) is never used as a path: :func:`path_component` gives
it a hashed name instead (DESIGN decision 2), and the index flags the instance.
"""

from __future__ import annotations

import hashlib
import re

MAX_UID_LENGTH = 64  # PS3.5 Section 9.1
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*\Z")


def uid_problem(value: object) -> str | None:
    """Return what is wrong with ``value`` as a UID, or ``None`` when it is valid."""
    if value is None:
        return "missing"
    text = str(value)
    if text == "":
        return "empty"
    if len(text) > MAX_UID_LENGTH:
        return f"longer than {MAX_UID_LENGTH} characters ({len(text)})"
    if not _UID_RE.match(text):
        return "not a UID (only digits and dots are allowed, no empty component)"
    return None


def is_valid_uid(value: object) -> bool:
    """Return ``True`` when ``value`` is a syntactically valid UID."""
    return uid_problem(value) is None


#: Prefix of the hashed name of a non-conformant UID (a conformant UID never has a letter).
HASHED_PREFIX = "nc-"


def path_component(uid: str) -> str:
    """The name ``uid`` gets in a path: itself when conformant, else a hash of it.

    The hashed name (``nc-`` and 40 hex digits of SHA-256 of the UID's UTF-8 bytes) is
    the same for the same UID, so the instances of a series with an odd Series
    Instance UID still share one folder.

    Raises
    ------
    ValueError
        If ``uid`` is empty (nothing to name the file by).
    """
    if not uid:
        raise ValueError("uid: empty, cannot name a file or folder")
    if uid_problem(uid) is None:
        return uid
    digest = hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()
    return HASHED_PREFIX + digest[:40]
