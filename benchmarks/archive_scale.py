#!/usr/bin/env python3
"""Archive-scale benchmark: the node on an archive of 1,000,000 instances, beside an empty one.

Issue 23 part 7. A data directory of ``--instances`` instances (default 1,000,000) of
``--patients`` patients (20,000) in ``--series`` series (50,000; two series to a
study) is built once (:func:`build_data_dir`) and cached under ``--cache``; then each
measurement of :data:`MEASUREMENTS` runs on an empty data directory and on the built
one, in turns, ``--rounds`` times, and the table gives both, their ratio and the goal:

* ``start-up to ready``: ``dicom-node serve`` launched until it logs ``ready:
  listening`` (lock, index open, start-up reconciliation, listener), and the same
  steps in-process without the interpreter's start (``start-up: lock+open+reconcile``);
* ``/metrics``: one scrape of the running node (HTTP GET, whole response);
* ``ingest x1`` / ``ingest x4``: a 512 x 512 CT series of ``--ingest-slices`` slices sent
  with dcmtk ``storescu`` over one association, then another over four, to the running node
  (as ``benchmarks/ingest.py`` does); the series are removed from the built archive
  after each round so that it stays at its size;
* ``twin show``: :meth:`twin_archive.twins.Twins.twin` of a built patient, in-process
  (what ``dicom-node twin show`` asks of the index), and the command's wall time;
* ``status``: what ``dicom-node status`` and ``/metrics`` ask of the stores
  (:func:`dicom_node.runtime.observability.read_state` and :func:`dicom_node.runtime.retention.storage`),
  and the command's wall time;
* ``archive verify``: ``dicom-node archive verify`` (not ``--deep``), wall time; it must
  exit 0 (a fixture that verify finds wrong is a failed run).

The nodes run with ``workers = 0`` (no inference process loading torch beside the
measurements on a small machine), ``listener_processes = 1`` and a retention that
keeps the built archive (:data:`NODE_CONFIG`); ``/metrics`` and ingest are measured
once the start's scheduled prune has planned and ``--settle`` seconds (5) later, when
the stability monitor's first pass over every series of the archive is over.

The builder is a BENCHMARK FIXTURE, not a way to fill an archive: it does not send
anything over the network; it writes the files and the index rows directly, in the
archive's own layout (:func:`twin_archive.layout.instance_relpath`, the index schema
as migrated by :class:`twin_archive.Archive`, the monitor's decisions and done jobs in
``queue.sqlite`` so that a starting node does not read a million headers to decide on
series a real node decided on long ago), in big transactions without fsync
(``synchronous=OFF``, one ``sync`` at the end). Every instance has real DICOM headers
(a pydicom CT data set per series, 8 x 8 pixels); each instance's copy differs in its
SOP Instance UID, Instance Number and position, patched into the bytes pydicom
encoded. The header fields the index keeps are read from each series' first instance
by the archive's own parser (:func:`twin_archive.header.parse`). Arrival times spread
over the year before the build. ``tests/test_archive_scale_fixture.py`` checks that a
small built directory opens cleanly (``archive verify`` clean, ``twin show`` works).

Plugging in another measurement (the retention engineer's prune of 100,000 instances):
decorate a function ``(data_dir, ctx) -> list[float]`` (seconds per sample) with
:func:`register_measurement`; ``mutates=True`` for one that changes the built archive
(it runs after the others, and the cached directory is then discarded so the next
run builds it again). See :data:`MEASUREMENTS`.

Usage::

    .venv/bin/python benchmarks/archive_scale.py                       # 1,000,000 instances
    .venv/bin/python benchmarks/archive_scale.py --instances 50000 --patients 1000 \\
        --series 2500 --cache /tmp/dn-scale --rounds 3 --json /tmp/scale.json
    .venv/bin/python benchmarks/archive_scale.py --build-only --instances 2000 ...
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import sqlite_utils  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage  # noqa: E402

from benchmarks.ingest import (  # noqa: E402
    _kill_children, _on_signal, _spawn, _stop, _wait_port, send, vm_hwm_kib,
)
from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import connect, write  # noqa: E402
from dicom_node.queue.jobs import connect_queue  # noqa: E402
from dicom_node.runtime.retention import OUTLOOK_FILE  # noqa: E402
from orthanc.server import free_ports  # noqa: E402
from pipelines.phantom import Anatomy, SliceGeometry, StudyInfo, ct_series  # noqa: E402
from twin_archive import Archive  # noqa: E402
from twin_archive.header import identify, parse  # noqa: E402
from twin_archive.layout import INDEX_NAME, instance_relpath, load_or_create_key, patient_key  # noqa: E402
from twin_archive.records import IncomingInstance  # noqa: E402
from twin_archive.reconcile import read_part10_meta  # noqa: E402

NODE_AET = "DICOM_NODE"
CALLING_AET = "SCALEBUILD"
#: The fixture's UID root (2.25: a UUID-derived root, fixed so runs are comparable).
UID_ROOT = "2.25.271828182845904523536"
#: Patient IDs of the fixture: ``SCALE000001``...
PATIENT_ID = "SCALE{:06d}"
#: Sentinels in each series' template, replaced in its bytes per instance (same length).
_SOP_SENTINEL = "99999999"
_NUMBER_SENTINEL = "777777"
_Z_SENTINEL = "-7777.50"
#: Rows per index transaction while building.
_BATCH = 100_000
BUILT_MARKER = "scale-build.json"
TASK = "spleen-ct"


# ===================================================================== the fixture
@dataclass(frozen=True, kw_only=True, slots=True)
class Scale:
    """How big the built archive is."""

    instances: int
    patients: int
    series: int

    def __post_init__(self) -> None:
        if not 1 <= self.patients <= self.series <= self.instances:
            raise ValueError("need 1 <= patients <= series <= instances, got "
                             f"{self.patients}, {self.series}, {self.instances}")

    @property
    def name(self) -> str:
        return f"i{self.instances}-p{self.patients}-s{self.series}"

    def series_of_patient(self, p: int) -> range:
        """Series numbers (0-based) of patient ``p``: contiguous, as even as can be."""
        return range(p * self.series // self.patients, (p + 1) * self.series // self.patients)

    def instances_of_series(self, s: int) -> int:
        return (s + 1) * self.instances // self.series - s * self.instances // self.series


def study_uid(p: int, n: int) -> str:
    return f"{UID_ROOT}.1.{p}.{n}"


def series_uid(s: int) -> str:
    return f"{UID_ROOT}.2.{s}"


def sop_uid(s: int, k: int) -> str:
    return f"{UID_ROOT}.3.{s}.{10_000_000 + k}"


def patient_id(p: int) -> str:
    return PATIENT_ID.format(p + 1)


def _template(p: int, s: int, n_study: int, ct: bool) -> Dataset:
    """The series' data set with sentinels where its instances differ."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage if ct else MRImageStorage
    ds.SOPInstanceUID = f"{UID_ROOT}.3.{s}.{_SOP_SENTINEL}"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    st = p * 3 + n_study  # study-level attributes are the same in each series of a study
    ds.StudyDate = f"2026{1 + st % 12:02d}{1 + (st * 7) % 28:02d}"
    ds.StudyTime = f"{8 + st % 10:02d}{st % 60:02d}00"
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = f"{8 + st % 10:02d}{st % 60:02d}{s % 60:02d}"
    ds.AccessionNumber = f"ACC{p:07d}{n_study}"
    ds.Modality = "CT" if ct else "MR"
    ds.Manufacturer = "SCALE FIXTURE"
    ds.ManufacturerModelName = "Benchmark 1"
    ds.StationName = "SCALE01"
    ds.StudyDescription = "CT ABDOMEN" if ct else "MR HEAD"
    ds.SeriesDescription = "Abdomen 2.5mm" if ct else "T1 axial"
    ds.ReferringPhysicianName = ""
    ds.PatientName = f"Scale^Patient{p + 1:06d}"
    ds.PatientID = patient_id(p)
    ds.PatientBirthDate = f"19{40 + p % 60:02d}0{1 + p % 9}15"
    ds.PatientSex = "FM"[p % 2]
    ds.BodyPartExamined = "ABDOMEN" if ct else "HEAD"
    ds.SliceThickness = "2.5"
    ds.StudyInstanceUID = study_uid(p, n_study)
    ds.SeriesInstanceUID = series_uid(s)
    ds.StudyID = str(n_study + 1)
    ds.SeriesNumber = str(s % 1000 + 1)
    ds.InstanceNumber = _NUMBER_SENTINEL
    ds.ImagePositionPatient = ["-100", "-100", _Z_SENTINEL]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = f"{UID_ROOT}.4.{s}"
    ds.SliceLocation = _Z_SENTINEL
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 8, 8
    ds.PixelSpacing = ["0.8", "0.8"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.PixelData = (np.arange(64, dtype=np.uint16) * 16 + s % 7).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = CALLING_AET
    return ds


@dataclass(slots=True)
class _SeriesBytes:
    meta: bytes
    data: bytes
    fields: dict[str, str]
    ident: dict[str, str]


def _encode(ds: Dataset) -> _SeriesBytes:
    """The template's File Meta Information and data set bytes, and what the archive's
    parser reads from them."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    fh = BytesIO(raw)
    read_part10_meta(fh)
    meta, data = raw[:fh.tell()], raw[fh.tell():]
    for sentinel, n in ((_SOP_SENTINEL, 1), (_NUMBER_SENTINEL, 1), (_Z_SENTINEL, 2)):
        if data.count(sentinel.encode()) != n:
            raise RuntimeError(f"sentinel {sentinel} found {data.count(sentinel.encode())} times")
    incoming = IncomingInstance(file_meta=meta, dataset=data,
                                transfer_syntax_uid=ExplicitVRLittleEndian,
                                sop_class_uid=str(ds.SOPClassUID),
                                sop_instance_uid=str(ds.SOPInstanceUID), calling_ae=CALLING_AET)
    parsed = parse(incoming)
    return _SeriesBytes(meta=meta, data=data, fields=parsed.fields,
                        ident=identify(parsed, incoming))


class _Rows:
    """Index and queue rows waiting for their transaction."""

    def __init__(self) -> None:
        self.twins: list[tuple[object, ...]] = []
        self.studies: dict[str, tuple[object, ...]] = {}
        self.series: list[tuple[object, ...]] = []
        self.instances: list[tuple[object, ...]] = []
        self.decisions: list[tuple[object, ...]] = []
        self.jobs: list[tuple[object, ...]] = []


def _write_series(data_dir: Path, secret: bytes, scale: Scale, p: int, s: int, n_study: int,
                  t_series: float, rows: _Rows) -> None:
    """Write one series' files; add its rows (and its patient's, its study's) to ``rows``."""
    ct = s % 5 != 4  # four in five series CT (a job each), the rest MR (no task)
    tpl = _encode(_template(p, s, n_study, ct))
    f, ident = tpl.fields, tpl.ident
    key = patient_key(secret, ident["patient_id"], ident["issuer"])
    first_rel = instance_relpath(key, ident["study_uid"], ident["series_uid"], sop_uid(s, 0),
                                 hashlib.sha256(b"").hexdigest())
    folder = first_rel.parent
    (data_dir / folder).mkdir(parents=True, exist_ok=True)
    n = scale.instances_of_series(s)
    sop_s, num_s, z_s = (x.encode() for x in (_SOP_SENTINEL, _NUMBER_SENTINEL, _Z_SENTINEL))
    first = last = ""
    for k in range(n):
        sop_k = f"{10_000_000 + k}".encode()
        data = (tpl.data.replace(sop_s, sop_k).replace(num_s, f"{k + 1:>6d}".encode())
                .replace(z_s, f"{-1.25 * (k % 7000):08.2f}".encode()))
        meta = tpl.meta.replace(sop_s, sop_k)
        sha = hashlib.sha256(data).hexdigest()
        uid = sop_uid(s, k)
        rel = f"{folder}/{uid}.{sha[:12]}.dcm"
        fd = os.open(data_dir / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, meta + data)
        finally:
            os.close(fd)
        at = iso(_utc(t_series + k * 0.2))
        first = first or at
        last = at
        rows.instances.append((uid, ident["sop_class"], ident["series_uid"], ident["study_uid"],
                               key, str(k + 1), ExplicitVRLittleEndian, len(meta) + len(data),
                               sha, rel, CALLING_AET, at, 1, 1, ""))
    if s == scale.series_of_patient(p)[0]:
        rows.twins.append((key, ident["patient_id"], ident["issuer"], f["PatientName"],
                           f["PatientBirthDate"], f["PatientSex"], first, last))
    study = rows.studies.get(ident["study_uid"])
    rows.studies[ident["study_uid"]] = (
        ident["study_uid"], key, f["StudyDate"], f["StudyTime"], f["StudyDescription"],
        f["AccessionNumber"], study[6] if study else first, last)
    rows.series.append((ident["series_uid"], ident["study_uid"], f["Modality"],
                        f["BodyPartExamined"], f["SeriesDescription"], f["SeriesNumber"],
                        f["Manufacturer"], f["ManufacturerModelName"], f["FrameOfReferenceUID"],
                        first, last))
    decided = iso(_utc(t_series + n * 0.2 + 60))
    rows.decisions.append((ident["series_uid"], last, "queued" if ct else "no-pipeline",
                           "benchmark fixture: decided when built" if ct else
                           "benchmark fixture: no task for MR", decided))
    if ct:
        rows.jobs.append((ident["series_uid"], ident["study_uid"], key, TASK, last, n, decided,
                          decided, decided, iso(_utc(t_series + n * 0.2 + 90)),
                          f["Manufacturer"], f["ManufacturerModelName"]))


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


def _flush(index: sqlite_utils.Database, queue: sqlite_utils.Database, rows: _Rows) -> None:
    """One transaction in each database for the rows gathered so far."""
    with write(index) as conn:
        conn.executemany(
            "INSERT INTO twins (patient_key, patient_id, issuer_of_patient_id, patient_name,"
            " birth_date, sex, donate, created_at, updated_at, unidentified)"
            " VALUES (?,?,?,?,?,?,0,?,?,0)", rows.twins)
        conn.executemany(
            "INSERT INTO studies (study_uid, patient_key, study_date, study_time, description,"
            " accession_number, first_received, last_received) VALUES (?,?,?,?,?,?,?,?)"
            " ON CONFLICT(study_uid) DO UPDATE SET last_received=excluded.last_received",
            list(rows.studies.values()))
        conn.executemany(
            "INSERT INTO series (series_uid, study_uid, modality, body_part, description,"
            " series_number, manufacturer, model_name, frame_of_reference_uid,"
            " first_received, last_received) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows.series)
        conn.executemany(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid,"
            " study_uid, patient_key, instance_number, transfer_syntax_uid, size, sha256,"
            " path, calling_ae, received_at, version, current, uid_flags)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows.instances)
    with write(queue) as conn:
        conn.executemany(
            "INSERT INTO monitored_series (series_uid, last_received, decision, reason,"
            " decided_at) VALUES (?,?,?,?,?)", rows.decisions)
        conn.executemany(
            "INSERT INTO jobs (series_uid, study_uid, patient_key, task, series_last_received,"
            " instances, state, attempts, max_attempts, enqueued_at, not_before, started_at,"
            " finished_at, error, result_id, manufacturer, scanner_model, worker)"
            " VALUES (?,?,?,?,?,?,'done',1,3,?,?,?,?,'',NULL,?,?,'benchmark fixture')", rows.jobs)


def build_data_dir(data_dir: Path, scale: Scale, *, progress: bool = True) -> dict[str, object]:
    """Build a data directory of ``scale`` (a BENCHMARK FIXTURE; see the module docstring).

    Writes the instance files and the index and queue rows directly, in the archive's
    layout and schema, in transactions of about 100,000 instances without fsync, then
    syncs once. ``data_dir`` must not exist. Returns what was built and how long it took.

    Raises
    ------
    FileExistsError
        If ``data_dir`` exists.
    """
    if data_dir.exists():
        raise FileExistsError(f"{data_dir} exists; the builder starts from nothing")
    t0 = time.perf_counter()
    Archive(data_dir).close()  # the layout, the secret, the index as migrated today
    connect_queue(data_dir).conn.close()
    secret = load_or_create_key(data_dir)
    index = connect(data_dir / INDEX_NAME, timeout_s=30.0)
    queue = connect_queue(data_dir)
    for db in (index, queue):
        db.conn.execute("PRAGMA synchronous=OFF")  # a fixture: one sync at the end
    year_s = 365 * 86400.0
    start = time.time() - year_s
    rows, done = _Rows(), 0
    try:
        for p in range(scale.patients):
            for i, s in enumerate(scale.series_of_patient(p)):
                _write_series(data_dir, secret, scale, p, s, i // 2,
                              start + s * (year_s - 86400.0) / scale.series, rows)
            if len(rows.instances) >= _BATCH or p == scale.patients - 1:
                _flush(index, queue, rows)
                done += len(rows.instances)
                rows = _Rows()
                if progress:
                    el = time.perf_counter() - t0
                    print(f"  built {done} of {scale.instances} instances in {el:.0f} s "
                          f"({done / el:.0f}/s)", flush=True)
        for db in (index, queue):
            db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        index.conn.close()
        queue.conn.close()
    os.sync()
    info: dict[str, object] = {**asdict(scale), "build_s": round(time.perf_counter() - t0, 1),
                               "built_at": iso(utc_now()),
                               "disk_bytes": _du(data_dir)}
    (data_dir / BUILT_MARKER).write_text(json.dumps(info, indent=2))
    return info


def _du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    try:
        return int(out.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


def cached_data_dir(cache: Path, scale: Scale) -> tuple[Path, dict[str, object]]:
    """The built data directory of ``scale`` under ``cache``, built when not there yet
    (into ``<name>.building``, renamed when whole, so a broken build is never reused)."""
    final = cache / scale.name
    marker = final / BUILT_MARKER
    if marker.exists():
        return final, json.loads(marker.read_text())
    building = cache / f"{scale.name}.building"
    shutil.rmtree(building, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"building {scale.instances} instances, {scale.patients} patients, {scale.series} "
          f"series in {final}", flush=True)
    info = build_data_dir(building, scale)
    building.rename(final)
    return final, info


def discard_cached(data_dir: Path) -> None:
    """Mark a built directory as spent (a measurement changed it): the next run rebuilds."""
    (data_dir / BUILT_MARKER).unlink(missing_ok=True)


# ===================================================================== measurements
@dataclass(kw_only=True, slots=True)
class Context:
    """What the measurements share within one run."""

    scale: Scale
    rounds: int
    workdir: Path
    ingest_files: dict[int, list[Path]] = field(default_factory=dict)  # associations -> files
    round: int = 1
    settle_s: float = 5.0  # after READY=1, before /metrics and ingest are measured
    #: (data directory, round) -> the samples of that round's served session
    node_samples: dict[tuple[str, int], dict[str, list[float]]] = field(default_factory=dict)
    verify_output: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Measurement:
    """One line of the table.

    ``goal`` is a limit in seconds on the built archive (``goal_ratio``: at least this
    share of the empty archive's rate, for the ingest lines).
    """

    name: str
    run: Callable[[Path, Context], list[float]]
    goal_s: float | None = None
    goal_ratio: float | None = None
    rate: int = 0  # instances per sample when the line is a rate (ingest)
    mutates: bool = False


#: Every measurement, in the order run. The retention engineer's prune plugs in here
#: with :func:`register_measurement` (``mutates=True``).
MEASUREMENTS: list[Measurement] = []


def register_measurement(name: str, *, goal_s: float | None = None,
                         goal_ratio: float | None = None, rate: int = 0, mutates: bool = False
                         ) -> Callable[[Callable[[Path, Context], list[float]]],
                                       Callable[[Path, Context], list[float]]]:
    """Add a measurement ``fn(data_dir, ctx) -> seconds per sample`` to :data:`MEASUREMENTS`.

    It is run on an empty data directory and on the built one. ``mutates=True``: it
    changes the built archive (a prune); it runs last and the cache is rebuilt next time.
    """
    def add(fn: Callable[[Path, Context], list[float]]) -> Callable[[Path, Context], list[float]]:
        MEASUREMENTS.append(Measurement(name=name, run=fn, goal_s=goal_s, goal_ratio=goal_ratio,
                                        rate=rate, mutates=mutates))
        return fn
    return add


#: Settings of every node and command of the benchmark: no inference worker; retention
#: that keeps the built archive as it is (its arrivals span a year and its series are
#: settled: the default 30 days would prune nine in ten of them at the first start).
NODE_CONFIG = ("workers = 0\nlistener_processes = 1\nretention_days = 36500\n"
               "disk_high_water_pct = 100\ndisk_low_water_pct = 99\n")


def _node_config(workdir: Path, metrics_port: int) -> Path:
    config = workdir / "node.toml"
    config.write_text(NODE_CONFIG + f"metrics_port = {metrics_port}\n"
                      "metrics_bind = \"127.0.0.1\"\n")
    return config


@contextmanager
def running_node(data_dir: Path, workdir: Path) -> Iterator[tuple[int, int, float, int]]:
    """``dicom-node serve`` on ``data_dir``: (DICOM port, metrics port, seconds to ready, pid).

    Ready is ``READY=1`` on ``NOTIFY_SOCKET``, as systemd sees it: the listener bound, the
    loop and the metrics endpoint started.
    """
    port, mport = free_ports(2)
    log = workdir / f"node-{data_dir.name}.log"
    config = _node_config(workdir, mport)
    sock_path = workdir / "notify.sock"
    sock_path.unlink(missing_ok=True)
    with closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(0.1)
        t0 = time.perf_counter()
        with open(log, "wb") as out:
            proc = _spawn([sys.executable, "-m", "dicom_node", "--config", str(config), "serve",
                           "--data-dir", str(data_dir), "--port", str(port), "--ae-title",
                           NODE_AET, "--bind", "127.0.0.1"], cwd=workdir, stdout=out,
                          stderr=subprocess.STDOUT, start_new_session=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
                                   NOTIFY_SOCKET=str(sock_path)))
        try:
            ready = _wait_ready(sock, proc, log, t0)
            _wait_port(port, proc)
            yield port, mport, ready, proc.pid
        finally:
            _stop(proc, timeout=60)


def _wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], log: Path, t0: float) -> float:
    """Seconds from ``t0`` to the node's ``READY=1``."""
    deadline = time.monotonic() + 600
    while True:
        try:
            if b"READY=1" in sock.recv(65536).split(b"\n"):
                return time.perf_counter() - t0
        except TimeoutError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"node not ready after 600 s:\n{log.read_text()[-2000:]}")


