"""Several tasks served at once by the real node, results in a real Orthanc (issue 14).

One node (subprocess) and one Orthanc serve the whole module, in order:

1. two tasks: the demo ``spleen-ct`` and ``liver-ct`` (the Model Zoo spleen bundle's
   configs, tiny, random weights, its channel named "liver"): one CT gets both SEGs (two
   result series, each its task's) in Orthanc; an MR gets none;
2. a radiologist SEG of spleen and liver sent over C-STORE becomes a label of both tasks;
3. SIGHUP adds ``kidney-ct``, which has no active model (only a candidate) and disables
   ``liver-ct``: a CT's kidney job waits (``jobs``, ``status``, ``twin show``; logged once,
   no traceback) and runs after ``models promote``;
4. SIGHUP removes tasks while the node serves; a file with a task mistake is refused
   with its one line and the running tasks are kept.

Series are small (128 x 128 x 40 for the demo model) and the quiet period is 1.5 s.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_client import send
from learning_helpers import organ_seg
from loop_helpers import (
    install_model,
    jobs_now,
    labels_now,
    node_json,
    pacs,
    results_in_orthanc,
    small_study,
    storescu,
    write_files,
)
from node_harness import NodeProcess
from orthanc.server import OrthancServer
from pipelines import phantom as ph
from registry.store import Registry
from registry_bundles import organ_bundle
from waiting import wait_until

pytestmark = pytest.mark.orthanc

RESULT_TIMEOUT = 180.0
SPLEEN = ('[[tasks]]\nname = "spleen-ct"\nmodality = "CT"\nbody_parts = ["ABDOMEN*", "CHEST*", '
          '"*ABD*"]\naccept_missing_body_part = true\nmin_slices = 16\n')
LIVER = ('[[tasks]]\nname = "liver-ct"\nmodality = "CT"\nbody_parts = ["*"]\n'
         'accept_missing_body_part = true\nmin_slices = 16\noutputs = ["seg", "sr"]\n')
KIDNEY = '[[tasks]]\nname = "kidney-ct"\nmodality = "CT"\nmin_slices = 16\n'


def _config(orthanc: OrthancServer, tasks: str) -> str:
    return ("send_backoff_initial_s = 0.5\ntrain_enabled = false\n"
            "[[destinations]]\n"
            f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
            'send = ["seg", "sr", "overlay"]\n' + tasks)


class Served:
    """The module's Orthanc, node and scratch folder."""

    def __init__(self, orthanc: OrthancServer, node: NodeProcess, tmp: Path) -> None:
        self.orthanc, self.node, self.tmp = orthanc, node, tmp
        self.studies: dict[str, tuple[str, list[pydicom.Dataset]]] = {}

    def reload(self, tasks: str, expect: str) -> None:
        """Rewrite the configuration file and SIGHUP the node; wait for ``expect`` in its log."""
        assert self.node.proc is not None
        cfg = self.node.data_dir.parent / f"{self.node.data_dir.name}-config.toml"
        before = self.node.log().count(expect)
        cfg.write_text(_config(self.orthanc, tasks))
        self.node.proc.send_signal(signal.SIGHUP)
        wait_until(f"{expect!r} in the node's log", lambda: self.node.log().count(expect) > before,
                   30)

    def send_ct(self, patient_id: str, **kw: object) -> str:
        datasets = small_study(patient_id, **kw)  # type: ignore[arg-type]
        paths = write_files(datasets, self.tmp / patient_id)
        storescu(self.node.port, paths, self.node.ae_title)
        study_uid = str(datasets[0].StudyInstanceUID)
        self.studies[patient_id] = (study_uid, datasets)
        return study_uid

    def jobs_of(self, study_uid: str) -> list[dict]:
        return [j for j in node_json(self.node, "jobs", "--limit", "500")
                if j["study_uid"] == study_uid]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("tasks")
    data = tmp / "data"
    data.mkdir()
    install_model(data)  # the demo model, active for spleen-ct
    with Registry(data) as reg:
        reg.import_bundle(organ_bundle(tmp / "liver-bundle", "liver"), task="liver-ct",
                          activate=True, by="test")
    with pacs(tmp / "orthanc") as orthanc:
        node = NodeProcess(data, config=_config(orthanc, SPLEEN + LIVER),
                           extra_args=["--stable-after", "1.5"]).start()
        try:
            yield Served(orthanc, node, tmp)
        finally:
            node.stop()


