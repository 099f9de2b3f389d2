"""Label schemes, NIfTI round trip (LPS <-> RAS), phantom export, preprocessing geometry, folds by patient."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest

from dicomnode.errors import InputError
from dicomnode.imaging.volume import Volume
from dicomnode.ml import datasets as ds
from dicomnode.ml import preprocess as pp
from dicomnode.ml.train import patient_folds, read_bmd_dataset, read_segmentation_dataset


def test_label_schemes_map_to_levels() -> None:
    ts = np.array([0, 33, 32, 31, 30, 29, 28, 27, 26, 5, 79])
    assert ds.map_seg_targets(ts, "totalseg").tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 2, 0, 0]
    assert ds.map_labels(ts, "totalseg").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    verse = np.array([0, 18, 19, 20, 21, 22, 23, 24, 25, 28, 8])
    assert ds.map_labels(verse, "verse").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    assert ds.detect_scheme(np.array([0, 1, 7])) == "dicomnode"
    assert ds.detect_scheme(np.array([0, 19, 20, 21])) == "verse"
    assert ds.detect_scheme(np.array([0, 1, 5, 31, 32, 79])) == "totalseg"
    assert ds.map_labels(ts, "auto").tolist()[3] == ds.LEVEL_CLASSES["L1"]
    with pytest.raises(InputError):
        ds.map_labels(ts, "nonsense")


def test_nifti_roundtrip_keeps_lps_geometry(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    aff = np.array([[0.8, 0, 0, -100.0], [0, 0.9, 0, -50.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    ds.write_nifti(tmp_path / "x.nii.gz", data, aff)
    back, aff2 = ds.read_nifti(tmp_path / "x.nii.gz")
    assert np.array_equal(back, data)
    assert np.allclose(aff2, aff)
    import nibabel as nib

    ras = nib.load(str(tmp_path / "x.nii.gz")).affine
    assert ras[0, 3] == pytest.approx(100.0) and ras[1, 3] == pytest.approx(50.0)  # LPS -> RAS flips x, y


def test_synthetic_case_physics_and_export(tmp_path: Path) -> None:
    case = ds.synthetic_case(3)
    assert set(np.unique(case.labels)) == set(range(10))
    # labels run cranial (T11 = 1) to caudal (L5 = 7): centroid z decreases with the class
    zs = [np.argwhere(case.labels == c)[:, 0].mean() for c in range(1, 8)]
    assert all(a > b for a, b in itertools.pairwise(zs))
    seg = ds.export_segmentation([case, ds.synthetic_case(4, patient_id=case.patient_id)], tmp_path / "seg")
    items = read_segmentation_dataset(seg)
    assert [it.patient_id for it in items] == [case.patient_id] * 2
    csv_path = ds.export_bmd([case], tmp_path / "bmd", with_masks=False)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 7 and {r["level"] for r in rows} == set(ds.LEVEL_CLASSES)
    l1 = next(r for r in rows if r["level"] == "L1")
    assert float(l1["bmd_mg_cm3"]) == pytest.approx(case.vbmd["L1"], abs=1e-3)
    got = np.array([float(l1[c]) for c in ("cx", "cy", "cz")])
    kji = np.argwhere(case.labels == ds.LEVEL_CLASSES["L1"]).mean(axis=0)
    assert np.allclose(got, case.volume.index_to_lps(kji[::-1]), atol=1e-2)
    assert len(read_bmd_dataset(csv_path)) == 7


def test_patient_folds_never_split_a_patient() -> None:
    pids = [f"P{i // 3}" for i in range(30)]  # three rows per patient
    folds = patient_folds(pids, 5, seed=1)
    flat = [p for f in folds for p in f]
    assert sorted(flat) == sorted(set(pids)) and len(flat) == len(set(flat))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert folds == patient_folds(pids, 5, seed=1)
    with pytest.raises(InputError):
        patient_folds(["a", "b"], 5, 0)


def test_resample_roundtrip_and_affine() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(0, 1, (20, 30, 40)).astype(np.float32)
    aff = np.diag([0.7, 0.8, 2.0, 1.0])
    aff[:3, 3] = (10.0, -20.0, 5.0)
    vol = Volume(data=data, affine=aff)
    grid = pp.resample_grid(vol, (1.4, 1.6, 2.0))
    assert grid.shape == (20, 15, 20)
    # a voxel of the resampled grid and the same point in the source agree in LPS
    p_new = grid.affine[:3, :3] @ np.array([3.0, 4.0, 5.0]) + grid.affine[:3, 3]
    src_kji = np.array([5.0, 4.0, 3.0]) * grid.scale + grid.shift
    assert np.allclose(p_new, vol.index_to_lps(src_kji[::-1]))
    labels = (data > 0).astype(np.int16)
    down = pp.resample_to(labels, grid, order=0)
    back = pp.resample_back(down, grid, order=0)
    assert back.shape == data.shape
    smooth = np.zeros_like(data)
    smooth[:, 10:20, 10:30] = 1.0
    rt = pp.resample_back(pp.resample_to(smooth, grid), grid)
    assert np.abs(rt - smooth).mean() < 0.05


def test_tissue_normalisation_removes_scanner_gain_and_offset() -> None:
    case = ds.synthetic_case(5)
    vol = case.volume
    shifted = Volume(data=vol.data * 1.05 + 12.0, affine=vol.affine, header=vol.header)
    a = pp.prepare(vol, (2.0, 2.0, 2.0), (-200.0, 600.0), "fat-soft-tissue")
    b = pp.prepare(shifted, (2.0, 2.0, 2.0), (-200.0, 600.0), "fat-soft-tissue")
    core = case.labels > 0
    diff_hu = np.abs(a.array[core] - b.array[core]).mean() * 800.0
    raw = pp.prepare(shifted, (2.0, 2.0, 2.0), (-200.0, 600.0), "none")
    raw_a = pp.prepare(vol, (2.0, 2.0, 2.0), (-200.0, 600.0), "none")
    diff_raw = np.abs(raw.array[core] - raw_a.array[core]).mean() * 800.0
    assert diff_hu < diff_raw / 3
    assert pp.tissue_peaks(np.full(5000, 40.0)) is None


def test_crop_pads_outside() -> None:
    arr = np.ones((10, 10, 10), np.float32)
    c = pp.crop(arr, (0.0, 5.0, 5.0), (6, 6, 6))
    assert c.shape == (6, 6, 6) and c[0].sum() == 0 and c[-1].sum() == 36


def test_totalsegmentator_labels_on_real_ct(tmp_path: Path, abdomen_ct: Path, abdomen_seg: Path) -> None:
    """A real CT with TotalSegmentator v2 labels reads as a training case: levels and sacrum found."""
    from dicomnode.ml.train import TrainConfig, _load_seg_case, _seg_spec

    rows = tmp_path / "data.csv"
    rows.write_text(f"id,patient_id,image,label\nts1,p1,{abdomen_ct},{abdomen_seg}\n")
    (item,) = read_segmentation_dataset(rows)
    spec = _seg_spec(TrainConfig(task="segmentation", data=rows, out=tmp_path, patch=(48, 48, 48)))
    case = _load_seg_case(item, spec, "auto")
    present = set(np.unique(case.labels_canonical).tolist())
    assert {ds.LEVEL_CLASSES[lvl] for lvl in ("T12", "L1", "L2", "L3", "L4", "L5")} <= present
    assert set(np.unique(case.labels_rs).tolist()) == {0, ds.SEG_VERTEBRA, ds.SEG_SACRUM}
    # L1 lies above L2 in the canonical volume (k grows superiorly)
    z = {
        lvl: np.argwhere(case.labels_canonical == ds.LEVEL_CLASSES[lvl])[:, 0].mean() for lvl in ("L1", "L2")
    }
    assert z["L1"] > z["L2"]


def test_dicom_series_loads_for_training(shared_data: Path) -> None:
    pytest.importorskip("dicomnode.imaging.loader")
    vol = ds.load_image(shared_data / "totalsegmentator_petct_dicom" / "dicom")
    assert vol.shape[0] == 20 and vol.data.min() < -900
