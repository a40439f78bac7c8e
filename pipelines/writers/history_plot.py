"""Each segment's volume over time, drawn (Pillow and NumPy: no plotting library).

:func:`plot_volumes` draws the chart as an RGB array (a line per segment in its SEG
colour, a dot per study, dates on the x axis, mL on the y axis); ``dicom-node twin
history --plot FILE.png`` saves it, and :func:`history_image` makes it one more image of
the overlay series (with two or more time points), with the banner above it.
The axes are linear in days and mL; :func:`point_position` says where a point is drawn,
so a test can find each dot in the picture.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from pipelines.codes import segment_coding
from pipelines.types import NODE_MANUFACTURER, NODE_MODEL_NAME, NODE_SOFTWARE_VERSION, OVERLAY_BANNER
from pipelines.uids import new_uid

WIDTH, HEIGHT = 640, 400
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 40, 50
_BG, _AXIS, _TEXT = (24, 24, 24), (200, 200, 200), (255, 255, 255)
DOT_RADIUS = 4


@dataclass(frozen=True, kw_only=True, slots=True)
class VolumePoint:
    """One segment's volume (mL) at one study date."""

    segment: str
    study_date: dt.date
    volume_ml: float

    def __post_init__(self) -> None:
        if not isinstance(self.study_date, dt.date):
            raise TypeError("study_date must be a datetime.date")
        if not math.isfinite(self.volume_ml) or self.volume_ml < 0:
            raise ValueError(f"volume_ml must be finite and >= 0, got {self.volume_ml!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class _Axes:
    d0: dt.date
    days: int
    v_max: float
    width: int
    height: int


def _axes(points: Sequence[VolumePoint], width: int, height: int) -> _Axes:
    d0 = min(p.study_date for p in points)
    days = max(1, (max(p.study_date for p in points) - d0).days)
    top = max(p.volume_ml for p in points) * 1.1 or 1.0
    step = 10 ** math.floor(math.log10(top))
    return _Axes(d0=d0, days=days, v_max=math.ceil(top / step) * step, width=width, height=height)


def point_position(points: Sequence[VolumePoint], point: VolumePoint, *, width: int = WIDTH,
                   height: int = HEIGHT) -> tuple[int, int]:
    """Pixel (x, y) of the centre of ``point``'s dot in :func:`plot_volumes`' picture."""
    ax = _axes(points, width, height)
    x = _LEFT + (point.study_date - ax.d0).days / ax.days * (width - _LEFT - _RIGHT)
    y = height - _BOTTOM - point.volume_ml / ax.v_max * (height - _TOP - _BOTTOM)
    return round(x), round(y)


def segment_colour(name: str, index: int) -> tuple[int, int, int]:
    """The segment's display colour (as in the SEG and the overlay contours)."""
    return segment_coding(name, index).rgb


def plot_volumes(points: Sequence[VolumePoint], *, title: str = "Volume over time (mL)",
                 width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """The chart as a (height, width, 3) uint8 RGB array.

    Raises
    ------
    ValueError
        If there are no points.
    """
    if not points:
        raise ValueError("points: none to plot")
    ax = _axes(points, width, height)
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    x0, y0, x1, y1 = _LEFT, height - _BOTTOM, width - _RIGHT, _TOP
    draw.line((x0, y1, x0, y0, x1, y0), fill=_AXIS, width=1)
    draw.text((x0, 10), title, fill=_TEXT, font=font)
    for k in range(5):  # y ticks
        v = ax.v_max * k / 4
        y = y0 - (y0 - y1) * k / 4
        draw.line((x0 - 4, y, x0, y), fill=_AXIS)
        draw.text((4, y - 7), f"{v:g}", fill=_TEXT, font=font)
    dates = sorted({p.study_date for p in points})
    for d in dates:  # x ticks: every study date
        x, _ = point_position(points, VolumePoint(segment="-", study_date=d, volume_ml=0.0),
                              width=width, height=height)
        draw.line((x, y0, x, y0 + 4), fill=_AXIS)
        draw.text((x - 34, y0 + 8), d.isoformat(), fill=_TEXT, font=font)
    names = list(dict.fromkeys(p.segment for p in points))
    for index, name in enumerate(names):
        colour = segment_colour(name, index)
        mine = sorted((p for p in points if p.segment == name), key=lambda p: p.study_date)
        xy = [point_position(points, p, width=width, height=height) for p in mine]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - DOT_RADIUS, y - DOT_RADIUS, x + DOT_RADIUS, y + DOT_RADIUS), fill=colour)
        draw.text((x0 + 8 + 150 * index, height - 18), name, fill=colour, font=font)
    return np.asarray(img, dtype=np.uint8)


def history_image(points: Sequence[VolumePoint], overlay: Sequence[Dataset]) -> Dataset:
    """The chart as one more image of the overlay series ``overlay`` (its last instance
    number + 1), with the warning banner above it.

    Raises
    ------
    ValueError
        If ``overlay`` is empty or there are fewer than two study dates.
    """
    if not overlay:
        raise ValueError("overlay: no image to add the chart to")
    if len({p.study_date for p in points}) < 2:
        raise ValueError("points: fewer than two time points")
    chart = plot_volumes(points)
    banner = np.zeros((28, chart.shape[1], 3), dtype=np.uint8)
    canvas = Image.fromarray(banner, "RGB")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, chart.shape[1], 28), fill=(200, 0, 0))
    draw.text((8, 6), OVERLAY_BANNER, fill=_TEXT, font=ImageFont.load_default(size=15))
    pixels = np.concatenate([np.asarray(canvas, dtype=np.uint8), chart], axis=0)
    first = overlay[0]
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "P"),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID), series_number=int(first.SeriesNumber),
        sop_instance_uid=new_uid(), instance_number=max(int(d.InstanceNumber) for d in overlay) + 1,
        manufacturer=NODE_MANUFACTURER, patient_id=first.get("PatientID"),
        patient_name=first.get("PatientName"), patient_birth_date=first.get("PatientBirthDate"),
        patient_sex=first.get("PatientSex") or None, accession_number=first.get("AccessionNumber"),
        study_id=first.get("StudyID"), study_date=first.get("StudyDate") or None,
        study_time=first.get("StudyTime") or None,
        referring_physician_name=first.get("ReferringPhysicianName"),
        series_description=first.get("SeriesDescription"),
        manufacturer_model_name=NODE_MODEL_NAME, software_versions=NODE_SOFTWARE_VERSION)
    # derived from today's series: the source image of the overlay's first image
    for keyword in ("BodyPartExamined", "ContributingEquipmentSequence", "SourceImageSequence"):
        if keyword in first:
            setattr(sc, keyword, first[keyword].value)
    sc["PatientOrientation"].value = None  # a chart: no patient direction (type 2, empty)
    if "BodyPartExamined" not in first:
        sc.add_new("Laterality", "CS", None)  # type 2C: present when the body part cannot tell (dciodvfy)
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageComments = f"{OVERLAY_BANNER}: volume of each segment over time"
    return sc
