"""Knee radiographs for founding study (e): preparation, the class of a radiograph, its activation map.

Preparation (the same in training and in the node, so a bundle sees what it was trained on):

1. **Side**: left knees are mirrored so every knee is seen as a right one (the fibula on one side).
2. **Grid**: resampled to the bundle's pixel size (``input_spec.spacing_mm[0]`` mm, square pixels).
3. **Knee region**: a square of ``patch_size`` pixels centred on the intensity-weighted centre of the bright
   (bone) pixels of the central part of the image, i.e. on the joint; padded with zeros at the edges.
4. **Intensity**: the crop is standardised (zero mean, unit standard deviation).

The class-activation map is Grad-CAM (the class score's gradient, averaged per channel, weights the last
convolutional feature map; Selvaraju et al., ICCV 2017), upsampled to the crop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicomnode.errors import BundleError, InputError, NotQualifyingError
from dicomnode.imaging.projection import Radiograph, is_knee, load_radiograph

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dicomnode.ml.bundle import InputSpec, LoadedBundle, Manifest

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
KNEE_PIPELINE = "knee-xray"


@dataclass(frozen=True)
class PreparedKnee:
    """A radiograph as the network sees it, and where the crop lies in the (mirrored, resampled) image."""

    crop: FloatArray  # (rows, columns), standardised
    display: FloatArray  # the same crop in [0, 1], for the overlay
    spacing_mm: float
    mirrored: bool
    #: Top-left corner of the crop in the mirrored, resampled image (may be negative: padded).
    origin_rc: tuple[int, int] = (0, 0)
    #: Shape of the mirrored, resampled image.
    resampled_shape: tuple[int, int] = (0, 0)

    def region_in_source(self, source_spacing_mm: tuple[float, float]) -> tuple[float, float, float, float]:
        """The crop as (row0, col0, row1, col1) in the source radiograph's pixels (mirroring undone)."""
        fr = self.spacing_mm / source_spacing_mm[0]
        fc = self.spacing_mm / source_spacing_mm[1]
        h, w = self.crop.shape
        r0, r1 = self.origin_rc[0] * fr, (self.origin_rc[0] + h) * fr
        c0, c1 = self.origin_rc[1] * fc, (self.origin_rc[1] + w) * fc
        if self.mirrored:
            width = self.resampled_shape[1] * fc
            c0, c1 = width - c1, width - c0
        return r0, c0, r1, c1


