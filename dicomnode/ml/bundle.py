"""Model bundles: a MONAI-layout folder with a checksummed manifest, verified before anything is loaded.

Layout (MONAI bundle conventions)::

    BUNDLE/
      configs/metadata.json    the manifest (MONAI metadata fields + dicomnode fields, below)
      configs/inference.json   MONAI-style config describing the network (documentation; never executed)
      models/model.pt          the weights: a plain ``state_dict`` (loaded with ``weights_only=True``)
      docs/README.md           intended use, training data statement, input spec, in words

Manifest fields we rely on: ``schema``, ``name``, ``version``, ``task``, ``network`` (``factory`` from
:data:`dicomnode.ml.networks.FACTORIES` + ``kwargs``), ``weights`` (``path``, ``sha256``), ``input_spec``,
``output`` (``units``...), ``intended_use``, ``training_data``.

Why the network is rebuilt from a registered factory and not from ``inference.json``'s ``_target_``: a
bundle is data received from elsewhere; naming arbitrary Python to import would make it code. Weights are
read with ``torch.load(weights_only=True)`` for the same reason. Nothing here ever touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.errors import BundleError
from dicomnode.imaging.volume import Volume

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

SCHEMA = "dicomnode-bundle/1"
METADATA = Path("configs/metadata.json")
INFERENCE = Path("configs/inference.json")
WEIGHTS = Path("models/model.pt")
README = Path("docs/README.md")

#: Tasks a bundle may declare, and what its outputs mean.
TASKS: dict[str, str] = {
    "segmentation": "per-voxel classes: 0 background, 1..N vertebral levels (see output.labels)",
    "bmd": "per-vertebra trabecular vBMD (mg/cm3) from a vertebral crop",
    "sagittal_bmd_tbs": "BMD and trabecular bone score from a mid-sagittal reformat",
    "radiograph": "osteoporosis class from a radiograph",
}


@dataclass(frozen=True)
class InputSpec:
    """What a series must offer for the network to be applied, and how it is prepared.

    ``spacing_mm`` is the (i, j, k) grid the network was trained on (the series is resampled to it);
    ``orientation`` the axis code after :meth:`Volume.canonical` ("LPS"); ``intensity_window`` the HU range
    clipped and scaled to [0, 1]; ``patch_size`` the network input in voxels. The limits below refuse a
    series the spec cannot meet instead of producing a number from it.
    """

    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)
    orientation: str = "LPS"
    intensity_window: tuple[float, float] = (-200.0, 1200.0)
    patch_size: tuple[int, ...] = (64, 64, 64)
    modalities: tuple[str, ...] = ("CT",)
    #: Coarsest acceptable voxel side (mm); thicker slices lose the trabecular signal.
    max_spacing_mm: float = 5.0
    #: Largest angle (degrees) between a volume axis and the nearest patient axis.
    max_obliquity_deg: float = 20.0
    #: Values must be Hounsfield units (air near -1000 present).
    requires_hu: bool = True
    #: Fewest slices a 3D series must have.
    min_slices: int = 8
    in_channels: int = 1
    #: "none" or "fat-soft-tissue" (fat and soft-tissue histogram peaks mapped to -100 / 50 HU).
    intensity_normalisation: str = "none"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise BundleError(f"input_spec: unknown field(s) {', '.join(sorted(unknown))}")
        kw: dict[str, Any] = dict(d)
        for key in ("spacing_mm", "intensity_window", "patch_size", "modalities"):
            if key in kw:
                kw[key] = tuple(kw[key])
        spec = cls(**kw)
        if len(spec.spacing_mm) != 3 or any(not (s > 0) for s in spec.spacing_mm):
            raise BundleError("input_spec.spacing_mm must be three positive numbers")
        if len(spec.intensity_window) != 2 or not spec.intensity_window[0] < spec.intensity_window[1]:
            raise BundleError("input_spec.intensity_window must be [low, high] with low < high")
        if not spec.patch_size or any(int(p) <= 0 for p in spec.patch_size):
            raise BundleError("input_spec.patch_size must be positive integers")
        if spec.intensity_normalisation not in ("none", "fat-soft-tissue"):
            raise BundleError(f"input_spec.intensity_normalisation {spec.intensity_normalisation!r} unknown")
        if spec.orientation != "LPS":
            raise BundleError(f"input_spec.orientation {spec.orientation!r} not supported (only LPS)")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    task: str
    factory: str
    network_kwargs: Mapping[str, Any]
    weights_path: str
    sha256: str
    input_spec: InputSpec
    output: Mapping[str, Any]
    intended_use: str
    training_data: str
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def identification(self) -> str:
        """``name version (sha256 prefix)``: what the SR's algorithm identification names."""
        return f"{self.name} {self.version} (sha256:{self.sha256[:12]})"


