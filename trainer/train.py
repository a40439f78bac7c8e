"""Supervised training of a MONAI bundle's network on labelled volumes.

The reusable core of every training run of the node (the shipped demo model, the
nightly fine-tuning on donated studies): the network, the preprocessing and the
sliding-window inferer all come from the bundle's own ``configs/inference.json``, so
a model trained here sees exactly what it will see in service
(:class:`pipelines.inference.LoadedModel` applies the same preprocessing).

Recipe: each volume is preprocessed once (the bundle's transforms after loading,
i.e. orientation, spacing, intensity scaling) and its label map is resampled onto
the same model grid (nearest neighbour) and cached (``CacheDataset``); every epoch
draws random patches centred on foreground and background in equal numbers
(``RandCropByPosNegLabeld``) with a mild random intensity scale and shift; Adam,
Dice (over the whole batch, :func:`training_loss`) + cross-entropy loss, exponential
learning-rate decay per epoch. Every
``validate_every`` epochs and after the last one, the whole validation volumes are
segmented with the bundle's inferer and the Dice of each label is computed on the
model grid; the best weights (mean Dice over labels) are kept. A checkpoint after
every epoch allows a run to be resumed (the schedule, counters and best weights carry
on; the patch sampling is reseeded with ``seed + epoch``, so a resumed run is not
bitwise identical to an uninterrupted one). A run with a fixed number of epochs and
no time budget is deterministic on a given machine and library versions.

Geometry of the inputs is the pipelines' convention: arrays in (slices, rows,
columns) order with a 4x4 affine from index (k, i, j) to LPS mm.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.losses import DiceCELoss
from monai.transforms import (Compose, RandCropByPosNegLabeld, RandScaleIntensityd,
                              RandShiftIntensityd, ResampleToMatch, SpatialPadd)
from monai.transforms.transform import MapTransform
from monai.utils import set_determinism

from dicom_node.foundation.durable import open_durably
from registry.bundle import LOADING_TRANSFORMS, config_parser, find_config, read_metadata
from registry.errors import BundleError
from trainer.errors import BundleConfigError, CheckpointError, TrainingError

LOG = logging.getLogger(__name__)

#: LPS <-> RAS: flip x and y (MONAI reads affines as RAS, like NIfTI).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
IMAGE = "image"
LABEL = "label"


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class VolumeItem:
    """One labelled volume.

    Parameters
    ----------
    name : str
        An identifier for the log (no patient data: a study UID or a phantom seed).
    image : numpy.ndarray
        Intensities (HU for CT), 3-D, (slices, rows, columns).
    label : numpy.ndarray
        Integer label map of the same shape; 0 = background, 1..N the bundle's
        output channels 1..N.
    affine : numpy.ndarray
        4x4, index (k, i, j) -> LPS mm.

    Raises
    ------
    ValueError
        Shapes that do not agree, or an affine that is not invertible.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if np.ndim(self.image) != 3 or min(np.shape(self.image)) < 1:
            raise ValueError(f"image must be a 3-D array, got shape {np.shape(self.image)}")
        if np.shape(self.label) != np.shape(self.image):
            raise ValueError(f"label shape {np.shape(self.label)} differs from image shape "
                             f"{np.shape(self.image)}")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) \
                or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise ValueError("affine must be a finite invertible 4x4 matrix")


