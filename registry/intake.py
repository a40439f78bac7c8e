"""Adding versions: a MONAI bundle imported by hand, or a trained candidate registered
by the trainer; the bundle is checked, copied in and registered in one transaction.

A part of :class:`registry.store.Registry`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.uid import generate_uid

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.durable import replace_durably
from registry.artifacts import sha256_file
from registry.errors import RegistryError
from registry.lifecycle import VersionLifecycle
from registry.records import (
    ArtifactKind,
    AuditAction,
    Metrics,
    ModelStatus,
    ModelVersion,
    ScannerScope,
    check_task,
)
from registry.rows import insert_row, intensity_json, label_json

if TYPE_CHECKING:  # the bundle reader loads torch and MONAI; see _add
    from registry.bundle import BundleInfo

LOG = logging.getLogger(__name__)


class VersionIntake(VersionLifecycle):
    """New versions of a task: imported bundles and trained candidates."""

    def import_bundle(self, bundle_dir: Path | str, *, task: str, activate: bool = False,
                      manufacturer: str = "", scanner_model: str = "", by: str = "admin",
                      reason: str = "") -> ModelVersion:
        """Import a MONAI bundle directory as a new version of ``task``.

        The bundle is copied under the data directory, checked there (network builds,
        weights load, labels map; see :func:`registry.bundle.open_bundle`) and
        registered as a candidate with a new Device UID - or as the active version of
        its scanner scope when ``activate`` is true (the previous one is superseded).

        Parameters
        ----------
        bundle_dir : pathlib.Path or str
        task : str
            Task name (``spleen-ct``).
        activate : bool
            Promote it at once.
        manufacturer, scanner_model : str
            Optional scanner scope.
        by, reason : str
            For the audit trail.

        Returns
        -------
        ModelVersion

        Raises
        ------
        BundleError
            If the bundle cannot be imported (the message names the file).
        """
        return self._add(bundle_dir, task=task, scope=ScannerScope(
            manufacturer=manufacturer, model_name=scanner_model), parent=None, manifest=None,
            metrics=None, activate=activate, by=by, reason=reason, action=AuditAction.IMPORT)

    def register_candidate(self, bundle_dir: Path | str, *, task: str, parent_version: str | None,
                           dataset_manifest: Mapping[str, Any] | str, metrics: Metrics | None = None,
                           by: str = "trainer", reason: str = "") -> ModelVersion:
        """Register a trained bundle as a candidate version (for the trainer).

        Parameters
        ----------
        bundle_dir : pathlib.Path or str
            The trained bundle (configs + ``models/model.pt``).
        task : str
        parent_version : str or None
            The version it was fine-tuned from; the candidate inherits its scanner scope.
        dataset_manifest : Mapping or str
            The exact training dataset (JSON-serialisable, or JSON text).
        metrics : Metrics, optional
            Validation metrics, when already known.
        by, reason : str
            For the audit trail.

        Raises
        ------
        BundleError, VersionNotFoundError
        """
        scope = ScannerScope()
        if parent_version is not None:
            parent = self.get(parent_version)
            if parent.task != task:
                raise ValueError(f"parent_version {parent_version} belongs to task "
                                 f"{parent.task!r}, not {task!r}")
            scope = parent.scope
        manifest = dataset_manifest if isinstance(dataset_manifest, str) else json.dumps(
            dataset_manifest, sort_keys=True)
        json.loads(manifest)
        return self._add(bundle_dir, task=task, scope=scope, parent=parent_version,
                         manifest=manifest, metrics=metrics, activate=False, by=by,
                         reason=reason, action=AuditAction.REGISTER)

    def _add(self, bundle_dir: Path | str, *, task: str, scope: ScannerScope, parent: str | None,
             manifest: str | None, metrics: Metrics | None, activate: bool, by: str, reason: str,
             action: AuditAction) -> ModelVersion:
        """Check a bundle, copy it in and register it as the next version of ``task``, in
        one transaction; on any failure neither the copy nor a row stays."""
        # Parsing a bundle loads torch and MONAI: imported here, when a model is added,
        # so that reading the register (the DICOM listener, `status`) does not load them.
        from registry.bundle import open_bundle

        check_task(task)
        src = Path(bundle_dir).resolve()
        open_bundle(src)  # refuse a broken bundle before copying anything
        incoming = self._copy_in(src, task)
        final: Path | None = None
        try:
            info = open_bundle(incoming).info
            now = utc_now()
            with self._tx():
                number, version, final = self._claim_version(task, incoming)
                self._insert_version(task, number, final, info, scope=scope, parent=parent,
                                     manifest=manifest, metrics=metrics, now=now)
                self._insert_weights(version, final / info.weights_file.relative_to(incoming),
                                     src=src, now=now)
                self._audit(action, task, version, scope, by,
                            reason or f"{action.value} of {info.name} {info.version} from {src}",
                            parent)
                if metrics is not None:
                    self._audit(AuditAction.METRICS, task, version, scope, by,
                                f"mean Dice {metrics.mean_dice:.4f} on {metrics.validation_set}")
                if activate:
                    self._promote_in_tx(version, by=by, reason=reason or "activated on import")
        except BaseException:
            if final is not None:
                shutil.rmtree(final, ignore_errors=True)
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        mv = self.get(version)
        LOG.info("registered %s (%s, %s, scope %s, device UID %s)", mv.version, mv.status.value,
                 mv.architecture.split("(")[0], mv.scope, mv.device_uid)
        return mv

    def _copy_in(self, src: Path, task: str) -> Path:
        """A copy of the bundle in a hidden folder of the task's directory (without
        evaluation outputs, caches or optimised artifacts)."""
        task_dir = self.models_dir / task
        task_dir.mkdir(parents=True, exist_ok=True)
        incoming = task_dir / f".incoming-{secrets.token_hex(8)}"
        shutil.copytree(src, incoming, ignore=shutil.ignore_patterns("eval", "__pycache__",
                                                                     "onnx", "tensorrt"))
        return incoming

    def _claim_version(self, task: str, incoming: Path) -> tuple[int, str, Path]:
        """The next version number of ``task``, its name and its directory, the copy
        renamed into it (inside the write transaction, so the number is ours).

        Raises
        ------
        RegistryError
            If that directory exists without being registered (it is left alone).
        """
        n = self.db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM model_versions "
                            "WHERE task = ?", [task]).fetchone()[0]
        version = f"{task}-v{n}"
        final = incoming.parent / version
        if final.exists():
            raise RegistryError(f"{final} exists but is not registered; move it away")
        replace_durably(incoming, final)
        return n, version, final

    def _insert_version(self, task: str, number: int, final: Path, info: BundleInfo, *,
                        scope: ScannerScope, parent: str | None, manifest: str | None,
                        metrics: Metrics | None, now: _dt.datetime) -> None:
        """The ``model_versions`` row of a new candidate."""
        insert_row(self.db.conn, "model_versions", {
            "version": final.name, "task": task, "number": number,
            "architecture": info.architecture,
            "labels": json.dumps([label_json(lab) for lab in info.labels]),
            "modality": info.modality,
            "input_spacing": json.dumps(info.input_spacing) if info.input_spacing else None,
            "intensity": json.dumps(intensity_json(info.intensity)) if info.intensity else None,
            "created_at": iso(now), "status": ModelStatus.CANDIDATE.value,
            "manufacturer": scope.manufacturer, "scanner_model": scope.model_name,
            "device_uid": generate_uid(),
            "path": str(final.relative_to(self.data_dir)),
            "bundle_name": info.name, "bundle_version": info.version,
            "parent_version": parent, "dataset_manifest": manifest,
            "metrics": metrics.to_json() if metrics else None,
        })

    def _insert_weights(self, version: str, weights: Path, *, src: Path,
                        now: _dt.datetime) -> None:
        """The ``artifacts`` row of the version's weights (state dict or TorchScript)."""
        kind = ArtifactKind.TORCHSCRIPT if weights.suffix == ".ts" else ArtifactKind.PYTORCH
        insert_row(self.db.conn, "artifacts", {
            "version": version, "kind": kind.value,
            "path": str(weights.relative_to(self.data_dir)),
            "sha256": sha256_file(weights), "created_at": iso(now),
            "detail": f"from {src}", "key": ""})
