"""UIDs as a PACS keeps them, in both receive modes (DESIGN decision 2).

pynetdicom refuses a UID of over 64 characters wherever it meets one: building the
C-STORE request primitive from a received command set raised ``ValueError`` in the
receive thread, and the association was aborted, in both receive modes (issue 28).
The node keeps such an instance under a hashed name and flags it
(:mod:`twin_archive.layout`), so here pynetdicom's documented switch for the check,
``_config.VALIDATORS["UI"]``, takes any UID that is not empty and not absurdly long.
pydicom's warning for a non-conformant UI value (several lines per instance on
stderr, through :mod:`warnings`) is silenced for the same reason: the archive flags
the UID (``uid_flags``) and the log says nothing that the index does not.

Installed by :func:`accept_nonconformant_uids` in both receive modes (it is not part of
the ``fast_receive`` switch: it changes what the node accepts, which must not depend on
the mode); idempotent.
"""

from __future__ import annotations

import warnings

from pynetdicom import _config

#: Longest UID taken from the wire, characters (a command set is at most 64 KiB).
MAX_UID_LENGTH = 1024


def validate_any_uid(value: object) -> tuple[bool, str]:
    """pynetdicom's validator signature: any UID of 1 to :data:`MAX_UID_LENGTH` characters."""
    if not isinstance(value, str) or len(value) > MAX_UID_LENGTH:
        return False, f"must be a string of at most {MAX_UID_LENGTH} characters"
    return True, ""


def accept_nonconformant_uids() -> None:
    """Let pynetdicom take non-conformant UIDs; quiet pydicom's warning for them."""
    _config.VALIDATORS["UI"] = validate_any_uid
    warnings.filterwarnings("ignore", message=r"Invalid value for VR UI", category=UserWarning)
