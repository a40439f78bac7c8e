"""Value objects that cross the archive's boundary."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twin_archive.spool import Spool


class StoreOutcome(str, enum.Enum):
    """What :meth:`twin_archive.ingest.Ingest.store` did with an instance."""

    STORED = "stored"  # first time this SOP Instance UID was seen
    DUPLICATE = "duplicate"  # identical content already archived: nothing written
    NEW_VERSION = "new_version"  # same SOP Instance UID, different content: kept beside the old


@dataclass(frozen=True, kw_only=True, slots=True)
class IncomingInstance:
    """One C-STORE as the network layer hands it to the archive.

    Parameters
    ----------
    file_meta : bytes
        Preamble, ``DICM`` prefix and encoded File Meta Information group.
    dataset : bytes
        The encoded data set exactly as received (its transfer syntax unchanged);
        empty when ``spool`` holds it.
    transfer_syntax_uid : str
        Transfer syntax of ``dataset`` (from the presentation context).
    sop_class_uid : str
        Affected SOP Class UID of the request (what the sender says it is).
    sop_instance_uid : str
        Affected SOP Instance UID of the request.
    calling_ae : str
        AE title of the sender.
    spool : twin_archive.spool.Spool, optional
        The data set (and File Meta Information) already written to a temporary
        file as it arrived; :meth:`twin_archive.ingest.Ingest.store` consumes it.
    """

    file_meta: bytes
    dataset: bytes
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    calling_ae: str = ""
    spool: Spool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.file_meta, bytes | bytearray | memoryview):
            raise TypeError("file_meta must be bytes")
        if not isinstance(self.dataset, bytes | bytearray | memoryview):
            raise TypeError("dataset must be bytes")
        if self.spool is not None and self.dataset:
            raise ValueError("give the data set either as bytes or as a spool, not both")

    @property
    def size(self) -> int:
        """Bytes of the Part 10 file: File Meta Information and data set."""
        if self.spool is not None:
            return self.spool.total_size
        return len(self.file_meta) + len(self.dataset)


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreResult:
    """Result of storing one instance."""

    outcome: StoreOutcome
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    patient_key: str
    version: int
    path: str  # relative to the data directory
    sha256: str
    #: Kept, but not as it should be (e.g. too little Pixel Data for its image): why, or "".
    warning: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsentEvent:
    """One change (or confirmation) of a patient's donation consent."""

    at: str  # ISO 8601, UTC
    donate: bool
    previous: bool
    by: str
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class SeriesRecord:
    """A series as a PACS would list it."""

    series_uid: str
    modality: str
    body_part: str
    description: str
    series_number: str
    manufacturer: str
    model_name: str
    frame_of_reference_uid: str
    instances: int
    first_received: str
    last_received: str
    #: Current instances with a UID that is not conformant (stored under a hashed name).
    nonconformant_uids: int = 0
    #: Current instances whose file ``archive verify --repair`` found missing.
    missing: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class StudyRecord:
    """A study with its series."""

    study_uid: str
    study_date: str
    study_time: str
    description: str
    accession_number: str
    series: tuple[SeriesRecord, ...] = ()

    @property
    def instances(self) -> int:
        """Number of current instances in the study."""
        return sum(s.instances for s in self.series)


@dataclass(frozen=True, kw_only=True, slots=True)
class TwinSummary:
    """One patient's twin, summarised."""

    patient_key: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    donate: bool
    studies: int
    series: int
    instances: int
    last_received: str
    #: Filed without a Patient ID: the twin of one study (Issuer + Study Instance UID).
    unidentified: bool = False
    #: Key of the twin this one was merged into (``twin merge``), or ''.
    merged_into: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class TwinMerge:
    """An unidentified twin attached to a patient (``twin merge``)."""

    source_key: str
    target_key: str
    at: str  # ISO 8601, UTC
    by: str
    reason: str
    studies: int


@dataclass(frozen=True, kw_only=True, slots=True)
class TwinDetail:
    """Everything ``twin show`` displays for one patient."""

    twin: TwinSummary
    studies: tuple[StudyRecord, ...]
    consent_history: tuple[ConsentEvent, ...]
    # Filled by later parts of the loop (AI results, radiologist labels, model versions
    # trained with this patient's data); empty until those exist.
    results: tuple[dict[str, Any], ...] = field(default=())
    labels: tuple[dict[str, Any], ...] = field(default=())
    trained_model_versions: tuple[str, ...] = field(default=())
    merges: tuple[TwinMerge, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        out = asdict(self)
        for study, rec in zip(out["studies"], self.studies):
            study["instances"] = rec.instances
        return out
