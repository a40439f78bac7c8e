"""The RTSTRUCT of a result, for destinations whose ``send`` lists ``"rtstruct"``.

Built after the SEG and SR (and the overlay) are queued, so that they never wait for
it; checked like every result object (an invalid one is stored but held back, with
the reason); stored in the twin as kind ``rtstruct`` and queued to the destinations
that take it. A job re-run after a crash between recording its SEG/SR and its
RTSTRUCT does not make the RTSTRUCT again (the overlay has a recovery path; this one
does not yet).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from dicom_node.queue.sender import Sender
from dicom_node.settings import Destination
from pipelines.errors import EmptyResultError
from pipelines.validation import invalid, validate_series
from pipelines.writers.rtstruct import build_rtstruct
from twin_archive.results import AIResult, ResultStore

LOG = logging.getLogger(__name__)


def add_rtstruct(results: ResultStore, sender: Sender, job_id: int, result: AIResult, outcome: Any,
                 destinations: Sequence[Destination]) -> AIResult:
    """Build, check, store and queue the RTSTRUCT of a recorded result; the result as it
    is after (unchanged when the segments are all empty)."""
    t0 = time.perf_counter()
    try:
        ds = build_rtstruct(outcome.volume, outcome.segments, outcome.model)
    except EmptyResultError:
        return result
    t1 = time.perf_counter()
    held = invalid(validate_series([ds], "rtstruct"))
    t2 = time.perf_counter()
    result = results.add_objects(result.id, [("rtstruct", ds)],
                                 timings={"rtstruct_write_s": t1 - t0,
                                          "rtstruct_validate_s": t2 - t1})
    sender.enqueue(result, destinations, held=held)
    for uid, reason in held.items():
        LOG.warning("job %d: RTSTRUCT %s is held back from every destination: %s",
                    job_id, uid, reason)
    LOG.info("job %d: RTSTRUCT of %d ROI(s): built %.2f s, checked %.2f s, stored and queued "
             "%.2f s", job_id, len(ds.StructureSetROISequence), t1 - t0, t2 - t1,
             time.perf_counter() - t2)
    return result
