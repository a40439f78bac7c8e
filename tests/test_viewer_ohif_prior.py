"""Issue 26 in a real web viewer: the SR that sets today's result against the prior.

Today's CT, its SEG and its SR holding the comparison (TID 1502 time point contexts,
the prior's volume as a second group of the same Tracking UID, the prior SEG as
evidence), and the prior CT, are stored in Orthanc; OHIF 3.13.2 in headless Chromium
opens today's study and the SR (``tests/viewer/ohif_check.mjs``, its SR step only, as
``tests/test_viewer_ohif.py`` drives it). Checked: no console error, and both time
points' volumes on screen. Small data (the phantom's truth as the segmentation, no
model) keep it short; the demo's full run is ``tests/test_viewer_ohif.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from loop_helpers import pacs, storescu, write_files
from orthanc.viewer import ViewerServer
from pipelines import phantom as ph
from pipelines.comparison import PriorResult, PriorSegment, compare
from pipelines.types import WriterOptions
from pipelines.writers import save_results, write_results
from tests.test_priors_comparison import MODEL, grown, truth_result
from tests.test_viewer_ohif import ASSETS, BROWSER_TIMEOUT, DRIVER, PUPPETEER, REPO

pytestmark = [pytest.mark.viewer, pytest.mark.orthanc]


def _study(anatomy: ph.Anatomy, date: str) -> list:
    g = ph.SliceGeometry(rows=128, columns=128, slices=40, pixel_spacing=(3.1, 3.1),
                         slice_spacing=5.0)
    dss = ph.ct_series(anatomy, g, ph.StudyInfo(patient_id="OHIF-PRIOR",
                                                patient_name="Prior^Viewer"))
    for ds in dss:
        ds.StudyDate = date
    return dss


def test_the_sr_with_the_prior_comparison_reads_in_ohif(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian chromium is required (scripts/setup.sh installs it)"
    assert PUPPETEER.is_file(), "puppeteer-core is required (scripts/setup.sh: viewer-assets/)"
    assert (ASSETS / "ohif" / "index.html").is_file(), "OHIF is required (scripts/setup.sh)"
    a1 = ph.Anatomy.random(7)
    before = _study(a1, "20251203")
    v1, s1, r1 = truth_result(before, a1)
    prior = PriorResult(study_uid=v1.study_instance_uid, study_date=dt.date(2025, 12, 3),
                        segments=tuple(PriorSegment(name=s.name, volume_ml=s.volume_ml)
                                       for s in s1 if s.volume_ml > 0),
                        seg=r1.seg, model_version=MODEL.version)
    a2 = grown(a1, 1.5)
    today = _study(a2, "20261203")
    v2, s2, _ = truth_result(today, a2)
    comparison = compare([(s.name, s.volume_ml) for s in s2], dt.date(2026, 12, 3), prior)
    r2 = write_results(v2, s2, MODEL, comparison=comparison,
                       options=WriterOptions(write_overlay=False))
    spleen = comparison.change("spleen")
    images = [*write_files(before, tmp_path / "before"), *write_files(today, tmp_path / "today")]
    with pacs(tmp_path / "orthanc", dicomweb=True) as orthanc:
        storescu(orthanc.dicom_port, images, orthanc.aet)
        orthanc.stow([p.read_bytes() for p in save_results(r2, tmp_path / "results")])
        with ViewerServer(orthanc.url) as web:
            args = {"url": web.study_url(v2.study_instance_uid), "outDir": str(tmp_path),
                    "puppeteer": str(PUPPETEER), "chromium": chromium, "steps": ["sr"],
                    "srDescription": str(r2.sr.SeriesDescription)}
            run = subprocess.run(["node", str(DRIVER), json.dumps(args)], capture_output=True,
                                 text=True, timeout=BROWSER_TIMEOUT, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert "failure" not in found, found.get("failure")
    assert found["errors"] == [], found["errors"]
    text = found["sr_text"]
    print(f"\nOHIF, the SR with the comparison (spleen {spleen.prior_volume_ml:.1f} -> "
          f"{spleen.volume_ml:.1f} mL, {spleen.change_pct:+.1f} %), on screen:\n{text[-1500:]}")
    volumes = [float(v) for v in re.findall(r"Volume: ([\d.]+) mL", text)]
    assert any(abs(v - spleen.volume_ml) < 0.06 for v in volumes), text[-1500:]
    assert any(abs(v - spleen.prior_volume_ml) < 0.06 for v in volumes), text[-1500:]
