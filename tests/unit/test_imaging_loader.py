"""Series scanning and loading on small synthetic DICOM built in the test (geometry, encodings, errors)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicomnode.errors import InputError, NotQualifyingError
from dicomnode.imaging.loader import AIR_HU, load_path, load_series, scan, scan_path
from dicomnode.imaging.volume import Volume

ROWS, COLS = 6, 8
STUDY = generate_uid()


def ct_dataset(
    position: Sequence[float] | npt.NDArray[np.float64],
    *,
    pixels: npt.NDArray[Any] | None = None,
    iop: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    spacing: tuple[float, float] = (0.8, 0.7),
    series_uid: str | None = "1.2.3.4",
    study_uid: str = STUDY,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = True,
    padding: int | None = None,
    instance_number: int = 1,
    rows: int = ROWS,
    cols: int = COLS,
) -> Dataset:
    """A minimal but valid single-frame CT Image dataset (pixel values are stored values)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or ""
    ds.FrameOfReferenceUID = "1.2.3.9"
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.PatientPosition = "HFS"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if padding is not None:
        ds.add_new(0x00280120, "SS" if signed else "US", padding)
    if pixels is None:
        pixels = np.full((rows, cols), 1024, dtype=np.int16)
    arr = pixels.astype(np.int16 if signed else np.uint16)
    ds.PixelData = arr.tobytes()
    return ds


def save(ds: Dataset, path: Path, ts: str = ExplicitVRLittleEndian, with_meta: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if with_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = UID(ts)
        if ts == ExplicitVRBigEndian:
            # pydicom writes OW bytes as given: store them big-endian
            bits = np.dtype(">i2") if ds.PixelRepresentation else np.dtype(">u2")
            little = np.dtype("<i2") if ds.PixelRepresentation else np.dtype("<u2")
            ds.PixelData = np.frombuffer(ds.PixelData, dtype=little).astype(bits).tobytes()
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def marked(k: int) -> npt.NDArray[np.int16]:
    """Stored pixels of slice k: 1024 + 10*k everywhere (HU = 10*k after intercept -1024)."""
    return np.full((ROWS, COLS), 1024 + 10 * k, dtype=np.int16)


def one(path: Path) -> Volume:
    series = scan_path(path)
    assert len(series) == 1
    return load_series(series[0])


# ---------------------------------------------------------------------------------------------------
# scanning


def test_scan_shuffled_names_nested_folders_and_junk(tmp_path: Path) -> None:
    n = 7
    order = list(range(n))
    random.Random(3).shuffle(order)
    for idx, k in enumerate(order):
        # instance numbers deliberately run against z; names carry no order
        ds = ct_dataset((0, 0, 5.0 * k), pixels=marked(k), instance_number=100 - idx)
        save(ds, tmp_path / f"sub{idx % 3}" / f"img_{random.Random(idx).randint(0, 10**9)}")
    (tmp_path / "notes.txt").write_text("not dicom")
    dicomdir = Dataset()
    dicomdir.SOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.SOPInstanceUID = generate_uid()
    save(dicomdir, tmp_path / "DICOMDIR")
    (tmp_path / "empty.bin").write_bytes(b"")
    result = scan(tmp_path)
    assert len(result.series) == 1
    assert len(result.series[0].instances) == n
    assert {Path(p).name for p in result.ignored} == {"notes.txt", "empty.bin", "DICOMDIR"}
    vol = load_series(result.series[0])
    assert vol.shape == (n, ROWS, COLS)
    # slice k holds HU 10*k: sorted by position, not by instance number or name
    np.testing.assert_array_equal(vol.data[:, 0, 0], [10.0 * k for k in range(n)])
    assert vol.spacing == pytest.approx((0.7, 0.8, 5.0))
    np.testing.assert_allclose(vol.affine[:3, 3], (0, 0, 0))
    assert len(set(vol.slice_sop_instance_uids)) == n


def test_scan_separates_mixed_series(tmp_path: Path) -> None:
    for k in range(3):
        save(ct_dataset((0, 0, k), series_uid="1.2.3.1"), tmp_path / f"a{k}")
    for k in range(4):
        save(ct_dataset((0, 0, 2 * k), series_uid="1.2.3.2"), tmp_path / f"b{k}")
    series = scan_path(tmp_path)
    assert sorted((s.series_instance_uid, len(s.instances)) for s in series) == [
        ("1.2.3.1", 3),
        ("1.2.3.2", 4),
    ]
    for s in series:
        assert s.summary.series_instance_uid == s.series_instance_uid
        assert s.summary.study_instance_uid == STUDY
        assert load_series(s).shape[0] == len(s.instances)


def test_missing_series_uid_grouped_by_geometry(tmp_path: Path) -> None:
    for k in range(3):
        save(ct_dataset((0, 0, k), series_uid=None), tmp_path / f"a{k}")
    for k in range(2):  # same study, other matrix size: a different series
        save(
            ct_dataset((0, 0, k), series_uid=None, rows=4, cols=4, pixels=np.zeros((4, 4))),
            tmp_path / f"b{k}",
        )
    series = scan_path(tmp_path)
    assert sorted(len(s.instances) for s in series) == [2, 3]
    for s in series:
        assert s.series_instance_uid.startswith("2.25.")
        assert s.summary.get("SeriesInstanceUIDSynthesized") is True
    again = scan_path(tmp_path)
    assert sorted(s.series_instance_uid for s in again) == sorted(s.series_instance_uid for s in series)


def test_scan_never_raises(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "random.dcm").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    good = save(ct_dataset((0, 0, 0)), tmp_path / "good.dcm")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good.read_bytes()[:200])  # header cut in the middle
    result = scan(tmp_path)
    assert [s.paths for s in result.series] == [(str(good),)]
    assert [Path(p).name for p, _ in result.unreadable] == ["broken.dcm"]
    assert [Path(p).name for p in result.ignored] == ["random.dcm"]
    assert all(isinstance(reason, str) and "\n" not in reason for _, reason in result.unreadable)
    missing = scan(tmp_path / "nope")
    assert missing.series == [] and missing.unreadable[0][1] == "path does not exist"


