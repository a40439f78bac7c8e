"""``dicom-node models``: the knowledge bank - list, show, import, promote, roll back,
retire, optimise, benchmark and export for Triton model versions.

``models import BUNDLE --task T --candidate-of VERSION`` brings back a bundle trained
outside the node (``train T --export-only``): evaluated with the active version on the
node's validation patients and promoted only when better, as the nightly job does
(:func:`trainer.external.import_candidate`)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from registry.records import ModelVersion
from registry.store import Registry
from twin_archive import audit

LOG = logging.getLogger(__name__)

#: Said (and kept in the audit trail) when a bundle is activated on import.
NO_METRICS = "activated on import with no recorded validation metrics (operator's explicit choice)"


def _register_lifecycle(msub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The actions that change which version serves: shadow, promote, rollback, retire."""
    p = msub.add_parser("shadow", parents=parents,
                        help="run a candidate in shadow on live series (results kept, never sent)")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--stop", action="store_true", help="stop its shadow mode")
    _who(p)
    p.set_defaults(func=cmd_shadow)

    p = msub.add_parser("promote", parents=parents, help="make a version active in its scope")
    p.add_argument("version", metavar="VERSION")
    _who(p)
    p.set_defaults(func=cmd_promote)

    p = msub.add_parser("rollback", parents=parents,
                        help="put back the version active before the current one")
    p.add_argument("task", metavar="TASK")
    p.add_argument("--manufacturer", default="", help="scope: Manufacturer")
    p.add_argument("--scanner-model", default="", help="scope: Manufacturer's Model Name")
    _who(p)
    p.set_defaults(func=cmd_rollback)

    p = msub.add_parser("retire", parents=parents, help="take a version out of service")
    p.add_argument("version", metavar="VERSION")
    _who(p)
    p.set_defaults(func=cmd_retire)


