"""The shipped demo model: installed once, active, and accurate on held-out phantoms.

Held-out phantoms use anatomy seeds below 100000; the demo model was trained on seeds
from 100000 up (trainer.demo_model.TRAIN_SEED_BASE). Every case goes through the
served path: generated DICOM data sets -> pipelines.run.run_series (series to volume,
the registered bundle's preprocessing, sliding window and inversion, largest connected
component, SEG/SR/overlay) -> Dice of the spleen segment against the phantom's exact
truth at the volume's voxel centres.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines import phantom as ph
from pipelines.demo_model import DEMO_BUNDLE, DEMO_TASK, ensure_demo_model
from pipelines.inference import LoadedModel, load_model
from pipelines.run import run_series
from registry.bundle import open_bundle
from registry.store import Registry
from trainer.demo_model import TRAIN_SEED_BASE, VAL_SEED_BASE

#: (anatomy seed, matrix, slice spacing mm, slices, centre z mm)
HELD_OUT = [(1, 128, 5.0, 50, 30.0), (2, 128, 2.5, 110, 40.0), (4, 128, 3.0, 90, 20.0),
            (6, 128, 4.0, 64, 50.0), (8, 160, 5.0, 56, 35.0), (9, 128, 2.0, 130, 30.0)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("demo-registry"))
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def model(registry: Registry) -> LoadedModel:
    return load_model(ensure_demo_model(registry), registry=registry, backend="pytorch-cpu")


def _dice(anatomy: ph.Anatomy, g: ph.SliceGeometry, model: LoadedModel) -> tuple[float, float]:
    """Spleen Dice of the served pipeline's result, and its preprocess + inference +
    post-processing time (s)."""
    outcome = run_series(ph.ct_series(anatomy, g), model)
    vol = outcome.volume
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    truth = ph.truth_at(anatomy, vol.index_to_lps(grid)) == 1
    (spleen,) = [seg for seg in outcome.segments if seg.name == "spleen"]
    pred = spleen.mask
    t = outcome.timings
    seconds = t.preprocess_s + t.inference_s + t.postprocess_s
    return 2.0 * float(np.sum(truth & pred)) / float(truth.sum() + pred.sum()), seconds


def test_ensure_demo_model_is_idempotent_and_active(tmp_path: Path) -> None:
    with Registry(tmp_path) as reg:
        first = ensure_demo_model(reg)
        second = ensure_demo_model(reg)
        assert first.version == second.version == f"{DEMO_TASK}-v1"
        assert [v.version for v in reg.list(DEMO_TASK)] == [first.version]
        active = reg.active(DEMO_TASK)
        assert active is not None and active.version == first.version
        assert reg.resolve(DEMO_TASK, "ANY VENDOR", "ANY SCANNER").version == first.version
        assert [lab.name for lab in first.labels] == ["spleen"]
        assert first.modality == "CT"
    with Registry(tmp_path) as reg:  # a restart of the node: still one version
        assert ensure_demo_model(reg).version == first.version
        assert len(reg.list(DEMO_TASK)) == 1


def test_shipped_bundle_is_small_documented_and_reproducible() -> None:
    bundle = open_bundle(DEMO_BUNDLE)
    assert bundle.info.modality == "CT" and bundle.info.in_channels == 1
    assert [lab.name for lab in bundle.info.labels] == ["spleen"]
    weights = DEMO_BUNDLE / "models" / "model.pt"
    assert weights.stat().st_size < 2 * 1024 * 1024
    meta = json.loads((DEMO_BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "spleen"}
    record = meta["training"]
    assert record["command"].startswith("python -m trainer.demo_model --seed ")
    assert min(record["train_phantom_seeds"]) >= TRAIN_SEED_BASE
    assert min(record["val_phantom_seeds"]) >= VAL_SEED_BASE
    assert max(seed for seed, *_ in HELD_OUT) < TRAIN_SEED_BASE
    readme = (DEMO_BUNDLE / "README.md").read_text()
    assert record["command"] in readme
    assert "not for clinical use" in readme.lower()


def test_dice_on_held_out_phantoms(model: LoadedModel) -> None:
    dices = []
    for seed, size, slice_spacing, slices, z in HELD_OUT:
        spacing = 0.78 * 512 / size
        g = ph.SliceGeometry(rows=size, columns=size, slices=slices,
                             pixel_spacing=(spacing, spacing), slice_spacing=slice_spacing,
                             centre=(0.0, 0.0, z))
        dice, seconds = _dice(ph.Anatomy.random(seed), g, model)
        print(f"held-out phantom {seed}: {size}x{size}x{slices} at {spacing:.2f} mm / "
              f"{slice_spacing} mm slices: spleen Dice {dice:.4f} ({seconds:.2f} s)")
        dices.append(dice)
    print(f"mean Dice {np.mean(dices):.4f}")
    assert np.mean(dices) >= 0.9
    assert min(dices) >= 0.8


def test_dice_on_a_realistic_512_series(model: LoadedModel) -> None:
    g = ph.SliceGeometry(rows=512, columns=512, slices=48, pixel_spacing=(0.74, 0.74),
                         slice_spacing=5.0, centre=(0.0, 0.0, 35.0))
    dice, seconds = _dice(ph.Anatomy.random(12), g, model)
    print(f"held-out phantom 12: 512x512x48 at 0.74 mm / 5 mm slices: spleen Dice "
          f"{dice:.4f} ({seconds:.2f} s)")
    assert dice >= 0.9
