"""Overlay images (sagittal overview + one axial image per vertebra) rendered from numpy arrays.

Pure: works on the canonical volume (``i -> L, j -> P, k -> S``, see ``dicomnode.imaging.volume``), the ROI
masks and the result; returns RGB arrays. No DICOM here (``report.sc`` wraps them), no measurement logic
(nothing is recomputed: every number printed comes from the ``AnalysisResult``).

Fonts: Pillow's built-in scalable default font (``ImageFont.load_default(size=...)``, Pillow >= 10.1), so no
font file is bundled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from dicomnode.domain import AnalysisResult, AnalysisStatus, BoneCategory, VertebraResult
from dicomnode.imaging.volume import Volume

U8 = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
Colour = tuple[int, int, int]

DEFAULT_DISCLAIMER = "NOT FOR DIAGNOSTIC USE - research software, results need review by a physician"

#: Display window for bone (HU): trabecular bone mid-grey, cortex white, soft tissue dark.
WINDOW_CENTRE_HU = 300.0
WINDOW_WIDTH_HU = 1500.0

BG: Colour = (16, 20, 26)
PANEL: Colour = (26, 32, 40)
TEXT: Colour = (232, 236, 240)
MUTED: Colour = (150, 158, 168)
ACCENT: Colour = (0, 200, 230)  # measured ROI
UNCERTAIN: Colour = (255, 184, 0)  # level label uncertain
EXCLUDED_C: Colour = (120, 124, 130)  # excluded from the summary
WARN: Colour = (255, 90, 80)
CATEGORY_COLOURS: dict[BoneCategory, Colour] = {
    BoneCategory.NORMAL: (80, 200, 120),
    BoneCategory.OSTEOPENIA: (255, 184, 0),
    BoneCategory.OSTEOPOROSIS: (255, 90, 80),
}


#: Empty bands above and below every overlay, as fractions of the drawn height: viewers print their own text
#: in the image corners (OHIF: date and series description top left, the cine bar top centre, window and
#: image number at the bottom), which must not hide the burned-in header and disclaimer. The bands scale with
#: the image because a viewer scales the whole image to its viewport.
VIEWER_MARGIN_TOP = 0.13
VIEWER_MARGIN_BOTTOM = 0.07


def viewer_margins(height: int) -> tuple[int, int]:
    """(top, bottom) empty rows added around a drawn canvas of ``height`` rows."""
    return max(64, round(VIEWER_MARGIN_TOP * height)), max(48, round(VIEWER_MARGIN_BOTTOM * height))


def _with_viewer_margin(canvas: Image.Image) -> Image.Image:
    top, bottom = viewer_margins(canvas.height)
    framed = Image.new("RGB", (canvas.width, canvas.height + top + bottom), BG)
    framed.paste(canvas, (0, top))
    return framed


@dataclass(frozen=True)
class RenderedImage:
    """One overlay image ready to be wrapped as a secondary capture or saved as PNG."""

    name: str  # "overview" or the level ("L1")
    rgb: U8  # (rows, columns, 3)
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns) of the image area
    patient_orientation: tuple[str, str]  # direction of increasing column index, of increasing row index
    description: str
    #: The source image this was rendered from (mid-vertebral slice), when known.
    source_sop_instance_uid: str | None = None
    source_frame_number: int | None = None
    #: Empty rows above and below the drawing (``viewer_margins``), kept free for the viewer's own text.
    margin_px: tuple[int, int] = (0, 0)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _window(hu: npt.NDArray[Any]) -> U8:
    lo = WINDOW_CENTRE_HU - WINDOW_WIDTH_HU / 2
    scaled = (np.asarray(hu, dtype=np.float32) - lo) * (255.0 / WINDOW_WIDTH_HU)
    out: U8 = np.clip(scaled, 0, 255).astype(np.uint8)
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def level_colour(v: VertebraResult) -> Colour:
    if v.excluded:
        return EXCLUDED_C
    if v.level_uncertain:
        return UNCERTAIN
    return ACCENT


def level_label(v: VertebraResult) -> str:
    return v.level + ("?" if v.level_uncertain else "")


def _resize_mask(mask: BoolArray, size: tuple[int, int]) -> BoolArray:
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def _paint_roi(rgb: npt.NDArray[np.float32], mask: BoolArray, colour: Colour, fill_alpha: float) -> None:
    """Blend a translucent fill and a solid 2-px outline of ``mask`` into ``rgb`` (float, in place)."""
    if not mask.any():
        return
    col = np.asarray(colour, dtype=np.float32)
    rgb[mask] = rgb[mask] * (1 - fill_alpha) + col * fill_alpha
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    rgb[edge] = col


def _centroid_index(volume: Volume, v: VertebraResult) -> npt.NDArray[np.float64]:
    return volume.lps_to_index(np.asarray(v.roi_centroid_lps_mm, dtype=np.float64))


def _text_w(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return int(box[2] - box[0])


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: Colour, font: Any) -> None:
    """Draw text; a '³' (absent from the built-in font) is drawn as a raised small '3'."""
    if "³" not in text:
        draw.text(xy, text, fill=fill, font=font)
        return
    x, y = xy
    size = int(getattr(font, "size", 16))
    small = _font(max(int(size * 0.62), 8))
    parts = text.split("³")
    for n, part in enumerate(parts):
        if part:
            draw.text((x, y), part, fill=fill, font=font)
            x += _text_w(draw, part, font)
        if n < len(parts) - 1:
            draw.text((x + 1, y - size * 0.12), "3", fill=fill, font=small)
            x += _text_w(draw, "3", small) + 2


def _split_long_word(draw: ImageDraw.ImageDraw, word: str, font: Any, max_w: int) -> list[str]:
    """A single word wider than the line, cut into pieces that fit (nothing is ever dropped)."""
    pieces: list[str] = []
    cur = ""
    for ch in word:
        if cur and _text_w(draw, cur + ch, font) > max_w:
            pieces.append(cur)
            cur = ch
        else:
            cur += ch
    if cur:
        pieces.append(cur)
    return pieces


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font: Any, max_w: int) -> list[str]:
    """Wrap ``text`` into lines no wider than ``max_w`` pixels in ``font``; never truncates.

    Breaks between words (a word wider than a whole line is split), keeps every character, and keeps
    the text's own line breaks.
    """
    lines: list[str] = []
    for para in text.split("\n"):
        cur = ""
        for word in para.split():
            trial = f"{cur} {word}" if cur else word
            if _text_w(draw, trial, font) <= max_w:
                cur = trial
                continue
            if cur:
                lines.append(cur)
            if _text_w(draw, word, font) <= max_w:
                cur = word
            else:
                *full, cur = _split_long_word(draw, word, font, max_w)
                lines.extend(full)
        lines.append(cur)
    return [ln for ln in lines if ln] or [""]


def fmt_ratio(value: float | None) -> str:
    """A height ratio with three decimals, truncated rather than rounded, so that it reads true against
    the QC thresholds (0.796 prints as 0.796, not 0.80, next to a flag saying the ratio is below 0.8; and
    0.7996 prints as 0.799, never as 0.800)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    # the tiny epsilon keeps binary fractions such as 0.29 (0.28999...) from losing their last digit
    truncated = math.floor(abs(value) * 1000 + 1e-9) / 1000
    return f"{math.copysign(truncated, value):.3f}"