def prepare_knee(
    pixels: FloatArray,
    spacing_mm: tuple[float, float],
    laterality: str | None,
    target_mm: float,
    size: tuple[int, int],
) -> PreparedKnee:
    """Mirror, resample, crop around the knee and standardise one radiograph (see the module docstring)."""
    img = np.asarray(pixels, dtype=np.float32)
    mirrored = laterality == "L"
    if mirrored:
        img = img[:, ::-1]
    zoom = (spacing_mm[0] / target_mm, spacing_mm[1] / target_mm)
    img = ndimage.zoom(img, zoom, order=1, prefilter=False).astype(np.float32)
    rows, cols = img.shape
    centre_band = img[rows // 6 : rows - rows // 6, cols // 6 : cols - cols // 6]
    bright = np.clip(centre_band - np.quantile(centre_band, 0.6), 0.0, None)
    if float(bright.sum()) > 0:
        cy, cx = ndimage.center_of_mass(bright)
        cy, cx = cy + rows // 6, cx + cols // 6
    else:
        cy, cx = rows / 2, cols / 2
    h, w = size
    r0, c0 = round(cy - h / 2), round(cx - w / 2)
    display = np.zeros((h, w), dtype=np.float32)
    rs, cs = max(r0, 0), max(c0, 0)
    re_, ce = min(r0 + h, rows), min(c0 + w, cols)
    if re_ > rs and ce > cs:
        display[rs - r0 : re_ - r0, cs - c0 : ce - c0] = img[rs:re_, cs:ce]
    sd = float(display.std())
    crop = ((display - float(display.mean())) / (sd if sd > 1e-6 else 1.0)).astype(np.float32)
    return PreparedKnee(crop, np.clip(display, 0.0, 1.0), target_mm, mirrored, (r0, c0), (rows, cols))


def prepare_radiograph(rad: Radiograph, spec: InputSpec) -> PreparedKnee:
    """:func:`prepare_knee` with a bundle's input spec."""
    size = (int(spec.patch_size[0]), int(spec.patch_size[-1]))
    return prepare_knee(rad.pixels, rad.spacing_mm, rad.laterality, float(spec.spacing_mm[0]), size)


def check_knee(rad: Radiograph) -> None:
    """Refuse a radiograph whose header does not say it shows a knee, with the reason.

    Raises
    ------
    NotQualifyingError
        Body part / descriptions name no knee (e.g. a chest radiograph).
    """
    if not is_knee(rad.header):
        part = rad.body_part or "not given"
        raise NotQualifyingError(
            f"{rad.modality} image of body part {part}: not a knee radiograph (BodyPartExamined KNEE or a "
            "description naming the knee is needed)"
        )
    if rad.laterality == "B":
        raise NotQualifyingError("bilateral knee image: one knee per image is needed")


def load_training_image(path: Path) -> tuple[FloatArray, tuple[float, float], str | None]:
    """Pixels (bone bright, [0, 1]), spacing and laterality of a training image (DICOM CR/DX).

    Raises
    ------
    InputError
        Unreadable, or not a usable radiograph (one line naming the file).
    """
    try:
        rad = load_radiograph(path)
    except NotQualifyingError as exc:
        raise InputError(f"{path}: {exc}") from None
    return rad.pixels, rad.spacing_mm, rad.laterality


# ------------------------------------------------------------------------------------------ inference


def cam_layer(net: nn.Module) -> nn.Module:
    """The last convolutional stage of a classifier (what Grad-CAM looks at)."""
    inner = getattr(net, "backbone", net)  # networks wrapped for output scaling
    for name in ("layer4", "features"):
        layer = getattr(inner, name, None)
        if layer is not None:
            return layer  # type: ignore[no-any-return]
    raise BundleError(f"{type(inner).__name__}: no convolutional stage for a class-activation map")


def predict_with_cam(net: nn.Module, crop: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Class probabilities and the Grad-CAM map (same size as ``crop``, in [0, 1]) of the top class."""
    import torch

    layer = cam_layer(net)
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        seen["a"] = out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = torch.from_numpy(np.ascontiguousarray(crop))[None, None].requires_grad_(True)
            logits = net(x)
            probs = torch.softmax(logits, dim=1)[0].detach().numpy().astype(np.float32)
            top = int(np.argmax(probs))
            logits[0, top].backward()
    finally:
        handle.remove()
    act = seen["a"]
    grad = act.grad if act.grad is not None else torch.zeros_like(act)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(dim=1))[0].detach().numpy()
    zoom = (crop.shape[0] / cam.shape[0], crop.shape[1] / cam.shape[1])
    cam = ndimage.zoom(cam, zoom, order=1)[: crop.shape[0], : crop.shape[1]]
    peak = float(cam.max()) if cam.size else 0.0
    out = (cam / peak if peak > 0 else np.zeros_like(cam)).astype(np.float32)
    return probs, out


@dataclass(frozen=True)
class KneePrediction:
    """What a knee bundle says about one radiograph."""

    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    prepared: PreparedKnee
    heatmap: FloatArray
    identification: str

    @property
    def class_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def class_name(self) -> str:
        return self.class_names[self.class_index]

    @property
    def probability(self) -> float:
        return float(self.probabilities[self.class_index])


def class_names_of(manifest: Manifest) -> tuple[str, ...]:
    """The class names a radiograph bundle declares (``output.classes``)."""
    classes = manifest.output.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"bundle {manifest.name}: output.classes must list the class names")
    return tuple(classes)


def check_knee_bundle(manifest: Manifest) -> None:
    """A bundle serves knee radiographs only when its task is ``radiograph`` and it names its classes."""
    if manifest.task != "radiograph":
        raise BundleError(f"bundle {manifest.name}: task {manifest.task!r}, a 'radiograph' bundle is needed")
    class_names_of(manifest)
    modalities = set(manifest.input_spec.modalities)
    if not modalities & {"CR", "DX"}:
        raise BundleError(
            f"bundle {manifest.name}: input modalities {sorted(modalities)} include no CR or DX"
        )


def classify_radiograph(bundle: LoadedBundle, rad: Radiograph) -> KneePrediction:
    """Prepare a knee radiograph as the bundle's input spec says and classify it.

    Raises
    ------
    BundleError
        The bundle is not a radiograph classifier or refuses the image's modality.
    NotQualifyingError
        Not a knee (see :func:`check_knee`).
    """
    import torch

    check_knee_bundle(bundle.manifest)
    names = class_names_of(bundle.manifest)
    if rad.modality not in bundle.input_spec.modalities:
        raise BundleError(f"bundle {bundle.name}: modality {rad.modality} not accepted")
    check_knee(rad)
    prepared = prepare_radiograph(rad, bundle.input_spec)
    with torch.inference_mode(False):
        probs, cam = predict_with_cam(bundle.network, prepared.crop)
    if len(probs) != len(names):
        raise BundleError(f"bundle {bundle.name}: {len(probs)} outputs for {len(names)} classes")
    return KneePrediction(
        names, tuple(float(p) for p in probs), prepared, cam, bundle.manifest.identification
    )


def predict_crops(net: nn.Module, crops: Sequence[FloatArray], batch: int = 32) -> FloatArray:
    """Softmax probabilities ``(N, classes)`` of prepared crops (no gradients)."""
    import torch

    net.eval()
    out: list[npt.NDArray[np.float32]] = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            x = torch.from_numpy(np.stack(crops[i : i + batch]))[:, None]
            out.append(torch.softmax(net(x), dim=1).numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