@dataclass(frozen=True, eq=False)
class LoadedBundle:
    path: Path
    manifest: Manifest
    network: nn.Module
    device: str = "cpu"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input_spec


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _require(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise BundleError(f"{where}: manifest lacks {key!r}")
    v = d[key]
    if not isinstance(v, kind):
        raise BundleError(f"{where}: manifest field {key!r} has the wrong type")
    return v


def read_manifest(path: Path) -> Manifest:
    """Read and validate ``configs/metadata.json`` of a bundle (no checksum, no torch).

    Parameters
    ----------
    path : Path
        The bundle folder.

    Returns
    -------
    Manifest
        The validated manifest.

    Raises
    ------
    BundleError
        Missing folder/file, invalid JSON or a missing/invalid field (one line naming it).
    """
    where = str(path)
    if not path.is_dir():
        raise BundleError(f"bundle {where}: not a folder")
    meta = path / METADATA
    if not meta.is_file():
        raise BundleError(f"bundle {where}: missing {METADATA}")
    if not (path / INFERENCE).is_file():
        raise BundleError(f"bundle {where}: missing {INFERENCE}")
    try:
        raw = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"bundle {where}: invalid manifest {METADATA}: {exc}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"bundle {where}: invalid manifest (not a JSON object)")
    where = f"bundle {where}"
    schema = _require(raw, "schema", str, where)
    if schema != SCHEMA:
        raise BundleError(f"{where}: unsupported manifest schema {schema!r} (expected {SCHEMA!r})")
    name = _require(raw, "name", str, where)
    version = _require(raw, "version", str, where)
    task = _require(raw, "task", str, where)
    if task not in TASKS:
        raise BundleError(f"{where}: unknown task {task!r}")
    net = _require(raw, "network", dict, where)
    factory = _require(net, "factory", str, where)
    from dicomnode.ml.networks import FACTORIES  # torch import only when a bundle is really read

    if factory not in FACTORIES:
        raise BundleError(f"{where}: unknown network factory {factory!r}")
    kwargs = net.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise BundleError(f"{where}: network.kwargs must be an object")
    weights = _require(raw, "weights", dict, where)
    wpath = _require(weights, "path", str, where)
    sha = _require(weights, "sha256", str, where).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise BundleError(f"{where}: weights.sha256 is not a SHA-256 hex digest")
    if Path(wpath).is_absolute() or ".." in Path(wpath).parts:
        raise BundleError(f"{where}: weights.path must stay inside the bundle")
    spec_raw = _require(raw, "input_spec", dict, where)
    try:
        spec = InputSpec.from_dict(spec_raw)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: invalid input_spec: {exc}") from None
    output = _require(raw, "output", dict, where)
    if "units" not in output:
        raise BundleError(f"{where}: manifest lacks output.units")
    intended = _require(raw, "intended_use", str, where)
    training = _require(raw, "training_data", str, where)
    return Manifest(name, version, task, factory, kwargs, wpath, sha, spec, output, intended, training, raw)


def verify_bundle(path: Path | str) -> Manifest:
    """Validate the manifest and check the weights' SHA-256 (cheap: no network is built).

    Parameters
    ----------
    path : Path or str
        The bundle folder.

    Returns
    -------
    Manifest
        The verified manifest.

    Raises
    ------
    BundleError
        Invalid manifest, missing weights or checksum mismatch (one line).
    """
    p = Path(path)
    manifest = read_manifest(p)
    weights = p / manifest.weights_path
    if not weights.is_file():
        raise BundleError(f"bundle {p}: missing weights {manifest.weights_path}")
    actual = sha256_file(weights)
    if actual != manifest.sha256:
        raise BundleError(
            f"bundle {p}: sha256 mismatch for {manifest.weights_path} "
            f"(manifest {manifest.sha256[:12]}..., file {actual[:12]}...): "
            "refusing tampered or corrupt weights"
        )
    return manifest


def load_bundle(path: Path | str, device: str = "cpu") -> LoadedBundle:
    """Verify a bundle and load its network in eval mode.

    Parameters
    ----------
    path : Path or str
        The bundle folder.
    device : str
        ``cpu`` or ``cuda``.

    Returns
    -------
    LoadedBundle
        Manifest + network.

    Raises
    ------
    BundleError
        Any problem with the bundle (one line): manifest, checksum, weights not matching the network.
    """
    import torch

    from dicomnode.ml.networks import build

    p = Path(path)
    manifest = verify_bundle(p)
    try:
        net = build(manifest.factory, dict(manifest.network_kwargs))
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle {p}: cannot build network {manifest.factory}: {exc}") from None
    try:
        state = torch.load(p / manifest.weights_path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle; all mean the same to us
        raise BundleError(f"bundle {p}: cannot read weights: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise BundleError(f"bundle {p}: weights are not a state_dict")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"bundle {p}: weights do not fit the network: {first}") from None
    net.to(device)
    net.eval()
    log.info("loaded bundle %s", manifest.identification)
    return LoadedBundle(p, manifest, net, device)


def _obliquity_deg(affine: np.ndarray) -> float:
    a = affine[:3, :3]
    dirs = a / np.linalg.norm(a, axis=0)
    worst = 0.0
    for ax in range(3):
        cos = float(np.max(np.abs(dirs[:, ax])))
        worst = max(worst, math.degrees(math.acos(min(1.0, cos))))
    return worst


def check_input_spec(bundle: LoadedBundle | Manifest, volume: Volume) -> None:
    """Refuse a series the bundle's input spec cannot meet.

    Parameters
    ----------
    bundle : LoadedBundle or Manifest
        The bundle (only its manifest is read).
    volume : Volume
        The series.

    Raises
    ------
    BundleError
        One line naming the unmet requirement (modality, voxel size, obliquity, HU range, slice count).
    """
    manifest = bundle.manifest if isinstance(bundle, LoadedBundle) else bundle
    spec = manifest.input_spec
    who = f"bundle {manifest.name} {manifest.version}"
    modality = volume.header.get("Modality") if volume.header else None
    if modality is not None and str(modality) not in spec.modalities:
        raise BundleError(f"{who}: modality {modality} not accepted (needs {', '.join(spec.modalities)})")
    if spec.orientation == "LPS":
        ob = _obliquity_deg(volume.affine)
        if ob > spec.max_obliquity_deg:
            raise BundleError(f"{who}: volume is {ob:.0f} degrees oblique (limit {spec.max_obliquity_deg:g})")
    sp = volume.spacing
    if max(sp) > spec.max_spacing_mm:
        raise BundleError(
            f"{who}: voxel spacing {max(sp):.2f} mm coarser than the "
            f"{spec.max_spacing_mm:g} mm the model accepts"
        )
    if len(spec.patch_size) == 3 and min(volume.shape) < 2:
        raise BundleError(f"{who}: a 3D network needs a volume, got shape {volume.shape}")
    if len(spec.patch_size) == 3 and volume.shape[0] < spec.min_slices:
        raise BundleError(f"{who}: {volume.shape[0]} slices, the model needs at least {spec.min_slices}")
    if spec.requires_hu:
        lo = float(np.min(volume.data)) if volume.data.size else 0.0
        if lo > -500.0:
            raise BundleError(f"{who}: values do not look like Hounsfield units (minimum {lo:.0f}, no air)")


def write_bundle(
    out: Path,
    network: nn.Module,
    *,
    factory: str,
    network_kwargs: Mapping[str, Any],
    name: str,
    version: str,
    task: str,
    input_spec: InputSpec,
    output: Mapping[str, Any],
    intended_use: str,
    training_data: str,
    description: str = "",
    extra: Mapping[str, Any] | None = None,
    readme_extra: str = "",
) -> Manifest:
    """Write a bundle folder (weights, manifest with their SHA-256, inference config, README).

    Parameters
    ----------
    out : Path
        Bundle folder (created; existing files replaced).
    network : torch.nn.Module
        Trained network built by ``FACTORIES[factory](**network_kwargs)``.
    factory, network_kwargs
        How to rebuild it.
    name, version, task : str
        Identification (``task`` a key of :data:`TASKS`).
    input_spec : InputSpec
        What a series must offer.
    output : mapping
        Output description; must hold ``units``.
    intended_use, training_data : str
        Statements copied into the manifest and README.
    description : str
        One paragraph for the README.
    extra : mapping, optional
        More manifest fields (e.g. cross-validation figures).
    readme_extra : str
        Markdown appended to the README.

    Returns
    -------
    Manifest
        What :func:`verify_bundle` will read back.
    """
    import monai
    import torch

    if task not in TASKS:
        raise BundleError(f"unknown task {task!r}")
    if "units" not in output:
        raise BundleError("output must name its units")
    for sub in (METADATA.parent, WEIGHTS.parent, README.parent):
        (out / sub).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    tmp = out / (str(WEIGHTS) + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / WEIGHTS)
    digest = sha256_file(out / WEIGHTS)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in network_kwargs.items()}
    meta: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "task": task,
        "description": description or TASKS[task],
        "network": {"factory": factory, "kwargs": kwargs},
        "weights": {"path": str(WEIGHTS), "sha256": digest},
        "input_spec": input_spec.to_dict(),
        "output": dict(output),
        "intended_use": intended_use,
        "training_data": training_data,
        # MONAI bundle metadata fields, so MONAI tooling can list the bundle
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "changelog": {version: "written by dicomnode"},
        "authors": "dicomnode",
        "copyright": "see docs/README.md",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "num_channels": input_spec.in_channels,
                    "spatial_shape": list(input_spec.patch_size),
                    "dtype": "float32",
                    "value_range": [0, 1],
                }
            },
            "outputs": {"pred": {"type": "tensor", "format": str(output.get("units"))}},
        },
    }
    if extra:
        meta.update(extra)
    inference = {
        "imports": [],
        "bundle_root": ".",
        "device": "cpu",
        "network_def": {"_target_": f"dicomnode.ml.networks.{factory}", **kwargs},
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "note": "documentation only: dicomnode rebuilds the network from its own factory registry",
    }
    (out / METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (out / INFERENCE).write_text(json.dumps(inference, indent=2) + "\n", encoding="utf-8")
    spec_lines = "\n".join(f"- `{k}`: {v}" for k, v in input_spec.to_dict().items())
    (out / README).write_text(
        f"# {name} {version}\n\n{description or TASKS[task]}\n\n"
        f"## Intended use\n\n{intended_use}\n\n## Training data\n\n{training_data}\n\n"
        f"## Input specification\n\n{spec_lines}\n\n## Output\n\n"
        + "\n".join(f"- `{k}`: {v}" for k, v in output.items())
        + f"\n\n## Weights\n\n`{WEIGHTS}` sha256 `{digest}`\n"
        + (f"\n{readme_extra}\n" if readme_extra else ""),
        encoding="utf-8",
    )
    return read_manifest(out)


# --------------------------------------------------------------------------------------------- settings


def parse_backend_spec(spec: str) -> tuple[str, Path | None]:
    """Split a backend choice such as ``classical``, ``roi``, ``bundle:PATH`` or ``both:PATH``.

    Parameters
    ----------
    spec : str
        The configured value.

    Returns
    -------
    (kind, path)
        ``path`` is None for the built-in methods.
    """
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep:
        return kind, None
    if not rest.strip():
        raise BundleError(f"{spec!r}: bundle path missing after '{kind}:'")
    return kind, Path(rest.strip())


#: Settings fields :func:`validate_bundles` reads (dotted; the first found at each name wins).
BUNDLE_SETTING_FIELDS: tuple[str, ...] = (
    "analysis.backend",
    "backend",
    "segmentation_backend",
    "bmd_estimator",
    "pipeline.segmentation_backend",
    "pipeline.bmd_estimator",
    "analysis.segmentation_backend",
    "analysis.bmd_estimator",
)


def _get(obj: Any, dotted: str) -> Any:
    cur = obj
    for part in dotted.split("."):
        if cur is None:
            return None
        cur = cur.get(part) if isinstance(cur, Mapping) else getattr(cur, part, None)
    return cur


def bundle_specs_from_settings(settings: Any) -> list[str]:
    """The backend/estimator values in a settings object (or mapping) that name a bundle.

    Reads :data:`BUNDLE_SETTING_FIELDS`, plus every pipeline in ``settings.pipelines`` (mapping or list)
    with those fields.
    """
    found: list[str] = []
    containers: list[Any] = [settings]
    pipelines = _get(settings, "pipelines")
    if isinstance(pipelines, Mapping):
        containers.extend(pipelines.values())
    elif isinstance(pipelines, Sequence) and not isinstance(pipelines, str):
        containers.extend(pipelines)
    for c in containers:
        for f in BUNDLE_SETTING_FIELDS:
            v = _get(c, f)
            if isinstance(v, str) and ":" in v and v not in found:
                found.append(v)
    return found


def validate_bundle_specs(specs: Iterable[str], base_dir: Path | None = None) -> list[Manifest]:
    """Verify each ``bundle:PATH`` / ``both:PATH`` value (checksum and manifest).

    Parameters
    ----------
    specs : iterable of str
        Configured values.
    base_dir : Path, optional
        Folder relative paths are resolved against (the config file's folder).

    Returns
    -------
    list of Manifest
        One per bundle.

    Raises
    ------
    BundleError
        The first bundle that fails, with its reason (one line).
    """
    out: list[Manifest] = []
    for spec in specs:
        kind, path = parse_backend_spec(spec)
        if path is None:
            continue
        if kind not in ("bundle", "both"):
            raise BundleError(f"{spec!r}: unknown backend kind {kind!r} (use bundle:PATH or both:PATH)")
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        out.append(verify_bundle(path))
    return out


def validate_bundles(settings: Any, base_dir: Path | None = None) -> list[Manifest]:
    """Start-up check: every bundle the settings name exists, is intact and has a valid manifest.

    Parameters
    ----------
    settings : object or mapping
        The node settings; see :data:`BUNDLE_SETTING_FIELDS`.
    base_dir : Path, optional
        Folder relative bundle paths are resolved against.

    Returns
    -------
    list of Manifest
        The verified manifests (empty when only built-in methods are configured).

    Raises
    ------
    BundleError
        One line: which bundle and why (checksum mismatch, missing file, invalid manifest).
    """
    return validate_bundle_specs(bundle_specs_from_settings(settings), base_dir)
