"""TLS for DICOM: the listener's context (client certificates required) and the sender's.

Separate from :mod:`dicom_node.wire.server` so that the processes that only send (the
inference workers, the sender) do not import the listener.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from dicom_node.foundation.errors import DicomNodeError
from dicom_node.settings import Settings
from dicom_node.wire import bounded_wire


class TlsSetupError(DicomNodeError, OSError):
    """The TLS certificate, key or CA of the configuration cannot be loaded."""

    def __init__(self, what: str, path: object, why: object) -> None:
        super().__init__(f"TLS: cannot load {what} {path}: {why}")


class _RefusingContext(ssl.SSLContext):
    """Server context whose handshakes run in the connection's own thread, bounded, and
    report failures (untrusted or missing client certificate, a silent peer).

    pynetdicom wraps each accepted socket in its accept loop; a handshake there would hold
    every new association behind a peer that connects and says nothing (measured: a TLS
    C-ECHO 0.07 s normally, 19.9 s behind two silent connections). So the socket is
    wrapped without the handshake, and :func:`finish_handshake` does it later, in the
    thread that serves the association.
    """

    on_refused: Callable[[str, str], None]
    handshake_timeout_s: float
    sslsocket_class = bounded_wire.GuardedSSLSocket  # reads bounded once accepted

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["do_handshake_on_connect"] = False  # done by finish_handshake()
        return super().wrap_socket(sock, *args, **kwargs)


def finish_handshake(sock: Any) -> bool:
    """The TLS handshake of an accepted connection, within the context's timeout, in the
    calling (the connection's) thread. True when done or when ``sock`` is not a TLS
    socket of ours; False - reported through ``on_refused`` and closed - when it failed."""
    ctx = getattr(sock, "context", None)
    if not isinstance(sock, ssl.SSLSocket) or not isinstance(ctx, _RefusingContext):
        return True
    try:
        peer = "%s:%s" % sock.getpeername()[:2]
    except OSError:
        peer = "?"
    timeout = sock.gettimeout()
    sock.settimeout(ctx.handshake_timeout_s)
    try:
        sock.do_handshake()
    except (ssl.SSLError, OSError) as exc:
        ctx.on_refused(peer, getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
        sock.close()
        return False
    sock.settimeout(timeout)
    return True


def load_chain(ctx: ssl.SSLContext, settings: Settings) -> None:
    try:
        ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError("certificate/key", f"{settings.tls_cert} / {settings.tls_key}",
                            getattr(exc, "strerror", None) or exc) from exc
    try:
        ctx.load_verify_locations(cafile=str(settings.tls_ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError("CA", settings.tls_ca, getattr(exc, "strerror", None) or exc) from exc


def server_tls_context(settings: Settings,
                       on_refused: Callable[[str, str], None] | None = None) -> ssl.SSLContext | None:
    """The listener's TLS context (TLS 1.2+, client certificate required), or None.

    Raises
    ------
    TlsSetupError
        If a file cannot be loaded.
    """
    if settings.tls_cert is None:
        return None
    ctx = _RefusingContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.on_refused = on_refused or (lambda peer, why: None)
    ctx.handshake_timeout_s = min(10.0, settings.network_timeout_s)
    load_chain(ctx, settings)
    return ctx


def client_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The sender's TLS context (verifies the destination against ``tls_ca``; presents
    the node's certificate), or None when TLS is not configured.

    Raises
    ------
    TlsSetupError
        If a file cannot be loaded.
    """
    if settings.tls_cert is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    load_chain(ctx, settings)
    return ctx