def test_load_path_folder_reports_unreadable(tmp_path: Path) -> None:
    save(ct_dataset((0, 0, 0)), tmp_path / "good.dcm")
    good = (tmp_path / "good.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[:150])
    loaded = load_path(tmp_path)
    assert loaded.volume is None and len(loaded.series) == 1
    assert [Path(p).name for p, _ in loaded.unreadable] == ["cut.dcm"]
    with pytest.raises(InputError, match="truncated"):
        load_path(tmp_path / "cut.dcm")


def test_load_path_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="not a DICOM file"):
        load_path(tmp_path / "x.txt")
    with pytest.raises(InputError, match="no DICOM series found"):
        load_path(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        load_path(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------
# geometry


def test_gap_is_refused(tmp_path: Path) -> None:
    for k, z in enumerate([0.0, 2.0, 4.0, 8.0, 10.0]):
        save(ct_dataset((0, 0, z)), tmp_path / f"{k}")
    with pytest.raises(InputError, match=r"gap of 4\.00 mm"):
        one(tmp_path)


def test_identical_duplicate_is_dropped(tmp_path: Path) -> None:
    for k in range(4):
        save(ct_dataset((0, 0, 3.0 * k), pixels=marked(k)), tmp_path / f"{k}")
    save(ct_dataset((0, 0, 3.0), pixels=marked(1)), tmp_path / "dup")  # same image, new SOP UID
    vol = one(tmp_path)
    assert vol.shape[0] == 4
    assert vol.header["dropped_duplicate_slices"] == 1
    np.testing.assert_array_equal(vol.data[:, 0, 0], [0, 10, 20, 30])


def test_conflicting_duplicate_is_refused(tmp_path: Path) -> None:
    for k in range(4):
        save(ct_dataset((0, 0, 3.0 * k), pixels=marked(k)), tmp_path / f"{k}")
    save(ct_dataset((0, 0, 3.0), pixels=marked(7)), tmp_path / "other")
    with pytest.raises(InputError, match="same slice position"):
        one(tmp_path)


def _cross(a: Sequence[float], b: Sequence[float]) -> npt.NDArray[np.float64]:
    return np.cross(np.asarray(a, dtype=float), np.asarray(b, dtype=float))


ORIENTATIONS = {
    "HFS": (1, 0, 0, 0, 1, 0),
    "FFS": (-1, 0, 0, 0, 1, 0),
    "HFP": (-1, 0, 0, 0, -1, 0),
    "FFP": (1, 0, 0, 0, -1, 0),
    "HFS-flipped-rows": (1, 0, 0, 0, -1, 0),
    "oblique": (0.8660254, 0.5, 0.0, -0.5, 0.8660254, 0.0),
    "coronal": (1, 0, 0, 0, 0, -1),
}


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_affine_maps_marker_voxel_to_its_patient_position(tmp_path: Path, name: str) -> None:
    iop = ORIENTATIONS[name]
    row_cos, col_cos = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = _cross(iop[:3], iop[3:])
    origin = np.array([-12.5, 30.0, 100.0])
    spacing = (0.8, 0.7)  # (row spacing, column spacing)
    n, mark = 5, (3, 2, 4)  # (slice index along the normal, row, column)
    order = [4, 0, 2, 1, 3]
    expected = None
    for idx, k in enumerate(order):
        ipp = origin + normal * 2.5 * k
        px = np.full((ROWS, COLS), 1024, dtype=np.int16)
        if k == mark[0]:
            px[mark[1], mark[2]] = 1024 + 999
            # DICOM: P = IPP + col_index * row_cos * col_spacing + row_index * col_cos * row_spacing
            expected = ipp + mark[2] * row_cos * spacing[1] + mark[1] * col_cos * spacing[0]
        save(ct_dataset(ipp, pixels=px, iop=iop, spacing=spacing, instance_number=idx), tmp_path / f"f{idx}")
    vol = one(tmp_path)
    assert expected is not None
    assert vol.shape == (n, ROWS, COLS)
    k, j, i = (int(v[0]) for v in np.nonzero(vol.data == 999))
    np.testing.assert_allclose(vol.index_to_lps((i, j, k)), expected, atol=1e-6)
    np.testing.assert_allclose(vol.lps_to_index(expected), (i, j, k), atol=1e-6)
    # canonical() (flips/permutations only) keeps the voxel at the same patient position
    can = vol.canonical()
    kc, jc, ic = (int(v[0]) for v in np.nonzero(can.data == 999))
    np.testing.assert_allclose(can.index_to_lps((ic, jc, kc)), expected, atol=1e-6)


def test_gantry_tilt_is_refused_with_angle(tmp_path: Path) -> None:
    tilt = np.tan(np.radians(15.0))
    for k in range(5):
        z = 2.0 * k
        save(ct_dataset((0.0, tilt * z, z)), tmp_path / f"{k}")
    with pytest.raises(InputError, match=r"gantry tilt of 15\.0 deg not supported"):
        one(tmp_path)


def test_gantry_tilt_resampled_on_request_keeps_positions(tmp_path: Path) -> None:
    # each slice 2 mm higher and one pixel row (0.8 mm) further posterior: a sheared stack
    expected = []
    for k in range(5):
        px = np.full((ROWS, COLS), 1024, dtype=np.int16)
        px[0, 3] = 1024 + 500 + k  # one marker per slice, at the same pixel of every slice
        ipp = np.array([0.0, 0.8 * k, 2.0 * k])
        expected.append(ipp + 3 * 0.7 * np.array([1.0, 0, 0]))  # row 0, column 3 of slice k
        save(ct_dataset(ipp, pixels=px, spacing=(0.8, 0.7)), tmp_path / f"{k}")
    [series] = scan_path(tmp_path)
    with pytest.raises(InputError, match=r"gantry tilt of 21\.8 deg"):
        load_series(series)
    vol = load_series(series, resample_tilt=True)
    assert vol.header["gantry_tilt_resampled_deg"] == pytest.approx(21.8, abs=0.1)
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.0))
    for k in range(5):
        found = np.argwhere(vol.data[k] == 500 + k)
        assert len(found) == 1
        j, i = found[0]
        assert (j, i) == (k, 3)  # moved k rows onto the grid of slice 0
        np.testing.assert_allclose(vol.index_to_lps((i, j, k)), expected[k], atol=1e-6)


