"""Anatomic codes of label names: SNOMED CT property category, type and laterality.

One table, ``registry/data/anatomy_codes.csv``, read once: the codes of every label
of the MONAI Model Zoo whole-body CT bundle (104 TotalSegmentator label names) as
TotalSegmentator publishes them, plus the names the node coded before. The file says
where each row comes from (its ``source`` column and header). The registry uses it to
report, at import, which labels of a bundle have no code; the SEG/SR writers
(:mod:`pipelines.codes`) use it to code segments, with laterality as a Segmented
Property Type Modifier (SCT 7771000 Left, 24028007 Right), as TotalSegmentator does.

A table in a data file rather than a Python dict: it is data a site may review
against its own terminology service, and diffs of it read as a table.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TABLE = Path(__file__).resolve().parent / "data" / "anatomy_codes.csv"

#: Laterality letter -> (SNOMED CT code, meaning) of the type modifier.
LATERALITY = {"L": ("7771000", "Left"), "R": ("24028007", "Right")}

#: Other spellings of names in the table (after :func:`normalise`).
ALIASES = {
    "vertebral column": "spine", "vertebrae": "spine", "spinal column": "spine",
    "kidney left": "left kidney", "kidney right": "right kidney",
    "gall bladder": "gallbladder", "oesophagus": "esophagus", "ivc": "inferior vena cava",
    "postcava": "inferior vena cava", "bladder": "urinary bladder", "tumor": "neoplasm",
    "tumour": "neoplasm", "adrenal": "adrenal gland",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class AnatomyCode:
    """The codes of one label name.

    Parameters
    ----------
    category_code, category_meaning : str
        Segmented Property Category (SNOMED CT, DICOM CID 7150).
    type_code, type_meaning : str
        Segmented Property Type (SNOMED CT).
    laterality : str
        ``L``, ``R`` or ``""`` (unpaired, or the side is in the type itself).
    source : str
        Where the row comes from.
    """

    category_code: str
    category_meaning: str
    type_code: str
    type_meaning: str
    laterality: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("category_code", "category_meaning", "type_code", "type_meaning"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        if self.laterality not in ("", "L", "R"):
            raise ValueError(f"laterality must be L, R or empty, got {self.laterality!r}")

    @property
    def laterality_code(self) -> tuple[str, str] | None:
        """(SNOMED CT code, meaning) of the laterality modifier, or ``None``."""
        return LATERALITY.get(self.laterality)


def normalise(name: str) -> str:
    """Lower-case, ``_``/``-``/``.`` to spaces, single spaces (``Kidney_Left`` -> ``kidney left``)."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-.]", " ", name.strip().lower())).strip()


@cache
def table() -> dict[str, AnatomyCode]:
    """The whole table, by normalised label name.

    Raises
    ------
    ValueError
        If the file is malformed (a name twice, a missing column).
    """
    out: dict[str, AnatomyCode] = {}
    with TABLE.open(encoding="utf-8", newline="") as fh:
        rows = csv.DictReader(line for line in fh if not line.startswith("#"))
        for row in rows:
            key = normalise(row["label"])
            if key in out:
                raise ValueError(f"{TABLE.name}: label {row['label']!r} is listed twice")
            out[key] = AnatomyCode(category_code=row["category_code"],
                                   category_meaning=row["category_meaning"],
                                   type_code=row["type_code"], type_meaning=row["type_meaning"],
                                   laterality=row["laterality"], source=row["source"])
    return out


def anatomy_for_label(name: str) -> AnatomyCode | None:
    """The codes of a label name (case, ``_``/``-`` and the aliases ignored), or ``None``."""
    key = normalise(name)
    codes = table()
    return codes.get(key) or codes.get(ALIASES.get(key, key))


def unmapped_labels(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The names (in order) that have no code in the table."""
    return tuple(n for n in names if anatomy_for_label(n) is None)