def _summary_line(result: AnalysisResult) -> tuple[str, Colour]:
    s = result.summary
    if s is None or s.vbmd_l1_l2_mg_cm3 is None:
        if result.status is not AnalysisStatus.OK:
            return f"No result: {result.reason or result.status.value}", WARN
        return "vBMD summary not available", MUTED
    levels = (
        "-".join((s.levels_used[0], s.levels_used[-1])) if len(s.levels_used) > 1 else "".join(s.levels_used)
    )
    cat = s.category.value.upper() if s.category is not None else "no category"
    colour = CATEGORY_COLOURS.get(s.category, TEXT) if s.category is not None else TEXT
    return f"{levels} mean vBMD {_fmt(s.vbmd_l1_l2_mg_cm3)} mg/cm³  ·  {cat}", colour


def _footer_lines(result: AnalysisResult) -> list[str]:
    s = result.summary
    lines: list[str] = []
    if s is not None:
        cal = s.calibration
        kvp = f"{cal.kvp:g} kVp" if cal.kvp is not None else "kVp n/a"
        lines.append(
            f"Levels used: {', '.join(s.levels_used) or 'none'}   ·   "
            f"contrast: {s.contrast_phase.value}   ·   {kvp}   ·   calibration: {cal.method}"
        )
    lines.append(f"{result.algorithm_name} {result.algorithm_version}   ·   vBMD in mg/cm³ (CHA-equivalent)")
    return lines


