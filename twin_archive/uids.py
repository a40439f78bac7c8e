"""Validation of identifiers that arrive over the network.

A UID is used as a path component in the archive, so only the PS3.5 9.1 character
repertoire is accepted: digits and dots, at most 64 characters, no empty component.
Leading zeros in a component are tolerated (they occur in the wild and are harmless
in a path).
"""

from __future__ import annotations

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
