"""Tasks as configuration: ``[[tasks]]`` tables, their one-line mistakes, ``tasks list`` /
``tasks explain``, the new rules (slice thickness, manufacturer), jobs waiting for a model
in the queue, and radiologist SEGs that become labels of each task whose labels they name.

Everything runs on real files: TOML files read by the settings loader, the real
``dicom-node`` command in a subprocess, a real registry with the Model Zoo spleen configs
(tiny, random weights), the archive's own store path and highdicom SEGs.
"""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.sr.codedict import codes

from dicom_node.foundation.errors import ConfigError
from dicom_node.foundation.clock import iso, utc_now
from dicom_node.queue.jobs import JobQueue, JobState
from dicom_node.learning.label_intake import TaskLabelIntake
from dicom_node.settings import Settings, load_settings
from dicom_node.tasks import Task, default_tasks, parse_tasks
from learning_helpers import organ_seg, phantom_study, store_all
from loop_helpers import small_study, write_files
from node_harness import DICOM_NODE, REPO
from pipelines import phantom as ph
from pipelines.selection import SelectionRules, matches
from registry.store import Registry
from registry_bundles import organ_bundle
from trainer.dataset import build_dataset
from trainer.export import annotation_queue
from twin_archive import Archive
from twin_archive.labels import LabelStore

EXAMPLE = r"""
[[tasks]]
name = "wholebody-ct"              # the registry task whose active model serves it
modality = "CT"
body_parts = ["*"]                 # glob patterns on Body Part Examined
accept_missing_body_part = true
exclude_series_descriptions = ['\bscout\b', 'locali[sz]er', 'dose\s*report']  # regexes
min_slices = 16
max_slice_thickness_mm = 5.0       # optional
manufacturers = []                 # optional filter
outputs = ["seg", "sr", "overlay"] # optional; destination profiles still apply
enabled = true
"""


def _load(tmp_path: Path, text: str) -> Settings:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    return load_settings(cfg, env={})


def test_the_issue_example_is_one_frozen_task_and_replaces_the_default(tmp_path: Path) -> None:
    settings = _load(tmp_path, EXAMPLE)
    [task] = settings.tasks
    assert task.name == "wholebody-ct" and task.enabled and task.max_slice_thickness_mm == 5.0
    assert task.rules.body_part_patterns == ("*",) and task.rules.accept_missing_body_part
    with pytest.raises(AttributeError):
        task.min_slices = 3  # type: ignore[misc]
    # no [[tasks]]: the shipped default, spleen-ct with the rules it always had
    [default] = _load(tmp_path, "stable_after = 2\n").tasks
    assert default == default_tasks()[0] and default.name == "spleen-ct"
    assert default.rules == SelectionRules(
        name="spleen-ct", modality="CT", body_part_patterns=("ABDOMEN*", "CHEST*", "*ABD*"),
        accept_missing_body_part=True,
        exclude_series_description_patterns=(r"\bscout\b", r"\blocali[sz]er\b", r"dose\s*report"),
        min_slices=16)
    # two tables: both, in order; a disabled one stays listed
    two = _load(tmp_path, EXAMPLE + '[[tasks]]\nname = "spleen-ct"\nmodality = "ct"\n'
                                    'enabled = false\n').tasks
    assert [(t.name, t.modality, t.enabled) for t in two] == [
        ("wholebody-ct", "CT", True), ("spleen-ct", "CT", False)]


