"""Identifiers as received, made safe to print or log.

Patient IDs, names and UIDs are kept in the index exactly as they arrived, control
characters included (a PACS keeps them; changing them would break matching with the
PACS). Wherever they are printed or logged, :func:`printable` escapes every control
or formatting character (NUL, ESC, newline, DEL, C1 controls, bidirectional overrides)
as ``\\xNN`` / ``\\uNNNN``, so that a terminal or the journal shows them as text and no
value can forge a log line or move the cursor. Letters of any script are left alone.
"""

from __future__ import annotations

import unicodedata

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: object) -> str:
    """``str(value)`` with every control or formatting character escaped."""
    text = "" if value is None else str(value)
    if text.isprintable():  # the common case: nothing to do (space is printable)
        return text
    return "".join(_escape(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch
                   for ch in text)


def has_control(value: object) -> bool:
    """True when :func:`printable` would change ``value``."""
    return printable(value) != ("" if value is None else str(value))
