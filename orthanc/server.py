"""A real Orthanc, started on free loopback ports, as the test and demo PACS.

``OrthancServer`` writes an Orthanc configuration (from ``orthanc.template.json``)
into a working directory, starts ``Orthanc`` with ``TCP_NODELAY=1`` (dcmtk waits on
Nagle's algorithm otherwise), waits until the REST API answers ``/system`` and the
DICOM port accepts connections, and stops it with SIGTERM, then SIGKILL.

Storage, index, log and configuration all live in the working directory; the
HTTP API has no authentication and listens on loopback only.

Refusing SOP classes: Orthanc 1.12.6 added ``AcceptedSopClasses`` /
``RejectedSopClasses`` (refusal at association negotiation); the Debian package
here is older (1.10.x), so ``refuse_sop_classes`` is implemented in Lua: the
association is accepted and each C-STORE of a refused class is answered with a
failure status and not stored: ``refuse_status`` through the callback
``ReceivedCStoreInstanceFilter`` on Orthanc >= 1.11, and always 0xA700 ("Refused:
Out of Resources", PS3.4 Annex B.2.3) on 1.10, where a Lua error raised in
``ReceivedInstanceFilter`` is what makes the Store SCP fail (returning false there
drops the instance silently with status Success, which is not a refusal).

DICOMweb (``dicomweb=True``): the Debian ``orthanc-dicomweb`` plugin
(:data:`DICOMWEB_PLUGIN`) under ``/dicom-web/`` (QIDO-RS, WADO-RS, STOW-RS) and WADO-URI
under ``/wado``: what a web viewer (OHIF) reads and what its segmentation export
writes with.

Corrections back to the node (``forward_corrections_to=NAME``): a Lua
``OnStoredInstance`` (:func:`lua_forward_corrections`) sends every Segmentation
instance stored in Orthanc that the node did not create (Manufacturer, or a
Contributing Equipment item's Manufacturer, is not ``DICOM-NODE AI``) to the
registered modality ``NAME`` with C-STORE, whatever way it arrived (STOW-RS from a
viewer, C-STORE, REST upload). The node then takes it as a label of its source series.
A forward that fails (node down) is logged by Orthanc and not retried: resend it with
``POST /modalities/NAME/store`` with the instance (see the README).

Command line (for the demo)::

    python -m orthanc.server start --workdir D [--dicom-port P] [--http-port P]
                                    [--aet ORTHANC] [--modality NAME=AET@HOST:PORT]
    python -m orthanc.server stop --workdir D
    python -m orthanc.server status --workdir D

``start`` leaves Orthanc running in the background, prints its ports and writes
``D/orthanc.pid`` and ``D/orthanc.json`` (pid, ports, AE title).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

LOG = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("orthanc.template.json")
PID_FILE = "orthanc.pid"
STATE_FILE = "orthanc.json"
CONFIG_FILE = "orthanc-config.json"
LOG_FILE = "orthanc.log"
LUA_FILE = "refuse-sop-classes.lua"
FORWARD_LUA_FILE = "forward-corrections.lua"
#: The Debian orthanc-dicomweb plugin ($ORTHANC_DICOMWEB_PLUGIN overrides).
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: Segmentation Storage; the node's own objects carry this Manufacturer.
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
NODE_MANUFACTURER = "DICOM-NODE AI"  # pipelines.types.NODE_MANUFACTURER (no import: layering)

# PS3.4 Annex B.2.3: Refused: Out of Resources (A7xx).
STATUS_REFUSED_OUT_OF_RESOURCES = 0xA700

_START_ATTEMPTS = 3  # only when the ports were chosen by us (a lost race for a free port)


class OrthancError(RuntimeError):
    """Orthanc could not be started, stopped or queried."""


def find_executable() -> str:
    """Path of the ``Orthanc`` binary ($ORTHANC_BIN, then PATH, then /usr/sbin).

    Raises
    ------
    OrthancError
        When no Orthanc binary is found.
    """
    env = os.environ.get("ORTHANC_BIN")
    if env:
        return env
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise OrthancError("Orthanc binary not found (apt-get install orthanc, or set ORTHANC_BIN)")
    return found


def orthanc_version(binary: str | None = None) -> tuple[int, ...]:
    """Version of the Orthanc binary, e.g. ``(1, 10, 1)``."""
    out = subprocess.run([binary or find_executable(), "--version"], capture_output=True,
                         text=True, timeout=30, check=False).stdout
    first = out.splitlines()[0] if out else ""
    for word in first.split():
        parts = word.split(".")
        if all(p.isdigit() for p in parts) and len(parts) >= 2:
            return tuple(int(p) for p in parts)
    raise OrthancError(f"cannot read the Orthanc version from {first!r}")


#: Listening ports for tests, demos and benchmarks come from here up to the kernel's
#: ephemeral range (which it hands to outgoing connections, so a port picked there can be
#: taken by any client's connect before the server binds it).
PORTS_FROM = 10000
_port_lock = threading.Lock()
_port_cursor: list[int] = []  # this process's next candidate (one item once started)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that are free on ``host`` right now.

    Taken below the kernel's ephemeral range (from :data:`PORTS_FROM`), each process
    walking its own stretch from a start set by its pid, so two test workers picking at
    the same moment do not get the same port and no outgoing connection takes one
    between the pick and the server's bind. Where that range is too small (an unusual
    ``ip_local_port_range``), the kernel picks (bind to port 0).
    """
    top = _ephemeral_low()
    span = top - PORTS_FROM
    socks: list[socket.socket] = []
    try:
        if span < 1000:
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((host, 0))
                socks.append(s)
            return [s.getsockname()[1] for s in socks]
        with _port_lock:
            if not _port_cursor:
                _port_cursor.append((os.getpid() * 7919) % span)
            for _ in range(span):
                port = PORTS_FROM + _port_cursor[0] % span
                _port_cursor[0] += 1
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind((host, port))
                except OSError:
                    s.close()
                    continue
                socks.append(s)
                if len(socks) == n:
                    return [s.getsockname()[1] for s in socks]
        raise OrthancError(f"no {n} free TCP ports on {host} from {PORTS_FROM} to {top}")
    finally:
        for s in socks:
            s.close()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM the child when the parent dies (no orphan Orthancs)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pid_is_orthanc(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and os.path.basename(cmdline[0]).lower() == b"orthanc"


def _pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, only not yet reaped


def terminate_pid(pid: int, timeout: float = 15.0) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout`` s, then SIGKILL. True when it was SIGKILLed."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return False
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _check_uids(sop_classes: Iterable[str]) -> list[str]:
    uids = sorted(set(sop_classes))
    for uid in uids:
        if not uid or len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid):
            raise ValueError(f"refuse_sop_classes: {uid!r} is not a UID")
    return uids


