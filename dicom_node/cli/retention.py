"""Retention in words: ``archive prune``, ``twin hold``, ``twin release``, ``twin forget``.

Every removal and every hold is recorded in the audit log under the twin's
pseudonymous key (never the Patient ID).
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import TYPE_CHECKING, Any

from dicom_node.runtime import retention
from dicom_node.foundation.errors import DicomNodeError
from dicom_node.settings import Settings
from twin_archive import audit, printable
from twin_archive.erasure import Erasure
from twin_archive.retention import Retention

if TYPE_CHECKING:
    from dicom_node.queue.jobs import JobQueue


class ErasureRefusedError(DicomNodeError):
    """A twin cannot be erased now (a job of it runs, or it is held)."""


def register_archive(asub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = asub.add_parser(
        "prune", parents=parents, help="remove what retention allows now (audited)",
        description="Remove the source images, labels and results whose purpose is served "
                    "and whose retention has passed (retention_days, result_retention_days, "
                    "revoke_grace_days; donors' and held patients' images stay). The node "
                    "runs this every prune_every_min minutes by itself.")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_prune)


def register_twin(tsub: Any, parents: list[argparse.ArgumentParser]) -> None:
    for name, text in (("hold", "put a patient under a legal hold: nothing of theirs is removed"),
                       ("release", "lift a patient's legal hold")):
        p = tsub.add_parser(name, parents=parents, help=text)
        p.add_argument("patient_id", metavar="PATIENT_ID")
        p.add_argument("--by", required=True, help="who decides (recorded in the audit log)")
        p.add_argument("--reason", required=True, help="why: the case, the order...")
        p.add_argument("--issuer", default=None, help="Issuer of Patient ID, when several share it")
        p.set_defaults(func=cmd_hold if name == "hold" else cmd_release)
    p = tsub.add_parser(
        "forget", parents=parents, help="erase a patient completely (GDPR art. 17)",
        description="Remove the patient's images, results, labels, queue rows and every index "
                    "row naming them; the audit log keeps a pseudonymous record. Names the "
                    "model versions trained with the data (retraining is the data protection "
                    "officer's decision).")
    p.add_argument("patient_id", metavar="PATIENT_ID")
    p.add_argument("--by", required=True, help="who decides (recorded in the audit log)")
    p.add_argument("--reason", required=True, help="why: the request's reference")
    p.add_argument("--issuer", default=None, help="Issuer of Patient ID, when several share it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_forget)


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.runtime.node import open_archive

    with open_archive(settings):  # migrates the index of an older data directory
        pass
    run = retention.prune(settings, dry_run=args.dry_run, by=getpass.getuser())
    counts = retention.summarize(run.items)
    if args.json:
        out: dict[str, Any] = {"dry_run": args.dry_run, "allowed": counts,
                               "items": [i.to_dict() for i in run.items]}
        if run.report is not None:
            out["removed"] = run.report.to_dict()
        print(json.dumps(out, indent=2))
        return 0
    if not run.items:
        print("archive prune: nothing to remove (retention allows nothing yet)")
        return 0
    verb = "would remove" if args.dry_run else "allowed"
    print(f"archive prune: {verb} {counts['files']} file(s) of {counts['series']} series of "
          f"{counts['patients']} patient(s), {counts['bytes'] / 1e6:.1f} MB")
    for item in run.items[:20]:
        print(f"  {item.kind:<7} series {item.series_uid}  {item.files} file(s)  "
              f"{item.bytes / 1e6:.1f} MB  {item.reason}")
    if len(run.items) > 20:
        print(f"  ... and {len(run.items) - 20} more")
    if run.report is not None:
        print(f"removed {run.report.files} file(s), {run.report.bytes / 1e6:.1f} MB in "
              f"{run.seconds:.1f} s (audited)"
              + (f"; {len(run.report.skipped)} series re-opened since, kept"
                 if run.report.skipped else ""))
    return 0


def _key(settings: Settings, patient_id: str, issuer: str | None) -> str:
    from dicom_node.runtime.node import open_archive

    with open_archive(settings) as archive:
        keys = archive.twins.find_twin_keys(patient_id, issuer)
    if len(keys) > 1:
        raise ValueError(f"patient_id: {len(keys)} twins share Patient ID "
                         f"{printable(patient_id)!r} under different issuers; give --issuer")
    return keys[0]


def cmd_hold(args: argparse.Namespace, settings: Settings) -> int:
    key = _key(settings, args.patient_id, args.issuer)
    with Retention(settings.data_dir) as store:
        placed = store.hold(key, by=args.by, reason=args.reason)
    if placed:
        audit.record(settings.data_dir, audit.AuditEvent.TWIN_HELD, audit.AuditOutcome.SUCCESS,
                     args.by, key, {"reason": args.reason})
    print(f"twin {key} (patient {printable(args.patient_id)}) "
          + ("is now under a legal hold: nothing of it is pruned" if placed
             else "was already under a legal hold"))
    return 0


def cmd_release(args: argparse.Namespace, settings: Settings) -> int:
    key = _key(settings, args.patient_id, args.issuer)
    with Retention(settings.data_dir) as store:
        released = store.release(key, by=args.by, reason=args.reason)
    if released:
        audit.record(settings.data_dir, audit.AuditEvent.TWIN_RELEASED,
                     audit.AuditOutcome.SUCCESS, args.by, key, {"reason": args.reason})
    print(f"twin {key} (patient {printable(args.patient_id)}) "
          + ("released: retention applies again" if released else "was not under a legal hold"))
    return 0


def _refuse_if_running(queue: JobQueue, key: str) -> None:
    running = queue.running_for_patient([key])
    if running:
        raise ErasureRefusedError(
            f"twin forget: job {running[0].id} of this patient is running ({running[0].worker});"
            " wait for it to finish (dicom-node jobs) and run the command again")


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.queue.jobs import JobQueue

    key = _key(settings, args.patient_id, args.issuer)
    with Retention(settings.data_dir) as store:
        hold = store.held(key)
    if hold is not None:
        raise ErasureRefusedError(f"twin forget: twin {key} is under a legal hold "
                                  f"({hold['reason']}); release it first")
    queue = JobQueue(settings.data_dir)
    try:
        _refuse_if_running(queue, key)
        # Its queued jobs go first, so that no worker of the running node claims one
        # while the files are removed; a claim in between is refused as above.
        queued_rows = queue.erase_patient([key], ())
        _refuse_if_running(queue, key)
        with Erasure(settings.data_dir) as erasure:
            report = erasure.erase(key, patient_id=args.patient_id)
        queue_rows = queue.erase_patient([key], report.series_uids, study_uids=report.study_uids,
                                         result_ids=report.result_ids,
                                         patient_id=args.patient_id) + queued_rows
    finally:
        queue.close()
    from registry.store import Registry
    from trainer.export import scrub_patients

    cases = scrub_patients(settings.data_dir, [key])
    with Registry(settings.data_dir) as registry:
        manifests = registry.redact_patient(key)
    detail = {**report.to_dict(), "queue_rows": queue_rows, "export_cases": cases,
              "manifests_redacted": manifests, "reason": args.reason}
    audit.record(settings.data_dir, audit.AuditEvent.TWIN_ERASED, audit.AuditOutcome.SUCCESS,
                 args.by, key, detail)
    if args.json:
        print(json.dumps(detail, indent=2))
        return 0
    print(f"twin forget: twin {key} erased: {report.studies} study(ies), {report.series} "
          f"series, {report.files} file(s) ({report.bytes / 1e6:.1f} MB), {queue_rows} queue "
          f"row(s), {cases} export mapping case(s), {report.quarantined_files} quarantined "
          f"file(s), {len(manifests)} training manifest(s) redacted; recorded in the audit log "
          "under the twin key")
    if report.model_versions:
        print("  model versions trained with this patient's data: "
              + ", ".join(report.model_versions)
              + " (whether to retrain is the data protection officer's decision; the node "
                "does not retrain by itself)")
    return 0
