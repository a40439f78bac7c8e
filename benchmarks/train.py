"""Fine-tuning throughput: the nightly training run on N labelled, donated phantom studies.

Builds a fresh data directory: N phantom CT studies (``--size`` x ``--size`` x
``--slices``) of N patients stored through the archive's store path, each with a
radiologist SEG (highdicom, from the phantom truth) taken in by the label intake, every
patient donating; the task's bundle (the shipped demo bundle's configuration, with its
weights when shipped, else seeded random weights) is the active version. Then it times
:func:`trainer.nightly.run_training` - the same code the nightly job runs: dataset
build, caching on the model grid, fine-tuning at 1e-4, registration, evaluation of
candidate and active on the validation patients, the promotion decision - and prints
the training throughput (patches/s), time per epoch and the total.

    .venv/bin/python benchmarks/train.py                         # 20 studies, 3 epochs
    .venv/bin/python benchmarks/train.py --epochs 5 --device cuda --json /tmp/train.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dicom_node.learning.label_intake import intake_seg_series  # noqa: E402
from dicom_node.tasks import default_tasks  # noqa: E402
from dicom_node.learning.training import task_rules  # noqa: E402
from learning_helpers import radiologist_seg, store_all  # noqa: E402
from pipelines import phantom as ph  # noqa: E402
from pipelines.demo_model import DEMO_BUNDLE, DEMO_TASK  # noqa: E402
from registry.store import Registry  # noqa: E402
from trainer.nightly import NightlyConfig, run_training  # noqa: E402
from trainer.train import TrainableBundle  # noqa: E402
from twin_archive import Archive  # noqa: E402
from twin_archive.labels import LabelStore  # noqa: E402


def _bundle(dest: Path) -> tuple[Path, str]:
    shutil.copytree(DEMO_BUNDLE / "configs", dest / "configs")
    (dest / "models").mkdir()
    shipped = DEMO_BUNDLE / "models" / "model.pt"
    if shipped.is_file():
        shutil.copy2(shipped, dest / "models" / "model.pt")
        return dest, "shipped demo weights"
    torch.manual_seed(0)
    torch.save(TrainableBundle(dest).network().state_dict(), dest / "models" / "model.pt")
    return dest, "seeded random weights (no shipped weights found)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--size", type=int, default=128, help="rows = columns (default 128)")
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = work / "data"
    try:
        t0 = time.perf_counter()
        spacing = 0.78 * 512 / args.size
        g = ph.SliceGeometry(rows=args.size, columns=args.size, slices=args.slices,
                             pixel_spacing=(spacing, spacing), slice_spacing=5.0)
        with Archive(data) as archive, LabelStore(data) as labels:
            for i in range(args.studies):
                pid = f"BENCH-{i:03d}"
                anatomy = ph.Anatomy.random(1000 + i)
                datasets = ph.ct_series(anatomy, g, ph.StudyInfo(patient_id=pid))
                truth = (ph.truth_labels(anatomy, g) == 1).astype(np.uint8)
                store_all(archive, datasets)
                seg = radiologist_seg(datasets, truth)
                store_all(archive, [seg], "READING_ROOM")
                intake_seg_series(archive.twins.series_files(str(seg.SeriesInstanceUID)), labels)
                archive.twins.set_consent(pid, donate=True, by="benchmark")
        t_data = time.perf_counter() - t0
        bundle, weights = _bundle(work / "bundle")
        with Registry(data) as reg:
            active = reg.import_bundle(bundle, task=DEMO_TASK, activate=True, by="benchmark")
        config = NightlyConfig(max_epochs=args.epochs, patch_size=args.patch, device=args.device,
                               time_budget_s=6 * 3600)
        t1 = time.perf_counter()
        outcome = run_training(data, DEMO_TASK, task_rules(DEMO_TASK, default_tasks()), config, by="benchmark")
        total = time.perf_counter() - t1
        per_epoch = outcome.train_seconds / max(outcome.epochs, 1)
        row = {
            "studies": args.studies, "grid": [args.size, args.size, args.slices],
            "spacing_mm": [round(spacing, 3), round(spacing, 3), 5.0], "epochs": outcome.epochs,
            "patch": args.patch, "device": config.resolved_device(),
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "start_weights": weights, "active": active.version,
            "outcome": outcome.outcome, "candidate": outcome.candidate,
            "train_series": outcome.train_series, "validation_series": outcome.validation_series,
            "samples_per_s": outcome.samples_per_s, "train_seconds": outcome.train_seconds,
            "seconds_per_epoch": round(per_epoch, 2),
            "run_seconds_total": round(total, 2), "data_prep_seconds": round(t_data, 2),
            "candidate_dice": outcome.candidate_dice, "active_dice": outcome.active_dice,
        }
        print(json.dumps(row, indent=2))
        print(f"\nfine-tuning on {args.studies} labelled studies ({outcome.train_series} train / "
              f"{outcome.validation_series} validation), {outcome.epochs} epochs, patch "
              f"{args.patch}^3 on {row['device']}: {outcome.samples_per_s:.2f} patches/s, "
              f"{per_epoch:.1f} s/epoch, whole run (dataset, caching, training, registration, "
              f"evaluation of both versions) {total:.1f} s")
        if args.json:
            args.json.write_text(json.dumps(row, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