def _wait_first_prune_plan(data_dir: Path, t_spawn: float, timeout_s: float = 300.0) -> float:
    """Seconds from the node's launch (``t_spawn``, Unix time) until the scheduled prune
    of its start wrote what it found prunable (:data:`dicom_node.runtime.retention.OUTLOOK_FILE`)."""
    path = data_dir / OUTLOOK_FILE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if path.stat().st_mtime >= t_spawn:
                return path.stat().st_mtime - t_spawn
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no prune plan {timeout_s:.0f} s after the node's launch")


def _scrape(mport: int) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=60) as rsp:
        body = rsp.read()
    el = time.perf_counter() - t0
    if b"dicom_node_archive_instances" not in body:
        raise RuntimeError("/metrics without dicom_node_archive_instances")
    return el


def _node_session(data_dir: Path, ctx: Context) -> dict[str, list[float]]:
    """The round's served session on ``data_dir``: start-up, /metrics, ingest x1 and x4
    (the series sent are removed after, so the archive keeps its size). Run once per
    round and data directory; the lines that report it read its samples."""
    key = (str(data_dir), ctx.round)
    if key in ctx.node_samples:
        return ctx.node_samples[key]
    samples = ctx.node_samples[key] = {}
    t_spawn = time.time()
    with running_node(data_dir, ctx.workdir) as (port, mport, ready, pid):
        samples["ready"] = [ready]
        samples["peak_rss_mib_at_ready"] = [(vm_hwm_kib(pid) or 0) / 1024]
        # The stability monitor's first pass looks at every series once (about 0.8 s of
        # the node's CPU at 50,000 series) and the scheduled prune plans once at start
        # (about 5 s at 1,000,000 instances); what follows is measured after both.
        samples["first_prune_plan_after_ready"] = [_wait_first_prune_plan(data_dir, t_spawn)
                                                   - ready]
        time.sleep(ctx.settle_s)
        _scrape(mport)  # the first scrape reads every result's timings once
        samples["metrics"] = [_scrape(mport) for _ in range(5)]
        for parallel, files in sorted(ctx.ingest_files.items()):
            wall, codes, err = send(port, NODE_AET, files, parallel, 600)
            if any(codes):
                raise RuntimeError(f"storescu x{parallel} failed: {codes} {err[-500:]}")
            samples[f"ingest{parallel}"] = [wall]
    _check_and_remove_ingested(data_dir, ctx)
    return samples


