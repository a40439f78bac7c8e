"""Cuts in pynetdicom's overhead on the receive path.

The measurements behind each part are in ``benchmarks/README.md`` ("What one instance
costs the node", "The C-STORE lane and what followed", "Figures behind the receive-path
speed-ups"); this docstring says what each part does and why, not how fast.

**Wake-ups.** 
pynetdicom 3.0 runs two polling threads per association. The DUL thread sleeps
``_run_loop_delay`` (1 ms) whenever the socket is quiet and nothing is queued to send;
the association thread sleeps 1 ms before each look at the queue of assembled DIMSE
messages. A C-STORE waits for both: the request waits up to 1 ms to be noticed
after its last PDU, the response up to 1 ms to be sent, and the next request's
first PDU up to 1 ms to be read (pynetdicom's own ``TODO: try and make this event
based``; PR #139 and issue #120 are about the same cost). On loopback that was a
sizeable share of a store.

:func:`install` keeps every loop and every timeout as it is and only changes what a
tick waits on, so the worst case is still 1 ms and idle CPU is unchanged:

* the DUL thread's idle sleep becomes ``select()`` on its socket and an ``eventfd``
  that a put on its outbound queue (``to_provider_queue``) writes to: it wakes when
  the peer sends or when a response is ready to go;
* the acceptor's 1 ms sleep becomes a wait on its DIMSE message queue's condition:
  it wakes when a message is complete (and hands the queue's wake-up on, so that a
  ``get(block=True)`` waiting on the same queue is never starved of it).

Only associations the node accepts are changed; those it requests (the sender)
run as shipped.

It replaces the ``time`` name inside ``pynetdicom.dul`` and ``pynetdicom.association``
with a stand-in whose ``sleep`` does that on those two threads and is
:func:`time.sleep` everywhere else. It checks the attributes it relies on and
installs nothing (logging why) when they are not there, so a pynetdicom upgrade
costs speed, never correctness.

While an association transfers data (Sta6) both loops wait up to 20 ms instead of
1 ms when idle (:func:`_tick`): what they poll for then all wakes them, release and
abort indications included.

**Association set-up.** For each association the acceptor deep-copies the server's
supported presentation contexts (``transport.RequestHandler._create_association``):
every Storage SOP class times every accepted transfer syntax, about 2,000 UIDs, each
re-validated with a regular expression as pydicom rebuilds it. That was over half of
the node's CPU for an association of one instance, and four associations starting
together queue behind it. :func:`install` makes that copy
:func:`copy_contexts`: new context objects with their own transfer syntax lists (so
nothing the association does to its copy reaches the server's), sharing the UIDs,
which are immutable strings.

pynetdicom also validates every UID of the request three times with regular
expressions; :func:`cached_set_uid` remembers the valid ones.

**Heap.** :func:`freeze_heap` keeps pynetdicom's periodic ``gc.collect()`` from
scanning the hundreds of thousands of objects torch and MONAI leave at start (each
full pass held the GIL for tens of milliseconds).

**Responses.** C-STORE Success responses are encoded by hand
(:mod:`dicom_node.store_response`).

**Reads.** ``AssociationSocket.recv`` reads a PDU 4096 bytes per ``recv()`` call
(about 130 calls, each with a ``bytes`` object and a ``bytearray`` extend, for one
0.5 MB CT slice). :func:`install` replaces it with the same loop reading up to
1 MiB per call: as many calls as the kernel has data ready, no more. The chunk is
bounded, so a peer announcing a huge PDU length still makes the node allocate only
what it actually sends.
"""

from __future__ import annotations

import copy
import gc
import importlib
import logging
import os
import queue
import select
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, cast

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom import transport as _transport
from pynetdicom import utils as _utils
from pynetdicom.presentation import PresentationContext

from dicom_node.wire.fast_receive import store_response

LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The acceptor reactor's tick in pynetdicom 3.0 (``Association._run_reactor``).
_ASSOC_TICK_S = 0.001
#: The longest idle wait of either loop during data transfer (see :func:`_tick`).
_IDLE_TICK_S = 0.02

