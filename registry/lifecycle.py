"""A version's standing: promote, roll back, retire, hold, shadow, metrics; every change
with its audit entry in the same transaction.

A part of :class:`registry.store.Registry`.
"""

from __future__ import annotations

import json
import logging

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import checkpoint_truncate
from registry.errors import StatusError
from registry.records import AuditAction, Metrics, ModelStatus, ModelVersion, ScannerScope
from registry.rows import insert_row
from registry.versions import VersionQueries

LOG = logging.getLogger(__name__)

#: Audit actions that note something about a version without changing its standing.
_NOTES = (AuditAction.METRICS, AuditAction.HOLD, AuditAction.SHADOW)


class VersionLifecycle(VersionQueries):
    """Changes of a version's status, each recorded in the audit trail."""

    def record_metrics(self, version: str, metrics: Metrics, *, by: str = "trainer") -> ModelVersion:
        """Record validation metrics of ``version`` (replacing earlier ones).

        Raises
        ------
        VersionNotFoundError
        """
        if not isinstance(metrics, Metrics):
            raise TypeError(f"metrics must be a Metrics, got {type(metrics).__name__}")
        mv = self.get(version)
        with self._tx() as conn:
            conn.execute("UPDATE model_versions SET metrics = ? WHERE version = ?",
                         [metrics.to_json(), version])
            self._audit(AuditAction.METRICS, mv.task, version, mv.scope, by,
                        f"mean Dice {metrics.mean_dice:.4f} on {metrics.validation_set}")
        return self.get(version)

    def hold(self, version: str, *, by: str, reason: str) -> ModelVersion:
        """Record why a candidate was not promoted (audit ``hold``); its status is unchanged.

        Raises
        ------
        VersionNotFoundError
        ValueError
            If ``reason`` is empty.
        """
        if not reason.strip():
            raise ValueError("reason must say why the candidate was not promoted")
        mv = self.get(version)
        with self._tx():
            self._audit(AuditAction.HOLD, mv.task, version, mv.scope, by, reason)
        return mv

    def set_shadow(self, version: str, *, on: bool, by: str, reason: str = "") -> ModelVersion:
        """Start (``on``) or stop shadow mode of a candidate (audit ``shadow``).

        In shadow, the candidate also runs on the live series of its task; its results
        are kept, never sent (``dicom-node models shadow``).

        Raises
        ------
        VersionNotFoundError
        StatusError
            If ``on`` and the version is not a candidate.
        """
        mv = self.get(version)
        if on and mv.status is not ModelStatus.CANDIDATE:
            raise StatusError(version, "shadow", f"it is {mv.status.value}; only a candidate "
                              "runs in shadow")
        word = "start" if on else "stop"
        with self._tx():
            self._audit(AuditAction.SHADOW, mv.task, version, mv.scope, by,
                        f"{word}: {reason}" if reason else word)
        return mv

    def promote(self, version: str, by: str, reason: str) -> ModelVersion:
        """Make ``version`` the active version of its task and scanner scope.

        The version active in that scope until now is retired (audit: ``supersede``).

        Raises
        ------
        VersionNotFoundError
        StatusError
            If ``version`` is already active or its files are gone.
        """
        with self._tx():
            self._promote_in_tx(version, by=by, reason=reason)
        return self.get(version)

    def _promote_in_tx(self, version: str, *, by: str, reason: str) -> None:
        mv = self.get(version)
        if mv.status is ModelStatus.ACTIVE:
            raise StatusError(version, "promote", "it is already active")
        if not mv.path.is_dir():
            raise StatusError(version, "promote", f"its directory {mv.path} is missing")
        old = self.active(mv.task, mv.scope)
        conn = self.db.conn
        if old is not None:
            conn.execute("UPDATE model_versions SET status = 'retired' WHERE version = ?",
                         [old.version])
            self._audit(AuditAction.SUPERSEDE, mv.task, old.version, mv.scope, by,
                        f"superseded by {version}: {reason}", version)
        conn.execute("UPDATE model_versions SET status = 'active' WHERE version = ?", [version])
        self._audit(AuditAction.PROMOTE, mv.task, version, mv.scope, by, reason,
                    old.version if old else None)
        LOG.info("promoted %s for %s (%s); previous %s; by %s: %s", version, mv.task, mv.scope,
                 old.version if old else "none", by, reason)

    def rollback(self, task: str, by: str, reason: str, *, manufacturer: str = "",
                 scanner_model: str = "") -> ModelVersion:
        """Put back the version that was active in a scope before the current one.

        The current active version is retired. Repeated rollbacks walk further back.

        Returns
        -------
        ModelVersion
            The version active after the rollback.

        Raises
        ------
        StatusError
            If the scope has no active version or nothing earlier to return to.
        """
        scope = ScannerScope(manufacturer=manufacturer, model_name=scanner_model)
        with self._tx() as conn:
            current = self.active(task, scope)
            if current is None:
                raise StatusError(task, "rollback", f"no version is active for {scope}")
            stack = self._activation_stack(task, scope)
            if not stack or stack[-1] != current.version or len(stack) < 2:
                raise StatusError(current.version, "rollback",
                                  f"no earlier version was active for {task} ({scope})")
            target = self.get(stack[-2])
            if not target.path.is_dir():
                raise StatusError(target.version, "rollback", f"its directory {target.path} is missing")
            conn.execute("UPDATE model_versions SET status = 'retired' WHERE version = ?",
                         [current.version])
            conn.execute("UPDATE model_versions SET status = 'active' WHERE version = ?",
                         [target.version])
            self._audit(AuditAction.ROLLBACK, task, target.version, scope, by, reason,
                        current.version)
        LOG.info("rolled back %s (%s): %s -> %s; by %s: %s", task, scope, current.version,
                 target.version, by, reason)
        return self.get(target.version)

    def retire(self, version: str, by: str, reason: str) -> ModelVersion:
        """Take ``version`` out of service (and out of the rollback history).

        Retiring the active version leaves its scope without an active version:
        series then go to a less specific scope, if any.

        Raises
        ------
        VersionNotFoundError
        StatusError
            If it was already retired on purpose.
        """
        mv = self.get(version)
        with self._tx() as conn:
            standing = [e.action for e in self.audit(task=mv.task) if e.version == version
                        and e.action not in _NOTES]
            if standing and standing[-1] is AuditAction.RETIRE:
                raise StatusError(version, "retire", "it is already retired")
            conn.execute("UPDATE model_versions SET status = 'retired' WHERE version = ?", [version])
            self._audit(AuditAction.RETIRE, mv.task, version, mv.scope, by, reason)
        LOG.info("retired %s (was %s); by %s: %s", version, mv.status.value, by, reason)
        return self.get(version)

    def redact_patient(self, patient_key: str) -> list[str]:
        """Replace a twin's entries in the dataset manifests by an ``erased`` mark
        (``twin forget``): the manifest keeps how many series each version used and
        their split, not whose. Returns the versions whose manifest changed; the WAL is
        truncated afterwards (no old page keeps the key)."""
        changed = []
        with self._tx() as conn:
            rows = conn.execute("SELECT version, dataset_manifest FROM model_versions WHERE"
                                " dataset_manifest LIKE ?", (f"%{patient_key}%",)).fetchall()
            for version, text in rows:
                manifest = json.loads(text)
                for item in manifest.get("series", []) if isinstance(manifest, dict) else []:
                    if isinstance(item, dict) and item.get("patient_key") == patient_key:
                        item.update(patient_key="erased", study_uid="erased",
                                    series_uid="erased", case_id="erased")
                        if isinstance(item.get("label"), dict):
                            item["label"]["seg_sop_instance_uid"] = "erased"
                conn.execute("UPDATE model_versions SET dataset_manifest = ? WHERE version = ?",
                             (json.dumps(manifest, sort_keys=True), version))
                changed.append(version)
        checkpoint_truncate(self.db)
        return changed

    def _activation_stack(self, task: str, scope: ScannerScope) -> list[str]:
        """Replay the audit trail of one scope: promote pushes, rollback pops,
        retire removes. The top is the active version; below it, what a rollback
        returns to."""
        stack: list[str] = []
        key = (scope.manufacturer.casefold(), scope.model_name.casefold())
        for e in self.audit(task=task):
            if (e.scope.manufacturer.casefold(), e.scope.model_name.casefold()) != key:
                continue
            if e.action is AuditAction.PROMOTE:
                if e.version in stack:
                    stack.remove(e.version)
                stack.append(e.version)
            elif e.action is AuditAction.ROLLBACK and stack:
                stack.pop()
            elif e.action is AuditAction.RETIRE and e.version in stack:
                stack.remove(e.version)
        return stack

    def _audit(self, action: AuditAction, task: str, version: str, scope: ScannerScope, by: str,
               reason: str, previous: str | None = None) -> None:
        if not by or not by.strip():
            raise ValueError("by must name who made the change")
        insert_row(self.db.conn, "audit", {
            "at": iso(utc_now()), "action": action.value, "task": task, "version": version,
            "manufacturer": scope.manufacturer, "scanner_model": scope.model_name,
            "by": by.strip(), "reason": reason, "previous_version": previous})