def _lua_refuse(uids: list[str], status: int, version: tuple[int, ...]) -> str:
    """Lua that refuses C-STOREs of ``uids``.

    Orthanc >= 1.11 has ``ReceivedCStoreInstanceFilter``, whose return value is the
    DIMSE status. Older versions only have ``ReceivedInstanceFilter``, which drops
    the instance *silently* (Success) when it returns false; raising a Lua error
    instead makes Orthanc's Store SCP answer 0xA700 (checked on 1.10.1).
    """
    table = ", ".join(f'["{u}"] = true' for u in uids)
    head = ("-- Written by orthanc/server.py: refuse C-STOREs of these SOP classes.\n"
            f"local REFUSED = {{ {table} }}\n")
    if version >= (1, 11):
        return head + (
            "function ReceivedCStoreInstanceFilter(dicom, origin, info)\n"
            f"  if REFUSED[dicom.SOPClassUID] then return {int(status)} end\n"
            "  return 0\n"
            "end\n")
    if status != STATUS_REFUSED_OUT_OF_RESOURCES:
        raise ValueError(f"refuse_status: Orthanc {'.'.join(map(str, version))} can only answer "
                         f"0xA700 to a refused instance (1.11+ can choose), got {status:#06x}")
    return head + (
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        "  if REFUSED[dicom.SOPClassUID] then\n"
        '    error("refused SOP class " .. dicom.SOPClassUID)\n'
        "  end\n"
        "  return true\n"
        "end\n")


def dicomweb_plugin() -> str:
    """Path of the DICOMweb plugin.

    Raises
    ------
    OrthancError
        When it is not installed (``apt-get install orthanc-dicomweb``).
    """
    path = os.environ.get("ORTHANC_DICOMWEB_PLUGIN", DICOMWEB_PLUGIN)
    if not Path(path).is_file():
        raise OrthancError(f"Orthanc DICOMweb plugin not found at {path} "
                           "(apt-get install orthanc-dicomweb, or set ORTHANC_DICOMWEB_PLUGIN)")
    return path


