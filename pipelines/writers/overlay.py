"""Overlay series: secondary-capture RGB images with burned-in contours and a warning.

For viewers that cannot display SEG. One image per source slice (per source frame of
a multi-frame image, whose frame number it references) that contains any segment: the CT in a grey window, a 1-2 pixel contour per segment in the segment's
display colour (the SEG's colour), a legend, and the banner
:data:`~pipelines.types.OVERLAY_BANNER` on a strip added above the image (so it hides
no anatomy) and a legend strip below it that grows to hold every label name and the
model (wrapped, never cut; :func:`legend_layout`). Burned In Annotation is YES.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont, features
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pipelines.codes import segment_coding
from pipelines.types import (
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    NODE_SOFTWARE_VERSION,
    OVERLAY_BANNER,
    ModelInfo,
    SegmentResult,
    Volume,
    WriterOptions,
)
from pipelines.uids import new_uid
from pipelines.writers.seg import contributing_equipment, image_reference, written_segments

LOG = logging.getLogger(__name__)

_BANNER_RGB = (200, 0, 0)
_TEXT_RGB = (255, 255, 255)
_LEGEND_RGB = (32, 32, 32)


def build_overlay(volume: Volume, segments: Sequence[SegmentResult], model: ModelInfo, *,
                  options: WriterOptions | None = None, note: str = "") -> tuple[Dataset, ...]:
    """Render the overlay series, one RGB secondary capture per source slice with a segment.

    Parameters
    ----------
    volume : Volume
        The source volume. When it was resampled, each source slice is shown on its
        nearest grid slice (image and contours from the same grid slice).
    segments : sequence of SegmentResult
        Masks on the volume's grid; empty ones are ignored.
    model : ModelInfo
        Named in the legend and in the series description.
    options : WriterOptions, optional
        Window (HU), contour width (pixels of the source matrix), minimum width and
        series number.
    note : str, optional
        A second banner line under the warning: the comparison with the prior
        (``Spleen +28 % since 2025-12-03``, :func:`pipelines.comparison.banner_line`)
        or why there is none.

    Returns
    -------
    tuple of highdicom.sc.SCImage
        In source slice order (ascending along the slice normal), Instance Number
        1, 2, ...; each references its source CT image.

    Raises
    ------
    EmptyResultError
        If every segment is empty.
    """
    opts = options or WriterOptions()
    kept = written_segments(volume, segments)
    colours = [segment_coding(s.name, n).rgb for n, s in enumerate(kept)]
    grid_index = volume.source_grid_slices()
    factor = max(1, -(-opts.min_overlay_width_px // volume.shape[2]))
    font, banner_h = _font(volume.shape[2] * factor)
    series = _OverlaySeries(
        volume=volume, model=model, opts=opts, series_uid=new_uid(),
        description=f"{opts.series_description_prefix} OVERLAY {model.name}".strip()[:64],
        equipment=contributing_equipment("AI overlay", model),
        pixel_spacing=(volume.spacing_mm[1] / factor, volume.spacing_mm[2] / factor),
        orientation=_patient_orientation(volume))
    # which segments touch which grid slice, from each segment's crop
    present = np.stack([s.present_slices() for s in kept], axis=1)  # (grid slices, segments)

    strips = _Strips(width=volume.shape[2] * factor, height=volume.shape[1] * factor,
                     banner_h=banner_h, font=font, model_text=f"{model.name} {model.version}",
                     note=note)
    out: list[Dataset] = []
    for n, src in enumerate(volume.source_images):
        k = int(grid_index[n])
        if not present[k].any():
            continue
        rgb = _grey_rgb(volume.array[k], opts, factor)
        names = []
        for s, colour, here in zip(kept, colours, present[k], strict=True):
            if not here:
                continue
            _draw_contour(rgb, s, k, factor, opts.contour_width_px * factor, colour)
            names.append((s.name, colour))
        pixels = strips.around(rgb, names)
        reference = image_reference(src, volume.source_frame(n))
        out.append(_sc_image(series, pixels, reference, 1) if not out
                   else _next_image(out[0], pixels, reference, len(out) + 1))
    LOG.info("overlay for series %s: %d image(s)", volume.series_instance_uid, len(out))
    return tuple(out)


@dataclass(frozen=True, kw_only=True, slots=True)
class _OverlaySeries:
    """What every image of one overlay series shares."""

    volume: Volume
    model: ModelInfo
    opts: WriterOptions
    series_uid: str
    description: str
    equipment: list[hd.ContributingEquipment]
    pixel_spacing: tuple[float, float]
    orientation: tuple[str, str]


def _grey_rgb(plane: np.ndarray, opts: WriterOptions, factor: int) -> np.ndarray:
    """One slice in the grey window, enlarged ``factor`` times, as RGB."""
    lo = opts.window_center - opts.window_width / 2
    hi = opts.window_center + opts.window_width / 2
    grey = np.clip((plane - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    if factor > 1:
        grey = np.repeat(np.repeat(grey, factor, axis=0), factor, axis=1)
    rgb = np.empty((*grey.shape, 3), dtype=np.uint8)
    rgb[...] = grey[:, :, None]
    return rgb


def _sc_image(series: _OverlaySeries, pixels: np.ndarray, reference: Dataset, number: int
              ) -> Dataset:
    """The secondary capture of one rendered slice, referencing its source image (frame)."""
    first, opts, model = series.volume.source_images[0], series.opts, series.model
    orientation = series.orientation
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=series.volume.study_instance_uid,
        series_instance_uid=series.series_uid, series_number=opts.overlay_series_number,
        sop_instance_uid=new_uid(), instance_number=number,
        manufacturer=NODE_MANUFACTURER, patient_id=_get(first, "PatientID"),
        patient_name=_get(first, "PatientName"),
        patient_birth_date=_get(first, "PatientBirthDate"),
        patient_sex=_get(first, "PatientSex") or None,
        accession_number=_get(first, "AccessionNumber"), study_id=_get(first, "StudyID"),
        study_date=_get(first, "StudyDate") or None, study_time=_get(first, "StudyTime") or None,
        referring_physician_name=_get(first, "ReferringPhysicianName"),
        pixel_spacing=series.pixel_spacing,
        patient_orientation=(orientation[0][0], orientation[1][0]),  # highdicom: one letter
        contributing_equipment=series.equipment, series_description=series.description,
        manufacturer_model_name=NODE_MODEL_NAME, software_versions=NODE_SOFTWARE_VERSION)
    if first.get("BodyPartExamined"):
        sc.BodyPartExamined = first.BodyPartExamined
    else:  # type 2C: dciodvfy wants it present when it cannot tell the body part
        sc.Laterality = ""
    sc.PatientOrientation = list(orientation)  # oblique: up to 3 letters (PS3.3 C.7.6.1.1.1)
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.DerivationDescription = f"CT W{opts.window_width:g}/L{opts.window_center:g} with AI " \
                               f"contours ({model.name} {model.version})"[:1024]
    sc.SourceImageSequence = DicomSequence([reference])
    sc.ImageComments = OVERLAY_BANNER
    return sc


def _next_image(first: Dataset, pixels: np.ndarray, reference: Dataset, number: int) -> Dataset:
    """Another image of ``first``'s series: a copy of it with its own pixels, SOP Instance
    UID, Instance Number and source image (its creation and content times are the first
    image's: the series is made in one call).

    The images of one overlay series differ only in these; highdicom's ``SCImage``
    validates and sets every attribute anew for each image (4-5 ms, a third of the
    overlay's time with 300 images). The copy is a deep one: no element is shared
    between two images.
    """
    sc = copy.deepcopy(first)  # its PixelData (bytes) is shared until replaced below
    uid = new_uid()
    old_uid = str(first.SOPInstanceUID)
    sc.SOPInstanceUID = uid
    sc.file_meta.MediaStorageSOPInstanceUID = uid
    if "FileMetaInformationGroupLength" in first.file_meta:  # UIs are padded to even length
        sc.file_meta.FileMetaInformationGroupLength = \
            int(first.file_meta.FileMetaInformationGroupLength) \
            + (len(uid) + len(uid) % 2) - (len(old_uid) + len(old_uid) % 2)
    sc.InstanceNumber = number
    sc.Rows, sc.Columns = pixels.shape[:2]
    sc["PixelData"] = DataElement(0x7FE00010, first["PixelData"].VR, hd.frame.encode_frame(
        pixels, transfer_syntax_uid=first.file_meta.TransferSyntaxUID,
        bits_allocated=int(first.BitsAllocated), bits_stored=int(first.BitsStored),
        photometric_interpretation=str(first.PhotometricInterpretation),
        pixel_representation=int(first.PixelRepresentation),
        planar_configuration=int(first.PlanarConfiguration)))
    sc.SourceImageSequence = DicomSequence([reference])
    return sc


def _draw_contour(rgb: np.ndarray, segment: SegmentResult, k: int, factor: int, width: int,
                  colour: tuple[int, int, int]) -> None:
    """Paint the ``width``-pixel inner contour of ``segment`` on grid slice ``k`` into ``rgb``.

    The contour is the segment's pixels that ``width`` erosions by the 4-neighbour
    cross (outside the slice counting as background) remove. Works on the segment's
    bounding box only, padded by one pixel, each erosion an AND of the four shifted
    copies: with 104 segments a whole-slice ``ndimage.binary_erosion`` per segment and
    slice was most of the overlay's time, and a bounding-box one still a third.
    """
    box = segment.box
    m = segment.crop[k - box[0].start]
    if factor > 1:
        m = np.repeat(np.repeat(m, factor, axis=0), factor, axis=1)
    inner = np.zeros((m.shape[0] + 2, m.shape[1] + 2), dtype=bool)  # a border of background
    inner[1:-1, 1:-1] = m
    for _ in range(width):
        inner[1:-1, 1:-1] = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] \
            & inner[1:-1, :-2] & inner[1:-1, 2:]
    edge = m & ~inner[1:-1, 1:-1]
    r0, c0 = box[1].start * factor, box[2].start * factor
    rgb[r0:r0 + m.shape[0], c0:c0 + m.shape[1]][edge] = colour


def _get(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return None if value is None else str(value)


def _font(width: int) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, int]:
    """Pillow's embedded font (no file, no download) sized so the banner fits ``width``."""
    if not features.check("freetype2"):
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default_imagefont()
        return font, 16
    size = max(10, min(28, width // 22))
    while True:
        font = ImageFont.load_default(size=size)
        left, _, right, _ = font.getbbox(OVERLAY_BANNER)
        if right - left <= width - 8 or size <= 8:
            return font, size + 10
        size -= 1


@dataclass(frozen=True, kw_only=True, slots=True)
class LegendText:
    """One piece of legend text and where it is drawn (top-left of its box, pixels)."""

    text: str
    colour: tuple[int, int, int]
    x: int
    y: int


_GAP = 12  # pixels between legend entries on one line
_MIN_LEGEND_PX = 11  # smallest legend type when many labels would make the strip tall
_MARGIN = 4


def legend_layout(names: Sequence[tuple[str, tuple[int, int, int]]], model_text: str,
                  font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int
                  ) -> tuple[tuple[LegendText, ...], int]:
    """Lay out the legend so that every character fits ``width``: nothing is cut.

    Label names flow left to right in their colours and wrap to the next line when the
    line is full (104 labels take a few lines, not 104); a name or the model text
    wider than the strip wraps at spaces, and a word wider than the strip at characters.
    The model text starts on its own line.

    Returns
    -------
    tuple
        The pieces of text with their positions, and the strip's height in pixels.
    """
    _, top, _, bottom = font.getbbox("Ag")
    line_h = int(bottom - top) + 4
    room = max(1, width - 2 * _MARGIN)
    out: list[LegendText] = []
    x, y = _MARGIN, _MARGIN
    for text, colour in names:
        pieces = _wrap(text, font, room)
        w = _text_width(font, pieces[0])
        if len(pieces) == 1 and x > _MARGIN and x + w > _MARGIN + room:
            x, y = _MARGIN, y + line_h  # no room left on this line: next line
        elif len(pieces) > 1 and x > _MARGIN:
            x, y = _MARGIN, y + line_h
        for i, piece in enumerate(pieces):
            if i:
                x, y = _MARGIN, y + line_h
            out.append(LegendText(text=piece, colour=colour, x=x, y=y))
        x += _text_width(font, pieces[-1]) + _GAP
    if out:
        y += line_h
    for piece in _wrap(model_text, font, room):
        out.append(LegendText(text=piece, colour=_TEXT_RGB, x=_MARGIN, y=y))
        y += line_h
    return tuple(out), y + _MARGIN


def _text_width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - min(left, 0))


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, room: int) -> list[str]:
    """``text`` in lines no wider than ``room`` pixels: at spaces, else at characters."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if _text_width(font, candidate) <= room:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while _text_width(font, word) > room and len(word) > 1:  # a word wider than the strip
            cut = len(word) - 1
            while cut > 1 and _text_width(font, word[:cut]) > room:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(current)
    return lines


def _decorate(rgb: np.ndarray, banner_h: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
              names: list[tuple[str, tuple[int, int, int]]], model_text: str,
              note: str = "") -> np.ndarray:
    """Add the banner strip above the image and a legend strip below it.

    Neither strip covers the image: the banner is the warning, the legend lists the
    label names in their contour colours and the model (:func:`legend_layout`: it
    grows downwards as needed, never cut; when it would be taller than half the image,
    as with 104 labels, its type shrinks down to 11 px first).
    """
    h, w = rgb.shape[:2]
    strips = _Strips(width=w, height=h, banner_h=banner_h, font=font, model_text=model_text,
                     note=note)
    return strips.around(rgb, names)


class _Strips:
    """The banner and legend strips of one overlay series, each drawn once.

    Every image of a series has the same banner, and consecutive slices mostly the
    same labels: the banner is drawn once and each legend once per set of labels
    (text rendering was a third of the overlay's time with 104 labels).
    """

    def __init__(self, *, width: int, height: int, banner_h: int,
                 font: ImageFont.ImageFont | ImageFont.FreeTypeFont, model_text: str,
                 note: str = "") -> None:
        self.width, self.height, self.font, self.model_text = width, height, font, model_text
        left, top, right, bottom = font.getbbox(OVERLAY_BANNER)
        # issue 26: the comparison with the prior (or why there is none), wrapped, under
        # the warning
        notes = _wrap(note, font, max(1, width - 8)) if note else []
        line_h = int(bottom - top) + 6
        canvas = Image.new("RGB", (width, banner_h + len(notes) * line_h), _BANNER_RGB)
        draw = ImageDraw.Draw(canvas)
        draw.text(((width - (right - left)) // 2 - left, (banner_h - (bottom - top)) // 2 - top),
                  OVERLAY_BANNER, fill=_TEXT_RGB, font=font)
        for i, line in enumerate(notes):
            draw.text((4, banner_h + i * line_h - top), line, fill=_TEXT_RGB, font=font)
        self.banner = np.asarray(canvas, dtype=np.uint8)
        self.legends: dict[tuple[tuple[str, tuple[int, int, int]], ...], np.ndarray] = {}

    def around(self, rgb: np.ndarray, names: Sequence[tuple[str, tuple[int, int, int]]]
               ) -> np.ndarray:
        """``rgb`` (``height`` x ``width`` x 3) with the banner above and the legend below."""
        key = tuple(names)
        legend = self.legends.get(key)
        if legend is None:
            legend = self.legends[key] = self._legend(key)
        return np.concatenate([self.banner, rgb, legend], axis=0)

    def _legend(self, names: Sequence[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
        legend_font = self.font
        pieces, legend_h = legend_layout(names, self.model_text, legend_font, self.width)
        size = int(getattr(self.font, "size", 0))
        while legend_h > self.height // 2 and size > _MIN_LEGEND_PX:  # many labels: smaller type
            size -= 1
            legend_font = ImageFont.load_default(size=size)
            pieces, legend_h = legend_layout(names, self.model_text, legend_font, self.width)
        canvas = Image.new("RGB", (self.width, legend_h), _LEGEND_RGB)
        draw = ImageDraw.Draw(canvas)
        _, glyph_top, _, _ = legend_font.getbbox("Ag")
        for piece in pieces:
            draw.text((piece.x, piece.y - glyph_top), piece.text, fill=piece.colour,
                      font=legend_font)
        return np.asarray(canvas, dtype=np.uint8)


def _patient_orientation(volume: Volume) -> tuple[str, str]:
    """Patient Orientation (0020,0020) letters of the image row and column directions."""
    row_dir = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
    col_dir = volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1])
    return _letters(row_dir), _letters(col_dir)


def _letters(v: np.ndarray) -> str:
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(v))
    text = "".join(names[a][0 if v[a] > 0 else 1] for a in order if abs(v[a]) > 0.1)
    return text or "L"
