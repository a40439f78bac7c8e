"""The one clock: every time the node records is read here and written in one text form.

A leaf: the standard library only (``tests/test_layering.py`` checks that no other module
reads the clock).
"""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> datetime:
    """The current time, timezone-aware UTC, to the microsecond."""
    return datetime.now(timezone.utc)


def iso(t: datetime) -> str:
    """ISO 8601 text of ``t`` in UTC with microseconds (``2026-11-30T08:41:47.123456+00:00``).

    Every time the stores write is in this form, so text order is time order.
    Naive datetimes are taken as local time (:meth:`datetime.astimezone`).
    """
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")
