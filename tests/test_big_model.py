"""Issue 17: a 104-label whole-body model within a memory bound, the budget refusal, and
codes for every label.

* The band-by-band stitcher gives MONAI's own sliding-window result (the same windows,
  weights and average); the float16 band changes the argmax only at near-ties.
* A whole-body-shaped bundle (the Model Zoo configs: 105 output channels, the 104
  TotalSegmentator labels, Gaussian window; a small SegResNet at the bundle's own 3 mm
  switch) runs on a generated 256 x 256 x 200 CT in a child process whose address space
  is limited (``RLIMIT_AS``) to 3.3 GB. Measured on this branch: VmPeak 2.59 GB. The
  code before it (115b282: whole-image logits, softmax, per-channel resampling, one
  whole-volume mask per label) needs 105 x 137 x 137 x 167 float32 channels three
  times over (3.9 GB) plus 104 masks of 13 M voxels: it fails under the same limit
  (MemoryError, run by hand with ``git archive 115b282``; see the report).
* A series predicted over ``max_memory_gb`` is refused before it starts with one line,
  and the node does not retry it.
* Every label of the whole-body bundle has a SNOMED CT code (with laterality); the
  SEG's segments carry them.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from waiting import wait_until
from loop_helpers import install_model, jobs_now, node_json, small_study, storescu, write_files
from node_harness import NodeProcess
from pipelines import phantom as ph
from pipelines.codes import segment_coding
from pipelines.inference import load_model, nearest_labels_on_source_grid
from pipelines.memory import MemoryBudgetError, estimate_memory
from pipelines.run import run_series
from pipelines.stitching import WindowSettings, stream_sliding_window
from registry.anatomy import anatomy_for_label, unmapped_labels
from registry.store import Registry
from registry_bundles import WHOLEBODY, wholebody_bundle

REPO = Path(__file__).resolve().parents[1]
#: Address-space limit of the child (bytes); see the module docstring.
AS_LIMIT = 3_300_000_000


def _bundle_labels() -> list[str]:
    meta = json.loads((WHOLEBODY / "configs" / "metadata.json").read_text())
    names = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return [names[str(i)] for i in range(1, len(names))]


def test_every_whole_body_label_has_a_snomed_code_with_laterality() -> None:
    labels = _bundle_labels()
    assert len(labels) == 104
    assert unmapped_labels(labels) == ()
    for name in labels:
        code = anatomy_for_label(name)
        assert code is not None and code.type_code.isdigit() and "TotalSegmentator" in code.source
        side = "L" if "left" in name else "R" if "right" in name else ""
        if name in ("lung_middle_lobe_right", "heart_atrium_left", "heart_atrium_right",
                    "heart_ventricle_left", "heart_ventricle_right"):
            side = ""  # the side is in the structure itself
        assert code.laterality == side, name
    kidney = segment_coding("kidney_left")
    assert (kidney.type.value, kidney.laterality.value) == ("64033007", "7771000")
    assert segment_coding("portal_vein_and_splenic_vein").standard


def test_import_reports_unmapped_labels_with_the_count(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from registry_bundles import edit_config

    bundle = wholebody_bundle(tmp_path / "wb", small=True)

    def rename(meta: dict) -> None:
        cd = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        cd["93"], cd["50"] = "mystery_gland", "other_thing"
    edit_config(bundle, "metadata.json", rename)
    with Registry(tmp_path / "data") as reg:
        mv = reg.import_bundle(bundle, task="wholebody-ct", by="t")
    assert sum(1 for lab in mv.labels if lab.code is None) == 2
    assert "2 of 104 labels" in caplog.text and "mystery_gland, other_thing" in caplog.text \
        or "2 of 104 labels" in caplog.text and "other_thing, mystery_gland" in caplog.text


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(40, 50, 70), (20, 30, 25)])
def test_band_stitching_is_monais_sliding_window(mode: str, shape: tuple[int, int, int]) -> None:
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=7, init_filters=8,
                    blocks_down=[1, 1], blocks_up=[1]).eval()
    inferer = SlidingWindowInferer(roi_size=(32, 32, 32), sw_batch_size=2, overlap=0.25, mode=mode,
                                   padding_mode="replicate")
    x = torch.randn(1, 1, *shape)
    parts: dict[int, tuple[int, torch.Tensor]] = {}
    with torch.inference_mode():
        ref = inferer(x, net)[0]
        axis = stream_sliding_window(x, net, WindowSettings.from_inferer(inferer),
                                     lambda a, b, v: parts.__setitem__(a, (b, v.clone())))
    starts = sorted(parts)
    assert starts[0] == 0 and parts[starts[-1]][0] == shape[axis]
    assert all(parts[a][0] == b for a, b in zip(starts, starts[1:]))  # each index once, in order
    got = torch.cat([parts[a][1] for a in starts], dim=1 + axis)
    assert torch.allclose(got, ref, atol=1e-5)


def test_float16_band_changes_the_argmax_only_at_near_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SegResNet

    import pipelines.stitching as st

    monkeypatch.setattr(st, "FLOAT32_BAND_BYTES", 1)  # every band in float16
    torch.manual_seed(1)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=12, init_filters=8,
                    blocks_down=[1, 1], blocks_up=[1]).eval()
    inferer = SlidingWindowInferer(roi_size=(32, 32, 32), overlap=0.25, mode="gaussian")
    x = torch.randn(1, 1, 48, 40, 90)
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        ref = inferer(x, net)[0]
        st.stream_sliding_window(x, net, WindowSettings.from_inferer(inferer),
                                 lambda a, b, v: out.append(v.clone()))
    got = torch.cat(out, dim=3)
    assert (got - ref).abs().max() <= 2e-3 * ref.abs().max()
    differ = got.argmax(0) != ref.argmax(0)
    top2 = ref.topk(2, dim=0).values
    assert differ.float().mean() < 1e-3
    assert bool(((top2[0] - top2[1])[differ] < 1e-2 * ref.abs().max()).all())


@pytest.mark.parametrize("oblique", [False, True])
def test_nearest_label_map_return_matches_coordinate_sampling(oblique: bool) -> None:
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 105, size=(30, 26, 22)).astype(np.uint8)
    m = np.eye(4)
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        m[:3, :3] = [[0, 0.4 * c, -0.4 * s], [0, 0.4 * s, 0.4 * c], [0.7, 0, 0]]
    else:
        m[:3, :3] = [[0, 0, 0.45], [0, -0.5, 0], [0.7, 0, 0]]
        m[1, 3] = 25.0
    shape = (40, 50, 60)
    got = nearest_labels_on_source_grid(labels, m, shape, chunk=7)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).reshape(3, -1)
    coords = m[:3, :3] @ idx + m[:3, 3:4]
    coords = np.clip(np.rint(coords), 0, np.array(labels.shape)[:, None] - 1)
    ref = map_coordinates(labels, coords, order=0).reshape(shape)
    assert got.dtype == np.uint8 and np.array_equal(got, ref)


@pytest.fixture(scope="module")
def wholebody(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A registry with the small whole-body bundle active, and a generated 256^2 x 200 CT."""
    root = tmp_path_factory.mktemp("wholebody")
    with Registry(root / "data") as reg:
        reg.import_bundle(wholebody_bundle(root / "wb", small=True), task="wholebody-ct",
                          activate=True, by="t")
    g = ph.SliceGeometry(rows=256, columns=256, slices=200, pixel_spacing=(1.6, 1.6),
                         slice_spacing=2.5)
    ct = root / "ct"
    ct.mkdir()
    for k, ds in enumerate(ph.ct_series(ph.Anatomy.random(5), g, ph.StudyInfo(body_part="CHESTABDOMEN"))):
        pydicom.dcmwrite(ct / f"{k:04d}.dcm", ds, enforce_file_format=True)
    return root / "data", ct