def register(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add the ``models`` subcommand and its actions to ``sub``."""
    parents = list(parents)
    models = sub.add_parser("models", parents=parents,
                            help="model registry: list, import, promote, roll back, optimise")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    p = msub.add_parser("list", parents=parents, help="all model versions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = msub.add_parser("show", parents=parents,
                        help="one version: labels, metrics, artifacts, checks, audit trail")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)

    p = msub.add_parser("import", parents=parents, help="import a MONAI bundle directory")
    p.add_argument("bundle_dir", metavar="BUNDLE_DIR")
    p.add_argument("--task", required=True, help="task name, e.g. spleen-ct")
    p.add_argument("--activate", action="store_true", help="make it the active version now")
    p.add_argument("--manufacturer", default="", help="only for series of this Manufacturer")
    p.add_argument("--scanner-model", default="",
                   help="only for series of this Manufacturer's Model Name")
    p.add_argument("--candidate-of", default=None, metavar="VERSION",
                   help="trained outside the node from VERSION: evaluate it with the active "
                        "version on the validation patients, promote it only when better")
    _who(p)
    p.set_defaults(func=cmd_import)

    _register_lifecycle(msub, parents)

    p = msub.add_parser("optimize", parents=parents,
                        help="export ONNX (and a TensorRT engine where possible) and check "
                             "them against PyTorch")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per backend (default 3)")
    p.set_defaults(func=cmd_optimize)

    p = msub.add_parser("export-triton", parents=parents,
                        help="write a model repository for NVIDIA Triton Inference Server")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("out_dir", metavar="DIR", help="the model repository folder")
    p.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help="largest batch Triton forms (default twice the bundle's sw_batch_size)")
    p.add_argument("--instances", type=int, default=1, metavar="N",
                   help="model instances per GPU (default 1)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU instances, no TensorRT accelerator (a server without a GPU)")
    p.set_defaults(func=cmd_export_triton)

    p = msub.add_parser("benchmark", parents=parents,
                        help="time sliding-window inference with each available backend")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per backend (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--size", type=int, nargs=3, default=(256, 256, 160), metavar=("X", "Y", "Z"),
                   help="volume size on the model grid (default 256 256 160)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_benchmark)


def _who(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", default=None, help="who does it (default: your user name)")
    p.add_argument("--reason", default="", help="why (kept in the audit trail)")


def _by(args: argparse.Namespace) -> str:
    return args.by or getpass.getuser()


def _registry(settings: Any) -> Registry:
    return Registry(settings.data_dir)


def _serving(reg: Registry, mv: ModelVersion, settings: Any = None) -> str:
    from pipelines.backends import choose_backend

    if settings is not None and getattr(settings, "backend", "local") == "triton":
        return f"triton@{settings.triton_url}"
    return choose_backend(mv, reg)[0].value


def _version_dict(reg: Registry, mv: ModelVersion, full: bool = False,
                  settings: Any = None, min_agreement: float = 0.8) -> dict[str, Any]:
    d: dict[str, Any] = {
        "version": mv.version, "task": mv.task, "status": mv.status.value,
        "scope": {"manufacturer": mv.scope.manufacturer, "model_name": mv.scope.model_name},
        "architecture": mv.architecture, "bundle": {"name": mv.bundle_name,
                                                    "version": mv.bundle_version},
        "labels": [{"value": lab.value, "name": lab.name,
                    "code": None if lab.code is None else
                    {"scheme": lab.code.scheme, "value": lab.code.value, "meaning": lab.code.meaning}}
                   for lab in mv.labels],
        "modality": mv.modality, "input_spacing_mm": mv.input_spacing,
        "intensity": None if mv.intensity is None else {
            "a_min": mv.intensity.a_min, "a_max": mv.intensity.a_max, "b_min": mv.intensity.b_min,
            "b_max": mv.intensity.b_max, "clip": mv.intensity.clip},
        "created_at": mv.created_at.isoformat(), "parent_version": mv.parent_version,
        "device_uid": mv.device_uid,
        "metrics": None if mv.metrics is None else {
            "dice": dict(mv.metrics.dice), "mean_dice": mv.metrics.mean_dice,
            "validation_set": mv.metrics.validation_set},
        "serving_backend": _serving(reg, mv, settings), "path": str(mv.path),
    }
    if full:
        from dicom_node.learning.shadow import shadow_summary

        d["held_because"] = reg.held_because(mv.version)
        d["shadow"] = shadow_summary(reg.data_dir, reg, mv.version,
                                     min_agreement=min_agreement).to_dict()
        d["dataset_manifest"] = mv.manifest()
        d["artifacts"] = [{"kind": a.kind.value, "path": str(a.path), "sha256": a.sha256,
                           "created_at": a.created_at.isoformat(), "detail": a.detail, "key": a.key}
                          for a in reg.artifacts(mv.version)]
        d["checks"] = [{"backend": v.backend.value, "device": v.device_name,
                        "max_abs_diff": v.max_abs_diff, "argmax_agreement": v.argmax_agreement,
                        "median_ms": v.median_ms, "shape": list(v.shape), "verified": v.verified,
                        "measured_at": v.measured_at.isoformat(), "detail": v.detail}
                       for v in reg.verifications(mv.version)]
        d["audit"] = [{"at": e.at.isoformat(), "action": e.action.value, "version": e.version,
                       "previous_version": e.previous_version, "by": e.by, "reason": e.reason}
                      for e in reg.audit(version=mv.version)]
    return d


def cmd_list(args: argparse.Namespace, settings: Any) -> int:
    """``models list``: one line per version."""
    with _registry(settings) as reg:
        versions = reg.list()
        if args.json:
            print(json.dumps([_version_dict(reg, mv, settings=settings) for mv in versions],
                             indent=2))
            return 0
        if not versions:
            print(f"no model versions in {settings.data_dir}; import one with "
                  "`dicom-node models import BUNDLE_DIR --task TASK --activate`")
            return 0
        print(f"{'VERSION':<22} {'STATUS':<9} {'SCOPE':<28} {'LABELS':<24} {'MEAN DICE':>9}  "
              f"{'BACKEND':<16} CREATED")
        for mv in versions:
            dice = f"{mv.metrics.mean_dice:.4f}" if mv.metrics else "-"
            labels = ",".join(lab.name for lab in mv.labels)
            print(f"{mv.version:<22} {mv.status.value:<9} {str(mv.scope)[:28]:<28} "
                  f"{labels[:24]:<24} {dice:>9}  {_serving(reg, mv, settings):<16} "
                  f"{mv.created_at.isoformat(timespec='seconds')}")
    return 0


def cmd_show(args: argparse.Namespace, settings: Any) -> int:
    """``models show VERSION``: everything recorded about one version."""
    with _registry(settings) as reg:
        d = _version_dict(reg, reg.get(args.version), full=True, settings=settings,
                          min_agreement=settings.train_shadow_min_agreement)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['version']}  ({d['status']}, task {d['task']}, scope "
          f"{d['scope']['manufacturer'] or '*'} / {d['scope']['model_name'] or '*'})")
    if d["held_because"]:
        print(f"  not promoted  {d['held_because']}")
    print(f"  bundle        {d['bundle']['name']} {d['bundle']['version']}")
    print(f"  architecture  {d['architecture']}")
    for lab in d["labels"]:
        code = lab["code"]
        coded = f"({code['scheme']} {code['value']} '{code['meaning']}')" if code else "(uncoded)"
        print(f"  label {lab['value']:<3}     {lab['name']} {coded}")
    sp = d["input_spacing_mm"]
    spacing = " x ".join(f"{v:g}" for v in sp) + " mm" if sp else "not resampled"
    inten = d["intensity"]
    window = (f"HU [{inten['a_min']:g}, {inten['a_max']:g}] -> [{inten['b_min']:g}, "
              f"{inten['b_max']:g}]{' clipped' if inten['clip'] else ''}" if inten else "as is")
    print(f"  input         {d['modality'] or '?'}, spacing {spacing}, intensity {window}")
    print(f"  created       {d['created_at']}   parent {d['parent_version'] or '-'}")
    print(f"  device UID    {d['device_uid']}")
    if d["metrics"]:
        m = d["metrics"]
        print(f"  metrics       mean Dice {m['mean_dice']:.4f} {m['dice']} on {m['validation_set']}")
    else:
        print("  metrics       none recorded (never validated on this site's patients)")
    print(f"  manifest      {'-' if d['dataset_manifest'] is None else json.dumps(d['dataset_manifest'])[:100]}")
    sh = d["shadow"]
    if sh["in_shadow"] or sh["series"]:
        print(f"  shadow        {'on' if sh['in_shadow'] else 'off'}: {sh['series']} series, "
              f"{sh['disagreements']} disagreement(s) (a label's Dice < {sh['min_agreement']:g})")
        for s in sh["by_scanner"]:
            labels = ", ".join(f"{n} Dice {v:.3f} ({s['mean_volume_diff_ml'][n]:+.1f} mL)"
                               for n, v in s["mean_dice"].items())
            print(f"    {s['scanner']}: {s['series']} series, agreement {labels}, "
                  f"lowest {s['min_dice']:.3f}")
    print(f"  serving with  {d['serving_backend']}")
    print(f"  path          {d['path']}")
    for a in d["artifacts"]:
        print(f"  artifact      {a['kind']:<12} {a['path']}  sha256 {a['sha256'][:16]}  {a['detail']}")
    for c in d["checks"]:
        print(f"  check         {c['backend']:<17} {c['device']:<10} max|diff| {c['max_abs_diff']:.3g}  "
              f"argmax {c['argmax_agreement']:.6f}  {c['median_ms']:.1f} ms/batch  "
              f"{'verified' if c['verified'] else 'NOT verified'}")
    for e in d["audit"]:
        print(f"  audit         {e['at'][:19]} {e['action']:<9} {e['version']} "
              f"(prev {e['previous_version'] or '-'}) by {e['by']}: {e['reason']}")
    return 0


def cmd_import(args: argparse.Namespace, settings: Any) -> int:
    """``models import BUNDLE_DIR --task T [--candidate-of VERSION]``."""
    if args.candidate_of:
        return _import_candidate(args, settings)
    reason = args.reason
    if args.activate:  # an imported bundle has no metrics on this site's patients
        reason = "; ".join(r for r in (reason, NO_METRICS) if r)
    with _registry(settings) as reg:
        mv = reg.import_bundle(args.bundle_dir, task=args.task, activate=args.activate,
                               manufacturer=args.manufacturer, scanner_model=args.scanner_model,
                               by=_by(args), reason=reason)
    print(f"imported {mv.version} ({mv.status.value}, scope {mv.scope}): {mv.bundle_name} "
          f"{mv.bundle_version}, labels {', '.join(lab.name for lab in mv.labels)}; "
          f"device UID {mv.device_uid}")
    _claim_labels(settings, _by(args))
    if args.activate and mv.metrics is None:
        LOG.warning("%s activated with no recorded validation metrics (the quality floor was "
                    "not checked): the operator's explicit choice", mv.version)
        print(f"note: {mv.version} has no recorded validation metrics; it serves on your "
              "explicit choice (--activate), the quality floor min_dice was not checked")
    return 0


def _claim_labels(settings: Any, by: str) -> None:
    """The unclaimed labels that the new version's labels name become its task's."""
    from dicom_node.cli.labels import claim_labels

    report = claim_labels(settings, via="models import", by=by)
    if report.claimed:
        print(report.summary())


def _import_candidate(args: argparse.Namespace, settings: Any) -> int:
    from dicom_node.learning.training import nightly_config, task_rules
    from trainer.external import import_candidate

    if args.activate or args.manufacturer or args.scanner_model:
        raise ValueError("--candidate-of: the candidate is promoted only when it validates "
                         "better, in its parent's scope; leave out --activate, --manufacturer "
                         "and --scanner-model")
    rules = task_rules(args.task, settings.tasks)
    outcome = import_candidate(settings.data_dir, args.bundle_dir, args.task, rules,
                               nightly_config(settings), candidate_of=args.candidate_of,
                               by=_by(args))
    print(outcome.summary())
    return 0


def cmd_export_triton(args: argparse.Namespace, settings: Any) -> int:
    """``models export-triton VERSION DIR``: a Triton model repository."""
    from pipelines.export.triton_repository import export_triton

    with _registry(settings) as reg:
        ex = export_triton(reg, args.version, args.out_dir, max_batch_size=args.max_batch_size,
                           instances=args.instances, cpu=args.cpu)
    accel = "" if args.cpu else ", TensorRT FP16 as GPU execution accelerator"
    print(f"{ex.version}: Triton model repository {ex.repository}")
    print(f"  {ex.onnx_model:<28} ONNX Runtime backend{accel}")
    print(f"  {ex.python_model:<28} Python backend running the same ONNX file with ONNX Runtime")
    print(f"  input image {list(ex.input_dims)} -> output pred {list(ex.output_dims)} (FP32), "
          f"max batch {ex.max_batch_size}, {ex.instances} instance(s) {ex.kind}; ONNX sha256 "
          f"{ex.onnx_sha256[:16]}")
    print(f"serve it: tritonserver --model-repository={ex.repository}; then in the node's "
          'configuration: backend = "triton", triton_url = "HOST:8001"'
          + ('' if not args.cpu else ', triton_variant = "onnx" or "python"'))
    return 0


def _audit_promotion(settings: Any, mv: ModelVersion, by: str, how: str, reason: str) -> None:
    """The node's audit log gets the change too (the registry keeps its own trail)."""
    audit.record(settings.data_dir, audit.AuditEvent.MODEL_PROMOTED, audit.AuditOutcome.SUCCESS,
                 by, mv.version, {"task": mv.task, "scope": str(mv.scope), "how": how,
                                  "reason": reason})


def cmd_shadow(args: argparse.Namespace, settings: Any) -> int:
    """``models shadow VERSION [--stop]``."""
    with _registry(settings) as reg:
        mv = reg.set_shadow(args.version, on=not args.stop, by=_by(args), reason=args.reason)
    if args.stop:
        print(f"{mv.version}: shadow mode stopped")
    else:
        print(f"{mv.version}: in shadow mode for {mv.task}: it also runs on every live series "
              "of the task; its results are kept in the twin, never sent, and compared with "
              "the active version's (see `dicom-node models show`)")
    return 0


def cmd_promote(args: argparse.Namespace, settings: Any) -> int:
    """``models promote VERSION``."""
    with _registry(settings) as reg:
        mv = reg.promote(args.version, _by(args), args.reason or "promoted by hand")
    _audit_promotion(settings, mv, _by(args), "promote", args.reason or "promoted by hand")
    print(f"{mv.version} is now active for {mv.task} ({mv.scope})")
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Any) -> int:
    """``models rollback TASK``."""
    with _registry(settings) as reg:
        mv = reg.rollback(args.task, _by(args), args.reason or "rolled back by hand",
                          manufacturer=args.manufacturer, scanner_model=args.scanner_model)
    _audit_promotion(settings, mv, _by(args), "rollback", args.reason or "rolled back by hand")
    print(f"rolled back: {mv.version} is active again for {mv.task} ({mv.scope})")
    return 0


