"""The register of model versions: SQLite (via sqlite-utils) plus artifacts on disk.

Layout under the data directory::

    <data-dir>/registry.sqlite               the register (WAL mode)
    <data-dir>/models/<task>/<version>/      a copy of the bundle (configs/, models/)
        onnx/model.onnx                      optimised artifacts, when built
        tensorrt/<key>.plan

Every change that writes more than one row (a version and its audit entry, a promote
that demotes the previous version) is one transaction. Exactly one version is active
per task and scanner scope; a partial unique index in the database enforces it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import secrets
import shutil
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlite_utils
from pydicom.uid import generate_uid

from dicom_node.database import Migration, connect, migrate, utc_now, write
from registry.errors import NoActiveModelError, RegistryError, StatusError, VersionNotFoundError
from registry.records import (
    Artifact,
    ArtifactKind,
    AuditAction,
    AuditEntry,
    CodedConcept,
    IntensitySettings,
    LabelSpec,
    Metrics,
    ModelStatus,
    ModelVersion,
    ScannerScope,
    Verification,
    check_task,
    check_version,
)

LOG = logging.getLogger(__name__)

DB_NAME = "registry.sqlite"

#: Audit actions that note something about a version without changing its standing.
_NOTES = (AuditAction.METRICS, AuditAction.HOLD, AuditAction.SHADOW)

# The register's schema, migration 1 (dicom_node.database.migrate records it).
_M1 = """
    CREATE TABLE model_versions (
        version TEXT PRIMARY KEY,
        task TEXT NOT NULL,
        number INTEGER NOT NULL,
        architecture TEXT NOT NULL,
        labels TEXT NOT NULL,
        modality TEXT NOT NULL DEFAULT '',
        input_spacing TEXT,
        intensity TEXT,
        created_at TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('candidate', 'active', 'retired')),
        manufacturer TEXT NOT NULL DEFAULT '',
        scanner_model TEXT NOT NULL DEFAULT '',
        device_uid TEXT NOT NULL UNIQUE,
        path TEXT NOT NULL,
        bundle_name TEXT NOT NULL DEFAULT '',
        bundle_version TEXT NOT NULL DEFAULT '',
        parent_version TEXT REFERENCES model_versions(version),
        dataset_manifest TEXT,
        metrics TEXT,
        UNIQUE (task, number)
    );
    CREATE UNIQUE INDEX one_active_per_scope ON model_versions
        (task, manufacturer COLLATE NOCASE, scanner_model COLLATE NOCASE)
        WHERE status = 'active';
    CREATE TABLE artifacts (
        id INTEGER PRIMARY KEY,
        version TEXT NOT NULL REFERENCES model_versions(version),
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        created_at TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        key TEXT NOT NULL DEFAULT '',
        UNIQUE (version, kind, key)
    );
    CREATE TABLE verifications (
        id INTEGER PRIMARY KEY,
        version TEXT NOT NULL REFERENCES model_versions(version),
        backend TEXT NOT NULL,
        device_name TEXT NOT NULL,
        max_abs_diff REAL NOT NULL,
        argmax_agreement REAL NOT NULL,
        median_ms REAL NOT NULL,
        shape TEXT NOT NULL,
        verified INTEGER NOT NULL,
        measured_at TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        UNIQUE (version, backend, device_name)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        action TEXT NOT NULL,
        task TEXT NOT NULL,
        version TEXT NOT NULL,
        manufacturer TEXT NOT NULL DEFAULT '',
        scanner_model TEXT NOT NULL DEFAULT '',
        by TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        previous_version TEXT
    );
    CREATE INDEX audit_task ON audit (task, id);
