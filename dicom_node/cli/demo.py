"""``dicom-node demo``: the main job end to end on this machine, with a real Orthanc as PACS.

1. starts Orthanc on free loopback ports (``orthanc/server.py``), its data under
   ``<data-dir>/orthanc``;
2. makes the shipped demo model the active ``spleen-ct`` model;
3. starts the node (listener, stability monitor, worker, sender) with Orthanc as its
   destination and a short quiet period;
4. generates an abdominal CT study (``pipelines.phantom``), stores it in Orthanc (as the
   scanner would in the PACS) and sends it to the node, with dcmtk ``storescu``
   (``TCP_NODELAY=1``; pynetdicom when dcmtk is absent);
5. waits for the SEG, the SR, the overlay series and the RTSTRUCT to be acknowledged by
   Orthanc (the demo's destination takes all four) and shows what landed there, the
   measured spleen volume and the time it took;
6. stops everything; or, with ``--viewer``, keeps Orthanc (with its DICOMweb plugin)
   and the node running and serves the OHIF web viewer (``orthanc/viewer.py``) at a
   printed URL until Ctrl-C: the SEG, the RTSTRUCT, the overlay and the SR in a browser, and a SEG
   exported from OHIF (STOW-RS into Orthanc) is forwarded to the node as a label.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

from dicom_node.logconfig import configure_logging
from dicom_node.settings import RESULT_KINDS, Destination, Settings

LOG = logging.getLogger(__name__)

SEG_SOP = "1.2.840.10008.5.1.4.1.1.66.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
#: What the demo's destination (Orthanc) takes, and what the demo waits for: every kind.
DEMO_KINDS = RESULT_KINDS


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", parents=parents,
                       help="run the main job end to end: Orthanc as PACS, a generated CT, "
                            "SEG/SR/overlay/RTSTRUCT back in Orthanc")
    p.add_argument("--slices", type=int, default=80, help="slices of the generated CT (512x512)")
    p.add_argument("--patient-id", default="DEMO-0001")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated anatomy (default 7)")
    p.add_argument("--stable-after", type=float, default=2.0, metavar="SECONDS",
                   help="quiet period before a series counts as complete (default 2 s)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="give up waiting for the results after this long")
    p.add_argument("--multiframe", action="store_true",
                   help="send the CT as one Legacy Converted Enhanced CT (multi-frame) instance")
    p.add_argument("--viewer", action="store_true",
                   help="after the demo, keep Orthanc and the node and serve the OHIF web viewer "
                        "on the study until Ctrl-C")
    p.add_argument("--viewer-port", type=int, default=0, metavar="PORT",
                   help="port of the web viewer (default: a free one, printed)")
    p.add_argument("--viewer-bind", default="127.0.0.1", metavar="ADDRESS",
                   help="address the web viewer listens on (default 127.0.0.1)")
    p.set_defaults(func=cmd_demo)


def _write_study(out: Path, slices: int, patient_id: str, seed: int, multiframe: bool = False
                 ) -> tuple[list[Path], float]:
    """Generate and save the demo CT (as one Legacy Converted Enhanced CT, made by
    highdicom's converter, when ``multiframe``); returns the files and the phantom's true
    spleen volume on this grid (mL: spleen voxels of the truth map times the voxel volume)."""
    import numpy as np

    from pipelines.phantom import LABELS, Anatomy, SliceGeometry, StudyInfo, ct_series, truth_labels

    anatomy = Anatomy.random(seed)
    geometry = SliceGeometry(slices=slices)
    info = StudyInfo(patient_id=patient_id, patient_name="Demo^Patient")
    datasets = ct_series(anatomy, geometry, info)
    if multiframe:
        import highdicom as hd
        from pydicom.uid import generate_uid

        datasets = [hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=datasets, series_instance_uid=generate_uid(), series_number=3,
            sop_instance_uid=generate_uid(), instance_number=1)]
    paths = []
    for i, ds in enumerate(datasets):
        path = out / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    spleen = {v: k for k, v in LABELS.items()}["spleen"]
    voxel_ml = geometry.pixel_spacing[0] * geometry.pixel_spacing[1] * geometry.slice_spacing / 1000
    true_ml = float(np.count_nonzero(truth_labels(anatomy, geometry) == spleen)) * voxel_ml
    return paths, true_ml


def send_files(paths: list[Path], port: int, called: str) -> None:
    """Send files to ``127.0.0.1:port`` (AE ``called``): dcmtk storescu if installed, else
    pynetdicom.

    Raises
    ------
    RuntimeError
        If the association is refused or an instance is not stored.
    """
    from pydicom import dcmread

    classes = {str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
               for p in paths}
    storescu = shutil.which("storescu")
    if storescu and classes == {CT_IMAGE_STORAGE}:  # storescu does not propose every class
        env = dict(os.environ, TCP_NODELAY="1")
        subprocess.run([storescu, "-aet", "DEMO_SCU", "-aec", called, "127.0.0.1", str(port),
                        *map(str, paths)], check=True, env=env)
        return
    from pynetdicom import AE

    ae = AE(ae_title="DEMO_SCU")
    for sop_class in sorted(classes):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    try:
        for p in paths:
            status = assoc.send_c_store(dcmread(p))
            if status.Status != 0:
                raise RuntimeError(f"C-STORE of {p.name} failed with status 0x{status.Status:04X}")
    finally:
        assoc.release()


def orthanc_results(orthanc: Any, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """What Orthanc holds in one study, by kind (seg, sr, overlay, rtstruct, source): the
    series' main tags, once per instance (the SOP Class is read from one instance per series)."""
    out: dict[str, list[dict[str, Any]]] = {"seg": [], "sr": [], "overlay": [], "rtstruct": [],
                                            "source": []}
    for series in orthanc.post_json("/tools/find", {"Level": "Series", "Expand": True,
                                                    "Query": {"StudyInstanceUID": study_uid}}) or []:
        instances = list(series.get("Instances", []))
        if not instances:
            continue
        tags = orthanc.instance_tags(instances[0])
        sop = tags.get("SOPClassUID", "")
        kind = ("seg" if sop == SEG_SOP else "sr" if tags.get("Modality") == "SR" else
                "rtstruct" if tags.get("Modality") == "RTSTRUCT" else
                "overlay" if sop.startswith(SC_PREFIX) else "source")
        out[kind] += [tags] * len(instances)
    return out


def wait_for_sends(data_dir: Path, study_uid: str, timeout: float, kinds: tuple[str, ...]
                   ) -> dict[str, datetime]:
    """Wait until the node's send queue shows each of ``kinds`` of the study acknowledged.

    Returns the acknowledgement time of the last object of each kind.

    Raises
    ------
    TimeoutError
        If not all of them are acknowledged within ``timeout`` s.
    """
    from dicom_node.queue.jobs import connect_queue
    from dicom_node.queue.sender import SendState, sends_of_results
    from twin_archive.results import ResultStore

    deadline = time.monotonic() + timeout
    with closing(connect_queue(data_dir)) as conn, closing(ResultStore(data_dir)) as results:
        while True:
            rows = sends_of_results(conn, [r.id for r in results.current_for_study(study_uid)])
            done: dict[str, datetime] = {}
            pending = False
            for r in rows:
                if r.state not in (SendState.SENT, SendState.CONFIRMED):
                    pending = True
                    continue
                t = datetime.fromisoformat(r.sent_at)
                done[r.kind] = max(done.get(r.kind, t), t)
            if rows and not pending and all(k in done for k in kinds):
                return done
            if time.monotonic() > deadline:
                raise TimeoutError(f"results of study {study_uid} not acknowledged after "
                                   f"{timeout:.0f} s; see `dicom-node jobs` and `dicom-node sends`")
            time.sleep(0.05)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log_level)
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    from dicom_node.runtime.datadir_lock import DataDirLock
    from dicom_node.runtime.node import Node
    from orthanc.server import OrthancServer, free_ports
    from pipelines.demo_model import ensure_demo_model
    from registry.store import Registry
    from twin_archive.results import ResultStore

    data_dir = Path(settings.data_dir if getattr(args, "data_dir", None) else "demo-data").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)  # one node per data directory, before anything is touched
    with Registry(data_dir) as reg:
        model = ensure_demo_model(reg)
    LOG.info("demo: serving model %s for task spleen-ct", model.version)
    t_start = time.perf_counter()
    viewer = getattr(args, "viewer", False)
    # Orthanc knows the node (its AE on a fixed free port): it reports Storage Commitment
    # on a new association to it, so the demo's results end 'confirmed' (issue 25)
    node_port = free_ports(1)[0]
    if viewer:
        from orthanc.viewer import ohif_dir

        ohif_dir()  # fail now, not after the demo, when OHIF is not installed
    pacs = OrthancServer(data_dir / "orthanc", dicomweb=viewer,
                         known_modalities={"node": (settings.ae_title, "127.0.0.1", node_port)},
                         forward_corrections_to="node" if viewer else None)
    with pacs as orthanc:
        LOG.info("demo: Orthanc (the PACS) is AE %s at 127.0.0.1:%d, web UI %s", orthanc.aet,
                 orthanc.dicom_port, orthanc.url)
        settings = _demo_settings(settings, data_dir, node_port, args, orthanc)
        node = Node(settings, lock=lock)
        node.start()
        try:
            if not node.loop.workers.wait_ready(300):  # so the figures below hold no start-up
                LOG.warning("demo: the inference worker is not ready after 300 s; going on")
            paths, true_ml, study_uid, sent_s, acked = _send_study(args, orthanc, node, settings)
            done = wait_for_sends(data_dir, study_uid, args.timeout, DEMO_KINDS)
            detail = node.archive.twins.twin(args.patient_id)
            with ResultStore(data_dir) as store:
                timings = {r["id"]: store.get(int(r["id"])).timings for r in detail.results
                           if r["study_uid"] == study_uid}
            landed = orthanc_results(orthanc, study_uid)
            _print_summary(args, paths, sent_s, study_uid, landed, detail, timings, true_ml,
                           done, acked)
            if viewer:
                _serve_viewer(args, orthanc, study_uid)
        finally:
            node.stop()
    print(f"demo: Orthanc and the node are stopped ({time.perf_counter() - t_start:.0f} s in all); "
          f"the data stays under {data_dir}")
    print(f"demo: look again with: dicom-node --data-dir {data_dir} twin show {args.patient_id}")
    return 0


