"""``dicom-node demo``: the main job on embedded defaults, end to end on this machine.

Starts the node on a free loopback port, generates a synthetic abdominal CT study,
sends it with dcmtk ``storescu`` (pynetdicom when dcmtk is absent) and shows what the
node filed into the patient's twin.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from dicom_node.logconfig import configure_logging
from dicom_node.server import DicomServer
from dicom_node.settings import Settings

LOG = logging.getLogger(__name__)


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", parents=parents,
                       help="run the node end to end on a generated CT study")
    p.add_argument("--slices", type=int, default=80, help="slices of the generated CT (512x512)")
    p.add_argument("--patient-id", default="DEMO-0001")
    p.set_defaults(func=cmd_demo)


def _write_study(out: Path, slices: int, patient_id: str) -> list[Path]:
    from pipelines.phantom import Anatomy, SliceGeometry, StudyInfo, ct_series

    info = StudyInfo(patient_id=patient_id, patient_name="Demo^Patient")
    paths = []
    for i, ds in enumerate(ct_series(Anatomy.random(7), SliceGeometry(slices=slices), info)):
        path = out / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _send(paths: list[Path], port: int, called: str) -> None:
    storescu = shutil.which("storescu")
    if storescu:
        env = dict(os.environ, TCP_NODELAY="1")
        subprocess.run([storescu, "-aet", "DEMO_SCU", "-aec", called, "127.0.0.1", str(port),
                        *map(str, paths)], check=True, env=env)
        return
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="DEMO_SCU")
    ae.add_requested_context(CTImageStorage)
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


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log_level)
    from dicom_node.cli.serve import open_archive

    data_dir = settings.data_dir if getattr(args, "data_dir", None) else Path("demo-data").resolve()
    settings = settings.replace(data_dir=data_dir, port=0, bind_address="127.0.0.1", min_free_mb=64)
    archive = open_archive(settings)
    server = DicomServer(settings, archive)
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="dicom-node-demo-") as tmp:
            LOG.info("demo: generating a %d-slice 512x512 abdominal CT", args.slices)
            paths = _write_study(Path(tmp), args.slices, args.patient_id)
            LOG.info("demo: sending %d instances to %s at 127.0.0.1:%d", len(paths),
                     settings.ae_title, server.port)
            t0 = time.perf_counter()
            _send(paths, server.port, settings.ae_title)
            dt = time.perf_counter() - t0
        detail = archive.twin(args.patient_id)
    finally:
        server.stop()
        archive.close()
    print()
    print(f"demo: {len(paths)} instances sent and archived in {dt:.2f} s "
          f"({len(paths) / dt:.0f} instances/s) under {data_dir}")
    for st in detail.studies:
        for se in st.series:
            print(f"demo: twin of {args.patient_id}: series {se.series_number} {se.modality} "
                  f"{se.description!r}: {se.instances} instances")
    print(f"demo: inspect with: dicom-node --data-dir {data_dir} twin show {args.patient_id}")
    return 0
