"""Synthetic abdominal CT phantoms with known geometry and known organs.

The phantom is built in patient coordinates (LPS, mm) so that any slice geometry
(axial, flipped, oblique) samples the same anatomy, and the truth mask is known
exactly. Used by the tests, the benchmarks, the demo and to train the demo model.
Nothing here is downloaded.
"""

from __future__ import annotations

import datetime as _dt
import functools
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

# Label values of the phantom's truth map.
LABELS: dict[int, str] = {1: "spleen", 2: "liver", 3: "kidney", 4: "spine"}
_HU = {"air": -1000.0, "fat": -100.0, "soft": 40.0, "muscle": 50.0, "spleen": 105.0,
       "liver": 60.0, "kidney": 150.0, "bone": 700.0}
#: Number of shape coefficients of a deformed ellipsoid: 9 for the monomials of degree
#: 1 and 2 of the unit direction, 1 for the depth of the concave dent (hilum).
SHAPE_TERMS = 10
_FIB_N = 8192


@functools.lru_cache(maxsize=1)
def _sphere_points() -> np.ndarray:
    """Fibonacci points on the unit sphere (quadrature nodes of equal weight)."""
    i = np.arange(_FIB_N, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * i / _FIB_N
    phi = np.pi * (1.0 + 5.0 ** 0.5) * i
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def _radial(shape: tuple[float, ...], u: np.ndarray) -> np.ndarray:
    """Unscaled radial factor of a deformed unit sphere in directions ``u`` (..., 3)."""
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    monomials = (x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, x * z, y * z)
    g = np.ones(u.shape[:-1], dtype=u.dtype)
    for c, m in zip(shape[:9], monomials):
        if c:
            g = g + np.asarray(c, dtype=u.dtype) * m
    if shape[9]:
        g = g - np.asarray(shape[9], dtype=u.dtype) * np.clip(-x, 0.0, None) ** 3
    return np.maximum(g, np.asarray(0.35, dtype=u.dtype))


@functools.lru_cache(maxsize=256)
def _volume_scale(shape: tuple[float, ...]) -> float:
    """Factor that gives a deformed unit sphere the volume of the unit sphere."""
    return float(np.mean(_radial(shape, _sphere_points()) ** 3) ** (-1.0 / 3.0))


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation matrix of intrinsic z-y-x Euler angles (degrees)."""
    a, b, c = np.deg2rad(angles_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


@dataclass(frozen=True, kw_only=True, slots=True)
class Ellipsoid:
    """An organ: an ellipsoid, optionally rotated and smoothly deformed.

    Parameters
    ----------
    name : str
        Organ name (``body`` or a value of :data:`LABELS`).
    centre : (float, float, float)
        Centre, LPS mm.
    radii : (float, float, float)
        Semi-axes along the organ's own axes, mm. A deformed organ has exactly the
        volume ``4/3 pi prod(radii)`` (see :attr:`volume_ml`).
    hu : float
        Attenuation, HU.
    rotation_deg : (float, float, float)
        Intrinsic z-y-x Euler angles (degrees) of the organ's axes in LPS.
    shape : tuple of float
        Empty (a plain ellipsoid) or :data:`SHAPE_TERMS` coefficients: a smooth,
        low-frequency radial deformation (degree-1 and -2 terms of the direction)
        and the depth of a concave dent on the organ's local -x side (a hilum, for
        crescent-like shapes). The surface is ``|d| = s * g(d/|d|)`` in coordinates
        ``d`` normalised by the radii, with ``s`` chosen to keep the volume.

    Raises
    ------
    ValueError
        Non-positive radii, or ``shape`` of the wrong length or not finite.
    """

    name: str
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shape: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if any(r <= 0 for r in self.radii):
            raise ValueError(f"radii must be positive, got {self.radii}")
        shape = tuple(float(v) for v in self.shape)
        if len(shape) not in (0, SHAPE_TERMS) or not all(np.isfinite(shape)):
            raise ValueError(f"shape must be empty or {SHAPE_TERMS} finite coefficients, "
                             f"got {self.shape}")
        object.__setattr__(self, "shape", shape)
        rot = tuple(float(v) for v in self.rotation_deg)
        if len(rot) != 3 or not all(np.isfinite(rot)):
            raise ValueError(f"rotation_deg must be 3 finite angles, got {self.rotation_deg}")
        object.__setattr__(self, "rotation_deg", rot)

    @property
    def volume_ml(self) -> float:
        """Exact volume of the organ (before other organs overlap it), mL."""
        return float(4.0 / 3.0 * np.pi * np.prod(self.radii) / 1000.0)

    @property
    def extent_mm(self) -> float:
        """An upper bound of the distance from the centre to the surface, mm."""
        bound = 1.0
        if self.shape:
            bound = _volume_scale(self.shape) * (1.0 + sum(abs(c) for c in self.shape[:9]))
        return float(max(self.radii) * bound)


@dataclass(frozen=True, kw_only=True, slots=True)
class Anatomy:
    """The organs of one synthetic patient, in patient coordinates (LPS, mm).

    Parameters
    ----------
    body : Ellipsoid
        The body outline; a subcutaneous fat layer, a muscle wall and the abdominal
        cavity lie inside it.
    organs : tuple of Ellipsoid
        Painted in order (later ones cover earlier ones); the spleen is last.
    noise_hu : float
        Standard deviation of the white image noise, HU.
    seed : int
        Seed of the image noise (and of :meth:`random`).
    texture : tuple of tuples of 5 floats
        Smooth fat/soft-tissue variation of the abdominal cavity: terms
        ``(amplitude HU, kx, ky, kz (rad/mm), phase)`` summed as cosines and added to
        ``body.hu``; empty for a uniform cavity.
    """

    body: Ellipsoid
    organs: tuple[Ellipsoid, ...]
    noise_hu: float = 12.0
    seed: int = 0
    texture: tuple[tuple[float, float, float, float, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.noise_hu >= 0:
            raise ValueError(f"noise_hu must be >= 0, got {self.noise_hu}")
        if any(len(t) != 5 for t in self.texture):
            raise ValueError("texture terms must be (amplitude, kx, ky, kz, phase)")

    @staticmethod
    def random(seed: int, style: SiteStyle | None = None) -> Anatomy:
        """A plausible abdomen; the spleen's shape, size, position and contrast vary.

        ``style`` (default :data:`SITE_A`, the style the shipped model was trained on)
        moves the ranges of contrast phase, organ size, noise and body size: a second
        site's scanners and patients (:data:`SITE_B`). With the default style the
        result is exactly that of earlier releases (same seeds, same phantoms).

        The contrast phase varies from late-arterial-like to portal-venous-like
        (spleen about 75-150 HU against a -110..45 HU cavity, liver and kidneys enhance with it); the spleen is a
        rotated ellipsoid with a smooth random deformation and a hilar dent, of
        about 130-500 mL; image noise is 8-25 HU.
        """
        st = style or SITE_A
        rng = np.random.default_rng(seed)
        j = lambda s: float(rng.uniform(-s, s))  # noqa: E731 - tiny jitter helper
        phase = _remap(float(rng.uniform(0.3, 1.0)), (0.3, 1.0), st.phase)  # 0 native .. 1 portal
        centre = (j(5), j(5), 0.0)
        bx, by = 165 + j(20), 115 + j(15)
        if st.body_scale != 1.0:
            bx, by = bx * st.body_scale, by * st.body_scale
        body = Ellipsoid(name="body", centre=centre, radii=(bx, by, 400.0),
                         hu=_HU["soft"] - 30 + j(15))
        # LPS: +x is patient left, +y is posterior, +z is superior.
        size = _remap(float(rng.uniform(0.8, 1.25)), (0.8, 1.25), st.organ_scale)
        spleen_shape = tuple([j(0.15) for _ in range(3)] + [j(0.25) for _ in range(6)]
                             + [float(rng.uniform(0.0, 0.6))])
        spleen = Ellipsoid(name="spleen", centre=(95 + j(12), 35 + j(12), 40 + j(18)),
                           radii=(28 * size * (1 + j(0.15)), 42 * size * (1 + j(0.15)),
                                  48 * size * (1 + j(0.15))),
                           hu=60 + 80 * phase + j(10) + st.spleen_hu_offset,
                           rotation_deg=(-30 + j(25), j(15), j(15)), shape=spleen_shape)
        liver = Ellipsoid(name="liver", centre=(-70 + j(8), 0 + j(8), 45 + j(10)),
                          radii=(75 + j(8), 70 + j(8), 70 + j(10)),
                          hu=50 + 60 * phase + j(10), rotation_deg=(j(10), j(8), j(8)),
                          shape=tuple([j(0.08) for _ in range(9)] + [0.0]))
        kidney_hu = 35 + 150 * phase
        kidney_l = Ellipsoid(name="kidney", centre=(70 + j(5), 55 + j(5), -35 + j(8)),
                             radii=(25.0, 28.0, 50 + j(5)), hu=kidney_hu + j(15),
                             rotation_deg=(j(15), j(10), 0.0))
        kidney_r = Ellipsoid(name="kidney", centre=(-70 + j(5), 55 + j(5), -45 + j(8)),
                             radii=(25.0, 28.0, 50 + j(5)), hu=kidney_hu + j(15),
                             rotation_deg=(j(15), j(10), 0.0))
        spine = Ellipsoid(name="spine", centre=(0.0, 75 + j(5), 0.0),
                          radii=(20.0, 20.0, 400.0), hu=_HU["bone"] + j(150))
        texture = tuple((float(rng.uniform(15, 35)), j(0.06), j(0.06), j(0.04), j(np.pi))
                        for _ in range(4))
        return Anatomy(body=body, organs=(liver, kidney_l, kidney_r, spine, spleen),
                       noise_hu=_remap(float(rng.uniform(8.0, 25.0)), (8.0, 25.0), st.noise_hu),
                       seed=seed, texture=texture)

    def sample(self, points: np.ndarray, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """HU values and label values at ``points`` (..., 3) in LPS mm.

        Parameters
        ----------
        points : numpy.ndarray
            (..., 3) LPS coordinates, mm.
        rng : numpy.random.Generator, optional
            Source of the image noise; without it the HU values are noise-free.

        Returns
        -------
        hu : numpy.ndarray
            float32 HU, shape ``points.shape[:-1]``.
        labels : numpy.ndarray
            uint8 values of :data:`LABELS` (0 = background), the exact truth.
        """
        pts = np.asarray(points, dtype=np.float32)
        hu = np.full(pts.shape[:-1], _HU["air"], dtype=np.float32)
        labels = np.zeros(pts.shape[:-1], dtype=np.uint8)
        inside_body = _inside(self.body, pts)
        hu[inside_body] = _HU["fat"]
        hu[_inside(self.body, pts, scale=0.93)] = _HU["muscle"]
        cavity = _inside(self.body, pts, scale=0.88)
        if self.texture:
            q = pts[cavity].astype(np.float64)
            field = np.full(q.shape[:-1], self.body.hu)
            for amp, kx, ky, kz, ph in self.texture:
                field += amp * np.cos(q @ np.array([kx, ky, kz]) + ph)
            hu[cavity] = np.clip(field, -110.0, 45.0).astype(np.float32)
        else:
            hu[cavity] = self.body.hu
        label_of = {v: k for k, v in LABELS.items()}
        for organ in self.organs:
            m = _inside(organ, pts) & inside_body
            hu[m] = organ.hu
            labels[m] = label_of[organ.name]
        if rng is not None and self.noise_hu > 0:
            hu += rng.normal(0.0, self.noise_hu, size=hu.shape).astype(np.float32)
        return hu, labels


def _remap(x: float, src: tuple[float, float], dest: tuple[float, float]) -> float:
    """``x`` drawn uniformly from ``src`` moved linearly onto ``dest`` (``x`` itself when equal)."""
    if tuple(dest) == tuple(src):
        return x
    return dest[0] + (x - src[0]) / (src[1] - src[0]) * (dest[1] - dest[0])


@dataclass(frozen=True, kw_only=True, slots=True)
class SiteStyle:
    """How one site's CT differs: field of view, spacing, noise, contrast, organ size.

    The shipped demo model was trained on :data:`SITE_A`; :data:`SITE_B` is a site
    it never saw (``benchmarks/transfer.py``).

    Parameters
    ----------
    name : str
    fov_mm : float
        Reconstruction field of view (edge of the square image), mm; the pixel spacing
        is ``fov_mm / rows`` (:meth:`geometry`).
    slice_spacing_mm : float
        Distance between slices, mm.
    body_scale : float
        Factor on the body outline's size (larger or smaller patients in that field of
        view).
    noise_hu : (float, float)
        Range of the image noise (standard deviation), HU.
    phase : (float, float)
        Range of the contrast phase, 0 (native) to 1 (portal venous); organ
        attenuation follows it.
    spleen_hu_offset : float
        Added to the spleen's attenuation, HU (contrast against its neighbours).
    organ_scale : (float, float)
        Range of the spleen's size factor.
    kvp : str
        Peak kilovoltage written to the series (KVP).

    Raises
    ------
    ValueError
        A range that is not (low, high) with low <= high, or non-positive sizes.
    """

    name: str = "A"
    fov_mm: float = 400.0
    slice_spacing_mm: float = 5.0
    body_scale: float = 1.0
    noise_hu: tuple[float, float] = (8.0, 25.0)
    phase: tuple[float, float] = (0.3, 1.0)
    spleen_hu_offset: float = 0.0
    organ_scale: tuple[float, float] = (0.8, 1.25)
    kvp: str = "120"

    def __post_init__(self) -> None:
        for key in ("noise_hu", "phase", "organ_scale"):
            lo, hi = (float(v) for v in getattr(self, key))
            if not lo <= hi:
                raise ValueError(f"{key} must be (low, high) with low <= high, got {(lo, hi)}")
            object.__setattr__(self, key, (lo, hi))
        for key in ("fov_mm", "slice_spacing_mm", "body_scale"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.noise_hu[0] < 0 or self.organ_scale[0] <= 0:
            raise ValueError("noise_hu must be >= 0 and organ_scale > 0")

    def geometry(self, rows: int, slices: int) -> SliceGeometry:
        """A square axial stack of this site: ``rows`` x ``rows`` pixels over ``fov_mm``."""
        spacing = self.fov_mm / rows
        return SliceGeometry(rows=rows, columns=rows, slices=slices,
                             pixel_spacing=(spacing, spacing), slice_spacing=self.slice_spacing_mm)


#: The style of the phantoms the shipped model was trained on (the default).
SITE_A = SiteStyle()
#: A site the shipped model never saw: wider field of view, thinner slices, larger
#: patients, noisier images, (almost) native contrast with a spleen close to its
#: neighbours, smaller spleens, 100 kVp.
SITE_B = SiteStyle(name="B", fov_mm=480.0, slice_spacing_mm=3.0, body_scale=1.12,
                   noise_hu=(28.0, 40.0), phase=(0.0, 0.15), spleen_hu_offset=-10.0,
                   organ_scale=(0.6, 0.85), kvp="100")


def _inside(e: Ellipsoid, points: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Whether ``points`` (..., 3, LPS mm) lie inside ``e`` (its shape scaled by ``scale``)."""
    rel = points - np.asarray(e.centre, dtype=np.float32)
    if e.rotation_deg != (0.0, 0.0, 0.0):
        rel = rel @ _rotation(e.rotation_deg).astype(np.float32)  # into the organ's frame
    d = rel / (np.asarray(e.radii, np.float32) * scale)
    rho2 = np.einsum("...i,...i->...", d, d)
    if not e.shape:
        return rho2 <= 1.0
    s = _volume_scale(e.shape)
    bound = s * (1.0 + sum(abs(c) for c in e.shape[:9]))
    out = np.zeros(rho2.shape, dtype=bool)
    near = rho2 <= bound * bound  # the only candidates; the rest is outside
    if not near.any():
        return out
    dn = d[near]
    rho = np.sqrt(rho2[near])
    u = dn / np.maximum(rho, 1e-12)[..., None]
    out[near] = rho <= s * _radial(e.shape, u.astype(np.float64))
    return out


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

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix from index (k, i, j) (slice, row, column) to LPS mm."""
        a = np.eye(4)
        a[:3, 0] = self.normal * self.slice_spacing
        a[:3, 1] = np.asarray(self.column_direction) * self.pixel_spacing[0]
        a[:3, 2] = np.asarray(self.row_direction) * self.pixel_spacing[1]
        a[:3, 3] = self.position(0)
        return a

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
    kvp: str = "120"
    station_name: str = ""


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
    ds.KVP = info.kvp
    if info.station_name:
        ds.StationName = info.station_name
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


def mr_signal(hu: np.ndarray, echo_time_ms: float, temporal_index: int) -> np.ndarray:
    """Stored values (uint16) of a synthetic MR magnitude image from the phantom's HU.

    Signal ``(HU + 1024) * exp(-TE / 80 ms) * (1 + 0.1 * (t - 1))``: each echo and
    temporal position gives another, known image of the same anatomy.
    """
    signal = (hu + 1024.0) * np.exp(-echo_time_ms / 80.0) * (1.0 + 0.1 * (temporal_index - 1))
    return np.clip(np.rint(signal), 0, 4095).astype(np.uint16)


def enhanced_mr(anatomy: Anatomy, geometry: SliceGeometry, info: StudyInfo | None = None, *,
                temporal_positions: int = 2, echo_times_ms: tuple[float, ...] = (10.0, 20.0),
                components: tuple[str, ...] = ("MAGNITUDE",),
                frame_order: np.ndarray | None = None) -> Dataset:
    """Render an Enhanced MR Image (one multi-frame instance) with known geometry.

    Frames: every temporal position x echo x complex component x slice; magnitude
    images are :func:`mr_signal`, PHASE images a ramp along the rows (stored values
    0..4095); geometry per frame in the Per-Frame Functional Groups (Plane Position,
    Frame Content with Temporal Position Index, MR Echo, MR Image Frame Type with the
    Complex Image Component), orientation and pixel measures shared; Dimension Index:
    temporal position, echo time, complex component, in-stack position.
    ``frame_order`` (a permutation of the frames in that order) stores them out of
    order.
    """
    info = info or StudyInfo(modality="MR", series_description="Abdomen multi-echo dynamic")
    rng = np.random.default_rng(anatomy.seed + 2)
    hus = [render(anatomy, geometry, k, rng)[0] for k in range(geometry.slices)]
    frames = [(t, e, c, k) for t in range(1, temporal_positions + 1)
              for e in range(len(echo_times_ms)) for c in range(len(components))
              for k in range(geometry.slices)]
    order = np.arange(len(frames)) if frame_order is None else np.asarray(frame_order)
    if sorted(order.tolist()) != list(range(len(frames))):
        raise ValueError("frame_order must be a permutation of the frames")
    ds = _ct_dataset(np.zeros((geometry.rows, geometry.columns), np.uint16), geometry, 0, info,
                     _dt.datetime(2026, 1, 15, 9, 30, 0))
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "SliceThickness", "SliceLocation", "RescaleIntercept", "RescaleSlope",
                    "RescaleType", "WindowCenter", "WindowWidth", "KVP", "InstanceNumber",
                    "AcquisitionNumber"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    ds.BitsStored, ds.HighBit = 16, 15
    ds.SharedFunctionalGroupsSequence = [_mr_shared(geometry)]
    ds.DimensionOrganizationSequence = [Dataset()]
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = generate_uid()
    ds.DimensionIndexSequence = [_dimension(ds, *d) for d in (
        ("TemporalPositionIndex", "FrameContentSequence", "Temporal Position"),
        ("EffectiveEchoTime", "MREchoSequence", "Effective Echo Time"),
        ("ComplexImageComponent", "MRImageFrameTypeSequence", "Complex Component"),
        ("InStackPositionNumber", "FrameContentSequence", "In-Stack Position"))]
    phase = np.broadcast_to(np.linspace(0, 4095, geometry.rows, dtype=np.float32)[:, None],
                            (geometry.rows, geometry.columns)).astype(np.uint16)
    per_frame, pixels = [], []
    for i in order:
        t, e, c, k = frames[i]
        per_frame.append(_mr_frame(geometry, (t, e, c, k), echo_times_ms[e], components[c]))
        pixels.append(phase if components[c] == "PHASE" else mr_signal(hus[k], echo_times_ms[e], t))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack(pixels).tobytes()
    return ds


def _dimension(ds: Dataset, keyword: str, group: str, label: str) -> Dataset:
    item = Dataset()
    item.DimensionOrganizationUID = ds.DimensionOrganizationSequence[0].DimensionOrganizationUID
    item.DimensionIndexPointer = Tag(keyword)
    item.FunctionalGroupPointer = Tag(group)
    item.DimensionDescriptionLabel = label
    return item


def _mr_shared(g: SliceGeometry) -> Dataset:
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{g.pixel_spacing[0]:.4f}", f"{g.pixel_spacing[1]:.4f}"]
    measures.SliceThickness = f"{g.slice_spacing:.3f}"
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [f"{v:.6f}" for v in (*g.row_direction,
                                                                 *g.column_direction)]
    shared.PlaneOrientationSequence = [orientation]
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = "0", "1", "US"
    shared.PixelValueTransformationSequence = [transform]
    return shared


def _mr_frame(g: SliceGeometry, index: tuple[int, int, int, int], echo_time_ms: float,
              component: str) -> Dataset:
    t, e, c, k = index
    frame = Dataset()
    content = Dataset()
    content.StackID = "1"
    content.InStackPositionNumber = k + 1
    content.TemporalPositionIndex = t
    content.DimensionIndexValues = [t, e + 1, c + 1, k + 1]
    frame.FrameContentSequence = [content]
    position = Dataset()
    position.ImagePositionPatient = [f"{v:.4f}" for v in g.position(k)]
    frame.PlanePositionSequence = [position]
    echo = Dataset()
    echo.EffectiveEchoTime = echo_time_ms
    frame.MREchoSequence = [echo]
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "P" if component == "PHASE" else "M", "NONE"]
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    frame_type.ComplexImageComponent = component
    frame_type.AcquisitionContrast = "PROTON_DENSITY"
    frame.MRImageFrameTypeSequence = [frame_type]
    return frame
