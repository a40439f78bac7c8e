"""Helpers of the node-loop tests: generated studies, the served model, waiting on Orthanc.

Nothing here is a mock: the node runs as a subprocess, Orthanc is a real Orthanc.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.queue.jobs import Job, JobQueue
from dicom_node.queue.sender import Send, Sender, SendState
from orthanc.server import OrthancServer
from pipelines import phantom as ph
from pipelines.types import ModelInfo
from registry.store import Registry
from twin_archive.labels import Label, LabelStore

SEG_SOP = "1.2.840.10008.5.1.4.1.1.66.4"
SR_SOPS = ("1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
           "1.2.840.10008.5.1.4.1.1.88.34")
SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def install_model(data_dir: Path) -> str:
    """Make the shipped demo model the active ``spleen-ct`` model of ``data_dir``.

    The import (it builds the network and runs it once to count its outputs: about 3 s
    of a core) is done once per test process, into a template data directory; a data
    directory without a registry gets a copy of the template's (its paths are relative
    to the data directory).
    """
    from pipelines.demo_model import ensure_demo_model

    data_dir = Path(data_dir)
    if not (data_dir / "registry.sqlite").exists() and not (data_dir / "models").exists():
        if "data" not in _DEMO_REGISTRY:
            template = Path(tempfile.mkdtemp(prefix="demo-registry-"))
            atexit.register(shutil.rmtree, template, ignore_errors=True)
            with Registry(template / "data") as reg:
                ensure_demo_model(reg)
            _DEMO_REGISTRY["data"] = template / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        for item in _DEMO_REGISTRY["data"].iterdir():
            if item.is_dir():
                shutil.copytree(item, data_dir / item.name)
            else:
                shutil.copy2(item, data_dir / item.name)
    with Registry(data_dir) as reg:
        mv = ensure_demo_model(reg)
        return str(mv.version)


_DEMO_REGISTRY: dict[str, Path] = {}  # the template of install_model, once per process


def small_study(patient_id: str, *, slices: int = 40, size: int = 128, seed: int = 5,
                modality: str = "CT") -> list[Dataset]:
    """A generated abdominal series (``size`` x ``size`` x ``slices``), its own study."""
    spacing = 0.78 * 512 / size
    geometry = ph.SliceGeometry(rows=size, columns=size, slices=slices,
                                pixel_spacing=(spacing, spacing), slice_spacing=5.0)
    info = ph.StudyInfo(patient_id=patient_id, patient_name="Loop^Test", modality=modality)
    datasets = ph.ct_series(ph.Anatomy.random(seed), geometry, info)
    if modality != "CT":
        from pydicom.uid import MRImageStorage

        for ds in datasets:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP"):
                delattr(ds, kw)
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "2D", "10", "500"
    return datasets


#: The model a phantom result names (:func:`phantom_result`).
PHANTOM_MODEL = ModelInfo(name="spleen_ct_segmentation", version="2", task="spleen-ct",
                          device_uid="2.25.99887766554433221100")


def phantom_result(data_dir: Path, job_key: str = "job-1", *, size: int = 32, slices: int = 8,
                   seed: int = 11, kinds: tuple[str, ...] = ("seg", "sr", "overlay"),
                   model: ModelInfo = PHANTOM_MODEL) -> SimpleNamespace:
    """A result of a phantom CT (``size`` x ``size`` x ``slices``, 320 x 320 x 96 mm)
    recorded in ``data_dir``'s result store with the objects of ``kinds``, as a sender
    gets it: ``vol``, ``segments``, ``results`` (the written SEG/SR/overlay), ``objects``
    (what was recorded) and ``result`` (the stored result)."""
    import numpy as np

    from pipelines.postprocess import split_labels
    from pipelines.volume import load_series
    from pipelines.writers import write_results
    from twin_archive import Archive
    from twin_archive.results import ResultStore, SegmentMeasure

    anatomy = ph.Anatomy.random(seed)
    g = ph.SliceGeometry(rows=size, columns=size, slices=slices,
                         pixel_spacing=(320.0 / size, 320.0 / size), slice_spacing=96.0 / slices)
    vol = load_series(ph.ct_series(anatomy, g))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    segments = split_labels(ph.truth_at(anatomy, vol.index_to_lps(grid)), vol, ph.LABELS)
    results = write_results(vol, segments, model)
    with Archive(data_dir) as archive:
        archive.db.execute("INSERT OR IGNORE INTO twins (patient_key, patient_id, donate)"
                           " VALUES ('k', 'PAT-1', 0)")
        archive.db.conn.commit()
    written = {"seg": [results.seg], "sr": [results.sr], "overlay": list(results.overlay)}
    objects = [(kind, ds) for kind in kinds for ds in written[kind]]
    store = ResultStore(data_dir)
    try:
        result = store.record(
            job_key=job_key, patient_key="k", study_uid=vol.study_instance_uid,
            source_series_uid=vol.series_instance_uid, source_last_received="t",
            source_instances=len(vol.source_images), task=model.task, model_name=model.name,
            model_version=model.version, backend="torch-cpu",
            segments=tuple(SegmentMeasure(name=s.name, volume_ml=s.volume_ml) for s in segments),
            timings={}, objects=objects)
    finally:
        store.close()
    return SimpleNamespace(vol=vol, segments=segments, results=results, objects=objects,
                           result=result)


def write_files(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Save data sets as Part 10 files; returns the paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def storescu(port: int, paths: list[Path], called: str = "DICOM_NODE") -> None:
    """Send files with dcmtk's storescu (TCP_NODELAY=1)."""
    import os

    exe = shutil.which("storescu")
    assert exe, "dcmtk storescu is required"
    subprocess.run([exe, "-aet", "TEST_SCU", "-aec", called, "127.0.0.1", str(port),
                    *map(str, paths)], check=True, env=dict(os.environ, TCP_NODELAY="1"),
                   capture_output=True, timeout=120)


