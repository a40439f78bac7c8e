"""twin_archive: the per-patient archive (files on disk and their SQLite index).

Imports nothing of ours but the leaf :mod:`dicom_node.foundation.errors`.
"""

from twin_archive.archive import Archive
from twin_archive.errors import (
    ArchiveError,
    InvalidInstanceError,
    OutOfResourcesError,
    SopClassMismatchError,
    TwinNotFoundError,
)
from twin_archive.records import (
    ConsentEvent,
    IncomingInstance,
    SeriesRecord,
    StoreOutcome,
    StoreResult,
    StudyRecord,
    TwinDetail,
    TwinMerge,
    TwinSummary,
)
from twin_archive.text import printable
from twin_archive.uids import is_valid_uid, path_component, uid_problem

__all__ = [
    "Archive", "ArchiveError", "ConsentEvent", "IncomingInstance", "InvalidInstanceError",
    "OutOfResourcesError", "SeriesRecord", "SopClassMismatchError", "StoreOutcome",
    "StoreResult", "StudyRecord", "TwinDetail", "TwinMerge", "TwinNotFoundError", "TwinSummary",
    "is_valid_uid", "path_component", "printable", "uid_problem",
]
