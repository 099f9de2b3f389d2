"""The measurement: vertebra detection and naming, trabecular ROIs, internal calibration, classification, QC.

Public API
----------
``analyze_volume(volume, options=BmdOptions()) -> BmdOutput``
``BmdOptions``, ``BmdOutput``
``SegmentationBackend`` (protocol), ``SpineSegmentation``, ``get_backend(name, **kw)``, ``register_backend``
"""

from __future__ import annotations

from dicomnode.bmd.analysis import BmdOptions, BmdOutput, LabelMasks, analyze_volume
from dicomnode.bmd.segmentation import SegmentationBackend, SpineSegmentation, get_backend, register_backend

__all__ = [
    "BmdOptions",
    "BmdOutput",
    "LabelMasks",
    "SegmentationBackend",
    "SpineSegmentation",
    "analyze_volume",
    "get_backend",
    "register_backend",
]