def _demo_settings(settings: Settings, data_dir: Path, node_port: int, args: argparse.Namespace,
                   orthanc: Any) -> Settings:
    """The node's settings for the demo: loopback, Orthanc its one destination (taking the
    SEG, the SR, the overlay and the RTSTRUCT), short back-off."""
    return settings.replace(
        data_dir=data_dir, port=node_port, bind_address="127.0.0.1", min_free_mb=64,
        stable_after=args.stable_after, send_backoff_initial_s=0.5, send_backoff_max_s=5.0,
        metrics_port=0, train_enabled=False, allowed_calling_aes=(), tls_cert=None,
        tls_key=None, tls_ca=None,
        destinations=(Destination(ae_title=orthanc.aet, host="127.0.0.1",
                                  port=orthanc.dicom_port, send=DEMO_KINDS),))


def _send_study(args: argparse.Namespace, orthanc: Any, node: Any, settings: Settings
                ) -> tuple[list[Path], float, str, float, Any]:
    """Generate the CT, store it in Orthanc as the scanner would, then send it to the node.

    Returns the files, the phantom's true spleen volume (mL), the Study Instance UID, the
    seconds the send to the node took and the time its last instance was acknowledged.
    """
    import pydicom

    from dicom_node.foundation.clock import utc_now

    with tempfile.TemporaryDirectory(prefix="dicom-node-demo-") as tmp:
        LOG.info("demo: generating a %d-slice 512x512 abdominal CT", args.slices)
        paths, true_ml = _write_study(Path(tmp), args.slices, args.patient_id, args.seed,
                                      getattr(args, "multiframe", False))
        study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        LOG.info("demo: storing the study in Orthanc, as the scanner would in the PACS")
        send_files(paths, orthanc.dicom_port, orthanc.aet)
        LOG.info("demo: sending %d instances to the node", len(paths))
        t_send = time.perf_counter()
        send_files(paths, node.server.port, settings.ae_title)
        return paths, true_ml, study_uid, time.perf_counter() - t_send, utc_now()


