"""What the analysis measures with: the options (engines and measurement settings), their start-up check,
and the one measurement entry point (:func:`make_measure`): ``dicomnode.bmd.analyze_volume`` with the
configured segmentation backend, then the configured vBMD bundle.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dicomnode import DEFAULT_EROSION_MM
from dicomnode.domain import AnalysisResult
from dicomnode.imaging.volume import Volume

if TYPE_CHECKING:  # typing only: importing report loads highdicom
    from dicomnode.report import MeasuredSeries

log = logging.getLogger(__name__)

#: Bundles whose input spec needs more slices than this cannot serve a routine abdominal CT.
MAX_BUNDLE_MIN_SLICES = 600

Measure = Callable[[Volume], "MeasuredSeries"]

#: ``bmd_estimator`` values meaning the built-in calibrated-ROI vBMD.
ROI_ESTIMATORS = ("roi", "classical", "calibrated-roi")
#: Bundle tasks that can estimate vBMD: per vertebra from 3-D crops, or per series from a mid-sagittal
#: reformat (centred on the ROI centroids of its reference levels).
BMD_BUNDLE_TASKS = ("bmd", "sagittal_bmd_tbs")


@dataclass(frozen=True)
class AnalysisOptions:
    """What the analysis runs with: engines and measurement settings (picklable: sent to worker processes).

    Attributes
    ----------
    segmentation
        ``"classical"`` (built in) or ``"bundle:PATH"`` (a segmentation bundle finds the vertebral bodies).
    bmd_estimator
        ``"roi"`` (calibrated trabecular ROI, built in), ``"bundle:PATH"`` (a vBMD bundle replaces it) or
        ``"both:PATH"`` (the ROI vBMD is reported with the model's beside it and their difference).
    erosion_mm
        Trabecular ROI erosion (default ``dicomnode.DEFAULT_EROSION_MM``).
    contrast_policy
        ``"offset"`` or ``"abstain"`` (``BmdOptions.contrast_correction``).
    disclaimer
        Burned into the overlays (None: the report's default).
    """

    segmentation: str = "classical"
    bmd_estimator: str = "roi"
    erosion_mm: float = DEFAULT_EROSION_MM
    contrast_policy: str = "offset"
    disclaimer: str | None = None
    #: Knee-radiograph classifier bundle (``dicomnode train knee-xray``); None: knee jobs say "no model".
    knee_bundle: str | None = None
    #: Image + lab-value fusion bundle (``dicomnode train fusion``): knee and CT jobs with lab values, as its
    #: image input says (``dicomnode.pipeline.fusion``).
    fusion_bundle: str | None = None

    def bundles(self) -> list[tuple[str, str, Path]]:
        """``(role, task, path)`` of every bundle these options use (role ``segmentation`` or ``bmd``)."""
        out: list[tuple[str, str, Path]] = []
        if self.segmentation != "classical":
            out.append(("segmentation", "segmentation", Path(self.segmentation.partition(":")[2])))
        if self.bmd_estimator not in ROI_ESTIMATORS:
            out.append(("bmd", "bmd", Path(self.bmd_estimator.partition(":")[2])))
        return out


def resolve_options(
    backend: str | None = "classical",
    segmentation_backend: str | None = None,
    bmd_estimator: str | None = None,
    *,
    erosion_mm: float | None = None,
    contrast_policy: str | None = None,
    disclaimer: str | None = None,
) -> AnalysisOptions:
    """Turn the configured choices into :class:`AnalysisOptions`.

    ``backend`` is the umbrella setting: ``classical``, or ``bundle:PATH`` / ``both:PATH`` whose bundle's
    task (read from its manifest) says what it replaces: a segmentation bundle the vertebra finder, a bmd
    bundle the vBMD (``both`` keeps the calibrated ROI beside it). ``segmentation_backend`` and
    ``bmd_estimator``, when given, win over ``backend``.

    Raises
    ------
    ConfigError
        An unknown choice (one line).
    BundleError
        A bundle whose manifest cannot be read, or a ``both:`` given a segmentation bundle.
    """
    from dicomnode.errors import BundleError, ConfigError

    seg = "classical"
    est = "roi"
    kind, _, rest = (backend or "classical").strip().partition(":")
    kind = kind.lower()
    if kind in ("bundle", "both") and rest.strip():
        from dicomnode.ml.bundle import read_manifest

        path = rest.strip()
        task = read_manifest(Path(path)).task
        if task == "segmentation":
            if kind == "both":
                raise BundleError(
                    f"bundle {path}: 'both:' needs a bmd bundle (a segmentation bundle is used as 'bundle:')"
                )
            seg = f"bundle:{path}"
        elif task in BMD_BUNDLE_TASKS:
            est = f"{kind}:{path}"
        else:
            raise BundleError(f"bundle {path}: task {task!r} cannot serve the node's analysis")
    elif kind not in ("classical", ""):
        raise ConfigError(f"analysis.backend: {backend!r} unknown (use classical, bundle:PATH or both:PATH)")
    if segmentation_backend is not None:
        skind, _, spath = segmentation_backend.strip().partition(":")
        if skind.lower() == "classical" and not spath:
            seg = "classical"
        elif skind.lower() == "bundle" and spath.strip():
            seg = f"bundle:{spath.strip()}"
        else:
            raise ConfigError(
                f"analysis.segmentation_backend: {segmentation_backend!r} unknown "
                "(use classical or bundle:PATH)"
            )
    if bmd_estimator is not None:
        ekind, _, epath = bmd_estimator.strip().partition(":")
        if ekind.lower() in ROI_ESTIMATORS and not epath:
            est = "roi"
        elif ekind.lower() in ("bundle", "both") and epath.strip():
            est = f"{ekind.lower()}:{epath.strip()}"
        else:
            raise ConfigError(
                f"analysis.bmd_estimator: {bmd_estimator!r} unknown (use roi, bundle:PATH or both:PATH)"
            )
    if contrast_policy not in (None, "offset", "abstain"):
        raise ConfigError(f"analysis.contrast_policy: {contrast_policy!r} unknown (use offset or abstain)")
    return AnalysisOptions(
        segmentation=seg,
        bmd_estimator=est,
        erosion_mm=DEFAULT_EROSION_MM if erosion_mm is None else float(erosion_mm),
        contrast_policy=contrast_policy or "offset",
        disclaimer=disclaimer,
    )


def options_from_settings(settings: Any) -> AnalysisOptions:
    """:func:`resolve_options` of ``settings.analysis`` (a ``dicomnode.config.Settings``)."""
    a = settings.analysis
    options = resolve_options(
        a.backend,
        a.segmentation_backend,
        a.bmd_estimator,
        erosion_mm=a.erosion_mm,
        contrast_policy=a.contrast_policy,
        disclaimer=a.disclaimer,
    )
    knee, fusion = getattr(a, "knee_bundle", None), getattr(a, "fusion_bundle", None)
    return dataclasses.replace(options, knee_bundle=knee, fusion_bundle=fusion) if knee or fusion else options


def check_options(options: AnalysisOptions) -> list[str]:
    """Start-up check of every bundle the options use: it loads (manifest valid, SHA-256 of the weights
    matching, weights fitting the network), has the task its role needs, and its input spec can be met by
    the series the node analyses (CT in Hounsfield units, 3-D).

    Returns
    -------
    list of str
        The identification (name, version, checksum) of each bundle, for the start-up log.

    Raises
    ------
    BundleError
        One line naming the bundle and the reason.
    """
    from dicomnode.errors import BundleError

    idents: list[str] = []
    for role, task, path in options.bundles():
        bundle = _load_bundle(path)
        m = bundle.manifest
        if m.task != task and not (task == "bmd" and m.task in BMD_BUNDLE_TASKS):
            raise BundleError(f"bundle {path}: task {m.task!r}, but the {role} role needs a {task!r} bundle")
        spec = m.input_spec
        if "CT" not in spec.modalities:
            raise BundleError(
                f"bundle {m.name} {m.version}: input spec accepts {', '.join(spec.modalities) or 'nothing'}, "
                "not the CT series this node analyses"
            )
        # a sagittal bundle takes 2-D reformats the node makes from the same 3-D volume
        dims = 2 if m.task == "sagittal_bmd_tbs" else 3
        if len(spec.patch_size) != dims or spec.in_channels != 1:
            raise BundleError(
                f"bundle {m.name} {m.version}: input spec wants {len(spec.patch_size)}-D patches with "
                f"{spec.in_channels} channel(s); the node feeds one 3-D CT volume"
            )
        if spec.min_slices > MAX_BUNDLE_MIN_SLICES:
            raise BundleError(
                f"bundle {m.name} {m.version}: input spec needs {spec.min_slices} slices or more; "
                "no routine abdominal CT has that many"
            )
        idents.append(f"{role}: {m.identification}")
    idents.extend(_check_knee_and_fusion(options))
    return idents


def _check_knee_and_fusion(options: AnalysisOptions) -> list[str]:
    """Start-up check of the knee and fusion bundles (checksums, task): a tampered one stops the node."""
    idents: list[str] = []
    if options.knee_bundle:
        from dicomnode.ml.bundle import verify_bundle
        from dicomnode.ml.knee import check_knee_bundle

        manifest = verify_bundle(options.knee_bundle)
        check_knee_bundle(manifest)
        idents.append(f"knee: {manifest.identification}")
    if options.fusion_bundle:
        from dicomnode.ml.fusion import load_fusion_bundle

        idents.append(f"fusion: {load_fusion_bundle(options.fusion_bundle).identification}")
    return idents


#: Bundles loaded in this process, by resolved path (a bundle is read, verified and built once).
_BUNDLES: dict[str, Any] = {}


def _load_bundle(path: Path) -> Any:
    key = str(path.resolve())
    if key not in _BUNDLES:
        from dicomnode.ml.bundle import load_bundle

        _BUNDLES[key] = load_bundle(path)
    return _BUNDLES[key]


def make_measure(options: AnalysisOptions | None = None) -> Measure:
    """The measurement the options describe: ``dicomnode.bmd.analyze_volume`` with their erosion, contrast
    policy and segmentation backend, then the vBMD bundle (``bundle``/``both``) when one is configured.

    The result's ``algorithm_name``/``algorithm_version`` gain each bundle's name/version and
    ``algorithm_components`` lists every part with its version (the SR's algorithm identification).
    """
    opts = options or AnalysisOptions()

    def measure(volume: Volume) -> MeasuredSeries:
        import dicomnode

        bmd = importlib.import_module("dicomnode.bmd")  # imported when measuring: the CLI stays light
        from dicomnode.ml.bundle import check_input_spec

        for _, _, path in opts.bundles():  # refuse a series a bundle cannot serve before measuring anything
            check_input_spec(_load_bundle(path), volume)
        backend_name = "classical"
        if opts.segmentation != "classical":
            from dicomnode.bmd.backend_bundle import register_bundle_backend

            backend_name = register_bundle_backend(opts.segmentation)
        bmd_options = bmd.BmdOptions(
            erosion_mm=opts.erosion_mm, contrast_correction=opts.contrast_policy, backend=backend_name
        )
        out = bmd.analyze_volume(volume, bmd_options)
        result: AnalysisResult = out.result
        backend = bmd.get_backend(backend_name)
        components = [f"engine: {dicomnode.ALGORITHM_NAME} {dicomnode.__version__}"]
        if opts.segmentation == "classical":
            components.append(f"segmentation: {backend.name} {backend.version}")
        else:
            ident = getattr(backend, "identification", f"{backend.name} {backend.version}")
            components.append(f"segmentation: model bundle {ident}")
            seg_name = getattr(getattr(backend, "bundle", None), "name", backend.name)
            result = dataclasses.replace(result, algorithm_name=f"{result.algorithm_name}+{seg_name}")
        roi_line = f"vBMD: calibrated trabecular ROI (internal calibration), erosion {opts.erosion_mm:g} mm"
        if opts.bmd_estimator in ROI_ESTIMATORS:
            components.append(roi_line)
        else:
            from dicomnode.ml.inference import apply_bmd_bundle

            mode, _, bundle_path = opts.bmd_estimator.partition(":")
            bundle = _load_bundle(Path(bundle_path))
            roi_vbmd = result.summary.vbmd_l1_l2_mg_cm3 if result.summary is not None else None
            result = apply_bmd_bundle(result, volume, bundle, mode)
            model_line = f"vBMD: model bundle {bundle.manifest.identification}"
            if mode == "both":
                components.append(roi_line)
                agreement = next(
                    (
                        n
                        for n in (result.summary.notes if result.summary else ())
                        if n.startswith(bundle.name)
                    ),
                    None,
                )
                components.append(f"{model_line}, beside the ROI" + (f": {agreement}" if agreement else ""))
                log.info("vBMD agreement: ROI %s; %s", roi_vbmd, agreement)
            else:
                components.append(model_line)
        result = dataclasses.replace(result, algorithm_components=tuple(components))
        return cast("MeasuredSeries", dataclasses.replace(out, result=result))

    return measure
