"""Outputs of an analysis: TID 1500 SR, secondary-capture overlays and ``result.json``.

The only package that imports highdicom. Works on the domain result plus numpy arrays (canonical volume and
ROI masks); never imports ``dicomnode.bmd``.
"""

from dicomnode.report.outputs import MeasuredSeries, OutputFiles, write_outputs, write_result_json
from dicomnode.report.readback import read_sr_measurements
from dicomnode.report.render import DEFAULT_DISCLAIMER, RenderedImage, render_all
from dicomnode.report.uids import UidPolicy

__all__ = [
    "DEFAULT_DISCLAIMER",
    "MeasuredSeries",
    "OutputFiles",
    "RenderedImage",
    "UidPolicy",
    "read_sr_measurements",
    "render_all",
    "write_outputs",
    "write_result_json",
]