def test_mixed_orientations_refused(tmp_path: Path) -> None:
    save(ct_dataset((0, 0, 0)), tmp_path / "a")
    save(ct_dataset((0, 0, 1), iop=(1, 0, 0, 0, 0, -1)), tmp_path / "b")
    with pytest.raises(InputError, match="different orientations"):
        one(tmp_path)


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    save(ct_dataset((1, 2, 3)), tmp_path / "a")
    vol = one(tmp_path)
    assert vol.shape == (1, ROWS, COLS)
    assert vol.spacing[2] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------
# values and encodings


def test_rescale_slope_intercept_per_slice(tmp_path: Path) -> None:
    save(ct_dataset((0, 0, 0), pixels=np.full((ROWS, COLS), 100), slope=2.0, intercept=-1000), tmp_path / "a")
    save(ct_dataset((0, 0, 1), pixels=np.full((ROWS, COLS), 100), slope=1.0, intercept=0), tmp_path / "b")
    vol = one(tmp_path)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data[:, 0, 0], [-800.0, 100.0])


def test_padding_value_becomes_air(tmp_path: Path) -> None:
    px = np.full((ROWS, COLS), 1064, dtype=np.int16)
    px[0, :] = -2000
    save(ct_dataset((0, 0, 0), pixels=px, padding=-2000), tmp_path / "a")
    vol = one(tmp_path)
    assert np.all(vol.data[0, 0, :] == AIR_HU)
    assert np.all(vol.data[0, 1:, :] == 40.0)
    assert vol.header["padding_voxels"] == COLS


