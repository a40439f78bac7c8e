"""``dicom-node twin``: list, show and set donation consent of patients' twins."""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

from dicom_node.settings import Settings
from twin_archive import Archive, audit, printable


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    twin = sub.add_parser("twin", parents=parents, help="patients' twins: list, show, consent, hold, forget")
    tsub = twin.add_subparsers(dest="twin_command", metavar="ACTION", required=True)

    p = tsub.add_parser("list", parents=parents, help="list the twins in the archive")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = tsub.add_parser("show", parents=parents, help="studies, series, consent and results of one patient")
    p.add_argument("patient_id", metavar="PATIENT_ID")
    p.add_argument("--issuer", default=None, help="Issuer of Patient ID, when several share the ID")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)

    p = tsub.add_parser("consent", parents=parents,
                        help="record a patient's decision to donate studies for model development")
    p.add_argument("patient_id", metavar="PATIENT_ID")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--donate", action="store_true", help="the patient donates (opt in)")
    group.add_argument("--revoke", action="store_true", help="the patient withdraws donation")
    p.add_argument("--by", default=None, help="who records the decision (default: your user name)")
    p.add_argument("--reason", default="", help="why, or the reference of the signed form")
    p.add_argument("--issuer", default=None, help="Issuer of Patient ID, when several share the ID")
    p.set_defaults(func=cmd_consent)

    p = tsub.add_parser("merge", parents=parents,
                        help="attach an unidentified twin (no Patient ID) to the right patient",
                        description="Attach the unidentified twin SOURCE (its key, from 'twin "
                                    "list') to the patient TARGET (Patient ID or twin key): its "
                                    "studies, results and labels move, in one transaction, "
                                    "recorded in the audit log.")
    p.add_argument("source", metavar="SOURCE", help="key of the unidentified twin")
    p.add_argument("target", metavar="TARGET", help="Patient ID (or twin key) of the patient")
    p.add_argument("--by", required=True, help="who decides (recorded in the audit log)")
    p.add_argument("--reason", required=True, help="why: the order, the reconciliation...")
    p.set_defaults(func=cmd_merge)
    from dicom_node.cli import history, retention

    retention.register_twin(tsub, parents)
    history.register_twin(tsub, parents)


def _archive(settings: Settings) -> Archive:
    from dicom_node.runtime.node import open_archive

    return open_archive(settings)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    with _archive(settings) as archive:
        twins = archive.twins.list_twins()
    if args.json:
        print(json.dumps([_summary_dict(t) for t in twins], indent=2))
        return 0
    if not twins:
        print(f"no twins yet in {settings.data_dir}")
        return 0
    print(f"{'PATIENT ID':<20} {'NAME':<24} {'STUDIES':>7} {'SERIES':>6} {'INSTANCES':>9}  DONATES  LAST RECEIVED")
    for t in twins:
        print(f"{_patient(t):<20} {printable(t.patient_name)[:24]:<24} {t.studies:>7} {t.series:>6} "
              f"{t.instances:>9}  {'yes' if t.donate else 'no':<7}  {t.last_received[:19]}")
    return 0


def _patient(t: Any) -> str:
    """The Patient ID as printed: escaped, or the unidentified twin's key."""
    if t.unidentified:
        return f"(unidentified) {t.patient_key}"
    return printable(t.patient_id)


