"""The systemd notify protocol (``sd_notify(3)``), written out by hand.

With ``Type=notify`` systemd passes the path of an ``AF_UNIX`` datagram socket in
``NOTIFY_SOCKET``; the service sends newline-separated ``KEY=value`` assignments to it:
``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1``
while healthy (at least every ``WATCHDOG_USEC`` microseconds, we ping at half of it),
``STOPPING=1`` when it begins to shut down. A path starting with ``@`` is an abstract
socket (leading NUL byte).

Why no library: the ``systemd`` Python bindings (``python3-systemd``) link against
libsystemd and are not published on PyPI as wheels, so they would have to be built in
the virtual environment on every hospital server; ``sdnotify`` on PyPI is unmaintained
and ignores ``WATCHDOG_USEC``. The protocol is one ``sendto`` per message, which is
less code than either dependency.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

LOG = logging.getLogger(__name__)


#: The longest a notification may wait for room in the manager's socket queue, seconds.
SEND_TIMEOUT_S = 1.0

class Notifier:
    """Sends notifications to systemd; does nothing when not started by systemd.

    Parameters
    ----------
    env : mapping, optional
        Where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read
        (default ``os.environ``).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        #: Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None.
        self.watchdog_interval_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 2e6
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """True when systemd (or a test) gave a notify socket."""
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="serving")``.

        Returns False (and logs at DEBUG) when there is no socket or the send fails;
        a notification never stops the node.
        """
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A receiver that stops reading fills the datagram queue (net.unix.
                # max_dgram_qlen, 10 by default) and sendto would block for ever: the
                # watchdog thread, and the STOPPING=1 of a node shutting down, with it.
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto(message, self.address)
            return True
        except OSError as exc:
            LOG.debug("sd_notify %s failed: %s", list(fields), exc)
            return False

    def start_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while ``healthy()`` is true.

        When ``healthy()`` is false (or raises) the ping is skipped, so systemd
        restarts a node that is stuck rather than one that merely runs.
        """
        interval = self.watchdog_interval_s
        if interval is None or self.address is None:
            return

        def _run() -> None:
            while not self._stop.wait(interval):
                try:
                    ok = healthy()
                except Exception:
                    LOG.exception("health check failed")
                    ok = False
                if ok:
                    self.notify(WATCHDOG=1)
                else:
                    LOG.error("unhealthy: watchdog ping withheld (systemd restarts the node "
                              "if this lasts WATCHDOG_USEC)")

        self._thread = threading.Thread(target=_run, name="sd-watchdog", daemon=True)
        self._thread.start()
        LOG.info("systemd watchdog: pinging every %.1f s while healthy", interval)

    def close(self) -> None:
        """Stop the watchdog thread and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
