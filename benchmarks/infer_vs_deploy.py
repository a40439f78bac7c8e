#!/usr/bin/env python3
"""``dicom-node infer`` beside a MONAI Deploy App SDK application, same CT, same bundle.

One generated abdominal CT series (``pipelines.phantom``, 512x512, ``--slices`` slices,
default 200) and the shipped demo bundle (``pipelines/demo_model/spleen_ct_demo``, made
the active ``spleen-ct`` model of a scratch data directory) go, alternating, ``--rounds``
times through:

* ``dicom-node infer CT --out OUT`` (this checkout; SEG, SR and overlay written), and
* ``benchmarks/deploy_app.py``: the SDK's spleen example built from its standard
  operators (DICOMDataLoaderOperator, DICOMSeriesSelectorOperator,
  DICOMSeriesToVolumeOperator, MonaiBundleInferenceOperator,
  DICOMSegmentationWriterOperator; SEG only), run by the interpreter of ``.venv-deploy``;
* with ``--peer-passive``, also the peer with ``OMP_WAIT_POLICY=PASSIVE`` in its
  environment, the OpenMP wait policy ``dicom-node`` sets for itself;
* with ``--baseline-ref REF``, also ``dicom-node infer`` from the tree of git ``REF``
  (``git archive``), to compare the start-up work before and after a change.

Both checkouts' packages are compiled to bytecode first (:func:`compiled`), as
installers leave them (the peer's packages were compiled by pip). Each run is a fresh
process; its wall time and its CPU time (user + system, from
``getrusage`` of the children) are printed, with the load average at its start, and
the ratio of the medians. Wall-time ratios mean something on a quiet machine only;
the CPU times hold under load.

The peer's environment: ``.venv-deploy`` at the top of the checkout is created once,
when missing, from the package registry (pip): ``monai-deploy-app-sdk==4.0.0`` (it
brings holoscan-cu13 4.6.0, which runs on CPU), torch pinned to the CPU build 2.13.0 as
``scripts/setup.sh`` pins it, and the same monai, pydicom and highdicom as the node's
``.venv``. That download is the benchmark's, for the peer only: the product downloads
nothing at run time, and this script needs the network only the first time.

``--startup`` measures the start-up alone (no peer, no inference): each
``dicom-node infer`` runs under an audit hook (:data:`PROBE`) that stops it when it
opens the model's weights, and reports the wall and CPU seconds from the start of the
process to the first DICOM file opened and to the weights opened.

Usage::

    .venv/bin/python benchmarks/infer_vs_deploy.py                      # 3 rounds
    .venv/bin/python benchmarks/infer_vs_deploy.py --startup --rounds 5 --baseline-ref main
    .venv/bin/python benchmarks/infer_vs_deploy.py --rounds 5 --baseline-ref main
    .venv/bin/python benchmarks/infer_vs_deploy.py --rounds 3 --baseline-ref main --peer-passive
    .venv/bin/python benchmarks/infer_vs_deploy.py --json /tmp/ivd.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from end_to_end import write_series  # noqa: E402
from pipelines.demo_model import DEMO_BUNDLE, ensure_demo_model  # noqa: E402
from registry.store import Registry  # noqa: E402

DEPLOY_VENV = REPO / ".venv-deploy"
DEPLOY_PACKAGES = ("torch==2.13.0", "monai-deploy-app-sdk==4.0.0", "monai==1.6.1",
                   "pydicom==3.0.2", "highdicom==0.28.2", "nibabel==5.4.2")
QUIET = dict(os.environ, PYTHONWARNINGS="ignore")


def deploy_python() -> Path:
    """The interpreter of ``.venv-deploy``; the environment is created when missing."""
    python = DEPLOY_VENV / "bin" / "python"
    if not (DEPLOY_VENV / ".installed").exists():
        print(f"creating {DEPLOY_VENV} (once): {' '.join(DEPLOY_PACKAGES)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(DEPLOY_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *DEPLOY_PACKAGES], check=True)
        (DEPLOY_VENV / ".installed").write_text(" ".join(DEPLOY_PACKAGES) + "\n")
    return python


#: The packages of a checkout that ``dicom-node`` imports, compiled by :func:`compiled`.
PACKAGES = ("dicom_node", "pipelines", "registry", "twin_archive", "trainer")


def compiled(tree: Path) -> Path:
    """``tree`` with its packages' bytecode written (``compileall``), as the node's installer
    (``systemd/install.sh``: ``pip install``) and the peer's ``pip install`` leave them.

    Without it, where ``PYTHONDONTWRITEBYTECODE`` is set (this machine) or the checkout is
    read-only, every run of the node would compile its own sources again (0.3-0.6 s of
    CPU) while the peer's packages were compiled once by pip.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    *(str(tree / p) for p in PACKAGES if (tree / p).is_dir())], check=True)
    return tree


