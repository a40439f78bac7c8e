"""Train the shipped demo model of task ``spleen-ct`` on generated CT phantoms.

The demo model is a small 3D UNet trained only on synthetic abdominal phantoms
(:mod:`pipelines.phantom`): it exists so that the node works out of the box and the
whole loop can be shown and tested without downloading anything. It is not for
clinical use.

Reproduce the shipped weights with::

    python -m trainer.demo_model --seed 0 --out pipelines/demo_model/spleen_ct_demo

The command writes the bundle's ``configs/inference.json`` and
``configs/metadata.json`` (with the training record: command, seed, cases, Dice,
times) and ``models/model.pt``. Phantom anatomies of training case ``i`` use seed
``TRAIN_SEED_BASE + 1000 * seed + i`` and of validation case ``i``
``VAL_SEED_BASE + 1000 * seed + i``; tests hold out seeds below 100000.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines import phantom as ph
from trainer.train import TrainingConfig, TrainingResult, VolumeItem, train

LOG = logging.getLogger(__name__)

TRAIN_SEED_BASE = 100_000
VAL_SEED_BASE = 200_000
#: Model grid spacing (mm, RAS after Orientationd) of the demo bundle.
PIXDIM = (2.5, 2.5, 2.5)
ROI = (96, 96, 96)
BUNDLE_VERSION = "1.0.0"
#: Intensity window of the input scaling, HU (abdominal window W400/L40).
A_MIN, A_MAX = -160.0, 240.0


def network_def() -> dict[str, Any]:
    """The ``network_def`` of the demo bundle: a small 3D UNet (about 0.15 M weights)."""
    return {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
            "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1,
            "norm": "batch"}


def inference_config() -> dict[str, Any]:
    """``configs/inference.json`` of the demo bundle, in the Model Zoo's layout."""
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.float32",
        "output_postfix": "trans",
        "separate_folder": True,
        "load_pretrain": True,
        "dataset_dir": "/workspace/data/spleen_ct_demo",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": list(PIXDIM),
             "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": A_MIN,
             "a_max": A_MAX, "b_min": 0, "b_max": 1, "clip": True},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 2},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(ROI),
                    "sw_batch_size": 2, "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "@image_key", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
             "output_ext": "@output_ext", "output_dtype": "@output_dtype",
             "output_postfix": "@output_postfix", "separate_folder": "@separate_folder"},
        ]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "checkpointloader": {"_target_": "CheckpointLoader",
                             "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)",
                       "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }


def metadata(training: dict[str, Any] | None = None) -> dict[str, Any]:
    """``configs/metadata.json`` of the demo bundle (``training``: the run's record)."""
    import monai

    shape = list(ROI)
    meta: dict[str, Any] = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "version": BUNDLE_VERSION,
        "changelog": {
            "1.0.0": "small UNet trained on generated phantoms with varied spleen shape, "
                     "size, position and contrast, varied spacing and slice count",
        },
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "name": "Spleen CT demo (synthetic phantoms)",
        "task": "spleen-ct",
        "description": "A deliberately small 3D UNet that segments the spleen in CT; trained "
                       "only on synthetic phantoms generated by dicom-node (pipelines.phantom). "
                       "For demonstration and tests; not for clinical use.",
        "authors": "dicom-node",
        "copyright": "dicom-node contributors, Apache-2.0",
        "data_source": "generated by `python -m trainer.demo_model` (pipelines.phantom); "
                       "nothing downloaded",
        "data_type": "dicom",
        "image_classes": "single channel CT in HU, scaled from [-160, 240] to [0, 1]",
        "label_classes": "single channel data, 1 is spleen, 0 is everything else",
        "pred_classes": "2 channels OneHot data, channel 1 is spleen, channel 0 is background",
        "intended_use": "Demonstration and testing only; not for diagnostic use",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                "spatial_shape": shape, "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": 2,
                "spatial_shape": shape, "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "channel_def": {"0": "background", "1": "spleen"}}},
        },
    }
    if training is not None:
        meta["eval_metrics"] = {"mean_dice": training["best_val_dice"]["spleen"]}
        meta["training"] = training
    return meta


def write_configs(out: Path, training: dict[str, Any] | None = None) -> None:
    """Write the demo bundle's configs under ``out`` (``configs/``)."""
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / "inference.json").write_text(
        json.dumps(inference_config(), indent=4) + "\n", encoding="utf-8")
    (out / "configs" / "metadata.json").write_text(
        json.dumps(metadata(training), indent=4) + "\n", encoding="utf-8")