def _placed(v: VertebraResult) -> bool:
    """Whether the vertebra has an ROI centroid to draw it at (an empty ROI has none)."""
    return bool(np.all(np.isfinite(v.roi_centroid_lps_mm)))


def not_shown_lines(result: AnalysisResult) -> list[str]:
    """One line per vertebra found and named but with no ROI to place on the overview (nothing of it was left
    to measure): it has no label on the image, so the footer lists it with its reason, and the reader sees
    every level the analysis found."""
    return [
        f"{v.level}{'?' if v.level_uncertain else ''} excluded, not shown: {v.exclusion_reason or 'no ROI'}"
        for v in result.vertebrae
        if not _placed(v)
    ]


def _draw_legend(draw: ImageDraw.ImageDraw, x: int, y: int, font: Any) -> None:
    items = (("measured", ACCENT), ("level uncertain (?)", UNCERTAIN), ("excluded", EXCLUDED_C))
    for label, colour in items:
        draw.rectangle((x, y + 3, x + 14, y + 17), fill=colour)
        _text(draw, (x + 22, y), label, TEXT, font)
        x += 22 + _text_w(draw, label, font) + 26


#: Font sizes (px). The SC images are shown scaled to fit a viewer tile (often 500-700 px high); the small
#: size stays >= 13 px there.
SIZE_TITLE, SIZE_BIG, SIZE_LABEL, SIZE_TEXT, SIZE_SMALL = 20, 26, 21, 19, 17
LINE_SMALL, LINE_TEXT = 22, 25  # line heights of small and normal text


def _measure_draw() -> ImageDraw.ImageDraw:
    """A drawing context for measuring text before the canvas size is known."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def _projection(mask: BoolArray, box: tuple[slice, slice, slice] | None = None) -> BoolArray:
    """Left-right projection of a canonical mask ``[k, j, i]`` -> ``[k, j]`` (the sagittal view).

    ``box``: the mask is all False outside it (only the box is read)."""
    if box is None:
        return np.asarray(mask.any(axis=2), dtype=bool)
    out = np.zeros(mask.shape[:2], dtype=bool)
    out[box[0], box[1]] = mask[box].any(axis=2)
    return out


def _mask_box(masks: Mapping[str, BoolArray], level: str) -> tuple[slice, slice, slice] | None:
    """The box outside which ``masks[level]`` is all False, when the mapping knows it (a ``box(level)``
    method, as ``dicomnode.bmd.LabelMasks`` has); None otherwise."""
    box_of = getattr(masks, "box", None)
    if not callable(box_of):
        return None
    box = box_of(level)
    if isinstance(box, tuple) and len(box) == 3 and all(isinstance(b, slice) for b in box):
        return (box[0], box[1], box[2])
    return None


def _common_flags(verts: Sequence[VertebraResult]) -> tuple[str, ...]:
    """QC flags carried by every vertebra (e.g. level naming uncertain): said once, not on each label."""
    if len(verts) < 2:
        return ()
    first = verts[0].qc
    return tuple(q for q in first if all(q in v.qc for v in verts[1:]))


def _label_details(v: VertebraResult, common: Sequence[str]) -> list[tuple[str, Colour]]:
    """The items under a vertebra's label in the overview side panel (each starts a line), with colours."""
    flags = [q for q in v.qc if q not in common]
    if v.excluded:
        reason = v.exclusion_reason or "excluded from the summary"
        return [(reason, EXCLUDED_C), *((q, EXCLUDED_C) for q in flags if q not in reason)]
    return [(f"{_fmt(v.trabecular_hu_mean, 0)} HU mean", MUTED), *((q, UNCERTAIN) for q in flags)]