_install_lock = threading.Lock()
_installed = False


class _Clock:
    """Stands in for the ``time`` module inside one pynetdicom module."""

    def __init__(self, sleep: Callable[[float], None]) -> None:
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _Wake:
    """An eventfd that a put on a DUL's outbound queue writes to; closed exactly once.

    The lock keeps a write from reaching a closed (and possibly reused) descriptor.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False
        self._lock = threading.Lock()

    def notify(self) -> None:
        with self._lock:
            if not self.closed:
                os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self.fd)


class _ThreadEnd:
    """Lives in a DUL thread's local storage; collected when that thread ends."""


_thread_state = threading.local()


def _wake_of(dul: Any) -> _Wake | None:
    """The DUL's wake-up, created on first use (None once closed or when unavailable)."""
    wake = dul.__dict__.get("_dicom_node_wake")
    if wake is not None:
        return None if wake.closed else wake
    try:
        wake = _Wake(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    except (AttributeError, OSError):
        return None
    dul._dicom_node_wake = wake
    # Given back when the DUL thread ends: its thread-local storage, and the sentinel
    # in it, is released then (CPython frees it at once); the DUL object itself may
    # live on in a reference cycle until the garbage collector runs.
    sentinel = _ThreadEnd()
    _thread_state.sentinel = sentinel
    weakref.finalize(sentinel, wake.close)
    weakref.finalize(dul, wake.close)
    q: queue.Queue[Any] = dul.to_provider_queue
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake.notify()

    q.put = put_and_wake  # type: ignore[method-assign]
    _wake_reactor_on_indications(dul)
    return wake


def _wake_reactor_on_indications(dul: Any) -> None:
    """Wake the association thread when the DUL hands it a release or abort indication.

    Those go on ``to_user_queue``, which the association thread looks at each tick;
    with this it need not tick fast to see them (see :func:`_assoc_sleep`).
    """
    q: queue.Queue[Any] = dul.to_user_queue
    put = q.put
    msg_queue = dul.assoc.dimse.msg_queue

    def put_and_notify(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        with msg_queue.not_empty:
            msg_queue.not_empty.notify_all()

    q.put = put_and_notify  # type: ignore[method-assign]
    dul._dicom_node_reactor_wake = True


def _tick(dul: Any, seconds: float) -> float:
    """How long an idle wait may last: longer while the association transfers data.

    In Sta6 (data transfer) nothing that pynetdicom's loops poll for needs a 1 ms
    tick: the ARTIM timer does not run, what the peer sends wakes the DUL's
    ``select()``, what the node queues wakes it through the eventfd, and release and
    abort indications wake the association thread (:func:`_wake_reactor_on_indications`).
    What is left is the network idle timeout, checked to within :data:`_IDLE_TICK_S`.
    Each thread then wakes 50 times a second instead of 1,000 while it waits.
    """
    if dul.state_machine.current_state == "Sta6" and "_dicom_node_reactor_wake" in dul.__dict__:
        return max(seconds, _IDLE_TICK_S)
    return seconds


def _dul_sleep(seconds: float) -> None:
    dul = threading.current_thread()
    if not isinstance(dul, _dul.DULServiceProvider) or not dul.assoc.is_acceptor:
        time.sleep(seconds)  # requestors (the node's sender, test clients): as shipped
        return
    sock = getattr(dul.socket, "socket", None)
    if sock is None or dul._kill_thread:
        wake = dul.__dict__.get("_dicom_node_wake")
        if wake is not None:
            wake.close()  # the loop is ending: give the descriptor back now
        time.sleep(seconds)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes already buffered: select() cannot see them
    wake = _wake_of(dul)
    if wake is None:
        time.sleep(seconds)
        return
    try:
        ready, _, _ = select.select([sock, wake.fd], [], [], _tick(dul, seconds))
    except (OSError, ValueError):  # socket closed under us: the DUL notices next
        time.sleep(seconds)
        return
    if wake.fd in ready:
        wake.drain()


def _assoc_sleep(seconds: float) -> None:
    assoc = threading.current_thread()
    if (seconds != _ASSOC_TICK_S or not isinstance(assoc, _association.Association)
            or not assoc.is_acceptor):
        time.sleep(seconds)
        return
    msg_queue = assoc.dimse.msg_queue
    with msg_queue.not_empty:
        if not msg_queue._qsize() and not assoc._kill:  # noqa: SLF001 - the condition's own predicate
            msg_queue.not_empty.wait(_tick(assoc.dul, seconds))
        if msg_queue._qsize():  # noqa: SLF001
            # Queue.put wakes one waiter: if that was us, pass it on, in case a
            # get(block=True) waits too (a send_c_* on this association).
            msg_queue.not_empty.notify()


#: Largest single ``recv()`` of :func:`_recv`.
_RECV_CHUNK = 1 << 20


def _recv(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with up to 1 MiB per ``recv()`` instead of 4096 bytes.

    Same contract: blocks until ``nr_bytes`` are read, returns fewer only when the
    peer closed the connection; socket errors propagate as before.
    """
    sock = self.socket
    bytestream = bytearray()
    nr_read = 0
    while nr_read < nr_bytes:
        bytes_read = sock.recv(min(nr_bytes - nr_read, _RECV_CHUNK))
        if not bytes_read:
            return bytestream
        bytestream += bytes_read
        nr_read += len(bytes_read)
    return bytestream


def copy_contexts(x: _T, memo: dict[int, Any] | None = None, _nil: Any = None) -> _T:
    """``copy.deepcopy`` for a list of presentation contexts, without re-validating UIDs.

    Anything else is handed to :func:`copy.deepcopy` unchanged. It takes ``deepcopy``'s
    arguments (``_nil``, its private sentinel, unused) as it stands in for it.
    """
    if not isinstance(x, list) or not all(type(c) is PresentationContext for c in x):
        return copy.deepcopy(x, memo)
    out = []
    for context in x:
        clone = object.__new__(PresentationContext)
        clone.__dict__.update(context.__dict__)
        clone._transfer_syntax = list(context._transfer_syntax)  # noqa: SLF001
        out.append(clone)
    return cast(_T, out)  # a list of contexts, as x


def quiet_standard_handlers() -> bool:
    """Stop pynetdicom binding its DIMSE/PDU logging handlers when nobody reads them.

    pynetdicom binds ``standard_dimse_recv_handler`` and its three siblings to every
    server and to every association it creates; per C-STORE they format the
    request's and the PDUs' details into log lines for ``pynetdicom``'s INFO/DEBUG
    level, whether or not that level is enabled. The node keeps the ``pynetdicom``
    logger at WARNING, so this is work for nothing: unless INFO is enabled, this sets
    pynetdicom's documented switch ``_config.LOG_HANDLER_LEVEL`` to ``"none"`` (call
    it before the server starts). It also lets :mod:`dicom_node.store_response` take
    its fast path, which needs no ``EVT_DIMSE_SENT`` handler to be bound.

    Returns
    -------
    bool
        True when the handlers are off.
    """
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return False
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"
    return True


#: The modules that imported ``pynetdicom.utils.set_uid`` by name (each is patched).
_SET_UID_USERS = ("ae", "dimse_primitives", "pdu_items", "pdu_primitives", "presentation")
_UID_CACHE_SIZE = 4096
_uid_cache: dict[tuple[str | bytes, bool, bool], Any] = {}
_shipped_set_uid: Any = None


def cached_set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                   validate: bool = True) -> Any:
    """``pynetdicom.utils.set_uid`` that remembers the UIDs it found valid and conformant.

    pynetdicom checks each UID of an association request three times with regular
    expressions (pydicom's ``UID``, its own validator, ``is_valid``) while it decodes
    the request, negotiates and encodes the answer: the same hundred or so SOP Class
    and Transfer Syntax UIDs for every association, about a tenth of the CPU an
    association's set-up cost (``benchmarks/README.md``). Here a string seen before, valid and conformant, is
    answered from a dictionary (cleared when it holds :data:`_UID_CACHE_SIZE`); anything
    else, and every invalid or non-conformant value (which pynetdicom logs), takes
    pynetdicom's path each time.
    """
    if not isinstance(value, (str, bytes)) or not value:
        return _shipped_set_uid(value, name, allow_empty, allow_none, validate)
    key = (value, allow_empty, validate)
    hit = _uid_cache.get(key)
    if hit is not None:
        return hit
    result = _shipped_set_uid(value, name, allow_empty, allow_none, validate)
    if result is not None and (not validate or result.is_valid):
        if len(_uid_cache) >= _UID_CACHE_SIZE:
            _uid_cache.clear()
        _uid_cache[key] = result
    return result


def freeze_heap() -> int:
    """Exempt everything allocated so far from the garbage collector's full passes.

    For a process about to serve: call it once, after imports and set-up. The node
    imports torch and MONAI (hundreds of thousands of objects), and pynetdicom's server
    calls ``gc.collect()`` every 60 iterations of its accept loop; each full pass held
    the GIL for tens of milliseconds (figures: ``benchmarks/README.md``), so every
    association of the process stopped for it.
    :func:`gc.freeze` moves the objects that exist now to a generation the collector
    never scans (they live as long as the process anyway); a full pass then takes
    microseconds. Garbage made later is collected as before.

    Returns
    -------
    int
        How many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _compatible() -> str | None:
    """Why :func:`install` cannot apply to this pynetdicom, or None when it can."""
    if not pynetdicom.__version__.startswith("3."):
        return f"pynetdicom {pynetdicom.__version__} (written for 3.x)"
    if getattr(_dul, "time", None) is not time or getattr(_association, "time", None) is not time:
        return "pynetdicom.dul/association no longer use the time module as expected"
    if not hasattr(os, "eventfd"):
        return "no os.eventfd on this platform"
    probe = _dul.DULServiceProvider.__init__
    if "_run_loop_delay" not in probe.__code__.co_names:
        return "DULServiceProvider has no _run_loop_delay"
    recv = getattr(_transport.AssociationSocket, "recv", None)
    if recv is None or "bufsize" not in recv.__code__.co_varnames:
        return "AssociationSocket.recv has changed"
    if getattr(_transport, "deepcopy", None) is not copy.deepcopy:
        return "pynetdicom.transport no longer deep-copies the contexts with copy.deepcopy"
    if set(vars(PresentationContext())) != _CONTEXT_ATTRIBUTES:
        return "PresentationContext has other attributes than expected"
    for name in _SET_UID_USERS:
        if getattr(importlib.import_module(f"pynetdicom.{name}"), "set_uid", None) is not _utils.set_uid:
            return f"pynetdicom.{name} no longer uses pynetdicom.utils.set_uid"
    return None


#: What :func:`copy_contexts` expects in a context (checked before installing).
_CONTEXT_ATTRIBUTES = {"_context_id", "_abstract_syntax", "_transfer_syntax", "result",
                       "_scu_role", "_scp_role", "_as_scp", "_as_scu"}


def install() -> bool:
    """Make pynetdicom's loops wake on work and read in large chunks (idempotent).

    Returns
    -------
    bool
        True when installed (now or before), False when this pynetdicom does not fit
        (logged once at WARNING; the node then runs with pynetdicom's polling as is).
    """
    global _installed
    with _install_lock:
        if _installed:
            return True
        problem = _compatible()
        if problem is not None:
            LOG.warning("pynetdicom speed-ups not installed (%s): polling and reads as shipped", problem)
            return False
        _dul.time = _Clock(_dul_sleep)  # type: ignore[assignment]
        _association.time = _Clock(_assoc_sleep)  # type: ignore[assignment]
        _transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
        _transport.deepcopy = copy_contexts
        global _shipped_set_uid
        _shipped_set_uid = _utils.set_uid
        for name in _SET_UID_USERS:
            setattr(importlib.import_module(f"pynetdicom.{name}"), "set_uid", cached_set_uid)
        store_response.install()
        _installed = True
        LOG.debug("pynetdicom speed-ups installed: loops wake on work, reads up to 1 MiB")
        return True
