"""Nightly learning on generated phantoms: labels, consent-gated datasets, training, promotion.

The whole loop runs against the real node (a ``dicom-node serve`` subprocess) with real
DICOM clients: studies of several patients arrive over C-STORE, some patients donate,
radiologist SEGs (highdicom, from the phantoms' exact truth, sent by a viewer's AE with
its own content creator) arrive for donors and non-donors, ``dicom-node train`` runs
with tiny settings, and the next study is served by the promoted version (its SR names
it). The other tests use the same real pieces in process: revocation before training,
a candidate that is not better, a label whose geometry does not fit, the scheduler's
job firing on its own (real APScheduler), the annotation queue and the de-identified
Decathlon export.

Tiny settings: 64 x 64 x 32 phantoms, a 3-level UNet with 8-32 channels, 32-voxel
patches, a few epochs; a run takes 10-30 s on two CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_client import send
from dicom_node.learning.label_intake import intake_seg_series
from dicom_node.settings import Settings
from dicom_node.tasks import default_tasks
from dicom_node.learning.training import NightlyScheduler, task_rules
from learning_helpers import labelled_patients, phantom_study, radiologist_seg, store_all, tiny_bundle
from loop_helpers import node_json
from node_harness import DICOM_NODE, REPO, NodeProcess
from registry.store import Registry
from trainer.dataset import build_dataset
from trainer.labelmaps import to_nifti
from trainer.child import run_in_subprocess
from trainer.nightly import NightlyConfig
from twin_archive import Archive
from twin_archive.audit import AuditEvent, AuditLog
from twin_archive.labels import LabelStore
from waiting import wait_until

TASK = "spleen-ct"
TINY = """
stable_after = 1.0
train_enabled = false
train_finetune_lr = 0.001
train_patch_size = 32
train_max_epochs = 5
train_min_patches_per_epoch = 0
train_time_budget_min = 10
train_promote_margin = 0.01
train_device = "cpu"
train_nice = 5
train_min_dice = 0.05
"""
# train_min_dice: the tiny 8-32-channel UNet of these tests reaches a mean Dice of about
# 0.1 in 5 epochs, far below the default quality floor (0.7) that now guards promotion;
# these tests check the loop's mechanics, the floor itself is tested in
# tests/test_quality_floor.py. train_min_patches_per_epoch = 0: an epoch is one visit of
# each volume, as before that setting (tests/test_trainer_train.py tests it).


def _install_tiny_active(data_dir: Path, tmp: Path) -> str:
    with Registry(data_dir) as reg:
        mv = reg.import_bundle(tiny_bundle(tmp / "tiny-bundle"), task=TASK, activate=True,
                               by="test", reason="tiny random-weight model (the one to beat)")
        return mv.version


def _cli(data_dir: Path, *args: str, config: Path | None = None, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    cfg = ["--config", str(config)] if config else []
    return subprocess.run([*DICOM_NODE, *cfg, "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, cwd=REPO, check=check, timeout=600)


@pytest.mark.slow
def test_whole_loop_over_dicom_labels_consent_training_promotion_and_serving(tmp_path: Path) -> None:
    data = tmp_path / "data"
    v1 = _install_tiny_active(data, tmp_path)
    node = NodeProcess(data, config=TINY).start()
    try:
        studies = {f"LRN-{i}": phantom_study(f"LRN-{i}", seed=20 + i) for i in range(7)}
        donors = ["LRN-0", "LRN-1", "LRN-2", "LRN-3", "LRN-4"]
        labelled = ["LRN-0", "LRN-1", "LRN-2", "LRN-3", "LRN-5"]  # LRN-5 does not donate
        for pid, (datasets, _) in studies.items():
            assert set(send(node.port, datasets, calling_ae="CT_SCANNER")) == {0}
        # radiologists' corrections come back from the reading room's viewer
        segs = {pid: radiologist_seg(studies[pid][0], studies[pid][1], creator="Rad^Rita")
                for pid in labelled}
        for seg in segs.values():
            assert send(node.port, [seg], calling_ae="READING_ROOM") == [0]
        for pid in donors:
            node.cli("twin", "consent", pid, "--donate", "--by", "test", "--reason", "form 12")

        def labels_now() -> int:
            with LabelStore(data) as store:
                return len(store.list())

        wait_until("five labels", lambda: labels_now() == 5, timeout=90)
        rows = node_json(node, "labels", "list")
        by_series = {r["series_uid"]: r for r in rows}
        for pid in labelled:
            lab = by_series[str(studies[pid][0][0].SeriesInstanceUID)]
            assert lab["source"] == "dicom-seg" and lab["current"]
            assert lab["calling_ae"] == "READING_ROOM" and lab["content_creator"] == "Rad^Rita"
            assert lab["seg_sop_instance_uid"] == str(segs[pid].SOPInstanceUID)
            assert lab["segments"] == ["Spleen"]
        # the SEGs became labels, never jobs; each CT became one job
        jobs = node_json(node, "jobs")
        assert {j["series_uid"] for j in jobs} == {str(d[0].SeriesInstanceUID)
                                                   for d, _ in studies.values()}
        show = node_json(node, "twin", "show", "LRN-0")
        assert [lab["seg_sop_instance_uid"] for lab in show["labels"]] == [
            str(segs["LRN-0"].SOPInstanceUID)]

        queue = node_json(node, "queue", "list", TASK)  # donated, unlabelled: LRN-4 only
        assert [q["series_uid"] for q in queue] == [str(studies["LRN-4"][0][0].SeriesInstanceUID)]

        cfg = data.parent / f"{data.name}-config.toml"
        run = _cli(data, "train", TASK, "--now", "--json", config=cfg)
        outcome = json.loads(run.stdout)
        assert outcome["outcome"] == "promoted", outcome
        v2 = outcome["candidate"]
        assert outcome["parent"] == v1 and outcome["active_before"] == v1
        assert outcome["candidate_dice"]["spleen"] > outcome["active_dice"]["spleen"] + 0.01

        with Registry(data) as reg:
            new = reg.get(v2)
            assert new.status.value == "active" and new.parent_version == v1
            assert new.metrics is not None and new.metrics.validation_set == outcome["validation_set"]
            old = reg.get(v1)
            assert old.metrics is not None and old.metrics.validation_set == outcome["validation_set"]
            manifest = new.manifest()
        in_manifest = {s["series_uid"] for s in manifest["series"]}
        with AuditLog(data) as log:
            promoted = [e for e in log.entries(event_type=AuditEvent.MODEL_PROMOTED) if e.what == v2]
            labelled = log.entries(event_type=AuditEvent.LABEL_IMPORTED)
        assert len(promoted) == 1 and promoted[0].who != ""
        assert {e.what for e in labelled} >= {str(studies[pid][0][0].SeriesInstanceUID) for pid in segs}
        assert in_manifest == {str(studies[p][0][0].SeriesInstanceUID) for p in
                               ("LRN-0", "LRN-1", "LRN-2", "LRN-3")}  # labelled donors only
        for s in manifest["series"]:
            assert len(s["label"]["sha256"]) == 64 and len(s["image_sha256"]) == 64
        assert {s["split"] for s in manifest["series"]} == {"train", "validation"}
        assert node_json(node, "twin", "show", "LRN-0")["trained_model_versions"] == [v2]
        assert node_json(node, "twin", "show", "LRN-5")["trained_model_versions"] == []

        # the next study is served by the new version, and its SR says so
        nxt, _ = phantom_study("LRN-9", seed=99)
        assert set(send(node.port, nxt, calling_ae="CT_SCANNER")) == {0}
        def results_now() -> tuple[dict, ...]:
            with Archive(data) as archive:
                return archive.twins.twin("LRN-9").results

        results = wait_until("a result for the next study", results_now, timeout=120)
        assert results[0]["model_version"] == v2
        sr_files = list((data / "results").rglob("sr-*.dcm"))
        texts = []
        for path in sr_files:
            ds = pydicom.dcmread(path)
            if ds.StudyInstanceUID == nxt[0].StudyInstanceUID:
                texts.append(str(ds))
        assert texts and any(v2 in t for t in texts)
    finally:
        node.stop()


def _prepared(tmp_path: Path, donors: int = 3, others: int = 1) -> tuple[Path, list[str]]:
    """An archive with labelled studies stored through the store path, a tiny active model."""
    data = tmp_path / "data"
    with Archive(data) as archive, LabelStore(data) as labels:
        pids = [f"IN-{i}" for i in range(donors + others)]
        labelled_patients(archive, labels, pids, seed=40, donors=donors)
    _install_tiny_active(data, tmp_path)
    return data, pids


def test_revocation_before_training_and_a_candidate_that_is_not_better(tmp_path: Path) -> None:
    data, pids = _prepared(tmp_path, donors=4)
    rules = task_rules(TASK, default_tasks())
    with Archive(data) as archive, LabelStore(data) as labels:
        before = build_dataset(archive, labels, TASK, rules)
        archive.twins.set_consent("IN-3", donate=False, by="test", reason="withdrawn")
        after = build_dataset(archive, labels, TASK, rules)
        revoked_key = archive.twins.find_twin_keys("IN-3")[0]
    assert revoked_key in before.patients and revoked_key not in after.patients
    assert len(after.items) == 3 and len(after.validation) >= 1
    # a margin no model can meet: the candidate stays a candidate, with its metrics
    config = NightlyConfig(finetune_lr=1e-3, max_epochs=2, patch_size=32, time_budget_s=300,
                           margin=0.99, device="cpu")
    outcome = run_in_subprocess(data, TASK, rules, config, nice=5)
    assert outcome.outcome == "candidate" and "not better" in outcome.reason
    with Registry(data) as reg:
        cand = reg.get(outcome.candidate or "")
        assert cand.status.value == "candidate" and cand.parent_version == "spleen-ct-v1"
        assert cand.metrics is not None and cand.metrics.dice
        assert reg.active(TASK).version == "spleen-ct-v1"  # type: ignore[union-attr]
        keys = {s["patient_key"] for s in cand.manifest()["series"]}
    assert revoked_key not in keys and len(keys) == 3
    with Archive(data) as archive:
        assert archive.twins.twin("IN-3").trained_model_versions == ()
        assert archive.twins.twin("IN-0").trained_model_versions == (cand.version,)


def test_label_import_checks_geometry_and_the_newest_label_is_current(tmp_path: Path) -> None:
    data, _ = _prepared(tmp_path, donors=1, others=0)
    datasets, truth = phantom_study("IMP-1", seed=77)
    with Archive(data) as archive:
        store_all(archive, datasets)
    from pipelines.volume import load_series

    volume = load_series(datasets)
    series = str(datasets[0].SeriesInstanceUID)
    good = to_nifti(truth, volume.affine, dtype=np.uint8)
    nib.save(good, tmp_path / "good.nii.gz")
    moved = good.affine.copy()
    moved[:3, 3] += (4.0, 0.0, 0.0)  # 4 mm off: a mask from another reconstruction
    nib.save(nib.Nifti1Image(np.asarray(good.dataobj), moved), tmp_path / "shifted.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(good.dataobj)[:, :, :-2], good.affine),
             tmp_path / "short.nii.gz")

    bad = _cli(data, "labels", "import", "IMP-1", series, str(tmp_path / "shifted.nii.gz"),
               "--label", "spleen", check=False)
    assert bad.returncode != 0 and "does not match the geometry" in bad.stderr
    assert "mm off the series" in bad.stderr
    short = _cli(data, "labels", "import", "IMP-1", series, str(tmp_path / "short.nii.gz"),
                 "--label", "spleen", check=False)
    assert short.returncode != 0 and "shape" in short.stderr
    other = _cli(data, "labels", "import", "IN-0", series, str(tmp_path / "good.nii.gz"),
                 "--label", "spleen", check=False)
    assert other.returncode != 0 and "does not belong to patient" in other.stderr
    assert json.loads(_cli(data, "labels", "list", "--json").stdout)[-1]["series_uid"] != series

    ok = _cli(data, "labels", "import", "IMP-1", series, str(tmp_path / "good.nii.gz"),
              "--label", "spleen", "--by", "annotator-7")
    assert "recorded" in ok.stdout
    with AuditLog(data) as log:
        imported = log.entries(event_type=AuditEvent.LABEL_IMPORTED)
    assert [(e.who, e.what) for e in imported if e.detail["via"] == "labels import"] == [
        ("annotator-7", series)]
    # a radiologist's SEG arrives later: it becomes current, the import is kept
    seg = radiologist_seg(datasets, truth, creator="Rad^Later")
    with Archive(data) as archive, LabelStore(data) as labels:
        store_all(archive, [seg], "READING_ROOM")
        intake_seg_series(archive.twins.series_files(str(seg.SeriesInstanceUID)), labels)
        history = labels.for_series(series)
    assert [(h.source, h.current) for h in history] == [("nifti-import", False), ("dicom-seg", True)]
    assert history[0].content_creator == "annotator-7"
    # the node's own SEG echoed back by a PACS is never a label
    from pipelines.types import NODE_MANUFACTURER

    ours = radiologist_seg(datasets, truth)
    ours.Manufacturer = NODE_MANUFACTURER
    with Archive(data) as archive, LabelStore(data) as labels:
        store_all(archive, [ours], "PACS")
        decision = intake_seg_series(archive.twins.series_files(str(ours.SeriesInstanceUID)), labels)
    assert decision.decision == "ignored" and "produced by this node" in decision.reason


def test_a_mask_file_nibabel_reads_but_not_as_an_image_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A GIfTI surface (``.gii``) loads in nibabel but has no grid: one refusal line, no
    traceback (found by mypy: ``nib.load`` returns any file image, not only NIfTI)."""
    from dicom_node.cli import main
    from pipelines.volume import load_series
    from trainer.labelmaps import LabelContentError, mask_from_file

    data = tmp_path / "data"
    datasets, _ = phantom_study("GII-1", seed=5)
    with Archive(data) as archive:
        store_all(archive, datasets)
    series = str(datasets[0].SeriesInstanceUID)
    surface = tmp_path / "mask.gii"
    nib.save(nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(np.zeros(8, np.float32))]),
             surface)
    rc = main(["--data-dir", str(data), "labels", "import", "GII-1", series, str(surface),
               "--label", "spleen"])
    assert rc != 0 and "not a NIfTI image" in capsys.readouterr().err
    with pytest.raises(LabelContentError, match="not a NIfTI image"):
        mask_from_file(surface, load_series(datasets), {1: "spleen"}, ("spleen",))