def lua_forward_corrections(modality: str) -> str:
    """Lua that C-STOREs every SEG instance not made by the node to ``modality``.

    ``tags`` of ``OnStoredInstance`` are the instance's simplified tags (sequences as
    lists of tables), so the node's marker is looked for in Manufacturer and in the
    Contributing Equipment Sequence, as :func:`pipelines.selection.is_node_output` does.
    """
    if not modality or not all(c.isalnum() or c in "-_" for c in modality):
        raise ValueError(f"forward_corrections_to must be a modality name, got {modality!r}")
    return f"""-- Written by orthanc/server.py: corrections (SEGs not made by the node) go to the node.
local TARGET = "{modality}"
local SEG = "{SEG_SOP_CLASS}"
local NODE = "{NODE_MANUFACTURER}"

local function trim(s)
  return (tostring(s or ""):gsub("^%s+", ""):gsub("%s+$", ""))
end

local function made_by_node(tags)
  if trim(tags["Manufacturer"]) == NODE then return true end
  local equipment = tags["ContributingEquipmentSequence"]
  if type(equipment) == "table" then
    for _, item in ipairs(equipment) do
      if type(item) == "table" and trim(item["Manufacturer"]) == NODE then return true end
    end
  end
  return false
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags["SOPClassUID"] ~= SEG or made_by_node(tags) then return end
  print("forwarding SEG " .. instanceId .. " (not made by the node) to " .. TARGET)
  SendToModality(instanceId, TARGET)
end
"""