def write_readme(out: Path, record: dict[str, Any]) -> None:
    """Write the bundle's ``README.md``: what it is, how it was made and how to redo it."""
    dice = ", ".join(f"{k} {v:.4f}" for k, v in record["best_val_dice"].items())
    text = f"""# Spleen CT demo bundle (synthetic phantoms only)

**Not for clinical use.** This is the demo model that ships with dicom-node for the
task `spleen-ct`. The network is small on purpose (a 3D UNet with channels
{network_def()["channels"]}, about 0.15 million weights) so that it runs in seconds on
a 2-core CPU, and it was trained **only on synthetic CT phantoms** generated by
`pipelines.phantom` (body, spine, liver, kidneys and a spleen of varied shape, size,
position and contrast; 8-25 HU noise; 0.6-1.0 mm pixels, 2-5 mm slices, varied slice
count and scan range). It has never seen a real patient and says nothing about real
spleens; it exists so that the node, its tests and its demo work out of the box
without downloading anything.

## Reproduce

From the repository root, with the project's virtual environment:

```
{record["command"]}
```

- seed: {record["seed"]} (phantom anatomy seeds {record["train_phantom_seeds"][0]}..{record["train_phantom_seeds"][-1]}
  for training, {record["val_phantom_seeds"][0]}..{record["val_phantom_seeds"][-1]} for validation; tests hold out seeds below
  {TRAIN_SEED_BASE})
- the run that made the shipped weights: {record["epochs"]} epochs (best at epoch
  {record["best_epoch"]}), {record["training_seconds"]:.0f} s of training
  ({record["total_seconds_with_phantom_generation"]:.0f} s with phantom generation),
  {record["samples_per_s"]:.1f} patches/s of 64^3 voxels, on {record["device"]} with
  {record["torch_threads"]} threads
- validation Dice (model grid): {dice}

`configs/metadata.json` holds the same record under `training`. The default command
(`python -m trainer.demo_model --seed {record["seed"]} --out DIR`) trains within a time
budget instead of a fixed number of epochs; the command above fixes the epochs
(`--time-budget 0`) so that it does not depend on the machine's speed.

## What is inside

- `configs/inference.json`: Model Zoo layout; preprocessing Orientationd RAS,
  Spacingd {list(PIXDIM)} mm, ScaleIntensityRanged [{A_MIN:.0f}, {A_MAX:.0f}] HU -> [0, 1];
  SlidingWindowInferer roi {list(ROI)}, overlap 0.25; softmax.
- `configs/metadata.json`: version, changelog, `network_data_format` (channel 0
  background, channel 1 spleen), the training record.
- `models/model.pt`: the state dict.

Training recipe (`trainer.train`): cached volumes on the model grid, 64^3 patches
drawn half on spleen and half on background, mild intensity augmentation, Adam,
Dice + cross-entropy loss, learning rate x0.95 per epoch, best validation Dice kept.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def random_geometry(rng: np.random.Generator) -> ph.SliceGeometry:
    """An axial CT geometry as scanners make them: 512 x 512, 0.6-1.0 mm pixels,
    2-5 mm slices, 120-400 mm of z range centred somewhere on the upper abdomen
    (the spleen may be cut by the scan range)."""
    spacing = float(rng.uniform(0.6, 1.0))
    slice_spacing = float(rng.uniform(2.0, 5.0))
    z_range = float(rng.uniform(120.0, 400.0))
    slices = max(8, int(round(z_range / slice_spacing)))
    centre = (float(rng.uniform(-15, 15)), float(rng.uniform(-15, 15)),
              float(rng.uniform(-40, 90)))
    return ph.SliceGeometry(rows=512, columns=512, slices=slices,
                            pixel_spacing=(spacing, spacing), slice_spacing=slice_spacing,
                            centre=centre)


@dataclass(frozen=True, kw_only=True, slots=True)
class PhantomSource:
    """A generated phantom case, rendered when loaded (an :class:`ItemSource`).

    Parameters
    ----------
    anatomy_seed : int
        Seed of :meth:`pipelines.phantom.Anatomy.random` and of the image noise.
    geometry_seed : int
        Seed of :func:`random_geometry`.
    name : str
        Filled in from the seeds.
    """

    anatomy_seed: int
    geometry_seed: int
    name: str = field(default="")

    def __post_init__(self) -> None:
        if self.anatomy_seed < 0 or self.geometry_seed < 0:
            raise ValueError("anatomy_seed and geometry_seed must be >= 0")
        object.__setattr__(self, "name", f"phantom-{self.anatomy_seed}")

    def load(self) -> VolumeItem:
        """Render the phantom: HU volume, spleen mask (1 = spleen) and affine."""
        anatomy = ph.Anatomy.random(self.anatomy_seed)
        geometry = random_geometry(np.random.default_rng(self.geometry_seed))
        hu, label = render_volume(anatomy, geometry)
        return VolumeItem(name=self.name, image=hu, label=(label == 1).astype(np.uint8),
                          affine=geometry.affine)


def render_volume(anatomy: ph.Anatomy, geometry: ph.SliceGeometry
                  ) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32) and truth labels (uint8) of every slice, (slices, rows, columns),
    with the same noise as :func:`pipelines.phantom.ct_series` (before int16 rounding)."""
    rng = np.random.default_rng(anatomy.seed + 1)
    hu = np.empty((geometry.slices, geometry.rows, geometry.columns), np.float32)
    labels = np.empty(hu.shape, np.uint8)
    for k in range(geometry.slices):
        hu[k], labels[k] = ph.render(anatomy, geometry, k, rng)
    return np.rint(np.clip(hu, -1024.0, 3071.0)), labels