def baseline_tree(ref: str, scratch: Path) -> Path:
    """The files of git ``ref`` (``git archive``) in ``scratch/baseline``."""
    tree = scratch / "baseline"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return compiled(tree)


PROBE = r"""
import os, runpy, sys, time
T0, marks = time.perf_counter(), {}
def hook(event, args):
    if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    for key, end in (("first_dicom", ".dcm"), ("model_open", "model.pt")):
        if path.endswith(end) and key not in marks:
            marks[key] = [round(time.perf_counter() - T0, 3), round(time.process_time(), 3)]
    if "model_open" in marks:
        print("PROBE " + __import__("json").dumps(marks), flush=True)
        os._exit(0)
sys.addaudithook(hook)
sys.argv = ["dicom-node"] + sys.argv[1:]
runpy.run_module("dicom_node", run_name="__main__")
"""


def startup(tree: Path, data: Path, ct: Path, out: Path) -> dict[str, Any]:
    """Seconds (wall, CPU) from the start of ``dicom-node infer`` to its first DICOM file
    opened and to the model's weights opened."""
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", PROBE, "--data-dir", str(data), "infer",
                           str(ct), "--out", str(out)], cwd=tree, capture_output=True, text=True,
                          env=dict(QUIET, PYTHONPATH=str(tree)), check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    return {"load1": round(load, 2), **json.loads(line.split(" ", 1)[1])}


def run_startup(args: argparse.Namespace, scratch: Path, data: Path, ct: Path) -> dict[str, Any]:
    trees = {"dicom-node": compiled(REPO)}
    if args.baseline_ref:
        trees[f"dicom-node@{args.baseline_ref}"] = baseline_tree(args.baseline_ref, scratch)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for i in range(args.rounds):
        for name, tree in trees.items():
            r = startup(tree, data, ct, scratch / "unused")
            rows[name].append(r)
            print(f"round {i + 1} {name:>24}: first DICOM file at {r['first_dicom'][0]:.2f} s "
                  f"(cpu {r['first_dicom'][1]:.2f} s), weights at {r['model_open'][0]:.2f} s "
                  f"(cpu {r['model_open'][1]:.2f} s) (load {r['load1']:.1f})", flush=True)
    for name, runs in rows.items():
        print(f"{name:>24}: median to weights: wall "
              f"{statistics.median(r['model_open'][0] for r in runs):.2f} s, cpu "
              f"{statistics.median(r['model_open'][1] for r in runs):.2f} s; to the first DICOM "
              f"file: wall {statistics.median(r['first_dicom'][0] for r in runs):.2f} s")
    return {"slices": args.slices, "rounds": args.rounds, "startup": rows}


def timed(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; its wall and CPU seconds, the load average at its start, its output."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load1": round(load, 2),
            "stdout": proc.stdout}


def run_node(tree: Path, data: Path, ct: Path, out: Path) -> dict[str, Any]:
    env = dict(QUIET, PYTHONPATH=str(tree))
    r = timed([sys.executable, "-m", "dicom_node", "--data-dir", str(data), "infer", str(ct),
               "--out", str(out), "--json"], cwd=tree, env=env)
    [report] = json.loads(r.pop("stdout"))
    if report["status"] != "written":
        raise RuntimeError(f"dicom-node infer wrote nothing: {report}")
    r["stages"] = report["timings"]
    return r


