"""OHIF, the web viewer, in front of the demo/test Orthanc: one origin for both.

:class:`ViewerServer` serves OHIF's built single-page app (``package/dist`` of the
npm package ``@ohif/app``, fetched by ``scripts/setup.sh`` into ``viewer-assets/ohif``)
and forwards ``/dicom-web/`` and ``/wado`` to Orthanc's DICOMweb plugin, so the browser
talks to one origin (no CORS, no Orthanc configuration for it). ``/app-config.js`` is
generated: one ``dicomweb`` data source on this origin, images and thumbnails with
WADO-RS. Unknown paths (the app's routes, e.g. ``/viewer``) get ``index.html``.

Written by hand on the standard library's threading HTTP server, on purpose: the job
is ~100 lines (static files plus a pass-through of requests to one upstream), it runs
only in the demo and the browser tests on loopback, and a web server package (nginx
from Debian, or a Python framework) would be one more thing to install and configure
for a process that lives as long as the demo. It is not a production web server:
use the PACS's own viewer set-up for that.
"""

from __future__ import annotations

import http.client
import json
import logging
import mimetypes
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

LOG = logging.getLogger(__name__)

#: Where scripts/setup.sh puts OHIF ($DICOM_NODE_OHIF_DIR overrides).
DEFAULT_OHIF_DIR = Path(__file__).resolve().parent.parent / "viewer-assets" / "ohif"
PROXIED = ("/dicom-web/", "/wado")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
_CHUNK = 1 << 16

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


class ViewerError(RuntimeError):
    """OHIF is not installed or the viewer cannot start."""


def ohif_dir() -> Path:
    """The built OHIF viewer (``index.html`` and its bundles).

    Raises
    ------
    ViewerError
        When it is not there (run ``scripts/setup.sh``).
    """
    path = Path(os.environ.get("DICOM_NODE_OHIF_DIR", DEFAULT_OHIF_DIR))
    if not (path / "index.html").is_file():
        raise ViewerError(f"the OHIF viewer is not installed at {path}: run scripts/setup.sh "
                          "(it fetches @ohif/app from npm), or set DICOM_NODE_OHIF_DIR")
    return path


def app_config(name: str = "dicom-node PACS (Orthanc)") -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source on the viewer's own origin."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": name, "name": "orthanc",
            "wadoUriRoot": "/wado", "qidoRoot": "/dicom-web", "wadoRoot": "/dicom-web",
            "qidoSupportsIncludeField": False, "supportsReject": False,
            "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True, "supportsFuzzyMatching": False,
            "supportsWildcard": True, "staticWado": False, "dicomUploadEnabled": True,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/", "extensions": [], "modes": [], "showStudyList": True,
        "maxNumberOfWebWorkers": 2, "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False, "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True, "defaultDataSourceName": "orthanc",
        "investigationalUseDialog": {"option": "never"},
        "dataSources": [source],
    }
    return "/* written by dicom-node (orthanc/viewer.py) */\nwindow.config = " + \
        json.dumps(config, indent=2) + ";\n"


class ViewerServer:
    """OHIF on ``http://host:port/`` with ``/dicom-web/`` and ``/wado`` sent to Orthanc.

    Parameters
    ----------
    orthanc_url
        Base URL of Orthanc's HTTP server, e.g. ``http://127.0.0.1:8042``.
    host, port
        Where to listen; port 0 picks a free one (see :attr:`port`).
    root
        The built OHIF viewer (default :func:`ohif_dir`).

    Raises
    ------
    ViewerError
        When OHIF is not installed.
    """

    def __init__(self, orthanc_url: str, *, host: str = "127.0.0.1", port: int = 0,
                 root: Path | None = None) -> None:
        self.root = (root or ohif_dir()).resolve()
        upstream = urlsplit(orthanc_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ViewerError(f"orthanc_url must be http://host:port, got {orthanc_url!r}")
        self.upstream = (upstream.hostname, upstream.port or 80)
        self.config_js = app_config().encode()
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]  # typeshed allows bytes; getsockname() gives str
        host = host.decode() if isinstance(host, bytes | bytearray) else host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

    def study_url(self, study_uid: str) -> str:
        """OHIF's basic viewer opened on one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"

    def start(self) -> ViewerServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ohif-viewer",
                                        daemon=True)
        self._thread.start()
        LOG.info("viewer: OHIF at %s, DICOMweb forwarded to Orthanc", self.url)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _ViewerHandler(BaseHTTPRequestHandler):
    """OHIF's files, and ``/dicom-web/`` and ``/wado`` passed through to Orthanc."""

    viewer: ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        LOG.debug("viewer: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib's name
        self._route()

    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def do_POST(self) -> None:  # noqa: N802
        self._route()

    def do_PUT(self) -> None:  # noqa: N802
        self._route()

    def do_DELETE(self) -> None:  # noqa: N802
        self._route()

    def _route(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith(PROXIED):
            self._proxy()
        elif self.command in ("GET", "HEAD"):
            self._static(path)
        else:
            self._send(405, b"method not allowed", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self, path: str) -> None:
        if path == "/app-config.js":
            self._send(200, self.viewer.config_js, "text/javascript", {"Cache-Control": "no-store"})
            return
        target = (self.viewer.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.viewer.root) or not target.is_file():
            target = self.viewer.root / "index.html"  # the single-page app's own routes
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), ctype)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = self.headers.get("Host", "")  # Orthanc builds its URLs from it
        conn = http.client.HTTPConnection(*self.viewer.upstream, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            self._send(502, f"Orthanc did not answer: {exc}".encode(), "text/plain")
            return
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _handler(server: ViewerServer) -> type[BaseHTTPRequestHandler]:
    """The request handler class of one :class:`ViewerServer`."""
    return type("Handler", (_ViewerHandler,), {"viewer": server})
