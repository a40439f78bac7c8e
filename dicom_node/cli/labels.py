"""``dicom-node labels``: import annotation-tool masks as labels, list the labels, claim
the unclaimed ones.

Labels also arrive as DICOM SEG over C-STORE (:mod:`dicom_node.learning.label_intake`); both
kinds are listed here with their provenance. A SEG whose segments name no configured
task's structure is kept *unclaimed* (listed with the reason); ``labels rescan`` claims
those that a task or model names now (the node also does at start, on SIGHUP and after
``models import``).
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from dicom_node.learning.label_intake import ClaimReport, claim_unclaimed, registry_terms
from dicom_node.settings import Settings
from pipelines.volume import load_series
from trainer.labelmaps import LabelContentError, mask_from_nifti
from twin_archive import audit
from twin_archive.labels import LabelRefusedError, LabelStore


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    labels = sub.add_parser("labels", parents=parents,
                            help="radiologist labels of archived series: import, list")
    lsub = labels.add_subparsers(dest="labels_command", metavar="ACTION", required=True)

    p = lsub.add_parser("import", parents=parents,
                        help="import a mask (NIfTI) from an annotation tool as a series' label",
                        description="Record a NIfTI mask as the current label of an archived "
                                    "series. The mask must lie on the series' grid (shape, "
                                    "spacing, origin, direction); value n is the n-th --label.")
    p.add_argument("patient_id", metavar="PATIENT_ID")
    p.add_argument("series_uid", metavar="SERIES_UID")
    p.add_argument("mask", metavar="MASK.nii.gz", type=Path)
    p.add_argument("--label", action="append", required=True, metavar="NAME",
                   help="name of mask value 1 (repeat for values 2, 3, ...), e.g. spleen")
    p.add_argument("--by", default=None, help="who made the mask (default: your user name)")
    p.add_argument("--issuer", default=None, help="Issuer of Patient ID, when several share the ID")
    p.add_argument("--tolerance-mm", type=float, default=0.05,
                   help="largest grid mismatch accepted, mm (default 0.05)")
    p.set_defaults(func=cmd_import)

    p = lsub.add_parser("list", parents=parents, help="list labels with their provenance")
    p.add_argument("--all", action="store_true", help="also superseded (non-current) labels")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = lsub.add_parser("rescan", parents=parents,
                        help="claim the unclaimed labels that a configured task or model names now",
                        description="Match every unclaimed label (a SEG whose segments named no "
                                    "configured task's structure when it arrived) against the "
                                    "configured tasks' segments and their models' labels; claim "
                                    "those that match, say why the others stay unclaimed.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_rescan)


def _archive(settings: Settings) -> Any:
    from dicom_node.runtime.node import open_archive

    return open_archive(settings)


def _read_mask(path: Path, series_uid: str) -> SpatialImage:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several kinds for unreadable files
        raise LabelRefusedError(series_uid, f"{path} is not a readable NIfTI file ({exc})") from exc
    if not isinstance(img, SpatialImage):  # a GIfTI surface, a CIFTI matrix: no grid
        raise LabelRefusedError(series_uid, f"{path} is not a NIfTI image "
                                f"(nibabel reads it as {type(img).__name__})")
    return img


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    with _archive(settings) as archive:
        keys = archive.twins.find_twin_keys(args.patient_id, args.issuer)  # TwinNotFoundError
        files = archive.twins.series_files(args.series_uid)
        store = LabelStore(settings.data_dir)
        try:
            owner = store.series_owner(args.series_uid)
            if owner is None or not files:
                raise LabelRefusedError(args.series_uid, "no such series in the archive")
            if owner not in keys:
                raise LabelRefusedError(args.series_uid,
                                        f"the series does not belong to patient {args.patient_id}")
            if not args.mask.is_file():
                raise LabelRefusedError(args.series_uid, f"no mask file {args.mask}")
            volume = load_series(files)
            mask = mask_from_nifti(_read_mask(args.mask, args.series_uid), volume,
                                   tolerance_mm=args.tolerance_mm)
            values = sorted(int(v) for v in np.unique(mask) if v)
            if not values:
                raise LabelContentError(args.series_uid, "the mask is empty (all zero)")
            if values[-1] > len(args.label):
                raise LabelContentError(args.series_uid, f"mask value {values[-1]} has no name: "
                                        f"give one --label per value ({len(args.label)} given)")
            suffix = ".nii.gz" if args.mask.name.endswith(".gz") else ".nii"
            label, new = store.add_file(series_uid=args.series_uid, data=args.mask.read_bytes(),
                                        segments=args.label, by=args.by or getpass.getuser(),
                                        suffix=suffix)
        finally:
            store.close()
    if new:
        audit.record(settings.data_dir, audit.AuditEvent.LABEL_IMPORTED, audit.AuditOutcome.SUCCESS,
                     args.by or getpass.getuser(), label.series_uid, {"label_id": label.id, "via": "labels import",
                                        "segments": list(args.label)})
    voxels = ", ".join(f"{args.label[v - 1]} {int((mask == v).sum())} voxels" for v in values)
    print(f"{'recorded' if new else 'already recorded'}: label {label.id} ({label.version}) of "
          f"series {label.series_uid}, current; {voxels}")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    with _archive(settings), LabelStore(settings.data_dir) as store:
        labels = store.list(current_only=not args.all)
    if args.json:
        print(json.dumps([lab.to_dict() for lab in labels], indent=2))
        return 0
    if not labels:
        print("labels: none yet")
        return 0
    print(f"{'ID':>4}  {'CUR':<3} {'SOURCE':<12} {'SEGMENTS':<18} {'FROM':<16} {'CREATOR':<20} "
          f"{'RECORDED':<19}  SERIES")
    for lab in labels:
        print(f"{lab.id:>4}  {'*' if lab.current else '':<3} {lab.source:<12} "
              f"{','.join(lab.segments)[:18]:<18} {lab.calling_ae or '-':<16} "
              f"{lab.content_creator[:20]:<20} {lab.recorded_at[:19]:<19}  {lab.series_uid}")
        if lab.unclaimed:
            print(f"{'':>6}UNCLAIMED: {lab.unclaimed}")
        else:
            print(f"{'':>6}for tasks: {', '.join(lab.tasks) or 'any'}")
    waiting = sum(1 for lab in labels if lab.unclaimed)
    if waiting:
        print(f"{waiting} unclaimed label(s): kept, in no dataset until a task or model names "
              "their segments ([[tasks]] segments, `models import`), then `dicom-node labels "
              "rescan` (the node also claims them on SIGHUP)")
    return 0


def cmd_rescan(args: argparse.Namespace, settings: Settings) -> int:
    report = claim_labels(settings, via="labels rescan", by=getpass.getuser())
    if args.json:
        print(json.dumps({"claimed": [{"label_id": i, "tasks": list(t)} for i, t in report.claimed],
                          "unclaimed": [{"label_id": i, "reason": r} for i, r in report.unclaimed]},
                         indent=2))
        return 0
    for label_id, tasks in report.claimed:
        print(f"claimed: label {label_id} for {', '.join(tasks)}")
    for label_id, reason in report.unclaimed:
        print(f"still unclaimed: label {label_id}: {reason}")
    print(report.summary())
    return 0


def claim_labels(settings: Settings, *, via: str, by: str) -> ClaimReport:
    """Claim the unclaimed labels that the configured tasks or their models name now
    (``labels rescan``, and after ``models import``)."""
    with _archive(settings), LabelStore(settings.data_dir) as store:
        return claim_unclaimed(store, registry_terms(settings.data_dir, settings.tasks), via=via,
                               by=by)