def test_unsigned_padding_and_outside_fov_fill(tmp_path: Path) -> None:
    px = np.full((ROWS, COLS), 1000, dtype=np.uint16)
    px[0, 0] = 0  # unsigned padding value
    save(ct_dataset((0, 0, 0), pixels=px, signed=False, padding=0, intercept=-1024), tmp_path / "u")
    vol = one(tmp_path)
    assert vol.data[0, 0, 0] == AIR_HU and vol.data[0, 1, 1] == -24.0
    s = tmp_path / "s"
    px2 = np.full((ROWS, COLS), 40, dtype=np.int16)
    px2[0, 0] = -3024  # signed, HU < -2048 (outside the reconstruction circle), no padding tag
    save(ct_dataset((0, 0, 0), pixels=px2, signed=True, intercept=0), s / "a")
    vol2 = one(s)
    assert vol2.data[0, 0, 0] == AIR_HU and vol2.data[0, 1, 1] == 40.0
    assert vol2.header["outside_fov_voxels"] == 1


def test_signed_negative_values(tmp_path: Path) -> None:
    px = np.arange(ROWS * COLS, dtype=np.int16).reshape(ROWS, COLS) * 40 - 1000
    save(ct_dataset((0, 0, 0), pixels=px, intercept=0), tmp_path / "a")
    vol = one(tmp_path)
    np.testing.assert_array_equal(vol.data[0], px.astype(np.float32))


def test_signed_12_bit_in_16_bit_container(tmp_path: Path) -> None:
    ds = ct_dataset((0, 0, 0), pixels=np.full((ROWS, COLS), 4096 - 1000), intercept=0)
    ds.BitsStored = 12  # -1000 as 12-bit two's complement, high bits clear
    ds.HighBit = 11
    save(ds, tmp_path / "a")
    assert np.all(one(tmp_path).data == -1000.0)


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_transfer_syntaxes_give_identical_hu(tmp_path: Path, ts: str) -> None:
    px = (np.arange(ROWS * COLS, dtype=np.int16).reshape(ROWS, COLS) * 37) % 2000
    ref = one(save(ct_dataset((0, 0, 0), pixels=px), tmp_path / "ref" / "a"))
    other = one(save(ct_dataset((0, 0, 0), pixels=px), tmp_path / "other" / "a", ts=ts))
    np.testing.assert_array_equal(other.data, ref.data)
    assert other.header["TransferSyntaxUID"] == ts


