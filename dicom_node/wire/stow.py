"""DICOMweb to a destination: STOW-RS of results, QIDO-RS read-back of what was stored.

Transport: one ``requests`` session per destination (connection reuse, a connect and a
read deadline on every request, ``verify`` with the destination's ``tls_ca``, basic or
bearer authentication whose secret is read from its file at each request, so a rotated
token needs no restart). Every response is read streamed, within the read deadline as
a whole and :data:`MAX_RESPONSE_BYTES`. The read-back is a QIDO-RS search for a series'
instances on that session (:func:`present`; dicomweb-client's ``search_for_instances``
would read every page whole and, with ``get_remaining``, ask again for ever a server that
ignores ``offset``). STOW-RS is posted here rather than with
dicomweb-client's ``store_instances``: the sender needs the per-instance outcome of
every response (PS3.18 10.5.3, the Store Instances Response Module), and that method
raises on a 4xx before its Failed SOP Sequence can be read, retries 429/503 with its
own sleeps inside the sender's thread, and returns an empty data set for a
``application/dicom+json`` response whose media type carries a parameter.

Outcome per instance (:func:`stow`): listed in the Referenced SOP Sequence: stored
(with its Warning Reason, if any); listed in the Failed SOP Sequence: failed with its
Failure Reason, retried later when that reason is A7xx (out of resources, PS3.4 B.2.3)
and held otherwise; an HTTP 408, 429 or 5xx, or no answer (connection refused, reset,
a deadline passed): every instance retried with back-off; any other 4xx: every instance
not listed otherwise held with the status and the response's reason.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import requests.adapters
from pydicom.dataset import Dataset

from dicom_node.settings import Destination

LOG = logging.getLogger(__name__)

#: HTTP statuses after which the same request may succeed later (PS3.18 10.5.3.1).
RETRY_STATUSES = frozenset({408, 429})
#: Instances and bytes in one STOW-RS request at most.
MAX_INSTANCES, MAX_BYTES = 100, 64 << 20
#: Bytes of one response read into memory at most: a Store Instances Response or a
#: QIDO-RS page names each instance in well under a kilobyte.
MAX_RESPONSE_BYTES = 16 << 20
#: QIDO-RS pages asked for one series at most (a server that ignores ``offset`` would
#: otherwise answer the same page for ever).
MAX_PAGES = 50


class ResponseTooLarge(requests.RequestException):
    """A DICOMweb server's response went past :data:`MAX_RESPONSE_BYTES` or its deadline."""


