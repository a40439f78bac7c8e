"""A small STOW-RS server for the tests: it reads each multipart request's instances and
answers what the test tells it (an HTTP status and a DICOM JSON body), or stalls."""

from __future__ import annotations

import email.parser
import email.policy
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom

from orthanc.server import free_ports

#: answer(uids) -> (HTTP status, DICOM JSON body or None)
Answer = Callable[[list[str]], tuple[int, dict[str, Any] | None]]


def stored_response(uids: list[str], failed: dict[str, int] | None = None,
                    warnings: dict[str, int] | None = None) -> dict[str, Any]:
    """A Store Instances Response (PS3.18 10.5.3) in DICOM JSON."""
    failed = failed or {}
    warnings = warnings or {}
    ok = []
    for u in uids:
        if u in failed:
            continue
        item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [u]}}
        if u in warnings:
            item["00081196"] = {"vr": "US", "Value": [warnings[u]]}
        ok.append(item)
    body: dict[str, Any] = {}
    if ok:
        body["00081199"] = {"vr": "SQ", "Value": ok}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [code]}}
            for u, code in failed.items()]}
    return body


class StowServer:
    """``answer`` decides each response; ``stall_s`` > 0 sleeps before answering;
    ``tls`` (certificate, key) serves HTTPS."""

    def __init__(self, answer: Answer, tls: tuple[Path, Path] | None = None) -> None:
        self.answer = answer
        self.stall_s = 0.0
        self.requests: list[list[str]] = []  # the SOP Instance UIDs of each request
        self.authorization: list[str] = []  # the Authorization header of each request
        self.raw_body: bytes | None = None  # sent instead of the answer's body when set
        #: QIDO-RS: query parameters -> DICOM JSON array (None: GET is not answered)
        self.qido: Callable[[dict[str, str]], list[dict[str, Any]]] | None = None
        self.gets = 0
        self.port = free_ports(1)[0]
        self.url = f"{'https' if tls else 'http'}://localhost:{self.port}/dicom-web"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                uids = _uids(self.headers["Content-Type"], body)
                server.requests.append(uids)
                server.authorization.append(self.headers.get("Authorization", ""))
                if server.stall_s:
                    time.sleep(server.stall_s)
                status, payload = server.answer(uids)
                data = json.dumps(payload).encode() if payload is not None else b""
                if server.raw_body is not None:
                    data = server.raw_body
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/dicom+json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (the stall)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if server.qido is None:
                    self.send_error(404)
                    return
                server.gets += 1
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                data = json.dumps(server.qido(query)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)

    def __enter__(self) -> StowServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _uids(content_type: str, body: bytes) -> list[str]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return [str(pydicom.dcmread(BytesIO(part.get_payload(decode=True))).SOPInstanceUID)
            for part in msg.iter_parts()]
