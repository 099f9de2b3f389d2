"""Bundles: write, verify, load; tampered / incomplete bundles refused with one line; input spec checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.errors import BundleError
from dicomnode.imaging.volume import Volume
from dicomnode.ml import bundle as b
from dicomnode.ml.networks import seg_unet

KWARGS = {"n_classes": 3, "width": 4, "num_res_units": 0}


def _make(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = seg_unet(**KWARGS)
    out = tmp_path / "seg-bundle"
    b.write_bundle(
        out,
        net,
        factory="seg_unet",
        network_kwargs=KWARGS,
        name="test-seg",
        version="1.2.3",
        task="segmentation",
        input_spec=b.InputSpec(spacing_mm=(2.0, 2.0, 2.0), patch_size=(32, 32, 32)),
        output={"units": "class-index", "labels": {"1": "L1", "2": "L2"}},
        intended_use="tests only",
        training_data="random weights",
    )
    return out


def _volume(shape: tuple[int, int, int] = (16, 20, 20), spacing: float = 1.0, air: bool = True) -> Volume:
    data = np.full(shape, 40.0, np.float32)
    if air:
        data[:, :2, :] = -1000.0
    aff = np.diag([spacing, spacing, spacing, 1.0])
    return Volume(data=data, affine=aff, header={"Modality": "CT"})


def test_layout_and_roundtrip(tmp_path: Path) -> None:
    path = _make(tmp_path)
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (path / rel).is_file(), rel
    meta = json.loads((path / "configs/metadata.json").read_text())
    assert meta["weights"]["sha256"] == b.sha256_file(path / "models/model.pt")
    assert meta["input_spec"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert meta["output"]["units"] == "class-index"
    loaded = b.load_bundle(path)
    assert loaded.name == "test-seg" and loaded.version == "1.2.3"
    assert "test-seg 1.2.3" in loaded.manifest.identification
    assert not loaded.network.training
    torch.manual_seed(0)
    ref = seg_unet(**KWARGS).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.network(x), ref(x), atol=1e-6)


def test_tampered_weights_refused_one_line(tmp_path: Path) -> None:
    path = _make(tmp_path)
    w = path / "models/model.pt"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError) as exc:
        b.load_bundle(path)
    msg = str(exc.value)
    assert "sha256 mismatch" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("breakage", "expect"),
    [
        ("delete_weights", "missing weights"),
        ("delete_manifest", "missing configs/metadata.json"),
        ("bad_json", "invalid manifest"),
        ("no_sha", "lacks 'sha256'"),
        ("unknown_factory", "unknown network factory"),
        ("bad_spec", "input_spec"),
        ("escape_path", "inside the bundle"),
        ("wrong_shape", "do not fit the network"),
    ],
)
def test_broken_bundles_refused(tmp_path: Path, breakage: str, expect: str) -> None:
    path = _make(tmp_path)
    meta_p = path / "configs/metadata.json"
    meta = json.loads(meta_p.read_text())
    if breakage == "delete_weights":
        (path / "models/model.pt").unlink()
    elif breakage == "delete_manifest":
        meta_p.unlink()
    elif breakage == "bad_json":
        meta_p.write_text("{not json")
    elif breakage == "no_sha":
        del meta["weights"]["sha256"]
    elif breakage == "unknown_factory":
        meta["network"]["factory"] = "os.system"
    elif breakage == "bad_spec":
        meta["input_spec"]["spacing_mm"] = [0, 1, 1]
    elif breakage == "escape_path":
        meta["weights"]["path"] = "../../etc/passwd"
    elif breakage == "wrong_shape":
        meta["network"]["kwargs"]["width"] = 8  # checksum still fine, weights no longer fit
    if breakage not in ("delete_weights", "delete_manifest", "bad_json"):
        meta_p.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=expect) as exc:
        b.load_bundle(path)
    assert "\n" not in str(exc.value)


def test_validate_bundles_from_settings(tmp_path: Path) -> None:
    path = _make(tmp_path)
    settings = {"pipeline": {"segmentation_backend": f"bundle:{path}", "bmd_estimator": "roi"}}
    manifests = b.validate_bundles(settings)
    assert [m.name for m in manifests] == ["test-seg"]
    assert b.validate_bundles({"segmentation_backend": "classical"}) == []
    rel = {"pipelines": {"a": {"segmentation_backend": "bundle:seg-bundle"}}}
    assert len(b.validate_bundles(rel, base_dir=tmp_path)) == 1
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / "models/model.pt").write_bytes(b"evil")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        b.validate_bundles({"bmd_estimator": f"both:{copy}"})
    with pytest.raises(BundleError, match="unknown backend kind"):
        b.validate_bundles({"bmd_estimator": f"hub:{path}"})


def test_check_input_spec(tmp_path: Path) -> None:
    manifest = b.verify_bundle(_make(tmp_path))
    b.check_input_spec(manifest, _volume())  # acceptable
    with pytest.raises(BundleError, match="modality MR"):
        v = _volume()
        b.check_input_spec(manifest, Volume(v.data, v.affine, {"Modality": "MR"}))
    with pytest.raises(BundleError, match="coarser"):
        b.check_input_spec(manifest, _volume(spacing=7.0))
    with pytest.raises(BundleError, match="Hounsfield"):
        b.check_input_spec(manifest, _volume(air=False))
    with pytest.raises(BundleError, match="slices"):
        b.check_input_spec(manifest, _volume(shape=(3, 20, 20)))
    v = _volume()
    rot = np.eye(4)
    c, s = np.cos(np.radians(40)), np.sin(np.radians(40))
    rot[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    with pytest.raises(BundleError, match="oblique"):
        b.check_input_spec(manifest, Volume(v.data, rot @ v.affine, v.header))


def test_validate_bundles_reads_the_node_settings(tmp_path: Path) -> None:
    config = pytest.importorskip("dicomnode.config")
    path = _make(tmp_path)
    settings = config.Settings(analysis=config.AnalysisSettings(segmentation_backend=f"bundle:{path}"))
    assert [m.name for m in b.validate_bundles(settings)] == ["test-seg"]
    assert b.validate_bundles(config.Settings()) == []
    (path / "models/model.pt").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        b.validate_bundles(config.Settings(analysis=config.AnalysisSettings(backend=f"both:{path}")))