class ItemSource(Protocol):
    """Something that yields a :class:`VolumeItem` when asked (loaded lazily, once)."""

    @property
    def name(self) -> str:
        """What the item is called in logs (read only: the sources are frozen)."""
        ...

    def load(self) -> VolumeItem:
        """The labelled volume."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class LoadedItem:
    """An :class:`ItemSource` that already holds its volume."""

    item: VolumeItem
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.item.name)

    def load(self) -> VolumeItem:
        """The held volume."""
        return self.item


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingConfig:
    """Settings of one training run.

    Parameters
    ----------
    learning_rate : float
        Initial Adam learning rate.
    lr_decay : float
        Factor applied to the learning rate after every epoch (0 < lr_decay <= 1).
    max_epochs : int
        Upper bound of epochs (counted from the start of the run, including resumed ones).
    time_budget_s : float or None
        Wall-clock budget of the run, seconds: no epoch starts that is expected to
        end after it. ``None``: no limit.
    seed : int
        Seed of the network initialisation, the patch sampling and the augmentation.
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``.
    patch_size : (int, int, int)
        Training patch size on the model grid, voxels.
    samples_per_volume : int
        Patches drawn from a volume each time it is visited (half on foreground).
    volumes_per_batch : int
        Volumes per optimiser step (batch size = volumes x samples).
    validate_every : int
        Validate after every this many epochs (and after the last one).
    min_patches_per_epoch : int
        Fewest training patches of an epoch: the training volumes are visited again
        until at least this many were drawn (0: one visit of each, however few
        patches that makes). With few volumes an epoch of one visit is a handful of
        optimiser steps, and an epoch cap then stops a run long before its time budget
        (issue 27: 20 epochs of 10 volumes are 200 steps; a network from fresh weights
        needs thousands).
    intensity_augmentation : bool
        Random intensity scale (+-10 %) and shift (+-0.05) of the scaled input.

    Raises
    ------
    ValueError
        A value out of range, naming the parameter.
    """

    learning_rate: float = 1e-3
    lr_decay: float = 0.98
    max_epochs: int = 100
    time_budget_s: float | None = None
    seed: int = 0
    device: str = "cpu"
    patch_size: tuple[int, int, int] = (64, 64, 64)
    samples_per_volume: int = 4
    volumes_per_batch: int = 1
    validate_every: int = 1
    min_patches_per_epoch: int = 0
    intensity_augmentation: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.learning_rate < 1):
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if not (0 < self.lr_decay <= 1):
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s}")
        patch = tuple(int(v) for v in self.patch_size)
        if len(patch) != 3 or min(patch) < 8:
            raise ValueError(f"patch_size must be 3 sizes >= 8 voxels, got {self.patch_size}")
        object.__setattr__(self, "patch_size", patch)
        for name in ("samples_per_volume", "volumes_per_batch", "validate_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_patches_per_epoch < 0:
            raise ValueError(f"min_patches_per_epoch must be >= 0, got {self.min_patches_per_epoch}")
        try:
            dev = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r} is not a torch device") from exc
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingResult:
    """What a training run achieved.

    Parameters
    ----------
    label_names : tuple of str
        The bundle's labels (background excluded), in channel order 1..N.
    best_dice : tuple of float
        Validation Dice of each label with the kept weights (model grid); empty
        without validation volumes.
    best_epoch : int
        Epoch (1-based) whose weights were kept.
    epochs : int
        Epochs completed (including resumed ones).
    seconds : float
        Wall time of the training itself (including resumed runs), s; the caching
        of the volumes is not included.
    samples : int
        Training patches seen.
    samples_per_s : float
        ``samples / seconds`` of the optimisation (without validation), patches/s.
    stopped_by : str
        ``"epochs"`` or ``"time budget"``.
    weights : pathlib.Path
        Where the kept weights (a state dict) were written.
    """

    label_names: tuple[str, ...]
    best_dice: tuple[float, ...]
    best_epoch: int
    epochs: int
    seconds: float
    samples: int
    samples_per_s: float
    stopped_by: str
    weights: Path

    def __post_init__(self) -> None:
        if self.best_dice and len(self.best_dice) != len(self.label_names):
            raise ValueError("best_dice needs one value per label")
        if any(not 0 <= d <= 1 for d in self.best_dice):
            raise ValueError(f"best_dice values must be in [0, 1], got {self.best_dice}")
        if self.stopped_by not in ("epochs", "time budget"):
            raise ValueError(f"stopped_by must be 'epochs' or 'time budget', got {self.stopped_by!r}")
        if self.epochs < 0 or self.samples < 0 or self.seconds < 0:
            raise ValueError("epochs, samples and seconds must be >= 0")

    @property
    def mean_dice(self) -> float:
        """Mean of :attr:`best_dice` (nan without validation)."""
        return float(np.mean(self.best_dice)) if self.best_dice else math.nan

    def dice_by_label(self) -> dict[str, float]:
        """``{label name: best Dice}``."""
        return dict(zip(self.label_names, self.best_dice))


class TrainableBundle:
    """The parts of a bundle that training needs, read from its inference config.

    Parameters
    ----------
    bundle_dir : pathlib.Path or str
        A MONAI bundle directory (``configs/inference.json`` and
        ``configs/metadata.json``; ``models/model.pt`` is optional here).

    Raises
    ------
    BundleConfigError
        Missing or unparsable configs, no ``network_def``, preprocessing, inferer
        or label names.
    """

    def __init__(self, bundle_dir: Path | str) -> None:
        self.root = Path(bundle_dir).resolve()
        meta_file = self.root / "configs" / "metadata.json"
        try:  # read as the registry reads a bundle it imports (one reader, its checks)
            self.config_file = find_config(self.root)
            self.metadata: dict[str, Any] = read_metadata(meta_file)
            parser = config_parser(self.root, meta_file, self.config_file)
        except BundleError as exc:
            raise BundleConfigError(exc.path, f"{exc.problem}; {exc.remedy}") from exc
        self._parser = parser
        self.image_key = str(parser.get("image_key", IMAGE))
        key = "network_def" if "network_def" in parser else "network"
        if key not in parser:
            raise BundleConfigError(self.config_file, "no 'network_def'")
        self._network_key = key
        pre = parser.get("preprocessing")
        if not isinstance(pre, dict) or not isinstance(pre.get("transforms"), list):
            raise BundleConfigError(self.config_file, "no 'preprocessing' Compose with transforms")
        keep = [i for i, t in enumerate(pre["transforms"])
                if str(t.get("_target_", "") if isinstance(t, dict) else "").rsplit(".", 1)[-1]
                not in LOADING_TRANSFORMS]
        parser["_trainer_preprocessing"] = {
            "_target_": "Compose", "transforms": [f"@preprocessing#transforms#{i}" for i in keep]}
        if "inferer" not in parser:
            raise BundleConfigError(self.config_file, "no 'inferer'")
        outputs = self.metadata.get("network_data_format", {}).get("outputs", {}) or {}
        out = outputs.get("pred") or (next(iter(outputs.values())) if outputs else {})
        channel_def = out.get("channel_def") if isinstance(out, dict) else None
        if not isinstance(channel_def, dict) or len(channel_def) < 2:
            raise BundleConfigError(meta_file, "no network_data_format.outputs.pred.channel_def "
                                    "naming at least background and one label")
        names = {int(k): str(v) for k, v in channel_def.items()}
        self.label_names = tuple(names[i] for i in range(1, len(names)))
        self.num_classes = len(names)

    def network(self) -> torch.nn.Module:
        """A freshly built (randomly initialised) network of ``network_def``.

        Raises
        ------
        BundleConfigError
            If the network cannot be built.
        """
        try:
            net = self._parser.get_parsed_content(self._network_key, lazy=False)
        except Exception as exc:  # noqa: BLE001
            raise BundleConfigError(self.config_file, f"network cannot be built ({exc})") from exc
        if not isinstance(net, torch.nn.Module):
            raise BundleConfigError(self.config_file, f"network_def builds a {type(net).__name__}")
        return net

    def preprocessing(self) -> Compose:
        """A fresh Compose of the bundle's preprocessing after loading/channel-first."""
        return self._parser.get_parsed_content("_trainer_preprocessing", lazy=False)

    def inferer(self) -> Any:
        """A fresh instance of the bundle's inferer."""
        return self._parser.get_parsed_content("inferer", lazy=False)