def _check_and_remove_ingested(data_dir: Path, ctx: Context) -> None:
    """Check the sent series are all in the index; remove them (rows, files, jobs) again."""
    uids = {str(parallel): _series_of(files[0]) for parallel, files in ctx.ingest_files.items()}
    index = connect(data_dir / INDEX_NAME, timeout_s=30.0)
    queue = connect_queue(data_dir)
    try:
        for parallel, uid in uids.items():
            n = index.execute("SELECT COUNT(*) FROM instances WHERE series_uid = ?",
                              (uid,)).fetchone()[0]
            if n != len(ctx.ingest_files[int(parallel)]):
                raise RuntimeError(f"ingest x{parallel}: {n} of "
                                   f"{len(ctx.ingest_files[int(parallel)])} instances indexed")
        paths = [r[0] for uid in uids.values() for r in index.execute(
            "SELECT path FROM instances WHERE series_uid = ?", (uid,))]
        with write(index) as conn:
            for uid in uids.values():
                study, key = conn.execute("SELECT study_uid, patient_key FROM instances WHERE"
                                          " series_uid = ? LIMIT 1", (uid,)).fetchone()
                conn.execute("DELETE FROM instances WHERE series_uid = ?", (uid,))
                conn.execute("DELETE FROM series WHERE series_uid = ?", (uid,))
                conn.execute("DELETE FROM studies WHERE study_uid = ? AND NOT EXISTS (SELECT 1"
                             " FROM series WHERE study_uid = ?)", (study, study))
                conn.execute("DELETE FROM twins WHERE patient_key = ? AND NOT EXISTS (SELECT 1"
                             " FROM studies WHERE patient_key = ?)", (key, key))
        with write(queue) as conn:
            for uid in uids.values():
                conn.execute("DELETE FROM jobs WHERE series_uid = ?", (uid,))
                conn.execute("DELETE FROM monitored_series WHERE series_uid = ?", (uid,))
    finally:
        index.conn.close()
        queue.conn.close()
    for rel in paths:
        (data_dir / rel).unlink(missing_ok=True)


