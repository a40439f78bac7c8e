"""Registry store: real spleen bundle import, refusals, routing, promote/rollback/retire."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from registry.errors import (
    BundleError,
    NoActiveModelError,
    RegistryError,
    StatusError,
    VersionNotFoundError,
)
from registry.in_service import ActiveVersion, active_versions
from registry.records import AuditAction, Metrics, ModelStatus
from registry.store import Registry
from registry_bundles import edit_config, spleen_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return spleen_bundle(tmp_path_factory.mktemp("b") / "spleen_ct_segmentation")


def test_import_real_spleen_bundle_records_what_the_bundle_says(tmp_path: Path, bundle: Path) -> None:
    reg = Registry(tmp_path / "data")
    mv = reg.import_bundle(bundle, task="spleen-ct", by="tester")
    assert mv.version == "spleen-ct-v1" and mv.status is ModelStatus.CANDIDATE
    assert mv.architecture.startswith("monai.networks.nets.unet.UNet(")
    assert "channels=[16, 32, 64, 128, 256]" in mv.architecture
    assert [(lab.value, lab.name) for lab in mv.labels] == [(1, "spleen")]
    assert mv.labels[0].code is not None and mv.labels[0].code.value == "78961009"
    assert mv.modality == "CT" and mv.input_spacing == (1.5, 1.5, 2.0)
    assert mv.intensity is not None and (mv.intensity.a_min, mv.intensity.a_max) == (-57.0, 164.0)
    assert (mv.bundle_name, mv.bundle_version) == ("Spleen CT segmentation", "0.5.9")
    assert mv.path == tmp_path / "data" / "models" / "spleen-ct" / "spleen-ct-v1"
    assert (mv.path / "models" / "model.pt").is_file()
    assert (tmp_path / "data" / "registry.sqlite").is_file()
    mode = reg.db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    # a new Device UID per imported version
    mv2 = reg.import_bundle(bundle, task="spleen-ct", by="tester")
    assert mv2.version == "spleen-ct-v2" and mv2.device_uid != mv.device_uid
    # survives reopening
    reg.close()
    again = Registry(tmp_path / "data")
    assert again.get("spleen-ct-v1") == mv
    assert [a.action for a in again.audit()] == [AuditAction.IMPORT, AuditAction.IMPORT]
    with pytest.raises(VersionNotFoundError, match="spleen-ct-v9"):
        again.get("spleen-ct-v9")


def test_bundle_without_weights_is_refused_naming_the_file(tmp_path: Path, bundle: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "models" / "model.pt").unlink()
    reg = Registry(tmp_path / "data")
    with pytest.raises(BundleError) as err:
        reg.import_bundle(broken, task="spleen-ct", by="tester")
    msg = str(err.value)
    assert "models/model.pt" in msg and "missing weights" in msg and "copy the bundle's trained" in msg
    assert isinstance(err.value, RegistryError) and isinstance(err.value, ValueError)
    task_dir = tmp_path / "data" / "models" / "spleen-ct"
    assert reg.list() == [] and (not task_dir.exists() or not any(task_dir.iterdir()))


def test_unknown_network_is_refused_naming_the_config(tmp_path: Path, bundle: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    edit_config(broken, "inference.json",
                lambda d: d["network_def"].__setitem__("_target_", "NoSuchUNet"))
    reg = Registry(tmp_path / "data")
    with pytest.raises(BundleError) as err:
        reg.import_bundle(broken, task="spleen-ct", by="tester")
    msg = str(err.value)
    assert "configs/inference.json" in msg and "'network_def' cannot be built" in msg
    assert "NoSuchUNet" in msg and "set network_def._target_" in msg
    assert reg.list() == []


def test_labels_that_do_not_map_are_refused(tmp_path: Path, bundle: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    edit_config(broken, "metadata.json", lambda d: d["network_data_format"]["outputs"]["pred"]
                ["channel_def"].__setitem__("2", "liver"))
    with pytest.raises(BundleError, match=r"metadata.json: channel_def names 3 channels but the "
                                          r"network of inference.json \(model.pt\) outputs 2"):
        Registry(tmp_path / "data").import_bundle(broken, task="spleen-ct", by="tester")
    edit_config(broken, "metadata.json", lambda d: d["network_data_format"]["outputs"]["pred"]
                .pop("channel_def"))
    with pytest.raises(BundleError, match="channel_def is missing"):
        Registry(tmp_path / "data").import_bundle(broken, task="spleen-ct", by="tester")


def test_scanner_specific_routing_most_specific_wins(tmp_path: Path, bundle: Path) -> None:
    reg = Registry(tmp_path / "data")
    with pytest.raises(NoActiveModelError, match="no active model for task 'spleen-ct'"):
        reg.resolve("spleen-ct", "GE MEDICAL SYSTEMS", "HiSpeed Dual")
    general = reg.import_bundle(bundle, task="spleen-ct", activate=True, by="t")
    ge = reg.import_bundle(bundle, task="spleen-ct", activate=True, by="t",
                           manufacturer="GE MEDICAL SYSTEMS")
    dual = reg.import_bundle(bundle, task="spleen-ct", activate=True, by="t",
                             manufacturer="GE MEDICAL SYSTEMS", scanner_model="HiSpeed Dual")
    model_only = reg.import_bundle(bundle, task="spleen-ct", activate=True, by="t",
                                   scanner_model="SOMATOM Force")
    assert reg.resolve("spleen-ct", "GE MEDICAL SYSTEMS", "HiSpeed Dual").version == dual.version
    assert reg.resolve("spleen-ct", "ge medical  systems", "hispeed dual").version == dual.version
    assert reg.resolve("spleen-ct", "GE MEDICAL SYSTEMS", "Revolution").version == ge.version
    assert reg.resolve("spleen-ct", "SIEMENS", "SOMATOM Force").version == model_only.version
    assert reg.resolve("spleen-ct", "SIEMENS", "SOMATOM go").version == general.version
    assert reg.resolve("spleen-ct", None, None).version == general.version
    # retiring the specific one falls back to the manufacturer scope
    reg.retire(dual.version, "t", "bad on this scanner")
    assert reg.resolve("spleen-ct", "GE MEDICAL SYSTEMS", "HiSpeed Dual").version == ge.version
    with pytest.raises(NoActiveModelError):
        reg.resolve("liver-ct", "GE MEDICAL SYSTEMS", "HiSpeed Dual")
    # what status and /metrics read, read-only: the versions in service and their scopes
    assert active_versions(tmp_path / "data") == (
        ActiveVersion(task="spleen-ct", version=general.version, manufacturer="", model_name=""),
        ActiveVersion(task="spleen-ct", version=ge.version, manufacturer="GE MEDICAL SYSTEMS",
                      model_name=""),
        ActiveVersion(task="spleen-ct", version=model_only.version, manufacturer="",
                      model_name="SOMATOM Force"))
    assert active_versions(tmp_path / "none") == () and not (tmp_path / "none").exists()


def _active(reg: Registry) -> list[str]:
    return [m.version for m in reg.list(task="spleen-ct", status="active")]


def test_promote_rollback_retire_keep_one_active_and_leave_an_audit_trail(
        tmp_path: Path, bundle: Path) -> None:
    reg = Registry(tmp_path / "data")
    v1 = reg.import_bundle(bundle, task="spleen-ct", activate=True, by="alice", reason="first")
    v2 = reg.import_bundle(bundle, task="spleen-ct", by="alice")
    v3 = reg.import_bundle(bundle, task="spleen-ct", by="alice")
    assert _active(reg) == [v1.version]
    reg.promote(v2.version, "bob", "better Dice")
    assert _active(reg) == [v2.version] and reg.get(v1.version).status is ModelStatus.RETIRED
    reg.promote(v3.version, "bob", "better still")
    assert _active(reg) == [v3.version]
    with pytest.raises(StatusError, match="already active"):
        reg.promote(v3.version, "bob", "again")
    assert reg.rollback("spleen-ct", "carol", "v3 misses small spleens").version == v2.version
    assert _active(reg) == [v2.version]
    assert reg.rollback("spleen-ct", "carol", "v2 too").version == v1.version
    assert _active(reg) == [v1.version]
    with pytest.raises(StatusError, match="no earlier version"):
        reg.rollback("spleen-ct", "carol", "nothing left")
    assert _active(reg) == [v1.version]
    trail = [(e.action.value, e.version, e.previous_version, e.by, e.reason)
             for e in reg.audit(task="spleen-ct") if e.action.value != "import"]
    assert trail == [
        ("promote", v1.version, None, "alice", "first"),
        ("supersede", v1.version, v2.version, "bob", f"superseded by {v2.version}: better Dice"),
        ("promote", v2.version, v1.version, "bob", "better Dice"),
        ("supersede", v2.version, v3.version, "bob", f"superseded by {v3.version}: better still"),
        ("promote", v3.version, v2.version, "bob", "better still"),
        ("rollback", v2.version, v3.version, "carol", "v3 misses small spleens"),
        ("rollback", v1.version, v2.version, "carol", "v2 too"),
    ]
    assert all(e.at.tzinfo is not None for e in reg.audit())
    reg.retire(v1.version, "dave", "withdrawn")
    assert _active(reg) == []
    with pytest.raises(StatusError, match="already retired"):
        reg.retire(v1.version, "dave", "twice")
    with pytest.raises(ValueError, match="by must name"):
        reg.promote(v2.version, " ", "nobody")
    assert _active(reg) == []


def test_database_itself_refuses_two_active_versions_in_one_scope(tmp_path: Path, bundle: Path) -> None:
    reg = Registry(tmp_path / "data")
    reg.import_bundle(bundle, task="spleen-ct", activate=True, by="t")
    v2 = reg.import_bundle(bundle, task="spleen-ct", by="t")
    with pytest.raises(sqlite3.IntegrityError):
        with reg.db.conn:
            reg.db.conn.execute("UPDATE model_versions SET status='active' WHERE version=?",
                                [v2.version])
    assert _active(reg) == ["spleen-ct-v1"]


def test_register_candidate_and_metrics_for_the_trainer(tmp_path: Path, bundle: Path) -> None:
    reg = Registry(tmp_path / "data")
    parent = reg.import_bundle(bundle, task="spleen-ct", activate=True, by="t",
                               manufacturer="SIEMENS")
    manifest = {"studies": ["1.2.3.4", "1.2.3.5"], "split": "by patient"}
    metrics = Metrics(dice={"spleen": 0.91}, validation_set="sha256:abc")
    cand = reg.register_candidate(bundle, task="spleen-ct", parent_version=parent.version,
                                  dataset_manifest=manifest, metrics=metrics)
    assert cand.status is ModelStatus.CANDIDATE and cand.parent_version == parent.version
    assert cand.scope == parent.scope and cand.manifest() == manifest
    assert cand.metrics == metrics and cand.metrics.mean_dice == pytest.approx(0.91)
    assert cand.device_uid != parent.device_uid
    updated = reg.record_metrics(cand.version, Metrics(dice=[("spleen", 0.93)], validation_set="v2"))
    assert updated.metrics is not None and updated.metrics.validation_set == "v2"
    actions = [e.action for e in reg.audit(version=cand.version)]
    assert actions == [AuditAction.REGISTER, AuditAction.METRICS, AuditAction.METRICS]
    with pytest.raises(ValueError, match=r"dice\['spleen'\] must be in \[0, 1\]"):
        Metrics(dice={"spleen": 1.5}, validation_set="x")
    with pytest.raises(ValueError, match="task must be"):
        reg.import_bundle(bundle, task="Spleen CT", by="t")


def test_artifact_files_go_where_the_registry_says_and_a_failed_write_leaves_nothing(
        tmp_path: Path, bundle: Path) -> None:
    reg = Registry(tmp_path / "data")
    mv = reg.import_bundle(bundle, task="spleen-ct", by="tester")
    assert reg.artifact_path(mv.version, "onnx") == mv.path / "onnx" / "model.onnx"
    assert reg.artifact_path(mv.version, "tensorrt", "ab12") == mv.path / "tensorrt" / "ab12.plan"
    with pytest.raises(ValueError, match="key"):
        reg.artifact_path(mv.version, "tensorrt")
    with pytest.raises(ValueError, match="onnx or tensorrt"):
        reg.artifact_path(mv.version, "pytorch")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half an export")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        reg.write_artifact_file(mv.version, "onnx", half_then_fail)
    assert list((mv.path / "onnx").iterdir()) == []  # no half file, no temporary left
    assert [a.kind.value for a in reg.artifacts(mv.version)] == ["pytorch"]

    path = reg.write_artifact_file(mv.version, "onnx", lambda tmp: tmp.write_bytes(b"graph"))
    assert path.read_bytes() == b"graph" and list(path.parent.iterdir()) == [path]
    art = reg.record_artifact(mv.version, "onnx", path, detail="opset 17")
    assert reg.artifacts(mv.version)[-1] == art
    assert art.sha256 == hashlib.sha256(b"graph").hexdigest()


def test_an_unregistered_version_directory_is_named_and_left_alone(tmp_path: Path, bundle: Path) -> None:
    """The refusal says 'move it away': the import must not delete it itself."""
    reg = Registry(tmp_path / "data")
    stray = tmp_path / "data" / "models" / "spleen-ct" / "spleen-ct-v1"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("someone's files")
    with pytest.raises(RegistryError, match="exists but is not registered; move it away"):
        reg.import_bundle(bundle, task="spleen-ct", by="tester")
    assert (stray / "notes.txt").read_text() == "someone's files"
    assert reg.list() == [] and [p.name for p in stray.parent.iterdir()] == ["spleen-ct-v1"]