class _PreprocessPair(MapTransform):
    """Loads an item source and brings image and label onto the model grid."""

    def __init__(self, sources: Sequence[ItemSource], pre: Compose, image_key: str) -> None:
        super().__init__(keys=["source"])
        self.sources = list(sources)
        self.pre = pre
        self.image_key = image_key
        self.resample = ResampleToMatch(mode="nearest", padding_mode="zeros")

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        item = self.sources[int(data["source"])].load()
        ras = torch.as_tensor(LPS_TO_RAS @ np.asarray(item.affine, np.float64), dtype=torch.float64)
        meta = {"space": "RAS", "original_channel_dim": "no_channel"}
        img = MetaTensor(torch.from_numpy(np.ascontiguousarray(item.image, dtype=np.float32))[None],
                         affine=ras, meta=dict(meta))
        lab: torch.Tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(item.label, dtype=np.float32))[None],
                         affine=ras.clone(), meta=dict(meta))
        img = self.pre({self.image_key: img})[self.image_key]
        lab = self.resample(lab, img_dst=img)
        # plain tensors: the cache holds no transform history (nothing is inverted here)
        return {IMAGE: torch.as_tensor(img).float().contiguous(),
                LABEL: torch.round(torch.as_tensor(lab)).to(torch.uint8).contiguous(),
                "name": item.name}


