"""Datasets out of the node: the annotation queue, and a de-identified export for a cluster.

* :func:`annotation_queue` / :func:`export_annotation_queue` - series of donating
  patients that match a task and have no label yet, written as NIfTI together with the
  current model's pre-segmentation, so that annotators correct rather than draw. This
  export stays inside the hospital: its ``queue.json`` maps each case back to the
  Patient ID and Series Instance UID that ``dicom-node labels import`` needs.
* :func:`export_decathlon` - a task's training dataset (consent read now) in the
  Medical Segmentation Decathlon layout (``dataset.json``, ``imagesTr/``,
  ``labelsTr/``), de-identified after the DICOM PS3.15 Basic Application Level
  Confidentiality Profile: no names, IDs, UIDs, dates, institution or device
  identifiers in ``dataset.json``, in file names or in NIfTI headers (``descrip``,
  ``aux_file``, ``db_name``, ``intent_name`` are blank); cases are numbered
  ``case_0001``... in a random order drawn per export. Only voxel data, voxel
  geometry (mm) and label names leave. The mapping from case to series stays in the
  node (``<data_dir>/exports/<export id>.json``), never in the export.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from dicom_node.foundation.durable import write_durably
from pipelines.inference import load_model
from pipelines.selection import NON_IMAGE_MODALITIES, SelectionRules, matches
from pipelines.volume import load_series
from registry.store import Registry
from trainer.dataset import build_dataset, case_id, load_case
from trainer.errors import TrainingError
from trainer.labelmaps import to_nifti
from twin_archive import Archive
from twin_archive.labels import LabelStore

LOG = logging.getLogger(__name__)

EXPORTS_DIR = "exports"


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueItem:
    """A series waiting for a label."""

    case_id: str
    patient_id: str
    patient_key: str
    study_uid: str
    series_uid: str
    description: str
    last_received: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready."""
        return {"case_id": self.case_id, "patient_id": self.patient_id,
                "study_uid": self.study_uid, "series_uid": self.series_uid,
                "description": self.description, "last_received": self.last_received}


def annotation_queue(archive: Archive, labels: LabelStore, task: str,
                     rules: SelectionRules) -> list[QueueItem]:
    """Donated series without a label for ``task`` that match its rules, oldest first."""
    ids = {t.patient_key: t.patient_id for t in archive.twins.list_twins()}
    out = []
    for row in labels.donated_unlabelled_series(task):
        if (row["modality"] or "").upper() in NON_IMAGE_MODALITIES:
            continue
        files = archive.twins.series_files(row["series_uid"])
        if not files:
            continue
        verdict = matches(rules, [pydicom.dcmread(p, stop_before_pixels=True) for p in files])
        if not verdict.matched:
            continue
        out.append(QueueItem(case_id=case_id(task, row["series_uid"]),
                             patient_id=ids.get(row["patient_key"], ""),
                             patient_key=row["patient_key"], study_uid=row["study_uid"],
                             series_uid=row["series_uid"], description=row["description"] or "",
                             last_received=row["last_received"]))
    return out


