"""The quality floor of promotion (issue 16 item 1): ``min_dice`` per task.

A scratch candidate of a task with nothing active used to be promoted whatever its
Dice; now it stays a candidate below the floor, nothing serves, and ``train``, the
journal and ``models show`` say why. ``models import --activate`` of a bundle without
metrics still works and says so. Real pieces: the archive's store path, the real
trainer in its subprocess, the real CLI.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dicom_node.settings import Settings
from dicom_node.learning.training import nightly_config
from learning_helpers import labelled_patients, tiny_bundle
from node_harness import DICOM_NODE, REPO
from registry.errors import NoActiveModelError
from registry.store import Registry
from trainer.promotion import decide
from twin_archive import Archive
from twin_archive.labels import LabelStore

TASK = "spleen-ct"


def _cli(data_dir: Path, *args: str, config: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    cfg = ["--config", str(config)] if config else []
    return subprocess.run([*DICOM_NODE, *cfg, "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, cwd=REPO, check=True, timeout=600)


def test_the_decision_floor_then_margin() -> None:
    none = decide({"spleen": 0.039}, None, margin=0.01, min_dice=0.7)
    assert not none.promote and none.below_floor and "min_dice 0.7" in none.reason
    assert decide({"spleen": 0.75}, None, margin=0.01, min_dice=0.7).promote
    # better than the active one, still below the floor: stays a candidate
    low = decide({"spleen": 0.5}, {"spleen": 0.1}, margin=0.01, min_dice=0.7,
                 active_version="spleen-ct-v1")
    assert not low.promote and low.below_floor and "spleen-ct-v1 0.1000" in low.reason
    assert "not better" not in low.reason
    both = decide({"spleen": 0.5}, {"spleen": 0.6}, margin=0.01, min_dice=0.7)
    assert both.below_floor and "also not better by the margin" in both.reason
    same = decide({"spleen": 0.80}, {"spleen": 0.795}, margin=0.01, min_dice=0.7)
    assert not same.promote and not same.below_floor and "not better" in same.reason
    assert decide({"spleen": 0.9}, {"spleen": 0.8}, margin=0.01, min_dice=0.7).promote
    with pytest.raises(ValueError, match="min_dice"):
        decide({"spleen": 0.9}, None, margin=0.01, min_dice=1.5)


def test_min_dice_setting_and_the_per_task_override(tmp_path: Path) -> None:
    s = Settings()
    assert s.train_min_dice == 0.7 and nightly_config(s).min_dice == 0.7
    assert nightly_config(s.replace(train_min_dice=0.5)).min_dice == 0.5
    assert nightly_config(s, min_dice=0.9).min_dice == 0.9  # a [[tasks]] table's min_dice
    with pytest.raises(ValueError, match="min_dice"):
        nightly_config(s, min_dice=2.0)
    from dicom_node.foundation.errors import ConfigError

    for key, value in (("train_min_dice", 1.2), ("train_promote_after_shadow", -1),
                       ("train_shadow_min_agreement", 2.0), ("drift_baseline_series", 1),
                       ("drift_window_series", 0), ("drift_psi_threshold", 0.0)):
        with pytest.raises(ConfigError, match=key):
            Settings(**{key: value})
    from dicom_node.settings import load_settings

    cfg = tmp_path / "node.toml"
    cfg.write_text("train_min_dice = 0.8\ntrain_promote_after_shadow = 3\n"
                   "drift_psi_threshold = 0.2\n")
    loaded = load_settings(cfg, env={})
    assert (loaded.train_min_dice, loaded.train_promote_after_shadow,
            loaded.drift_psi_threshold) == (0.8, 3, 0.2)
    assert nightly_config(loaded).promote_after_shadow == 3


@pytest.mark.slow
def test_scratch_candidate_below_the_floor_stays_a_candidate_and_nothing_serves(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Archive(data) as archive, LabelStore(data) as labels:
        labelled_patients(archive, labels, [f"FL-{i}" for i in range(3)], seed=70)
    # a registered (not active) tiny bundle gives the configuration to train from scratch
    with Registry(data) as reg:
        v1 = reg.import_bundle(tiny_bundle(tmp_path / "tiny"), task=TASK, by="test").version
        assert reg.active(TASK) is None
    cfg = tmp_path / "node.toml"
    cfg.write_text('train_enabled = false\ntrain_patch_size = 32\ntrain_max_epochs = 1\n'
                   'train_min_patches_per_epoch = 0\n'
                   'train_time_budget_min = 5\ntrain_device = "cpu"\ntrain_nice = 5\n')
    run = _cli(data, "train", TASK, "--now", "--json", config=cfg)
    outcome = json.loads(run.stdout)
    assert outcome["outcome"] == "candidate" and outcome["parent"] is None, outcome
    assert outcome["active_before"] is None
    assert "below the quality floor" in outcome["reason"] and "min_dice 0.7" in outcome["reason"]
    assert outcome["candidate_dice"]["spleen"] < 0.7
    # the journal (the trainer's log lines on stderr) says why
    assert "stays a candidate, not served: below the quality floor" in run.stderr
    cand = outcome["candidate"]
    with Registry(data) as reg:
        assert reg.get(cand).status.value == "candidate"
        assert reg.active(TASK) is None
        with pytest.raises(NoActiveModelError):  # nothing new serves
            reg.resolve(TASK, "Phantom Medical", "Phantom CT")
        assert reg.get(v1).status.value == "candidate"
    show = _cli(data, "models", "show", cand)
    assert "not promoted  below the quality floor" in show.stdout
    shown = json.loads(_cli(data, "models", "show", cand, "--json").stdout)
    assert shown["held_because"].startswith("below the quality floor")
    assert [a["action"] for a in shown["audit"]][-1] == "hold"
    # the plain summary of `train` says so too
    text = _cli(data, "train", TASK, "--now", config=cfg).stdout
    assert "stays a candidate (below the quality floor" in text


def test_import_activate_without_metrics_works_and_says_so(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = _cli(data, "models", "import", str(tiny_bundle(tmp_path / "tiny")), "--task", TASK,
               "--activate", "--by", "admin")
    assert "no recorded validation metrics" in out.stdout
    with Registry(data) as reg:
        mv = reg.active(TASK)
        assert mv is not None and mv.metrics is None
        promote = [e for e in reg.audit(version=mv.version) if e.action.value == "promote"]
    assert "no recorded validation metrics" in promote[-1].reason
    show = _cli(data, "models", "show", mv.version).stdout
    assert "none recorded" in show
