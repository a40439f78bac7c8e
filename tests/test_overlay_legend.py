"""The overlay's legend fits its strip for long model names and for 104 labels: every
character drawn inside the image, wrapped or flowed onto more lines, never cut."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.codes import segment_coding
from pipelines.writers.overlay import _decorate, _font, legend_layout

# a whole-body model's labels: 104 names, some long
NAMES = [f"{part}_{side}" for part in (
    "kidney", "adrenal_gland", "lung_upper_lobe", "lung_lower_lobe", "rib_1", "rib_2", "rib_3",
    "rib_4", "rib_5", "rib_6", "rib_7", "rib_8", "rib_9", "rib_10", "rib_11", "rib_12",
    "humerus", "scapula", "clavicula", "femur", "hip", "gluteus_maximus", "gluteus_medius",
    "gluteus_minimus", "autochthon", "iliopsoas", "common_carotid_artery", "subclavian_artery",
    "brachiocephalic_vein", "iliac_artery", "iliac_vena") for side in ("left", "right")]
NAMES += ["spleen", "liver", "stomach", "pancreas", "gallbladder", "esophagus", "trachea",
          "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
          "sacrum", "heart", "aorta", "pulmonary_vein", "inferior_vena_cava",
          "portal_vein_and_splenic_vein", "spinal_cord", "skull", "brain", "sternum",
          "costal_cartilages", "lung_middle_lobe_right", "atrial_appendage_left",
          "superior_vena_cava", "vertebrae_C1", "vertebrae_C2", "vertebrae_C3", "vertebrae_C4",
          "vertebrae_C5", "vertebrae_C6", "vertebrae_C7", "vertebrae_T1", "vertebrae_T2",
          "vertebrae_T3", "vertebrae_T4", "vertebrae_T5", "vertebrae_T6", "vertebrae_T7",
          "vertebrae_T8"][:104 - len(NAMES)]
LONG_MODEL = ("Spleen CT demo (synthetic phantoms) spleen-ct-demo-2026.11.30-a1b2c3d4e5f6 "
              "TotalSegmentatorWholeBodyBundleWithAVeryLongNameWithoutSpaces v2.0.1")


def _ink_box(pieces, font, canvas_w: int, canvas_h: int) -> tuple[int, int, int, int]:
    """Bounding box of the ink of ``pieces`` drawn on a canvas much larger than the strip."""
    img = Image.new("L", (canvas_w * 3, canvas_h * 3), 0)
    draw = ImageDraw.Draw(img)
    _, top, _, _ = font.getbbox("Ag")
    for p in pieces:
        draw.text((p.x, p.y - top), p.text, fill=255, font=font)
    ys, xs = np.nonzero(np.asarray(img))
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_there_are_104_labels() -> None:
    assert len(NAMES) == len(set(NAMES)) == 104


@pytest.mark.parametrize("width", [256, 512, 1024])
def test_104_labels_and_a_long_model_name_fit_the_legend_strip(width: int) -> None:
    font, _ = _font(width)
    names = [(n, segment_coding(n, i).rgb) for i, n in enumerate(NAMES)]
    pieces, height = legend_layout(names, LONG_MODEL, font, width)
    x0, y0, x1, y1 = _ink_box(pieces, font, width, height)
    assert x0 >= 0 and y0 >= 0 and x1 < width and y1 < height  # nothing outside: nothing cut
    # every name and every character of the model text is drawn, in order
    drawn = [p.text for p in pieces]
    joined = "".join(drawn).replace(" ", "")
    assert joined == ("".join(NAMES) + LONG_MODEL).replace(" ", "")
    # names flow several to a line: 104 labels do not take 104 lines
    lines = {p.y for p in pieces}
    assert len(lines) < 104 / 2
    # no two pieces overlap
    boxes = sorted((p.y, p.x, p.x + font.getbbox(p.text)[2]) for p in pieces)
    for (ya, _, xa1), (yb, xb0, _) in zip(boxes, boxes[1:]):
        assert yb > ya or xb0 >= xa1


def test_rendered_overlay_holds_the_whole_legend_in_its_pixels() -> None:
    width = 512
    font, banner_h = _font(width)
    names = [(n, segment_coding(n, i).rgb) for i, n in enumerate(NAMES)]
    rgb = np.zeros((width, width, 3), dtype=np.uint8)
    px = _decorate(rgb, banner_h, font, names, LONG_MODEL)
    _, full_height = legend_layout(names, LONG_MODEL, font, width)
    legend = px[banner_h + width:]
    # 104 labels: smaller type rather than a strip taller than the image, still all there
    assert legend.shape[0] < full_height / 2
    for name, colour in names:  # each label's colour shows in the legend strip
        assert (legend == colour).all(axis=2).any(), name
    white = (legend == (255, 255, 255)).all(axis=2)
    assert white[-40:].any()  # the model text's last line is drawn, inside the image
    assert not white[:, -2:].any() and not white[-2:].any()  # and does not touch the edges


@pytest.mark.parametrize("size", [11, 14])
def test_small_legend_type_still_fits(size: int) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default(size=size)
    names = [(n, segment_coding(n, i).rgb) for i, n in enumerate(NAMES)]
    pieces, height = legend_layout(names, LONG_MODEL, font, 512)
    x0, y0, x1, y1 = _ink_box(pieces, font, 512, height)
    assert x0 >= 0 and y0 >= 0 and x1 < 512 and y1 < height