def run_deploy(python: Path, ct: Path, out: Path, env: dict[str, str] = QUIET) -> dict[str, Any]:
    r = timed([str(python), str(REPO / "benchmarks" / "deploy_app.py"), str(ct), str(out),
               str(DEMO_BUNDLE)], cwd=REPO, env=env)
    line = next(x for x in r.pop("stdout").splitlines() if x.startswith("DEPLOY-TIMES "))
    r["stages"] = json.loads(line.split(" ", 1)[1])
    if not any(out.glob("*.dcm")):
        raise RuntimeError("the MONAI Deploy application wrote no SEG")
    return r


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    ct = scratch / "ct"
    write_series(ct, args.slices, seed=7)
    data = scratch / "data"
    with Registry(data) as reg:
        ensure_demo_model(reg)
    if args.startup:
        return run_startup(args, scratch, data, ct)
    python = deploy_python()
    compiled(REPO)
    contenders = {"dicom-node": lambda out: run_node(REPO, data, ct, out),
                  "monai-deploy": lambda out: run_deploy(python, ct, out)}
    if args.peer_passive:  # the peer with the OpenMP wait policy dicom-node sets for itself
        passive = dict(QUIET, OMP_WAIT_POLICY="PASSIVE")
        contenders["monai-deploy-passive"] = lambda out: run_deploy(python, ct, out, passive)
    if args.baseline_ref:
        tree = baseline_tree(args.baseline_ref, scratch)
        contenders[f"dicom-node@{args.baseline_ref}"] = lambda out: run_node(tree, data, ct, out)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for i in range(args.rounds):
        for name, go in contenders.items():
            r = go(scratch / f"out-{name}-{i}")
            rows[name].append(r)
            print(f"round {i + 1} {name:>24}: wall {r['wall_s']:6.2f} s, cpu {r['cpu_s']:6.2f} s"
                  f" (load {r['load1']:.1f}) {r['stages']}", flush=True)
    return {"slices": args.slices, "rounds": args.rounds, "machine": platform.machine(),
            "cpus": os.cpu_count(), "deploy_packages": DEPLOY_PACKAGES, "runs": rows}


def summary(result: dict[str, Any]) -> list[str]:
    med = {name: {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s")}
           for name, runs in result["runs"].items()}
    lines = [f"{name:>24}: median wall {m['wall_s']:.2f} s, median cpu {m['cpu_s']:.2f} s"
             for name, m in med.items()]
    node, peer = med["dicom-node"], med["monai-deploy"]
    lines.append(f"monai-deploy / dicom-node: wall {peer['wall_s'] / node['wall_s']:.2f}x, "
                 f"cpu {peer['cpu_s'] / node['cpu_s']:.2f}x "
                 f"({result['slices']} slices, {result['rounds']} rounds, alternating)")
    if "monai-deploy-passive" in med:
        p = med["monai-deploy-passive"]
        lines.append(f"monai-deploy-passive / dicom-node: wall {p['wall_s'] / node['wall_s']:.2f}x, "
                     f"cpu {p['cpu_s'] / node['cpu_s']:.2f}x")
    for name in med:
        if name.startswith("dicom-node@"):
            lines.append(f"{name} / dicom-node: wall {med[name]['wall_s'] / node['wall_s']:.2f}x, "
                         f"cpu {med[name]['cpu_s'] / node['cpu_s']:.2f}x")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-ref", default=None, metavar="REF",
                    help="also run dicom-node infer from this git ref's tree")
    ap.add_argument("--startup", action="store_true",
                    help="the start-up alone: to the first DICOM file and to the weights opened")
    ap.add_argument("--peer-passive", action="store_true",
                    help="also run the peer with OMP_WAIT_POLICY=PASSIVE, as dicom-node runs")
    ap.add_argument("--json", type=Path, default=None, help="write every run here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="infer-vs-deploy-") as tmp:
        result = run(args, Path(tmp))
    for line in ([] if args.startup else summary(result)):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
