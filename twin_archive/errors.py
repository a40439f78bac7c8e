"""Errors of the twin archive. Each names what was wrong and which identifier."""

from __future__ import annotations

from dicom_node.foundation.errors import DicomNodeError


class ArchiveError(DicomNodeError):
    """Base class of archive errors."""


class InvalidInstanceError(ArchiveError, ValueError):
    """An incoming instance lacks an identifying attribute or carries an invalid one.

    Parameters
    ----------
    keyword : str
        DICOM keyword of the attribute (``PatientID``, ``SOPInstanceUID`` ...).
    problem : str
        What is wrong with it, in words.
    """

    def __init__(self, keyword: str, problem: str) -> None:
        self.keyword = keyword
        self.problem = problem
        super().__init__(f"{keyword}: {problem}")


class SopClassMismatchError(ArchiveError, ValueError):
    """The data set does not match the SOP class it was sent as."""

    def __init__(self, sop_instance_uid: str, problem: str) -> None:
        self.sop_instance_uid = sop_instance_uid
        self.problem = problem
        super().__init__(f"instance {sop_instance_uid}: {problem}")


class OutOfResourcesError(ArchiveError, OSError):
    """The archive cannot store now: disk full, below the free-space reserve, index busy."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TwinNotFoundError(ArchiveError, LookupError):
    """No twin (patient) with that Patient ID is in the archive."""

    def __init__(self, patient_id: str) -> None:
        self.patient_id = patient_id
        super().__init__(
            f"no twin with Patient ID {patient_id!r}: a twin is created when the first "
            "study of that patient arrives (check the ID with 'dicom-node twin list')"
        )
