"""Training datasets of a task, built from the archive at build time (DESIGN decision 6).

A series is in a task's dataset when, *at the moment the dataset is built*,

* its patient donates (consent is read now: a revocation before this moment removes
  the patient, whatever was trained before),
* it has a current label for the task (the newest recorded for it,
  :mod:`twin_archive.labels`: a SEG is a label of the tasks whose labels it names),
* it matches the task's selection rules (:func:`pipelines.selection.matches`).

The split is by patient, never by image (DESIGN decision 7), and deterministic: the
patients are ordered by ``sha256(salt:patient_key)`` and the first
``round(fraction x patients)`` are the validation patients (80/20 by default); with at
least two patients each side gets at least one. The same patients give the same
split, whatever order the archive lists them in.

The manifest (:meth:`TrainingSet.manifest`) names every study, series and label
version with their SHA-256 hashes; it is stored with the model version it trained
(registry) and, per patient, in the twin (:mod:`twin_archive.training_use`).
Patient keys are the archive's keyed hashes, not Patient IDs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom

from dicom_node.foundation.clock import utc_now
from pipelines.multiframe import VolumeChoice
from pipelines.selection import SelectionRules, matches
from pipelines.volume import load_series
from trainer.labelmaps import mask_from_file, mask_from_seg
from twin_archive import Archive
from twin_archive.labels import SOURCE_SEG, Label, LabelStore
from twin_archive.training_use import TrainingUse

LOG = logging.getLogger(__name__)

SPLIT_TRAIN = "train"
SPLIT_VALIDATION = "validation"


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetItem:
    """One labelled series of a dataset.

    Parameters
    ----------
    patient_key, study_uid, series_uid : str
        The series and its twin (keyed hash, no Patient ID).
    case_id : str
        Pseudonymous case identifier (``case_<12 hex>``, from the series UID and the
        salt): used in exports and logs instead of any identifier.
    split : str
        ``train`` or ``validation``.
    label : Label
        The label version used.
    image_sha256 : str
        SHA-256 over the sorted SHA-256s of the series' current instances.
    instances : int
        Number of instances.
    """

    patient_key: str
    study_uid: str
    series_uid: str
    case_id: str
    split: str
    label: Label
    image_sha256: str
    instances: int

    def __post_init__(self) -> None:
        if self.split not in (SPLIT_TRAIN, SPLIT_VALIDATION):
            raise ValueError(f"split must be 'train' or 'validation', got {self.split!r}")

    def to_dict(self) -> dict[str, Any]:
        """The item as the manifest records it."""
        return {
            "case_id": self.case_id, "patient_key": self.patient_key,
            "study_uid": self.study_uid, "series_uid": self.series_uid, "split": self.split,
            "instances": self.instances, "image_sha256": self.image_sha256,
            "label": {"id": self.label.id, "version": self.label.version,
                      "source": self.label.source, "sha256": self.label.sha256,
                      "segments": list(self.label.segments),
                      "seg_sop_instance_uid": self.label.seg_sop_instance_uid,
                      "recorded_at": self.label.recorded_at},
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingSet:
    """A task's dataset as built at one moment.

    Parameters
    ----------
    task : str
    built_at : str
        ISO 8601, UTC.
    items : tuple of DatasetItem
    validation_fraction : float
    salt : str
        Salt of the patient hash (default: the task name).
    excluded : tuple of (str, str)
        Labelled, donated series left out, with the reason (series UID, reason).
    volume : VolumeChoice
        Which volume of a multi-frame series the task's rules choose (the items are
        read with it, :func:`load_case`).
    """

    task: str
    built_at: str
    items: tuple[DatasetItem, ...]
    validation_fraction: float
    salt: str
    excluded: tuple[tuple[str, str], ...] = ()
    volume: VolumeChoice = field(default_factory=VolumeChoice)

    @property
    def train(self) -> tuple[DatasetItem, ...]:
        """Training items."""
        return tuple(i for i in self.items if i.split == SPLIT_TRAIN)

    @property
    def validation(self) -> tuple[DatasetItem, ...]:
        """Validation items."""
        return tuple(i for i in self.items if i.split == SPLIT_VALIDATION)

    @property
    def patients(self) -> tuple[str, ...]:
        """Patient keys in the dataset, sorted."""
        return tuple(sorted({i.patient_key for i in self.items}))

    @property
    def validation_set_id(self) -> str:
        """Identity of the validation set: the same patients, series and label versions
        give the same id (``val-<16 hex>``), so two versions are compared fairly."""
        text = "\n".join(sorted(f"{i.series_uid}:{i.label.sha256}" for i in self.validation))
        return "val-" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def manifest(self) -> dict[str, Any]:
        """JSON-ready manifest: studies, series, label versions, hashes, split."""
        return {
            "task": self.task, "built_at": self.built_at,
            "split": {"by": "patient",
                      "method": "lowest round(fraction * n) of sha256(salt:patient_key)",
                      "validation_fraction": self.validation_fraction, "salt": self.salt},
            "validation_set": self.validation_set_id,
            "patients": len(self.patients),
            "studies": sorted({i.study_uid for i in self.items}),
            "series": [i.to_dict() for i in self.items],
            "excluded": [{"series_uid": s, "reason": r} for s, r in self.excluded],
        }

    def manifest_key(self) -> str:
        """SHA-256 over the items (series, label version, image content, split): equal for
        datasets that would train the same model."""
        text = "\n".join(sorted(f"{i.series_uid}:{i.label.sha256}:{i.image_sha256}:{i.split}"
                                 for i in self.items))
        return hashlib.sha256(text.encode()).hexdigest()

    def manifest_json(self) -> str:
        """The manifest as canonical JSON text."""
        return json.dumps(self.manifest(), sort_keys=True)

    def uses(self) -> list[TrainingUse]:
        """The twin-side records of this dataset (one per series)."""
        return [TrainingUse(patient_key=i.patient_key, study_uid=i.study_uid,
                            series_uid=i.series_uid, label_id=i.label.id, split=i.split)
                for i in self.items]


def patient_fraction(salt: str, patient_key: str) -> float:
    """Deterministic position of a patient in [0, 1) (first 52 bits of a SHA-256)."""
    digest = hashlib.sha256(f"{salt}:{patient_key}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 12) / float(1 << 52)


def split_patients(patient_keys: Sequence[str], *, validation_fraction: float, salt: str
                   ) -> dict[str, str]:
    """Assign each patient to ``train`` or ``validation`` (see the module docstring).

    Raises
    ------
    ValueError
        If ``validation_fraction`` is not in (0, 1).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    keys = sorted(set(patient_keys), key=lambda k: (patient_fraction(salt, k), k))
    n_val = round(validation_fraction * len(keys))
    if len(keys) >= 2:
        n_val = min(max(n_val, 1), len(keys) - 1)
    return {k: SPLIT_VALIDATION if i < n_val else SPLIT_TRAIN for i, k in enumerate(keys)}


