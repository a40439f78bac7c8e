"""Every UID the pipelines create comes from here.

UIDs are derived from a random UUID under the ``2.25`` root (PS3.5 Annex B.2), so no
organisation root is needed and no two nodes can collide. Results are never written
over existing objects: each run gets new series and instance UIDs.
"""

from __future__ import annotations

import re

from pydicom.uid import UID, generate_uid

_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*\Z")


def new_uid() -> UID:
    """Return a new, globally unique UID (``2.25.<uuid4 as integer>``, at most 64 chars)."""
    return generate_uid(prefix=None)


def is_valid_uid(value: object) -> bool:
    """Return ``True`` when ``value`` is a syntactically valid UID (PS3.5 9.1)."""
    text = "" if value is None else str(value)
    return 0 < len(text) <= 64 and _UID_RE.match(text) is not None
