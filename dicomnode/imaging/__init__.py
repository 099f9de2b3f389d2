"""DICOM / NIfTI series -> validated HU volume with exact geometry.

Kept light at import time: ``ingest`` may import ``dicomnode.imaging.headers`` (pydicom only).
"""

from dicomnode.imaging.volume import Volume

__all__ = ["Volume"]