def _series_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


@register_measurement("start-up to ready (serve)", goal_s=10.0)
def measure_startup(data_dir: Path, ctx: Context) -> list[float]:
    return _node_session(data_dir, ctx)["ready"]


@register_measurement("/metrics scrape", goal_s=0.5)
def measure_metrics(data_dir: Path, ctx: Context) -> list[float]:
    return _node_session(data_dir, ctx)["metrics"]


@register_measurement("ingest x1", goal_ratio=0.9, rate=1)
def measure_ingest1(data_dir: Path, ctx: Context) -> list[float]:
    return _node_session(data_dir, ctx)["ingest1"]


@register_measurement("ingest x4", goal_ratio=0.9, rate=4)
def measure_ingest4(data_dir: Path, ctx: Context) -> list[float]:
    return _node_session(data_dir, ctx)["ingest4"]


@register_measurement("start-up: lock+open+reconcile (in-process)")
def measure_startup_inprocess(data_dir: Path, ctx: Context) -> list[float]:
    from dicom_node.runtime.datadir_lock import DataDirLock
    from twin_archive.reconcile import recover

    t0 = time.perf_counter()
    with DataDirLock(data_dir), Archive(data_dir) as archive:
        recover(archive.ingest)
    return [time.perf_counter() - t0]


#: Instances the prune line removes from the built archive (issue 23: >= 1,000 per second).
PRUNE_INSTANCES = 100_000