@contextmanager
def pacs(workdir: Path, **kwargs: Any) -> Iterator[OrthancServer]:
    """A real Orthanc as the PACS of a test (or a module), killed at the end.

    Its storage is thrown away with the test's folder, so it is SIGKILLed rather than
    stopped: Orthanc's orderly stop waits about 3.5 s for its HTTP and DICOM threads.
    Tests of stopping Orthanc (and restarting it) call ``stop`` themselves.
    """
    server = OrthancServer(workdir, **kwargs).start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)


def results_in_orthanc(orthanc: Any, study_uid: str) -> dict[str, list[str]]:
    """Orthanc instance ids of SEG, SR and overlay (secondary capture) in one study."""
    found: dict[str, list[str]] = {"seg": [], "sr": [], "overlay": [], "other": []}
    hits = orthanc.post_json("/tools/find", {"Level": "Instance", "Expand": True,
                                             "Query": {"StudyInstanceUID": study_uid}})
    for inst in hits or []:
        sop = orthanc.instance_tags(inst["ID"]).get("SOPClassUID", "")
        kind = ("seg" if sop == SEG_SOP else "sr" if sop in SR_SOPS else
                "overlay" if sop.startswith(SC_PREFIX) else "other")
        found[kind].append(inst["ID"])
    return found


def series_of(orthanc: Any, instance_ids: list[str]) -> set[str]:
    """SeriesInstanceUIDs of Orthanc instances."""
    return {orthanc.instance_tags(i)["SeriesInstanceUID"] for i in instance_ids}


def node_json(node: Any, *args: str) -> Any:
    """Run ``dicom-node ARGS --json`` against the node's data directory."""
    return json.loads(node.cli(*args, "--json").stdout)


# Read in process, for waits: polling the CLI would start a Python (about 1 s of a core)
# at every poll, taken from the node the test waits for. The tests still assert on the
# CLI's output once the wait is over.
def jobs_now(data_dir: Path) -> list[Job]:
    """Every job of the node's queue, newest first."""
    queue = JobQueue(data_dir)
    try:
        return queue.list(limit=10_000)
    finally:
        queue.close()


def queued_sends(data_dir: Path) -> list[Send]:
    """The result objects still queued for a destination."""
    sender = Sender(data_dir, ae_title="TEST")
    try:
        return sender.list(SendState.QUEUED, limit=10_000)
    finally:
        sender.close()


def labels_now(data_dir: Path, *, current_only: bool = False) -> list[Label]:
    """The node's labels (only the current ones with ``current_only``), oldest first."""
    with LabelStore(data_dir) as store:
        return store.list(current_only=current_only)


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of ``dciodvfy`` output that report an error."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _pixel_centres(ipp: Any, iop: Any, spacing: Any, rows: int, columns: int) -> Any:
    """LPS mm of every pixel centre of one image plane, (rows, columns, 3)."""
    import numpy as np

    o = np.asarray([float(v) for v in ipp])
    r, c = np.asarray([float(v) for v in iop[:3]]), np.asarray([float(v) for v in iop[3:]])
    i = np.arange(rows)[:, None, None] * float(spacing[0])
    j = np.arange(columns)[None, :, None] * float(spacing[1])
    return o + j * r + i * c


def seg_dice_against_truth(seg_path: Path, sources: list[Dataset], anatomy: Any,
                           label: str = "spleen") -> float:
    """Dice of a SEG segment against a phantom organ, in patient coordinates.

    Every voxel the SEG marks is placed at its centre in LPS from the SEG's own
    Plane Position / Plane Orientation / Pixel Measures, and looked up in the
    phantom's truth (:func:`pipelines.phantom.truth_at`); the truth's size is counted
    on the source images' pixel centres. Nothing about the pipeline's volume is used.
    """
    import pydicom

    value = {v: k for k, v in ph.LABELS.items()}[label]
    seg = pydicom.dcmread(seg_path)
    [number] = [int(s.SegmentNumber) for s in seg.SegmentSequence if s.SegmentLabel == label]
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    marked = hits = 0
    for k, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ident = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        if int(ident[0].ReferencedSegmentNumber) != number:
            continue
        mask = frames[k] > 0
        points = _pixel_centres(item.PlanePositionSequence[0].ImagePositionPatient, iop, spacing,
                                seg.Rows, seg.Columns)[mask]
        marked += int(mask.sum())
        hits += int((ph.truth_at(anatomy, points) == value).sum())
    truth = sum(int((ph.truth_at(anatomy, _pixel_centres(
        ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds.Rows,
        ds.Columns)) == value).sum()) for ds in sources)
    return 2 * hits / (marked + truth) if marked + truth else 1.0