def test_nightly_job_fires_from_the_scheduler_and_skips_without_new_labels(tmp_path: Path) -> None:
    data, _ = _prepared(tmp_path, donors=3, others=0)
    at = datetime.now() + timedelta(seconds=3)
    settings = Settings(data_dir=data, train_at=at.strftime("%H:%M:%S"), train_min_new_series=3,
                        train_finetune_lr=1e-3, train_patch_size=32, train_max_epochs=2,
                        train_min_patches_per_epoch=0,
                        train_time_budget_min=5, train_device="cpu", train_nice=5)
    sched = NightlyScheduler(settings)
    sched.start()
    try:
        job = sched.scheduler.get_job("nightly-training")
        assert job is not None and job.next_run_time.strftime("%H:%M:%S") == settings.train_at
        wait_until("the nightly job to run", lambda: sched.runs, timeout=240, poll=1.0)
        (task, summary), = sched.runs[0].results
        assert task == TASK and "spleen-ct-v2" in summary
        with Registry(data) as reg:
            v2 = reg.get("spleen-ct-v2")
            assert v2.manifest()["patients"] == 3
        # nothing new since: the next firing trains nothing
        again = sched.run_nightly()
        assert "skipped: 0 new labelled series" in again.results[0][1]
    finally:
        sched.stop()


