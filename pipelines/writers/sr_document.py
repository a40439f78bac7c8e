"""The SR document around a TID 1500 content tree: the one place that reaches into highdicom.

highdicom 0.28's :class:`highdicom.sr.Comprehensive3DSR` constructor deep-copies the
whole content tree, re-types every item of the copy (``ContentItem._from_dataset_derived``)
and walks the tree again to check that every referenced instance is in the evidence
(``collect_evidence``). With 104 segments the tree holds some 4,000 image references
(each segment's source images) and those three passes were three quarters of the
SR's time (about 4 s of 5 on an idle machine).

The fast mode builds the document on the tree's root alone (same concept name,
template and continuity, no children), which gives every attribute the constructor
writes, including the evidence sequences (they are made from ``evidence``, not from
the tree), then puts the real children in place (``ContentSequence``, public pydicom)
and sets what :attr:`~highdicom.sr.Comprehensive3DSR.content` returns (the private
``_content``, as the constructor sets it: a root :class:`~highdicom.sr.ContentSequence`
of the tree's root item; the tree is the caller's, already typed, so there is nothing
to copy). The evidence check is kept, as a plain walk of the tree.

One switch: the ``fast`` argument, default :data:`FAST` (highdicom is one of
:data:`TESTED_VERSIONS`, which ``pyproject.toml`` allows); with ``fast=False`` the
plain constructor runs. ``tests/test_sr_document.py`` writes the same report both ways
and compares every attribute.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

#: highdicom versions the fast mode was tested with.
TESTED_VERSIONS = ("0.28.",)
#: Whether :func:`comprehensive_3d_sr` takes the fast path by default.
FAST = hd.__version__.startswith(TESTED_VERSIONS)


def comprehensive_3d_sr(*, evidence: Sequence[Dataset], content: hd.sr.MeasurementReport,
                        fast: bool | None = None, **kwargs: Any) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR of ``content``, as ``hd.sr.Comprehensive3DSR(...)`` writes it.

    Parameters
    ----------
    evidence : sequence of pydicom.dataset.Dataset
        The instances the tree references (and any other evidence).
    content : highdicom.sr.MeasurementReport
        The content tree; in the fast mode it becomes part of the document (not copied).
    fast : bool, optional
        The fast mode (default :data:`FAST`).
    **kwargs
        The other arguments of :class:`highdicom.sr.Comprehensive3DSR`.

    Raises
    ------
    ValueError
        If the tree references an instance that is not in ``evidence``.
    """
    if not (FAST if fast is None else fast):
        return hd.sr.Comprehensive3DSR(evidence=evidence, content=content, **kwargs)
    root = content[0]
    missing = set(_referenced_uids(root)) - {str(e.SOPInstanceUID) for e in evidence}
    if missing:
        raise ValueError(f"no evidence was given for referenced instance(s) {sorted(missing)}")
    stub = Dataset()
    for element in root:  # the root item's attributes, as the constructor copies them
        if element.keyword != "ContentSequence":
            stub[element.tag] = element
    stub.ContentSequence = DicomSequence()
    sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=stub, **kwargs)
    sr.ContentSequence = root.ContentSequence
    sr._content = hd.sr.ContentSequence([root], is_root=True)  # noqa: SLF001 - see the docstring
    return sr


def _referenced_uids(node: Dataset) -> Iterator[str]:
    """SOP Instance UIDs of the IMAGE and COMPOSITE items anywhere under ``node``."""
    stack, seen = [node], set()
    while stack:
        for item in stack.pop().get("ContentSequence", ()):
            if id(item) in seen:  # an item shared by several parents (the same source image)
                continue
            seen.add(id(item))
            if "ReferencedSOPSequence" in item and item.ValueType in ("IMAGE", "COMPOSITE"):
                yield str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if "ContentSequence" in item:
                stack.append(item)
