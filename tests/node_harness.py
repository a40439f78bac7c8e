"""Start the real node as a subprocess on a free loopback port, and make test data.

Used by the tests and importable by benchmarks; nothing here is a mock.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from orthanc.server import free_ports
from twin_archive import IncomingInstance
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
DICOM_NODE = [sys.executable, "-m", "dicom_node"]


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    return free_ports(1)[0]  # below the ephemeral range, this process's own stretch


class NodeProcess:
    """``dicom-node serve`` in a subprocess; its log goes to ``<data_dir>/../node-N.log``.

    Parameters
    ----------
    data_dir : pathlib.Path
        The node's data directory.
    config : str, optional
        TOML text written to a file passed with ``--config``.
    extra_args : list of str
        More flags for ``serve``.
    fast_receive : bool, optional
        The receive mode (``fast_receive`` setting); the default when omitted.
    env : dict of str to str, optional
        More environment variables for the node process.
    workers : int, optional
        Inference worker processes (``workers`` setting); the default (1) when omitted.
        A test that only receives, stores and answers passes 0: each worker imports
        torch at start-up, about 5 s of a core that such a test would only wait for.
    """

    def __init__(self, data_dir: Path, *, config: str | None = None, ae_title: str = "DICOM_NODE",
                 extra_args: list[str] | None = None, preexec_fn=None,
                 fast_receive: bool | None = None, env: dict[str, str] | None = None,
                 workers: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.ae_title = ae_title
        self.port = free_port()
        top = ""  # top-level keys go first: the given TOML may end in a table
        if fast_receive is not None:  # the receive mode (dicom_node/fast_receive)
            top += f"fast_receive = {'true' if fast_receive else 'false'}\n"
        if workers is not None:
            top += f"workers = {workers}\n"
        if top:
            config = top + (config or "")
        self.config = config
        self.extra_args = extra_args or []
        self.preexec_fn = preexec_fn
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-node.log"

    def start(self, timeout: float = 60.0) -> NodeProcess:
        args = [*DICOM_NODE]
        if self.config is not None:
            cfg = self.data_dir.parent / f"{self.data_dir.name}-config.toml"
            cfg.write_text(self.config)
            args += ["--config", str(cfg)]
        args += ["--data-dir", str(self.data_dir), "serve", "--port", str(self.port),
                 "--ae-title", self.ae_title, "--bind", "127.0.0.1", *self.extra_args]
        self.starts += 1
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                     preexec_fn=self.preexec_fn)
        log.close()

        def ready() -> bool:
            assert self.proc is not None
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if "ready: listening" in text:
                return True
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{text}")
            return False

        wait_until("the node ready", ready, timeout, poll=0.05, explain=lambda: "\n" + self.log())
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run another ``dicom-node`` command against the same data directory."""
        return subprocess.run([*DICOM_NODE, "--data-dir", str(self.data_dir), *args],
                              capture_output=True, text=True, cwd=REPO, check=check)


def small_ct(*, patient_id: str = "PAT-1", study_uid: str | None = None,
             series_uid: str | None = None, instance: int = 1, size: int = 16,
             seed: int = 0) -> Dataset:
    """A small but complete CT Image data set (random pixels, unique SOP Instance UID)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0, 0, float(instance)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    rng = np.random.default_rng(seed + instance)
    ds.PixelData = rng.integers(-1000, 1000, size=(size, size), dtype=np.int16).tobytes()
    return ds


def incoming(ds: Dataset, *, sop_class: str | None = None, calling_ae: str = "UNIT"
             ) -> IncomingInstance:
    """A data set as the network layer hands it to the archive."""
    buf = DicomBytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta)
    whole = io.BytesIO()
    ds.save_as(whole, enforce_file_format=True)
    meta = buf.getvalue()
    return IncomingInstance(file_meta=meta, dataset=whole.getvalue()[len(meta):],
                            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                            sop_class_uid=sop_class or str(ds.SOPClassUID),
                            sop_instance_uid=str(ds.SOPInstanceUID), calling_ae=calling_ae)