def render_overview(
    result: AnalysisResult,
    volume: Volume,
    roi_masks: Mapping[str, BoolArray] | None,
    *,
    disclaimer: str = DEFAULT_DISCLAIMER,
    target_px: int = 900,
) -> RenderedImage:
    """Sagittal overview through the spine with every vertebra labelled (level, vBMD, HU).

    Parameters
    ----------
    result
        The analysis result; only its numbers are printed.
    volume
        The canonical volume (``i -> L, j -> P, k -> S``) the ROIs were measured on.
    roi_masks
        Level -> boolean mask shaped like ``volume.data`` (None: ROIs drawn as markers at their centroid).
    disclaimer
        Printed in the footer.
    target_px
        Longest side of the image area in pixels.
    """
    projections: dict[str, BoolArray] | None = None
    if roi_masks is not None:
        projections = {}
        for v in result.vertebrae:
            mask = roi_masks.get(v.level)
            if mask is not None and mask.shape == volume.data.shape:
                projections[v.level] = _projection(mask, _mask_box(roi_masks, v.level))
    return _render_overview(result, volume, projections, disclaimer=disclaimer, target_px=target_px)


def _render_overview(
    result: AnalysisResult,
    volume: Volume,
    projections: Mapping[str, BoolArray] | None,
    *,
    disclaimer: str,
    target_px: int,
) -> RenderedImage:
    """:func:`render_overview` on the masks' left-right projections (``[k, j]`` each)."""
    data = volume.data
    nk, nj, ni = data.shape
    _si, sj, sk = volume.spacing
    verts = [v for v in result.vertebrae if _placed(v)]
    i_mid = round(float(np.median([_centroid_index(volume, v)[0] for v in verts]))) if verts else ni // 2
    i_mid = min(max(i_mid, 0), ni - 1)
    # a 3-voxel slab average: less noise, same anatomy
    lo, hi = max(i_mid - 1, 0), min(i_mid + 2, ni)
    sag = data[::-1, :, lo:hi].mean(axis=2)  # rows: superior -> inferior, columns: anterior -> posterior

    # crop to the body (air removed) with a margin, so the spine is large enough to read
    body = sag > -400
    rows = np.flatnonzero(body.any(axis=1))
    cols = np.flatnonzero(body.any(axis=0))
    margin_j, margin_k = int(10 / sj) + 1, int(10 / sk) + 1
    r0, r1 = (int(rows[0]) - margin_k, int(rows[-1]) + margin_k + 1) if rows.size else (0, nk)
    c0, c1 = (int(cols[0]) - margin_j, int(cols[-1]) + margin_j + 1) if cols.size else (0, nj)
    r0, r1, c0, c1 = max(r0, 0), min(r1, nk), max(c0, 0), min(c1, nj)
    crop = sag[r0:r1, c0:c1]
    h_mm, w_mm = crop.shape[0] * sk, crop.shape[1] * sj
    ppm = target_px / max(h_mm, w_mm)
    if h_mm * ppm < 600:  # a short scan range: keep the image tall enough for the labels
        ppm = min(600 / h_mm, 1400 / w_mm)
    disp_w, disp_h = max(round(w_mm * ppm), 1), max(round(h_mm * ppm), 1)
    grey = Image.fromarray(_window(crop)).resize((disp_w, disp_h), Image.Resampling.BICUBIC)
    rgb = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)

    def to_disp(idx: npt.NDArray[np.float64]) -> tuple[float, float]:
        x = (idx[1] - c0 + 0.5) * sj * ppm
        y = ((nk - 1 - idx[2]) - r0 + 0.5) * sk * ppm
        return float(x), float(y)

    anchors: list[tuple[VertebraResult, float, float]] = []  # vertebra, label y, leader start x
    for v in verts:
        colour = level_colour(v)
        proj = projections.get(v.level) if projections is not None else None
        cx, cy = to_disp(_centroid_index(volume, v))
        x_right = cx
        if proj is not None and proj.shape == (nk, nj):
            part = proj[::-1, :][r0:r1, c0:c1]
            if part.any():
                dm = _resize_mask(part, (disp_w, disp_h))
                _paint_roi(rgb, dm, colour, 0.30 if not v.excluded else 0.15)
                ys, xs = np.nonzero(dm)
                if xs.size:
                    x_right = float(xs.max())
                    cy = float(ys.mean())
        anchors.append((v, cy, x_right))

    pad, panel_w = 16, 430
    width = disp_w + panel_w
    f_title, f_big, f_label, f_small = (
        _font(SIZE_TITLE),
        _font(SIZE_BIG),
        _font(SIZE_LABEL),
        _font(SIZE_SMALL),
    )
    md = _measure_draw()

    # side panel blocks: level + value on one line, then the details wrapped to the panel width
    tx = disp_w + 36
    text_w = width - tx - pad
    common = _common_flags(verts)
    ordered = sorted(anchors, key=lambda a: a[1])
    blocks: list[list[tuple[str, Colour]]] = []  # per vertebra: wrapped detail lines with their colour
    for v, _cy, _x in ordered:
        blocks.append(
            [
                (ln, col)
                for item, col in _label_details(v, common)
                for ln in wrap_text(md, item, f_small, text_w)
            ]
        )
    first_line_h, gap = 28, 16
    heights = [first_line_h + LINE_SMALL * len(lines) for lines in blocks]

    # header: title + summary (wrapped when long, e.g. a failure reason)
    summary, scol = _summary_line(result)
    summary_lines = wrap_text(md, summary, f_big, width - 2 * pad)
    header_h = 44 + 32 * len(summary_lines) + 2
    # footer: legend, details, common QC flags, disclaimer, all wrapped to the width
    foot: list[tuple[str, Colour, Any, int]] = []  # (text, colour, font, line height)
    for line in _footer_lines(result):
        foot.extend((ln, MUTED, f_small, LINE_SMALL) for ln in wrap_text(md, line, f_small, width - 2 * pad))
    for line in not_shown_lines(result):
        foot.extend(
            (ln, EXCLUDED_C, f_small, LINE_SMALL) for ln in wrap_text(md, line, f_small, width - 2 * pad)
        )
    if common:
        note = "All levels: " + "  ·  ".join(common)
        foot.extend(
            (ln, UNCERTAIN, f_small, LINE_SMALL) for ln in wrap_text(md, note, f_small, width - 2 * pad)
        )
    f_disc = _font(SIZE_TEXT)  # the disclaimer stays readable when the image is shown small
    foot.extend((ln, WARN, f_disc, LINE_TEXT) for ln in wrap_text(md, disclaimer, f_disc, width - 2 * pad))
    footer_h = 10 + 30 + sum(f[3] for f in foot) + 12

    # the panel may need more height than the image when many labels wrap: the canvas grows, never clips
    needed = sum(heights) + gap * max(len(heights) - 1, 0) + 16
    panel_h = max(disp_h, needed)
    height = header_h + panel_h + footer_h
    canvas = Image.new("RGB", (width, height), BG)
    canvas.paste(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), (0, header_h))
    draw = ImageDraw.Draw(canvas)

    draw.rectangle((0, 0, width, header_h), fill=PANEL)
    _text(draw, (pad, 8), "Trabecular bone density  ·  sagittal overview", MUTED, f_title)
    for n, line in enumerate(summary_lines):
        _text(draw, (pad, 36 + 32 * n), line, scol, f_big)

    # place the blocks as close as possible to their ROI, in order, without overlap, inside the panel
    draw.rectangle((disp_w, header_h, width, header_h + panel_h), fill=PANEL)
    top_limit, bottom_limit = header_h + 8, header_h + panel_h - 8
    tops: list[float] = []
    for n, (_v, cy, _x) in enumerate(ordered):
        want = header_h + cy - first_line_h / 2
        tops.append(max(want, top_limit, (tops[-1] + heights[n - 1] + gap) if n else top_limit))
    for n in range(len(tops) - 1, -1, -1):  # push back up from the bottom where the stack overflows
        limit = bottom_limit if n == len(tops) - 1 else tops[n + 1] - gap
        tops[n] = min(tops[n], limit - heights[n])
    for (v, cy, x_right), top, lines in zip(ordered, tops, blocks, strict=True):
        colour = level_colour(v)
        ty = top + first_line_h / 2
        draw.line(
            [(x_right + 4, header_h + cy), (disp_w, header_h + cy), (disp_w + 24, ty)], fill=colour, width=2
        )
        draw.ellipse((disp_w + 20, ty - 4, disp_w + 28, ty + 4), fill=colour)
        _text(draw, (tx, top), level_label(v), colour, f_label)
        nx = tx + 58
        if v.excluded:
            _text(draw, (nx, top), "excluded", EXCLUDED_C, f_label)
        else:
            vb = f"{_fmt(v.vbmd_mg_cm3)} mg/cm³" if v.vbmd_mg_cm3 is not None else "vBMD n/a"
            _text(draw, (nx, top), vb, TEXT, f_label)
        for n, (line, dcol) in enumerate(lines):
            _text(draw, (tx, top + first_line_h + LINE_SMALL * n), line, dcol, f_small)

    # orientation letters and a 50 mm scale bar on the image
    _text(draw, (10, header_h + 8), "A", TEXT, f_title)
    _text(draw, (disp_w - 24, header_h + 8), "P", TEXT, f_title)
    _text(draw, (disp_w // 2 - 6, header_h + 6), "S", TEXT, f_title)
    _scale_bar(draw, 14, header_h + disp_h - 20, ppm, f_small)

    fy = header_h + panel_h
    draw.rectangle((0, fy, width, height), fill=PANEL)
    _draw_legend(draw, pad, fy + 10, f_small)
    y = fy + 40
    for line, colour, font, line_h in foot:
        _text(draw, (pad, y), line, colour, font)
        y += line_h

    return RenderedImage(
        name="overview",
        rgb=np.asarray(_with_viewer_margin(canvas), dtype=np.uint8),
        pixel_spacing_mm=(1 / ppm, 1 / ppm),
        patient_orientation=("P", "F"),
        margin_px=viewer_margins(canvas.height),
        description="sagittal overview",
        source_sop_instance_uid=None,
    )


def _scale_bar(draw: ImageDraw.ImageDraw, x: int, y: int, ppm: float, font: Any) -> None:
    length = round(50 * ppm)
    draw.line([(x, y), (x + length, y)], fill=TEXT, width=3)
    draw.line([(x, y - 6), (x, y + 2)], fill=TEXT, width=2)
    draw.line([(x + length, y - 6), (x + length, y + 2)], fill=TEXT, width=2)
    _text(draw, (x + length + 8, y - 10), "50 mm", TEXT, font)


def _axial_k(volume: Volume, v: VertebraResult) -> int:
    """The canonical slice index shown for ``v`` (its mid-vertebral slice)."""
    nk = int(volume.data.shape[0])
    if v.mid_slice_index is not None:
        k = int(v.mid_slice_index)
    else:
        k = round(float(_centroid_index(volume, v)[2]))
    return min(max(k, 0), nk - 1)


def render_axial(
    result: AnalysisResult,
    volume: Volume,
    v: VertebraResult,
    roi_mask: BoolArray | None,
    *,
    disclaimer: str = DEFAULT_DISCLAIMER,
    fov_mm: float = 160.0,
    target_px: int = 640,
) -> RenderedImage:
    """The mid-vertebral axial slice of one vertebra, zoomed on its body, with the ROI and its numbers.

    Parameters
    ----------
    result
        The analysis result (summary line and footer).
    volume
        The canonical volume the ROI was measured on.
    v
        The vertebra to show.
    roi_mask
        Boolean mask shaped like ``volume.data``, or None (the outline in ``v.outline`` is used instead).
    disclaimer
        Printed in the footer.
    fov_mm, target_px
        Side of the square field of view around the vertebral body, and its size on screen.
    """
    k = _axial_k(volume, v)
    roi_slice = roi_mask[k] if roi_mask is not None and roi_mask.shape == volume.data.shape else None
    return _render_axial(
        result, volume, v, roi_slice, disclaimer=disclaimer, fov_mm=fov_mm, target_px=target_px
    )


def _render_axial(
    result: AnalysisResult,
    volume: Volume,
    v: VertebraResult,
    roi_slice: BoolArray | None,
    *,
    disclaimer: str,
    fov_mm: float,
    target_px: int,
) -> RenderedImage:
    """:func:`render_axial` on the mask's slice ``[j, i]`` at the shown level (None: draw the outline)."""
    data = volume.data
    _nk, nj, ni = data.shape
    si, sj, _sk = volume.spacing
    c = _centroid_index(volume, v)
    k = _axial_k(volume, v)
    ci, cj = float(c[0]), float(c[1])
    half_i, half_j = fov_mm / 2 / si, fov_mm / 2 / sj
    i0, i1 = max(round(ci - half_i), 0), min(round(ci + half_i), ni)
    j0, j1 = max(round(cj - half_j), 0), min(round(cj + half_j), nj)
    crop = data[k, j0:j1, i0:i1]  # rows anterior -> posterior, columns right -> left (radiological view)
    ppm = target_px / fov_mm
    disp_w = max(round(crop.shape[1] * si * ppm), 1)
    disp_h = max(round(crop.shape[0] * sj * ppm), 1)
    grey = Image.fromarray(_window(crop)).resize((disp_w, disp_h), Image.Resampling.BICUBIC)
    rgb = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)
    colour = level_colour(v)
    has_mask = roi_slice is not None and roi_slice.shape == (nj, ni)
    if has_mask and roi_slice is not None:
        dm = _resize_mask(roi_slice[j0:j1, i0:i1], (disp_w, disp_h))
        _paint_roi(rgb, dm, colour, 0.30)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if not has_mask and v.outline and v.outline.points_lps_mm:
        # no mask: draw the engine's outline, mapped from LPS into this view
        pts = volume.lps_to_index(np.asarray(v.outline.points_lps_mm, dtype=np.float64))
        xy = [((p[0] - i0 + 0.5) * si * ppm, (p[1] - j0 + 0.5) * sj * ppm) for p in pts]
        ImageDraw.Draw(img).line(xy + xy[:1], fill=colour, width=2)

    pad, panel_w = 16, 400
    width = disp_w + panel_w
    f_title, f_big, f_text, f_small = _font(SIZE_TITLE), _font(30), _font(SIZE_TEXT), _font(SIZE_SMALL)
    md = _measure_draw()
    px = disp_w + 24
    text_w = width - px - pad

    # the numbers panel, laid out first (y relative to the panel top) so the canvas can fit all of it
    ops: list[tuple[float, float, str, Colour, Any]] = []  # (x, y, text, colour, font)
    py = 16.0
    ops.append((px, py, level_label(v), colour, f_big))
    if v.level_uncertain:
        ops.append((px + 70, py + 8, "level uncertain", UNCERTAIN, f_text))
    py += 52
    reason = v.exclusion_reason or ""
    if v.excluded:
        ops.append((px, py, "Excluded from the summary", EXCLUDED_C, f_text))
        py += 28
        for line in wrap_text(md, reason, f_small, text_w) if reason else []:
            ops.append((px, py, line, EXCLUDED_C, f_small))
            py += LINE_SMALL
        py += 10
    vb = f"{_fmt(v.vbmd_mg_cm3)} mg/cm³" if v.vbmd_mg_cm3 is not None else "n/a"
    rows_txt: list[tuple[str, str]] = [
        ("vBMD", vb),
        ("HU mean", _fmt(v.trabecular_hu_mean)),
        ("HU median", _fmt(v.trabecular_hu_median)),
        ("HU SD", _fmt(v.trabecular_hu_sd)),
        ("ROI volume", f"{_fmt(v.roi_volume_mm3 / 1000.0, 2)} cm³"),
    ]
    if v.height_ratio is not None:
        rows_txt.append(("Height ratio", fmt_ratio(v.height_ratio)))
    for label, value in rows_txt:
        ops.append((px, py, label, MUTED, f_text))
        ops.append((px + 150, py, value, TEXT if not v.excluded else EXCLUDED_C, f_text))
        py += 30
    # QC flags, each wrapped with a hanging indent; the exclusion reason is not repeated
    flags = [q for q in v.qc if not (v.excluded and q in reason)]
    if flags:
        py += 8
        ops.append((px, py, "QC flags", MUTED, f_text))
        py += 28
        bullet_w = _text_w(md, "·  ", f_small)
        for flag in flags:
            for n, line in enumerate(wrap_text(md, flag, f_small, text_w - bullet_w)):
                if n == 0:
                    ops.append((px, py, "·", UNCERTAIN, f_small))
                ops.append((px + bullet_w, py, line, UNCERTAIN, f_small))
                py += LINE_SMALL
            py += 4
    panel_needed = int(py) + 12

    foot: list[tuple[str, Colour, Any, int]] = [
        (ln, MUTED, f_small, LINE_SMALL)
        for ln in wrap_text(md, _footer_lines(result)[-1], f_small, width - 2 * pad)
    ]
    foot.extend((ln, WARN, f_text, LINE_TEXT) for ln in wrap_text(md, disclaimer, f_text, width - 2 * pad))
    footer_h = 12 + sum(f[3] for f in foot) + 10
    summary, scol = _summary_line(result)
    summary_lines = wrap_text(md, summary, f_text, width - 2 * pad)
    header_h = 36 + LINE_TEXT * len(summary_lines) + 6
    body_h = max(disp_h, 420, panel_needed)
    height = header_h + body_h + footer_h
    canvas = Image.new("RGB", (width, height), BG)
    canvas.paste(img, (0, header_h))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, header_h), fill=PANEL)
    z_mm = float(volume.index_to_lps(np.array([ci, cj, k], dtype=np.float64))[2])
    _text(
        draw, (pad, 8), f"{level_label(v)}  ·  mid-vertebral axial slice (z = {z_mm:.1f} mm)", TEXT, f_title
    )
    for n, line in enumerate(summary_lines):
        _text(draw, (pad, 36 + LINE_TEXT * n), line, scol, f_text)
    # orientation letters (radiological convention: patient's right on the viewer's left)
    iy = header_h
    _text(draw, (6, iy + disp_h // 2 - 10), "R", TEXT, f_title)
    _text(draw, (disp_w - 20, iy + disp_h // 2 - 10), "L", TEXT, f_title)
    _text(draw, (disp_w // 2 - 6, iy + 4), "A", TEXT, f_title)
    _text(draw, (disp_w // 2 - 6, iy + disp_h - 26), "P", TEXT, f_title)
    _scale_bar(draw, 14, iy + disp_h - 40, ppm, f_small)

    draw.rectangle((disp_w, header_h, width, header_h + body_h), fill=PANEL)
    for x, y, text, col, font in ops:
        _text(draw, (x, header_h + y), text, col, font)

    fy = header_h + body_h
    draw.rectangle((0, fy, width, height), fill=PANEL)
    y = fy + 10
    for line, col, font, line_h in foot:
        _text(draw, (pad, y), line, col, font)
        y += line_h

    sop = frame = None
    if k < len(volume.slice_sop_instance_uids):
        sop = volume.slice_sop_instance_uids[k]
        frame = volume.slice_frame_numbers[k] if k < len(volume.slice_frame_numbers) else None
    return RenderedImage(
        name=v.level,
        rgb=np.asarray(_with_viewer_margin(canvas), dtype=np.uint8),
        pixel_spacing_mm=(1 / ppm, 1 / ppm),
        patient_orientation=("L", "P"),
        margin_px=viewer_margins(canvas.height),
        description=f"{v.level} axial",
        source_sop_instance_uid=sop,
        source_frame_number=frame,
    )


def render_all(
    result: AnalysisResult,
    volume: Volume,
    roi_masks: Mapping[str, BoolArray] | None,
    *,
    disclaimer: str = DEFAULT_DISCLAIMER,
    levels: Sequence[str] | None = None,
) -> list[RenderedImage]:
    """The overview plus one axial image per vertebra (or per level in ``levels``), cranial to caudal.

    Each level's mask is taken from ``roi_masks`` once (a mapping may compute it on access) and reduced at
    once to what the images show: its left-right projection and its mid-vertebral slice.
    """
    shown = [v for v in result.vertebrae if _placed(v)]
    projections: dict[str, BoolArray] | None = {} if roi_masks is not None else None
    slices: dict[str, BoolArray] = {}
    if roi_masks is not None and projections is not None:
        for v in shown:
            mask = roi_masks.get(v.level)
            if mask is None or mask.shape != volume.data.shape:
                continue
            projections[v.level] = _projection(mask, _mask_box(roi_masks, v.level))
            if levels is None or v.level in levels:
                slices[v.level] = np.array(mask[_axial_k(volume, v)], dtype=bool)
            del mask  # one full-size mask alive at a time
    images = [_render_overview(result, volume, projections, disclaimer=disclaimer, target_px=900)]
    for v in shown:
        if levels is not None and v.level not in levels:
            continue
        images.append(
            _render_axial(
                result, volume, v, slices.get(v.level), disclaimer=disclaimer, fov_mm=160.0, target_px=640
            )
        )
    return images
