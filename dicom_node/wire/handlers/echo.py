"""Verification SCP (C-ECHO)."""

from __future__ import annotations

from pynetdicom.events import Event

from dicom_node.wire import statuses


def handle_echo(event: Event) -> int:
    """Answer a C-ECHO: the node is up."""
    return statuses.SUCCESS
