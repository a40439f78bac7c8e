"""DICOM status codes used by the node's service handlers, named in one place.

Each constant carries the PS3 section that defines it. Handlers return these names;
no hex literal appears anywhere else. Unexpected exceptions inside a handler are left
to pynetdicom, which answers 0xC211 and logs the traceback.
"""

from __future__ import annotations

# PS3.7 Annex C.1.1: the operation completed successfully.
SUCCESS = 0x0000
# PS3.7 Annex C.1.2: the Warning class is 0001 or Bxxx (the operation was performed).
WARNING = 0x0001

# PS3.4 Annex B.2.3 (Storage Service Class, C-STORE statuses).
# Refused: Out of Resources (A700-A7FF). Used for disk full and index unavailable.
OUT_OF_RESOURCES = 0xA700
# Error: Data Set does not match SOP Class (A900-A9FF).
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# Error: Cannot understand (C000-CFFF). Used for missing/invalid identifying attributes
# and for a data set that cannot be parsed.
CANNOT_UNDERSTAND = 0xC000
# Warning: Data Set does not match SOP Class (B007): stored, but not as its SOP class says
# (e.g. less Pixel Data than its Rows, Columns and Bits Allocated need).
WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
# Warning: Coercion of Data Elements (B000). Not used: the node never coerces.
COERCION_OF_DATA_ELEMENTS = 0xB000

# PS3.7 Annex C.5 (Failure statuses): Refused: SOP Class Not Supported. pynetdicom answers
# it for a SOP class no context was negotiated for; the node answers it for a C-STORE whose
# Affected SOP Class UID is not the abstract syntax of the presentation context it came on
# (a CT image on the Verification context, issue 28).
REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122

# PS3.7 Annex C.4.2 (N-EVENT-REPORT, and every DIMSE-N service): Failure: Processing
# failure. The node answers it to a Storage Commitment report it could not record, so the
# archive sends it again (dicom_node/queue/commitment.py).
COMMITMENT_PROCESSING_FAILURE = 0x0110

# pynetdicom's answer when a C-STORE handler raises (a Cxxx "Cannot understand" value);
# the fast store lane answers the same (dicom_node/wire/fast_receive/store_lane.py).
HANDLER_FAILED = 0xC211


def is_warning(status: int) -> bool:
    """A Warning status (PS3.7 C.1.2: 0001 or Bxxx): the object was stored."""
    return status == WARNING or (status & 0xF000) == COERCION_OF_DATA_ELEMENTS

# PS3.7 Annex C.4 (failure statuses of the DIMSE-N services), as Modality Performed
# Procedure Step (PS3.4 Annex F.7.2.1.3 N-CREATE, F.7.2.2.3 N-SET) answers them.
# Failure: Invalid Attribute Value: e.g. a Performed Procedure Step Status that is not
# IN PROGRESS / COMPLETED / DISCONTINUED, or an N-CREATE that is not IN PROGRESS.
INVALID_ATTRIBUTE_VALUE = 0x0106
# Failure: Processing failure. For MPPS N-SET (PS3.4 F.7.2.2, pynetdicom's
# PROCEDURE_STEP_STATUS): "Performed Procedure Step Object may no longer be updated",
# an N-SET on a step already COMPLETED or DISCONTINUED; also a data set the node cannot
# read or store.
PROCESSING_FAILURE = 0x0110
# Failure: Duplicate SOP Instance: an N-CREATE for a step that exists.
DUPLICATE_SOP_INSTANCE = 0x0111
# Failure: No Such SOP Instance: an N-SET on a step never created here.
NO_SUCH_SOP_INSTANCE = 0x0112
# Failure: Missing Attribute: a Type 1 attribute absent (e.g. Performed Procedure Step Status).
MISSING_ATTRIBUTE = 0x0120
# Failure: Missing Attribute Value: present but empty where a value is required (a
# COMPLETED step without its Performed Series Sequence, a series item without its UID).
MISSING_ATTRIBUTE_VALUE = 0x0121
# Failure: Resource limitation (PS3.7 C.5.x, a DIMSE-N failure): the step could not be
# kept (the queue database is unwritable: a full disk, a lock held too long).
RESOURCE_LIMITATION = 0x0213
