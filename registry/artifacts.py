"""Artifact files of a version (weights, ONNX, TensorRT engines) and the recorded checks
of each backend: where a file goes, its SHA-256, its row.

The files are made on the compute side (:mod:`pipelines.export`); the registry places
them and keeps their records. A part of :class:`registry.store.Registry`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.durable import replace_durably
from registry.records import Artifact, ArtifactKind, Verification, check_version
from registry.rows import insert_row, parse_ts
from registry.versions import VersionQueries


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ArtifactRecords(VersionQueries):
    """The artifacts of each version and the checks of its backends."""

    def artifacts(self, version: str) -> list[Artifact]:
        """The artifacts registered for ``version`` (weights, ONNX, engines)."""
        mv = self.get(version)
        return [Artifact(version=r["version"], kind=r["kind"], path=self.data_dir / r["path"],
                         sha256=r["sha256"], created_at=parse_ts(r["created_at"]),
                         detail=r["detail"], key=r["key"])
                for r in self.db.execute("SELECT * FROM artifacts WHERE version = ? ORDER BY id",
                                       [mv.version])]

    def verifications(self, version: str) -> list[Verification]:
        """Recorded backend checks of ``version`` (agreement with PyTorch, speed)."""
        return [Verification(version=r["version"], backend=r["backend"],
                             device_name=r["device_name"], max_abs_diff=r["max_abs_diff"],
                             argmax_agreement=r["argmax_agreement"], median_ms=r["median_ms"],
                             shape=tuple(json.loads(r["shape"])), verified=bool(r["verified"]),
                             measured_at=parse_ts(r["measured_at"]), detail=r["detail"])
                for r in self.db.execute("SELECT * FROM verifications WHERE version = ? "
                                       "ORDER BY id", [check_version(version)])]

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
            insert_row(self.db.conn, "artifacts", {
                "version": artifact.version, "kind": artifact.kind.value, "path": str(rel),
                "sha256": artifact.sha256, "created_at": iso(artifact.created_at),
                "detail": artifact.detail, "key": artifact.key})
        return artifact

    def artifact_path(self, version: str, kind: ArtifactKind | str, key: str = "") -> Path:
        """Where the file of an optimised artifact of ``version`` lives in its directory:
        ``onnx/model.onnx``, ``tensorrt/<key>.plan``.

        Raises
        ------
        VersionNotFoundError
        ValueError
            If ``kind`` is not an optimised artifact (the weights come with the bundle),
            or a TensorRT engine has no ``key``.
        """
        mv = self.get(version)
        kind = ArtifactKind(kind)
        if kind is ArtifactKind.ONNX:
            return mv.path / "onnx" / "model.onnx"
        if kind is ArtifactKind.TENSORRT:
            if not key:
                raise ValueError("key must name the engine (see pipelines.export.tensorrt.engine_key)")
            return mv.path / "tensorrt" / f"{key}.plan"
        raise ValueError(f"kind must be onnx or tensorrt, got {kind.value}")

    def write_artifact_file(self, version: str, kind: ArtifactKind | str,
                            write: Callable[[Path], object], *, key: str = "") -> Path:
        """Write the file of an optimised artifact into its place (:meth:`artifact_path`).

        ``write(tmp)`` writes the file at a temporary path beside its place; one rename
        then puts it in place, so a failed write never leaves a half file where the
        registry looks. The file is registered by :meth:`record_artifact`.

        Returns
        -------
        pathlib.Path
            The file in its place.

        Raises
        ------
        VersionNotFoundError, ValueError
            As :meth:`artifact_path`.
        Exception
            Whatever ``write`` raises (the temporary file is removed).
        """
        final = self.artifact_path(version, kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.stem}.tmp{final.suffix}")
        try:
            write(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        replace_durably(tmp, final)
        return final

    def record_artifact(self, version: str, kind: ArtifactKind | str, path: Path, *,
                        detail: str, key: str = "") -> Artifact:
        """Register (or replace) the file at ``path`` as an artifact of ``version``, with
        its SHA-256 as it is now (see :meth:`add_artifact`)."""
        return self.add_artifact(Artifact(version=version, kind=ArtifactKind(kind), path=path,
                                          sha256=sha256_file(path), created_at=utc_now(),
                                          detail=detail, key=key))

    def record_verification(self, v: Verification) -> Verification:
        """Record (or replace) a backend check of a version on one device."""
        self.get(v.version)
        with self._tx() as conn:
            conn.execute("DELETE FROM verifications WHERE version = ? AND backend = ? "
                         "AND device_name = ?", [v.version, v.backend.value, v.device_name])
            insert_row(self.db.conn, "verifications", {
                "version": v.version, "backend": v.backend.value, "device_name": v.device_name,
                "max_abs_diff": v.max_abs_diff, "argmax_agreement": v.argmax_agreement,
                "median_ms": v.median_ms, "shape": json.dumps(list(v.shape)),
                "verified": int(v.verified), "measured_at": iso(v.measured_at),
                "detail": v.detail})
        return v