def _dice_per_label(pred: torch.Tensor, truth: torch.Tensor, n_labels: int) -> list[float]:
    """Dice of labels 1..n_labels between two integer maps (1 when both are empty)."""
    out = []
    for value in range(1, n_labels + 1):
        p, t = pred == value, truth == value
        denom = int(p.sum()) + int(t.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out


def _save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` through the node's durable write (a crash leaves the old file)."""
    with open_durably(path) as fh:
        torch.save(obj, fh)


def train(bundle_dir: Path | str, train_items: Sequence[ItemSource],
          val_items: Sequence[ItemSource], config: TrainingConfig, *, weights_out: Path | str,
          checkpoint: Path | str | None = None, init_weights: Path | str | None = None
          ) -> TrainingResult:
    """Train the bundle's network on labelled volumes.

    Parameters
    ----------
    bundle_dir : pathlib.Path or str
        The bundle whose ``network_def``, preprocessing and inferer are used.
    train_items, val_items : sequence of ItemSource
        Training and validation volumes (split by patient by the caller). Each is
        loaded once and cached on the model grid.
    config : TrainingConfig
    weights_out : pathlib.Path or str
        Where the kept weights are written (``torch.save`` of the state dict; a
        bundle's ``models/model.pt``). Written after every improvement.
    checkpoint : pathlib.Path or str, optional
        Written after every epoch (network, optimiser, scheduler, counters, best
        weights); when the file exists at the start, the run resumes from it.
    init_weights : pathlib.Path or str, optional
        A state dict to start from (fine-tuning), e.g. the active version's
        ``models/model.pt``; ignored when resuming from a checkpoint.

    Returns
    -------
    TrainingResult

    Raises
    ------
    TrainingError
        No training items, a label outside the bundle's channels, a loss that is
        not finite, or a device that is not available.
    BundleConfigError
        If the bundle cannot be read for training.
    CheckpointError
        If the checkpoint or the initial weights do not fit the network.
    """
    if not train_items:
        raise TrainingError("no training items")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {config.device} asked for, but CUDA is not available")
    bundle = TrainableBundle(bundle_dir)
    weights_out = Path(weights_out)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    device = torch.device(config.device)
    set_determinism(seed=config.seed)
    net = bundle.network().to(device)
    if init_weights is not None and not (ckpt_path and ckpt_path.is_file()):
        _load_initial_weights(net, Path(init_weights), device)
    data = _cache_volumes(bundle, train_items, val_items, config)
    run = _Run(net=net, bundle=bundle, data=data, device=device, loss_fn=training_loss(),
               inferer=bundle.inferer())
    run.optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    run.scheduler = torch.optim.lr_scheduler.ExponentialLR(run.optimizer, gamma=config.lr_decay)
    if ckpt_path is not None and ckpt_path.is_file():
        run.resume(ckpt_path, config)

    start = time.perf_counter()
    stopped_by = _run_epochs(run, config, weights_out, ckpt_path, start)
    run.validate_last()
    if run.best_state is None:
        raise TrainingError(f"no epoch completed within the time budget of "
                            f"{config.time_budget_s} s")
    _save_atomic(run.best_state, weights_out)
    result = TrainingResult(label_names=bundle.label_names, best_dice=run.best_dice,
                            best_epoch=run.best_epoch, epochs=run.epoch,
                            seconds=run.wall_before + time.perf_counter() - start,
                            samples=run.samples, samples_per_s=run.samples / run.train_seconds
                            if run.train_seconds else 0.0,
                            stopped_by=stopped_by, weights=weights_out)
    LOG.info("training done (%s): %d epochs, %.0f s, %.2f samples/s, best val Dice %s at "
             "epoch %d -> %s", stopped_by, result.epochs, result.seconds, result.samples_per_s,
             result.dice_by_label(), run.best_epoch, weights_out)
    return result


def _run_epochs(run: _Run, config: TrainingConfig, weights_out: Path, ckpt_path: Path | None,
                start: float) -> str:
    """Train epoch after epoch until ``max_epochs`` or the time budget (an epoch that
    would overrun it is not started); returns what stopped it."""
    stopped_by = "epochs"
    last_epoch_s = 0.0
    while run.epoch < config.max_epochs:
        elapsed = run.wall_before + time.perf_counter() - start
        if config.time_budget_s is not None and elapsed + last_epoch_s > config.time_budget_s:
            stopped_by = "time budget"
            break
        t_epoch = time.perf_counter()
        loss, n_epoch = run.fit_epoch(config.min_patches_per_epoch)
        fit_s = time.perf_counter() - t_epoch
        run.train_seconds += fit_s
        dice_text = run.validate_epoch(config, weights_out)
        last_epoch_s = time.perf_counter() - t_epoch
        wall = run.wall_before + time.perf_counter() - start
        left = (f"{max(0.0, config.time_budget_s - wall):.0f} s left"
                if config.time_budget_s is not None else "no time budget")
        LOG.info("epoch %d/%d: loss %.4f, val Dice %s (best %.4f at epoch %d), lr %.2e, "
                 "%.1f s/epoch, %.2f samples/s, %s", run.epoch, config.max_epochs, loss,
                 dice_text, float(np.mean(run.best_dice)) if run.best_dice else math.nan,
                 run.best_epoch, run.scheduler.get_last_lr()[0], last_epoch_s,
                 n_epoch / max(fit_s, 1e-9), left)
        if ckpt_path is not None:
            run.save_checkpoint(ckpt_path, wall)
    return stopped_by


def training_loss() -> DiceCELoss:
    """The loss of every training run: Dice + cross-entropy on softmax outputs, the Dice
    of each label taken over the *whole batch* of patches (``batch=True``).

    A batch holds patches centred on foreground and on background in equal numbers
    (``RandCropByPosNegLabeld``). With a Dice per patch, a background patch's label Dice
    is ~0 whatever it predicts (nothing to overlap, smoothing 1e-5), so its false
    positives cost nothing but the cross-entropy, weak beside the Dice of the foreground
    patches: a network trained from fresh weights learned "every organ of the spleen's
    density is spleen" and never got off the ground on whole volumes (issue 27). Over
    the batch, those false positives enlarge the label's denominator like any other.
    """
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)


def _load_initial_weights(net: torch.nn.Module, path: Path, device: torch.device) -> None:
    """Start from a state dict (fine-tuning).

    Raises
    ------
    CheckpointError
        If the file is not a state dict of this network.
    """
    try:
        net.load_state_dict(torch.load(str(path), map_location=device, weights_only=True))
    except Exception as exc:  # noqa: BLE001 - wrong file or wrong network
        raise CheckpointError(path, f"does not fit the network ({exc})") from exc
    LOG.info("starting from weights %s", path)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Volumes:
    """The volumes cached on the model grid, and the seeded loader over the training ones."""

    train_ds: CacheDataset
    val_ds: CacheDataset
    train_compose: Compose
    generator: torch.Generator
    loader: DataLoader


def _cache_volumes(bundle: TrainableBundle, train_items: Sequence[ItemSource],
                   val_items: Sequence[ItemSource], config: TrainingConfig) -> _Volumes:
    """Load every item once onto the model grid; training ones get random patches.

    Raises
    ------
    TrainingError
        If a label map holds a value beyond the bundle's channels.
    """
    t_cache = time.perf_counter()
    pair = _PreprocessPair(list(train_items) + list(val_items), bundle.preprocessing(),
                           bundle.image_key)
    n_train = len(train_items)
    train_tf: list[Any] = [
        pair,
        SpatialPadd(keys=[IMAGE, LABEL], spatial_size=config.patch_size),
        RandCropByPosNegLabeld(keys=[IMAGE, LABEL], label_key=LABEL,
                               spatial_size=config.patch_size, pos=1, neg=1,
                               num_samples=config.samples_per_volume, image_key=IMAGE,
                               image_threshold=-1e9, allow_smaller=True),
    ]
    if config.intensity_augmentation:
        train_tf += [RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.5),
                     RandShiftIntensityd(keys=IMAGE, offsets=0.05, prob=0.5)]
    train_compose = Compose(train_tf)
    train_compose.set_random_state(seed=config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_ds = CacheDataset([{"source": i} for i in range(n_train)], transform=train_compose,
                                cache_rate=1.0, num_workers=1, progress=False)
        val_ds = CacheDataset([{"source": n_train + i} for i in range(len(val_items))],
                              transform=Compose([pair]), cache_rate=1.0, num_workers=1,
                              progress=False)
    for entry in list(train_ds._cache) + list(val_ds._cache):  # noqa: SLF001 - checked once
        top = int(entry[LABEL].max()) if isinstance(entry, dict) else 0
        if top >= bundle.num_classes:
            raise TrainingError(f"item {entry['name']}: label value {top} but the bundle has only "
                                f"{bundle.num_classes - 1} label(s) {bundle.label_names}")
    LOG.info("cached %d training and %d validation volumes on the model grid in %.1f s "
             "(e.g. %s voxels)", n_train, len(val_items), time.perf_counter() - t_cache,
             tuple(train_ds._cache[0][IMAGE].shape[1:]))  # noqa: SLF001
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train_ds, batch_size=config.volumes_per_batch, shuffle=True,
                        num_workers=0, generator=generator)
    return _Volumes(train_ds=train_ds, val_ds=val_ds, train_compose=train_compose,
                    generator=generator, loader=loader)


@dataclass(kw_only=True, slots=True)
class _Run:
    """One training run in progress: the network, its optimiser and the counters a
    checkpoint keeps (mutable on purpose: it is the loop's state, private to :func:`train`)."""

    net: torch.nn.Module
    bundle: TrainableBundle
    data: _Volumes
    device: torch.device
    loss_fn: Any
    inferer: Any
    optimizer: Any = None
    scheduler: Any = None
    epoch: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    wall_before: float = 0.0
    best_dice: tuple[float, ...] = ()
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    validated_epoch: int = 0

    def resume(self, ckpt_path: Path, config: TrainingConfig) -> None:
        """Continue from a checkpoint (network, optimiser, scheduler, counters, best weights).

        Raises
        ------
        CheckpointError
            If the checkpoint does not fit this network or misses a counter.
        """
        try:
            ck = torch.load(str(ckpt_path), map_location=self.device, weights_only=True)
            self.net.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.epoch, self.samples = int(ck["epoch"]), int(ck["samples"])
            self.train_seconds = float(ck["train_seconds"])
            self.wall_before = float(ck["wall_seconds"])
            self.best_dice = tuple(float(v) for v in ck["best_dice"])
            self.best_epoch = int(ck["best_epoch"])
            self.best_state = ck["best_state"]
            self.validated_epoch = int(ck["validated_epoch"])
            self.data.generator.manual_seed(config.seed + self.epoch)
            self.data.train_compose.set_random_state(seed=config.seed + self.epoch)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(ckpt_path, f"cannot be resumed ({exc})") from exc
        LOG.info("resumed from %s after epoch %d (best mean Dice %.4f at epoch %d)", ckpt_path,
                 self.epoch, float(np.mean(self.best_dice)) if self.best_dice else math.nan,
                 self.best_epoch)

    def save_checkpoint(self, ckpt_path: Path, wall: float) -> None:
        """Write what :meth:`resume` reads (durably: a crash leaves the previous one)."""
        _save_atomic({"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                      "samples": self.samples, "train_seconds": self.train_seconds,
                      "wall_seconds": wall, "best_dice": list(self.best_dice),
                      "best_epoch": self.best_epoch, "best_state": self.best_state,
                      "validated_epoch": self.validated_epoch}, ckpt_path)

    def fit_epoch(self, min_patches: int = 0) -> tuple[float, int]:
        """One pass over the training volumes, more until ``min_patches`` patches were
        drawn; returns the mean loss and the patches seen.

        Raises
        ------
        TrainingError
            If the loss is not finite.
        """
        self.net.train()
        losses: list[float] = []
        n_epoch = 0
        while True:
            n_pass = self._fit_pass(losses)
            n_epoch += n_pass
            if n_pass == 0 or n_epoch >= min_patches:
                break
        self.scheduler.step()
        self.epoch += 1
        self.samples += n_epoch
        return (float(np.mean(losses)) if losses else math.nan), n_epoch

    def _fit_pass(self, losses: list[float]) -> int:
        """One visit of every training volume (appending each step's loss); the patches seen."""
        n_pass = 0
        for batch in self.data.loader:
            x = batch[IMAGE].to(self.device)
            y = batch[LABEL].to(self.device).long()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.net(x), y)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is not finite at epoch {self.epoch + 1}; lower the "
                                    f"learning rate (now {self.scheduler.get_last_lr()[0]:.2e})")
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
            n_pass += int(x.shape[0])
        return n_pass

    def validate_epoch(self, config: TrainingConfig, weights_out: Path) -> str:
        """Validate when due; keep (and write) the weights when they improved.

        Returns the per-label Dice as text for the log (``no validation`` otherwise).
        """
        val_ds = self.data.val_ds
        if val_ds and self.epoch % config.validate_every == 0:
            dice = self._dice()
            self.validated_epoch = self.epoch
            if not self.best_dice or np.mean(dice) > np.mean(self.best_dice):
                self.best_dice, self.best_epoch = tuple(dice), self.epoch
                self.best_state = _cpu_state(self.net)
                _save_atomic(self.best_state, weights_out)
            return ", ".join(f"{n} {d:.4f}" for n, d in zip(self.bundle.label_names, dice))
        if not val_ds:
            self.best_epoch, self.best_state = self.epoch, _cpu_state(self.net)
        return "no validation"

    def validate_last(self) -> None:
        """Validate the last epoch if it was not, however the run ended (epochs or time),
        so that a run of a fixed number of epochs reproduces a time-limited one."""
        if not self.data.val_ds or not 0 < self.epoch != self.validated_epoch:
            return
        dice = self._dice()
        LOG.info("epoch %d (last): val Dice %s", self.epoch,
                 ", ".join(f"{n} {d:.4f}" for n, d in zip(self.bundle.label_names, dice)))
        if not self.best_dice or np.mean(dice) > np.mean(self.best_dice):
            self.best_dice, self.best_epoch = tuple(dice), self.epoch
            self.best_state = _cpu_state(self.net)

    def _dice(self) -> list[float]:
        return _validate(self.net, self.inferer, self.data.val_ds, self.bundle.num_classes - 1,
                         self.device)


def _cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the network's state dict."""
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _validate(net: torch.nn.Module, inferer: Any, val_ds: CacheDataset, n_labels: int,
              device: torch.device) -> list[float]:
    """Mean Dice per label over the validation volumes, on the model grid."""
    net.eval()
    per_item = []
    with torch.inference_mode():
        for entry in (val_ds[i] for i in range(len(val_ds))):  # a Dataset: indexed, not iterable
            logits = inferer(entry[IMAGE][None].to(device), net)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            pred = torch.argmax(logits[0], dim=0).cpu()
            per_item.append(_dice_per_label(pred, entry[LABEL][0].long(), n_labels))
    return [float(v) for v in np.mean(np.asarray(per_item), axis=0)]
