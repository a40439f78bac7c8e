"""Priors from the PACS: a patient's earlier studies, asked for when a new one arrives.

When a study starts arriving (its priors job, :mod:`dicom_node.runtime.prior_results`)
for a twin that holds no earlier study of the patient within ``priors_years``, the
worker asks each destination with ``query = true``
(:class:`PriorRetriever`): C-FIND at STUDY level (Study Root) by Patient ID and Issuer
of Patient ID over the window, the most recent ``priors_max_studies`` studies the twin
does not hold; C-FIND at SERIES level in each; then, for the series the task's rules
would take (modality, body part, description, manufacturer, number of instances: what
a C-FIND answer tells), a C-MOVE to the node's own AE title (the PACS must know the
node: Orthanc's ``DicomModalities``) or a C-GET on the query's association. Moved
instances come in through the node's listener like any other (durable before
Success); fetched ones (C-GET) are stored by the same :class:`~twin_archive.ingest.Ingest`.

Bounded: studies (``priors_max_studies``), bytes (``priors_max_mb``: no further series
is asked for once reached), rate (``priors_per_hour`` retrievals, counted in the audit
log so every worker process sees them), and time (``priors_timeout_s`` for each answer).
Each retrieval is audited (``priors-retrieved``: the PACS, the twin key, counts and
bytes, never a Patient ID). A PACS that does not answer makes a :class:`Retrieval`
with ``answered = False`` and a note: the new result goes out without the comparison.

Priors from the site's own PACS are clinical data of the patient's own care (DESIGN
decision 11), not a download; they reach training only if the patient donates, as
every study does.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pydicom.uid import UID

from dicom_node.foundation.clock import utc_now
from dicom_node.foundation.errors import DicomNodeError
from dicom_node.settings import Destination, Settings
from pipelines.selection import SelectionRules
from twin_archive import IncomingInstance, audit
from twin_archive.history import HistoryStore, study_day

LOG = logging.getLogger(__name__)

#: Study Root Query/Retrieve Information Model FIND, MOVE, GET (PS3.4 C.6.2).
FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")
MOVE = UID("1.2.840.10008.5.1.4.1.2.2.2")
GET = UID("1.2.840.10008.5.1.4.1.2.2.3")
#: PS3.4 C.4 status classes of a Q/R response.
_PENDING = (0xFF00, 0xFF01)
_SUCCESS = 0x0000
_AUDIT_WHO = "dicom-node priors"


class PacsUnanswered(DicomNodeError, ConnectionError):
    """The PACS did not answer in time, refused the association or failed a request."""

    def __init__(self, pacs: str, what: str) -> None:
        self.pacs = pacs
        super().__init__(f"PACS {pacs} {what}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PriorSettings:
    """What bounds a retrieval (from :class:`~dicom_node.settings.Settings`)."""

    years: float
    max_studies: int
    max_bytes: int
    per_hour: int
    timeout_s: float
    node_ae_title: str

    @classmethod
    def from_settings(cls, settings: Settings) -> PriorSettings:
        return cls(years=settings.priors_years, max_studies=settings.priors_max_studies,
                   max_bytes=int(settings.priors_max_mb * 1e6), per_hour=settings.priors_per_hour,
                   timeout_s=settings.priors_timeout_s, node_ae_title=settings.ae_title)


@dataclass(frozen=True, kw_only=True, slots=True)
class FoundSeries:
    """A series a C-FIND found in a prior study."""

    study_uid: str
    series_uid: str
    study_date: dt.date
    modality: str
    body_part: str
    description: str
    manufacturer: str
    instances: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Retrieval:
    """What one ask for priors brought: the series now in the twin, bytes, and a note."""

    source: str
    series: tuple[FoundSeries, ...]
    bytes: int
    answered: bool
    note: str


def rules_take(rules: SelectionRules, found: FoundSeries) -> bool:
    """Whether the task's rules would take a series, from what its C-FIND answer tells
    (the full rules run again on the retrieved instances)."""
    if found.modality and found.modality.upper() != rules.modality.upper():
        return False
    if found.instances and found.instances < rules.min_slices:
        return False
    part = found.body_part.upper()
    if rules.body_part_patterns and (part or not rules.accept_missing_body_part):
        if not any(fnmatch.fnmatch(part, p.upper()) for p in rules.body_part_patterns):
            return False
    desc = found.description
    if any(re.search(p, desc, re.IGNORECASE) for p in rules.exclude_series_description_patterns):
        return False
    if rules.series_description_patterns and not any(
            re.search(p, desc, re.IGNORECASE) for p in rules.series_description_patterns):
        return False
    return not (rules.manufacturers and found.manufacturer and not any(
        fnmatch.fnmatch(found.manufacturer.upper(), m.upper()) for m in rules.manufacturers))


def header_taken(rules: SelectionRules, ds: Dataset) -> bool:
    """Whether the task's rules would take the series of one instance's header, judged
    as :func:`rules_take` judges a C-FIND answer (not by its number of instances): is a
    new study one whose priors the task wants?"""
    return rules_take(rules, FoundSeries(
        study_uid="", series_uid="", study_date=dt.date.min, modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"), description=_text(ds, "SeriesDescription"),
        manufacturer=_text(ds, "Manufacturer"), instances=0))


def _answers(responses: Any, pacs: str) -> list[Dataset]:
    """The identifiers of a C-FIND's pending responses; raises on silence or failure."""
    out = []
    for status, identifier in responses:
        if not status:  # no response within dimse_timeout, or the association died
            raise PacsUnanswered(pacs, "did not answer (no C-FIND response in time)")
        code = int(status.Status)
        if code in _PENDING and identifier is not None:
            out.append(identifier)
        elif code != _SUCCESS and code not in _PENDING:
            raise PacsUnanswered(pacs, f"failed the C-FIND (status 0x{code:04X})")
    return out


