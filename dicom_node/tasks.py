"""Tasks as configuration: which series each registry task serves (``[[tasks]]`` tables).

A *task* names a registry task (whose active model serves it, per scanner scope) and
the selection rules a series must pass to be sent to it. Tasks are data, read from the
configuration file; the code holds no list of them (DESIGN: "the code has no list of
either"). A configuration without ``[[tasks]]`` serves the tasks of the shipped file
:data:`DEFAULT_TASKS_FILE` (the demo task ``spleen-ct`` with the rules it always had);
when any ``[[tasks]]`` table is present, the tables are the whole list.

Each table becomes a frozen :class:`Task`, validated in its constructor: every mistake is
one :class:`~dicom_node.foundation.errors.ConfigError` line naming the task and the key
(``tasks.wholebody-ct.min_slices: expected an integer >= 1, got 0``).

The rules are applied by :func:`pipelines.selection.matches` (the same code for
``serve``, ``infer``, ``tasks explain``, datasets and the annotation queue).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import CTImageStorage, MRImageStorage, PositronEmissionTomographyImageStorage

from dicom_node.foundation.errors import ConfigError
from pipelines.errors import SelectionRulesError
from pipelines.multiframe import ENHANCED_SOP_CLASSES, VolumeChoice
from pipelines.selection import SelectionRules

#: The tasks served when the configuration has no ``[[tasks]]`` table (shipped data).
DEFAULT_TASKS_FILE = Path(__file__).resolve().parent / "default_tasks.toml"
#: What a task may produce (destination profiles still apply).
OUTPUT_KINDS = ("seg", "sr", "overlay")
#: Series descriptions refused unless a task says otherwise (regular expressions).
DEFAULT_EXCLUDED_DESCRIPTIONS = (r"\bscout\b", r"locali[sz]er", r"dose\s*report")
#: The keys of a ``[[tasks]]`` table.
TASK_KEYS = ("name", "modality", "body_parts", "accept_missing_body_part",
             "exclude_series_descriptions", "min_slices", "max_slice_thickness_mm",
             "manufacturers", "outputs", "enabled", "min_dice", "volume", "retention_days",
             "result_retention_days", "segments", "template")
_TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # as registry.records.check_task
#: A coded concept as a task names it: ``SCHEME:VALUE`` (``SCT:78961009``).
_CODE = re.compile(r"^([A-Za-z0-9_.-]{1,16}):(\S{1,64})$")
#: What a ``segments`` entry holds (``{ name = "Spleen", code = "SCT:78961009" }``).
_SEGMENT_EXPECTED = ('a list of tables { name = "Spleen", code = "SCT:78961009" } (code '
                     'optional, SCHEME:VALUE)')
#: The image storage SOP classes a task of each modality accepts: single-frame images,
#: which the pipeline stacks into a volume, and the Enhanced / Legacy Converted Enhanced
#: multi-frame images, whose frames it reads from the functional groups.
IMAGE_SOP_CLASSES = {"CT": (str(CTImageStorage), *ENHANCED_SOP_CLASSES["CT"]),
                     "MR": (str(MRImageStorage), *ENHANCED_SOP_CLASSES["MR"]),
                     "PT": (str(PositronEmissionTomographyImageStorage),
                            *ENHANCED_SOP_CLASSES["PT"])}
#: SelectionRules field -> the task key that sets it (to name the key in an error).
_RULE_KEYS = {"modality": "modality", "body_part_patterns": "body_parts",
              "accept_missing_body_part": "accept_missing_body_part",
              "exclude_series_description_patterns": "exclude_series_descriptions",
              "min_slices": "min_slices", "max_slice_thickness_mm": "max_slice_thickness_mm",
              "manufacturers": "manufacturers", "name": "name"}


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskSegment:
    """One structure a task segments, as its ``segments`` list names it.

    Parameters
    ----------
    name : str
        The structure's name (``Spleen``); a SEG segment of that Segment Label (case,
        ``_`` and ``-`` ignored) is a label of the task.
    code : str or None
        Its coded concept ``SCHEME:VALUE`` (``SCT:78961009``); a SEG segment whose
        Segmented Property Type has that code value is a label of the task, whatever
        its label says.

    Raises
    ------
    ValueError
        If ``name`` is empty or ``code`` is not ``SCHEME:VALUE``.
    """

    name: str
    code: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "name", " ".join(self.name.split()))
        if self.code is not None and (not isinstance(self.code, str)
                                      or not _CODE.match(self.code.strip())):
            raise ValueError(f"code must be SCHEME:VALUE such as SCT:78961009, got {self.code!r}")
        if self.code is not None:
            object.__setattr__(self, "code", self.code.strip())

    @property
    def scheme(self) -> str | None:
        """The coding scheme designator (``SCT``), ``None`` without a code."""
        return None if self.code is None else self.code.split(":", 1)[0]

    @property
    def value(self) -> str | None:
        """The code value (``78961009``), ``None`` without a code."""
        return None if self.code is None else self.code.split(":", 1)[1]

    def to_dict(self) -> dict[str, Any]:
        """The entry as its TOML table."""
        return {"name": self.name, "code": self.code}


@dataclass(frozen=True, kw_only=True, slots=True)
class Task:
    """One served task: the registry task and the series it accepts.

    Parameters
    ----------
    name : str
        The registry task whose active model serves it (``wholebody-ct``): lower-case
        letters, digits, ``.``, ``_``, ``-``; at most 63 characters.
    modality : str
        Required Modality: ``CT``, ``MR`` or ``PT`` (upper case after coercion); the
        series' SOP class must be that modality's image storage class.
    body_parts : tuple of str
        Shell-style patterns on Body Part Examined, case-insensitive; empty or ``*``
        with ``accept_missing_body_part``: any.
    accept_missing_body_part : bool
        Whether a series without Body Part Examined passes ``body_parts``.
    exclude_series_descriptions : tuple of str
        Regular expressions (searched, case-insensitive) that refuse a series by its
        Series Description (default: scouts, localizers, dose reports).
    min_slices : int
        Least number of instances (>= 1, default 16).
    max_slice_thickness_mm : float or None
        Thickest slice accepted, mm (``None``: any).
    manufacturers : tuple of str
        Shell-style patterns on Manufacturer; empty: any scanner.
    outputs : tuple of str
        What the task produces, any of ``seg``, ``sr``, ``overlay`` (default all three);
        each destination's ``send`` still applies. The RTSTRUCT comes with the SEG (to
        the destinations whose ``send`` lists ``rtstruct``).
    enabled : bool
        A disabled task is listed and explained but gets no jobs.
    min_dice : float or None
        The task's quality floor for promotion, mean validation Dice in [0, 1]
        (``None``: the global ``train_min_dice``, default 0.7).
    retention_days : float or None
        Days this task's source images of non-donors are kept once settled (``None``:
        the global ``retention_days``; a series of several tasks keeps the longest).
    result_retention_days : float, "forever" or None
        Days this task's results are kept once settled; ``"forever"`` keeps them;
        ``None``: the global ``result_retention_days``.
    volume : VolumeChoice or mapping
        Which volume of a multi-frame (Enhanced) series the task segments, as a TOML
        table ``volume = {stack = "1", temporal_position = 1, echo = 1, image_type =
        ["ORIGINAL", "MAGNITUDE"]}`` (each key optional; these are the defaults).
    segments : tuple of TaskSegment
        The structures the task segments (TOML: a list of ``{ name, code }`` tables):
        a radiologist's SEG naming one of them is a label of the task even before any
        model of the task is registered (the labels of its models count too).
    template : pathlib.Path or None
        A MONAI bundle directory whose network and transforms train the task's first
        model, with fresh weights, when the task has no model (``trainer.nightly``);
        relative to the file that declares the task.
    source : str
        Where the task was read from (for error messages); not compared.

    Raises
    ------
    ConfigError
        On the first invalid key, naming the task and the key.
    """

    name: str
    modality: str
    body_parts: tuple[str, ...] = ()
    accept_missing_body_part: bool = False
    exclude_series_descriptions: tuple[str, ...] = DEFAULT_EXCLUDED_DESCRIPTIONS
    min_slices: int = 16
    max_slice_thickness_mm: float | None = None
    manufacturers: tuple[str, ...] = ()
    outputs: tuple[str, ...] = OUTPUT_KINDS
    enabled: bool = True
    min_dice: float | None = None
    retention_days: float | None = None
    result_retention_days: float | str | None = None
    volume: VolumeChoice = field(default_factory=VolumeChoice)
    segments: tuple[TaskSegment, ...] = ()
    template: Path | None = None
    source: str = field(default="", compare=False)
    rules: SelectionRules = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        src = self.source
        if not isinstance(self.name, str) or not _TASK_NAME.match(self.name):
            raise ConfigError("tasks.name", "a task name: 1-63 lower-case letters, digits, '.', "
                              "'_' or '-' (the registry task, e.g. \"wholebody-ct\")", self.name, src)

        def bad(key: str, expected: str, got: object) -> ConfigError:
            return ConfigError(f"tasks.{self.name}.{key}", expected, got, src)

        if not isinstance(self.modality, str):
            raise bad("modality", "a DICOM modality such as \"CT\"", self.modality)
        object.__setattr__(self, "modality", self.modality.strip().upper())
        if self.modality not in IMAGE_SOP_CLASSES:
            raise bad("modality", f"one of {', '.join(IMAGE_SOP_CLASSES)} (the image modalities "
                      "the pipeline reads)", self.modality)
        self._check_lists(bad)
        self._check_numbers(bad)
        self._check_retention(bad)
        self._check_learning(bad)
        object.__setattr__(self, "rules", self._rules(bad))

    def _check_lists(self, bad: Any) -> None:
        """The list keys: non-empty strings; valid patterns; known outputs."""
        for key in ("body_parts", "exclude_series_descriptions", "manufacturers", "outputs"):
            value = getattr(self, key)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, key, value)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v.strip() for v in value):
                raise bad(key, "a list of non-empty strings", value)
        for pattern in self.exclude_series_descriptions:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise bad("exclude_series_descriptions",
                          f"regular expressions ({exc}; in TOML write them in single quotes)",
                          pattern) from None
        if not self.outputs or any(o not in OUTPUT_KINDS for o in self.outputs) \
                or len(set(self.outputs)) != len(self.outputs):
            raise bad("outputs", 'a non-empty list of "seg", "sr", "overlay"', list(self.outputs))
        if "seg" not in self.outputs and "sr" not in self.outputs:
            raise bad("outputs", 'a list with "seg" or "sr" (the overlay goes with them)',
                      list(self.outputs))

    def _check_numbers(self, bad: Any) -> None:
        """The flags and numbers: booleans, slice counts, the Dice floor, the thickness."""
        for key in ("accept_missing_body_part", "enabled"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false", getattr(self, key))
        if isinstance(self.min_slices, bool) or not isinstance(self.min_slices, int) \
                or self.min_slices < 1:
            raise bad("min_slices", "an integer >= 1", self.min_slices)
        floor = self.min_dice
        if floor is not None:
            if isinstance(floor, bool) or not isinstance(floor, int | float) \
                    or not 0 <= floor <= 1:
                raise bad("min_dice", "a mean Dice in [0, 1]", floor)
            object.__setattr__(self, "min_dice", float(floor))
        thick = self.max_slice_thickness_mm
        if thick is not None:
            if isinstance(thick, bool) or not isinstance(thick, int | float) \
                    or not math.isfinite(thick) or not 0 < thick <= 1000:
                raise bad("max_slice_thickness_mm", "a number of mm > 0 (at most 1000)", thick)
            object.__setattr__(self, "max_slice_thickness_mm", float(thick))

    def _rules(self, bad: Any) -> SelectionRules:
        """The selection rules the task stands for (their errors named by the task's keys)."""
        try:
            if not isinstance(self.volume, VolumeChoice):
                object.__setattr__(self, "volume", VolumeChoice.from_dict(self.volume))
            rules = SelectionRules(
                name=self.name, modality=self.modality, sop_class_uids=IMAGE_SOP_CLASSES[self.modality],
                body_part_patterns=self.body_parts,
                accept_missing_body_part=self.accept_missing_body_part,
                exclude_series_description_patterns=self.exclude_series_descriptions,
                min_slices=self.min_slices, max_slice_thickness_mm=self.max_slice_thickness_mm,
                manufacturers=self.manufacturers, volume=self.volume)
        except SelectionRulesError as exc:
            raise bad(_RULE_KEYS.get(exc.key, exc.key), exc.expected, exc.got) from None
        return rules

    def _check_retention(self, bad: Any) -> None:
        """The per-task retention overrides: days >= 0 (``"forever"`` for results)."""
        for key in ("retention_days", "result_retention_days"):
            days = getattr(self, key)
            if days is None or (key == "result_retention_days" and days == "forever"):
                continue
            if isinstance(days, bool) or not isinstance(days, int | float) \
                    or not 0 <= days <= 36500:
                raise bad(key, "a number of days >= 0" + (' or "forever"' if key.startswith(
                    "result") else ""), days)
            object.__setattr__(self, key, float(days))

    def _check_learning(self, bad: Any) -> None:
        """``segments`` (tables or :class:`TaskSegment`) and ``template`` (a bundle folder)."""
        value: object = self.segments  # TOML tables until checked
        if not isinstance(value, list | tuple):
            raise bad("segments", _SEGMENT_EXPECTED, value)
        out = []
        for entry in value:
            if isinstance(entry, Mapping):
                if set(entry) - {"name", "code"}:
                    raise bad("segments", _SEGMENT_EXPECTED, dict(entry))
                try:
                    entry = TaskSegment(name=entry.get("name", ""), code=entry.get("code"))
                except ValueError:
                    raise bad("segments", _SEGMENT_EXPECTED, dict(entry)) from None
            if not isinstance(entry, TaskSegment):
                raise bad("segments", _SEGMENT_EXPECTED, entry)
            out.append(entry)
        object.__setattr__(self, "segments", tuple(out))
        if self.template is None:
            return
        if not isinstance(self.template, str | Path) or not str(self.template).strip():
            raise bad("template", "a MONAI bundle directory (a path)", self.template)
        path = Path(self.template).expanduser()
        if not path.is_absolute():
            base = Path(self.source).parent if self.source else Path.cwd()
            path = base / path
        path = path.resolve()
        if not (path / "configs" / "metadata.json").is_file():
            raise bad("template", "a MONAI bundle directory (configs/metadata.json and an "
                      "inference config) to train a first model from", str(self.template))
        object.__setattr__(self, "template", path)

    def describe_segments(self) -> str:
        """The declared segments in words (``Spleen (SCT:78961009)``), or ``none``."""
        return ", ".join(s.name + (f" ({s.code})" if s.code else "")
                         for s in self.segments) or "none"

    @property
    def task(self) -> str:
        """The registry task (same as :attr:`name`)."""
        return self.name

    def to_dict(self) -> dict[str, Any]:
        """The task as its ``[[tasks]]`` table (``tasks list --json``)."""
        return {"name": self.name, "modality": self.modality, "body_parts": list(self.body_parts),
                "accept_missing_body_part": self.accept_missing_body_part,
                "exclude_series_descriptions": list(self.exclude_series_descriptions),
                "min_slices": self.min_slices,
                "max_slice_thickness_mm": self.max_slice_thickness_mm,
                "manufacturers": list(self.manufacturers), "outputs": list(self.outputs),
                "enabled": self.enabled, "min_dice": self.min_dice,
                "retention_days": self.retention_days,
                "result_retention_days": self.result_retention_days,
                "volume": {"stack": self.volume.stack,
                           "temporal_position": self.volume.temporal_position,
                           "echo": self.volume.echo, "image_type": list(self.volume.image_type)},
                "segments": [seg.to_dict() for seg in self.segments],
                "template": None if self.template is None else str(self.template)}

    def describe_rules(self) -> str:
        """The rules in one line of words."""
        parts = [f"modality {self.modality}",
                 "body part " + (" / ".join(self.body_parts) if self.body_parts else "any")
                 + (" (or missing)" if self.accept_missing_body_part and self.body_parts else ""),
                 f"at least {self.min_slices} slices"]
        if self.max_slice_thickness_mm is not None:
            parts.append(f"slices at most {self.max_slice_thickness_mm:g} mm thick")
        if self.manufacturers:
            parts.append("manufacturer " + " / ".join(self.manufacturers))
        if self.exclude_series_descriptions:
            parts.append("description not " + " | ".join(self.exclude_series_descriptions))
        if self.volume != VolumeChoice():
            parts.append("multi-frame volume: " + self.volume.describe())
        return "; ".join(parts)


def parse_tasks(value: object, source: str = "") -> tuple[Task, ...]:
    """``[[tasks]]`` tables (a list of TOML tables) as :class:`Task` objects.

    Raises
    ------
    ConfigError
        One line naming the task (or its position, before its name is known) and the key:
        an unknown key, a missing ``name``/``modality``, an invalid value, a name twice.
    """
    if not isinstance(value, list):
        raise ConfigError("tasks", "an array of tables ([[tasks]])", value, source)
    out: list[Task] = []
    for i, table in enumerate(value):
        if not isinstance(table, Mapping):
            raise ConfigError(f"tasks[{i}]", "a table ([[tasks]] with name, modality...)", table,
                              source)
        name = table.get("name")
        label = f"tasks.{name}" if isinstance(name, str) and _TASK_NAME.match(name) else f"tasks[{i}]"
        for key in table:
            if key not in TASK_KEYS:
                raise ConfigError(f"{label}.{key}", f"no such key (task keys: {', '.join(TASK_KEYS)})",
                                  source=source)
        for key in ("name", "modality"):
            if key not in table:
                raise ConfigError(f"{label}.{key}", "a value (the key is required)", source=source)
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise ConfigError(f"tasks[{i}].name", "a task name: 1-63 lower-case letters, digits, "
                              "'.', '_' or '-' (the registry task, e.g. \"wholebody-ct\")", name,
                              source)
        if any(t.name == name for t in out):
            raise ConfigError(f"{label}.name", "a name no other [[tasks]] table has", name, source)
        kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in table.items()}
        out.append(Task(**kwargs, source=source))
    return tuple(out)


def default_tasks() -> tuple[Task, ...]:
    """The tasks of :data:`DEFAULT_TASKS_FILE` (served when no ``[[tasks]]`` is configured)."""
    with DEFAULT_TASKS_FILE.open("rb") as fh:
        data = tomllib.load(fh)
    return parse_tasks(data.get("tasks", []), str(DEFAULT_TASKS_FILE))


def find_task(tasks: Sequence[Task], name: str) -> Task:
    """The configured task called ``name``.

    Raises
    ------
    ValueError
        If no configured task has that name (the message lists those that do).
    """
    for task in tasks:
        if task.name == name:
            return task
    raise ValueError(f"task: {name!r} is not configured (configured: "
                     f"{', '.join(t.name for t in tasks) or 'none'}; add a [[tasks]] table)")