def _serve_viewer(args: argparse.Namespace, orthanc: Any, study_uid: str) -> None:
    """Serve OHIF on the study until SIGINT (Ctrl-C) or SIGTERM."""
    import signal
    import threading

    from orthanc.viewer import ViewerServer

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ViewerServer(orthanc.url, host=args.viewer_bind, port=args.viewer_port) as web:
            print(f"demo: the OHIF web viewer on this study: {web.study_url(study_uid)}", flush=True)
            print("demo: double-click the SEG thumbnail (then Yes) to lay the segmentation on the "
                  "CT, the RTSTRUCT (then Yes) for its contours; the overlay and the SR are "
                  "series of the same study. A SEG exported from "
                  "OHIF goes to Orthanc and on to the node as a label. Ctrl-C to stop.", flush=True)
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_summary(args: argparse.Namespace, paths: list[Path], sent_s: float, study_uid: str,
                   landed: dict[str, list[dict[str, Any]]], detail: Any,
                   timings: dict[int, dict[str, float]], true_ml: float,
                   done: dict[str, datetime], acked: datetime) -> None:
    to_seg_sr = (max(done["seg"], done["sr"]) - acked).total_seconds()
    to_all = (max(done.values()) - acked).total_seconds()
    current = [r for r in detail.results if r["study_uid"] == study_uid and not r["superseded_by"]]
    print()
    print(f"demo: {len(paths)} CT instances (512x512) sent to the node in {sent_s:.1f} s")
    print(f"demo: in Orthanc, study {study_uid}:")
    for kind, label in (("source", "CT images"), ("seg", "DICOM SEG"), ("sr", "DICOM SR (TID 1500)"),
                        ("overlay", "overlay images (secondary capture)"),
                        ("rtstruct", "RT Structure Set (contours)")):
        items = landed[kind]
        descr = sorted({str(t.get("SeriesDescription", "")) for t in items})
        print(f"  {len(items):>4} {label:<36} {', '.join(d for d in descr if d)}")
    for r in current:
        print(f"demo: model {r['model']} {r['model_version']} on {r['backend']}")
        for seg in r["segments"]:
            err = (seg["volume_ml"] - true_ml) / true_ml * 100 if true_ml else float("nan")
            print(f"demo: measured {seg['name']} volume {seg['volume_ml']:.1f} mL; the phantom's "
                  f"true spleen volume {true_ml:.1f} mL ({err:+.1f} %)")
        stages = timings.get(r["id"], {})
        if stages:
            print("demo: the node's stages: " + ", ".join(
                f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f} s" for k, v in stages.items()))
    print(f"demo: from the last instance acknowledged to SEG and SR acknowledged by Orthanc: "
          f"{to_seg_sr:.1f} s ({to_all:.1f} s with the overlay and the RTSTRUCT), of which {args.stable_after:.1f} s "
          "is the quiet period that marks the series complete", flush=True)
