"""Reading the register: model versions, which one serves a scanner, the audit trail.

A part of :class:`registry.store.Registry`, which holds the connection.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlite_utils

from registry.errors import NoActiveModelError, VersionNotFoundError
from registry.records import (
    AuditAction,
    AuditEntry,
    ModelStatus,
    ModelVersion,
    ScannerScope,
    check_task,
    check_version,
)
from registry.rows import parse_ts, version_from_row

LOG = logging.getLogger(__name__)


class VersionQueries:
    """The questions the register answers about versions and their history."""

    db: sqlite_utils.Database
    data_dir: Path
    models_dir: Path

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # the Registry's write transaction (registry.store)

    def get(self, version: str) -> ModelVersion:
        """The model version named ``version``.

        Raises
        ------
        VersionNotFoundError
            If no such version is registered.
        ValueError
            If ``version`` is not of the form ``<task>-v<n>``.
        """
        check_version(version)
        rows = list(self.db.execute("SELECT * FROM model_versions WHERE version = ?", [version]))
        if not rows:
            raise VersionNotFoundError(version)
        return self._to_version(rows[0])

    def list(self, task: str | None = None, status: ModelStatus | str | None = None
             ) -> list[ModelVersion]:
        """All versions, ordered by task and number, optionally filtered."""
        sql, args = "SELECT * FROM model_versions WHERE 1=1", []
        if task is not None:
            sql += " AND task = ?"
            args.append(check_task(task))
        if status is not None:
            sql += " AND status = ?"
            args.append(ModelStatus(status).value)
        sql += " ORDER BY task, number"
        return [self._to_version(r) for r in self.db.execute(sql, args)]

    def active(self, task: str, scope: ScannerScope | None = None) -> ModelVersion | None:
        """The active version of ``task`` for exactly this scanner scope, if any."""
        scope = scope or ScannerScope()
        rows = list(self.db.execute(
            "SELECT * FROM model_versions WHERE task = ? AND status = 'active' "
            "AND manufacturer = ? COLLATE NOCASE AND scanner_model = ? COLLATE NOCASE",
            [check_task(task), scope.manufacturer, scope.model_name]))
        return self._to_version(rows[0]) if rows else None

    def resolve(self, task: str, manufacturer: str | None = None,
                model_name: str | None = None) -> ModelVersion:
        """The active version that serves a series from a given scanner.

        The most specific scope that matches wins: manufacturer and model name over
        model name alone, over manufacturer alone, over the general model.

        Parameters
        ----------
        task : str
        manufacturer : str, optional
            The series' Manufacturer (0008,0070).
        model_name : str, optional
            The series' Manufacturer's Model Name (0008,1090).

        Raises
        ------
        NoActiveModelError
            If no active version of ``task`` matches.
        """
        best: ModelVersion | None = None
        for mv in self.list(task=task, status=ModelStatus.ACTIVE):
            if mv.scope.matches(manufacturer, model_name) and (
                    best is None or mv.scope.specificity > best.scope.specificity):
                best = mv
        if best is None:
            raise NoActiveModelError(task, manufacturer or "", model_name or "")
        LOG.debug("resolve %s for %s / %s -> %s (%s)", task, manufacturer, model_name,
                  best.version, best.scope)
        return best

    def audit(self, task: str | None = None, version: str | None = None) -> builtins.list[AuditEntry]:
        """Audit entries, oldest first, optionally for one task or one version."""
        sql, args = "SELECT * FROM audit WHERE 1=1", []
        if task is not None:
            sql += " AND task = ?"
            args.append(check_task(task))
        if version is not None:
            sql += " AND (version = ? OR previous_version = ?)"
            args += [version, version]
        sql += " ORDER BY id"
        return [AuditEntry(id=r["id"], at=parse_ts(r["at"]), action=r["action"], task=r["task"],
                           version=r["version"],
                           scope=ScannerScope(manufacturer=r["manufacturer"],
                                              model_name=r["scanner_model"]),
                           by=r["by"], reason=r["reason"], previous_version=r["previous_version"])
                for r in self.db.execute(sql, args)]

    def held_because(self, version: str) -> str | None:
        """The reason of the latest ``hold`` of ``version`` when it is still a candidate."""
        mv = self.get(version)
        if mv.status is not ModelStatus.CANDIDATE:
            return None
        holds = [e for e in self.audit(version=version) if e.action is AuditAction.HOLD]
        return holds[-1].reason if holds else None

    def in_shadow(self, version: str) -> bool:
        """Whether ``version`` is a candidate whose shadow mode is on."""
        mv = self.get(version)
        if mv.status is not ModelStatus.CANDIDATE:
            return False
        marks = [e.reason for e in self.audit(version=version) if e.action is AuditAction.SHADOW]
        return bool(marks) and marks[-1].startswith("start")

    def shadowing(self, task: str) -> builtins.list[ModelVersion]:
        """The candidates of ``task`` in shadow mode, oldest first."""
        return [mv for mv in self.list(task, ModelStatus.CANDIDATE) if self.in_shadow(mv.version)]

    def _to_version(self, r: Mapping[str, Any]) -> ModelVersion:
        return version_from_row(r, self.data_dir)
