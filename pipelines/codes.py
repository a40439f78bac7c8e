"""Coded concepts for segments: label name -> SNOMED CT property category, type, laterality.

The codes come from the registry's one anatomy table (:mod:`registry.anatomy`,
``registry/data/anatomy_codes.csv``): every label of the MONAI Model Zoo whole-body CT
bundle (104 TotalSegmentator names) with the SNOMED CT type and laterality
TotalSegmentator publishes, category per DICOM CID 7150; values present in pydicom's
code dictionary are checked against it in the tests. Laterality is written as a
Segmented Property Type Modifier (SCT 7771000 Left / 24028007 Right). A label name
without a code gets the generic category "Tissue" and a code from the local coding
scheme :data:`LOCAL_SCHEME`, with a warning, so that a new model still
produces a valid SEG.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from registry.anatomy import anatomy_for_label
from registry.anatomy import normalise as _normalise

LOG = logging.getLogger(__name__)

#: Private coding scheme designator ("99" prefix, PS3.3 8.1) for label names without a code.
LOCAL_SCHEME = "99DCMNODE"

ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")
TISSUE = CodedConcept("85756007", "SCT", "Tissue")
ABNORMAL_STRUCTURE = CodedConcept("49755003", "SCT", "Morphologically Altered Structure")

#: Volume (SNOMED CT), the concept name of the SR measurements.
VOLUME = CodedConcept("118565006", "SCT", "Volume")
#: UCUM millilitre, the unit of every volume in the SR.
MILLILITER = CodedConcept("mL", "UCUM", "milliliter")

#: Purpose of Reference of the algorithm's Contributing Equipment item (IHE Radiology
#: AI Results, AIR: "Processing Algorithm", coding scheme 99IHE).
PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")

#: Imaging procedures the SR reports (TID 1500 "Procedure Reported", DCID 100
#: "Quantitative Diagnostic Imaging Procedures"), by the source's Modality. PixelMed's
#: validator holds the value to CID 100 (an error otherwise), and CID 100 has no
#: procedure by body region such as "CT of abdomen"; the region stays in the source
#: images the SR references (their Body Part Examined).
_PROCEDURES_BY_MODALITY: dict[str, CodedConcept] = {
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "PT": CodedConcept("44136-0", "LN", "PET unspecified body region"),
    "NM": CodedConcept("49118-3", "LN", "NM unspecified body region"),
    "CR": CodedConcept("43468-8", "LN", "XR unspecified body region"),
    "DX": CodedConcept("43468-8", "LN", "XR unspecified body region"),
}
#: Any imaging procedure (CID 100), when the modality tells no more.
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")
#: Body Part Examined (CID 4031 code strings) of unpaired regions -> SNOMED CT region.
UNPAIRED_BODY_REGIONS: dict[str, CodedConcept] = {
    "ABDOMEN": CodedConcept("818981001", "SCT", "Abdomen"),
    "CHEST": CodedConcept("51185008", "SCT", "Chest"),
    "PELVIS": CodedConcept("816092008", "SCT", "Pelvis"),
    "HEAD": CodedConcept("69536005", "SCT", "Head"),
    "NECK": CodedConcept("45048000", "SCT", "Neck"),
    "ABDOMENPELVIS": CodedConcept("818982008", "SCT", "Abdomen and Pelvis"),
    "CHESTABDOMEN": CodedConcept("416550000", "SCT", "Chest and Abdomen"),
}
#: Every code of CID 100 (DICOM 2024), to accept a source's own Procedure Code.
CID_100 = frozenset({
    ("126020", "DCM"), ("126022", "DCM"), ("77343006", "SCT"), ("433139009", "SCT"),
    ("446315002", "SCT"), ("363679005", "SCT"), ("258177008", "SCT"), ("719178004", "SCT"),
    ("443271005", "SCT"), ("764704008", "SCT"), ("RPID5427", "RADLEX"), ("39142-5", "LN"),
    ("25045-6", "LN"), ("25056-3", "LN"), ("49118-3", "LN"), ("44136-0", "LN"),
    ("44139-4", "LN"), ("39632-5", "LN"), ("43468-8", "LN"),
})

# Fixed display colours (RGB, saturated to stand out on grey CT) of common structures;
# other labels take a colour of _PALETTE by their position in the model's label list.
_COLOURS: dict[str, tuple[int, int, int]] = {
    "spleen": (0, 255, 0), "liver": (255, 150, 0), "kidney": (0, 200, 255),
    "left kidney": (0, 200, 255), "right kidney": (0, 120, 255), "spine": (255, 255, 0),
    "pancreas": (255, 0, 255), "gallbladder": (128, 255, 0), "stomach": (255, 90, 160),
    "aorta": (255, 40, 40), "inferior vena cava": (60, 60, 255), "esophagus": (200, 120, 255),
    "adrenal gland": (220, 245, 20), "duodenum": (255, 200, 120), "urinary bladder": (255, 255, 140),
    "lung": (120, 255, 255), "heart": (255, 60, 120), "bone": (255, 255, 0), "neoplasm": (255, 0, 0),
}
# Distinct colours for label names without a fixed one (RGB).
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class SegmentCoding:
    """How one label is coded in SEG and SR.

    Parameters
    ----------
    category : CodedConcept
        Segmented Property Category (CID 7150).
    type : CodedConcept
        Segmented Property Type (CID 7151, or the local scheme).
    rgb : tuple of int
        Display colour, 0..255 each; used for the SEG's Recommended Display CIELab
        Value and the overlay contours so that both look alike.
    standard : bool
        ``False`` when ``type`` is a local code.
    laterality : CodedConcept or None
        Segmented Property Type Modifier (Left / Right), when the label is lateral.
    """

    category: CodedConcept
    type: CodedConcept
    rgb: tuple[int, int, int]
    standard: bool
    laterality: CodedConcept | None = None

    def __post_init__(self) -> None:
        if len(self.rgb) != 3 or not all(0 <= c <= 255 for c in self.rgb):
            raise ValueError(f"rgb must be three values in 0..255, got {self.rgb}")


def normalise(name: str) -> str:
    """Lower-case, ``_``/``-``/``.`` to spaces, single spaces (``Left_Kidney`` -> ``left kidney``)."""
    return _normalise(name)


def segment_coding(name: str, index: int = 0) -> SegmentCoding:
    """Codes and colour of the label ``name``.

    Parameters
    ----------
    name : str
        Label name as the model's configuration spells it.
    index : int, optional
        Position of the label in the model's label list; picks the colour of a
        name without a fixed one.

    Returns
    -------
    SegmentCoding
        SNOMED CT codes (and laterality) for names in the anatomy table, otherwise
        category "Tissue" and a local code (``99DCMNODE``) whose meaning is the name.

    Raises
    ------
    ValueError
        If ``name`` is empty.
    """
    key = normalise(name)
    if not key:
        raise ValueError("name must not be empty")
    return _coding(key, name, index)


def _coding(key: str, name: str, index: int) -> SegmentCoding:
    anatomy = anatomy_for_label(key)
    if anatomy is not None:
        lat = anatomy.laterality_code
        base = _normalise(anatomy.type_meaning)
        rgb = _COLOURS.get(key) or _COLOURS.get(base) or _PALETTE[index % len(_PALETTE)]
        return SegmentCoding(category=CodedConcept(anatomy.category_code, "SCT",
                                                   anatomy.category_meaning),
                             type=CodedConcept(anatomy.type_code, "SCT", anatomy.type_meaning),
                             rgb=rgb, standard=True,
                             laterality=CodedConcept(lat[0], "SCT", lat[1]) if lat else None)
    LOG.warning("label %r has no SNOMED CT code in the anatomy table; coding it as Tissue with "
                "local code scheme %s", name, LOCAL_SCHEME)
    return SegmentCoding(category=TISSUE, type=CodedConcept(local_code(key), LOCAL_SCHEME, name[:64]),
                         rgb=_PALETTE[index % len(_PALETTE)], standard=False)


def local_code(key: str) -> str:
    """A stable code value (at most 16 characters, PS3.3 SH) for a label name."""
    slug = re.sub(r"[^A-Z0-9]+", "-", key.upper()).strip("-") or "LABEL"
    if len(slug) <= 16:
        return slug
    return f"{slug[:10]}-{hashlib.sha1(key.encode()).hexdigest()[:5].upper()}"


def procedure_reported(source: Dataset) -> CodedConcept:
    """The imaging procedure of a source image, for the SR's "Procedure Reported".

    The source's own Procedure Code Sequence (0008,1032) when it holds a code of
    CID 100; otherwise the CID 100 procedure of the source's Modality (``CT`` ->
    LOINC 25045-6 "CT unspecified body region"), else "Imaging procedure". Never the
    algorithm: the algorithm is named in the observation context and the
    measurements.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        A header of the source series.

    Returns
    -------
    highdicom.sr.CodedConcept
    """
    for item in source.get("ProcedureCodeSequence", []) or []:
        value, scheme, meaning = (str(item.get(k, "") or "").strip() for k in
                                  ("CodeValue", "CodingSchemeDesignator", "CodeMeaning"))
        if (value, scheme) in CID_100 and meaning:
            return CodedConcept(value, scheme, meaning)
    modality = str(source.get("Modality", "") or "").strip().upper()
    return _PROCEDURES_BY_MODALITY.get(modality, IMAGING_PROCEDURE)