def export_annotation_queue(archive: Archive, labels: LabelStore, registry: Registry, task: str,
                            rules: SelectionRules, out_dir: Path) -> list[dict[str, Any]]:
    """Write each queued series as ``<case>_image.nii.gz`` and the active model's
    ``<case>_preseg.nii.gz`` (label values as the model's), plus ``queue.json``.

    Returns
    -------
    list of dict
        One entry per case (``queue.json``'s ``cases``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    items = annotation_queue(archive, labels, task, rules)
    loaded: dict[str, Any] = {}
    cases = []
    for item in items:
        files = archive.twins.series_files(item.series_uid)
        volume = load_series(files, volume=rules.volume)
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        image_name = f"{item.case_id}_image.nii.gz"
        nib.save(to_nifti(volume.array, volume.affine, dtype=np.int16), out_dir / image_name)
        entry: dict[str, Any] = {**item.to_dict(), "image": image_name}
        try:
            version = registry.resolve(task, str(head.get("Manufacturer", "") or ""),
                                       str(head.get("ManufacturerModelName", "") or ""))
        except Exception as exc:  # NoActiveModelError: export the image alone
            entry["preseg"] = None
            entry["note"] = f"no pre-segmentation: {exc}"
        else:
            if version.version not in loaded:
                loaded[version.version] = load_model(version, registry=registry)
            result = loaded[version.version].segment(volume.array, volume.affine,
                                                    modality=str(head.get("Modality", "")))
            pre_name = f"{item.case_id}_preseg.nii.gz"
            nib.save(to_nifti(result.labels, volume.affine, dtype=np.uint8), out_dir / pre_name)
            entry.update(preseg=pre_name, model_version=version.version,
                         labels={str(k): v for k, v in version.label_names.items()})
        cases.append(entry)
    (out_dir / "queue.json").write_text(json.dumps({
        "task": task, "cases": cases,
        "import": "dicom-node labels import PATIENT_ID SERIES_UID <corrected mask>.nii.gz "
                  "--label NAME (one --label per mask value)"}, indent=2))
    LOG.info("annotation queue of %s: %d case(s) written to %s", task, len(cases), out_dir)
    return cases


def _blank_header(img: nib.Nifti1Image) -> nib.Nifti1Image:
    hdr = img.header
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        hdr[field] = b""
    return img


def export_decathlon(archive: Archive, labels: LabelStore, data_dir: Path, task: str,
                     rules: SelectionRules, out_dir: Path, *, model_labels: Mapping[int, str],
                     modality: str, validation_fraction: float = 0.2) -> dict[str, Any]:
    """Write ``task``'s dataset in the Decathlon layout, de-identified (module docstring).

    Parameters
    ----------
    model_labels : mapping of int to str
        Label values and names of the task's model (``{1: "spleen"}``).
    modality : str
        ``CT``...

    Returns
    -------
    dict
        The ``dataset.json`` written.

    Raises
    ------
    TrainingError
        If the dataset is empty or ``out_dir`` exists and is not empty.
    """
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TrainingError(f"{out_dir} exists and is not empty; give a new folder")
    dataset = build_dataset(archive, labels, task, rules, validation_fraction=validation_fraction)
    if not dataset.items:
        raise TrainingError(f"task {task}: no labelled series of donating patients to export")
    export_id = secrets.token_hex(8)
    order = list(dataset.items)
    rng = np.random.default_rng(int.from_bytes(secrets.token_bytes(8), "big"))
    rng.shuffle(order)  # type: ignore[arg-type]
    (out_dir / "imagesTr").mkdir(parents=True)
    (out_dir / "labelsTr").mkdir()
    training: list[dict[str, str]] = []
    validation: list[dict[str, str]] = []
    mapping = []
    for n, item in enumerate(order, start=1):
        name = f"case_{n:04d}.nii.gz"
        case = load_case(archive, item, model_labels, choice=dataset.volume)
        nib.save(_blank_header(to_nifti(case.image, case.affine, dtype=np.int16)),
                 out_dir / "imagesTr" / name)
        nib.save(_blank_header(to_nifti(case.label, case.affine, dtype=np.uint8)),
                 out_dir / "labelsTr" / name)
        pair = {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}
        (validation if item.split == "validation" else training).append(pair)
        mapping.append({"case": name, **item.to_dict()})
    desc = {
        "name": task, "description": f"{task} training data exported by dicom-node "
        "(de-identified: DICOM PS3.15 Basic Application Level Confidentiality Profile)",
        "reference": "dicom-node", "licence": "site-internal; not for redistribution",
        "release": "1.0", "tensorImageSize": "3D", "modality": {"0": modality},
        "labels": {"0": "background", **{str(k): v for k, v in sorted(model_labels.items())}},
        "numTraining": len(training) + len(validation), "numTest": 0,
        "training": training, "validation": validation, "test": [],
    }
    (out_dir / "dataset.json").write_text(json.dumps(desc, indent=2))
    keep = data_dir / EXPORTS_DIR / f"{export_id}.json"
    write_durably(keep, [json.dumps({"export_id": export_id, "out_dir": str(out_dir),
                                     "manifest": dataset.manifest(), "cases": mapping},
                                    indent=2).encode()])
    LOG.info("exported %s: %d case(s) (%d validation) to %s; mapping kept in %s", task,
             len(order), len(validation), out_dir, keep)
    return desc


def scrub_patients(data_dir: Path, patient_keys: Sequence[str]) -> int:
    """Remove the cases of these twins from the kept export mappings (twin erasure);
    return how many cases went. The exported files outside the data directory are the
    site's to delete (the mapping said where they went)."""
    keys = set(patient_keys)
    removed = 0
    for path in sorted((data_dir / EXPORTS_DIR).glob("*.json")):
        kept = json.loads(path.read_text())
        cases = kept.get("cases", [])
        left = [c for c in cases if c.get("patient_key") not in keys]
        if len(left) == len(cases):
            continue
        removed += len(cases) - len(left)
        kept["cases"] = left
        manifest = kept.get("manifest") or {}
        if isinstance(manifest.get("series"), list):
            manifest["series"] = [s for s in manifest["series"] if s.get("patient_key") not in keys]
        write_durably(path, [json.dumps(kept, indent=2).encode()])
    return removed
