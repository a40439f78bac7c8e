"""Value objects of the model registry.

Every record that leaves the registry is a frozen, slotted, keyword-only dataclass,
validated in its constructor. Strings are accepted where an enum is expected and
coerced.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.anatomy import anatomy_for_label
from registry.anatomy import table as anatomy_table

_TASK_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_VERSION_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}-v[0-9]{1,6}$")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class ModelStatus(str, enum.Enum):
    """Where a model version stands: waiting, in service, or out of service."""

    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


class ArtifactKind(str, enum.Enum):
    """What an artifact file holds."""

    PYTORCH = "pytorch"          # state dict, models/model.pt
    TORCHSCRIPT = "torchscript"  # models/model.ts
    ONNX = "onnx"
    TENSORRT = "tensorrt"        # serialised engine (plan)


class Backend(str, enum.Enum):
    """An execution backend a model can be served with."""

    TORCH_CPU = "pytorch-cpu"
    TORCH_CUDA = "pytorch-cuda"
    ORT_CPU = "onnxruntime-cpu"
    ORT_CUDA = "onnxruntime-cuda"
    TENSORRT = "tensorrt"
    #: A Triton Inference Server (``backend = "triton"``): the sliding-window batches go
    #: to it over gRPC; its model is the version's ONNX export (models export-triton).
    TRITON = "triton"

    @property
    def artifact(self) -> ArtifactKind:
        """The artifact kind this backend runs (PyTorch covers TorchScript too)."""
        if self in (Backend.ORT_CPU, Backend.ORT_CUDA, Backend.TRITON):
            return ArtifactKind.ONNX
        if self is Backend.TENSORRT:
            return ArtifactKind.TENSORRT
        return ArtifactKind.PYTORCH

    @property
    def needs_cuda(self) -> bool:
        """Whether this backend needs a CUDA GPU."""
        return self in (Backend.TORCH_CUDA, Backend.ORT_CUDA, Backend.TENSORRT)


class AuditAction(str, enum.Enum):
    """What an audit entry records."""

    IMPORT = "import"          # a bundle was imported as a new version
    REGISTER = "register"      # the trainer registered a candidate
    PROMOTE = "promote"        # a version became active in its scope
    SUPERSEDE = "supersede"    # the previous active version left service on a promote
    ROLLBACK = "rollback"      # the active version was replaced by the one before it
    RETIRE = "retire"          # a version was taken out of service on purpose
    METRICS = "metrics"        # metrics were recorded
    HOLD = "hold"              # the trainer kept a candidate out of service (the reason says why)
    SHADOW = "shadow"          # shadow mode started or stopped (the reason says which)


def _coerce(enum_type: type[enum.Enum], value: Any, name: str) -> Any:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum_type)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}") from None


def check_task(task: str) -> str:
    """Validate a task name (lower case letters, digits, ``.``, ``_``, ``-``; <= 63).

    Raises
    ------
    ValueError
        If ``task`` is not a valid task name.
    """
    if not isinstance(task, str) or not _TASK_RE.match(task):
        raise ValueError(f"task must be 1-63 lower-case letters, digits, '.', '_' or '-' "
                         f"starting with a letter or digit; got {task!r}")
    return task


def check_version(version: str) -> str:
    """Validate a version identifier (``<task>-v<n>``).

    Raises
    ------
    ValueError
        If ``version`` is not of the form ``<task>-v<n>``.
    """
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"version must look like 'spleen-ct-v3' (<task>-v<number>); got {version!r}")
    return version


def _norm_text(value: str | None, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    text = " ".join(value.split())
    if len(text) > 64:
        raise ValueError(f"{name} must be at most 64 characters (DICOM LO); got {len(text)}")
    return text


@dataclass(frozen=True, kw_only=True, slots=True)
class CodedConcept:
    """A coded concept (SNOMED CT by default), as DICOM Code Sequence items hold it.

    Parameters
    ----------
    value : str
        Code value (``78961009``).
    meaning : str
        Code meaning (``Spleen``).
    scheme : str
        Coding scheme designator (``SCT``).
    """

    value: str
    meaning: str
    scheme: str = "SCT"

    def __post_init__(self) -> None:
        for name in ("value", "meaning", "scheme"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{name} must be a non-empty str, got {v!r}")


# SNOMED CT codes of label names, from the one anatomy table (registry/anatomy.py,
# registry/data/anatomy_codes.csv: the whole-body CT bundle's 104 labels and more).
# Keys are normalised label names ("kidney left"); laterality is in anatomy_for_label.
KNOWN_LABEL_CODES: Mapping[str, CodedConcept] = {
    key: CodedConcept(value=a.type_code, meaning=a.type_meaning) for key, a in anatomy_table().items()
}


def code_for_label(name: str) -> CodedConcept | None:
    """The SNOMED CT code (Segmented Property Type) of a label name, or ``None`` when
    it is not known.

    ``_`` and ``-`` count as spaces and case is ignored (``kidney_left`` -> Kidney;
    its laterality, Left, is given by :func:`registry.anatomy.anatomy_for_label`).
    """
    a = anatomy_for_label(name)
    return None if a is None else CodedConcept(value=a.type_code, meaning=a.type_meaning)


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelSpec:
    """One output label of a segmentation model.

    Parameters
    ----------
    value : int
        Label value in the label map (= output channel index), 1..255.
    name : str
        Label name as the bundle gives it (``spleen``).
    code : CodedConcept or None
        SNOMED CT code of the structure, where known.
    """

    value: int
    name: str
    code: CodedConcept | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.value, int) or not 1 <= self.value <= 255:
            raise ValueError(f"value must be an int in 1..255, got {self.value!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        if self.code is not None and not isinstance(self.code, CodedConcept):
            raise TypeError(f"code must be a CodedConcept or None, got {type(self.code).__name__}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScannerScope:
    """The scanners a model version is meant for; empty fields match any scanner.

    Parameters
    ----------
    manufacturer : str
        DICOM Manufacturer (0008,0070), '' for any.
    model_name : str
        DICOM Manufacturer's Model Name (0008,1090), '' for any.

    Notes
    -----
    Whitespace is normalised; matching ignores case.
    """

    manufacturer: str = ""
    model_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "manufacturer", _norm_text(self.manufacturer, "manufacturer"))
        object.__setattr__(self, "model_name", _norm_text(self.model_name, "model_name"))

    @property
    def specificity(self) -> int:
        """0 general, 1 manufacturer only, 2 model name only, 3 both."""
        return (1 if self.manufacturer else 0) + (2 if self.model_name else 0)

    def matches(self, manufacturer: str | None, model_name: str | None) -> bool:
        """Whether a series from that scanner falls in this scope."""
        m = _norm_text(manufacturer, "manufacturer").casefold()
        n = _norm_text(model_name, "model_name").casefold()
        return ((not self.manufacturer or self.manufacturer.casefold() == m)
                and (not self.model_name or self.model_name.casefold() == n))

    def __str__(self) -> str:
        return " / ".join(s for s in (self.manufacturer, self.model_name) if s) or "all scanners"


@dataclass(frozen=True, kw_only=True, slots=True)
class IntensitySettings:
    """Intensity scaling of the model input (MONAI ``ScaleIntensityRanged``).

    Parameters
    ----------
    a_min, a_max : float
        Input window (HU for CT).
    b_min, b_max : float
        Output range.
    clip : bool
        Whether values outside the window are clipped.
    """

    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True

    def __post_init__(self) -> None:
        for name in ("a_min", "a_max", "b_min", "b_max"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.a_max <= self.a_min:
            raise ValueError(f"a_max ({self.a_max}) must exceed a_min ({self.a_min})")


@dataclass(frozen=True, kw_only=True, slots=True)
class Metrics:
    """Validation metrics of a model version.

    Parameters
    ----------
    dice : Mapping[str, float] or tuple of (label name, Dice) pairs
        Mean Dice per label on the validation set, each in [0, 1].
    validation_set : str
        Identity of the validation set (e.g. a hash of its sorted study UIDs), so
        that two versions are compared on the same patients.
    """

    dice: tuple[tuple[str, float], ...]
    validation_set: str

    def __post_init__(self) -> None:
        pairs = tuple(self.dice.items()) if isinstance(self.dice, Mapping) else tuple(self.dice)
        if not pairs:
            raise ValueError("dice must name at least one label")
        clean = []
        for name, value in pairs:
            if not isinstance(name, str) or not name:
                raise ValueError(f"dice label names must be non-empty str, got {name!r}")
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"dice[{name!r}] must be in [0, 1], got {value!r}")
            clean.append((name, float(value)))
        object.__setattr__(self, "dice", tuple(clean))
        if not isinstance(self.validation_set, str) or not self.validation_set.strip():
            raise ValueError("validation_set must be a non-empty str")

    @property
    def mean_dice(self) -> float:
        """Mean of the per-label Dice values."""
        return sum(v for _, v in self.dice) / len(self.dice)

    def to_json(self) -> str:
        return json.dumps({"dice": dict(self.dice), "validation_set": self.validation_set},
                          sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Metrics:
        d = json.loads(text)
        return Metrics(dice=d["dice"], validation_set=d["validation_set"])


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelVersion:
    """One registered model version.

    Parameters
    ----------
    version : str
        Identifier, ``<task>-v<n>`` (``spleen-ct-v3``).
    task : str
        What the model does (``spleen-ct``).
    architecture : str
        Network class (``monai.networks.nets.UNet``) with its key settings.
    labels : tuple of LabelSpec
        Output labels (background excluded).
    modality : str
        Input modality the bundle declares (``CT``).
    input_spacing : (float, float, float) or None
        Voxel spacing (mm) the bundle resamples to, in the bundle's axis order
        (RAS after ``Orientationd``), or ``None`` when it does not resample.
    intensity : IntensitySettings or None
        Input intensity scaling, or ``None``.
    created_at : datetime.datetime
        Creation (registration) time, UTC.
    status : ModelStatus
    scope : ScannerScope
    device_uid : str
        DICOM UID of this version as a piece of equipment (Contributing Equipment).
    path : pathlib.Path
        The version's directory (bundle copy and artifacts).
    bundle_name, bundle_version : str
        ``name`` and ``version`` from the bundle's ``metadata.json``.
    parent_version : str or None
        The version it was fine-tuned from.
    dataset_manifest : str or None
        JSON text of the training dataset manifest (filled by the trainer).
    metrics : Metrics or None
    """

    version: str
    task: str
    architecture: str
    labels: tuple[LabelSpec, ...]
    modality: str
    input_spacing: tuple[float, float, float] | None
    intensity: IntensitySettings | None
    created_at: _dt.datetime
    status: ModelStatus
    scope: ScannerScope
    device_uid: str
    path: Path
    bundle_name: str = ""
    bundle_version: str = ""
    parent_version: str | None = None
    dataset_manifest: str | None = None
    metrics: Metrics | None = None

    def __post_init__(self) -> None:
        check_version(self.version)
        check_task(self.task)
        if not self.version.startswith(self.task + "-v"):
            raise ValueError(f"version {self.version!r} does not belong to task {self.task!r}")
        object.__setattr__(self, "status", _coerce(ModelStatus, self.status, "status"))
        if not self.labels:
            raise ValueError("labels must hold at least one label")
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values):
            raise ValueError(f"label values must be unique, got {values}")
        if self.input_spacing is not None:
            sp = tuple(float(s) for s in self.input_spacing)
            if len(sp) != 3 or not all(s > 0 and math.isfinite(s) for s in sp):
                raise ValueError(f"input_spacing must be three positive mm values, got {self.input_spacing!r}")
            object.__setattr__(self, "input_spacing", sp)
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware")
        if not _UID_RE.match(self.device_uid) or len(self.device_uid) > 64:
            raise ValueError(f"device_uid must be a DICOM UID, got {self.device_uid!r}")
        if self.parent_version is not None:
            check_version(self.parent_version)
        if self.dataset_manifest is not None:
            json.loads(self.dataset_manifest)  # raises ValueError if not JSON
        object.__setattr__(self, "path", Path(self.path))

    @property
    def label_names(self) -> dict[int, str]:
        """Label value -> name."""
        return {lab.value: lab.name for lab in self.labels}

    def manifest(self) -> Any:
        """The dataset manifest, parsed (``None`` when there is none)."""
        return None if self.dataset_manifest is None else json.loads(self.dataset_manifest)


@dataclass(frozen=True, kw_only=True, slots=True)
class Artifact:
    """A file that serves a model version.

    Parameters
    ----------
    version : str
    kind : ArtifactKind
    path : pathlib.Path
        Absolute path of the file.
    sha256 : str
        Hex SHA-256 of the file.
    created_at : datetime.datetime
    detail : str
        How it was made (``opset 17, dynamic batch``; ``TensorRT 10.3 fp16 on NVIDIA H100``).
    key : str
        Cache key ('' except for TensorRT engines: GPU name, TensorRT version, ONNX hash).
    """

    version: str
    kind: ArtifactKind
    path: Path
    sha256: str
    created_at: _dt.datetime
    detail: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _coerce(ArtifactKind, self.kind, "kind"))
        object.__setattr__(self, "path", Path(self.path))
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"sha256 must be 64 lower-case hex digits, got {self.sha256!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Verification:
    """A backend's agreement with the PyTorch reference, and its speed, on one device.

    Parameters
    ----------
    version : str
    backend : Backend
    device_name : str
        ``cpu`` or the GPU name (``NVIDIA H100 80GB HBM3``).
    max_abs_diff : float
        Largest absolute difference of the logits from PyTorch's on the same input.
    argmax_agreement : float
        Fraction of voxels whose argmax label equals PyTorch's, in [0, 1].
    median_ms : float
        Median time of one sliding-window batch (``shape``), milliseconds.
    shape : tuple of int
        Input shape the check ran on (batch, channels, x, y, z).
    verified : bool
        Whether it passed the thresholds it was checked against.
    measured_at : datetime.datetime
    detail : str
        The thresholds or the reason for a failure.
    """

    version: str
    backend: Backend
    device_name: str
    max_abs_diff: float
    argmax_agreement: float
    median_ms: float
    shape: tuple[int, ...]
    verified: bool
    measured_at: _dt.datetime
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", _coerce(Backend, self.backend, "backend"))
        if not 0.0 <= self.argmax_agreement <= 1.0:
            raise ValueError(f"argmax_agreement must be in [0, 1], got {self.argmax_agreement}")
        if not self.median_ms >= 0:
            raise ValueError(f"median_ms must be >= 0, got {self.median_ms}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditEntry:
    """One recorded change of a model version's standing.

    Parameters
    ----------
    id : int
    at : datetime.datetime
    action : AuditAction
    task : str
    version : str
    scope : ScannerScope
    by : str
        Who did it (a user name or ``trainer``).
    reason : str
    previous_version : str or None
        On promote: the version it replaced; on rollback: the version rolled back.
    """

    id: int
    at: _dt.datetime
    action: AuditAction
    task: str
    version: str
    scope: ScannerScope = field(default_factory=ScannerScope)
    by: str = ""
    reason: str = ""
    previous_version: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", _coerce(AuditAction, self.action, "action"))