@register_measurement("prune 100,000 instances (in-process)", goal_s=PRUNE_INSTANCES / 1000,
                      mutates=True)
def measure_prune(data_dir: Path, ctx: Context) -> list[float]:
    """Retention's crash-safe prune (rows moved, files unlinked and their folders
    fsynced, rows marked) of the oldest settled non-donor series, up to
    :data:`PRUNE_INSTANCES` instances; the plan is timed apart (printed)."""
    from dicom_node.queue.jobs import settled_series
    from twin_archive.retention import Retention, RetentionPolicy

    t0 = time.perf_counter()
    settled = settled_series(data_dir)
    with Retention(data_dir) as store:
        chosen, n = [], 0
        for item in store.plan(RetentionPolicy(retention_days=0), settled):
            if item.kind == "source" and n < PRUNE_INSTANCES:
                chosen.append(item)
                n += item.files
        planned = time.perf_counter() - t0
        t1 = time.perf_counter()
        report = store.prune(chosen)
        took = time.perf_counter() - t1
    print(f"  prune of {data_dir.name}: plan {planned:.1f} s ({len(settled)} settled series), "
          f"{report.files} instance(s) of {report.series} series removed in {took:.1f} s "
          f"({report.files / took if took else 0:.0f} instances/s)", flush=True)
    return [took]