def case_id(salt: str, series_uid: str) -> str:
    """Pseudonymous case id of a series (no UID, no name, no date in it)."""
    return "case_" + hashlib.sha256(f"case:{salt}:{series_uid}".encode()).hexdigest()[:12]


def build_dataset(archive: Archive, labels: LabelStore, task: str, rules: SelectionRules, *,
                  validation_fraction: float = 0.2, salt: str | None = None) -> TrainingSet:
    """Build ``task``'s dataset from the archive as it is now.

    Parameters
    ----------
    archive : twin_archive.Archive
    labels : twin_archive.labels.LabelStore
    task : str
    rules : SelectionRules
        The task's selection rules (the pipeline's).
    validation_fraction : float
        Share of patients held out for validation (default 0.2).
    salt : str, optional
        Salt of the patient split (default ``task``).

    Returns
    -------
    TrainingSet
        Possibly empty; ``excluded`` says which labelled donated series were left out.

    Raises
    ------
    ValueError
        If ``validation_fraction`` is not in (0, 1).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    salt = salt or task
    chosen: list[tuple[Label, str, int]] = []
    excluded: list[tuple[str, str]] = []
    for label in labels.donated_current(task):
        files = archive.twins.series_files(label.series_uid)
        if not files:
            excluded.append((label.series_uid, "no current instances"))
            continue
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        verdict = matches(rules, headers)
        if not verdict.matched:
            excluded.append((label.series_uid, verdict.reason))
            continue
        sha, n = archive.twins.series_digest(label.series_uid)
        chosen.append((label, sha, n))
    split = split_patients([lab.patient_key for lab, _, _ in chosen],
                           validation_fraction=validation_fraction, salt=salt)
    items = tuple(
        DatasetItem(patient_key=lab.patient_key, study_uid=lab.study_uid,
                    series_uid=lab.series_uid, case_id=case_id(salt, lab.series_uid),
                    split=split[lab.patient_key], label=lab, image_sha256=sha, instances=n)
        for lab, sha, n in chosen)
    ts = TrainingSet(task=task, built_at=utc_now().isoformat(timespec="seconds"),
                     items=items, validation_fraction=validation_fraction, salt=salt,
                     excluded=tuple(excluded), volume=rules.volume)
    LOG.info("dataset %s: %d series of %d donating patient(s) (%d train, %d validation); "
             "%d labelled series left out", task, len(items), len(ts.patients), len(ts.train),
             len(ts.validation), len(excluded))
    return ts


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class LoadedCase:
    """One dataset item read into memory: HU image, label map, affine (k, i, j) -> LPS mm."""

    item: DatasetItem
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def load_case(archive: Archive, item: DatasetItem, model_labels: Mapping[int, str], *,
              choice: VolumeChoice | None = None) -> LoadedCase:
    """Read a dataset item's image and its label map onto the same grid.

    ``choice`` chooses the volume of a multi-frame series (the dataset's
    :attr:`TrainingSet.volume`; default: the first temporal position and echo,
    ORIGINAL magnitude).

    Raises
    ------
    SeriesGeometryError
        If the series cannot be stacked (:func:`pipelines.volume.load_series`).
    LabelGeometryError, LabelContentError
        If the label does not fit the series or names none of the model's labels.
    """
    volume = load_series(archive.twins.series_files(item.series_uid), volume=choice)
    if item.label.source == SOURCE_SEG:
        mask = mask_from_seg(item.label.path, volume, model_labels)
    else:
        mask = mask_from_file(item.label.path, volume, model_labels, item.label.segments)
    return LoadedCase(item=item, image=np.asarray(volume.array, dtype=np.float32),
                      label=mask, affine=np.array(volume.affine, dtype=np.float64))
