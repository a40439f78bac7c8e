"""Issue 26 end to end: the real node, the demo model and a real Orthanc as the PACS.

One phantom patient, three studies a year apart, the spleen 25 % then 50 % larger.
The first two are only in Orthanc (the node was installed since); the third is sent
to the node. The node asks Orthanc for priors (C-FIND, C-MOVE to its own AE), runs the
task on the prior, and today's SR in Orthanc holds both time points and references the
prior study; the prior's results stay in the twin. A second node whose only PACS to ask
never answers sends today's result all the same, without the comparison, and says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from loop_helpers import (
    install_model,
    jobs_now,
    node_json,
    pacs,
    results_in_orthanc,
    storescu,
    write_files,
)
from node_harness import NodeProcess
from orthanc.server import OrthancServer
from pipelines import phantom as ph
from tests.test_priors_comparison import grown
from waiting import wait_until

pytestmark = pytest.mark.orthanc

GROWTH = 1.5
RESULT_TIMEOUT = 240.0


def _study(anatomy: ph.Anatomy, date: str, patient_id: str) -> list[pydicom.Dataset]:
    size, slices = 128, 40
    spacing = 0.78 * 512 / size
    g = ph.SliceGeometry(rows=size, columns=size, slices=slices, pixel_spacing=(spacing, spacing),
                         slice_spacing=5.0)
    dss = ph.ct_series(anatomy, g, ph.StudyInfo(patient_id=patient_id, patient_name="Prior^Test"))
    for ds in dss:
        ds.StudyDate = date
    return dss


def _config(orthanc_port: int, query_port: int, *, query_aet: str = "ORTHANC") -> str:
    return ("priors_years = 5\npriors_timeout_s = 3\nsend_backoff_initial_s = 0.5\n"
            "[[destinations]]\n"
            f'ae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc_port}\n'
            f"query = {'true' if query_port == orthanc_port else 'false'}\n"
            + ("" if query_port == orthanc_port else
               "[[destinations]]\n"
               f'name = "silent"\nae_title = "{query_aet}"\nhost = "127.0.0.1"\n'
               f'port = {query_port}\nquery = true\nsend = ["sr"]\n'))


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("priors-e2e")
    data = tmp / "data"
    install_model(data)
    node = NodeProcess(data, extra_args=["--stable-after", "1.5"])
    with pacs(tmp / "orthanc", known_modalities={"node": (node.ae_title, "127.0.0.1",
                                                          node.port)}) as orthanc:
        node.config = _config(orthanc.dicom_port, orthanc.dicom_port)
        a1 = ph.Anatomy.random(5)
        older = _study(grown(a1, 0.8), "20241203", "PRIOR-E2E")  # several priors: two
        storescu(orthanc.dicom_port, write_files(older, tmp / "older"), orthanc.aet)
        prior = _study(a1, "20251203", "PRIOR-E2E")
        storescu(orthanc.dicom_port, write_files(prior, tmp / "prior"), orthanc.aet)
        today = _study(grown(a1, GROWTH), "20261203", "PRIOR-E2E")
        node.start()
        try:
            # a node in service: its worker is up when a study comes (not importing torch)
            wait_until("the worker ready", lambda: "ready for jobs" in node.log(), 120, poll=0.1)
            paths = write_files(today, tmp / "today")
            storescu(node.port, paths, node.ae_title)
            last_sent = time.monotonic()
            found = wait_until("today's SEG, SR and overlay in Orthanc", lambda: (
                lambda f: f if f["seg"] and f["sr"] and f["overlay"] else None)(
                results_in_orthanc(orthanc, str(today[0].StudyInstanceUID))), RESULT_TIMEOUT)
            took = time.monotonic() - last_sent
            yield {"orthanc": orthanc, "node": node, "prior": prior, "today": today, "older": older,
                   "found": found, "took": took, "tmp": tmp}
        finally:
            node.stop()


def test_todays_sr_sets_the_result_against_the_retrieved_prior(setting) -> None:
    orthanc: OrthancServer = setting["orthanc"]
    prior = setting["prior"]
    [sr_id] = setting["found"]["sr"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(
        __import__("io").BytesIO(orthanc.instance_file(sr_id))))
    assert [str(i.StudyInstanceUID) for i in sr.PertinentOtherEvidenceSequence] == \
        [str(prior[0].StudyInstanceUID)]
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2  # the spleen today and at the prior, one Tracking UID
    assert groups[0].tracking_uid == groups[1].tracking_uid
    points = {}
    for g in groups:
        items = {str(i.ConceptNameCodeSequence[0].CodeValue): i for i in g[0].ContentSequence}
        points[str(items["C2348792"].TextValue)] = float(g.get_measurements()[0].value)
    assert set(points) == {"2025-12-03", "2026-12-03"}
    change = points["2026-12-03"] / points["2025-12-03"] - 1
    assert change == pytest.approx(GROWTH - 1, abs=0.15), points  # the model sees the growth
    print(f"measured change {change:+.1%} (truth {GROWTH - 1:+.0%}); today's result in Orthanc "
          f"{setting['took']:.1f} s after the last instance was sent")


def test_the_prior_is_in_the_twin_marked_retrieved_and_not_sent(setting) -> None:
    node: NodeProcess = setting["node"]
    orthanc: OrthancServer = setting["orthanc"]
    prior = setting["prior"]
    history = node_json(node, "twin", "history", "PRIOR-E2E", "--task", "spleen-ct")["points"]
    assert [(p["study_date"], p["retrieved"]) for p in history] == [
        ("2024-12-03", True), ("2025-12-03", True), ("2026-12-03", False)]
    assert history[1]["change_pct"] == pytest.approx(25, abs=15)  # 0.8 -> 1.0
    assert history[2]["change_pct"] == pytest.approx(50, abs=15)  # 1.0 -> 1.5
    assert history[2]["interval_days"] == 365
    # the prior series' own job (queued when it went quiet) finds its result recorded
    for study in (prior, setting["older"]):
        uid = str(study[0].SeriesInstanceUID)
        wait_until("the prior series' own job done", lambda: [
            j for j in jobs_now(node.data_dir) if j.series_uid == uid
            and j.state.value == "done"], 120)
        found = results_in_orthanc(orthanc, str(study[0].StudyInstanceUID))
        assert found["seg"] == found["sr"] == found["overlay"] == []  # send_prior_results false
    # the priors were looked for by one job, queued when today's first instance was filed
    # and begun before today's series went quiet (not after it, by today's own job); none
    # for the retrieved prior studies
    jobs = jobs_now(node.data_dir)
    today_uid = str(setting["today"][0].StudyInstanceUID)
    [asked] = [j for j in jobs if j.kind.value == "priors"]
    todays = [j for j in jobs if j.kind.value == "series" and j.study_uid == today_uid]
    assert len(todays) == 1, todays
    todays = todays[0]
    assert asked.study_uid == today_uid and asked.state.value == "done", asked
    assert asked.started_at < todays.enqueued_at, (asked, todays)
    assert "2 series retrieved from ORTHANC" in asked.error, asked.error
    assert f"priors of study {today_uid}" in node.cli("jobs").stdout
    # the priors' results were served to nobody: no drift figures (nor shadow run) of them
    from twin_archive.learning import FigureStore

    with FigureStore(node.data_dir) as figures:
        keys = [r[0] for r in figures.db.execute("SELECT job_key FROM series_figures")]
    assert [k.split("@")[0] for k in keys] == [str(setting["today"][0].SeriesInstanceUID)]
    lines = node.cli("audit", "--type", "priors-retrieved", "--json").stdout.splitlines()
    [event] = [json.loads(line) for line in lines if line.strip()]  # one JSON object a line
    assert event["detail"]["series"] == 2 and event["detail"]["error"] == ""
    assert len(event["detail"]["studies"]) == 2
    assert "PRIOR-E2E" not in json.dumps(event)  # the twin key, never the Patient ID


def test_the_overlay_series_gains_the_chart(setting) -> None:
    orthanc: OrthancServer = setting["orthanc"]
    study_uid = str(setting["today"][0].StudyInstanceUID)

    def charts() -> list[dict]:
        tags = [orthanc.instance_tags(i) for i in results_in_orthanc(orthanc, study_uid)["overlay"]]
        return [t for t in tags if "over time" in t.get("ImageComments", "")]

    [chart] = wait_until("the chart in the overlay series", charts, 120)
    tags = [orthanc.instance_tags(i) for i in results_in_orthanc(orthanc, study_uid)["overlay"]]
    assert len({t["SeriesInstanceUID"] for t in tags}) == 1
    charts = [chart]
    assert int(charts[0]["InstanceNumber"]) == len(tags)  # the last image of the series


def test_a_pacs_that_never_answers_does_not_hold_the_result_back(setting) -> None:
    import socket

    tmp: Path = setting["tmp"]
    orthanc: OrthancServer = setting["orthanc"]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel's backlog), never answers
    data = tmp / "data-silent"
    install_model(data)
    node = NodeProcess(data, config=_config(orthanc.dicom_port, silent.getsockname()[1],
                                            query_aet="SILENT"),
                       extra_args=["--stable-after", "1.5"]).start()
    try:
        a = ph.Anatomy.random(6)
        today = _study(a, "20261205", "SILENT-E2E")
        storescu(node.port, write_files(today, tmp / "silent-today"), node.ae_title)
        wait_until("the result in Orthanc without the comparison", lambda: (
            lambda f: f if f["seg"] and f["sr"] else None)(
            results_in_orthanc(orthanc, str(today[0].StudyInstanceUID))), RESULT_TIMEOUT)
        [sr_id] = results_in_orthanc(orthanc, str(today[0].StudyInstanceUID))["sr"]
        sr = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(sr_id)))
        assert "PertinentOtherEvidenceSequence" not in sr
        log = node.log_path.read_text()
        assert "without the comparison with a prior from the PACS" in log
        assert "did not answer" in log
        [job] = wait_until("the job done, its note saying why there is no comparison", lambda: [
            j for j in jobs_now(data) if j.state.value == "done" and j.kind.value == "series"],
            120)
        assert job.result_id and "no comparison: PACS SILENT did not answer" in job.error
        [asked] = [j for j in jobs_now(data) if j.kind.value == "priors"]
        assert asked.state.value == "done" and asked.result_id is None
        assert "no comparison: PACS SILENT did not answer" in asked.error
    finally:
        node.stop()
        silent.close()
