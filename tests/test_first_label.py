"""Learning from the first label (issue 27): tasks that name their segments, no label lost,
training de novo from a template.

A site without a model: radiologist SEGs arrive before any model is registered.

* A task that declares no segment and has no model cannot claim a spleen SEG: the SEG is
  kept as an *unclaimed* label with the reason (``labels list``), in no dataset, and is
  claimed by the ``models import`` of a bundle whose labels name it.
* A task added by SIGHUP that names the SEG's segment claims it in the running node.
* The shipped default task declares its segment and names the shipped demo bundle as
  its template: its first model is trained de novo (the template's network and
  transforms, fresh weights) and judged by the quality floor alone.

Real parts throughout: highdicom SEGs of rendered phantoms, the archive's store path,
the real ``dicom-node`` command (``serve`` as a subprocess for SIGHUP), a real registry,
the project's one training loop in its subprocess (tiny settings: a few epochs of
32-voxel patches).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import torch

from dicom_client import send
from dicom_node.learning.label_intake import TaskLabelIntake
from dicom_node.tasks import default_tasks, parse_tasks
from learning_helpers import phantom_study, radiologist_seg, store_all, tiny_bundle
from node_harness import DICOM_NODE, REPO, NodeProcess
from pipelines.demo_model import DEMO_BUNDLE
from registry.store import Registry
from trainer.dataset import build_dataset
from trainer.child import run_in_subprocess
from trainer.nightly import NightlyConfig
from twin_archive import Archive
from twin_archive.audit import AuditEvent, AuditLog
from twin_archive.labels import LabelStore
from waiting import wait_until

TASK = "spleen-ct"
#: The spleen task as a site might first write it: no segments, no template, no model.
BARE = '[[tasks]]\nname = "spleen-ct"\nmodality = "CT"\naccept_missing_body_part = true\n'
LIVER = ('[[tasks]]\nname = "liver-ct"\nmodality = "CT"\n'
         'segments = [{ name = "Liver", code = "SCT:10200004" }]\n')
SPLEEN = ('[[tasks]]\nname = "spleen-ct"\nmodality = "CT"\n'
          'segments = [{ name = "Spleen", code = "SCT:78961009" }]\n')


def _cli(data_dir: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DICOM_NODE, "--config", str(config), "--data-dir", str(data_dir),
                           *args], capture_output=True, text=True, cwd=REPO, check=True,
                          timeout=600)


def _labelled(data: Path, tasks: tuple, pids: list[str], *, seed: int) -> list[str]:
    """Each patient: a phantom study, the radiologist's spleen SEG taken in by the task
    intake, donation; returns the intake decisions."""
    decisions = []
    with Archive(data) as archive, LabelStore(data) as labels:
        intake = TaskLabelIntake(data, labels, tasks)
        for i, pid in enumerate(pids):
            datasets, truth = phantom_study(pid, seed=seed + i)
            store_all(archive, datasets, "CT_SCANNER")
            seg = radiologist_seg(datasets, truth)
            store_all(archive, [seg], "READING_ROOM")
            decisions.append(intake(archive.twins.series_files(str(seg.SeriesInstanceUID))))
            archive.twins.set_consent(pid, donate=True, by="test")
    return decisions


def test_labels_before_any_model_are_kept_unclaimed_and_claimed_by_a_later_import(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "node.toml"
    cfg.write_text(BARE)
    tasks = parse_tasks([{"name": TASK, "modality": "CT", "accept_missing_body_part": True}])
    decisions = _labelled(data, tasks, ["FIRST-0", "FIRST-1"], seed=50)
    for d in decisions:
        assert d.decision == "unclaimed" and len(d.label_ids) == 1, d.reason
        assert "name no structure of a configured task" in d.reason
        assert "spleen-ct: no segments declared, no model registered" in d.reason
    with Archive(data) as archive, LabelStore(data) as labels:
        assert build_dataset(archive, labels, TASK, tasks[0].rules).items == ()  # in no dataset
        kept = labels.unclaimed()
        assert [lab.current for lab in kept] == [False, False]
        assert [lab.segment_codes for lab in kept] == [("78961009",), ("78961009",)]
    listing = _cli(data, cfg, "labels", "list").stdout
    assert listing.count("UNCLAIMED: its segments ['Spleen'] name no structure") == 2
    assert "2 unclaimed label(s)" in listing
    rows = json.loads(_cli(data, cfg, "labels", "list", "--json").stdout)
    assert [r["tasks"] for r in rows] == [[], []] and all(r["unclaimed"] for r in rows)
    assert "still unclaimed" in _cli(data, cfg, "labels", "rescan").stdout

    # a bundle whose labels name the spleen arrives: its import claims both labels
    out = _cli(data, cfg, "models", "import", str(tiny_bundle(tmp_path / "tiny")), "--task",
               TASK).stdout
    assert "2 unclaimed label(s) claimed" in out, out
    rows = json.loads(_cli(data, cfg, "labels", "list", "--json").stdout)
    assert [(r["tasks"], r["unclaimed"], r["current"]) for r in rows] == [
        (["spleen-ct"], None, True)] * 2
    with Archive(data) as archive, LabelStore(data) as labels:
        assert labels.unclaimed() == []
        assert len(build_dataset(archive, labels, TASK, tasks[0].rules).items) == 2
    with AuditLog(data) as log:
        vias = [e.detail["via"] for e in log.entries(event_type=AuditEvent.LABEL_IMPORTED)]
    assert vias.count("C-STORE") == 2 and vias.count("claimed (models import)") == 2
    assert "no unclaimed labels" in _cli(data, cfg, "labels", "rescan").stdout


def test_labels_for_a_task_added_by_sighup_are_claimed_by_the_running_node(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    node = NodeProcess(data, config="stable_after = 1.0\ntrain_enabled = false\n" + LIVER,
                       workers=0).start()
    try:
        datasets, truth = phantom_study("HUP-1", seed=81)
        assert set(send(node.port, datasets, calling_ae="CT_SCANNER")) == {0}
        seg = radiologist_seg(datasets, truth)
        assert send(node.port, [seg], calling_ae="READING_ROOM") == [0]

        def unclaimed() -> list:
            with LabelStore(data) as labels:
                return labels.unclaimed()

        [kept] = wait_until("the spleen SEG kept unclaimed", unclaimed, timeout=60)
        assert "liver-ct: declares Liver (SCT:10200004)" in kept.unclaimed
        assert "kept as unclaimed label(s)" in node.log()
        # the site adds the spleen task, naming its segment, and reloads
        cfg = data.parent / f"{data.name}-config.toml"
        cfg.write_text("stable_after = 1.0\ntrain_enabled = false\n" + LIVER + SPLEEN)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_until("the label claimed", lambda: not unclaimed(), timeout=30)
        assert "unclaimed labels (SIGHUP): 1 unclaimed label(s) claimed" in node.log()
        [row] = json.loads(node.cli("labels", "list", "--json").stdout)
        assert (row["tasks"], row["unclaimed"], row["current"]) == (["spleen-ct"], None, True)
        assert row["series_uid"] == str(datasets[0].SeriesInstanceUID)
    finally:
        node.stop()


def test_the_shipped_task_trains_de_novo_from_its_template_judged_by_the_floor(
        tmp_path: Path) -> None:
    """The issue's site: labels and no model. The shipped default task claims the SEGs by
    its declared segment and trains its first model from the demo bundle's network and
    transforms with fresh weights; a floor it does not reach keeps it a candidate."""
    data = tmp_path / "data"
    [task] = default_tasks()
    assert task.template == DEMO_BUNDLE.resolve()
    decisions = _labelled(data, (task,), ["NOVO-0", "NOVO-1", "NOVO-2"], seed=60)
    assert [d.decision for d in decisions] == ["label"] * 3, decisions
    cfg = tmp_path / "node.toml"
    cfg.write_text('train_enabled = false\ntrain_patch_size = 32\ntrain_max_epochs = 1\n'
                   'train_min_patches_per_epoch = 0\n'
                   'train_time_budget_min = 5\ntrain_device = "cpu"\ntrain_nice = 5\n'
                   'train_min_dice = 0.99\n')
    outcome = json.loads(_cli(data, cfg, "train", TASK, "--now", "--json").stdout)
    assert outcome["outcome"] == "candidate", outcome  # the floor, applied to a de novo one
    assert outcome["parent"] is None and outcome["active_before"] is None
    assert outcome["started_from"] == "de novo from template spleen_ct_demo"
    assert "below the quality floor" in outcome["reason"] and "min_dice 0.99" in outcome["reason"]
    assert outcome["train_series"] + outcome["validation_series"] == 3
    with Registry(data) as reg:
        cand = reg.get(outcome["candidate"])
        assert cand.status.value == "candidate" and reg.active(TASK) is None
        assert cand.parent_version is None
        meta = json.loads((cand.path / "configs" / "metadata.json").read_text())
        assert "de novo from template spleen_ct_demo" in next(iter(meta["changelog"].values()))
        trained = torch.load(cand.path / "models" / "model.pt", weights_only=True)
    shipped = torch.load(DEMO_BUNDLE / "models" / "model.pt", weights_only=True)
    assert trained.keys() == shipped.keys()  # the template's network ...
    assert not all(torch.equal(trained[k], shipped[k]) for k in shipped)  # ... fresh weights


def test_de_novo_from_a_template_without_weights_is_promoted_by_the_floor_alone(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    template = tiny_bundle(tmp_path / "template")
    (template / "models" / "model.pt").unlink()  # a template's weights are never used
    tasks = parse_tasks([{"name": TASK, "modality": "CT", "accept_missing_body_part": True,
                          "segments": [{"name": "Spleen"}], "template": str(template)}])
    assert [d.decision for d in _labelled(data, tasks, ["TPL-0", "TPL-1", "TPL-2"], seed=70)] \
        == ["label"] * 3
    config = NightlyConfig(scratch_lr=1e-3, max_epochs=2, patch_size=32, time_budget_s=300,
                           device="cpu", min_dice=0.0, template=str(tasks[0].template))
    outcome = run_in_subprocess(data, TASK, tasks[0].rules, config, nice=5)
    assert outcome.outcome == "promoted", outcome
    assert outcome.parent is None and outcome.started_from == "de novo from template template"
    assert "reaches min_dice 0" in outcome.reason and "no active version" in outcome.reason
    with Registry(data) as reg:
        active = reg.active(TASK)
        assert active is not None and active.version == outcome.candidate
        assert (active.path / "models" / "model.pt").is_file()
