"""Every UID the pipelines create comes from here.

UIDs are derived from a random UUID under the ``2.25`` root (PS3.5 Annex B.2), so no
organisation root is needed and no two nodes can collide. Results are never written
over existing objects: each run gets new series and instance UIDs.
"""

from __future__ import annotations

import re
import uuid

from pydicom.uid import UID, generate_uid

_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*\Z")
_NAMESPACE = uuid.UUID("6f1c3b52-3d1e-4f43-9a51-7d0c0de0a1b5")  # fixed: dicom-node's own namespace


def new_uid() -> UID:
    """Return a new, globally unique UID (``2.25.<uuid4 as integer>``, at most 64 chars)."""
    return generate_uid(prefix=None)


def is_valid_uid(value: object) -> bool:
    """Return ``True`` when ``value`` is a syntactically valid UID (PS3.5 9.1)."""
    text = "" if value is None else str(value)
    return 0 < len(text) <= 64 and _UID_RE.match(text) is not None


def stable_uid(*parts: str) -> UID:
    """Return the same UID for the same ``parts`` (``2.25.<uuid5 as integer>``).

    For identities that must not change between runs, e.g. the SR's device observer
    UID of one model version. Never use it for SOP instances or series.
    """
    if not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError("parts must be one or more strings")
    value = uuid.uuid5(_NAMESPACE, "\x1f".join(parts)).int
    return UID(f"2.25.{value}")
