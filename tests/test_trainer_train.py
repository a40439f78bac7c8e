"""trainer.train: the generic training core on tiny phantom volumes (seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import phantom as ph
from registry.bundle import open_bundle
from trainer.demo_model import render_volume, write_configs
from trainer.errors import CheckpointError, TrainingError
from trainer.train import LoadedItem, TrainingConfig, TrainingResult, VolumeItem, train


def _item(seed: int, label_of_spleen: int = 1) -> LoadedItem:
    g = ph.SliceGeometry(rows=48, columns=48, slices=20, pixel_spacing=(8.0, 8.0),
                         slice_spacing=8.0, centre=(60.0, 20.0, 40.0))
    anatomy = ph.Anatomy.random(seed)
    hu, labels = render_volume(anatomy, g)
    return LoadedItem(item=VolumeItem(name=f"tiny-{seed}", image=hu,
                                      label=(labels == 1).astype(np.uint8) * label_of_spleen,
                                      affine=g.affine))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    write_configs(out)
    return out


def test_train_writes_a_loadable_bundle_and_resumes(bundle: Path, tmp_path: Path) -> None:
    cfg = dict(learning_rate=3e-3, seed=1, patch_size=(32, 32, 32), samples_per_volume=2)
    items, val = [_item(21), _item(22)], [_item(23)]
    ckpt = tmp_path / "ckpt.pt"
    weights = bundle / "models" / "model.pt"
    first = train(bundle, items, val, TrainingConfig(max_epochs=1, **cfg), weights_out=weights,
                  checkpoint=ckpt)
    assert isinstance(first, TrainingResult)
    assert first.epochs == 1 and first.samples == 4 and first.stopped_by == "epochs"
    assert first.label_names == ("spleen",) and len(first.best_dice) == 1
    assert 0 <= first.mean_dice <= 1 and first.samples_per_s > 0
    assert ckpt.is_file() and weights.is_file()
    resumed = train(bundle, items, val, TrainingConfig(max_epochs=2, **cfg), weights_out=weights,
                    checkpoint=ckpt)
    assert resumed.epochs == 2 and resumed.samples == 8
    assert resumed.seconds >= first.seconds
    assert resumed.mean_dice >= first.mean_dice  # best weights are kept, never worse
    open_bundle(bundle)  # the written weights fit the bundle's network
    # a checkpoint of another network is refused with its path
    torch.save({"model": {"nope": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt"):
        train(bundle, items, val, TrainingConfig(max_epochs=3, **cfg), weights_out=weights,
              checkpoint=tmp_path / "bad.pt")


def test_time_budget_and_refusals(bundle: Path, tmp_path: Path) -> None:
    cfg = TrainingConfig(max_epochs=1_000_000, time_budget_s=1.0, lr_decay=1.0,
                         patch_size=(16, 16, 16), samples_per_volume=1)
    result = train(bundle, [_item(24)], [], cfg, weights_out=tmp_path / "w.pt")
    assert result.stopped_by == "time budget" and 1 <= result.epochs < cfg.max_epochs
    assert result.best_dice == () and np.isnan(result.mean_dice)
    with pytest.raises(TrainingError, match="no training items"):
        train(bundle, [], [], cfg, weights_out=tmp_path / "w.pt")
    with pytest.raises(TrainingError, match="label value 2"):
        train(bundle, [_item(24, label_of_spleen=2)], [], cfg, weights_out=tmp_path / "w.pt")
    assert issubclass(TrainingError, RuntimeError)


def test_config_and_items_are_validated() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        TrainingConfig(learning_rate=0)
    with pytest.raises(ValueError, match="patch_size"):
        TrainingConfig(patch_size=(4, 64, 64))
    with pytest.raises(ValueError, match="device"):
        TrainingConfig(device="tpu")
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainingConfig(time_budget_s=0)
    with pytest.raises(ValueError, match="label shape"):
        VolumeItem(name="x", image=np.zeros((2, 3, 4)), label=np.zeros((2, 3, 3)),
                   affine=np.eye(4))
    with pytest.raises(ValueError, match="affine"):
        VolumeItem(name="x", image=np.zeros((2, 3, 4)), label=np.zeros((2, 3, 4)),
                   affine=np.zeros((4, 4)))


def test_false_positives_in_a_background_patch_cost_dice_not_only_cross_entropy() -> None:
    """Issue 27: half of every batch is background patches (RandCropByPosNegLabeld). With a
    Dice per patch, a background patch's spleen Dice is ~0 whatever is predicted there, so
    a network trained from fresh weights learned to call every organ of the spleen's
    density spleen; the Dice over the batch counts those false positives."""
    from trainer.train import training_loss

    truth = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    truth[0, 0, 4:12, 4:12, 4:12] = 1                    # a foreground patch, then a background one
    confident = torch.cat([truth == 0, truth == 1], dim=1).float() * 8.0  # logits, right everywhere
    false_pos = confident.clone()
    false_pos[1, 1, :8], false_pos[1, 0, :8] = 8.0, 0.0  # half of the background patch called spleen
    dice = training_loss().dice                          # the Dice term, on softmax as in training
    gained = float(dice(false_pos, truth)) - float(dice(confident, truth))
    assert gained > 0.2, f"false positives in a background patch raise the Dice loss by {gained:.3f}"


def test_an_epoch_of_few_volumes_draws_at_least_min_patches_per_epoch(bundle: Path,
                                                                     tmp_path: Path) -> None:
    """Issue 27: an epoch of one visit per volume is a handful of steps with few labelled
    series, so an epoch cap stopped a de novo run after a few hundred steps whatever its
    budget; an epoch now draws at least ``min_patches_per_epoch`` patches."""
    cfg = dict(max_epochs=2, lr_decay=1.0, patch_size=(16, 16, 16), samples_per_volume=1)
    one_visit = train(bundle, [_item(24), _item(25)], [], TrainingConfig(**cfg),
                      weights_out=tmp_path / "a.pt")
    assert one_visit.samples == 2 * 2                    # 2 epochs x 2 volumes x 1 patch
    longer = train(bundle, [_item(24), _item(25)], [],
                   TrainingConfig(min_patches_per_epoch=5, **cfg), weights_out=tmp_path / "b.pt")
    assert longer.epochs == 2 and longer.samples == 2 * 6  # 3 visits of 2 volumes per epoch
    with pytest.raises(ValueError, match="min_patches_per_epoch"):
        TrainingConfig(min_patches_per_epoch=-1)