def test_file_without_meta_read_as_implicit_little_endian(tmp_path: Path) -> None:
    px = np.full((ROWS, COLS), 1100, dtype=np.int16)
    path = save(ct_dataset((0, 0, 0), pixels=px), tmp_path / "nometa.dcm", with_meta=False)
    assert path.read_bytes()[128:132] != b"DICM"
    vol = one(tmp_path)
    assert vol.header["transfer_syntax_assumed"] is True
    assert np.all(vol.data == 76.0)


def test_truncated_pixel_data_is_input_error(tmp_path: Path) -> None:
    path = save(ct_dataset((0, 0, 0), rows=32, cols=32, pixels=np.zeros((32, 32))), tmp_path / "a.dcm")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated pixel data"):
        one(tmp_path)


# ---------------------------------------------------------------------------------------------------
# qualification


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "MR"}, "modality MR is not CT"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
    ],
)
def test_not_qualifying(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    save(ct_dataset((0, 0, 0), **kwargs), tmp_path / "a")
    with pytest.raises(NotQualifyingError, match=message):
        one(tmp_path)


def test_ct_object_without_pixel_data_not_qualifying(tmp_path: Path) -> None:
    ds = ct_dataset((0, 0, 0))
    del ds.PixelData
    save(ds, tmp_path / "a")
    with pytest.raises(NotQualifyingError, match="no pixel data"):
        one(tmp_path)


def test_localizer_inside_axial_series_is_dropped(tmp_path: Path) -> None:
    for k in range(3):
        save(ct_dataset((0, 0, k), pixels=marked(k)), tmp_path / f"{k}")
    scout = ct_dataset((0, 0, 50), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), iop=(1, 0, 0, 0, 0, -1))
    save(scout, tmp_path / "scout")
    vol = one(tmp_path)
    assert vol.shape[0] == 3 and vol.header["dropped_localizer_images"] == 1


def test_colour_image_not_qualifying(tmp_path: Path) -> None:
    ds = ct_dataset((0, 0, 0))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(ROWS * COLS * 3)
    save(ds, tmp_path / "a")
    with pytest.raises(NotQualifyingError, match="colour"):
        one(tmp_path)


# ---------------------------------------------------------------------------------------------------
# enhanced multi-frame


def _enhanced_ct(n_frames: int, tmp_path: Path) -> Path:
    ds = ct_dataset((0, 0, 0), pixels=np.zeros((ROWS, COLS)))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    for kw in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        delattr(ds, kw)
    ds.NumberOfFrames = n_frames
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]  # feet first: normal points to -z
    pm = Dataset()
    pm.PixelSpacing = [0.5, 0.6]
    pm.SliceThickness = 3.0
    shared.PlaneOrientationSequence = [po]
    shared.PixelMeasuresSequence = [pm]
    per_frame = []
    frames = []
    for f in range(n_frames):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [10.0, 20.0, -3.0 * f]  # frame order = ascending along the normal
        pvt = Dataset()
        pvt.RescaleSlope = 1.0
        pvt.RescaleIntercept = -1024.0 + f  # per-frame intercept
        item.PlanePositionSequence = [pp]
        item.PixelValueTransformationSequence = [pvt]
        per_frame.append(item)
        frames.append(np.full((ROWS, COLS), 1024 + 100 * f, dtype=np.int16))
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = per_frame
    order = [2, 0, 1, 3][:n_frames] if n_frames == 4 else list(range(n_frames))
    ds.PerFrameFunctionalGroupsSequence = [per_frame[i] for i in order]
    ds.PixelData = np.stack([frames[i] for i in order]).tobytes()
    return save(ds, tmp_path / "enhanced.dcm")


def test_enhanced_multiframe_ct(tmp_path: Path) -> None:
    _enhanced_ct(4, tmp_path)
    vol = one(tmp_path)
    assert vol.shape == (4, ROWS, COLS)
    # frames were stored out of order; sorted along the normal (-z) they run f = 0, 1, 2, 3
    np.testing.assert_array_equal(vol.data[:, 0, 0], [0.0, 101.0, 202.0, 303.0])
    assert vol.slice_frame_numbers == (2, 3, 1, 4)
    assert len(set(vol.slice_sop_instance_uids)) == 1
    assert vol.spacing == pytest.approx((0.6, 0.5, 3.0))
    np.testing.assert_allclose(vol.index_to_lps((0, 0, 2)), (10.0, 20.0, -6.0))
    np.testing.assert_allclose(vol.index_to_lps((1, 1, 0)), (10.0 - 0.6, 20.5, 0.0))