def build_demo_model(out: Path, *, seed: int = 0, train_cases: int = 32, val_cases: int = 4,
                     epochs: int = 60, time_budget_s: float | None = 1200.0,
                     learning_rate: float = 3e-3, device: str = "cpu",
                     checkpoint: Path | None = None) -> TrainingResult:
    """Generate phantoms, train the demo network and write the bundle to ``out``.

    Parameters
    ----------
    out : pathlib.Path
        Bundle directory to write (configs, ``models/model.pt``).
    seed : int
        Selects the phantom seeds (see the module docstring) and seeds training.
    train_cases, val_cases : int
        Number of generated training and validation phantoms.
    epochs : int
        Maximum epochs (one epoch = every training phantom visited once).
    time_budget_s : float or None
        Wall-clock budget of the training, s.
    learning_rate : float
        Initial Adam learning rate (decays by 0.95 per epoch).
    device : str
        Torch device.
    checkpoint : pathlib.Path, optional
        Checkpoint to write and to resume from.

    Returns
    -------
    TrainingResult

    Raises
    ------
    ValueError
        Non-positive case counts.
    TrainingError
        If training fails.
    """
    if train_cases < 1 or val_cases < 1:
        raise ValueError("train_cases and val_cases must be >= 1")
    out = Path(out)
    write_configs(out)
    base = 1000 * seed
    train_items = [PhantomSource(anatomy_seed=TRAIN_SEED_BASE + base + i,
                                 geometry_seed=TRAIN_SEED_BASE + base + i)
                   for i in range(train_cases)]
    val_items = [PhantomSource(anatomy_seed=VAL_SEED_BASE + base + i,
                               geometry_seed=VAL_SEED_BASE + base + i)
                 for i in range(val_cases)]
    config = TrainingConfig(learning_rate=learning_rate, lr_decay=0.95, max_epochs=epochs,
                            time_budget_s=time_budget_s, seed=seed, device=device,
                            patch_size=(64, 64, 64), samples_per_volume=4, volumes_per_batch=1,
                            validate_every=5)
    t0 = time.perf_counter()
    result = train(out, train_items, val_items, config, weights_out=out / "models" / "model.pt",
                   checkpoint=checkpoint)
    total = time.perf_counter() - t0
    command = (f"python -m trainer.demo_model --seed {seed} --out {shlex.quote(str(out))} "
               f"--train-cases {train_cases} --val-cases {val_cases} --epochs {result.epochs} "
               f"--time-budget 0 --lr {learning_rate} --device {device}")
    record = {
        "command": command, "seed": seed,
        "train_phantom_seeds": [s.anatomy_seed for s in train_items],
        "val_phantom_seeds": [s.anatomy_seed for s in val_items],
        "epochs": result.epochs, "best_epoch": result.best_epoch,
        "stopped_by": result.stopped_by,
        "best_val_dice": {k: round(v, 4) for k, v in result.dice_by_label().items()},
        "training_seconds": round(result.seconds, 1),
        "total_seconds_with_phantom_generation": round(total, 1),
        "samples": result.samples, "samples_per_s": round(result.samples_per_s, 3),
        "device": device, "torch_threads": torch.get_num_threads(),
        "patch_size": list(config.patch_size), "learning_rate": learning_rate,
    }
    write_configs(out, record)
    write_readme(out, record)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m trainer.demo_model --seed N --out DIR``."""
    p = argparse.ArgumentParser(prog="python -m trainer.demo_model",
                                description="Train the demo spleen-ct bundle on generated "
                                            "phantoms (synthetic data only; not for clinical use).")
    p.add_argument("--seed", type=int, default=0, help="phantom and training seed (default 0)")
    p.add_argument("--out", type=Path, default=Path("pipelines/demo_model/spleen_ct_demo"),
                   help="bundle directory to write")
    p.add_argument("--train-cases", type=int, default=32)
    p.add_argument("--val-cases", type=int, default=4)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--time-budget", type=float, default=1200.0,
                   help="training wall-clock budget, seconds (default 1200; 0: none, "
                        "which makes the run reproducible)")
    p.add_argument("--lr", type=float, default=3e-3, help="initial learning rate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file, written every epoch and resumed from if present")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = build_demo_model(args.out, seed=args.seed, train_cases=args.train_cases,
                              val_cases=args.val_cases, epochs=args.epochs,
                              time_budget_s=args.time_budget or None, learning_rate=args.lr,
                              device=args.device, checkpoint=args.checkpoint)
    print(json.dumps({"best_val_dice": result.dice_by_label(), "epochs": result.epochs,
                      "seconds": round(result.seconds, 1),
                      "samples_per_s": round(result.samples_per_s, 3),
                      "weights": str(result.weights)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
