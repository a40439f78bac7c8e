"""Per-destination output profiles: which objects, which transfer syntaxes, held objects.

Results are real SEG/SR/overlay objects written from a phantom CT; destinations are a
real pynetdicom Storage SCP on a free loopback port and a real Orthanc.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, evt

from dicom_node.queue.commitment import STORAGE_COMMITMENT
from dicom_node.foundation.errors import ConfigError
from dicom_node.profiles import KIND_SOP_CLASSES
from dicom_node.queue.sender import Sender, SendState
from dicom_node.settings import Destination, load_settings
from loop_helpers import pacs
from orthanc.server import free_ports
from pipelines.validation import invalid, validate_results
from tests.loop_helpers import phantom_result, results_in_orthanc
from tests.node_harness import DICOM_NODE

SEG, SR, SC = (KIND_SOP_CLASSES[k][0] for k in ("seg", "sr", "overlay"))


def _record(data_dir: Path, job_key: str = "job-1"):
    """A stored result (SEG, SR, overlay images) of a phantom series."""
    made = phantom_result(data_dir, job_key)
    return made.results, made.result


class Scp:
    """A real Storage SCP: records proposed contexts and what was stored, in which syntax."""

    def __init__(self, contexts: dict[str, list[str]]) -> None:
        self.port = free_ports(1)[0]
        self.contexts = contexts
        self.proposed: list[tuple[str, str]] = []
        self.stored: list[tuple[str, str, pydicom.Dataset]] = []
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.stored.append((str(ds.SOPClassUID), str(event.context.transfer_syntax), ds))
        return 0

    def _on_request(self, event: evt.Event) -> None:
        contexts = getattr(event.primitive, "presentation_context_definition_list", None)
        if contexts:  # the A-ASSOCIATE request (ACSE also carries the release)
            self.proposed += [(str(cx.abstract_syntax), str(ts)) for cx in contexts
                              for ts in cx.transfer_syntax]

    def __enter__(self) -> Scp:
        ae = AE(ae_title="PACS")
        for sop, syntaxes in self.contexts.items():
            ae.add_supported_context(sop, syntaxes)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_ACSE_RECV, self._on_request)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


UNCOMPRESSED_ONLY = {sop: [ExplicitVRLittleEndian] for sop in (SEG, SR, SC, "1.2.840.10008.1.1")}


def test_an_overlay_only_destination_gets_no_seg_and_is_offered_only_its_sop_class(
        tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    with Scp(UNCOMPRESSED_ONLY) as overlay_pacs, Scp(UNCOMPRESSED_ONLY) as full_pacs:
        dests = [Destination(name="viewer", ae_title="PACS", host="127.0.0.1",
                             port=overlay_pacs.port, send=("overlay",)),
                 Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=full_pacs.port)]
        sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=10)
        assert sender.enqueue(result, dests) == len(results.overlay) + len(results.all())
        assert sender.send_due() == len(results.overlay) + len(results.all())
        sender.close()
    assert {c for c, _, _ in overlay_pacs.stored} == {SC}
    assert len(overlay_pacs.stored) == len(results.overlay)
    # nothing it does not need (Storage Commitment: confirm = "commitment" by default)
    assert {sop for sop, _ in overlay_pacs.proposed} == {SC, STORAGE_COMMITMENT}
    assert sorted(c for c, _, _ in full_pacs.stored) == sorted(str(d.SOPClassUID) for d in results.all())


def test_compressed_syntax_when_accepted_uncompressed_fallback_when_refused(tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    with_rle = dict(UNCOMPRESSED_ONLY, **{SC: [RLELossless, ExplicitVRLittleEndian]})
    with Scp(UNCOMPRESSED_ONLY) as plain, Scp(with_rle) as rle:
        dests = [Destination(name=n, ae_title="PACS", host="127.0.0.1", port=scp.port,
                             transfer_syntaxes=("rle", "deflated", "explicit"))
                 for n, scp in (("plain", plain), ("rle", rle))]
        sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=10)
        sender.enqueue(result, dests)
        assert sender.send_due() == 2 * len(results.all())
        assert all(s.state is SendState.SENT for s in sender.list())
        sender.close()
    # only fitting syntaxes are proposed: no RLE for the 1-bit SEG or the SR
    assert (SC, str(RLELossless)) in plain.proposed
    assert (SEG, str(RLELossless)) not in plain.proposed and (SR, str(RLELossless)) not in plain.proposed
    assert {ts for _, ts, _ in plain.stored} == {str(ExplicitVRLittleEndian)}  # fell back
    by_uid = {str(d.SOPInstanceUID): d for d in results.overlay}
    got = [(ts, ds) for sop, ts, ds in rle.stored if sop == SC]
    assert {ts for ts, _ in got} == {str(RLELossless)} and len(got) == len(results.overlay)
    for _, ds in got:  # lossless: the same pixels arrive
        np.testing.assert_array_equal(ds.pixel_array, by_uid[str(ds.SOPInstanceUID)].pixel_array)
    assert {ts for sop, ts, _ in rle.stored if sop != SC} == {str(ExplicitVRLittleEndian)}


def test_an_invalid_object_is_held_with_its_reason_and_never_sent(tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    reports = validate_results(results)
    assert invalid(reports) == {}
    bad = results.seg.copy()
    del bad.StudyDate  # as a broken writer would leave it
    held = invalid([*reports[1:], *validate_results(type(results)(seg=bad, sr=results.sr))[:1]])
    assert list(held) == [str(results.seg.SOPInstanceUID)]
    with Scp(UNCOMPRESSED_ONLY) as pacs:
        dest = Destination(ae_title="PACS", host="127.0.0.1", port=pacs.port)
        sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=10)
        sender.enqueue(result, [dest], held=held)
        assert sender.send_due() == len(results.all()) - 1
        sender.close()
    assert SEG not in {c for c, _, _ in pacs.stored}
    run = subprocess.run([*DICOM_NODE, "--data-dir", str(tmp_path),
                          "sends", "--state", "held", "--json"], capture_output=True, text=True,
                         timeout=120)
    (row,) = json.loads(run.stdout)
    assert row["kind"] == "seg" and row["state"] == "held"
    assert "invalid" in row["last_error"] and "StudyDate" in row["last_error"]


@pytest.mark.orthanc
def test_orthanc_refusing_seg_still_receives_the_sr_and_the_overlay(tmp_path: Path) -> None:
    results, result = _record(tmp_path / "node")
    with pacs(tmp_path / "orthanc", refuse_sop_classes=[SEG]) as orthanc:
        dest = Destination(name="orthanc", ae_title=orthanc.aet, host="127.0.0.1",
                           port=orthanc.dicom_port)
        sender = Sender(tmp_path / "node", ae_title="NODE", network_timeout_s=20)
        sender.enqueue(result, [dest])
        assert sender.send_due() == len(results.all()) - 1
        rows = {s.kind: s for s in sender.list()}
        sender.close()
        found = results_in_orthanc(orthanc, str(results.sr.StudyInstanceUID))
    assert found["seg"] == [] and len(found["sr"]) == 1
    assert len(found["overlay"]) == len(results.overlay)
    assert rows["seg"].state is SendState.QUEUED and "0xA700" in rows["seg"].last_error


def test_destinations_test_reports_what_the_peer_accepts_and_suggests_a_profile(
        tmp_path: Path) -> None:
    accepts = {"1.2.840.10008.1.1": [ExplicitVRLittleEndian], SR: [ExplicitVRLittleEndian],
               SC: [RLELossless, ExplicitVRLittleEndian]}  # no SEG
    with Scp(accepts) as pacs:
        config = tmp_path / "node.toml"
        config.write_text(f'data_dir = "{tmp_path}"\n[[destinations]]\nname = "viewer"\n'
                          f'ae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n')
        run = subprocess.run([*DICOM_NODE, "--config", str(config),
                              "destinations", "test", "viewer", "--json"],
                             capture_output=True, text=True, timeout=120)
        text = subprocess.run([*DICOM_NODE, "--config", str(config),
                               "destinations", "test", "viewer"],
                              capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["established"] and report["echo"] == 0
    assert report["accepted"]["seg"] == {SEG: []}
    assert report["accepted"]["overlay"] == {SC: ["rle", "explicit"]}
    assert report["suggestion"]["send"] == ["sr", "overlay"]
    assert report["suggestion"]["transfer_syntaxes"] == ["rle", "explicit"]
    assert "REFUSED" in text.stdout and 'send = ["sr", "overlay"]' in text.stdout
    # the suggested table is a valid configuration
    config.write_text(f'data_dir = "{tmp_path}"\n' + report["suggestion"]["toml"])
    (dest,) = load_settings(config, env={}).destinations
    assert dest.send == ("sr", "overlay") and dest.transfer_syntaxes == (str(RLELossless),
                                                                         str(ExplicitVRLittleEndian))
    missing = subprocess.run([*DICOM_NODE, "--config", str(config),
                              "destinations", "test", "nosuch"], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "viewer" in missing.stderr


@pytest.mark.parametrize(("table", "key"), [
    ('transfer_syntaxes = ["jpeg-lossy"]', "destinations[0].transfer_syntaxes"),
    ('transfer_syntaxes = ["rle"]', "destinations[0].transfer_syntaxes"),
    ('transfer_syntaxes = "explicit"', "destinations[0].transfer_syntaxes"),
    ('name = "a b"', "destinations[0].name"),
])
def test_profile_keys_are_validated_and_errors_name_the_key(tmp_path: Path, table: str,
                                                            key: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\n{table}\n')
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_settings(config, env={})


def test_destination_names_default_to_the_ae_title_and_must_be_unique(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    two = '[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\n'
    config.write_text(two)
    (dest,) = load_settings(config, env={}).destinations
    assert dest.name == "PACS" and dest.transfer_syntaxes == (str(ExplicitVRLittleEndian),
                                                              "1.2.840.10008.1.2")
    config.write_text(two + two)
    with pytest.raises(ConfigError, match=r"destinations\[1\]\.name"):
        load_settings(config, env={})
