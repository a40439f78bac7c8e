"""pynetdicom's error records as one line each, and a dead receive thread's association ended.

What a hospital IT person reads in journald when a peer sends what the node cannot read:
one line with the reason, no traceback (:func:`one_line_pynetdicom_errors`).
"""

from __future__ import annotations

import logging
import sys
import threading

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from dicom_node.wire import bounded_wire

LOG = logging.getLogger(__name__)


class _OneLineErrors(logging.Filter):
    """pynetdicom's error records in one line: no traceback, at most 300 characters.

    pynetdicom logs a peer's malformed PDU or a broken connection with
    ``LOGGER.exception``: a traceback per connection, once 330 KB for one request.
    The node's log says what happened in one line (the reason is the exception's text).
    """

    #: pynetdicom's words for a peer's bytes it could not read, in the node's.
    REWORDED = {
        "Unable to decode the received PDU data":
            "malformed PDU received (cannot be decoded); the association is aborted",
    }

    #: pynetdicom's line before ``LOGGER.exception(exc)`` when a read of the socket failed.
    READ_FAILED = "Connection closed before the entire PDU was received"

    def filter(self, record: logging.LogRecord) -> bool:
        # A read the node's socket refused (bounded_wire) was logged there, with its reason:
        # pynetdicom's two lines about it (twice: it reads again) add nothing.
        if isinstance(record.msg, bounded_wire.LOGGED_REFUSALS):
            return False
        if record.msg == self.READ_FAILED and isinstance(sys.exc_info()[1],
                                                         bounded_wire.LOGGED_REFUSALS):
            return False
        if record.exc_info:
            record.exc_info = None
            record.exc_text = None
        if isinstance(record.msg, BaseException):  # LOGGER.exception(exc) after its message
            if not str(record.msg).strip():
                return False  # nothing to add to the line before it
            record.msg, record.args = f"reason: {type(record.msg).__name__}: {record.msg}", None
        elif record.msg in self.REWORDED:
            record.msg = self.REWORDED[record.msg]
        text = record.getMessage()
        if len(text) > 300 or "\n" in text:
            record.msg, record.args = text.replace("\n", " ")[:300], None
        return True


_ONE_LINE = _OneLineErrors()


def _receive_thread_failed(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: a thread of an accepted association died (DUL or reactor).

    pynetdicom's state machine re-raises what its receive thread met in a peer's
    message (a command set without Command Data Set Type, for one): the thread ended
    with a traceback on stderr, no A-ABORT was sent and the connection stayed open.
    Here the node logs one line, sends the A-ABORT, closes the connection and ends
    the association; :meth:`DicomServer.reap` then releases what it left.
    """
    thread = args.thread
    if isinstance(thread, DULServiceProvider):
        assoc = thread.assoc
    elif isinstance(thread, Association):
        assoc = thread
    else:
        _previous_excepthook(args)
        return
    if not assoc.is_acceptor:
        _previous_excepthook(args)
        return
    dul = assoc.dul
    LOG.warning("association with %s aborted: the node could not read what it sent (%s: %.200s)",
                (assoc.requestor.ae_title or "?").strip(), args.exc_type.__name__, args.exc_value)
    sock = getattr(dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.settimeout(1.0)
            sock.sendall(bounded_wire.A_ABORT_INVALID_PARAMETER)
        except OSError:
            pass
    assoc.is_aborted = True
    assoc.is_established = False
    assoc.kill()
    if isinstance(thread, Association):
        dul.kill_dul()


_previous_excepthook = threading.excepthook


def one_line_pynetdicom_errors() -> None:
    """Keep pynetdicom's own error records to one line each (idempotent).

    A logger's filters apply to the records logged on it, not on its children, so the
    filter goes on each of pynetdicom's module loggers (all exist once it is imported).
    """
    names = [n for n in list(logging.Logger.manager.loggerDict)
             if n == "pynetdicom" or n.startswith("pynetdicom.")]
    for name in names:
        pn_logger = logging.getLogger(name)
        if _ONE_LINE not in pn_logger.filters:
            pn_logger.addFilter(_ONE_LINE)
    threading.excepthook = _receive_thread_failed
