"""The DICOM series writer and re-gridding: valid files, exact geometry, honest orientation changes."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.errors import InputError
from dicomnode.imaging.volume import Volume
from dicomnode.imaging.writer import (
    crop_z,
    reorient,
    reorient_arrays,
    slab_average,
    write_dicom_series,
    write_localizer,
    write_study,
)
from dicomnode.phantom import Phantom, PhantomSpec, make_phantom

_PH: list[Phantom] = []


def _phantom() -> Phantom:
    if not _PH:
        _PH.append(
            make_phantom(
                PhantomSpec(
                    matrix=64, spacing_mm=5.0, thickness_mm=2.0, z_levels=("L1", "L2"), noise_sd=5.0, seed=1
                )
            )
        )
    return _PH[0]


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("dciodvfy (dicom3tools) is required under CI")
        pytest.skip("dciodvfy (dicom3tools) not installed")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


def _ramp_volume(affine: np.ndarray, shape: tuple[int, int, int] = (4, 5, 6)) -> Volume:
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 500.0
    return Volume(data=data, affine=affine)


def _world_map(v: Volume) -> dict[tuple[float, float, float], float]:
    k, j, i = np.indices(v.shape)
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    pts = np.round(v.index_to_lps(ijk), 4)
    return {tuple(p): float(x) for p, x in zip(pts, v.data.ravel(), strict=True)}


def test_reorient_keeps_every_voxel_at_its_world_position() -> None:
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    aff[:3, 3] = (-20.0, 30.0, -100.0)
    vol = _ramp_volume(aff)
    ref = _world_map(vol)
    for pos in ("HFS", "FFS", "HFP", "FFP", "PRONE"):
        for fr, fc in ((False, False), (True, False), (False, True)):
            out = reorient(vol, pos, flip_rows=fr, flip_cols=fc)
            assert _world_map(out) == ref
    ffs = reorient(vol, "FFS")
    assert ffs.affine[0, 0] < 0 and ffs.affine[1, 1] > 0 and ffs.affine[2, 2] < 0
    assert ffs.header["PatientPosition"] == "FFS"
    prone = reorient(vol, "PRONE")
    assert prone.affine[0, 0] < 0 and prone.affine[1, 1] < 0
    with pytest.raises(InputError):
        reorient(vol, "UPSIDE")


def test_reorient_arrays_moves_labels_with_the_image() -> None:
    aff = np.eye(4)
    vol = _ramp_volume(aff)
    labels = (vol.data > 0).astype(np.uint8)
    (d, lab), _ = reorient_arrays([vol.data, labels], aff, "HFP", flip_rows=True)
    np.testing.assert_array_equal(lab, (d > 0).astype(np.uint8))
    with pytest.raises(InputError):
        reorient_arrays([vol.data, labels[:2]], aff)


def test_crop_and_slab_average_keep_positions() -> None:
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = (0.0, 0.0, 10.0)
    vol = _ramp_volume(aff, (9, 3, 3))
    c = crop_z(vol, 12.0, 15.0)
    assert c.shape[0] == 4 and c.affine[2, 3] == 12.0
    np.testing.assert_array_equal(c.data, vol.data[2:6])
    with pytest.raises(InputError):
        crop_z(vol, 100.0, 200.0)
    s = slab_average(vol, 3.0)
    assert s.shape[0] == 3 and s.spacing[2] == 3.0
    assert s.affine[2, 3] == pytest.approx(11.0)  # centre of slices at z = 10, 11, 12
    np.testing.assert_allclose(s.data[0], vol.data[0:3].mean(axis=0))
    assert s.header["SliceThickness"] == 3.0


def test_written_series_is_valid_and_complete(tmp_path: Path) -> None:
    ph = _phantom()
    hdr = {"PatientName": "TEST^ONE", "PatientID": "ID42", "PatientAge": "071Y", "KVP": 100.0,
           "ContrastBolusAgent": "IOPAMIDOL", "SeriesDescription": "abd"}  # fmt: skip
    paths = write_dicom_series(ph.volume, tmp_path / "s", header=hdr)
    assert len(paths) == ph.volume.shape[0]
    dss = [pydicom.dcmread(p) for p in paths]
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.StudyInstanceUID for d in dss}) == 1
    d0 = dss[0]
    assert d0.SOPClassUID == pydicom.uid.CTImageStorage
    assert str(d0.PatientName) == "TEST^ONE" and d0.PatientID == "ID42" and d0.PatientAge == "071Y"
    assert float(d0.KVP) == 100.0 and d0.ContrastBolusAgent == "IOPAMIDOL"
    assert list(d0.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert d0.Modality == "CT" and d0.FrameOfReferenceUID
    assert float(d0.SliceThickness) == 2.0 and float(d0.SpacingBetweenSlices) == pytest.approx(2.0)
    assert [float(x) for x in d0.PixelSpacing] == [5.0, 5.0]
    # positions follow the affine slice by slice
    for k, d in enumerate(dss):
        expect = ph.volume.affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose([float(x) for x in d.ImagePositionPatient], expect[:3], atol=1e-4)
    assert _dciodvfy_errors(paths[0]) == []


def test_round_trip_through_the_loader(tmp_path: Path) -> None:
    loader = pytest.importorskip("dicomnode.imaging.loader")
    ph = _phantom()
    for n, (pos, fr, fc) in enumerate((("HFS", False, False), ("FFS", True, False), ("HFP", False, True))):
        out = tmp_path / f"o{n}"
        write_dicom_series(ph.volume, out, orientation=pos, flip_rows=fr, flip_cols=fc)
        loaded = loader.load_path(out)
        assert len(loaded.series) == 1
        vol = loader.load_series(loaded.series[0])
        a, b = ph.volume.canonical(), vol.canonical()
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
        assert np.abs(b.data - a.data).max() <= 0.5 + 1e-3  # rounding to integer stored values
        assert len(set(vol.slice_sop_instance_uids)) == vol.shape[0]


def test_signed_storage_when_values_fall_below_the_intercept(tmp_path: Path) -> None:
    aff = np.eye(4)
    vol = Volume(data=np.full((2, 4, 4), -1100.0, dtype=np.float32), affine=aff)
    paths = write_dicom_series(vol, tmp_path, rescale_intercept=-1024.0)
    d = pydicom.dcmread(paths[0])
    assert d.PixelRepresentation == 1
    hu = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
    assert np.all(hu == -1100.0)
    vol2 = replace(vol, data=np.full((2, 4, 4), 30.0, dtype=np.float32))
    d2 = pydicom.dcmread(write_dicom_series(vol2, tmp_path / "u")[0])
    assert d2.PixelRepresentation == 0


def test_oblique_geometry_is_written_exactly(tmp_path: Path) -> None:
    t = np.radians(20.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.7, 0.9, 3.0])
    aff[:3, 3] = (5.0, -7.0, 100.0)
    vol = _ramp_volume(aff)
    paths = write_dicom_series(vol, tmp_path)
    d = pydicom.dcmread(paths[1])
    iop = np.array([float(x) for x in d.ImageOrientationPatient])
    np.testing.assert_allclose(iop[:3], rot[:, 0], atol=1e-6)
    np.testing.assert_allclose(iop[3:], rot[:, 1], atol=1e-6)
    assert [float(x) for x in d.PixelSpacing] == [0.9, 0.7]
    np.testing.assert_allclose([float(x) for x in d.ImagePositionPatient], aff[:3, 3] + aff[:3, 2], atol=1e-5)
    bad = aff.copy()
    bad[:3, 2] = bad[:3, 0]
    with pytest.raises(InputError):
        write_dicom_series(replace(vol, affine=bad), tmp_path / "bad")


def test_compressed_transfer_syntax(tmp_path: Path) -> None:
    ph = _phantom()
    paths = write_dicom_series(
        ph.volume, tmp_path, transfer_syntax=pydicom.uid.RLELossless, z_range=(-1e9, 1e9)
    )
    d = pydicom.dcmread(paths[0])
    assert d.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    hu = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
    assert np.abs(hu - ph.volume.data[0]).max() <= 0.5 + 1e-3


def test_study_with_localizer_bone_and_soft_series(tmp_path: Path) -> None:
    ph = make_phantom(
        PhantomSpec(matrix=64, spacing_mm=5.0, thickness_mm=1.0, z_levels=("L1", "L2"), noise_sd=5.0, seed=2)
    )
    out = write_study(ph.volume, tmp_path, header={"AccessionNumber": "ACC9"})
    assert set(out) == {"localizer", "soft", "bone"}
    loc = pydicom.dcmread(out["localizer"][0])
    soft = [pydicom.dcmread(p) for p in out["soft"]]
    bone = [pydicom.dcmread(p) for p in out["bone"]]
    assert "LOCALIZER" in list(loc.ImageType)
    assert {loc.StudyInstanceUID, soft[0].StudyInstanceUID, bone[0].StudyInstanceUID} == {
        soft[0].StudyInstanceUID
    }
    assert len({loc.SeriesInstanceUID, soft[0].SeriesInstanceUID, bone[0].SeriesInstanceUID}) == 3
    assert float(soft[0].SliceThickness) == pytest.approx(3.0)
    assert float(bone[0].SliceThickness) == pytest.approx(5.0)
    assert soft[0].ConvolutionKernel == "STANDARD" and bone[0].ConvolutionKernel == "BONE"
    assert soft[0].AccessionNumber == bone[0].AccessionNumber == loc.AccessionNumber == "ACC9"
    all_uids = [d.SOPInstanceUID for d in [loc, *soft, *bone]]
    assert len(set(all_uids)) == len(all_uids)
    assert len(soft) == ph.volume.shape[0] // 3 and len(bone) == ph.volume.shape[0] // 5
    for p in (out["localizer"][0], out["soft"][0], out["bone"][0]):
        assert _dciodvfy_errors(p) == []


def test_localizer_projects_the_body(tmp_path: Path) -> None:
    ph = _phantom()
    d = pydicom.dcmread(write_localizer(ph.volume, tmp_path))
    img = d.pixel_array.astype(float)
    assert img.shape == (ph.volume.shape[0], ph.volume.shape[2])
    # the body's midline (spine) attenuates far more than the edge of the field (air + table only)
    assert img[:, img.shape[1] // 2].mean() > 2.5 * img[:, 0].mean()
    assert d.ImageOrientationPatient == [1, 0, 0, 0, 0, -1]
