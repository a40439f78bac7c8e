"""DICOM writers of a result: SEG, TID 1500 SR and the overlay series, all via highdicom.

Every object written here carries :data:`pipelines.types.NODE_MANUFACTURER` as
Manufacturer and in its Contributing Equipment Sequence, so that
:func:`pipelines.selection.is_node_output` recognises it and the node never infers on
its own output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.foundation.durable import fsync_dir, open_durably
from pipelines.comparison import Comparison, banner_line
from pipelines.types import ModelInfo, ResultDatasets, SegmentResult, Volume, WriterOptions
from pipelines.uids import is_valid_uid
from pipelines.writers.overlay import build_overlay
from pipelines.writers.seg import build_seg
from pipelines.writers.sr import build_sr

LOG = logging.getLogger(__name__)

__all__ = ["build_overlay", "build_seg", "build_sr", "save_results", "write_results"]


def write_results(volume: Volume, segments: Sequence[SegmentResult], model: ModelInfo, *,
                  options: WriterOptions | None = None,
                  predecessors: Sequence[Dataset] = (),
                  comparison: Comparison | None = None) -> ResultDatasets:
    """Build the SEG, the SR that measures it, and (optionally) the overlay series.

    Parameters
    ----------
    volume : Volume
        The source volume the segments were computed on.
    segments : sequence of SegmentResult
        One per label; empty ones are left out of every object.
    model : ModelInfo
        The model that produced the segments.
    options : WriterOptions, optional
        Series numbers, descriptions, window, whether to write the overlay.
    predecessors : sequence of pydicom.dataset.Dataset, optional
        The SR(s) of the result this one supersedes; referenced from the new SR's
        Predecessor Documents Sequence.
    comparison : Comparison, optional
        Today's volumes against the patient's prior result: in the SR (time points,
        the prior's groups) and as the overlay banner's comparison line.

    Returns
    -------
    ResultDatasets
        In memory; nothing is written to disk (see :func:`save_results`).

    Raises
    ------
    EmptyResultError
        If every segment is empty.
    ValueError
        If a mask does not fit the volume or labels repeat.
    """
    opts = options or WriterOptions()
    seg = build_seg(volume, segments, model, options=opts)
    sr = build_sr(volume, seg, segments, model, options=opts, predecessors=predecessors,
                  comparison=comparison)
    overlay = build_overlay(volume, segments, model, options=opts,
                            note=banner_line(comparison)) if opts.write_overlay else ()
    return ResultDatasets(seg=seg, sr=sr, overlay=overlay)


def save_results(results: ResultDatasets, out_dir: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Write each data set as a DICOM file ``<Modality>_<SOPInstanceUID>.dcm`` in ``out_dir``.

    Each file is written to a temporary name, flushed to disk and renamed into place,
    so a crash leaves no half file under the final name.

    Returns
    -------
    tuple of pathlib.Path
        The files, in the order of :meth:`ResultDatasets.all`.

    Raises
    ------
    ValueError
        If a data set's SOP Instance UID is not a valid UID (it becomes a file name).
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in results.all():
        uid = str(ds.SOPInstanceUID)
        if not is_valid_uid(uid):
            raise ValueError(f"SOP Instance UID {uid!r} is not a valid UID")
        final = folder / f"{ds.Modality}_{uid}.dcm"
        with open_durably(final, sync_dir=False) as fh:
            ds.save_as(fh, enforce_file_format=True)
        paths.append(final)
    fsync_dir(folder)  # once for all the new names
    LOG.info("wrote %d result file(s) to %s", len(paths), folder)
    return tuple(paths)
