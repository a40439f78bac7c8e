"""RTSTRUCT as an output kind: ``send = [..., "rtstruct"]`` on a destination.

A real result store, a real sender and a real pynetdicom Storage SCP on loopback: the
RTSTRUCT is built from a phantom result, checked, stored with the result and sent only
to the destination that lists it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.foundation.errors import ConfigError
from dicom_node.runtime.rtstruct_output import add_rtstruct
from dicom_node.queue.sender import Sender
from dicom_node.settings import DEFAULT_SEND, Destination, load_settings
from pipelines.types import ModelInfo
from pipelines.validation import validate_dataset
from pipelines.writers.rtstruct import RTSTRUCT_SOP_CLASS
from tests.loop_helpers import phantom_result
from tests.test_destination_profiles import SC, SEG, SR, Scp
from twin_archive.results import ResultStore

MODEL = ModelInfo(name="spleen_ct_segmentation", version="2", task="spleen-ct")
ACCEPTS = {sop: [ExplicitVRLittleEndian]
           for sop in (SEG, SR, SC, RTSTRUCT_SOP_CLASS, "1.2.840.10008.1.1")}


def test_send_lists_rtstruct_only_when_asked(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n'
                      '[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "h"\nport = 104\n'
                      'send = ["rtstruct"]\n'
                      '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n')
    tps, pacs = load_settings(config, env={}).destinations
    assert tps.send == ("rtstruct",)
    assert pacs.send == DEFAULT_SEND and "rtstruct" not in DEFAULT_SEND
    config.write_text(f'data_dir = "{tmp_path}"\n[[destinations]]\nae_title = "TPS"\n'
                      'host = "h"\nport = 104\nsend = ["rtss"]\n')
    with pytest.raises(ConfigError, match="rtstruct"):
        load_settings(config, env={})


def test_the_rtstruct_is_checked_stored_and_sent_to_the_destination_that_takes_it(
        tmp_path: Path) -> None:
    made = phantom_result(tmp_path, seed=3, kinds=("seg", "sr"), model=MODEL)
    vol, segments, result = made.vol, made.segments, made.result
    store = ResultStore(tmp_path)
    with Scp(ACCEPTS) as tps, Scp(ACCEPTS) as pacs:
        dests = [Destination(name="tps", ae_title="PACS", host="127.0.0.1", port=tps.port,
                             send=("rtstruct",)),
                 Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port)]
        sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=10)
        sender.enqueue(result, dests)
        outcome = SimpleNamespace(volume=vol, segments=segments, model=MODEL)
        after = add_rtstruct(store, sender, 1, result, outcome, dests)
        assert sender.send_due() == 3  # SEG and SR to the PACS, the RTSTRUCT to the TPS
        sender.close()
    assert [o.kind for o in after.objects].count("rtstruct") == 1
    assert [c for c, _, _ in tps.stored] == [RTSTRUCT_SOP_CLASS]
    assert sorted(c for c, _, _ in pacs.stored) == sorted([SEG, SR])
    assert validate_dataset(tps.stored[0][2], "rtstruct").ok
    store.close()


def test_seg_type_per_destination_decides_the_jobs_segs(tmp_path: Path) -> None:
    from dicom_node.settings import job_seg_types

    config = tmp_path / "node.toml"

    def dests(*tables: str):  # noqa: ANN202
        config.write_text(f'data_dir = "{tmp_path}"\n' + "".join(
            f'[[destinations]]\nname = "d{i}"\nae_title = "D{i}"\nhost = "h"\nport = 104\n{t}\n'
            for i, t in enumerate(tables)))
        return load_settings(config, env={}).destinations

    binary = dests("", 'seg_type = "binary"')
    assert [d.seg_type for d in binary] == ["binary", "binary"] and job_seg_types(binary) == ("binary",)
    labelmap = dests('seg_type = "labelmap"', 'seg_type = "labelmap"\nsend = ["seg", "sr"]',
                     'send = ["overlay"]')  # takes no SEG: has no say
    assert job_seg_types(labelmap) == ("labelmap",)
    mixed = dests('seg_type = "labelmap"', "")
    assert job_seg_types(mixed) == ("binary", "labelmap")  # a SEG (and SR) of each
    with pytest.raises(ConfigError, match="seg_type"):
        dests('seg_type = "fractional"')


def test_destinations_test_suggests_the_rtstruct_only_to_a_peer_without_seg() -> None:
    from dicom_node.profiles import suggest

    explicit = {ExplicitVRLittleEndian}
    everything = {sop: explicit for sop in (SEG, SR, SC, RTSTRUCT_SOP_CLASS)}
    assert suggest(everything).send == ("seg", "sr", "overlay")
    no_seg = {sop: explicit for sop in (SR, SC, RTSTRUCT_SOP_CLASS)}
    assert suggest(no_seg).send == ("sr", "overlay", "rtstruct")


def test_a_task_that_outputs_the_seg_gives_the_rtstruct_to_the_destinations_that_take_it() -> None:
    """The worker narrows each destination to what the task outputs; the RTSTRUCT comes
    with the SEG (it was dropped there, so no node ever sent it: found by the viewer test)."""
    from dicom_node.runtime.worker import task_destinations
    from dicom_node.tasks import Task

    tps = Destination(name="tps", ae_title="TPS", host="h", port=104, send=("rtstruct",))
    pacs = Destination(name="pacs", ae_title="PACS", host="h", port=104,
                       send=("seg", "sr", "overlay", "rtstruct"))
    plain = Destination(name="plain", ae_title="PLAIN", host="h", port=104)
    every = Task(name="spleen-ct", modality="CT")
    assert [d.send for d in task_destinations([tps, pacs, plain], every)] == [
        ("rtstruct",), ("seg", "sr", "overlay", "rtstruct"), DEFAULT_SEND]
    seg_sr = Task(name="liver-ct", modality="CT", outputs=("seg", "sr"))
    assert [d.send for d in task_destinations([tps, pacs, plain], seg_sr)] == [
        ("rtstruct",), ("seg", "sr", "rtstruct"), ("seg", "sr")]
    sr_only = Task(name="volumes-ct", modality="CT", outputs=("sr",))
    assert [(d.name, d.send) for d in task_destinations([tps, pacs, plain], sr_only)] == [
        ("pacs", ("sr",)), ("plain", ("sr",))]