def a_patient(data_dir: Path) -> str:
    """The Patient ID of a built patient in the middle of the archive."""
    index = connect(data_dir / INDEX_NAME, timeout_s=30.0, readonly=True)
    with closing(index.conn):
        n = index.execute("SELECT COUNT(*) FROM twins").fetchone()[0]
        row = index.execute("SELECT patient_id FROM twins ORDER BY patient_key LIMIT 1 OFFSET ?",
                            (n // 2,)).fetchone()
    return str(row[0]) if row else ""


@register_measurement("twin show (in-process)", goal_s=0.2)
def measure_twin_show(data_dir: Path, ctx: Context) -> list[float]:
    pid = a_patient(data_dir)
    out = []
    with Archive(data_dir) as archive:
        for _ in range(5):
            t0 = time.perf_counter()
            detail = archive.twins.twin(pid)
            out.append(time.perf_counter() - t0)
            if not detail.studies:
                raise RuntimeError(f"twin {pid}: no studies")
    return out


def _cli(data_dir: Path, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dicom_node", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    el = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dicom-node {' '.join(args)} exited {proc.returncode}:\n"
                           f"{(proc.stdout + proc.stderr)[-2000:]}")
    return el, proc.stdout


@register_measurement("twin show (command)")
def measure_twin_show_cli(data_dir: Path, ctx: Context) -> list[float]:
    return [_cli(data_dir, "twin", "show", a_patient(data_dir))[0]]


@register_measurement("status: the stores' reads (in-process)", goal_s=0.5)
def measure_status(data_dir: Path, ctx: Context) -> list[float]:
    """What ``dicom-node status`` asks of the stores: :func:`read_state` (counts, queue,
    audit) and :func:`dicom_node.runtime.retention.storage` (bytes by kind)."""
    from dicom_node.runtime import retention
    from dicom_node.runtime.observability import read_state
    from dicom_node.settings import Settings

    settings = Settings().replace(data_dir=data_dir, retention_days=36500.0)
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        read_state(data_dir)
        retention.storage(settings)
        out.append(time.perf_counter() - t0)
    return out


@register_measurement("status (command)")
def measure_status_cli(data_dir: Path, ctx: Context) -> list[float]:
    return [_cli(data_dir, "status")[0]]


@register_measurement("archive verify (command)", goal_s=120.0)
def measure_verify(data_dir: Path, ctx: Context) -> list[float]:
    el, out = _cli(data_dir, "archive", "verify")
    ctx.verify_output[str(data_dir)] = out.strip()
    return [el]


# ===================================================================== the run
@dataclass
class Line:
    name: str
    empty_s: float | None
    built_s: float | None
    goal: str
    ok: bool | None
    samples_empty: list[float]
    samples_built: list[float]
    error: str = ""


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _judge(m: Measurement, empty: float | None, built: float | None) -> tuple[str, bool | None]:
    if m.goal_ratio is not None:
        ok = None if empty is None or built is None else empty / built >= m.goal_ratio
        return f"rate >= {m.goal_ratio:.0%} of empty", ok
    if m.goal_s is not None:
        return f"<= {m.goal_s:g} s", None if built is None else built <= m.goal_s
    return "-", None


def write_ingest_series(folder: Path, slices: int) -> dict[int, list[Path]]:
    """Two 512x512 CT series (one per association mode), each its own patient."""
    out = {}
    for parallel in (1, 4):
        sub = folder / f"x{parallel}"
        sub.mkdir(parents=True, exist_ok=True)
        series = ct_series(Anatomy.random(7), SliceGeometry(rows=512, columns=512, slices=slices),
                           StudyInfo(patient_id=f"INGEST-{parallel}",
                                     patient_name=f"Bench^Ingest{parallel}"))
        paths = []
        for k, ds in enumerate(series):
            path = sub / f"ct{k:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        out[parallel] = paths
    return out


def baseline_scale(scale: Scale) -> Scale:
    """The "empty" archive: one patient of the built archive's shape, built the same way
    (so that ``twin show`` has a patient to show and every line compares like with like)."""
    per_patient = max(1, round(scale.series / scale.patients))
    return Scale(instances=max(per_patient, round(scale.instances / scale.patients)),
                 patients=1, series=per_patient)


def run(built: Path, ctx: Context) -> list[Line]:
    """Every measurement on a fresh "empty" data directory (:func:`baseline_scale`) and
    on ``built``, in turns, ``ctx.rounds`` times."""
    samples: dict[str, tuple[list[float], list[float]]] = {m.name: ([], []) for m in MEASUREMENTS}
    errors: dict[str, str] = {}
    ordered = [m for m in MEASUREMENTS if not m.mutates] + [m for m in MEASUREMENTS if m.mutates]
    for rnd in range(1, ctx.rounds + 1):
        ctx.round = rnd
        empty = ctx.workdir / f"empty-{rnd}"
        shutil.rmtree(empty, ignore_errors=True)
        build_data_dir(empty, baseline_scale(ctx.scale), progress=False)
        for m in ordered:
            if m.mutates and rnd < ctx.rounds:
                continue  # once, at the end
            for which, data_dir in ((0, empty), (1, built)):
                try:
                    got = m.run(data_dir, ctx)
                    samples[m.name][which].extend(got)
                    shown = ", ".join(f"{x:.3f}" for x in got)
                except Exception as exc:  # noqa: BLE001 - reported, the rest goes on
                    errors[m.name] = f"{type(exc).__name__}: {exc}"[-1500:]
                    shown = "FAILED: " + errors[m.name]
                print(f"  round {rnd} {m.name:45s} {'empty' if which == 0 else 'built'}: {shown}"
                      f"  (load {os.getloadavg()[0]:.2f})", flush=True)
            if m.mutates:
                discard_cached(built)
        shutil.rmtree(empty, ignore_errors=True)
    lines = []
    for m in MEASUREMENTS:
        e, b = samples[m.name]
        me, mb = _median(e), _median(b)
        goal, ok = _judge(m, me, mb)
        lines.append(Line(name=m.name, empty_s=me, built_s=mb, goal=goal,
                          ok=False if m.name in errors else ok, samples_empty=e, samples_built=b,
                          error=errors.get(m.name, "")))
    return lines


def print_table(lines: list[Line], ctx: Context, cond: dict[str, object]) -> None:
    n = {p: len(f) for p, f in ctx.ingest_files.items()}
    print()
    print(f"built archive: {ctx.scale.instances} instances, {ctx.scale.patients} patients, "
          f"{ctx.scale.series} series; {ctx.rounds} round(s); {cond['cpus']} CPUs; load average "
          f"at start {cond['load_average_at_start']}, at end {cond['load_average_at_end']}")
    print(f"{'measurement':45s} {'empty':>10s} {'built':>10s} {'built/empty':>11s}  "
          f"{'goal':24s} result")
    for ln in lines:
        m = next(x for x in MEASUREMENTS if x.name == ln.name)

        def show(v: float | None) -> str:
            if v is None:
                return "-"
            if m.rate:
                return f"{n[m.rate] / v:.1f}/s"
            return f"{v:.3f} s"
        ratio = "-"
        if ln.built_s and ln.empty_s:  # a rate's ratio is of rates, a time's of times
            ratio = f"{(ln.empty_s / ln.built_s) if m.rate else (ln.built_s / ln.empty_s):.2f}"
        verdict = {True: "pass", False: "FAIL", None: "-"}[ln.ok]
        print(f"{ln.name:45s} {show(ln.empty_s):>10s} {show(ln.built_s):>10s} {ratio:>11s}  "
              f"{ln.goal:24s} {verdict}" + (f"  ({ln.error[:200]})" if ln.error else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--series", type=int, default=50_000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/dn-scale"),
                        help="where built data directories are kept and reused "
                             "(default /tmp/dn-scale)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ingest-slices", type=int, default=200,
                        help="slices (512x512 CT) per ingest series (default 200)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after READY=1 before /metrics and ingest are measured, "
                             "so the monitor's first pass over every series is not in them "
                             "(default 5)")
    parser.add_argument("--only", default="",
                        help="comma-separated measurement names (substrings) to run")
    parser.add_argument("--build-only", action="store_true", help="build (or find) and stop")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    try:
        scale = Scale(instances=args.instances, patients=args.patients, series=args.series)
    except ValueError as exc:
        parser.error(str(exc))
    atexit.register(_kill_children)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    built, info = cached_data_dir(args.cache.resolve(), scale)
    print(f"built data directory {built}: {json.dumps(info)}", flush=True)
    Archive(built).close()  # migrations appended since the build are applied here, untimed
    if args.build_only:
        return 0
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        MEASUREMENTS[:] = [m for m in MEASUREMENTS if any(w in m.name for w in wanted)]
    cond: dict[str, object] = {
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "load_average_at_start": "/".join(f"{x:.2f}" for x in os.getloadavg()),
        "git": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip(),
        "build": info}
    workdir = Path(tempfile.mkdtemp(prefix="scale-run-", dir=args.cache))
    try:
        ctx = Context(scale=scale, rounds=args.rounds, workdir=workdir, settle_s=args.settle)
        if any(m.rate for m in MEASUREMENTS) or any("start-up to" in m.name for m in MEASUREMENTS):
            ctx.ingest_files = write_ingest_series(workdir / "series", args.ingest_slices)
        lines = run(built, ctx)
        cond["load_average_at_end"] = "/".join(f"{x:.2f}" for x in os.getloadavg())
        print_table(lines, ctx, cond)
        for (where, rnd), got in sorted(ctx.node_samples.items()):
            if got.get("peak_rss_mib_at_ready"):
                print(f"node at READY=1, round {rnd}, {where}: peak RSS "
                      f"{got['peak_rss_mib_at_ready'][0]:.0f} MiB; the start's prune plan "
                      f"done {got['first_prune_plan_after_ready'][0]:.1f} s after READY=1")
        for where, out in ctx.verify_output.items():
            print(f"archive verify of {where}: {out.splitlines()[-1] if out else ''}")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"conditions": cond, "scale": asdict(scale),
                 "lines": [asdict(ln) for ln in lines],
                 "node_sessions": [{"data_dir": d, "round": r, **got}
                                   for (d, r), got in ctx.node_samples.items()]}, indent=2))
            print(f"wrote {args.json}")
        return 0 if all(ln.ok is not False for ln in lines) else 1
    finally:
        _kill_children()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
