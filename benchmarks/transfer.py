"""Seed 001's transfer-learning result, reproduced on phantoms: fine-tuning vs de novo.

The shipped demo model was trained on phantoms of one style (``pipelines.phantom.SITE_A``).
A second site (``SITE_B``: wider field of view, thinner slices, larger patients, noisier
images, almost native contrast, smaller spleens, 100 kVp) gives N = 2, 5, 10, 20
labelled studies. For each N, two candidates are trained with the project's one
training loop (:func:`trainer.train.train`), with the same number of epochs (an equal
epoch budget: no time budget unless ``--budget`` sets one, and then the table says how
many epochs each arm reached), the same seed and the same patches; an epoch draws at
least ``--min-patches`` patches (160, the node's ``train_min_patches_per_epoch``: with
few studies the volumes are visited again), so equal epochs are equal optimiser steps
at every N up to 40:

* **fine-tuned**: from the shipped model's weights at 1e-4 (the nightly job's rule);
* **de novo**: the shipped bundle as a template - its network and transforms, fresh
  seeded weights - at 1e-3 (the nightly job's rule for a task with no model,
  ``[[tasks]] template``).

Both are scored, like the nightly job scores a candidate, as the Dice of the spleen in
the served pipeline (:func:`trainer.judging.evaluate`: preprocessing, sliding window,
back on the source grid) on held-out site-B patients that neither saw; the shipped
model itself is scored on them too. A fixed set of site-B validation patients (not
the held-out ones) chooses each run's kept epoch.

    .venv/bin/python benchmarks/transfer.py                     # N = 2 5 10 20, 20 epochs each
    .venv/bin/python benchmarks/transfer.py --ns 2 5 --epochs 10 --json out.json
    .venv/bin/python benchmarks/transfer.py --device cuda       # on a GPU

The paper (seed 001) reports, with 30 cases, fine-tuned Dice 0.8925 vs de novo 0.6359.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines import phantom as ph  # noqa: E402
from pipelines.demo_model import DEMO_BUNDLE, DEMO_TASK  # noqa: E402
from registry.store import Registry  # noqa: E402
from trainer.judging import evaluate  # noqa: E402
from trainer.train import LoadedItem, TrainingConfig, VolumeItem, train  # noqa: E402

PAPER = {"cases": 30, "fine_tuned": 0.8925, "de_novo": 0.6359}
SPLEEN = next(v for v, n in ph.LABELS.items() if n == "spleen")


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """A site-B study in memory: HU (slices, rows, columns), spleen mask, affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def site_b_case(seed: int, rows: int, slices: int, style: ph.SiteStyle = ph.SITE_B) -> Case:
    """Render one site-B patient (its own seed; or of ``style``) with its exact spleen mask."""
    anatomy = ph.Anatomy.random(seed, style)
    g = style.geometry(rows, slices)
    rng = np.random.default_rng(seed + 1)
    image = np.stack([ph.render(anatomy, g, k, rng)[0] for k in range(g.slices)])
    image = np.clip(np.rint(image), -1024, 3071).astype(np.float32)  # as stored (int16 HU)
    label = (ph.truth_labels(anatomy, g) == SPLEEN).astype(np.uint8)
    return Case(image=image, label=label, affine=g.affine)


def _items(cases: list[Case], prefix: str) -> list[LoadedItem]:
    return [LoadedItem(item=VolumeItem(name=f"{prefix}-{i}", image=c.image, label=c.label,
                                       affine=c.affine)) for i, c in enumerate(cases)]


def _bundle(dest: Path, weights: Path | None) -> Path:
    shutil.copytree(DEMO_BUNDLE / "configs", dest / "configs")
    (dest / "models").mkdir()
    if weights is not None:
        shutil.copy2(weights, dest / "models" / "model.pt")
    return dest


def _score(reg: Registry, bundle: Path, cases: list[Case], device: str) -> float:
    mv = reg.import_bundle(bundle, task=DEMO_TASK, by="benchmark")
    backend = "pytorch-cuda" if device.startswith("cuda") else "pytorch-cpu"
    return float(evaluate(mv, cases, reg, backend=backend)["spleen"])  # type: ignore[arg-type]


def _arm(reg: Registry, out: Path, arm: str, lr: float, init: Path | None, train_cases: list[Case],
         val: list[Case], test: list[Case], args: argparse.Namespace) -> dict[str, object]:
    """Train one arm on ``train_cases`` and score it on ``test``; its columns of the row.

    De novo (``init`` None): :func:`trainer.train.train` builds the template's network
    with fresh weights seeded by the config's seed - what the nightly job does for a
    task without a model."""
    _bundle(out, None)
    cfg = TrainingConfig(learning_rate=lr, max_epochs=args.epochs,
                         time_budget_s=args.budget or None, seed=0, device=args.device,
                         patch_size=(args.patch,) * 3, validate_every=args.validate_every,
                         min_patches_per_epoch=args.min_patches)
    t1 = time.perf_counter()
    res = train(out, _items(train_cases, "b"), _items(val, "v"), cfg,
                weights_out=out / "models" / "model.pt", init_weights=init)
    dice = _score(reg, out, test, args.device)
    print(f"N={len(train_cases):>2} {arm:<10} lr {lr:.0e}: held-out Dice {dice:.4f} "
          f"({res.epochs} epochs, stopped by {res.stopped_by}, {res.seconds:.0f} s training, "
          f"{time.perf_counter() - t1:.0f} s with caching and scoring)", flush=True)
    return {arm: round(dice, 4), f"{arm}_epochs": res.epochs,
            f"{arm}_stopped_by": res.stopped_by, f"{arm}_train_s": round(res.seconds, 1)}