def _summary_dict(t: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(t)


def _jobs_of(settings: Settings, detail: Any) -> list[Any]:
    """The inference jobs of the twin's series (newest first)."""
    from dicom_node.queue.jobs import JobQueue

    uids = [se.series_uid for st in detail.studies for se in st.series]
    queue = JobQueue(settings.data_dir)
    try:
        return queue.for_series(uids)
    finally:
        queue.close()


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from twin_archive.retention import Retention

    with _archive(settings) as archive:
        detail = archive.twins.twin(args.patient_id, args.issuer)
    with Retention(settings.data_dir) as store:
        hold = store.held(detail.twin.patient_key)
        pruned = store.pruned_by_series(detail.twin.patient_key)
    jobs = _jobs_of(settings, detail)
    if args.json:
        print(json.dumps({**detail.to_dict(), "hold": hold, "pruned": pruned, "jobs": [
            {"id": j.id, "task": j.task, "series_uid": j.series_uid, "state": j.state.value,
             "reason": j.error, "result_id": j.result_id} for j in jobs]}, indent=2))
        return 0
    _print_twin(detail, hold)
    _print_studies(detail, pruned)
    _print_consent_and_learning(detail)
    for j in jobs:
        if j.state.value in ("queued", "running", "waiting"):
            print(f"  job {j.id} ({j.task}) on series {j.series_uid}: {j.state.value}"
                  + (f": {j.error}" if j.state.value == "waiting" else ""))
    return 0


def _print_twin(detail: Any, hold: dict[str, Any] | None) -> None:
    """The patient, merges, donation and legal hold (``twin show``)."""
    t = detail.twin
    if t.unidentified:
        print(f"UNIDENTIFIED twin {t.patient_key} (received without a Patient ID; filed by "
              f"Issuer {printable(t.issuer_of_patient_id)!r} and Study Instance UID)  "
              f"name {printable(t.patient_name)!r}")
        if not t.merged_into:
            print(f"  attach it to the right patient: dicom-node twin merge {t.patient_key} "
                  "PATIENT_ID --by NAME --reason TEXT")
    else:
        print(f"Patient {printable(t.patient_id)} ({printable(t.patient_name)})  twin {t.patient_key}")
    if t.merged_into:
        print(f"  MERGED into twin {t.merged_into}: its studies are shown there")
    print(f"  donation: {'DONATES' if t.donate else 'does not donate'}")
    if hold is not None:
        print(f"  LEGAL HOLD since {hold['at'][:19]} by {printable(hold['by'])}: "
              f"{printable(hold['reason'])} (nothing of this patient is pruned)")
    for m in detail.merges:
        if m.target_key == t.patient_key:
            print(f"  merged in: unidentified twin {m.source_key} ({m.studies} study(ies)) at "
                  f"{m.at[:19]} by {printable(m.by)}: {printable(m.reason)}")


def _print_studies(detail: Any, pruned: dict[str, Any]) -> None:
    """Each study and its series, with what is missing or was pruned (``twin show``)."""
    for st in detail.studies:
        print(f"  study {printable(st.study_uid)}  {st.study_date} {printable(st.description)!r}"
              f"  accession {printable(st.accession_number)}")
        for se in st.series:
            notes = []
            if se.nonconformant_uids:
                notes.append(f"{se.nonconformant_uids} with non-conformant UIDs, stored under "
                             "hashed file names")
            if se.missing:
                notes.append(f"{se.missing} MISSING (file gone; found by archive verify)")
            notes.extend(_pruned_notes(pruned.get(se.series_uid, {})))
            print(f"    series {printable(se.series_number):>4} {printable(se.modality):<3} "
                  f"{printable(se.description)!r:<30} {se.instances:>5} instances  "
                  f"{printable(se.manufacturer)} {printable(se.model_name)}  "
                  f"({printable(se.series_uid)})" + (f"  [{'; '.join(notes)}]" if notes else ""))


def _print_consent_and_learning(detail: Any) -> None:
    """Consent history, results, labels and the model versions trained with the data."""
    print("  consent history:" if detail.consent_history else "  consent history: none (default: not donated)")
    for ev in detail.consent_history:
        print(f"    {ev.at[:19]}  {'donate' if ev.previous else 'no'} -> {'donate' if ev.donate else 'no'}"
              f"  by {ev.by}  {ev.reason}")
    print(f"  AI results: {len(detail.results)}   labels: {len(detail.labels)}   "
          f"model versions trained with this patient's data: {len(detail.trained_model_versions)}")
    for lab in detail.labels:
        print(f"    label {lab['id']}{' (current)' if lab['current'] else ''}: "
              f"{', '.join(lab['segments'])} of series {lab['series_uid']}  {lab['source']}"
              f" from {lab['calling_ae'] or 'import'} by {lab['content_creator'] or '?'}"
              f" at {lab['recorded_at'][:19]}")
    if detail.trained_model_versions:
        print("    trained with this patient's data: " + ", ".join(detail.trained_model_versions))


def _pruned_notes(kinds: dict[str, dict[str, Any]]) -> list[str]:
    """What retention removed of a series, in words (``twin show``)."""
    names = {"instance": "instance(s)", "label": "label file(s)", "result": "result object(s)"}
    return [f"{v['files']} {names.get(kind, kind)} PRUNED ({(v['bytes'] or 0) / 1e6:.1f} MB) at "
            f"{v['at'][:19]}: {v['reason']}" for kind, v in sorted(kinds.items())]


def cmd_consent(args: argparse.Namespace, settings: Settings) -> int:
    by = args.by or getpass.getuser()
    with _archive(settings) as archive:
        event = archive.twins.set_consent(args.patient_id, donate=bool(args.donate), by=by,
                                    reason=args.reason, issuer=args.issuer)
        keys = archive.twins.find_twin_keys(args.patient_id, args.issuer)
    # The audit log names the twin by its key, never by Patient ID.
    audit.record(settings.data_dir, audit.AuditEvent.CONSENT_CHANGED, audit.AuditOutcome.SUCCESS,
                 by, keys[0] if keys else "?",
                 {"donate": event.donate, "previous": event.previous, "reason": event.reason,
                  "at": event.at})
    state = "donates" if event.donate else "does not donate"
    print(f"recorded: patient {printable(args.patient_id)} {state} (was: "
          f"{'donating' if event.previous else 'not donating'}), by {event.by} at {event.at[:19]}")
    return 0


def cmd_merge(args: argparse.Namespace, settings: Settings) -> int:
    with _archive(settings) as archive:
        merge = archive.twins.merge_twins(args.source, args.target, by=args.by, reason=args.reason)
    # Named by twin keys only (rebuild-index replays it from here).
    audit.record(settings.data_dir, audit.AuditEvent.TWIN_MERGED, audit.AuditOutcome.SUCCESS,
                 merge.by, merge.source_key,
                 {"into": merge.target_key, "reason": merge.reason, "studies": merge.studies,
                  "at": merge.at})
    print(f"merged: unidentified twin {merge.source_key} ({merge.studies} study(ies)) is now "
          f"part of twin {merge.target_key} (patient {printable(args.target)}), by "
          f"{printable(merge.by)} at {merge.at[:19]}")
    return 0