def _segs(orthanc: OrthancServer, study_uid: str) -> dict[str, str]:
    """Segment label -> SEG series UID of the SEGs Orthanc holds for a study."""
    out = {}
    for inst in results_in_orthanc(orthanc, study_uid)["seg"]:
        tags = orthanc.instance_tags(inst)
        seg = pydicom.dcmread(BytesIO(orthanc.instance_file(inst)), stop_before_pixels=True)
        for item in seg.SegmentSequence:
            out[str(item.SegmentLabel)] = tags["SeriesInstanceUID"]
    return out


def test_one_ct_gets_a_seg_of_each_task_and_an_mr_none(served: Served) -> None:
    orthanc, node = served.orthanc, served.node
    study_uid = served.send_ct("TASKS-1")
    mr_uid = served.send_ct("TASKS-MR", modality="MR", slices=20)
    segs = wait_until("a spleen SEG and a liver SEG in Orthanc",
                      lambda: (lambda s: s if {"spleen", "liver"} <= set(s) else None)(
                          _segs(orthanc, study_uid)), RESULT_TIMEOUT)
    assert set(segs) == {"spleen", "liver"} and segs["spleen"] != segs["liver"]
    wait_until("both SRs in Orthanc", lambda: len(results_in_orthanc(orthanc, study_uid)["sr"]) == 2,
               60)
    jobs = served.jobs_of(study_uid)
    assert sorted((j["task"], j["state"]) for j in jobs) == [("liver-ct", "done"),
                                                              ("spleen-ct", "done")]
    results = node_json(node, "twin", "show", "TASKS-1")["results"]
    assert sorted(r["task"] for r in results) == ["liver-ct", "spleen-ct"]
    assert all(r["superseded_by"] is None for r in results)  # neither supersedes the other
    # liver-ct's outputs are SEG and SR: only spleen-ct's overlay reaches Orthanc
    by_task = {r["task"]: r for r in results}
    assert by_task["liver-ct"]["overlay_series_uid"] == ""
    wait_until("spleen-ct's overlay in Orthanc", lambda: {orthanc.instance_tags(i)[
        "SeriesInstanceUID"] for i in results_in_orthanc(orthanc, study_uid)["overlay"]} == {
        by_task["spleen-ct"]["overlay_series_uid"]}, 60)
    wait_until("the MR left alone", lambda: "left alone: rules 'spleen-ct': modality ['MR']"
               in node.log(), 30)
    assert "rules 'liver-ct': modality ['MR'] is not CT" in node.log()
    assert served.jobs_of(mr_uid) == [] and not any(results_in_orthanc(orthanc, mr_uid).values())


def test_a_radiologist_seg_of_two_organs_becomes_a_label_of_both_tasks(served: Served) -> None:
    node = served.node
    _study, datasets = served.studies["TASKS-1"]
    size = int(datasets[0].Rows)
    g = ph.SliceGeometry(rows=size, columns=size, slices=len(datasets),
                         pixel_spacing=(0.78 * 512 / size, 0.78 * 512 / size), slice_spacing=5.0)
    seg = organ_seg(datasets, ph.Anatomy.random(5), g,
                    (("spleen", codes.SCT.Spleen), ("liver", codes.SCT.Liver)))
    assert send(node.port, [seg], calling_ae="VIEWER") == [0]
    wait_until("the SEG taken as a label", lambda: any(
        lab.seg_sop_instance_uid == str(seg.SOPInstanceUID) for lab in labels_now(node.data_dir)), 60)
    [label] = [lab for lab in node_json(node, "labels", "list", "--all")
               if lab["seg_sop_instance_uid"] == str(seg.SOPInstanceUID)]
    assert label["tasks"] == ["liver-ct", "spleen-ct"] and label["segments"] == ["Spleen", "Hepar"]
    assert "for liver-ct, spleen-ct" in node.log()


