"""The wire: the node's DICOM Application Entity and everything on its sockets.

The listener (:mod:`~dicom_node.wire.server`), its handlers (:mod:`~dicom_node.wire.handlers`:
association admission, C-ECHO, C-STORE), the bounded reads on every socket
(:mod:`~dicom_node.wire.bounded_wire`), the fast receive path behind its switch
(:mod:`~dicom_node.wire.fast_receive`, the one module that touches pynetdicom's internals),
TLS contexts (:mod:`~dicom_node.wire.tls`), extra acceptor processes on the same port
(:mod:`~dicom_node.wire.acceptor`) and the socket-pair protocol with child processes
(:mod:`~dicom_node.wire.childproc`), DICOM statuses named in one place
(:mod:`~dicom_node.wire.statuses`) and the listener's counters
(:mod:`~dicom_node.wire.metrics`).

It imports the foundation, the configuration modules at ``dicom_node``'s top and the
archive; never the queue, the runtime, learning or the CLI.
"""
