"""Test helpers for the registry tests: the real Model Zoo spleen bundle configs with
randomly initialised (seeded) weights, and small phantom volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import UNet

from pipelines import phantom as ph

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "monai-bundles" / \
    "spleen_ct_segmentation"
if not REFERENCE.is_dir():  # the checkout may sit elsewhere; the shared folder does not move
    REFERENCE = Path("/work/shared/reference/monai-bundles/spleen_ct_segmentation")


def spleen_bundle(dest: Path, seed: int = 0) -> Path:
    """Copy the real spleen bundle configs to ``dest`` and save seeded random weights
    as ``models/model.pt`` (the network the bundle's ``network_def`` describes)."""
    shutil.copytree(REFERENCE, dest)
    (dest / "models").mkdir()
    torch.manual_seed(seed)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
               strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    torch.save(net.state_dict(), dest / "models" / "model.pt")
    return dest


def edit_config(bundle: Path, name: str, edit: object) -> None:
    """Apply ``edit(dict)`` to ``configs/<name>`` in place."""
    path = bundle / "configs" / name
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data, indent=1))


def affine_of(g: ph.SliceGeometry) -> np.ndarray:
    """(k, i, j) -> LPS mm affine of a phantom slice geometry."""
    a = np.eye(4)
    a[:3, 0] = g.normal * g.slice_spacing
    a[:3, 1] = np.asarray(g.column_direction) * g.pixel_spacing[0]
    a[:3, 2] = np.asarray(g.row_direction) * g.pixel_spacing[1]
    a[:3, 3] = g.position(0)
    return a


def phantom_volume(g: ph.SliceGeometry, seed: int = 3) -> tuple[np.ndarray, np.ndarray, ph.Anatomy]:
    """HU volume (slices, rows, columns), its affine and the anatomy."""
    anatomy = ph.Anatomy.random(seed)
    rng = np.random.default_rng(seed)
    hu = np.stack([ph.render(anatomy, g, k, rng)[0] for k in range(g.slices)]).astype(np.float32)
    return hu, affine_of(g), anatomy



def organ_bundle(dest: Path, organ: str = "liver", *, seed: int = 0) -> Path:
    """A second task's bundle: the real Model Zoo spleen configs made tiny
    (:func:`learning_helpers.tiny_bundle`: 3-level UNet, 6 x 6 x 5 mm grid, seeded
    random weights) whose one output channel is named ``organ`` in ``channel_def``.
    With seed 0 its random weights mark about 2.6 L of a small phantom CT (checked by
    the tests that use it: a model that finds nothing writes nothing)."""
    from learning_helpers import tiny_bundle

    tiny_bundle(dest, seed=seed)
    edit_config(dest, "metadata.json", lambda m: m["network_data_format"]["outputs"]["pred"]
                .__setitem__("channel_def", {"0": "background", "1": organ}))
    return dest


WHOLEBODY = REFERENCE.parent / "wholeBody_ct_segmentation"


def wholebody_bundle(dest: Path, seed: int = 0, *, small: bool = False) -> Path:
    """The real Model Zoo whole-body CT bundle configs (SegResNet, 105 output channels,
    the 104 TotalSegmentator label names) with seeded random weights.

    ``small``: the same bundle shape (105 channels, its label names, its preprocessing
    and Gaussian sliding window) with a small network (init_filters 8, two levels),
    a 64^3 window and the bundle's own low-resolution switch (3 mm,
    ``displayable_configs.highres = false``), so that tests run in seconds.
    """
    from monai.networks.nets import SegResNet

    shutil.copytree(WHOLEBODY, dest, ignore=shutil.ignore_patterns("*train*", "*evaluate*",
                                                                    "*trt*", "logging.conf"))
    if small:
        def edit(cfg: dict) -> None:
            cfg["displayable_configs"]["highres"] = False
            cfg["network_def"].update(init_filters=8, blocks_down=[1, 1], blocks_up=[1])
            cfg["inferer"]["roi_size"] = [64, 64, 64]
            cfg["modelname"] = "model.pt"
        edit_config(dest, "inference.json", edit)
    cfg = json.loads((dest / "configs" / "inference.json").read_text())
    args = {k: v for k, v in cfg["network_def"].items() if not k.startswith("_")}
    torch.manual_seed(seed)
    net = SegResNet(**args)
    (dest / "models").mkdir()
    torch.save(net.state_dict(), dest / "models" / "model.pt")
    return dest