class WebAuthError(OSError):
    """A destination's password or token file cannot be read."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"cannot read {path}: {why}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StowOutcome:
    """What a STOW-RS request did with each instance (SOP Instance UID -> reason)."""

    http_status: int  # 0: no answer
    stored: dict[str, str] = field(default_factory=dict)  # uid -> warning ('' none)
    retry: dict[str, str] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)


def _secret(path: Path | None) -> str:
    if path is None:
        raise WebAuthError(Path("-"), "no file configured")
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise WebAuthError(path, exc.strerror or str(exc)) from None


def session_for(dest: Destination) -> requests.Session:
    """A session that authenticates to ``dest`` and verifies it with its ``tls_ca``.

    Raises
    ------
    WebAuthError
        When the password or token file cannot be read.
    """
    s = requests.Session()
    if dest.auth == "basic":
        s.auth = (dest.username, _secret(dest.password_file))
    elif dest.auth == "bearer":
        s.headers["Authorization"] = f"Bearer {_secret(dest.token_file)}"
    if dest.tls_ca is not None:
        s.mount("https://", _VerifyWith(str(dest.tls_ca)))
    return s


class _VerifyWith(requests.adapters.HTTPAdapter):
    """Verifies every HTTPS request with one CA bundle. ``Session.verify`` is not enough:
    requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` from the environment override
    it for any request made without ``verify=`` (requests issue 3829), as dicomweb-client's
    are; a transport adapter (requests' documented extension point) sees every request."""

    def __init__(self, ca: str) -> None:
        super().__init__()
        self.ca = ca

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: bool | str = True, cert: Any = None,
             proxies: Any = None) -> requests.Response:
        return super().send(request, stream=stream, timeout=timeout, verify=self.ca, cert=cert,
                            proxies=proxies)


def _multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body (PS3.18 8.6.1.2)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for p in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), p, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(session: requests.Session, url: str, batch: Sequence[tuple[str, bytes]], *,
         timeout_s: float) -> StowOutcome:
    """POST ``batch`` ((SOP Instance UID, Part 10 file bytes) pairs) to ``url/studies``
    in one request and read the outcome of each instance."""
    uids = [uid for uid, _ in batch]
    body, content_type = _multipart([blob for _, blob in batch])
    try:
        rsp = session.post(f"{url.rstrip('/')}/studies", data=body,
                           headers={"Content-Type": content_type,
                                    "Accept": "application/dicom+json"},
                           timeout=(min(10.0, timeout_s), timeout_s), allow_redirects=False,
                           stream=True)
        with rsp:
            body = _body(rsp, timeout_s)
    except requests.RequestException as exc:
        why = f"no answer from the DICOMweb server ({type(exc).__name__}: {short(exc)})"
        return StowOutcome(http_status=0, retry={u: why for u in uids})
    return outcome(rsp.status_code, rsp.reason or "", body, uids)


def _body(rsp: requests.Response, timeout_s: float) -> bytes:
    """A streamed response's body, read within ``timeout_s`` (the read deadline bounds
    each wait, not a server that trickles) and :data:`MAX_RESPONSE_BYTES`.

    Raises
    ------
    ResponseTooLarge
        Past either bound.
    """
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    size = 0
    for chunk in rsp.iter_content(64 << 10):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ResponseTooLarge(f"the response is larger than {MAX_RESPONSE_BYTES} bytes")
        if time.monotonic() > deadline:
            raise ResponseTooLarge(f"the response took longer than {timeout_s:.0f} s")
        chunks.append(chunk)
    return b"".join(chunks)


def short(exc: BaseException) -> str:
    """An exception's text, at most 160 characters."""
    text = str(exc)
    return text if len(text) <= 160 else text[:157] + "..."


def outcome(status: int, reason: str, body: bytes, uids: Sequence[str]) -> StowOutcome:
    """The per-instance outcome of a STOW-RS response (see the module's docstring)."""
    parsed = _response_dataset(body)
    info = parsed if parsed is not None else Dataset()
    stored = {str(i.ReferencedSOPInstanceUID): _code(i, "WarningReason")
              for i in info.get("ReferencedSOPSequence", []) or [] if "ReferencedSOPInstanceUID" in i}
    failed = {str(i.ReferencedSOPInstanceUID): i.get("FailureReason")
              for i in info.get("FailedSOPSequence", []) or [] if "ReferencedSOPInstanceUID" in i}
    retry: dict[str, str] = {}
    held: dict[str, str] = {}
    http = f"HTTP {status} {reason}".strip()
    for uid, code in failed.items():
        why = f"STOW-RS {http}: failure reason {_hex(code)}"
        (retry if code is not None and (int(code) & 0xFF00) == 0xA700 else held)[uid] = why
    rest = [u for u in uids if u not in stored and u not in failed]
    if 200 <= status < 300 and parsed is None:  # an HTML page (a proxy's login page) is no answer
        retry.update({u: f"STOW-RS {http}: the response is not a DICOM JSON Store Instances "
                         f"Response{_detail(body)}" for u in rest})
    elif 200 <= status < 300:
        why = f"STOW-RS {http}: the instance is not in the response"
        for u in rest:
            if info or status == 202:
                retry[u] = why
            else:  # no response body: the request as a whole succeeded
                stored[u] = ""
    elif status in RETRY_STATUSES or status >= 500:
        retry.update({u: f"STOW-RS {http}" for u in rest})
    else:
        held.update({u: f"STOW-RS {http}{_detail(body)}" for u in rest})
    return StowOutcome(http_status=status, stored={u: w for u, w in stored.items() if u in uids},
                       retry=retry, held=held)


def _response_dataset(body: bytes) -> Dataset | None:
    """The response's data set (empty for an empty body); None when it is not DICOM JSON
    (an HTML error page: judged by the HTTP status)."""
    try:
        data = json.loads(body) if body.strip() else {}
        if isinstance(data, list):  # some servers wrap the one data set in an array
            data = data[0] if data else {}
        return Dataset.from_json(data) if isinstance(data, dict) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _code(item: Dataset, keyword: str) -> str:
    value = item.get(keyword)
    return "" if value is None else f"{keyword} {_hex(value)}"


def _hex(value: object) -> str:
    try:
        return f"0x{int(value):04X}"  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return "unknown"


def _detail(body: bytes) -> str:
    """A short, printable excerpt of a non-DICOM error body (no PHI is expected there)."""
    text = body[:120].decode("utf-8", "replace").strip()
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return f" ({text})" if text and not text.startswith("{") else ""


def present(session: requests.Session, url: str, study_uid: str, series_uid: str, *,
            timeout_s: float) -> set[str]:
    """SOP Instance UIDs of one series the archive returns to QIDO-RS (the read-back):
    pages (``offset``) until an empty or a repeated one, :data:`MAX_PAGES` at most, each
    bounded like a STOW-RS response.

    Raises
    ------
    requests.RequestException
        When the archive does not answer, answers with an error status, or past a bound.
    ValueError
        When its answer is not a DICOM JSON array.
    """
    found: set[str] = set()
    instances = f"{url.rstrip('/')}/studies/{study_uid}/series/{series_uid}/instances"
    for _ in range(MAX_PAGES):
        with session.get(instances, params={"includefield": "00080018", "offset": str(len(found))},
                         headers={"Accept": "application/dicom+json, application/json"},
                         timeout=(min(10.0, timeout_s), timeout_s), allow_redirects=False,
                         stream=True) as rsp:
            rsp.raise_for_status()
            body = _body(rsp, timeout_s)
        page = json.loads(body) if body.strip() else []
        page = [page] if isinstance(page, dict) else page
        if not isinstance(page, list):
            raise ValueError("the QIDO-RS answer is not a DICOM JSON array")
        uids = {str(v) for item in page if isinstance(item, dict)
                for v in (item.get("00080018") or {}).get("Value", [])}
        if not uids - found:  # empty, or the same page again (offset ignored)
            break
        found |= uids
    return found
