"""The one durable write helper (``dicom_node/foundation/durable.py``): nothing or the whole file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from pydicom.dataset import Dataset

from dicom_node.foundation import durable
from trainer.train import _save_atomic


@pytest.fixture
def synced_dirs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories fsynced during the test (the real fsync still runs).

    Spies on ``os.fsync`` itself, so it sees every caller however it imported the
    helper (a module that did ``from dicom_node.foundation.durable import fsync_dir`` before the
    test keeps the real function)."""
    seen: list[Path] = []
    real = os.fsync

    def spy(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if target.is_dir():
            seen.append(target)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_write_durably_defaults_to_a_hidden_part_file_beside_the_target(
        tmp_path: Path, synced_dirs: list[Path]) -> None:
    final = tmp_path / "a" / "b" / "x.bin"
    durable.write_durably(final, [b"ab", memoryview(b"cd")])
    assert final.read_bytes() == b"abcd"
    assert sorted(p.name for p in final.parent.iterdir()) == ["x.bin"]
    assert final.parent in synced_dirs  # the new name survives a power cut


def test_open_durably_replaces_only_on_success(tmp_path: Path, synced_dirs: list[Path]) -> None:
    final = tmp_path / "state.json"
    with durable.open_durably(final) as fh:
        fh.write(b"old")
    with pytest.raises(RuntimeError), durable.open_durably(final) as fh:
        fh.write(b"half")
        raise RuntimeError("writer failed")
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left
    assert synced_dirs == [tmp_path]  # once, for the one that was kept


def test_open_durably_part_files_are_what_clean_tmp_removes(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    fd, name = durable.mkstemp_part(tmp_path / "t")
    os.close(fd)
    (tmp_path / "t" / "old-style.part").write_bytes(b"")  # names from earlier versions
    assert Path(name).name.startswith(".") and durable.clean_tmp(tmp_path / "t") == 2


def test_replace_durably_moves_a_tree_and_syncs_both_directories(
        tmp_path: Path, synced_dirs: list[Path]) -> None:
    src = tmp_path / "work" / ".incoming"
    (src / "models").mkdir(parents=True)
    (src / "models" / "model.pt").write_bytes(b"weights")
    final = tmp_path / "models" / "task" / "task-v1"
    durable.replace_durably(src, final)
    assert (final / "models" / "model.pt").read_bytes() == b"weights" and not src.exists()
    assert src / "models" in synced_dirs and src in synced_dirs  # the tree, before the move
    assert final.parent in synced_dirs
    assert tmp_path / "work" in synced_dirs  # the old name's removal survives too


def test_checkpoints_are_saved_through_the_helper(tmp_path: Path,
                                                  synced_dirs: list[Path]) -> None:
    """The trainer's checkpoints used to skip the directory fsync (issue 18)."""
    path = tmp_path / "ckpt" / "model.pt"
    _save_atomic({"w": torch.ones(2)}, path)
    assert torch.equal(torch.load(path)["w"], torch.ones(2))
    assert path.parent in synced_dirs
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def _tiny(modality: str) -> Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4" if modality == "SEG" else \
        "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_pipeline_results_are_saved_through_the_helper(tmp_path: Path,
                                                       synced_dirs: list[Path]) -> None:
    """The pipeline writers used to skip the directory fsync (issue 18): now one fsync
    of the folder for all the files, after they are renamed into place."""
    from pipelines.types import ResultDatasets
    from pipelines.writers import save_results

    results = ResultDatasets(seg=_tiny("SEG"), sr=_tiny("SR"))
    paths = save_results(results, tmp_path / "out")
    assert [p.name.split("_")[0] for p in paths] == ["SEG", "SR"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    assert synced_dirs.count(tmp_path / "out") == 1