def test_a_task_names_its_segments_and_a_template_relative_to_its_file(tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / "organ"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text("{}")
    [task] = _load(tmp_path, '[[tasks]]\nname = "organ-ct"\nmodality = "CT"\n'
                             'segments = [{ name = "Spleen", code = "SCT:78961009" }, '
                             '{ name = "left  kidney" }]\ntemplate = "bundles/organ"\n').tasks
    assert [(s.name, s.scheme, s.value) for s in task.segments] == [
        ("Spleen", "SCT", "78961009"), ("left kidney", None, None)]
    assert task.template == bundle.resolve()  # relative to the configuration file
    assert task.to_dict()["segments"] == [{"name": "Spleen", "code": "SCT:78961009"},
                                          {"name": "left kidney", "code": None}]
    assert task.to_dict()["template"] == str(bundle.resolve())
    assert task.describe_segments() == "Spleen (SCT:78961009), left kidney"
    # the shipped default declares its segment and names the shipped demo bundle
    [default] = default_tasks()
    assert [(s.name, s.code) for s in default.segments] == [("Spleen", "SCT:78961009")]
    assert default.template is not None and (default.template / "configs").is_dir()
    assert default.template.name == "spleen_ct_demo"


MISTAKES = [
    ('[[tasks]]\nmodality = "CT"\n', "tasks[0].name"),
    ('[[tasks]]\nname = "Whole Body"\nmodality = "CT"\n', "tasks[0].name"),
    ('[[tasks]]\nname = "wb-ct"\n', "tasks.wb-ct.modality"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nmin_slice = 3\n', "tasks.wb-ct.min_slice"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "SEG"\n', "tasks.wb-ct.modality"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = 5\n', "tasks.wb-ct.modality"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nbody_parts = "ABDOMEN"\n', "tasks.wb-ct.body_parts"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\naccept_missing_body_part = "yes"\n',
     "tasks.wb-ct.accept_missing_body_part"),
    ("[[tasks]]\nname = \"wb-ct\"\nmodality = \"CT\"\nexclude_series_descriptions = ['(scout']\n",
     "tasks.wb-ct.exclude_series_descriptions"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nmin_slices = 0\n', "tasks.wb-ct.min_slices"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nmin_slices = 2.5\n', "tasks.wb-ct.min_slices"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nmax_slice_thickness_mm = -1\n',
     "tasks.wb-ct.max_slice_thickness_mm"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nmanufacturers = [""]\n', "tasks.wb-ct.manufacturers"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\noutputs = ["seg", "pdf"]\n', "tasks.wb-ct.outputs"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\noutputs = ["overlay"]\n', "tasks.wb-ct.outputs"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nenabled = 1\n', "tasks.wb-ct.enabled"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\n[[tasks]]\nname = "wb-ct"\nmodality = "MR"\n',
     "tasks.wb-ct.name"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nsegments = "Spleen"\n', "tasks.wb-ct.segments"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nsegments = [{ name = "" }]\n',
     "tasks.wb-ct.segments"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nsegments = [{ name = "Spleen", code = "78961009" }]\n',
     "tasks.wb-ct.segments"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\nsegments = [{ name = "Spleen", colour = "red" }]\n',
     "tasks.wb-ct.segments"),
    ('[[tasks]]\nname = "wb-ct"\nmodality = "CT"\ntemplate = "no-such-bundle"\n',
     "tasks.wb-ct.template"),
    ('tasks = "spleen-ct"\n', "tasks"),
    ("waiting_for_model_max_age_h = 0\n", "waiting_for_model_max_age_h"),
]


@pytest.mark.parametrize(("text", "key"), MISTAKES, ids=[k for _, k in MISTAKES])
def test_every_task_mistake_is_one_line_naming_the_task_and_the_key(
        tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert info.value.key == key
    message = str(info.value)
    assert "\n" not in message and key in message and str(tmp_path / "config.toml") in message


def test_serve_with_a_task_mistake_exits_2_with_that_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(EXAMPLE.replace("min_slices = 16", "min_slices = 0"))
    out = subprocess.run([*DICOM_NODE, "--config", str(cfg), "--data-dir", str(tmp_path / "d"),
                          "serve", "--port", "0"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"dicom-node: configuration in {cfg}: tasks.wholebody-ct.min_slices: expected an "
        "integer >= 1, got 0"]
    assert "Traceback" not in out.stdout + out.stderr


def test_slice_thickness_and_manufacturer_rules() -> None:
    g = ph.SliceGeometry(rows=16, columns=16, slices=18, pixel_spacing=(20.0, 20.0),
                         slice_spacing=5.0)
    series = ph.ct_series(ph.Anatomy.random(2), g)
    maker = str(series[0].Manufacturer)
    thick = Task(name="thin-ct", modality="CT", max_slice_thickness_mm=3.0).rules
    assert matches(thick, series).reason.endswith("slice thickness 5 mm is above 3 mm")
    assert matches(Task(name="t", modality="CT", max_slice_thickness_mm=5.0).rules, series).matched
    for ds in series:  # without Slice Thickness the spacing of the positions is used
        del ds.SliceThickness
    assert "slice thickness 5 mm" in matches(thick, series).reason
    vendor = Task(name="vendor-ct", modality="CT", manufacturers=("SIEMENS*",)).rules
    assert f"Manufacturer {maker!r} matches none of ['SIEMENS*']" in matches(vendor, series).reason
    assert matches(Task(name="v", modality="CT", manufacturers=(maker.lower()[:4] + "*",)).rules,
                   series).matched


def _cli(data_dir: Path, config: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    pre = ["--config", str(config)] if config else []
    return subprocess.run([*DICOM_NODE, *pre, "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_tasks_list_and_explain(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "config.toml"
    cfg.write_text(EXAMPLE + '[[tasks]]\nname = "liver-ct"\nmodality = "CT"\n'
                   'body_parts = ["ABDOMEN"]\nmin_slices = 20\n'
                   '[[tasks]]\nname = "brain-mr"\nmodality = "MR"\nenabled = false\n')
    with Registry(data) as reg:
        reg.import_bundle(organ_bundle(tmp_path / "liver"), task="liver-ct", activate=True,
                          by="test")
        reg.import_bundle(organ_bundle(tmp_path / "liver-ge"), task="liver-ct", activate=True,
                          by="test", manufacturer="GE MEDICAL SYSTEMS")
    listed = {t["name"]: t for t in json.loads(_cli(data, cfg, "tasks", "list", "--json").stdout)}
    assert list(listed) == ["wholebody-ct", "liver-ct", "brain-mr"]
    assert listed["wholebody-ct"]["models"] == [] and listed["wholebody-ct"]["min_slices"] == 16
    assert listed["brain-mr"]["enabled"] is False
    assert [(m["scope"], m["version"]) for m in listed["liver-ct"]["models"]] == [
        ("GE MEDICAL SYSTEMS", "liver-ct-v2"), ("all scanners", "liver-ct-v1")]
    text = _cli(data, cfg, "tasks", "list").stdout
    assert "wholebody-ct  enabled" in text and "model: no active model" in text
    assert "  segments: none\n" in text  # none declared (issue 27)
    assert "model: liver-ct-v2 for GE MEDICAL SYSTEMS (labels: liver)" in text

    folder = tmp_path / "study"
    ct = small_study("EXPLAIN-1", slices=18, size=32)
    mr = small_study("EXPLAIN-1", slices=18, size=32, modality="MR")
    write_files(ct, folder / "ct")
    write_files(mr, folder / "mr")
    report = {r["modality"]: r for r in
              json.loads(_cli(data, cfg, "tasks", "explain", str(folder), "--json").stdout)}
    assert report["CT"]["selected_by"] == ["wholebody-ct"]
    refused_ct = {r["task"]: r["reason"] for r in report["CT"]["refused_by"]}
    assert refused_ct["liver-ct"] == "18 instance(s), at least 20 required"
    assert refused_ct["brain-mr"] == "modality ['CT'] is not MR"
    assert report["MR"]["selected_by"] == []
    refused_mr = {r["task"]: r["reason"] for r in report["MR"]["refused_by"]}
    assert refused_mr["brain-mr"] == "the task is disabled (enabled = false)"
    assert refused_mr["wholebody-ct"] == "modality ['MR'] is not CT"
    text = _cli(data, cfg, "tasks", "explain", str(folder)).stdout
    assert "selected by: wholebody-ct" in text and "not liver-ct: 18 instance(s)" in text
    bad = _cli(data, cfg, "tasks", "explain", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_a_job_waits_for_a_model_then_is_released_or_expires(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    recent, old = iso(utc_now()), iso(utc_now() - timedelta(hours=30))
    for uid, last in (("1.2.1", recent), ("1.2.2", old)):
        queue.enqueue(series_uid=uid, study_uid="1.2", patient_key="k", task="liver-ct",
                      series_last_received=last, instances=20)
    for _ in range(2):
        job = queue.claim()
        assert job is not None
        queue.wait_for_model(job.id, "waiting for a model", manufacturer="ACME",
                             scanner_model="CT 1")
    assert queue.counts() == {"waiting": 2} and queue.claim() is None
    assert all(j.attempts == 0 for j in queue.list())  # nothing failed
    assert queue.waiting_scanners() == [("liver-ct", "ACME", "CT 1")]
    cutoff = utc_now() - timedelta(hours=24)
    assert queue.release_waiting("liver-ct", "OTHER", "CT 1", received_after=cutoff) == []
    [released] = queue.release_waiting("liver-ct", "ACME", "CT 1", received_after=cutoff)
    assert released.series_uid == "1.2.1" and released.state is JobState.QUEUED
    [expired] = queue.expire_waiting(received_before=cutoff, max_age_h=24)
    failed = queue.get(expired.id)
    assert failed.state is JobState.FAILED and "within 24 h" in failed.error
    assert queue.for_series(["1.2.1"])[0].id == released.id
    queue.close()
    # the columns were added by a migration: an older queue file is migrated in place
    again = JobQueue(tmp_path)
    from dicom_node.queue.jobs import QUEUE_MIGRATIONS

    assert [r[0] for r in again.conn.execute("SELECT version FROM schema_migrations")] == \
        list(range(1, len(QUEUE_MIGRATIONS) + 1))
    again.close()


def test_a_radiologist_seg_of_two_organs_is_a_label_of_both_tasks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tasks = parse_tasks([{"name": "spleen-ct", "modality": "CT", "min_slices": 16},
                         {"name": "liver-ct", "modality": "CT", "min_slices": 16},
                         {"name": "heart-ct", "modality": "CT", "min_slices": 16}])
    with Registry(data) as reg:
        reg.import_bundle(organ_bundle(tmp_path / "spleen", "spleen"), task="spleen-ct",
                          activate=True, by="test")
        reg.import_bundle(organ_bundle(tmp_path / "liver", "liver"), task="liver-ct", by="test")
    datasets, _ = phantom_study("LAB-1", seed=4)
    g = ph.SliceGeometry(rows=datasets[0].Rows, columns=datasets[0].Columns, slices=len(datasets),
                         pixel_spacing=tuple(float(v) for v in datasets[0].PixelSpacing),
                         slice_spacing=float(datasets[0].SliceThickness))
    anatomy = ph.Anatomy.random(4)
    # spleen by its name, liver only by its SNOMED CT code (label "Hepar")
    both = organ_seg(datasets, anatomy, g, (("spleen", codes.SCT.Spleen),
                                                  ("liver", codes.SCT.Liver)))
    spleen_only = organ_seg(datasets, anatomy, g, (("spleen", codes.SCT.Spleen),))
    kidney_only = organ_seg(datasets, anatomy, g, (("kidney", codes.SCT.Kidney),))
    with Archive(data) as archive:
        store_all(archive, datasets)
        archive.twins.set_consent("LAB-1", donate=True, by="test")
        for seg in (both, kidney_only, spleen_only):
            store_all(archive, [seg], calling_ae="VIEWER")
        with LabelStore(data) as labels:
            intake = TaskLabelIntake(data, labels, tasks)
            files = {str(s.SeriesInstanceUID): archive.twins.series_files(str(s.SeriesInstanceUID))
                     for s in (both, kidney_only, spleen_only)}
            first = intake(files[str(both.SeriesInstanceUID)])
            assert first.decision == "label", first.reason
            [label] = [labels.get(i) for i in first.label_ids]
            assert label.tasks == ("liver-ct", "spleen-ct") and label.segments == ("Spleen", "Hepar")
            refused = intake(files[str(kidney_only.SeriesInstanceUID)])
            assert refused.decision == "unclaimed"  # kept, for no task yet (issue 27)
            assert "name no structure of a configured task" in refused.reason
            assert "heart-ct: no segments declared, no model registered" in refused.reason
            [kept] = [labels.get(i) for i in refused.label_ids]
            assert kept.unclaimed and kept.tasks == () and not kept.current
            later = intake(files[str(spleen_only.SeriesInstanceUID)])
            [newer] = [labels.get(i) for i in later.label_ids]
            assert newer.tasks == ("spleen-ct",)
            # per task, the newest label for it is current
            by_task = {t.name: build_dataset(archive, labels, t.name, t.rules) for t in tasks}
            assert [i.label.id for i in by_task["spleen-ct"].items] == [newer.id]
            assert [i.label.id for i in by_task["liver-ct"].items] == [label.id]
            assert by_task["heart-ct"].items == ()
            series_uid = str(datasets[0].SeriesInstanceUID)
            assert [q.series_uid for q in annotation_queue(archive, labels, "heart-ct",
                                                           tasks[2].rules)] == [series_uid]
            assert annotation_queue(archive, labels, "liver-ct", tasks[1].rules) == []


def test_a_new_result_supersedes_only_its_own_tasks_earlier_result(tmp_path: Path) -> None:
    from node_harness import small_ct
    from twin_archive.results import ResultStore, SegmentMeasure

    with Archive(tmp_path) as archive:  # creates and migrates the index; a twin "k"
        archive.db.execute("INSERT OR IGNORE INTO twins (patient_key, patient_id, donate)"
                           " VALUES ('k', 'PAT-1', 0)")
        archive.db.conn.commit()
    store = ResultStore(tmp_path)

    def record(task: str, last: str) -> int:
        ds = small_ct()
        return store.record(
            job_key=f"1.2.3@{last}/{task}", patient_key="k", study_uid=str(ds.StudyInstanceUID),
            source_series_uid="1.2.3", source_last_received=last, source_instances=1, task=task,
            model_name="m", model_version=f"{task}-v1", backend="torch-cpu",
            segments=(SegmentMeasure(name="x", volume_ml=1.0),), timings={},
            objects=[("overlay", ds)]).id

    spleen, liver = record("spleen-ct", "t1"), record("liver-ct", "t1")
    assert store.get(spleen).superseded_by is None and store.get(liver).superseded_by is None
    spleen2 = record("spleen-ct", "t2")  # the series re-opened: spleen-ct's new result
    assert store.get(spleen).superseded_by == spleen2
    assert store.get(liver).superseded_by is None
    store.close()
