"""The register's rows and the records they hold, both ways (timestamps, labels,
intensity settings, model versions).
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry.records import (
    CodedConcept,
    IntensitySettings,
    LabelSpec,
    Metrics,
    ModelVersion,
    ScannerScope,
)


def insert_row(conn: sqlite3.Connection, table: str, row: Mapping[str, Any]) -> None:
    """Insert ``row`` (column -> value) into the register's ``table`` (a name of ours,
    never from outside) with one plain ``INSERT`` (``dicom_node.foundation.database`` says why not
    sqlite-utils' ``Table.insert``); the caller holds the write transaction."""
    placeholders = ", ".join("?" * len(row))
    conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({placeholders})",
                 tuple(row.values()))


def parse_ts(s: str) -> _dt.datetime:
    """A stored timestamp back (timezone-aware)."""
    return _dt.datetime.fromisoformat(s)


def version_from_row(r: Mapping[str, Any], data_dir: Path) -> ModelVersion:
    """A ``model_versions`` row as a :class:`ModelVersion` (paths under ``data_dir``)."""
    return ModelVersion(
        version=r["version"], task=r["task"], architecture=r["architecture"],
        labels=tuple(label_from_json(d) for d in json.loads(r["labels"])),
        modality=r["modality"],
        input_spacing=tuple(json.loads(r["input_spacing"])) if r["input_spacing"] else None,
        intensity=IntensitySettings(**json.loads(r["intensity"])) if r["intensity"] else None,
        created_at=parse_ts(r["created_at"]), status=r["status"],
        scope=ScannerScope(manufacturer=r["manufacturer"], model_name=r["scanner_model"]),
        device_uid=r["device_uid"], path=data_dir / r["path"],
        bundle_name=r["bundle_name"], bundle_version=r["bundle_version"],
        parent_version=r["parent_version"], dataset_manifest=r["dataset_manifest"],
        metrics=Metrics.from_json(r["metrics"]) if r["metrics"] else None)


def label_json(lab: LabelSpec) -> dict[str, Any]:
    """A label as stored in ``model_versions.labels``."""
    code = None if lab.code is None else {"value": lab.code.value, "meaning": lab.code.meaning,
                                          "scheme": lab.code.scheme}
    return {"value": lab.value, "name": lab.name, "code": code}


def label_from_json(d: Mapping[str, Any]) -> LabelSpec:
    """A stored label back."""
    code = CodedConcept(**d["code"]) if d.get("code") else None
    return LabelSpec(value=int(d["value"]), name=d["name"], code=code)


def intensity_json(i: IntensitySettings) -> dict[str, Any]:
    """Intensity settings as stored in ``model_versions.intensity``."""
    return {"a_min": i.a_min, "a_max": i.a_max, "b_min": i.b_min, "b_max": i.b_max, "clip": i.clip}
