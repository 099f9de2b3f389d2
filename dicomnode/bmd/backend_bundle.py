"""Segmentation backend that runs a model bundle (``segmentation_backend: bundle:PATH``).

The bundle's network finds vertebral bodies and the sacrum; the bodies are named T11..L5 by their order
above the sacrum (:func:`dicomnode.ml.inference.label_levels`). The bundle is verified (SHA-256, manifest)
when the backend is built and the series is checked against its input spec before every use.

Use::

    from dicomnode.bmd.backend_bundle import register_bundle_backend
    name = register_bundle_backend("models/my-seg-bundle")  # -> "bundle:models/my-seg-bundle"
    analyse(volume, BmdOptions(backend=name))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicomnode.bmd.segmentation import SpineSegmentation, register_backend
from dicomnode.domain import REPORTED_LEVELS
from dicomnode.errors import AnalysisError, BundleError
from dicomnode.imaging.volume import Volume

#: Loaded backends by resolved bundle path: a bundle is read and verified once per process.
_CACHE: dict[str, BundleBackend] = {}


class BundleBackend:
    """A :class:`~dicomnode.bmd.segmentation.SegmentationBackend` backed by a segmentation bundle.

    ``name`` is ``bundle-<bundle name>`` and ``version`` the bundle version, so the analysis'
    ``algorithm_version`` (``<dicomnode>+<backend name>.<backend version>``) names the bundle used.
    """

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from dicomnode.ml.bundle import load_bundle

        self.bundle = load_bundle(path, device=device)
        if self.bundle.manifest.task != "segmentation":
            raise BundleError(f"bundle {path}: task {self.bundle.manifest.task!r}, not a segmentation bundle")
        self.name = f"bundle-{self.bundle.name}"
        self.version = self.bundle.version
        self.identification = self.bundle.manifest.identification

    def segment(self, canonical: Volume) -> SpineSegmentation:
        """Find and name the vertebral bodies T11..L5 of a canonical volume.

        Parameters
        ----------
        canonical : Volume
            The canonical (LPS) HU volume.

        Returns
        -------
        SpineSegmentation
            Bodies labelled 1..n cranial to caudal; ``level_uncertain`` when no sacrum anchored the count.

        Raises
        ------
        BundleError
            The series does not meet the bundle's input spec.
        AnalysisError
            No vertebral body found.
        """
        from dicomnode.ml.inference import segment

        seg = segment(self.bundle, canonical)
        if seg.labels.shape != canonical.shape:  # canonical() of a canonical volume is the identity
            raise AnalysisError("bundle segmentation came back on a different grid")
        levels = tuple(lvl for lvl in REPORTED_LEVELS if lvl in seg.levels())
        if not levels:
            raise AnalysisError(f"{self.name}: no vertebral body T11-L5 found")
        from dicomnode.ml.datasets import LEVEL_CLASSES

        body = np.zeros(canonical.shape, np.uint8)
        for n, lvl in enumerate(levels, start=1):
            body[seg.labels == LEVEL_CLASSES[lvl]] = n
        truncated = frozenset(
            lvl
            for n, lvl in enumerate(levels, start=1)
            if (ks := np.nonzero((body == n).any(axis=(1, 2)))[0]).size
            and (ks.min() == 0 or ks.max() == canonical.shape[0] - 1)
        )
        uncertain = any("uncertain" in note for note in seg.notes)
        evidence = (f"levels by {self.identification}: order above the sacrum", *seg.notes)
        return SpineSegmentation(levels, body, uncertain, evidence, truncated)


def bundle_backend(path: str | Path, device: str = "cpu") -> BundleBackend:
    """The (cached) backend of a bundle folder."""
    key = str(Path(path).resolve())
    if key not in _CACHE:
        _CACHE[key] = BundleBackend(path, device)
    return _CACHE[key]


def register_bundle_backend(spec: str | Path, device: str = "cpu") -> str:
    """Register ``bundle:PATH`` with :func:`dicomnode.bmd.segmentation.register_backend`.

    The bundle is loaded and verified now, so a bad bundle is refused at start-up, not at the first study.

    Parameters
    ----------
    spec : str or Path
        ``bundle:PATH`` or a bundle folder.
    device : str
        ``cpu`` or ``cuda``.

    Returns
    -------
    str
        The backend name to put in ``BmdOptions.backend`` (``bundle:PATH``).

    Raises
    ------
    BundleError
        Missing, tampered or invalid bundle (one line).
    """
    text = str(spec)
    path = text.split(":", 1)[1] if text.startswith("bundle:") else text
    backend = bundle_backend(path, device)
    name = f"bundle:{path}"
    register_backend(name, lambda **_: backend)
    return name
