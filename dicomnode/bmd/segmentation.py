"""Segmentation backends: what turns a canonical volume into named vertebral bodies.

A backend returns a :class:`SpineSegmentation`: one label volume of vertebral bodies on the canonical grid
(label ``n`` = ``levels[n - 1]``), the names, whether the naming is uncertain, and the evidence it used.
The classical backend (:mod:`dicomnode.bmd.classical`) needs no weights; a model-bundle backend can be
registered with :func:`register_backend` and is then reachable through :func:`get_backend`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from dicomnode.errors import ConfigError
from dicomnode.imaging.volume import Volume


@dataclass(frozen=True, eq=False)
class SpineSegmentation:
    """Vertebral bodies found in a canonical volume, named cranial to caudal.

    Attributes
    ----------
    levels
        Level names, cranial to caudal; label value ``n`` in ``body_labels`` is ``levels[n - 1]``.
    body_labels
        ``uint8`` array ``[k, j, i]`` on the canonical grid: vertebral bodies only (no posterior elements).
    level_uncertain
        True when the naming could not be confirmed (anchors disagree or are missing or weak).
    evidence
        Human-readable lines saying how the levels were named (ribs, sacrum, counts).
    truncated
        Levels whose body is cut by the field of view (not measurable).
    unreliable
        Levels whose body mask is not trustworthy (e.g. two bodies merged), with the reason.
    hints
        Backend-specific extras (e.g. canal centreline), never required by callers.
    """

    levels: tuple[str, ...]
    body_labels: npt.NDArray[np.uint8]
    level_uncertain: bool
    evidence: tuple[str, ...] = ()
    truncated: frozenset[str] = frozenset()
    #: Levels whose mask is not trustworthy, with the reason (excluded from measurement).
    unreliable: Mapping[str, str] = field(default_factory=dict)
    hints: Mapping[str, Any] = field(default_factory=dict)

    def mask(self, level: str) -> npt.NDArray[np.bool_]:
        """Boolean body mask of one level (canonical grid)."""
        return np.asarray(self.body_labels == self.levels.index(level) + 1)


@runtime_checkable
class SegmentationBackend(Protocol):
    """Anything that finds and names vertebral bodies in a canonical volume."""

    name: str
    version: str

    def segment(self, canonical: Volume) -> SpineSegmentation:
        """Find and name vertebral bodies; raise NotQualifyingError / AnalysisError with one line."""
        ...


_REGISTRY: dict[str, Callable[..., SegmentationBackend]] = {}


def register_backend(name: str, factory: Callable[..., SegmentationBackend]) -> None:
    """Make a backend reachable by name (model bundles register themselves here)."""
    _REGISTRY[name] = factory


def get_backend(name: str = "classical", **kw: Any) -> SegmentationBackend:
    """Return a segmentation backend by name.

    Parameters
    ----------
    name
        ``"classical"`` (default, no weights), ``"bundle:PATH"`` (a segmentation model bundle, loaded and
        verified on first use, see :mod:`dicomnode.bmd.backend_bundle`) or a name registered with
        :func:`register_backend`.
    **kw
        Passed to the backend's factory.

    Raises
    ------
    ConfigError
        Unknown backend name.
    BundleError
        A ``bundle:PATH`` that is missing, tampered with or not a segmentation bundle.
    """
    if name == "classical" and name not in _REGISTRY:
        from dicomnode.bmd.classical import ClassicalBackend

        register_backend("classical", ClassicalBackend)
    if name.startswith("bundle:") and name not in _REGISTRY:
        from dicomnode.bmd.backend_bundle import register_bundle_backend

        register_bundle_backend(name)  # registers under the same name; BundleError (one line) if refused
    try:
        factory = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted({"classical", *_REGISTRY})) or "classical"
        raise ConfigError(f"unknown segmentation backend {name!r} (known: {known})") from None
    return factory(**kw)
