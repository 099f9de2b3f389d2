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


def _draw_legend(draw: ImageDraw.ImageDraw, x: int, y: int, font: Any) -> None:
    items = (("measured", ACCENT), ("level uncertain (?)", UNCERTAIN), ("excluded", EXCLUDED_C))
    for label, colour in items:
        draw.rectangle((x, y + 3, x + 14, y + 17), fill=colour)
        _text(draw, (x + 22, y), label, TEXT, font)
        x += 22 + _text_w(draw, label, font) + 26


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
    data = volume.data
    nk, nj, ni = data.shape
    _si, sj, sk = volume.spacing
    verts = [v for v in result.vertebrae if np.all(np.isfinite(v.roi_centroid_lps_mm))]
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
        mask = roi_masks.get(v.level) if roi_masks is not None else None
        cx, cy = to_disp(_centroid_index(volume, v))
        x_right = cx
        if mask is not None and mask.shape == data.shape and mask.any():
            proj: BoolArray = np.asarray(mask.any(axis=2), dtype=bool)[::-1, :][r0:r1, c0:c1]
            dm = _resize_mask(proj, (disp_w, disp_h))
            _paint_roi(rgb, dm, colour, 0.30 if not v.excluded else 0.15)
            ys, xs = np.nonzero(dm)
            if xs.size:
                x_right = float(xs.max())
                cy = float(ys.mean())
        anchors.append((v, cy, x_right))

    header_h, footer_h, panel_w, pad = 78, 118, 430, 16
    width = disp_w + panel_w
    height = header_h + disp_h + footer_h
    canvas = Image.new("RGB", (width, height), BG)
    canvas.paste(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), (0, header_h))
    draw = ImageDraw.Draw(canvas)
    f_title, f_big, f_label, f_small = _font(20), _font(26), _font(21), _font(16)

    # header: title + the legend line with the summary
    draw.rectangle((0, 0, width, header_h), fill=PANEL)
    _text(draw, (pad, 8), "Trabecular bone density  ·  sagittal overview", MUTED, f_title)
    summary, scol = _summary_line(result)
    _text(draw, (pad, 36), summary, scol, f_big)

    # side panel with one label per vertebra, joined to its ROI by a leader line
    draw.rectangle((disp_w, header_h, width, header_h + disp_h), fill=PANEL)
    line_h = 50
    ordered = sorted(anchors, key=lambda a: a[1])
    ys_wanted = [header_h + a[1] for a in ordered]
    placed: list[float] = []
    for y in ys_wanted:
        y = max(y, header_h + line_h / 2 + 4, (placed[-1] + line_h) if placed else -1e9)
        placed.append(y)
    overflow = (placed[-1] + line_h / 2) - (header_h + disp_h) if placed else 0
    if overflow > 0:  # push the stack back up, keeping the spacing
        placed = [y - overflow for y in placed]
        for n in range(1, len(placed)):
            placed[n] = max(placed[n], placed[n - 1] + line_h)
    tx = disp_w + 36
    for (v, cy, x_right), ty in zip(ordered, placed, strict=True):
        colour = level_colour(v)
        draw.line(
            [(x_right + 4, header_h + cy), (disp_w, header_h + cy), (disp_w + 24, ty)], fill=colour, width=2
        )
        draw.ellipse((disp_w + 20, ty - 4, disp_w + 28, ty + 4), fill=colour)
        name = level_label(v)
        _text(draw, (tx, ty - 22), name, colour, f_label)
        nx = tx + 58
        if v.excluded:
            _text(draw, (nx, ty - 22), "excluded", EXCLUDED_C, f_label)
            reason = v.exclusion_reason or "excluded from the summary"
            if len(reason) > 44:  # keep the gist; the full text is in the axial image and result.json
                reason = reason.split(" (")[0][:44]
            _text(draw, (tx, ty + 2), reason[:44], EXCLUDED_C, f_small)
        else:
            vb = f"{_fmt(v.vbmd_mg_cm3)} mg/cm³" if v.vbmd_mg_cm3 is not None else "vBMD n/a"
            _text(draw, (nx, ty - 22), vb, TEXT, f_label)
            extra = f"{_fmt(v.trabecular_hu_mean, 0)} HU mean"
            if v.qc:
                extra += "  ·  " + ", ".join(v.qc)
            _text(draw, (tx, ty + 2), extra[:48], MUTED, f_small)

    # orientation letters and a 50 mm scale bar on the image
    _text(draw, (10, header_h + 8), "A", TEXT, f_title)
    _text(draw, (disp_w - 24, header_h + 8), "P", TEXT, f_title)
    _text(draw, (disp_w // 2 - 6, header_h + 6), "S", TEXT, f_title)
    _scale_bar(draw, 14, header_h + disp_h - 20, ppm, f_small)

    # footer: legend, details, disclaimer
    fy = header_h + disp_h + 10
    draw.rectangle((0, header_h + disp_h, width, height), fill=PANEL)
    _draw_legend(draw, pad, fy, f_small)
    for n, line in enumerate(_footer_lines(result)):
        _text(draw, (pad, fy + 26 + 22 * n), line, MUTED, f_small)
    _text(draw, (pad, height - 30), disclaimer, WARN, f_small)

    sop = None
    return RenderedImage(
        name="overview",
        rgb=np.asarray(canvas, dtype=np.uint8),
        pixel_spacing_mm=(1 / ppm, 1 / ppm),
        patient_orientation=("P", "F"),
        description="sagittal overview",
        source_sop_instance_uid=sop,
    )


def _scale_bar(draw: ImageDraw.ImageDraw, x: int, y: int, ppm: float, font: Any) -> None:
    length = round(50 * ppm)
    draw.line([(x, y), (x + length, y)], fill=TEXT, width=3)
    draw.line([(x, y - 6), (x, y + 2)], fill=TEXT, width=2)
    draw.line([(x + length, y - 6), (x + length, y + 2)], fill=TEXT, width=2)
    _text(draw, (x + length + 8, y - 10), "50 mm", TEXT, font)


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
    data = volume.data
    nk, nj, ni = data.shape
    si, sj, _sk = volume.spacing
    c = _centroid_index(volume, v)
    k = v.mid_slice_index if v.mid_slice_index is not None else round(float(c[2]))
    k = min(max(int(k), 0), nk - 1)
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
    if roi_mask is not None and roi_mask.shape == data.shape:
        dm = _resize_mask(roi_mask[k, j0:j1, i0:i1], (disp_w, disp_h))
        _paint_roi(rgb, dm, colour, 0.30)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if (roi_mask is None or roi_mask.shape != data.shape) and v.outline and v.outline.points_lps_mm:
        # no mask: draw the engine's outline, mapped from LPS into this view
        pts = volume.lps_to_index(np.asarray(v.outline.points_lps_mm, dtype=np.float64))
        xy = [((p[0] - i0 + 0.5) * si * ppm, (p[1] - j0 + 0.5) * sj * ppm) for p in pts]
        ImageDraw.Draw(img).line(xy + xy[:1], fill=colour, width=2)

    header_h, panel_w, footer_h, pad = 64, 400, 64, 16
    width, height = disp_w + panel_w, header_h + max(disp_h, 420) + footer_h
    canvas = Image.new("RGB", (width, height), BG)
    canvas.paste(img, (0, header_h))
    draw = ImageDraw.Draw(canvas)
    f_title, f_big, f_text, f_small = _font(20), _font(30), _font(19), _font(16)
    draw.rectangle((0, 0, width, header_h), fill=PANEL)
    z_mm = float(volume.index_to_lps(np.array([ci, cj, k], dtype=np.float64))[2])
    _text(
        draw, (pad, 8), f"{level_label(v)}  ·  mid-vertebral axial slice (z = {z_mm:.1f} mm)", TEXT, f_title
    )
    summary, scol = _summary_line(result)
    _text(draw, (pad, 36), summary, scol, f_small)
    # orientation letters (radiological convention: patient's right on the viewer's left)
    iy = header_h
    _text(draw, (6, iy + disp_h // 2 - 10), "R", TEXT, f_title)
    _text(draw, (disp_w - 20, iy + disp_h // 2 - 10), "L", TEXT, f_title)
    _text(draw, (disp_w // 2 - 6, iy + 4), "A", TEXT, f_title)
    _text(draw, (disp_w // 2 - 6, iy + disp_h - 26), "P", TEXT, f_title)
    _scale_bar(draw, 14, iy + disp_h - 40, ppm, f_small)

    # numbers panel
    px, py = disp_w + 24, header_h + 16
    draw.rectangle((disp_w, header_h, width, height - footer_h), fill=PANEL)
    _text(draw, (px, py), level_label(v), colour, f_big)
    if v.level_uncertain:
        _text(draw, (px + 70, py + 8), "level uncertain", UNCERTAIN, f_text)
    py += 52
    if v.excluded:
        _text(draw, (px, py), "Excluded from the summary", EXCLUDED_C, f_text)
        py += 26
        for chunk in _wrap(v.exclusion_reason or "", 36):
            _text(draw, (px, py), chunk, EXCLUDED_C, f_small)
            py += 22
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
        rows_txt.append(("Height ratio", _fmt(v.height_ratio, 2)))
    for label, value in rows_txt:
        _text(draw, (px, py), label, MUTED, f_text)
        _text(draw, (px + 150, py), value, TEXT if not v.excluded else EXCLUDED_C, f_text)
        py += 30
    if v.qc:
        py += 8
        _text(draw, (px, py), "QC flags", MUTED, f_text)
        py += 26
        for flag in v.qc[:6]:
            _text(draw, (px, py), f"· {flag}"[:40], UNCERTAIN, f_small)
            py += 22

    draw.rectangle((0, height - footer_h, width, height), fill=PANEL)
    _text(draw, (pad, height - footer_h + 8), _footer_lines(result)[-1], MUTED, f_small)
    _text(draw, (pad, height - footer_h + 34), disclaimer, WARN, f_small)

    sop = frame = None
    if k < len(volume.slice_sop_instance_uids):
        sop = volume.slice_sop_instance_uids[k]
        frame = volume.slice_frame_numbers[k] if k < len(volume.slice_frame_numbers) else None
    return RenderedImage(
        name=v.level,
        rgb=np.asarray(canvas, dtype=np.uint8),
        pixel_spacing_mm=(1 / ppm, 1 / ppm),
        patient_orientation=("L", "P"),
        description=f"{v.level} axial",
        source_sop_instance_uid=sop,
        source_frame_number=frame,
    )


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return lines


def render_all(
    result: AnalysisResult,
    volume: Volume,
    roi_masks: Mapping[str, BoolArray] | None,
    *,
    disclaimer: str = DEFAULT_DISCLAIMER,
    levels: Sequence[str] | None = None,
) -> list[RenderedImage]:
    """The overview plus one axial image per vertebra (or per level in ``levels``), cranial to caudal."""
    images = [render_overview(result, volume, roi_masks, disclaimer=disclaimer)]
    for v in result.vertebrae:
        if levels is not None and v.level not in levels:
            continue
        if not np.all(np.isfinite(v.roi_centroid_lps_mm)):
            continue
        mask = roi_masks.get(v.level) if roi_masks is not None else None
        images.append(render_axial(result, volume, v, mask, disclaimer=disclaimer))
    return images
