"""Selection rules as data: validation of the mapping, and decisions on real headers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from pipelines import phantom as ph
from pipelines.errors import PipelineError, SelectionRulesError
from pipelines.postprocess import split_labels
from pipelines.selection import SelectionDecision, SelectionRules, is_node_output, matches
from pipelines.types import NODE_MANUFACTURER, ModelInfo
from pipelines.volume import load_series
from pipelines.writers import write_results

ANATOMY = ph.Anatomy.random(11)
GEOMETRY = ph.SliceGeometry(rows=32, columns=32, slices=12, pixel_spacing=(12.0, 12.0),
                            slice_spacing=10.0)
RULES = {
    "name": "abdomen-ct",
    "modality": "ct",
    "body_part_patterns": ["ABDOMEN*", "CHEST_TO_PELVIS"],
    "series_description_patterns": [r"abd", r"\bportal\b"],
    "exclude_series_description_patterns": ["scout", "dose"],
    "min_slices": 10,
}


@pytest.fixture(scope="module")
def series() -> list:
    return ph.ct_series(ANATOMY, GEOMETRY)


def _with(series: list, **attrs: object) -> list:
    out = []
    for ds in series:
        c = copy.deepcopy(ds)
        for k, v in attrs.items():
            if v is None:
                delattr(c, k)
            else:
                setattr(c, k, v)
        out.append(c)
    return out


def test_rules_from_a_json_round_trip_and_match(series: list) -> None:
    rules = SelectionRules.from_dict(json.loads(json.dumps(RULES)))
    assert rules.modality == "CT" and rules.min_slices == 10
    assert rules.body_part_patterns == ("ABDOMEN*", "CHEST_TO_PELVIS")
    decision = matches(rules, series)
    assert decision == SelectionDecision(matched=True, reason="rules 'abdomen-ct': matched (12 instances)")
    assert matches(SelectionRules(), series).matched  # defaults: original CT images


@pytest.mark.parametrize(("change", "words"), [
    ({"BodyPartExamined": "HEAD"}, "Body Part Examined 'HEAD'"),
    ({"BodyPartExamined": None}, "Body Part Examined is missing"),
    ({"SeriesDescription": "Head 5mm"}, "matches none of"),
    ({"SeriesDescription": "Abdomen scout"}, "excluded pattern 'scout'"),
    ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]}, "is not ORIGINAL"),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "contains ['LOCALIZER']"),
    ({"Modality": "MR"}, "modality ['MR'] is not CT"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.128"}, "SOP class"),  # PET on a CT rule (Enhanced CT is read since issue 24)
])
def test_each_rule_refuses_with_a_reason(series: list, change: dict, words: str) -> None:
    decision = matches(SelectionRules.from_dict(RULES), _with(series, **change))
    assert not decision.matched
    assert words in decision.reason and decision.reason.startswith("rules 'abdomen-ct':")


def test_body_part_optional_when_configured(series: list) -> None:
    rules = SelectionRules.from_dict({**RULES, "accept_missing_body_part": True})
    assert matches(rules, _with(series, BodyPartExamined=None)).matched
    with pytest.warns(UserWarning, match="VR CS"):  # lower case is invalid CS, seen in the wild
        lower = _with(series, BodyPartExamined="abdomen")
    assert matches(rules, lower).matched  # case-insensitive


def test_min_slices_orientation_and_series(series: list) -> None:
    rules = SelectionRules.from_dict(RULES)
    assert "at least 10 required" in matches(rules, series[:5]).reason
    assert matches(rules, series + series[:1]).matched  # a re-sent instance counts once
    tilted = _with(series[:1], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    assert "more than one Image Orientation" in matches(rules, series[1:] + tilted).reason
    other = ph.ct_series(ANATOMY, GEOMETRY)
    assert "2 series" in matches(rules, series[:6] + other[:6]).reason
    assert "no instances" in matches(rules, []).reason


def test_own_results_and_derived_objects_never_match(series: list) -> None:
    vol = load_series(series)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    labels = ph.truth_at(ANATOMY, vol.index_to_lps(grid))
    results = write_results(vol, split_labels(labels, vol, ph.LABELS), ModelInfo(name="m", version="1"))
    rules = SelectionRules.from_dict({**RULES, "min_slices": 1})
    permissive = SelectionRules(modality="OT", require_original=False,
                                sop_class_uids=("1.2.840.10008.5.1.4.1.1.66.4",))
    for ds in results.all():
        assert is_node_output(ds)
        for r in (rules, permissive):
            decision = matches(r, [ds])
            assert not decision.matched and "produced by this node" in decision.reason
    # a PACS that rewrites Manufacturer still keeps our Contributing Equipment
    rewritten = copy.deepcopy(results.seg)
    rewritten.Manufacturer = "SOME PACS"
    assert is_node_output(rewritten)
    # SEG/SR/SC from anyone else: refused by kind, not by marker
    for ds, words in ((results.seg, "result/document"), (results.sr, "result/document"),
                      (results.overlay[0], "secondary capture")):
        foreign = copy.deepcopy(ds)
        foreign.Manufacturer = "OTHER VENDOR"
        del foreign.ContributingEquipmentSequence
        assert not is_node_output(foreign)
        decision = matches(permissive, [foreign])
        assert not decision.matched and words in decision.reason
    sc_as_ct = _with(series, SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    assert "secondary capture" in matches(rules, sc_as_ct).reason
    assert not is_node_output(series[0]) and NODE_MANUFACTURER != series[0].Manufacturer


@pytest.mark.parametrize(("data", "key"), [
    ({"modality": "SEG"}, "modality"),
    ({"modality": "sr"}, "modality"),
    ({"modalty": "CT"}, "modalty"),
    ({"min_slices": 0}, "min_slices"),
    ({"min_slices": True}, "min_slices"),
    ({"series_description_patterns": ["(unclosed"]}, "series_description_patterns"),
    ({"body_part_patterns": "ABDOMEN"}, "body_part_patterns"),
    ({"body_part_patterns": [""]}, "body_part_patterns"),
    ({"require_original": "yes"}, "require_original"),
    ({"sop_class_uids": ["1.2.840.10008.5.1.4.1.1.7"]}, "sop_class_uids"),
    ({"sop_class_uids": []}, "sop_class_uids"),
    ({"name": ""}, "name"),
])
def test_invalid_rule_sets_are_refused_naming_the_key(data: dict, key: str) -> None:
    with pytest.raises(SelectionRulesError) as info:
        SelectionRules.from_dict(data)
    assert info.value.key == key and key in str(info.value)
    assert isinstance(info.value, PipelineError) and isinstance(info.value, ValueError)
    with pytest.raises(SelectionRulesError):
        SelectionRules.from_dict(["not", "a", "table"])  # type: ignore[arg-type]