def _print_table(rows: list[dict[str, object]], baseline: float, total: float) -> None:
    """The Markdown table of held-out Dice per N, both arms, beside the paper's."""
    print("\n| N site-B studies | fine-tuned (1e-4) | de novo (1e-3) | epochs (fine-tuned / de novo) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        cell = lambda arm: f"{r[arm]:.4f}" if arm in r else "-"  # noqa: E731
        print(f"| {r['n']} | {cell('fine_tuned')} | {cell('de_novo')} | "
              f"{r.get('fine_tuned_epochs', '-')} / {r.get('de_novo_epochs', '-')} |")
    print(f"| paper, {PAPER['cases']} cases | {PAPER['fine_tuned']} | {PAPER['de_novo']} | "
          "to convergence |")
    print(f"\nshipped model on site B: {baseline:.4f}; whole run {total:.0f} s "
          f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 5, 10, 20],
                    help="labelled site-B studies per run (default 2 5 10 20)")
    ap.add_argument("--test", type=int, default=6, help="held-out site-B patients (default 6)")
    ap.add_argument("--val", type=int, default=2, help="site-B patients choosing the kept epoch")
    ap.add_argument("--rows", type=int, default=128, help="rows = columns of a study (default 128)")
    ap.add_argument("--slices", type=int, default=64, help="slices of a study (default 64)")
    ap.add_argument("--epochs", type=int, default=20, help="epochs of every run (default 20)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="time budget of every run's training, s (default 0: none, every run "
                         "trains exactly --epochs epochs)")
    ap.add_argument("--patch", type=int, default=64, help="training patch edge (default 64)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--min-patches", type=int, default=160,
                    help="fewest patches of an epoch (default 160, the node's "
                         "train_min_patches_per_epoch; 0: one visit per volume)")
    ap.add_argument("--validate-every", type=int, default=1,
                    help="validate every this many epochs (default 1)")
    ap.add_argument("--arms", nargs="+", default=["fine_tuned", "de_novo"],
                    choices=["fine_tuned", "de_novo"], help="which arms to train (default both)")
    ap.add_argument("--site", default="B", choices=["A", "B"],
                    help="phantom style of every study (default B; A: the shipped model's own "
                         "style, which makes the fine-tuned arm meaningless)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--log", action="store_true", help="log every epoch (trainer.train at INFO)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)8.0f %(name)s: %(message)s")
    if args.log:
        logging.getLogger("trainer.train").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    shipped = DEMO_BUNDLE / "models" / "model.pt"
    try:
        # site-B seeds: 300000.. (the shipped model's own seeds are 100000.. and 200000..)
        t0 = time.perf_counter()
        n_max = max(args.ns)
        style = ph.SITE_B if args.site == "B" else ph.SITE_A
        pool = [site_b_case(300000 + i, args.rows, args.slices, style) for i in range(n_max)]
        val = [site_b_case(310000 + i, args.rows, args.slices, style) for i in range(args.val)]
        test = [site_b_case(320000 + i, args.rows, args.slices, style) for i in range(args.test)]
        t_data = time.perf_counter() - t0
        print(f"site {args.site}: {n_max} + {args.val} + {args.test} studies of {args.rows}x{args.rows}x"
              f"{args.slices} ({style.fov_mm / args.rows:.2f} x {style.fov_mm / args.rows:.2f}"
              f" x {style.slice_spacing_mm} mm) rendered in {t_data:.0f} s", flush=True)
        rows = []
        with Registry(work / "data") as reg:
            baseline = _score(reg, _bundle(work / "shipped", shipped), test, args.device)
            print(f"shipped model (site A only) on held-out site B: Dice {baseline:.4f}", flush=True)
            for n in args.ns:
                row: dict[str, object] = {"n": n}
                for arm, lr, init in (("fine_tuned", 1e-4, shipped), ("de_novo", 1e-3, None)):
                    if arm not in args.arms:
                        continue
                    row.update(_arm(reg, work / f"{arm}-{n}", arm, lr, init, pool[:n], val, test,
                                    args))
                rows.append(row)
        total = time.perf_counter() - t_start
        report = {
            "site": args.site, "arms": args.arms, "min_patches_per_epoch": args.min_patches,
            "validate_every": args.validate_every,
            "site_b": {k: getattr(style, k) for k in ph.SiteStyle.__dataclass_fields__},
            "grid": [args.rows, args.rows, args.slices], "test_patients": args.test,
            "val_patients": args.val, "epochs": args.epochs, "budget_s": args.budget or None,
            "device": args.device,
            "patch": args.patch, "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
            "shipped_on_site_b": round(baseline, 4), "rows": rows, "paper": PAPER,
            "run_seconds": round(total, 1)}
        _print_table(rows, baseline, total)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
