"""Received data sets spooled to the archive's tmp folder; the C-STORE response by hand."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
from pynetdicom import StoragePresentationContexts
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_node.wire.fast_receive import speedups
from dicom_node.wire.fast_receive.store_response import encode_store_success
from twin_archive.spool import Spool, SpoolError


def test_spool_commits_meta_and_data_set_with_its_hash(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    spool = Spool(tmp)
    fragments = [os.urandom(131_066), os.urandom(70_000), b"\x00" * 11]
    spool.write_meta(b"M" * 200)
    for fragment in fragments:
        spool.write(fragment)
    assert spool.pending and spool.path.parent == tmp and spool.path.suffix == ".part"
    assert spool.tail(11) == b"\x00" * 11
    spool.claim()
    assert not spool.pending
    assert spool.discard() is False  # claimed: only the archive may drop it now
    final = tmp_path / "archive" / "a" / "b.dcm"
    spool.commit(final)
    data = b"".join(fragments)
    assert final.read_bytes() == b"M" * 200 + data
    assert spool.sha256 == hashlib.sha256(data).hexdigest()
    assert spool.total_size == 200 + len(data) and spool.meta_length == 200
    assert list(tmp.iterdir()) == []
    with pytest.raises(SpoolError):
        spool.claim()


def test_spool_discarded_before_claim_is_gone_and_cannot_be_claimed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_meta(b"M" * 132)
    spool.write(b"x" * 1000)
    assert spool.discard() is True
    assert list(tmp_path.iterdir()) == []
    assert spool.discard() is False
    with pytest.raises(SpoolError):
        spool.claim()


def test_spool_keeps_a_write_error_for_claim(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    os.close(spool._fd)  # noqa: SLF001 - a write that fails (EBADF), as ENOSPC would
    spool._fd = os.open(os.devnull, os.O_RDONLY)  # noqa: SLF001
    spool.write(b"x" * 10)  # does not raise: it runs in the network thread
    assert isinstance(spool.error, OSError)
    with pytest.raises(OSError):
        spool.claim()
    assert not spool.path.exists()


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.3.45", "1." + "2" * 62])
@pytest.mark.parametrize("message_id", [1, 7, 65535])
def test_store_success_by_hand_equals_pynetdicom(sop_instance_uid: str, message_id: int) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = sop_instance_uid
    rsp.Status = 0x0000
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    expected = encode(msg.command_set, True, True)
    assert encode_store_success("1.2.840.10008.5.1.4.1.1.2", sop_instance_uid, message_id) == expected


def test_presentation_contexts_copied_cheaply_and_independently() -> None:
    original = [copy.deepcopy(cx) for cx in StoragePresentationContexts[:20]]
    clones = speedups.copy_contexts(original)
    assert [c.abstract_syntax for c in clones] == [c.abstract_syntax for c in original]
    assert [c.transfer_syntax for c in clones] == [c.transfer_syntax for c in original]
    assert all(a is not b and a._transfer_syntax is not b._transfer_syntax  # noqa: SLF001
               for a, b in zip(clones, original))
    clones[0].context_id = 5
    clones[0].add_transfer_syntax("1.2.840.10008.1.2.4.50")
    assert original[0].context_id is None
    assert "1.2.840.10008.1.2.4.50" not in original[0].transfer_syntax
    assert speedups.copy_contexts({"a": [1]}) == {"a": [1]}  # anything else: copy.deepcopy


def test_spool_hashes_fragments_from_a_buffer_the_writer_reuses(tmp_path: Path) -> None:
    """The hash runs beside the network thread, which reads each fragment into one
    buffer: what was written must be what was hashed."""
    spool = Spool(tmp_path)
    spool.write_meta(b"M" * 132)
    buffer = bytearray(65536)
    view = memoryview(buffer)
    sent = []
    for k in range(8):
        buffer[:] = os.urandom(65536)
        sent.append(bytes(buffer))
        spool.write(view)  # overwritten at the next turn, maybe before it is hashed
    spool.claim()
    spool.commit(tmp_path / "final.dcm")
    assert spool.sha256 == hashlib.sha256(b"".join(sent)).hexdigest()
    assert (tmp_path / "final.dcm").read_bytes()[132:] == b"".join(sent)


def _archive_and_spooled(tmp_path: Path, **changes: object):
    """An archive, and a CT as the network layer hands it over: in a spool, in fragments."""
    from node_harness import incoming, small_ct
    from twin_archive import Archive, IncomingInstance

    archive = Archive(tmp_path / "data")
    ds = small_ct()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    inc = incoming(ds)
    spool = Spool(archive.ingest.tmp_dir)
    spool.write_meta(inc.file_meta)
    for at in range(0, len(inc.dataset), 4096):
        spool.write(inc.dataset[at:at + 4096])
    return archive, inc, IncomingInstance(
        file_meta=b"", dataset=b"", transfer_syntax_uid=inc.transfer_syntax_uid,
        sop_class_uid=inc.sop_class_uid, sop_instance_uid=inc.sop_instance_uid,
        calling_ae="T", spool=spool)


def test_a_spool_that_cannot_be_flushed_is_refused_as_out_of_resources_and_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush runs while a helper thread reads the header; its failure (a full disk)
    is answered as before: out of resources, nothing indexed, no file left."""
    import errno

    from twin_archive import OutOfResourcesError

    archive, inc, spooled = _archive_and_spooled(tmp_path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    with pytest.raises(OutOfResourcesError, match="disk full"):
        archive.ingest.store(spooled)
    monkeypatch.undo()
    assert list(archive.ingest.tmp_dir.iterdir()) == []
    assert archive.ingest.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    archive.ingest.store(inc)  # sent again, with room: stored
    assert archive.ingest.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
    archive.close()


def test_a_spooled_instance_that_cannot_be_grouped_is_refused_after_its_flush(
        tmp_path: Path) -> None:
    from twin_archive import InvalidInstanceError

    archive, _, spooled = _archive_and_spooled(tmp_path, StudyInstanceUID="")
    with pytest.raises(InvalidInstanceError, match="StudyInstanceUID"):
        archive.ingest.store(spooled)
    assert list(archive.ingest.tmp_dir.iterdir()) == []
    assert archive.ingest.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    archive.close()


def test_spools_hash_in_line_while_another_is_live(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With two spools receiving at once (two associations) the fragments are hashed in
    the receiving thread, with one alone in the hashing thread; the hash is the same."""
    from twin_archive import spool as spool_module

    monkeypatch.setattr(spool_module, "_live", 0)  # other tests' spools left unconsumed
    data = os.urandom(3 * 65536)
    first = Spool(tmp_path)
    assert spool_module.alone()
    second = Spool(tmp_path)
    assert not spool_module.alone()
    for s in (first, second):
        s.write_meta(b"M" * 132)
        for at in range(0, len(data), 65536):
            s.write(data[at:at + 65536])
    assert first._hashed is None and second._hashed is None  # noqa: SLF001 - in line
    second.discard()
    assert spool_module.alone()
    first.write(data)  # alone again: to the hashing thread, after what was hashed in line
    assert first._hashed is not None  # noqa: SLF001
    assert first.sha256 == hashlib.sha256(data + data).hexdigest()
    first.discard()


def test_a_resent_spooled_instance_is_not_flushed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance sent again (same SOP Instance UID, same content) is a duplicate: the
    archive answers it without writing, and its spool is not flushed to the disk first."""
    from twin_archive import IncomingInstance, StoreOutcome

    archive, inc, spooled = _archive_and_spooled(tmp_path)
    assert archive.ingest.store(spooled).outcome is StoreOutcome.STORED
    again = Spool(archive.ingest.tmp_dir)
    again.write_meta(inc.file_meta)
    again.write(inc.dataset)
    flushed = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushed.append(fd), real(fd))[1])
    result = archive.ingest.store(IncomingInstance(
        file_meta=b"", dataset=b"", transfer_syntax_uid=inc.transfer_syntax_uid,
        sop_class_uid=inc.sop_class_uid, sop_instance_uid=inc.sop_instance_uid,
        calling_ae="T", spool=again))
    assert result.outcome is StoreOutcome.DUPLICATE
    assert flushed == []
    assert list(archive.ingest.tmp_dir.iterdir()) == []
    archive.close()
