"""Write one analysis' outputs: ``result.json``, ``sr.dcm``, ``sc_*.dcm`` (and PNG previews)."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset

from dicomnode.domain import AnalysisResult, AnalysisStatus, PreviousReport
from dicomnode.imaging.volume import Volume
from dicomnode.report.render import DEFAULT_DISCLAIMER, RenderedImage, render_all
from dicomnode.report.sc import build_sc
from dicomnode.report.sr import build_sr, predecessor_references
from dicomnode.report.uids import UidPolicy

log = logging.getLogger(__name__)


class MeasuredSeries(Protocol):
    """What the report needs from a measurement (``dicomnode.bmd.BmdOutput`` provides it)."""

    @property
    def result(self) -> AnalysisResult: ...

    @property
    def canonical(self) -> Volume: ...

    @property
    def roi_masks(self) -> Mapping[str, npt.NDArray[np.bool_]] | None: ...


@dataclass(frozen=True)
class OutputFiles:
    """What ``write_outputs`` wrote."""

    result_json: Path
    sr: Path | None = None
    sc: tuple[Path, ...] = ()
    png: tuple[Path, ...] = ()
    #: Why something was not written (e.g. no SR for NIfTI input), human readable.
    notes: tuple[str, ...] = ()

    @property
    def dicom(self) -> tuple[Path, ...]:
        return ((self.sr,) if self.sr is not None else ()) + self.sc


def _atomic_write(path: Path, write: object) -> None:
    """Write via a temporary file in the same folder, fsync, then rename (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)  # type: ignore[operator]
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Names of the files we write (anything else in the folder is never touched).
_OUR_FILES = re.compile(r"^(sr\.dcm|sc_\d{2}_[A-Za-z0-9]+\.dcm|overlay_\d{2}_[A-Za-z0-9]+\.png)$")


def _remove_stale(out_dir: Path, keep: set[Path]) -> None:
    """Remove outputs of an earlier run into the same folder that this run did not rewrite (e.g. a level
    no longer found), so the folder always describes one analysis."""
    for path in out_dir.iterdir():
        if path.is_file() and _OUR_FILES.match(path.name) and path not in keep:
            log.debug("removing stale output %s", path.name)
            path.unlink(missing_ok=True)


def write_result_json(result: AnalysisResult, out_dir: Path) -> Path:
    """Write ``result.json`` (schema: ``AnalysisResult.to_json_dict``) into ``out_dir``; return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "result.json"
    text = json.dumps(result.to_json_dict(), indent=2, allow_nan=False) + "\n"
    _atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
    if result.status is not AnalysisStatus.OK:
        _remove_stale(out_dir, set())
    return path


def _ref_for(image: RenderedImage, by_sop: dict[str, Dataset], fallback: Dataset) -> Dataset:
    if image.source_sop_instance_uid is not None:
        return by_sop.get(image.source_sop_instance_uid, fallback)
    return fallback


def write_outputs(
    bmd_output: MeasuredSeries,
    source_datasets: Sequence[Dataset],
    out_dir: Path,
    *,
    job_key: str | None = None,
    version: int = 1,
    disclaimer: str = DEFAULT_DISCLAIMER,
    write_png: bool = True,
    levels: Sequence[str] | None = None,
    previous_reports: Sequence[PreviousReport] = (),
) -> OutputFiles:
    """Write ``result.json`` always; for an ok result also the SR, the SC overlays and PNG previews.

    Parameters
    ----------
    bmd_output
        The measurement (result, canonical volume, ROI masks in canonical space).
    source_datasets
        Datasets of the analysed series (headers suffice). Empty for NIfTI input: then no DICOM is written
        (there is no study to put it in) and ``notes`` says so.
    out_dir
        Created if needed. Files: ``result.json``, ``sr.dcm``, ``sc_00_overview.dcm``,
        ``sc_NN_<level>.dcm``, ``overlay_*.png``.
    job_key, version
        Deterministic UIDs from (job key, version, artefact); random without a job key.
    disclaimer
        Burned into every overlay and written into the SC ImageComments.
    write_png
        Also write the overlays as PNG (for people, and for NIfTI input).
    levels
        Restrict the axial overlays to these levels (default: every vertebra found).
    previous_reports
        SRs of earlier versions of this analysis that the new SR replaces (late instances re-opened the
        series): named in its Predecessor Documents Sequence (``sr.predecessor_references``).
    """
    result = bmd_output.result
    json_path = write_result_json(result, out_dir)
    if result.status is not AnalysisStatus.OK or not result.vertebrae:
        _remove_stale(out_dir, set())
        return OutputFiles(result_json=json_path, notes=(f"status {result.status.value}: no SR or SC",))
    uids = UidPolicy(job_key=job_key, version=version)
    notes: list[str] = []
    images = render_all(
        result, bmd_output.canonical, bmd_output.roi_masks, disclaimer=disclaimer, levels=levels
    )
    pngs: list[Path] = []
    if write_png:
        for n, image in enumerate(images):
            png = out_dir / f"overlay_{n:02d}_{image.name}.png"
            _atomic_write(
                png, lambda p, im=image: Image.fromarray(im.rgb).save(p, format="PNG", compress_level=1)
            )
            pngs.append(png)
    if not source_datasets:
        notes.append("no source DICOM images (NIfTI input): result.json and PNG overlays only, no SR or SC")
        _remove_stale(out_dir, set(pngs))
        return OutputFiles(result_json=json_path, png=tuple(pngs), notes=tuple(notes))

    study_uid = str(source_datasets[0].StudyInstanceUID)
    predecessors = predecessor_references(previous_reports, uids, study_uid) if previous_reports else []
    sr = build_sr(result, source_datasets, uids, previous_versions=predecessors)
    sr_path = out_dir / "sr.dcm"
    _atomic_write(sr_path, lambda p: sr.save_as(p, enforce_file_format=True))
    by_sop = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    fallback = source_datasets[len(source_datasets) // 2]
    sc_paths: list[Path] = []
    # one overlay series per analysis, in every path: without a job key uids.uid() is random per call
    sc_series = uids.uid("sc-series")
    for n, image in enumerate(images):
        sc = build_sc(
            image,
            _ref_for(image, by_sop, fallback),
            uids,
            n + 1,
            series_instance_uid=sc_series,
            disclaimer=disclaimer,
        )
        path = out_dir / f"sc_{n:02d}_{image.name}.dcm"
        _atomic_write(path, lambda p, ds=sc: ds.save_as(p, enforce_file_format=True))
        sc_paths.append(path)
    _remove_stale(out_dir, {sr_path, *sc_paths, *pngs})
    log.info(
        "wrote SR %s and %d SC for series %s", sr.SOPInstanceUID, len(sc_paths), result.series_instance_uid
    )
    return OutputFiles(
        result_json=json_path, sr=sr_path, sc=tuple(sc_paths), png=tuple(pngs), notes=tuple(notes)
    )