def test_a_task_added_by_sighup_without_a_model_waits_and_runs_after_promote(
        served: Served) -> None:
    orthanc, node = served.orthanc, served.node
    node.cli("models", "import", str(organ_bundle(served.tmp / "kidney-bundle", "kidney")),
             "--task", "kidney-ct")  # a candidate: nothing active for kidney-ct
    served.reload(SPLEEN + LIVER.replace("outputs", "enabled = false\noutputs") + KIDNEY,
                  "tasks reloaded: now spleen-ct, liver-ct (disabled), kidney-ct (added: "
                  "kidney-ct; removed: none)")
    cfg = str(node.data_dir.parent / f"{node.data_dir.name}-config.toml")
    listed = {t["name"]: t for t in node_json(node, "--config", cfg, "tasks", "list")}
    assert listed["kidney-ct"]["models"] == [] and listed["liver-ct"]["enabled"] is False
    waiting = []
    for pid in ("TASKS-2", "TASKS-3"):
        study_uid = served.send_ct(pid)
        wait_until(f"{pid}: spleen done, kidney waiting", lambda: sorted(
            (j.task, j.state.value) for j in jobs_now(node.data_dir) if j.study_uid == study_uid)
            == [("kidney-ct", "waiting"), ("spleen-ct", "done")], RESULT_TIMEOUT)
        jobs = served.jobs_of(study_uid)
        assert sorted((j["task"], j["state"]) for j in jobs) == [("kidney-ct", "waiting"),
                                                                  ("spleen-ct", "done")]
        waiting += [j for j in jobs if j["task"] == "kidney-ct"]
    assert all(j["attempts"] == 0 and "waiting for a model: task 'kidney-ct'" in j["error"]
               for j in waiting)
    log = node.log()
    assert log.count("waiting for a model: task 'kidney-ct'") == 1  # logged once
    assert "Traceback" not in log and "NoActiveModelError" not in log
    assert "waiting: waiting for a model: task 'kidney-ct'" in node.cli("jobs").stdout
    status = node.cli("status").stdout
    assert "2 waiting" in status and "waiting:   task kidney-ct has no active model" in status
    show = node.cli("twin", "show", "TASKS-2").stdout
    assert f"job {waiting[0]['id']} (kidney-ct)" in show and ": waiting: waiting for a model" in show
    assert [j["state"] for j in node_json(node, "twin", "show", "TASKS-2")["jobs"]
            if j["task"] == "kidney-ct"] == ["waiting"]

    node.cli("models", "promote", "kidney-ct-v1", "--reason", "test")
    for pid in ("TASKS-2", "TASKS-3"):
        study_uid = served.studies[pid][0]
        wait_until(f"{pid}: the kidney SEG in Orthanc", lambda: "kidney" in _segs(orthanc, study_uid),
                   RESULT_TIMEOUT)
    assert {j["state"] for j in node_json(node, "jobs") if j["task"] == "kidney-ct"} == {"done"}
    assert "model kidney-ct-v1 now serves task kidney-ct" in node.log()
    assert "Traceback" not in node.log()


def test_sighup_removes_tasks_and_a_broken_file_keeps_the_running_ones(served: Served) -> None:
    node = served.node
    served.reload(SPLEEN, "tasks reloaded: now spleen-ct (added: none; removed: kidney-ct, "
                          "liver-ct)")
    served.reload(SPLEEN + KIDNEY.replace("min_slices = 16", "min_slices = 0"),
                  "configuration NOT reloaded, the running one is kept: configuration in ")
    assert "tasks.kidney-ct.min_slices: expected an integer >= 1, got 0" in node.log()
    study_uid = served.send_ct("TASKS-4")
    wait_until("TASKS-4's jobs", lambda: [j for j in jobs_now(node.data_dir)
                                          if j.study_uid == study_uid], 60)
    jobs = served.jobs_of(study_uid)
    assert [j["task"] for j in jobs] == ["spleen-ct"]
    assert node.proc is not None and node.proc.poll() is None
