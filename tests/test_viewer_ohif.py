"""The demo's results in a real web viewer: OHIF 3.13.2 in headless Chromium, over
Orthanc's DICOMweb, as ``dicom-node demo --viewer`` serves them to a person.

One run of ``dicom-node demo --viewer`` (80-slice 512x512 CT, the shipped demo model),
then ``tests/viewer/ohif_check.mjs`` (puppeteer-core driving Debian's chromium with
SwiftShader WebGL) opens the study and, as a radiologist would, double-clicks the SEG
and answers "Yes", opens the overlay series, then the SR, then double-clicks the RTSTRUCT
and answers "Yes". Checked here:

* SEG: on the slice where the phantom's spleen is largest, the segment's colour lies
  inside the spleen's true outline projected onto the screen (through the viewport's
  own world-to-canvas transform) and not outside it;
* overlay: the series displays (its red banner and the legend's spleen colour);
* SR: opens with no error in the page console, the spleen's outline is drawn and the
  volume the node measured is on screen;
* RTSTRUCT (the demo's destination takes it, issue 25): loads with no error, OHIF lists
  its one ROI, the spleen, in the segmentation panel, and on the same slice what it
  draws (the screen with the contours against the same screen with them hidden) runs
  along the outline of the SEG as OHIF drew it, all round it, and not away from it;
* no console error anywhere on the way.

Needs what ``scripts/setup.sh`` installs (chromium, orthanc-dicomweb, OHIF and
puppeteer-core under ``viewer-assets/``); fails, never skips, without them. With
``VIEWER_SCREENSHOTS=DIR`` the four screenshots are copied to DIR (the README's come
from ``VIEWER_SCREENSHOTS=docs``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipelines.codes import segment_coding
from pipelines.phantom import LABELS, Anatomy, SliceGeometry

pytestmark = [pytest.mark.viewer, pytest.mark.orthanc]

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "viewer-assets"
PUPPETEER = ASSETS / "node_modules/puppeteer-core/lib/esm/puppeteer/puppeteer-core.js"
DRIVER = Path(__file__).with_name("viewer") / "ohif_check.mjs"
SEED, SLICES = 7, 80  # the demo's defaults
DEMO_TIMEOUT = 420.0
BROWSER_TIMEOUT = 300.0


class Demo:
    """``dicom-node demo --viewer`` in a subprocess; its output collected by a thread."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.lines: list[str] = []
        self.url_seen = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "--data-dir", str(data_dir), "demo", "--viewer",
             "--slices", str(SLICES), "--seed", str(SEED), *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "web viewer on this study:" in line:
                self.url_seen.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def url(self) -> str:
        deadline = time.monotonic() + DEMO_TIMEOUT
        while not self.url_seen.wait(1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"demo --viewer printed no viewer URL:\n{self.output[-5000:]}")
        (match,) = re.findall(r"web viewer on this study: (\S+)", self.output)
        return str(match)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def _truth_slice() -> tuple[int, SliceGeometry, np.ndarray]:
    """The slice where the phantom's spleen is largest and its true mask there."""
    g = SliceGeometry(slices=SLICES)
    anatomy = Anatomy.random(SEED)
    spleen = {v: k for k, v in LABELS.items()}["spleen"]
    areas = [(anatomy.sample(g.points(k))[1] == spleen).sum() for k in range(SLICES)]
    k = int(np.argmax(areas))
    return k, g, anatomy.sample(g.points(k))[1] == spleen


def _screen_to_image(view: dict) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray,
                                                np.ndarray]:
    """For each screen pixel of a viewport's canvas, the CT pixel (row, column) under it,
    through the viewport's own world-to-canvas transform of three CT corners.

    Returns the canvas rectangle (x, y, width, height), rows and columns (clipped to the
    image) and whether the screen pixel lies on the image.
    """
    c00, c0j, ci0 = (np.asarray(p, np.float64) for p in view["canvas"])
    origin = np.array([view["rect"]["x"], view["rect"]["y"]]) + c00
    to_screen = np.stack([(ci0 - c00) / 511, (c0j - c00) / 511], axis=1)  # (x,y) per (row, col)
    from_screen = np.linalg.inv(to_screen)
    x0, y0 = int(view["rect"]["x"]), int(view["rect"]["y"])
    w, h = int(view["rect"]["width"]), int(view["rect"]["height"])
    ys, xs = np.mgrid[y0:y0 + h, x0:x0 + w]
    ij = np.einsum("ab,hwb->hwa", from_screen, np.stack([xs - origin[0], ys - origin[1]], -1))
    i, j = np.rint(ij[..., 0]).astype(int), np.rint(ij[..., 1]).astype(int)
    on_image = (i >= 0) & (i < 512) & (j >= 0) & (j < 512)
    return (x0, y0, w, h), np.clip(i, 0, 511), np.clip(j, 0, 511), on_image