CHILD = """
import json, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from pipelines.inference import load_model
from pipelines.run import run_series
from pipelines.types import WriterOptions
from registry.store import Registry
reg = Registry(sys.argv[1])
model = load_model(reg.resolve("wholebody-ct", "", ""), registry=reg)
out = run_series(sorted(Path(sys.argv[2]).glob("*.dcm")), model,
                 options=WriterOptions(write_overlay=False))
seg = out.results.seg
Path(sys.argv[3]).write_bytes(b"")
seg.save_as(sys.argv[3], enforce_file_format=True)
status = {{line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status")
          if line.startswith(("VmPeak", "VmHWM"))}}
print(json.dumps({{"found": sum(1 for s in out.segments if not s.is_empty), **status}}))
"""


@pytest.mark.slow
def test_whole_body_bundle_runs_under_an_address_space_limit(wholebody: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    data, ct = wholebody
    seg_path = tmp_path / "seg.dcm"
    proc = subprocess.run([sys.executable, "-c", CHILD.format(limit=AS_LIMIT), str(data), str(ct),
                           str(seg_path)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"under RLIMIT_AS {AS_LIMIT / 1e9:.1f} GB: VmPeak {row['VmPeak'] / 1e6:.2f} GB, "
          f"VmHWM {row['VmHWM'] / 1e6:.2f} GB, {row['found']} segments found")
    assert row["VmPeak"] * 1024 <= AS_LIMIT
    seg = pydicom.dcmread(seg_path)
    segments = list(seg.SegmentSequence)
    assert len(segments) == row["found"] > 10
    for item in segments:  # every mapped label carries its SNOMED CT code and side
        name = str(item.SegmentLabel)
        code = anatomy_for_label(name)
        assert code is not None, name
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == (code.type_code, "SCT"), name
        modifiers = prop.get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [m.CodeValue for m in modifiers] == ([code.laterality_code[0]]
                                                     if code.laterality else []), name


def test_prediction_for_the_whole_body_bundle_fits_its_goals() -> None:
    """The published bundle (105 channels, 1.5 mm, 96^3) on 512 x 512 x 300 at 0.8/2.5 mm:
    the prediction stays within the issue's 6 GB (8 GB for 500 slices) given 1 GB held
    by the process before the series (torch, MONAI and the weights: about 0.4 GB in a
    fresh process) and a 96^3 window's activations as measured for this SegResNet
    (1.7 GB peak RSS of one forward pass)."""
    aff = np.diag([2.5, 0.8, 0.8, 1.0])
    for slices, goal in ((300, 6e9), (500, 8e9)):
        est = estimate_memory(source_shape=(slices, 512, 512), source_affine=aff,
                              model_spacing_mm=(1.5, 1.5, 1.5), roi_size=(96, 96, 96),
                              sw_batch_size=1, channels=105, activation=1_700_000_000,
                              baseline_bytes=1_000_000_000)
        assert est.model_grid == (slices * 5 // 3 if slices * 2.5 % 1.5 == 0 else
                                  int(np.ceil(slices * 2.5 / 1.5)), 274, 274)
        print(f"{slices} slices: {est.summary()}")
        assert est.peak_bytes < goal


def test_series_over_the_budget_is_refused_before_it_starts(wholebody: tuple[Path, Path]) -> None:
    data, ct = wholebody
    with Registry(data) as reg:
        model = load_model(reg.resolve("wholebody-ct", "", ""), registry=reg)
    files = sorted(ct.glob("*.dcm"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MemoryBudgetError) as info:
        run_series(files, model, max_memory_bytes=200_000_000)
    text = str(info.value)
    assert "\n" not in text and "refused before inference" in text and "max_memory_gb is 0.2" in text
    assert "105 channels" in text and "not retried" in text
    assert isinstance(info.value, MemoryError)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB: no pixels read


@pytest.mark.slow
def test_node_refuses_a_study_over_the_budget_once_and_keeps_serving(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    install_model(data)
    node = NodeProcess(data, config="max_memory_gb = 0.05\n",
                       extra_args=["--stable-after", "1.5"]).start()
    try:
        datasets = small_study("BUDGET-1", slices=20)
        storescu(node.port, write_files(datasets, tmp_path / "study"), node.ae_title)
        study_uid = str(datasets[0].StudyInstanceUID)

        def newest_state() -> str:
            jobs = [j for j in jobs_now(node.data_dir) if j.study_uid == study_uid]
            return jobs[0].state.value if jobs else ""
        wait_until("the job refused", lambda: newest_state() == "failed", 120)
        job = [j for j in node_json(node, "jobs") if j["study_uid"] == study_uid][0]
        assert job["state"] == "failed"
        assert job["attempts"] == 1
        assert "refused before inference" in job["error"]
        refusals = [line for line in node.log().splitlines() if "refused before inference" in line]
        assert len(refusals) == 1, refusals  # one line, no traceback, no retry
        assert "Traceback" not in node.log()
        assert node.proc.poll() is None  # the node (and its DICOM port) is still up
        echo = subprocess.run(["echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"})
        assert echo.returncode == 0, echo.stderr
    finally:
        node.stop()
