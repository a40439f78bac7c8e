"""The archive-scale benchmark's fixture (``benchmarks/archive_scale.py``) stays a real archive.

The builder writes files and index rows directly, beside the ingest path, so it could
drift from the archive as the schema evolves. A small built data directory must pass
``dicom-node archive verify``, show a built patient with ``twin show``, and give the
same rows back when ``archive rebuild-index`` reads its files with the archive's own
code.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import closing
from pathlib import Path

from benchmarks.archive_scale import Scale, a_patient, build_data_dir
from dicom_node.foundation.database import connect
from twin_archive import Archive
from twin_archive.rebuild import rebuild_index

REPO = Path(__file__).resolve().parents[1]
SCALE = Scale(instances=2000, patients=40, series=100)


def _rows(index: Path, sql: str) -> set[tuple[object, ...]]:
    with closing(connect(index, timeout_s=10, readonly=True)) as db:
        return {tuple(r) for r in db.execute(sql)}


def test_built_directory_verifies_clean_and_shows_a_built_patient(tmp_path: Path) -> None:
    data = tmp_path / "built"
    info = build_data_dir(data, SCALE, progress=False)
    assert info["instances"] == 2000
    out = subprocess.run([sys.executable, "-m", "dicom_node", "--data-dir", str(data),
                          "archive", "verify"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all well" in out.stdout and "2000 instance row(s) checked" in out.stdout

    pid = a_patient(data)
    series = SCALE.series_of_patient(int(pid.removeprefix("SCALE")) - 1)
    n = sum(SCALE.instances_of_series(s) for s in series)
    with Archive(data) as archive:
        detail = archive.twins.twin(pid)
        assert detail.twin.patient_id == pid
        assert (detail.twin.series, detail.twin.instances) == (len(series), n) and n >= 40
        assert sum(se.instances for st in detail.studies for se in st.series) == n
        files = archive.twins.series_files(detail.studies[0].series[0].series_uid)
        assert len(files) == 20 and all(f.is_file() for f in files)
    show = subprocess.run([sys.executable, "-m", "dicom_node", "--data-dir", str(data),
                           "twin", "show", pid], capture_output=True, text=True, cwd=REPO)
    assert show.returncode == 0, show.stdout + show.stderr
    assert f"Patient {pid}" in show.stdout and "20 instances" in show.stdout


def test_rebuilding_the_index_from_the_built_files_gives_the_built_rows(tmp_path: Path) -> None:
    data = tmp_path / "built"
    build_data_dir(data, Scale(instances=300, patients=6, series=15), progress=False)
    queries = {
        "twins": "SELECT patient_key, patient_id, issuer_of_patient_id, patient_name,"
                 " birth_date, sex, donate, unidentified FROM twins",
        "studies": "SELECT study_uid, patient_key, study_date, study_time, description,"
                   " accession_number FROM studies",
        "series": "SELECT series_uid, study_uid, modality, body_part, description,"
                  " series_number, manufacturer, model_name, frame_of_reference_uid FROM series",
        "instances": "SELECT sop_instance_uid, sop_class_uid, series_uid, study_uid,"
                     " patient_key, instance_number, transfer_syntax_uid, size, sha256, path,"
                     " calling_ae, version, current, uid_flags, missing_at FROM instances",
    }
    built = {name: _rows(data / "index.sqlite", sql) for name, sql in queries.items()}
    report = rebuild_index(data)
    assert report.instances == 300 and report.quarantined == 0
    rebuilt = {name: _rows(data / "index.sqlite", sql) for name, sql in queries.items()}
    for name in queries:
        assert rebuilt[name] == built[name], name
