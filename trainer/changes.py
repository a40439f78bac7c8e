"""What a task has gained since its last trained version (the scheduler's question).

Imported by the node's listener for its scheduler: no torch, no MONAI here.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.selection import SelectionRules
from registry.store import Registry
from trainer.dataset import build_dataset
from trainer.judging import training_stores


def last_trained_series(reg: Registry, task: str) -> set[tuple[str, str]]:
    """(series UID, label SHA-256) pairs of the newest version of ``task`` with a manifest."""
    for mv in reversed(reg.list(task)):
        manifest = mv.manifest()
        if isinstance(manifest, dict) and "series" in manifest:
            return {(s["series_uid"], s["label"]["sha256"]) for s in manifest["series"]}
    return set()


def new_labelled_series(data_dir: Path | str, task: str, rules: SelectionRules) -> int:
    """How many labelled, donated, matching series (or newer label versions) the task
    has gained since its last trained version (all of them when never trained)."""
    with training_stores(data_dir) as stores:
        dataset = build_dataset(stores.archive, stores.labels, task, rules)
        seen = last_trained_series(stores.registry, task)
        return sum(1 for i in dataset.items if (i.series_uid, i.label.sha256) not in seen)
