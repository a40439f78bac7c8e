"""The fast receive path: the one place that reaches into pynetdicom's internals.

One switch, ``fast_receive`` in the settings (default true), installs it in the node's
process; with false the node receives with pynetdicom as shipped. Either way the
wire is bounded by the node's own code (:mod:`dicom_node.wire.bounded_wire`, ended
associations released by :meth:`dicom_node.wire.server.DicomServer.reap`) and every data
set is parsed to its end before Success (:mod:`twin_archive.dataset_walk`), so the
two modes differ in speed, not in what they accept or answer; the SCP tests run in
both.

What it changes, each part in its own module of this package (each module's
docstring names the internals it uses and why no documented hook does):

* :mod:`.speedups` - pynetdicom's polling loops wait on work instead of 1 ms sleeps
  (``dul.time``, ``association.time``, ``DULServiceProvider._run_loop_delay``,
  ``_kill_thread``, ``Queue.put`` of the DUL's queues), reads of up to 1 MiB
  (``AssociationSocket.recv``), presentation contexts copied without re-validation
  (``transport.deepcopy``), UIDs validated once (``set_uid`` in five modules);
* :mod:`.spooling` - C-STORE data sets written to the archive's temporary folder as
  they arrive (``_config.STORE_RECV_CHUNKED_DATASET``, ``dimse_messages``'
  ``NamedTemporaryFile``, ``create_file_meta``, ``write_file_meta_info``);
* :mod:`.store_lane` - C-STOREs received and answered in the DUL thread
  (``DULServiceProvider._read_pdu_data``, ``_decode_pdu``, ``_recv_pdu``,
  ``event_queue``, ``to_provider_queue``, ``_idle_timer``, ``Association._accepted_cx``,
  ``_sent_release``, ``C_STORE._dataset_file``/``_dataset_path``);
* :mod:`.store_response` - C-STORE responses encoded by hand
  (``DIMSEServiceProvider.send_msg``).

Two documented pynetdicom switches are set in both modes, because they change what the
node accepts, not how fast: :mod:`.uids` (``_config.VALIDATORS``, non-conformant UIDs
taken, DESIGN decision 2) and :func:`quiet_standard_handlers`
(``_config.LOG_HANDLER_LEVEL``).

pynetdicom is pinned in ``pyproject.toml`` to the range these were tested with
(:data:`TESTED_VERSIONS`). :func:`install` first runs :func:`self_check`, which looks
for every internal the parts rely on; when one is missing or changed it installs
nothing, logs one warning, and the node serves with plain pynetdicom.
"""

from __future__ import annotations

import logging
from typing import Any

import pynetdicom
from pynetdicom.dimse import DIMSEServiceProvider

from dicom_node.wire.fast_receive import speedups, spooling, store_lane
from dicom_node.wire.fast_receive.uids import accept_nonconformant_uids
from dicom_node.wire.fast_receive.spooling import (
    SpoolFile,
    discard_unclaimed,
    encode_file_meta,
    pydicom_file_meta,
    received_dataset,
    release_ended,
)
from twin_archive.spool import Spool

LOG = logging.getLogger(__name__)

#: pynetdicom versions the fast path was tested with (``pyproject.toml`` pins the same).
TESTED_VERSIONS = ("3.0.",)

__all__ = [
    "SpoolFile", "accept_nonconformant_uids", "discard_unclaimed", "encode_file_meta", "freeze_heap", "install",
    "pydicom_file_meta", "quiet_standard_handlers", "received_dataset", "register_server",
    "release_ended",
    "self_check", "spool_of",
]

freeze_heap = speedups.freeze_heap
quiet_standard_handlers = speedups.quiet_standard_handlers


def self_check() -> str | None:
    """Why the fast path cannot be installed on this pynetdicom, or None when it can."""
    version = pynetdicom.__version__
    if not version.startswith(TESTED_VERSIONS):
        return f"pynetdicom {version} is not a tested version ({', '.join(TESTED_VERSIONS)}x)"
    for part in (speedups, spooling, store_lane):
        if part._installed:  # noqa: SLF001 - checked before its install (it changes what it checks)
            continue
        problem = part._compatible()  # noqa: SLF001 - each part's own check
        if problem is not None:
            return problem
    send_msg = getattr(DIMSEServiceProvider, "send_msg", None)
    if send_msg is None or send_msg.__code__.co_varnames[:3] != ("self", "primitive", "context_id"):
        return "DIMSEServiceProvider.send_msg has changed"
    return None


def install(ae: Any, spool_dir: Any) -> bool:
    """Install the fast path for the associations ``ae`` accepts, after the self-check.

    Returns
    -------
    bool
        True when installed; False (one warning logged) when the self-check found
        changed internals: the node then receives with plain pynetdicom.
    """
    problem = self_check()
    if problem is not None:
        LOG.warning("fast_receive: %s; receiving with plain pynetdicom (slower, same results)",
                    problem)
        return False
    return speedups.install() and spooling.install(ae, spool_dir) and store_lane.install(ae)


def spool_of(request: Any) -> Spool | None:
    """The spool a C-STORE request's data set was written to, or None (in memory)."""
    spooled = getattr(request, "_dataset_file", None)
    return spooled.spool if isinstance(spooled, SpoolFile) else None


def register_server(ae: Any, server: Any) -> None:
    """Record a server made with ``AE.make_server`` as ``AE.start_server`` does.

    The node makes its server itself (to pass its own server class, for bounded reads
    and a shared listening socket); pynetdicom's ``AssociationServer.shutdown`` removes
    the server from ``AE._servers``, so it must be there (in both receive modes).
    """
    ae._servers.append(server)  # noqa: SLF001