def _study_query(patient_id: str, issuer: str, since: dt.date, before: dt.date) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient_id
    q.IssuerOfPatientID = issuer
    q.StudyDate = f"{since:%Y%m%d}-{before:%Y%m%d}"
    q.StudyInstanceUID = ""
    q.ModalitiesInStudy = ""
    return q


def _series_query(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    for keyword in ("SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription",
                    "Manufacturer", "NumberOfSeriesRelatedInstances"):
        setattr(q, keyword, "")
    return q


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _count(ds: Dataset, keyword: str) -> int:
    """An IS count from a C-FIND answer; 0 (not known: the rules do not judge by it)
    when the PACS sent something else."""
    try:
        return max(0, int(_text(ds, keyword) or 0))
    except ValueError:
        return 0


class PriorRetriever:
    """Asks the PACS for a patient's priors and brings them into the twin.

    Parameters
    ----------
    settings : PriorSettings
    destinations : sequence of Destination
        Those with ``query = true`` are asked, in order, until one answers.
    ingest : twin_archive.ingest.Ingest
        Stores what a C-GET brings (a C-MOVE's instances come through the listener).
    history : HistoryStore
        What the twin already holds; records the retrieved series.
    data_dir : pathlib.Path
        For the audit log.
    """

    def __init__(self, *, settings: PriorSettings, destinations: Sequence[Destination],
                 ingest: Any, history: HistoryStore, data_dir: Any) -> None:
        self.settings = settings
        self.pacs = tuple(d for d in destinations if d.query)
        self.ingest = ingest
        self.history = history
        self.data_dir = data_dir

    def wanted(self, patient_key: str, study_uid: str, today: dt.date | None) -> str:
        """Why no retrieval is needed ('' when one is): off, no PACS to ask, no date,
        or a prior already in the twin within the window."""
        if self.settings.years <= 0:
            return "priors_years = 0"
        if not self.pacs:
            return "no destination with query = true"
        if today is None:
            return "the study has no Study Date"
        if self.history.studies_within(patient_key, study_uid, self._since(today)):
            return "a prior within the window is in the twin"
        return ""

    def _since(self, today: dt.date) -> dt.date:
        return today - dt.timedelta(days=round(self.settings.years * 365.25))

    def _rate_left(self) -> bool:
        since = utc_now() - dt.timedelta(hours=1)
        with audit.AuditLog(self.data_dir) as log:
            done = log.entries(since=since, event_type=audit.AuditEvent.PRIORS_RETRIEVED)
        return len(done) < self.settings.per_hour

    def retrieve(self, *, patient_id: str, issuer: str, patient_key: str, study_uid: str,
                 today: dt.date, rules: SelectionRules) -> Retrieval:
        """Query each PACS in turn for priors and retrieve what the rules take.

        Never raises for the PACS's sake: a PACS that does not answer is a
        :class:`Retrieval` with ``answered = False`` and the reason in ``note``.
        """
        if not patient_id or any(c in patient_id for c in "*?\\"):
            # an empty ID (an unidentified twin) or a wildcard would match other patients
            return Retrieval(source="", series=(), bytes=0, answered=False,
                             note="priors not asked for: no Patient ID that matches one "
                                  "patient only")
        if not self._rate_left():
            return Retrieval(source="", series=(), bytes=0, answered=False,
                             note=f"priors not asked for: priors_per_hour "
                                  f"({self.settings.per_hour}) reached")
        notes = []
        for pacs in self.pacs:
            try:
                found = self._find(pacs, patient_id, issuer, patient_key, study_uid, today, rules)
                got, size = self._fetch(pacs, found, rules, patient_key, study_uid)
            except PacsUnanswered as exc:
                LOG.warning("priors for a study of twin %s: %s", patient_key, exc)
                notes.append(str(exc))
                self._audit(pacs, patient_key, study_uid, (), 0, str(exc))
                continue
            marked = self.history.mark_retrieved([f.series_uid for f in got], source=pacs.ae_title,
                                                 for_study_uid=study_uid)
            self._audit(pacs, patient_key, study_uid, got, size, "")
            LOG.info("priors for a study of twin %s: %d series of %d study(ies), %.1f MB from %s "
                     "(%d recorded as retrieved)", patient_key, len(got),
                     len({f.study_uid for f in got}), size / 1e6, pacs.ae_title, marked)
            note = "" if got else f"PACS {pacs.ae_title} has no prior the task takes"
            return Retrieval(source=pacs.ae_title, series=tuple(got), bytes=size, answered=True,
                             note=note)
        return Retrieval(source="", series=(), bytes=0, answered=False, note="; ".join(notes))

    def _audit(self, pacs: Destination, patient_key: str, study_uid: str,
               got: Sequence[FoundSeries], size: int, error: str) -> None:
        outcome = audit.AuditOutcome.MINOR_FAILURE if error else audit.AuditOutcome.SUCCESS
        audit.record(self.data_dir, audit.AuditEvent.PRIORS_RETRIEVED, outcome, _AUDIT_WHO,
                     patient_key, {"pacs": pacs.key, "for_study_uid": study_uid,
                                   "studies": sorted({f.study_uid for f in got}),
                                   "series": len(got), "bytes": size, "error": error})

    # ------------------------------------------------------------------ the wire
    def _ae(self, *, get_classes: Sequence[str] = ()) -> AE:
        ae = AE(ae_title=self.settings.node_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        ae.connection_timeout = self.settings.timeout_s
        ae.add_requested_context(FIND)
        ae.add_requested_context(GET if get_classes else MOVE)
        for uid in get_classes:
            ae.add_requested_context(uid)
        return ae

    def _associate(self, pacs: Destination, *, get_classes: Sequence[str] = (),
                   handlers: Sequence[Any] = ()) -> Any:
        if pacs.tls:
            raise PacsUnanswered(pacs.ae_title, "was not asked: queries over TLS are not "
                                 "supported yet")
        ae = self._ae(get_classes=get_classes)
        roles: list[Any] = [build_role(uid, scp_role=True) for uid in get_classes]
        assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title,
                             ext_neg=roles or None, evt_handlers=list(handlers) or None)
        if not assoc.is_established:
            raise PacsUnanswered(pacs.ae_title, "did not answer (association not accepted "
                                 "in time)")
        return assoc

    def _find(self, pacs: Destination, patient_id: str, issuer: str, patient_key: str,
              study_uid: str, today: dt.date, rules: SelectionRules) -> list[FoundSeries]:
        """STUDY then SERIES level C-FINDs: the series of the most recent prior studies
        (not in the twin) that the rules take."""
        held = self.history.study_uids(patient_key) | {study_uid}
        assoc = self._associate(pacs)
        try:
            studies = []
            query = _study_query(patient_id, issuer, self._since(today),
                                 today - dt.timedelta(days=1))
            for ds in _answers(assoc.send_c_find(query, FIND), pacs.ae_title):
                uid, day = _text(ds, "StudyInstanceUID"), study_day(_text(ds, "StudyDate"))
                other_issuer = _text(ds, "IssuerOfPatientID")
                if _text(ds, "PatientID") not in ("", patient_id):
                    continue  # a PACS that matched loosely: not this patient
                if uid and uid not in held and day is not None and day < today and (
                        not issuer or not other_issuer or other_issuer == issuer):
                    studies.append((day, uid))
            studies = sorted(set(studies), reverse=True)[:self.settings.max_studies]
            found = []
            for day, uid in studies:
                for ds in _answers(assoc.send_c_find(_series_query(uid), FIND), pacs.ae_title):
                    f = FoundSeries(study_uid=uid, series_uid=_text(ds, "SeriesInstanceUID"),
                                    study_date=day, modality=_text(ds, "Modality"),
                                    body_part=_text(ds, "BodyPartExamined"),
                                    description=_text(ds, "SeriesDescription"),
                                    manufacturer=_text(ds, "Manufacturer"),
                                    instances=_count(ds, "NumberOfSeriesRelatedInstances"))
                    if f.series_uid and rules_take(rules, f):
                        found.append(f)
            return found
        except (ValueError, RuntimeError) as exc:  # no accepted FIND context, ...
            raise PacsUnanswered(pacs.ae_title, f"refused the C-FIND ({exc})") from exc
        finally:
            assoc.release()

    def _fetch(self, pacs: Destination, found: Sequence[FoundSeries], rules: SelectionRules,
               patient_key: str, for_study_uid: str) -> tuple[list[FoundSeries], int]:
        """Retrieve each series (C-MOVE or C-GET) until the bytes bound; those now held."""
        if not found:
            return [], 0
        handlers = [(evt.EVT_C_STORE, self._store_got)] if pacs.retrieve == "get" else []
        classes = rules.sop_class_uids if pacs.retrieve == "get" else ()
        assoc = self._associate(pacs, get_classes=classes, handlers=handlers)
        got, size = [], 0
        try:
            for f in found:
                if size >= self.settings.max_bytes:
                    LOG.info("priors: %d MB reached; series %s not asked for",
                             self.settings.max_bytes // 10**6, f.series_uid)
                    break
                self.history.expect_retrieved(  # before: a half-moved series is a prior too
                    series_uid=f.series_uid, study_uid=f.study_uid, patient_key=patient_key,
                    source=pacs.ae_title, for_study_uid=for_study_uid)
                self._retrieve_one(assoc, pacs, f)
                arrival = self.history.series_arrival(f.series_uid)
                if arrival is not None and arrival[2] > 0:
                    got.append(f)
                    size += arrival[3]
        finally:
            assoc.release()
        return got, size

    def _retrieve_one(self, assoc: Any, pacs: Destination, f: FoundSeries) -> None:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = f.study_uid
        q.SeriesInstanceUID = f.series_uid
        t0 = time.perf_counter()
        op = f"C-{pacs.retrieve.upper()}"
        try:
            if pacs.retrieve == "get":
                responses = assoc.send_c_get(q, GET)
            else:
                responses = assoc.send_c_move(q, self.settings.node_ae_title, MOVE)
            last = None
            for status, _ in responses:
                if not status:  # Orthanc, for one, says nothing to a caller it does not know
                    raise PacsUnanswered(pacs.ae_title, (
                        f"did not answer the {op} (no response in time; does it know the "
                        f"node's AE title {self.settings.node_ae_title}?)"))
                last = int(status.Status)
        except (ValueError, RuntimeError) as exc:  # no accepted context for it, ...
            raise PacsUnanswered(pacs.ae_title, f"refused the {op} ({exc})") from exc
        if last not in (_SUCCESS, 0xB000):  # B000: some sub-operations failed
            raise PacsUnanswered(pacs.ae_title, f"failed the C-{pacs.retrieve.upper()} "
                                                f"(status 0x{(last or 0):04X})")
        LOG.info("priors: series %s retrieved by C-%s in %.2f s", f.series_uid,
                 pacs.retrieve.upper(), time.perf_counter() - t0)

    def _store_got(self, event: Any) -> int:
        """A C-STORE on the C-GET association: stored durably like any other."""
        from dicom_node.wire.fast_receive import pydicom_file_meta, received_dataset

        request = event.request
        sop_class, sop_uid = str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
        syntax = str(event.context.transfer_syntax)
        incoming = IncomingInstance(
            file_meta=pydicom_file_meta(sop_class, sop_uid, syntax, event.assoc.acceptor.ae_title),
            dataset=received_dataset(event), transfer_syntax_uid=syntax,
            sop_class_uid=sop_class, sop_instance_uid=sop_uid,
            calling_ae=str(event.assoc.acceptor.ae_title))
        try:
            self.ingest.store(incoming)
        except DicomNodeError as exc:
            LOG.warning("priors: instance %s from C-GET not stored: %s", sop_uid, exc)
            return 0xA700
        return _SUCCESS


def asks_priors(settings: Settings) -> bool:
    """Whether the node asks a PACS for priors: ``priors_years`` > 0 and a destination
    with ``query = true``."""
    return settings.priors_years > 0 and any(d.query for d in settings.destinations)


def retriever_for(settings: Settings, ingest: Any) -> PriorRetriever | None:
    """The retriever ``settings`` ask for; None when ``priors_years`` is 0 or no
    destination has ``query = true``."""
    if not asks_priors(settings):
        return None
    return PriorRetriever(settings=PriorSettings.from_settings(settings),
                          destinations=settings.destinations, ingest=ingest,
                          history=HistoryStore(settings.data_dir), data_dir=settings.data_dir)