"""


def _m1_initial(db: sqlite_utils.Database) -> None:
    for statement in _M1.split(";"):
        if statement.strip():
            db.conn.execute(statement)


_MIGRATIONS: tuple[Migration, ...] = (_m1_initial,)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ts(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds")


def _parse_ts(s: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(s)


class Registry:
    """The model registry of one node.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The node's data directory; created if missing. The register is
        ``<data_dir>/registry.sqlite`` and artifacts live under ``<data_dir>/models``.

    Notes
    -----
    One instance per thread (it holds one SQLite connection). Several processes may
    share a data directory: writes take SQLite's write lock up front
    (``BEGIN IMMEDIATE``) and wait up to 30 s for it.
    """

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.models_dir = self.data_dir / "models"
        self.db_path = self.data_dir / DB_NAME
        self.db = connect(self.db_path, timeout_s=30.0)
        migrate(self.db, _MIGRATIONS, name=f"registry {self.db_path}")

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions and schema ------------------------------------------------------

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction on the register (:func:`dicom_node.database.write`):
        write lock taken up front, nested calls join it."""
        return write(self.db)

    # -- reading ----------------------------------------------------------------------

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
        rows = list(self.db.query("SELECT * FROM model_versions WHERE version = ?", [version]))
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
        return [self._to_version(r) for r in self.db.query(sql, args)]

    def active(self, task: str, scope: ScannerScope | None = None) -> ModelVersion | None:
        """The active version of ``task`` for exactly this scanner scope, if any."""
        scope = scope or ScannerScope()
        rows = list(self.db.query(
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

    def audit(self, task: str | None = None, version: str | None = None) -> list[AuditEntry]:
        """Audit entries, oldest first, optionally for one task or one version."""
        sql, args = "SELECT * FROM audit WHERE 1=1", []
        if task is not None:
            sql += " AND task = ?"
            args.append(check_task(task))
        if version is not None:
            sql += " AND (version = ? OR previous_version = ?)"
            args += [version, version]
        sql += " ORDER BY id"
        return [AuditEntry(id=r["id"], at=_parse_ts(r["at"]), action=r["action"], task=r["task"],
                           version=r["version"],
                           scope=ScannerScope(manufacturer=r["manufacturer"],
                                              model_name=r["scanner_model"]),
                           by=r["by"], reason=r["reason"], previous_version=r["previous_version"])
                for r in self.db.query(sql, args)]

    def artifacts(self, version: str) -> list[Artifact]:
        """The artifacts registered for ``version`` (weights, ONNX, engines)."""
        mv = self.get(version)
        return [Artifact(version=r["version"], kind=r["kind"], path=self.data_dir / r["path"],
                         sha256=r["sha256"], created_at=_parse_ts(r["created_at"]),
                         detail=r["detail"], key=r["key"])
                for r in self.db.query("SELECT * FROM artifacts WHERE version = ? ORDER BY id",
                                       [mv.version])]

    def verifications(self, version: str) -> list[Verification]:
        """Recorded backend checks of ``version`` (agreement with PyTorch, speed)."""
        return [Verification(version=r["version"], backend=r["backend"],
                             device_name=r["device_name"], max_abs_diff=r["max_abs_diff"],
                             argmax_agreement=r["argmax_agreement"], median_ms=r["median_ms"],
                             shape=tuple(json.loads(r["shape"])), verified=bool(r["verified"]),
                             measured_at=_parse_ts(r["measured_at"]), detail=r["detail"])
                for r in self.db.query("SELECT * FROM verifications WHERE version = ? "
                                       "ORDER BY id", [check_version(version)])]

    # -- adding versions --------------------------------------------------------------

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
        # Parsing a bundle loads torch and MONAI: imported here, when a model is added,
        # so that reading the register (the DICOM listener, `status`) does not load them.
        from registry.bundle import open_bundle

        check_task(task)
        src = Path(bundle_dir).resolve()
        open_bundle(src)  # refuse a broken bundle before copying anything
        task_dir = self.models_dir / task
        task_dir.mkdir(parents=True, exist_ok=True)
        incoming = task_dir / f".incoming-{secrets.token_hex(8)}"
        shutil.copytree(src, incoming, ignore=shutil.ignore_patterns("eval", "__pycache__",
                                                                     "onnx", "tensorrt"))
        final: Path | None = None
        try:
            bundle = open_bundle(incoming)
            info = bundle.info
            now = utc_now()
            with self._tx() as conn:
                n = conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM model_versions "
                                 "WHERE task = ?", [task]).fetchone()[0]
                version = f"{task}-v{n}"
                final = task_dir / version
                if final.exists():
                    raise RegistryError(f"{final} exists but is not registered; move it away")
                incoming.rename(final)
                weights = final / info.weights_file.relative_to(incoming)
                row = {
                    "version": version, "task": task, "number": n,
                    "architecture": info.architecture,
                    "labels": json.dumps([_label_json(lab) for lab in info.labels]),
                    "modality": info.modality,
                    "input_spacing": json.dumps(info.input_spacing) if info.input_spacing else None,
                    "intensity": json.dumps(_intensity_json(info.intensity)) if info.intensity else None,
                    "created_at": _ts(now), "status": ModelStatus.CANDIDATE.value,
                    "manufacturer": scope.manufacturer, "scanner_model": scope.model_name,
                    "device_uid": generate_uid(),
                    "path": str(final.relative_to(self.data_dir)),
                    "bundle_name": info.name, "bundle_version": info.version,
                    "parent_version": parent, "dataset_manifest": manifest,
                    "metrics": metrics.to_json() if metrics else None,
                }
                self.db["model_versions"].insert(row)
                kind = ArtifactKind.TORCHSCRIPT if weights.suffix == ".ts" else ArtifactKind.PYTORCH
                self.db["artifacts"].insert({
                    "version": version, "kind": kind.value,
                    "path": str(weights.relative_to(self.data_dir)),
                    "sha256": sha256_file(weights), "created_at": _ts(now),
                    "detail": f"from {src}", "key": ""})
                self._audit(action, task, version, scope, by,
                            reason or f"{action.value} of {info.name} {info.version} from {src}",
                            parent)
                if metrics is not None:
                    self._audit(AuditAction.METRICS, task, version, scope, by,
                                f"mean Dice {metrics.mean_dice:.4f} on {metrics.validation_set}")
                if activate:
                    self._promote_in_tx(version, by=by, reason=reason or "activated on import")
        except BaseException:
            if final is not None and final.exists():
                shutil.rmtree(final, ignore_errors=True)
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        mv = self.get(version)
        LOG.info("registered %s (%s, %s, scope %s, device UID %s)", mv.version, mv.status.value,
                 mv.architecture.split("(")[0], mv.scope, mv.device_uid)
        return mv

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

    def add_artifact(self, artifact: Artifact) -> Artifact:
        """Register (or replace) an artifact file of a version; the file must exist
        under the data directory.

        Raises
        ------
        VersionNotFoundError, ValueError
        """
        self.get(artifact.version)
        path = artifact.path.resolve()
        try:
            rel = path.relative_to(self.data_dir.resolve())
        except ValueError:
            raise ValueError(f"artifact path {path} is not under {self.data_dir}") from None
        if not path.is_file():
            raise ValueError(f"artifact path {path} does not exist")
        with self._tx() as conn:
            conn.execute("DELETE FROM artifacts WHERE version = ? AND kind = ? AND key = ?",
                         [artifact.version, artifact.kind.value, artifact.key])
            self.db["artifacts"].insert({
                "version": artifact.version, "kind": artifact.kind.value, "path": str(rel),
                "sha256": artifact.sha256, "created_at": _ts(artifact.created_at),
                "detail": artifact.detail, "key": artifact.key})
        return artifact

    def record_verification(self, v: Verification) -> Verification:
        """Record (or replace) a backend check of a version on one device."""
        self.get(v.version)
        with self._tx() as conn:
            conn.execute("DELETE FROM verifications WHERE version = ? AND backend = ? "
                         "AND device_name = ?", [v.version, v.backend.value, v.device_name])
            self.db["verifications"].insert({
                "version": v.version, "backend": v.backend.value, "device_name": v.device_name,
                "max_abs_diff": v.max_abs_diff, "argmax_agreement": v.argmax_agreement,
                "median_ms": v.median_ms, "shape": json.dumps(list(v.shape)),
                "verified": int(v.verified), "measured_at": _ts(v.measured_at),
                "detail": v.detail})
        return v

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

    def held_because(self, version: str) -> str | None:
        """The reason of the latest ``hold`` of ``version`` when it is still a candidate."""
        mv = self.get(version)
        if mv.status is not ModelStatus.CANDIDATE:
            return None
        holds = [e for e in self.audit(version=version) if e.action is AuditAction.HOLD]
        return holds[-1].reason if holds else None

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

    def in_shadow(self, version: str) -> bool:
        """Whether ``version`` is a candidate whose shadow mode is on."""
        mv = self.get(version)
        if mv.status is not ModelStatus.CANDIDATE:
            return False
        marks = [e.reason for e in self.audit(version=version) if e.action is AuditAction.SHADOW]
        return bool(marks) and marks[-1].startswith("start")

    def shadowing(self, task: str) -> list[ModelVersion]:
        """The candidates of ``task`` in shadow mode, oldest first."""
        return [mv for mv in self.list(task, ModelStatus.CANDIDATE) if self.in_shadow(mv.version)]

    # -- status changes ---------------------------------------------------------------

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
        self.db["audit"].insert({
            "at": _ts(utc_now()), "action": action.value, "task": task, "version": version,
            "manufacturer": scope.manufacturer, "scanner_model": scope.model_name,
            "by": by.strip(), "reason": reason, "previous_version": previous})

    # -- rows to records --------------------------------------------------------------

    def _to_version(self, r: Mapping[str, Any]) -> ModelVersion:
        return ModelVersion(
            version=r["version"], task=r["task"], architecture=r["architecture"],
            labels=tuple(_label_from_json(d) for d in json.loads(r["labels"])),
            modality=r["modality"],
            input_spacing=tuple(json.loads(r["input_spacing"])) if r["input_spacing"] else None,
            intensity=IntensitySettings(**json.loads(r["intensity"])) if r["intensity"] else None,
            created_at=_parse_ts(r["created_at"]), status=r["status"],
            scope=ScannerScope(manufacturer=r["manufacturer"], model_name=r["scanner_model"]),
            device_uid=r["device_uid"], path=self.data_dir / r["path"],
            bundle_name=r["bundle_name"], bundle_version=r["bundle_version"],
            parent_version=r["parent_version"], dataset_manifest=r["dataset_manifest"],
            metrics=Metrics.from_json(r["metrics"]) if r["metrics"] else None)


def _label_json(lab: LabelSpec) -> dict[str, Any]:
    code = None if lab.code is None else {"value": lab.code.value, "meaning": lab.code.meaning,
                                          "scheme": lab.code.scheme}
    return {"value": lab.value, "name": lab.name, "code": code}


def _label_from_json(d: Mapping[str, Any]) -> LabelSpec:
    code = CodedConcept(**d["code"]) if d.get("code") else None
    return LabelSpec(value=int(d["value"]), name=d["name"], code=code)


def _intensity_json(i: IntensitySettings) -> dict[str, Any]:
    return {"a_min": i.a_min, "a_max": i.a_max, "b_min": i.b_min, "b_max": i.b_max, "clip": i.clip}


__all__ = ["DB_NAME", "Registry", "sha256_file"]
