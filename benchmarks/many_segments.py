"""Writing SEG, SR and overlay for many segments: time and peak memory.

For 10, 50 and 104 segments over a 512 x 512 CT of 300 slices (the whole-body CT
bundle's label names, disjoint ellipsoids on a lattice, about 16 segments per slice
with 104), each case in its own child process so that its peak RSS is its own:

* ``node-binary``: the node's writers (:func:`pipelines.writers.build_seg` BINARY,
  ``build_sr``, ``build_overlay``) on the segments as bounding-box crops, then the
  RTSTRUCT (:func:`pipelines.writers.rtstruct.build_rtstruct`, timed apart: it is an
  output kind only some destinations take);
* ``node-labelmap``: the same with ``WriterOptions(seg_type="labelmap")``;
* ``highdicom-plain``: highdicom's ``Segmentation`` called plainly on the same masks
  as a stack of whole-volume masks (``(slices, rows, columns, segments)`` bool, the
  layout its documentation shows first), BINARY, no SR/overlay. 104 such masks are
  8 GB; the plain call is run for ``--plain-max`` segments at most (default 50).

Run from the repository root:

    .venv/bin/python benchmarks/many_segments.py                 # 10, 50, 104
    .venv/bin/python benchmarks/many_segments.py --segments 104 --slices 100 --json out.json

Each case prints one line: wall seconds for SEG, SR, overlay (and their sum), the
CPU seconds of the three (``time.process_time``: what they cost on an idle machine
when the wall time is inflated by other load), the SEG's size, frames and peak RSS. Exit status 1 when a case fails its checks
(every segment in the SEG with its code; in the SR, per segment one volume group and one
outline group).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUNDLE_METADATA = ROOT.parent / "shared" / "reference" / "monai-bundles" / \
    "wholeBody_ct_segmentation" / "configs" / "metadata.json"


def _label_names(n: int) -> list[str]:
    for candidate in (BUNDLE_METADATA, Path("/work/shared/reference/monai-bundles/"
                                            "wholeBody_ct_segmentation/configs/metadata.json")):
        if candidate.is_file():
            meta = json.loads(candidate.read_text())
            names = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
            return [names[str(i)] for i in range(1, n + 1)]
    return [f"structure_{i}" for i in range(1, n + 1)]


def make_volume(slices: int, rows: int = 512, cols: int = 512):  # noqa: ANN201
    """A Volume with real CT headers (no anatomy rendered: HU are a smooth ramp)."""
    from pipelines.phantom import SliceGeometry, StudyInfo, _ct_dataset
    from pipelines.types import Volume

    import datetime as dt

    g = SliceGeometry(rows=rows, columns=cols, slices=slices, pixel_spacing=(0.8, 0.8),
                      slice_spacing=2.5)
    info = StudyInfo(body_part="CHESTABDOMEN")
    now = dt.datetime(2026, 1, 15, 9, 30)
    blank = np.zeros((rows, cols), np.uint16)
    headers = []
    for k in range(slices):
        ds = _ct_dataset(blank, g, k, info, now)
        del ds.PixelData
        headers.append(ds)
    hu = np.broadcast_to(np.linspace(-1000, 400, cols, dtype=np.float32), (slices, rows, cols))
    hu = np.ascontiguousarray(hu)
    hu.flags.writeable = False
    return Volume(array=hu, affine=g.affine, frame_of_reference_uid=info.frame_of_reference_uid,
                  study_instance_uid=info.study_uid, series_instance_uid=info.series_uid,
                  source_images=tuple(headers), source_grid_positions=tuple(float(k) for k in range(slices)))


def lattice_labels(shape: tuple[int, int, int], n: int) -> np.ndarray:
    """n disjoint ellipsoids on a lattice (z cells x 4 x 4) filling the volume."""
    nz = max(1, -(-n // 16))
    lab = np.zeros(shape, np.uint8)
    cz, cy, cx = shape[0] / nz, shape[1] / 4, shape[2] / 4
    for v in range(1, n + 1):
        c = v - 1
        z, y, x = c // 16, (c % 16) // 4, c % 4
        z0, z1 = int(z * cz), int((z + 1) * cz)
        y0, y1 = int(y * cy), int((y + 1) * cy)
        x0, x1 = int(x * cx), int((x + 1) * cx)
        kk, ii, jj = np.ogrid[z0:z1, y0:y1, x0:x1]
        inside = (((kk - (z0 + z1 - 1) / 2) / (0.45 * (z1 - z0))) ** 2
                  + ((ii - (y0 + y1 - 1) / 2) / (0.45 * (y1 - y0))) ** 2
                  + ((jj - (x0 + x1 - 1) / 2) / (0.45 * (x1 - x0))) ** 2) <= 1
        lab[z0:z1, y0:y1, x0:x1][inside] = v
    return lab


#: Concept names of a measurement group's segment reference (TID 1411) and outline (TID 1410).
REFERENCED_SEGMENT, IMAGE_REGION = ("121191", "DCM"), ("111030", "DCM")


def sr_check(sr) -> dict:  # noqa: ANN001
    """Count the SR's measurement groups: per segment a volume (TID 1411, referencing its
    SEG segment) and an outline on its largest slice (TID 1410, an Image Region)."""
    groups = sr.ContentSequence[-1].ContentSequence
    kinds = [{(str(i.ConceptNameCodeSequence[0].CodeValue),
               str(i.ConceptNameCodeSequence[0].CodingSchemeDesignator))
              for i in g.ContentSequence} for g in groups]
    return {"sr_groups": len(groups),
            "sr_volumes": sum(1 for k in kinds if REFERENCED_SEGMENT in k),
            "sr_outlines": sum(1 for k in kinds if IMAGE_REGION in k)}


def child(n: int, slices: int, mode: str) -> dict:
    import highdicom as hd

    from pipelines.codes import segment_coding
    from pipelines.postprocess import split_labels
    from pipelines.types import ModelInfo, WriterOptions
    from pipelines.writers import build_overlay, build_seg, build_sr
    from pipelines.writers.rtstruct import build_rtstruct

    vol = make_volume(slices)
    names = _label_names(n)
    lab = lattice_labels(vol.shape, n)
    t0 = time.perf_counter()
    segments = split_labels(lab, vol, {i + 1: name for i, name in enumerate(names)})
    t_split = time.perf_counter() - t0
    del lab
    model = ModelInfo(name="wholebody-ct", version="bench")
    row: dict = {"segments": n, "slices": slices, "mode": mode, "split_s": round(t_split, 3)}
    if mode == "highdicom-plain":
        masks = np.stack([s.mask for s in segments], axis=-1)
        descriptions = [hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=s.name,
            segmented_property_category=segment_coding(s.name).category,
            segmented_property_type=segment_coding(s.name).type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="bench", version="1", family=hd.sr.CodedConcept("123", "99X", "AI")))
            for i, s in enumerate(segments)]
        t0, c0 = time.perf_counter(), time.process_time()
        seg = hd.seg.Segmentation(
            source_images=list(vol.source_images), pixel_array=masks,
            segmentation_type="BINARY", segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="x", manufacturer_model_name="x",
            software_versions="1", device_serial_number="1")
        row["seg_s"] = round(time.perf_counter() - t0, 3)
        row["seg_cpu_s"] = round(time.process_time() - c0, 3)
        row["sr_s"] = row["overlay_s"] = row["sr_cpu_s"] = row["overlay_cpu_s"] = None
    else:
        opts = WriterOptions(seg_type="labelmap" if mode == "node-labelmap" else "binary")
        t0, c0 = time.perf_counter(), time.process_time()
        seg = build_seg(vol, segments, model, options=opts)
        t1, c1 = time.perf_counter(), time.process_time()
        sr = build_sr(vol, seg, segments, model, options=opts)
        t2, c2 = time.perf_counter(), time.process_time()
        overlay = build_overlay(vol, segments, model, options=opts)
        t3, c3 = time.perf_counter(), time.process_time()
        rtstruct = build_rtstruct(vol, segments, model, options=opts)
        t4, c4 = time.perf_counter(), time.process_time()
        row.update(seg_s=round(t1 - t0, 3), sr_s=round(t2 - t1, 3), overlay_s=round(t3 - t2, 3),
                   seg_cpu_s=round(c1 - c0, 3), sr_cpu_s=round(c2 - c1, 3),
                   overlay_cpu_s=round(c3 - c2, 3), overlay_images=len(overlay),
                   rtstruct_s=round(t4 - t3, 3), rtstruct_cpu_s=round(c4 - c3, 3),
                   rtstruct_rois=len(rtstruct.StructureSetROISequence),
                   rtstruct_contours=sum(len(c.ContourSequence) for c in rtstruct.ROIContourSequence))
        row["rtstruct_ok"] = row["rtstruct_rois"] == n
        row.update(sr_check(sr))
        row["ok"] = row["sr_volumes"] == row["sr_outlines"] == row["sr_groups"] // 2 == n \
            and row["rtstruct_ok"]
        coded = sum(1 for item in seg.SegmentSequence
                    if item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT")
        row["coded_segments"] = coded
    t0 = time.perf_counter()
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    row["seg_encode_s"] = round(time.perf_counter() - t0, 3)
    row["seg_mb"] = round(buf.tell() / 1e6, 2)
    row["frames"] = int(seg.NumberOfFrames)
    row["seg_segments"] = len(seg.SegmentSequence)
    row["ok"] = row.get("ok", True) and sum(1 for i in seg.SegmentSequence if int(i.SegmentNumber)) == n
    row["total_s"] = round(sum(row[k] or 0 for k in ("seg_s", "sr_s", "overlay_s")), 3)
    row["total_cpu_s"] = round(sum(row[k] or 0 for k in ("seg_cpu_s", "sr_cpu_s", "overlay_cpu_s")), 3)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", default="10,50,104")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--modes", default="node-binary,node-labelmap,highdicom-plain")
    ap.add_argument("--plain-max", type=int, default=50)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("N", "SLICES", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        n, slices, mode = int(args.child[0]), int(args.child[1]), args.child[2]
        print(json.dumps(child(n, slices, mode)))
        return 0
    rows = []
    failed = False
    load = os.getloadavg()
    print(f"# {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    for n in (int(x) for x in args.segments.split(",")):
        for mode in args.modes.split(","):
            if mode == "highdicom-plain" and n > args.plain_max:
                print(f"{n:4d} {mode:16s} skipped: {n} whole-volume masks of "
                      f"{args.slices}x512x512 are {n * args.slices * 512 * 512 / 1e9:.1f} GB")
                continue
            with tempfile.TemporaryDirectory():
                proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(args.slices),
                                       mode], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{n:4d} {mode:16s} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
                failed = True
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            failed |= not row.get("ok", False)
            print(f"{n:4d} {mode:16s} SEG {row['seg_s']:6.2f} s  SR {row['sr_s'] or 0:5.2f} s  "
                  f"overlay {row['overlay_s'] or 0:5.2f} s  = {row['total_s']:6.2f} s  "
                  f"[CPU {row['total_cpu_s']:6.2f} s] (+encode {row['seg_encode_s']:.2f} s)  SEG {row['seg_mb']:7.2f} MB "
                  f"{row['frames']:6d} frames  peak RSS {row['peak_rss_mb']:7.0f} MB"
                  + (f"  | RTSTRUCT {row['rtstruct_s']:5.2f} s [CPU {row['rtstruct_cpu_s']:5.2f} s] "
                     f"{row['rtstruct_contours']} contours" if "rtstruct_s" in row else "")
                  + ("" if row.get("ok") else "  CHECK FAILED"))
    if args.json:
        args.json.write_text(json.dumps({"load_average": load, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