def cmd_retire(args: argparse.Namespace, settings: Any) -> int:
    """``models retire VERSION``."""
    with _registry(settings) as reg:
        mv = reg.retire(args.version, _by(args), args.reason or "retired by hand")
    print(f"{mv.version} retired")
    return 0


def cmd_optimize(args: argparse.Namespace, settings: Any) -> int:
    """``models optimize VERSION``: ONNX (+ TensorRT) artifacts, checked against PyTorch."""
    from pipelines.export.optimize import optimize

    with _registry(settings) as reg:
        report = optimize(reg, args.version, repeats=args.repeats)
    print(f"ONNX: {report.onnx_path}")
    for c in report.checks:
        print(f"  {c.backend.value:<17} {c.device_name:<12} max abs diff {c.max_abs_diff:.3g}  "
              f"argmax agreement {c.argmax_agreement:.6f}  {c.median_ms:.1f} ms per batch "
              f"{c.shape}  {'verified' if c.verified else 'NOT verified'}")
    print(report.tensorrt)
    return 0 if report.onnx_verified else 1


def cmd_benchmark(args: argparse.Namespace, settings: Any) -> int:
    """``models benchmark VERSION``: sliding-window time per backend on a phantom."""
    from pipelines.backend_benchmark import benchmark

    with _registry(settings) as reg:
        mv = reg.get(args.version)
        array, affine = phantom_volume(mv, tuple(args.size))
        grid, rows = benchmark(mv, array, affine, registry=reg, repeats=args.repeats,
                               warmup=args.warmup, compile_=not args.no_compile)
    eager = next((r.median_ms for r in rows if r.name == "pytorch-eager"), None)
    if args.json:
        print(json.dumps({"version": mv.version, "model_grid": grid, "rows": [
            {"backend": r.name, "device": r.device, "median_ms": r.median_ms, "runs": r.runs,
             "ratio_to_eager": (r.median_ms / eager) if (r.median_ms and eager) else None,
             "argmax_agreement": r.argmax_agreement, "note": r.note} for r in rows]}, indent=2))
        return 0
    print(f"{mv.version}: sliding-window inference on a phantom, model grid {grid} "
          f"(median of {args.repeats} after {args.warmup} warm-up)")
    print(f"{'BACKEND':<18} {'DEVICE':<24} {'MEDIAN ms':>10} {'x EAGER':>8} {'ARGMAX=':>8}  NOTE")
    for r in rows:
        ms = f"{r.median_ms:.1f}" if r.median_ms is not None else "-"
        ratio = f"{r.median_ms / eager:.2f}" if (r.median_ms and eager) else "-"
        agree = f"{r.argmax_agreement:.4f}" if r.argmax_agreement is not None else "-"
        print(f"{r.name:<18} {r.device[:24]:<24} {ms:>10} {ratio:>8} {agree:>8}  {r.note}")
    return 0


def phantom_volume(mv: ModelVersion, size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A phantom CT rendered directly at the model's input spacing, so that the model
    grid after the bundle's preprocessing is ``size`` (X, Y, Z in RAS order).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        float32 HU (slices, rows, columns) and the (k, i, j) -> LPS mm affine.
    """
    from pipelines import phantom

    sx, sy, sz = mv.input_spacing or (1.0, 1.0, 1.0)
    nx, ny, nz = size
    geom = phantom.SliceGeometry(rows=ny, columns=nx, slices=nz, pixel_spacing=(sy, sx),
                                 slice_spacing=sz)
    anatomy = phantom.Anatomy.random(7)
    rng = np.random.default_rng(7)
    array = np.stack([phantom.render(anatomy, geom, k, rng)[0] for k in range(nz)]).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 0] = geom.normal * geom.slice_spacing
    affine[:3, 1] = np.asarray(geom.column_direction) * geom.pixel_spacing[0]
    affine[:3, 2] = np.asarray(geom.row_direction) * geom.pixel_spacing[1]
    affine[:3, 3] = geom.position(0)
    return array, affine