def test_annotation_queue_export_and_deidentified_decathlon_export(tmp_path: Path) -> None:
    data, pids = _prepared(tmp_path, donors=2, others=1)
    unlabelled, _ = phantom_study("Q-1", seed=61)
    with Archive(data) as archive:
        store_all(archive, unlabelled)
        archive.twins.set_consent("Q-1", donate=True, by="test")
    out = _cli(data, "queue", "export", TASK, str(tmp_path / "queue"))
    assert "1 case(s)" in out.stdout and "1 with a pre-segmentation" in out.stdout
    queue = json.loads((tmp_path / "queue" / "queue.json").read_text())
    (case,) = queue["cases"]
    assert case["patient_id"] == "Q-1" and case["series_uid"] == str(unlabelled[0].SeriesInstanceUID)
    pre = nib.load(tmp_path / "queue" / case["preseg"])
    img = nib.load(tmp_path / "queue" / case["image"])
    assert pre.shape == img.shape == (64, 64, 32) and np.allclose(pre.affine, img.affine)

    export = tmp_path / "msd"
    _cli(data, "dataset", "export", TASK, str(export))
    desc = json.loads((export / "dataset.json").read_text())
    assert desc["labels"] == {"0": "background", "1": "spleen"} and desc["numTraining"] == 2
    assert len(desc["training"]) + len(desc["validation"]) == 2 and desc["validation"]
    names = sorted(p.name for p in (export / "imagesTr").iterdir())
    assert names == sorted(p.name for p in (export / "labelsTr").iterdir()) == \
        ["case_0001.nii.gz", "case_0002.nii.gz"]
    text = (export / "dataset.json").read_text()
    with AuditLog(data) as log:
        exports = log.entries(event_type=AuditEvent.DATASET_EXPORTED)
    assert [(e.what, e.detail["cases"]) for e in exports] == [(TASK, 2)]
    for pid in pids:
        assert pid not in text
    with Archive(data) as archive:
        for t in archive.twins.list_twins():
            assert t.patient_id not in text and t.patient_key not in text
            for st in archive.twins.twin(t.patient_id).studies:
                assert st.study_uid not in text and st.study_date not in text
                assert all(se.series_uid not in text for se in st.series)
    for path in list((export / "imagesTr").iterdir()) + list((export / "labelsTr").iterdir()):
        hdr = nib.load(path).header
        assert all(bytes(hdr[f]).strip(b"\x00 ") == b"" for f in ("descrip", "aux_file", "db_name"))
    lab = nib.load(export / "labelsTr" / "case_0001.nii.gz")
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) == {0, 1}