class OrthancServer:
    """A real Orthanc on loopback, configured and run inside ``workdir``.

    Parameters
    ----------
    workdir
        Directory for the configuration, storage, index and log (created).
    dicom_port, http_port
        TCP ports; ``None`` picks free ones (and retries on a lost race).
    aet
        Orthanc's own AE title.
    known_modalities
        ``{name: (aet, host, port)}`` registered as ``DicomModalities`` (all
        services allowed), e.g. the node, for C-STORE / C-MOVE from Orthanc.
    refuse_sop_classes
        SOP Class UIDs whose C-STOREs Orthanc answers with ``refuse_status``
        and does not store.
    refuse_status
        DIMSE status for refused instances (non-zero), default 0xA700.
    accepted_transfer_syntaxes
        Written as ``AcceptedTransferSyntaxes`` (wildcards allowed) when given.
    dicomweb
        Load the DICOMweb plugin (``/dicom-web/``, ``/wado``).
    forward_corrections_to
        Name of a ``known_modalities`` entry (the node) that receives every SEG
        instance stored here that the node did not create (:func:`lua_forward_corrections`).
    http_user
        ``(name, password)``: the HTTP API (REST and DICOMweb) asks for basic
        authentication with it (``AuthenticationEnabled``); this object's own REST calls
        send it.
    extra_config
        Further configuration keys, written last (override everything).
    start_timeout
        Seconds to wait for ``/system`` and the DICOM port.

    Raises
    ------
    ValueError
        On a bad AE title, port, status or UID.
    OrthancError
        When Orthanc does not come up (the log's tail is in the message).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        dicom_port: int | None = None,
        http_port: int | None = None,
        aet: str = "ORTHANC",
        known_modalities: Mapping[str, tuple[str, str, int]] | None = None,
        refuse_sop_classes: Iterable[str] = (),
        refuse_status: int = STATUS_REFUSED_OUT_OF_RESOURCES,
        accepted_transfer_syntaxes: Iterable[str] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        start_timeout: float = 30.0,
        dicomweb: bool = False,
        forward_corrections_to: str | None = None,
        http_user: tuple[str, str] | None = None,
    ) -> None:
        if not aet or len(aet) > 16 or not aet.isascii() or "\\" in aet or aet != aet.strip():
            raise ValueError(f"aet must be 1-16 ASCII characters without backslash, got {aet!r}")
        for name, port in (("dicom_port", dicom_port), ("http_port", http_port)):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {port}")
        if dicom_port is not None and dicom_port == http_port:
            raise ValueError("dicom_port and http_port must differ")
        if not 0 < refuse_status < 0x10000:
            raise ValueError(f"refuse_status must be a non-zero 16-bit status, got {refuse_status}")
        self.workdir = Path(workdir).resolve()
        self.aet = aet
        self.known_modalities = dict(known_modalities or {})
        for name, value in self.known_modalities.items():
            if len(value) != 3 or not isinstance(value[2], int):
                raise ValueError(f"known_modalities[{name!r}] must be (aet, host, port), got {value!r}")
        self.refuse_sop_classes = tuple(_check_uids(refuse_sop_classes))
        self.refuse_status = refuse_status
        self._lua: str | None = None
        if self.refuse_sop_classes:
            self._lua = _lua_refuse(list(self.refuse_sop_classes), refuse_status, orthanc_version())
        self.dicomweb = dicomweb
        self.http_user = http_user
        self._forward_lua: str | None = None
        if forward_corrections_to is not None:
            if forward_corrections_to not in self.known_modalities:
                raise ValueError(f"forward_corrections_to={forward_corrections_to!r} is not one of "
                                 f"known_modalities {sorted(self.known_modalities)}")
            self._forward_lua = lua_forward_corrections(forward_corrections_to)
        self.accepted_transfer_syntaxes = (
            list(accepted_transfer_syntaxes) if accepted_transfer_syntaxes is not None else None)
        self.extra_config = dict(extra_config or {})
        self.start_timeout = start_timeout
        self._fixed_ports = dicom_port is not None or http_port is not None
        self._dicom_port = dicom_port
        self._http_port = http_port
        self.host = "127.0.0.1"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    # ----------------------------------------------------------------- properties
    @property
    def dicom_port(self) -> int:
        """Orthanc's DICOM port."""
        if self._dicom_port is None:
            raise OrthancError("Orthanc has not been started")
        return self._dicom_port

    @property
    def http_port(self) -> int:
        """Orthanc's REST (HTTP) port."""
        if self._http_port is None:
            raise OrthancError("Orthanc has not been started")
        return self._http_port

    @property
    def url(self) -> str:
        """Base URL of the REST API, without a trailing slash."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    # ----------------------------------------------------------------- config
    def build_config(self) -> dict[str, Any]:
        """The configuration that :meth:`start` writes (ports must be known)."""
        text = TEMPLATE.read_text().replace("@WORKDIR@", str(self.workdir))
        config: dict[str, Any] = json.loads(text)
        config["HttpPort"] = self.http_port
        config["DicomPort"] = self.dicom_port
        config["DicomAet"] = self.aet
        config["DicomModalities"] = {
            name: {"AET": aet, "Host": host, "Port": port}
            for name, (aet, host, port) in self.known_modalities.items()
        }
        config["LuaScripts"] = [str(self.workdir / name) for name, text in
                                ((LUA_FILE, self._lua), (FORWARD_LUA_FILE, self._forward_lua)) if text]
        if self.dicomweb:
            config["Plugins"] = [dicomweb_plugin()]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                                  "WadoRoot": "/wado", "Ssl": False, "StudiesMetadata": "Full",
                                  "SeriesMetadata": "Full"}
        if self.http_user is not None:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = {self.http_user[0]: self.http_user[1]}
        if self.accepted_transfer_syntaxes is not None:
            config["AcceptedTransferSyntaxes"] = self.accepted_transfer_syntaxes
        config.update(self.extra_config)
        return config

    def write_config(self) -> Path:
        """Write the configuration (and the Lua filter) into ``workdir``."""
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        if self._lua:
            (self.workdir / LUA_FILE).write_text(self._lua)
        if self._forward_lua:
            (self.workdir / FORWARD_LUA_FILE).write_text(self._forward_lua)
        self.config_path.write_text(json.dumps(self.build_config(), indent=2))
        return self.config_path

    # ----------------------------------------------------------------- lifecycle
    def start(self, detach: bool = False) -> OrthancServer:
        """Start Orthanc and wait until REST and DICOM answer.

        ``detach=True`` (the CLI) leaves it running after this Python process
        exits; otherwise it is SIGTERMed should this process die.
        """
        if self.process is not None and self.process.poll() is None:
            raise OrthancError(f"Orthanc already running (pid {self.process.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_ports else _START_ATTEMPTS
        last: OrthancError | None = None
        for _ in range(attempts):
            if not self._fixed_ports:
                self._dicom_port, self._http_port = free_ports(2)
            try:
                self._start_once(detach)
                return self
            except OrthancError as exc:
                last = exc
                LOG.warning("Orthanc did not start (%s); retrying on other ports", exc)
        assert last is not None
        raise last

    def _start_once(self, detach: bool) -> None:
        self.write_config()
        env = dict(os.environ, TCP_NODELAY="1")
        binary = find_executable()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "--verbose", str(self.config_path)] if os.environ.get("ORTHANC_VERBOSE")
                else [binary, str(self.config_path)],
                cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
                preexec_fn=None if detach else set_pdeathsig,
            )
        self.pid = self.process.pid
        try:
            self._wait_ready()
        except BaseException:
            self._kill_process()
            raise
        LOG.info("Orthanc %s up: pid %d, DICOM %s:%d, HTTP %s", self.aet, self.pid, self.host,
                 self.dicom_port, self.url)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited with code {self.process.returncode} at start;"
                                   f" log tail:\n{self.log_tail()}")
            try:
                self.system()
            except (OSError, OrthancError):
                time.sleep(0.1)
                continue
            if _port_open(self.host, self.dicom_port):
                return
            time.sleep(0.1)
        raise OrthancError(f"Orthanc did not answer within {self.start_timeout} s;"
                           f" log tail:\n{self.log_tail()}")

    def _kill_process(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            terminate_pid(self.process.pid)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
            self.process.kill()
            self.process.wait(timeout=5)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait ``timeout`` s, SIGKILL; returns the exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("Orthanc pid %d ignored SIGTERM for %.0f s; SIGKILL", self.pid, timeout)
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ----------------------------------------------------------------- REST
    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", timeout: float = 30.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.http_user is not None:
            import base64

            token = base64.b64encode(":".join(self.http_user).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:2000].decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {detail}") from exc

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        """GET ``path`` (e.g. ``/studies``) and decode the JSON answer."""
        return json.loads(self._request("GET", path, timeout=timeout))

    def get_bytes(self, path: str, timeout: float = 60.0) -> bytes:
        """GET ``path`` and return the raw body."""
        return self._request("GET", path, timeout=timeout)

    def post_json(self, path: str, payload: Any, timeout: float = 60.0) -> Any:
        """POST a JSON payload and decode the JSON answer (``None`` on an empty body)."""
        data = self._request("POST", path, json.dumps(payload).encode(), timeout=timeout)
        return json.loads(data) if data.strip() else None

    def delete(self, path: str) -> None:
        self._request("DELETE", path)

    def system(self) -> dict[str, Any]:
        """``/system``: name, versions, DICOM AET and port."""
        return dict(self.get_json("/system", timeout=2.0))

    def list_studies(self) -> list[str]:
        """Orthanc identifiers of all studies."""
        return list(self.get_json("/studies"))

    def list_series(self) -> list[str]:
        return list(self.get_json("/series"))

    def list_instances(self) -> list[str]:
        return list(self.get_json("/instances"))

    def count_instances(self) -> int:
        """Number of stored instances (``/statistics``)."""
        return int(self.get_json("/statistics")["CountInstances"])

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Simplified tags of one instance, e.g. ``{"SOPClassUID": ...}``."""
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file (Part 10 bytes) of one instance."""
        return self.get_bytes(f"/instances/{instance_id}/file")

    def study_uids(self) -> list[str]:
        """StudyInstanceUIDs of all studies."""
        return [self.get_json(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]
                for s in self.list_studies()]

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc identifier of the instance with this SOPInstanceUID, or None."""
        hits = self._request("POST", "/tools/lookup", sop_instance_uid.encode(), "text/plain")
        for hit in json.loads(hits):
            if hit.get("Type") == "Instance":
                return str(hit["ID"])
        return None

    def instances_of_sop_class(self, sop_class_uid: str) -> list[str]:
        """Orthanc identifiers of instances whose SOPClassUID is ``sop_class_uid``."""
        return [i for i in self.list_instances()
                if self.instance_tags(i).get("SOPClassUID") == sop_class_uid]

    def wait_for_instances(self, count: int, timeout: float = 30.0) -> int:
        """Poll until at least ``count`` instances are stored; returns the count.

        Raises
        ------
        TimeoutError
            When ``count`` is not reached within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while True:
            n = self.count_instances()
            if n >= count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if n < count:
            raise TimeoutError(f"Orthanc holds {n} instances after {timeout} s, expected {count}")
        return n

    def stow(self, files: Iterable[bytes], timeout: float = 60.0) -> dict[str, Any]:
        """Store Part 10 files with DICOMweb STOW-RS (``POST /dicom-web/studies``, one
        multipart/related request), as a web viewer's export does; the plugin's answer.

        Raises
        ------
        OrthancError
            On an HTTP error, or when an instance is in the answer's Failed SOP Sequence.
        """
        boundary = "dicom-node-" + os.urandom(8).hex()
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                        + data + b"\r\n" for data in files) + b"--" + boundary.encode() + b"--\r\n"
        answer = self._request("POST", "/dicom-web/studies", body,
                               f'multipart/related; type="application/dicom"; boundary={boundary}',
                               timeout=timeout)
        result = dict(json.loads(answer)) if answer.strip() else {}
        if result.get("00081198", {}).get("Value"):  # Failed SOP Sequence
            raise OrthancError(f"STOW-RS: instances failed: {result['00081198']}")
        return result

    def echo_modality(self, name: str) -> bool:
        """C-ECHO from Orthanc to a registered modality."""
        try:
            self._request("POST", f"/modalities/{name}/echo", b"{}")
        except OrthancError:
            return False
        return True

    def store_to_modality(self, name: str, resources: list[str]) -> Any:
        """C-STORE resources (Orthanc ids of patients/studies/series/instances) to a modality."""
        return self.post_json(f"/modalities/{name}/store",
                              {"Resources": resources, "Synchronous": True})

    def state(self) -> dict[str, Any]:
        return {"pid": self.pid, "aet": self.aet, "host": self.host, "dicom_port": self.dicom_port,
                "http_port": self.http_port, "workdir": str(self.workdir),
                "url": self.url}


# --------------------------------------------------------------------- CLI
def _parse_modality(text: str) -> tuple[str, tuple[str, str, int]]:
    try:
        name, rest = text.split("=", 1)
        aet, hostport = rest.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return name, (aet, host, int(port))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected NAME=AET@HOST:PORT, got {text!r}") from exc


def _cmd_start(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    pid_file = workdir / PID_FILE
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        if _pid_alive(pid) and _pid_is_orthanc(pid):
            print(f"Orthanc already running in {workdir} (pid {pid})", file=sys.stderr)
            return 1
    server = OrthancServer(workdir, dicom_port=args.dicom_port, http_port=args.http_port,
                           aet=args.aet, known_modalities=dict(args.modality or []),
                           dicomweb=args.dicomweb, forward_corrections_to=args.forward_corrections)
    server.start(detach=True)
    pid_file.write_text(f"{server.pid}\n")
    (workdir / STATE_FILE).write_text(json.dumps(server.state(), indent=2))
    print(f"Orthanc started: pid {server.pid}, AE {server.aet}, "
          f"DICOM {server.host}:{server.dicom_port}, HTTP {server.url}")
    print(json.dumps(server.state()))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    pid_file = workdir / PID_FILE
    if not pid_file.exists():
        print(f"no {PID_FILE} in {workdir}: nothing to stop", file=sys.stderr)
        return 0
    pid = int(pid_file.read_text().strip() or 0)
    if pid and _pid_alive(pid) and _pid_is_orthanc(pid):
        killed = terminate_pid(pid, timeout=args.timeout)
        print(f"Orthanc pid {pid} stopped" + (" (SIGKILL)" if killed else ""))
    else:
        print(f"Orthanc pid {pid} was not running")
    pid_file.unlink(missing_ok=True)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    pid_file = workdir / PID_FILE
    pid = int(pid_file.read_text().strip() or 0) if pid_file.exists() else 0
    if pid and _pid_alive(pid) and _pid_is_orthanc(pid):
        print((workdir / STATE_FILE).read_text() if (workdir / STATE_FILE).exists() else pid)
        return 0
    print("not running")
    return 3


def main(argv: list[str] | None = None) -> int:
    """``python -m orthanc.server start|stop|status --workdir D``."""
    parser = argparse.ArgumentParser(prog="python -m orthanc.server",
                                     description="Run a real Orthanc as the test/demo PACS.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start Orthanc in the background")
    p.add_argument("--workdir", required=True)
    p.add_argument("--dicom-port", type=int)
    p.add_argument("--http-port", type=int)
    p.add_argument("--aet", default="ORTHANC")
    p.add_argument("--modality", type=_parse_modality, action="append", metavar="NAME=AET@HOST:PORT",
                   help="register a DICOM modality (repeatable), e.g. node=DICOM_NODE@127.0.0.1:11112")
    p.add_argument("--dicomweb", action="store_true",
                   help="load the DICOMweb plugin (/dicom-web/, /wado) for web viewers")
    p.add_argument("--forward-corrections", metavar="NAME",
                   help="send every SEG not made by the node to the registered modality NAME")
    p.set_defaults(func=_cmd_start)
    p = sub.add_parser("stop", help="stop the Orthanc started in --workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds before SIGKILL")
    p.set_defaults(func=_cmd_stop)
    p = sub.add_parser("status", help="print the running Orthanc's ports (exit 3 if not running)")
    p.add_argument("--workdir", required=True)
    p.set_defaults(func=_cmd_status)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (OrthancError, ValueError) as exc:
        print(f"orthanc.server: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
