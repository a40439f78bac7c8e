"""Synthetic abdominal CT phantoms with known geometry and known organs.

The phantom is built in patient coordinates (LPS, mm) so that any slice geometry
(axial, flipped, oblique) samples the same anatomy, and the truth mask is known
exactly. Used by the tests, the benchmarks, the demo and to train the demo model.
Nothing here is downloaded.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Label values of the phantom's truth map.
LABELS: dict[int, str] = {1: "spleen", 2: "liver", 3: "kidney", 4: "spine"}
_HU = {"air": -1000.0, "fat": -100.0, "soft": 40.0, "spleen": 105.0, "liver": 60.0,
       "kidney": 150.0, "bone": 700.0}


@dataclass(frozen=True, kw_only=True, slots=True)
class Ellipsoid:
    """An organ approximated by an ellipsoid: centre (LPS, mm) and semi-axes (mm)."""

    name: str
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float

    def __post_init__(self) -> None:
        if any(r <= 0 for r in self.radii):
            raise ValueError(f"radii must be positive, got {self.radii}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Anatomy:
    """The organs of one synthetic patient, in patient coordinates (LPS, mm)."""

    body: Ellipsoid
    organs: tuple[Ellipsoid, ...]
    noise_hu: float = 12.0
    seed: int = 0

    @staticmethod
    def random(seed: int) -> Anatomy:
        """A plausible abdomen with the spleen's size, position and contrast varied."""
        rng = np.random.default_rng(seed)
        j = lambda s: float(rng.uniform(-s, s))  # noqa: E731 - tiny jitter helper
        body = Ellipsoid(name="body", centre=(0.0, 0.0, 0.0),
                         radii=(165 + j(15), 115 + j(12), 400.0), hu=_HU["soft"])
        # LPS: +x is patient left, +y is posterior, +z is superior.
        spleen = Ellipsoid(name="spleen", centre=(95 + j(10), 35 + j(10), 40 + j(15)),
                           radii=(30 + j(8), 45 + j(10), 50 + j(12)),
                           hu=_HU["spleen"] + j(20))
        liver = Ellipsoid(name="liver", centre=(-70 + j(8), 0 + j(8), 45 + j(10)),
                          radii=(75 + j(8), 70 + j(8), 70 + j(10)), hu=_HU["liver"] + j(10))
        kidney_l = Ellipsoid(name="kidney", centre=(70 + j(5), 55 + j(5), -35 + j(8)),
                             radii=(25.0, 28.0, 50 + j(5)), hu=_HU["kidney"] + j(15))
        kidney_r = Ellipsoid(name="kidney", centre=(-70 + j(5), 55 + j(5), -45 + j(8)),
                             radii=(25.0, 28.0, 50 + j(5)), hu=_HU["kidney"] + j(15))
        spine = Ellipsoid(name="spine", centre=(0.0, 75 + j(5), 0.0),
                          radii=(20.0, 20.0, 400.0), hu=_HU["bone"])
        return Anatomy(body=body, organs=(liver, kidney_l, kidney_r, spine, spleen),
                       noise_hu=10 + j(4), seed=seed)

    def sample(self, points: np.ndarray, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """HU values and label values at ``points`` (..., 3) in LPS mm."""
        hu = np.full(points.shape[:-1], _HU["air"], dtype=np.float32)
        labels = np.zeros(points.shape[:-1], dtype=np.uint8)
        inside_body = _inside(self.body, points)
        hu[inside_body] = _HU["fat"]
        hu[_inside(self.body, points, scale=0.9)] = self.body.hu
        label_of = {v: k for k, v in LABELS.items()}
        for organ in self.organs:
            m = _inside(organ, points) & inside_body
            hu[m] = organ.hu
            labels[m] = label_of[organ.name]
        if rng is not None and self.noise_hu > 0:
            hu += rng.normal(0.0, self.noise_hu, size=hu.shape).astype(np.float32)
        return hu, labels


def _inside(e: Ellipsoid, points: np.ndarray, scale: float = 1.0) -> np.ndarray:
    d = (points - np.asarray(e.centre, dtype=np.float32)) / (np.asarray(e.radii, np.float32) * scale)
    return np.einsum("...i,...i->...", d, d) <= 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class SliceGeometry:
    """Geometry of a stack of parallel slices.

    Parameters
    ----------
    rows, columns, slices : int
        Matrix size and number of slices.
    pixel_spacing : (float, float)
        Row spacing (between rows, mm) and column spacing (between columns, mm).
    slice_spacing : float
        Distance between slice centres along the normal (mm).
    row_direction, column_direction : 3-tuples
        Image Orientation (Patient): direction of a row (increasing column index) and
        of a column (increasing row index), unit vectors in LPS.
    """

    rows: int = 512
    columns: int = 512
    slices: int = 120
    pixel_spacing: tuple[float, float] = (0.78, 0.78)
    slice_spacing: float = 2.5
    row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_direction: tuple[float, float, float] = (0.0, 1.0, 0.0)
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if min(self.rows, self.columns, self.slices) < 1:
            raise ValueError("rows, columns and slices must be >= 1")
        r, c = np.asarray(self.row_direction), np.asarray(self.column_direction)
        if abs(np.linalg.norm(r) - 1) > 1e-4 or abs(np.linalg.norm(c) - 1) > 1e-4 or abs(r @ c) > 1e-4:
            raise ValueError("row_direction and column_direction must be orthonormal")

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    def position(self, k: int) -> np.ndarray:
        """Image Position (Patient) of slice ``k`` (centre of its first pixel), LPS mm."""
        r, c = np.asarray(self.row_direction), np.asarray(self.column_direction)
        half = (r * (self.columns - 1) * self.pixel_spacing[1]
                + c * (self.rows - 1) * self.pixel_spacing[0]) / 2
        offset = (k - (self.slices - 1) / 2) * self.slice_spacing
        return np.asarray(self.centre) - half + self.normal * offset

    def points(self, k: int) -> np.ndarray:
        """LPS coordinates (rows, columns, 3) of every pixel centre of slice ``k``."""
        r = np.asarray(self.row_direction, np.float32)
        c = np.asarray(self.column_direction, np.float32)
        i = np.arange(self.rows, dtype=np.float32)[:, None, None] * self.pixel_spacing[0]
        j = np.arange(self.columns, dtype=np.float32)[None, :, None] * self.pixel_spacing[1]
        return self.position(k).astype(np.float32) + j * r + i * c


@dataclass(frozen=True, kw_only=True, slots=True)
class StudyInfo:
    """Patient and study attributes written into a generated series."""

    patient_id: str = "PHANTOM-0001"
    patient_name: str = "Phantom^Abdomen"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    accession_number: str = "ACC0001"
    study_description: str = "CT ABDOMEN"
    series_description: str = "Abdomen 2.5mm"
    body_part: str = "ABDOMEN"
    manufacturer: str = "DICOM-NODE PHANTOM"
    model_name: str = "Synthetic CT"
    series_number: int = 2
    modality: str = "CT"


def render(anatomy: Anatomy, geometry: SliceGeometry, k: int, rng: np.random.Generator | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32) and labels (uint8) of slice ``k``, each (rows, columns)."""
    return anatomy.sample(geometry.points(k), rng)


def ct_series(anatomy: Anatomy, geometry: SliceGeometry, info: StudyInfo | None = None
              ) -> list[Dataset]:
    """Render a CT series as pydicom data sets (Explicit VR Little Endian, int16 pixels).

    Instance numbers follow slice order; rescale slope 1, intercept -1024.
    """
    info = info or StudyInfo()
    rng = np.random.default_rng(anatomy.seed + 1)
    now = _dt.datetime(2026, 1, 15, 9, 30, 0)
    out = []
    for k in range(geometry.slices):
        hu, _ = render(anatomy, geometry, k, rng)
        stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
        out.append(_ct_dataset(stored, geometry, k, info, now))
    return out


def _ct_dataset(pixels: np.ndarray, g: SliceGeometry, k: int, info: StudyInfo,
                now: _dt.datetime) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = info.accession_number
    ds.Modality = info.modality
    ds.Manufacturer = info.manufacturer
    ds.ManufacturerModelName = info.model_name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = info.study_description
    ds.SeriesDescription = info.series_description
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = info.body_part
    ds.SliceThickness = f"{g.slice_spacing:.3f}"
    ds.KVP = "120"
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = info.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{v:.4f}" for v in g.position(k)]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*g.row_direction, *g.column_direction)]
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{float(g.position(k) @ g.normal):.4f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = g.rows
    ds.Columns = g.columns
    ds.PixelSpacing = [f"{g.pixel_spacing[0]:.4f}", f"{g.pixel_spacing[1]:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = pixels.tobytes()
    return ds


def truth_labels(anatomy: Anatomy, geometry: SliceGeometry) -> np.ndarray:
    """Exact truth label map (uint8, (slices, rows, columns)) of ``geometry``'s slices.

    Slice ``k`` is the slice at ``geometry.position(k)``, i.e. instance ``k + 1`` of
    :func:`ct_series`; values are the keys of :data:`LABELS` (0 = background).
    """
    return np.stack([anatomy.sample(geometry.points(k))[1] for k in range(geometry.slices)])


def truth_at(anatomy: Anatomy, points: np.ndarray) -> np.ndarray:
    """Truth label values (uint8) at LPS points (..., 3), mm."""
    return anatomy.sample(np.asarray(points, dtype=np.float32))[1]