def test_read_back_with_pydicom_is_unchanged(tmp_path: Path) -> None:
    """The loader never modifies the files it reads (a received image is never lost)."""
    path = save(ct_dataset((0, 0, 0)), tmp_path / "a.dcm")
    before = path.read_bytes()
    one(tmp_path)
    assert path.read_bytes() == before
    assert pydicom.dcmread(path).Modality == "CT"


# ---------------------------------------------------------------------------------------------------
# direct native pixel reads (scan offsets) agree with pydicom decoding


def _slow(series: Any) -> Volume:
    """Load without the scanned headers: every slice decoded by pydicom (the reference path)."""
    import dataclasses

    plain = dataclasses.replace(
        series,
        headers=(),
        instances=tuple(
            dataclasses.replace(i, pixel_offset=None, pixel_length=None) for i in series.instances
        ),
    )
    return load_series(plain)


@pytest.mark.parametrize(
    "variant",
    ["signed", "unsigned-padding", "signed-12-bit", "slope", "implicit", "fill-below"],
)
def test_direct_pixel_read_matches_pydicom(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(7)
    n = 20  # enough slices for the decoding thread pool
    ts = ImplicitVRLittleEndian if variant == "implicit" else ExplicitVRLittleEndian
    for k in range(n):
        px = rng.integers(0, 3000, size=(ROWS, COLS))
        kw: dict[str, Any] = {}
        if variant == "unsigned-padding":
            px[0, : k % 3] = 0
            kw = {"signed": False, "padding": 0}
        elif variant == "slope":
            kw = {"slope": 0.5, "intercept": -1000.25}
        elif variant == "fill-below":
            px[1, 1] = -3100
            kw = {"intercept": 0}
        ds = ct_dataset((0, 0, 2.0 * k), pixels=px, **kw)
        if variant == "signed-12-bit":
            ds = ct_dataset((0, 0, 2.0 * k), pixels=(px - 1500) & 0x0FFF, intercept=0)
            ds.BitsStored, ds.HighBit = 12, 11
        save(ds, tmp_path / f"s{k:02d}.dcm", ts=ts)
    [series] = scan_path(tmp_path)
    assert all(i.pixel_offset is not None for i in series.instances)
    assert len(series.headers) == len(series.instances)
    import dicomnode.imaging.loader as loader_mod

    def no_second_parse(*args: Any, **kwargs: Any) -> Dataset:
        raise AssertionError("a file was parsed again although the scan kept its header")

    with monkeypatch.context() as m:
        m.setattr(loader_mod, "read_dicom", no_second_parse)
        fast = load_series(series)
    slow = _slow(series)
    np.testing.assert_array_equal(fast.data, slow.data)
    assert fast.header == slow.header
    assert fast.slice_sop_instance_uids == slow.slice_sop_instance_uids
    if variant == "signed-12-bit":
        assert float(fast.data.min()) < 0  # sign-extended from 12 bits
    if variant == "unsigned-padding":
        assert fast.header["padding_voxels"] == sum(k % 3 for k in range(n)) > 0


def test_file_replaced_after_scan_is_still_read_correctly(tmp_path: Path) -> None:
    # the scan recorded the pixel offset; a file rewritten since (another header length) must not be
    # read at the old offset
    for k in range(3):
        save(ct_dataset((0, 0, 1.0 * k), pixels=marked(k)), tmp_path / f"s{k}.dcm")
    [series] = scan_path(tmp_path)
    ds = ct_dataset((0, 0, 1.0), pixels=marked(7))
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.StudyDescription = "a longer header than before " * 2
    save(ds, tmp_path / "s1.dcm")
    vol = load_series(series)
    assert np.all(vol.data[1] == 70.0)