def _tinted(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels pushed from grey towards ``colour``'s hue (the CT is grey, the segment is not;
    the viewer's own cyan/blue controls point elsewhere)."""
    px = rgb[..., :3].astype(np.float32)
    chroma = px - px.mean(axis=-1, keepdims=True)
    c = np.asarray(colour, np.float32)
    direction = (c - c.mean()) / np.linalg.norm(c - c.mean())
    along = chroma @ direction
    return (along > 12.0) & (along > 0.85 * np.linalg.norm(chroma, axis=-1))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["single-frame", "multiframe"])
def test_demo_results_show_in_ohif(form: str, tmp_path: Path) -> None:
    """The demo's CT as single-frame slices, and as one Legacy Converted Enhanced CT
    (``demo --multiframe``, issue 24): the same checks on screen."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian chromium is required (scripts/setup.sh installs it)"
    assert PUPPETEER.is_file(), "puppeteer-core is required (scripts/setup.sh: viewer-assets/)"
    assert (ASSETS / "ohif" / "index.html").is_file(), "OHIF is required (scripts/setup.sh)"
    k, g, truth = _truth_slice()
    t0 = time.monotonic()
    demo = Demo(tmp_path / "demo-data", *(["--multiframe"] if form == "multiframe" else []))
    try:
        url = demo.url()
        t_demo = time.monotonic() - t0
        measured = float(re.search(r"measured spleen volume ([\d.]+) mL", demo.output).group(1))
        corners = [(g.affine @ (k, i, j, 1))[:3].tolist() for i, j in ((0, 0), (0, 511), (511, 0))]
        args = {"url": url, "outDir": str(tmp_path), "puppeteer": str(PUPPETEER),
                "chromium": chromium, "slicePosition": g.position(k).tolist(), "points": corners,
                "segDescription": "AI SEG", "overlayDescription": "AI OVERLAY",
                "srDescription": "AI SR", "rtDescription": "AI RTSTRUCT"}
        run = subprocess.run(["node", str(DRIVER), json.dumps(args)], capture_output=True,
                             text=True, timeout=BROWSER_TIMEOUT, cwd=REPO)
        t_browser = time.monotonic() - t0 - t_demo
    finally:
        rc = demo.stop()
    assert rc == 0, demo.output[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert "failure" not in found, found.get("failure")
    print(f"\nviewer test: demo --viewer up in {t_demo:.0f} s, browser steps {t_browser:.0f} s "
          f"(open {found['phases']['study_open']:.0f} s, SEG {found['phases']['seg_loaded']:.0f} s, "
          f"overlay {found['phases']['overlay_shown']:.0f} s, SR {found['phases']['sr_shown']:.0f} s, "
          f"RTSTRUCT {found['phases']['rtstruct_shown']:.0f} s)")
    shots = os.environ.get("VIEWER_SCREENSHOTS")
    if shots:
        for name in ("ohif-seg.png", "ohif-overlay.png", "ohif-sr.png", "ohif-rtstruct-listed.png"):
            shutil.copy(tmp_path / name, REPO / shots / name)

    # --- SEG: the segment's colour inside the spleen's projected true outline, not outside
    assert [s["label"] for s in found["segments"]] == ["spleen"]
    view = found["seg_view"]
    shot = np.asarray(Image.open(tmp_path / "ohif-seg.png").convert("RGB"))
    (x0, y0, w, h), ii, jj, on_image = _screen_to_image(view)
    dist_out = ndimage.distance_transform_edt(~truth)  # image pixels from the organ
    dist_in = ndimage.distance_transform_edt(truth)  # image pixels inside its edge
    tinted = _tinted(shot[y0:y0 + h, x0:x0 + w], segment_coding("spleen").rgb) & on_image
    deep_inside = on_image & (dist_in[ii, jj] > 3)
    far_outside = on_image & (dist_out[ii, jj] > 3)
    inside = tinted[deep_inside].mean()
    outside = tinted[far_outside].sum() / max(1, deep_inside.sum())
    print(f"viewer test: slice {k + 1}/{SLICES}, segment colour on {inside:.1%} of the organ's "
          f"inside; outside it {tinted[far_outside].sum()} pixels ({outside:.2%} of the inside)")
    assert inside > 0.8, "the segment's colour does not cover the spleen on screen"
    assert outside < 0.03, "the segment's colour lies outside the spleen's true outline"

    # --- overlay series displayed: the red banner and the spleen's legend colour
    rect = found["overlay_rect"][0]
    ov = np.asarray(Image.open(tmp_path / "ohif-overlay.png").convert("RGB")).astype(int)
    ov = ov[int(rect["y"]):int(rect["y"] + rect["height"]), int(rect["x"]):int(rect["x"] + rect["width"])]
    red = (ov[..., 0] > 150) & (ov[..., 1] < 40) & (ov[..., 2] < 40)
    assert red.sum() > 5000, "no overlay banner on screen"
    assert (np.abs(ov - segment_coding("spleen").rgb).max(axis=-1) < 30).sum() > 50

    # --- SR: no error, the outline drawn and the measured volume on screen
    assert found["errors"] == [], found["errors"]
    volumes = [float(v) for v in re.findall(r"Volume: ([\d.]+) mL", found["sr_text"])]
    assert volumes and abs(volumes[0] - measured) < 0.06, found["sr_text"][-1500:]
    sr = np.asarray(Image.open(tmp_path / "ohif-sr.png").convert("RGB"))
    assert _tinted(sr[y0:y0 + h, x0:x0 + w], segment_coding("spleen").rgb).sum() > 100

    # --- RTSTRUCT: its ROI listed; what it draws runs along the SEG's outline as OHIF drew
    # it on the same slice (both are the node's one segmentation; the SEG was checked
    # against the spleen's true outline above)
    assert [s["label"] for s in found["rt_segments"]] == ["spleen"], found.get("rt_segments")
    assert found["rt_listed"] >= 1, ("the RTSTRUCT's ROI is not listed in the segmentation "
                                     f"panel ({found.get('rt_panel_tabs')})")
    seg_drawn = np.zeros_like(truth)
    seg_drawn[ii[tinted], jj[tinted]] = True
    seg_drawn = ndimage.binary_fill_holes(ndimage.binary_closing(seg_drawn, iterations=1))
    view = found["rt_view"]
    assert view == found["rt_view_hidden"], "the view moved between the two screenshots"
    (x0, y0, w, h), ii, jj, on_image = _screen_to_image(view)
    rgb = segment_coding("spleen").rgb
    with_contours = np.asarray(Image.open(tmp_path / "ohif-rtstruct.png").convert("RGB"))
    without = np.asarray(Image.open(tmp_path / "ohif-rtstruct-hidden.png").convert("RGB"))
    drawn = (_tinted(with_contours[y0:y0 + h, x0:x0 + w], rgb)
             & ~_tinted(without[y0:y0 + h, x0:x0 + w], rgb) & on_image)
    edge = seg_drawn & ~ndimage.binary_erosion(seg_drawn)  # the SEG's boundary pixels
    from_edge = np.where(seg_drawn, ndimage.distance_transform_edt(seg_drawn),
                         ndimage.distance_transform_edt(~seg_drawn))
    hit = np.zeros_like(truth)
    hit[ii[drawn], jj[drawn]] = True
    covered = (ndimage.binary_dilation(hit, iterations=2) & edge).sum() / edge.sum()
    away = (drawn & (from_edge[ii, jj] > 2)).sum()
    print(f"viewer test: RTSTRUCT drew {drawn.sum()} pixels in the ROI's colour, along "
          f"{covered:.1%} of the SEG's outline; {away} pixels more than 2 image pixels away "
          f"from it (representations {found['rt_representations']})")
    assert drawn.sum() > 100, "the RTSTRUCT's contours are not drawn"
    assert covered > 0.9, "the RTSTRUCT's contour does not follow the SEG's outline"
    assert away < 0.03 * drawn.sum(), "the RTSTRUCT draws away from the SEG's outline"
