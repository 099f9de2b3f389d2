"""Synthetic abdominal CT with known truth (vertebral levels, trabecular vBMD, geometry).

``make_phantom(PhantomSpec(...))`` returns the HU :class:`~dicomnode.imaging.volume.Volume` (LPS affine),
the :class:`PhantomTruth` and label maps on the same grid. The HU model lives in
:mod:`dicomnode.phantom.tissue`; the measurement code must never import this package.
"""

from dicomnode.phantom.model import LevelTruth, Phantom, PhantomSpec, PhantomTruth, make_phantom

__all__ = ["LevelTruth", "Phantom", "PhantomSpec", "PhantomTruth", "make_phantom"]