def test_patient_split_is_deterministic_exact_and_never_empty() -> None:
    from trainer.dataset import split_patients

    keys = [f"{i:032x}" for i in range(50)]
    split = split_patients(keys, validation_fraction=0.2, salt=TASK)
    assert split == split_patients(list(reversed(keys)), validation_fraction=0.2, salt=TASK)
    assert sum(v == "validation" for v in split.values()) == 10  # 80/20 exactly
    other = split_patients(keys, validation_fraction=0.2, salt="another-task")
    assert other != split  # the salt decides, not the order of the keys
    two = split_patients(keys[:2], validation_fraction=0.2, salt=TASK)
    assert sorted(two.values()) == ["train", "validation"]


def test_training_settings_are_validated_per_key(tmp_path: Path) -> None:
    from dicom_node.foundation.errors import ConfigError
    from dicom_node.settings import load_settings

    cfg = tmp_path / "node.toml"
    cfg.write_text('train_at = "03:15"\ntrain_min_new_series = 2\ntrain_enabled = false\n')
    s = load_settings(cfg, env={})
    assert (s.train_at, s.train_min_new_series, s.train_enabled) == ("03:15", 2, False)
    for key, value in (("train_at", "25:00"), ("train_at", "2am"), ("train_nice", 40),
                       ("train_promote_margin", -0.1), ("train_device", "tpu"),
                       ("train_min_new_series", 0)):
        with pytest.raises(ConfigError, match=key):
            Settings(**{key: value})


def _trainers(pid: int) -> list[int]:
    """The children of ``pid`` that run ``trainer.child`` (exec done)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            try:
                if b"trainer.child" in Path(f"/proc/{child}/cmdline").read_bytes():
                    out.append(int(child))
            except OSError:
                continue
    return out


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is no zombie (a dead child nobody reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_training_child_dies_with_its_killed_parent(tmp_path: Path) -> None:
    """Issue 30: ``dicom-node train --now`` (the nightly job's way to train) SIGKILLed
    while its child trains: the child is gone too (parent-death signal), and does not
    write to the data directory after the node and its lock are gone."""
    data, _ = _prepared(tmp_path, donors=3)
    cfg = tmp_path / "node.toml"
    cfg.write_text(TINY)
    parent = subprocess.Popen([*DICOM_NODE, "--config", str(cfg), "--data-dir", str(data), "train",
                               TASK, "--now", "--epochs", "100000"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        children = wait_until("the training child", lambda: _trainers(parent.pid), 120, 0.05)
        parent.kill()
        parent.wait()
        wait_until("the training child gone with its parent",
                   lambda: not any(_running(c) for c in children), 10, 0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
        for child in children:
            if _running(child):
                os.kill(child, signal.SIGKILL)
