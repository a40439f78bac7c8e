"""MPPS SCP: N-CREATE and N-SET on Modality Performed Procedure Step (PS3.4 Annex F.7).

Each handler reads the message (:mod:`dicom_node.queue.mpps`), keeps it in ``queue.sqlite`` in
one transaction (with its copy for the PACS when ``forward_mpps`` is set), answers, and
wakes the stability monitor; nothing else runs on that path. A malformed or
out-of-order message is refused with its PS3.7 status and an Error Comment, and logged
in one line.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom.events import Event

from dicom_node.settings import Settings, resolve_forward
from dicom_node.wire import statuses
from dicom_node.wire.services import Service
from dicom_node.queue.mpps import COMPLETED, DISCONTINUED, MppsRefused, MppsSteps, read_create, read_set

LOG = logging.getLogger(__name__)

#: Error Comment (0000,0902) is LO: 64 characters at most.
_COMMENT_MAX = 64
#: Bytes of one message kept for ``forward_mpps`` at most (a step listing 20,000
#: instances encodes to about 2.3 MB).
MAX_FORWARD_BYTES = 16 << 20


def _refusal(status: int, why: str) -> Dataset:
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = why[:_COMMENT_MAX]
    return answer


def _not_kept(what: str, uid: str, event: Event, exc: BaseException) -> Dataset:
    """Resource limitation: the step could not be kept; the scanner may send it again."""
    LOG.error("MPPS %s %s from %s not kept (0x%04X, resource limitation): %s", what, uid,
              _who(event), statuses.RESOURCE_LIMITATION, exc)
    return _refusal(statuses.RESOURCE_LIMITATION, f"cannot keep it now: {exc}")


def _who(event: Event) -> str:
    return (event.assoc.requestor.ae_title or "").strip() or "?"


def _raw(ds: Dataset, steps: MppsSteps) -> bytes:
    """The data set as it came, explicit VR little endian, for forwarding (b'' when
    nothing is forwarded).

    Raises
    ------
    MppsRefused
        When it cannot be encoded (0110: pynetdicom's encoder would log a traceback and
        give nothing, so the step would be kept and silently not passed on) or is larger
        than :data:`MAX_FORWARD_BYTES` (0213).
    """
    if not steps.forward_to:
        return b""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    try:
        write_dataset(fp, ds)
    except Exception as exc:  # a value that does not encode (pydicom raises many kinds)
        raise MppsRefused(statuses.PROCESSING_FAILURE,
                          f"cannot encode it to pass on: {exc}") from None
    raw = fp.getvalue()
    if len(raw) > MAX_FORWARD_BYTES:
        raise MppsRefused(statuses.RESOURCE_LIMITATION,
                          f"{len(raw)} bytes: more than {MAX_FORWARD_BYTES} to pass on")
    return raw


def handle_n_create(event: Event, steps: MppsSteps, lock: threading.Lock,
                    on_change: Callable[[], None]) -> tuple[Any, Dataset | None]:
    """``EVT_N_CREATE``: keep a new step (IN PROGRESS); its attribute list is answered back."""
    request: Any = event.request
    uid = str(request.AffectedSOPInstanceUID or "") or generate_uid()
    try:
        ds = event.attribute_list
        message = read_create(ds)
        raw = _raw(ds, steps)
        with lock:
            steps.create(uid, message, calling_ae=_who(event), raw=raw)
    except MppsRefused as exc:
        LOG.warning("MPPS N-CREATE %s from %s refused (0x%04X): %s", uid, _who(event), exc.status,
                    exc.why)
        return _refusal(exc.status, exc.why), None
    except (sqlite3.Error, OSError) as exc:  # the queue cannot be written (disk full, lock)
        return _not_kept("N-CREATE", uid, event, exc), None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # cannot be decoded
        LOG.warning("MPPS N-CREATE %s from %s refused: cannot read it (%s)", uid, _who(event), exc)
        return _refusal(statuses.PROCESSING_FAILURE, f"cannot read the attribute list: {exc}"), None
    LOG.info("MPPS step %s from %s: IN PROGRESS (station %s)", uid, _who(event),
             message.station or "?")
    on_change()
    ds.SOPClassUID = request.AffectedSOPClassUID
    ds.SOPInstanceUID = uid
    return statuses.SUCCESS, ds


def handle_n_set(event: Event, steps: MppsSteps, lock: threading.Lock,
                 on_change: Callable[[], None]) -> tuple[Any, Dataset | None]:
    """``EVT_N_SET``: apply a modification (COMPLETED, DISCONTINUED, or more attributes)."""
    request: Any = event.request
    uid = str(request.RequestedSOPInstanceUID or "")
    try:
        ds = event.modification_list
        message = read_set(ds)
        raw = _raw(ds, steps)
        with lock:
            status = steps.update(uid, message, raw=raw)
    except MppsRefused as exc:
        LOG.warning("MPPS N-SET %s from %s refused (0x%04X): %s", uid, _who(event), exc.status,
                    exc.why)
        return _refusal(exc.status, exc.why), None
    except (sqlite3.Error, OSError) as exc:
        return _not_kept("N-SET", uid, event, exc), None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        LOG.warning("MPPS N-SET %s from %s refused: cannot read it (%s)", uid, _who(event), exc)
        return _refusal(statuses.PROCESSING_FAILURE, f"cannot read the modification list: {exc}"), None
    if status == COMPLETED:
        empty = [s.series_uid for s in message.series or () if not s.instances]
        LOG.info("MPPS step %s from %s: COMPLETED, %d series, %d instance(s) listed; its series "
                 "are complete once those are in%s", uid, _who(event), len(message.series or ()),
                 message.listed(), f" (series listing no instance wait for the quiet period: "
                                   f"{', '.join(empty)})" if empty else "")
    elif status == DISCONTINUED:
        LOG.info("MPPS step %s from %s: DISCONTINUED (%s); its series complete after the quiet "
                 "period as usual", uid, _who(event),
                 _reason(ds) or "no reason given")
    else:
        LOG.info("MPPS step %s from %s: updated, still %s", uid, _who(event), status)
    on_change()
    return statuses.SUCCESS, None


def _reason(ds: Dataset) -> str:
    """Performed Procedure Step Discontinuation Reason Code Sequence, in words."""
    items = ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence") or ()
    return "; ".join(str(item.get("CodeMeaning", "") or item.get("CodeValue", "")) for item in items)


#: Modality Performed Procedure Step SOP Class (PS3.4 F.7).
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"


def listener_service(settings: Settings, on_change: Callable[[], None]) -> Service:
    """MPPS N-CREATE and N-SET for the listener: steps kept in ``queue.sqlite``, each
    accepted message queued for ``forward_mpps`` in the same transaction; ``on_change``
    (the monitor's and the forwarder's wake-up) after each."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import evt

    from dicom_node.queue.jobs import connect_queue

    forward = resolve_forward(settings.forward_mpps, settings.destinations).key \
        if settings.forward_mpps else ""
    steps = MppsSteps(connect_queue(settings.data_dir), forward_to=forward)
    lock = threading.Lock()

    def close() -> None:
        with lock:
            steps.db.conn.close()

    return Service(sop_class=MPPS_SOP_CLASS, name="MPPS",
                   transfer_syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian),
                   handlers=((evt.EVT_N_CREATE, handle_n_create, [steps, lock, on_change]),
                             (evt.EVT_N_SET, handle_n_set, [steps, lock, on_change])),
                   close=close)
