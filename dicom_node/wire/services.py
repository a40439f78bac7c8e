"""DIMSE services the listener offers for the rooms above it.

The wire knows Verification and Storage. A service whose handlers keep state in the
queue database (Storage Commitment reports, Modality Performed Procedure Steps) is
built by the queue's room and handed to the listener as a :class:`Service`: the SOP
class, the roles the node accepts, and the handlers to bind - so the wire never imports
the queue (``tests/test_layering.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class Service:
    """One DIMSE service of the listener beyond Verification and Storage.

    Parameters
    ----------
    sop_class : str
        The SOP Class UID the node accepts as a presentation context.
    handlers : sequence of (event, handler, args)
        pynetdicom event bindings (``args`` may be empty).
    transfer_syntaxes : sequence of str
        The transfer syntaxes accepted for it (empty: pynetdicom's defaults).
    scu_role, scp_role : bool or None
        SCP/SCU Role Selection the node accepts (None: pynetdicom's default).
    close : callable, optional
        Called once when the listener stops (e.g. to close the service's connection).
    name : str
        For the log.
    """

    sop_class: str
    handlers: Sequence[tuple[Any, Callable[..., Any], list[Any]]] = field(default_factory=tuple)
    transfer_syntaxes: Sequence[str] = ()
    scu_role: bool | None = None
    scp_role: bool | None = None
    close: Callable[[], None] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.sop_class or not all(c.isdigit() or c == "." for c in self.sop_class):
            raise ValueError(f"a service needs a SOP Class UID, got {self.sop_class!r}")
