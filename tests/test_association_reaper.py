"""The reaper releases what ended associations left, and never a starting one."""

from __future__ import annotations

import socket
from pathlib import Path

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from dicom_node.wire.server import DicomServer
from dicom_node.settings import Settings
from twin_archive import Archive


def test_reaper_leaves_an_association_whose_thread_has_not_started(tmp_path: Path) -> None:
    """EVT_CONN_OPEN comes before pynetdicom starts the association's thread: a reaper
    tick in between closed new connections silently (seen under load with two
    listener processes: storescu got 'Peer aborted Association')."""
    settings = Settings(data_dir=tmp_path, port=0, bind_address="127.0.0.1")
    with Archive(tmp_path) as archive:
        server = DicomServer(settings, archive.ingest)
        ours, theirs = socket.socketpair()
        try:
            assoc = Association(server.ae, "acceptor")
            assoc.set_socket(AssociationSocket(assoc, client_socket=ours))
            server._opened.add(assoc)  # noqa: SLF001 - what EVT_CONN_OPEN records
            assert server.reap() == 0
            assert ours.fileno() != -1
            assert assoc in server._opened  # noqa: SLF001
        finally:
            ours.close()
            theirs.close()
