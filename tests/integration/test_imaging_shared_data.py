"""Loading the real files of the shared test data (``../shared/data``, via the ``shared_data`` fixture)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicomnode.errors import InputError, NotQualifyingError
from dicomnode.imaging.loader import load_path, load_series, scan_path
from dicomnode.imaging.nifti import check_ct_hu, load_nifti
from dicomnode.imaging.volume import Volume

EDGE = "edge_and_negative"


class DicomnodeOutcome:
    """An expected, clean refusal."""

    def __init__(self, exc: InputError | NotQualifyingError) -> None:
        self.exc = exc


def _outcome(path: Path) -> list[Volume | DicomnodeOutcome]:
    """Load everything in ``path``: a Volume per series, or the (one-line) error it raised."""
    out: list[Volume | DicomnodeOutcome] = []
    try:
        loaded = load_path(path)
    except (InputError, NotQualifyingError) as exc:
        return [DicomnodeOutcome(exc)]
    if loaded.volume is not None:
        return [loaded.volume]
    for series in loaded.series:
        try:
            out.append(load_series(series))
        except (InputError, NotQualifyingError) as exc:
            out.append(DicomnodeOutcome(exc))
    return out


def _edge_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / EDGE).rglob("*") if p.is_file())


def test_every_edge_file_gives_volume_or_clean_error(shared_data: Path) -> None:
    files = _edge_files(shared_data)
    assert len(files) > 30
    kinds: dict[str, str] = {}
    for path in files:
        # any other exception type propagates and fails the test
        for result in _outcome(path):
            if isinstance(result, Volume):
                assert result.data.dtype == np.float32 and result.data.ndim == 3
                assert np.isfinite(result.data).all()
                kinds[path.name] = "volume"
            else:
                message = str(result.exc)
                assert message and "\n" not in message and "Traceback" not in message
                kinds[path.name] = type(result.exc).__name__
    # the documented negatives are refused for the documented reason class
    expected_not_qualifying = [
        "CT-RDSR-Siemens_Flash-TAP-SS.dcm",  # dose SR
        "CT-SC-Philips_Brilliance16P.dcm",  # CT modality, no pixel data
        "2020-09-12-ELSCINT1-PMSCT_RLE1_CT_noPixelData.dcm",
        "2020-11-16-SalimKanoun_PT.dcm",
        "2022-03-08-RicSmi_MR_lumbar_spine_j2k.dcm",
        "CT_chest_LOCALIZER_jpegLossless_1.2.840.10008.1.2.4.70.dcm",
        "MR_small.dcm",
        "JPEG2000.dcm",  # NM
        "test-SR.dcm",
        "no-pixel-data_SR.dcm",
        "CT_AVM_head_cta.nii.gz",  # not HU
    ]
    for name in expected_not_qualifying:
        assert kinds[name] == "NotQualifyingError", name
    assert kinds["CTImage.dcm_JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53.dcm"] == "InputError"
    assert kinds["no_meta.dcm"] == "InputError"
    for name in ("CTImage.dcm", "CT_small.dcm", "SignedCT_thorax.dcm", "eCT_Supplemental.dcm"):
        assert kinds[name] == "volume", name


def test_retired_jpeg_is_refused_with_transfer_syntax_name(shared_data: Path) -> None:
    path = (
        shared_data
        / EDGE
        / "cornerstone"
        / "CTImage.dcm_JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53.dcm"
    )
    [series] = load_path(path).series
    with pytest.raises(
        InputError, match=r"cannot decode pixel data \(transfer syntax JPEG Spectral Selection"
    ):
        load_series(series)


def test_lossless_encodings_decode_to_identical_hu(shared_data: Path) -> None:
    folder = shared_data / EDGE / "cornerstone"
    reference = _outcome(folder / "CTImage.dcm")[0]
    assert isinstance(reference, Volume)
    variants = [p for p in folder.glob("CTImage.dcm_*") if "Process6_8" not in p.name]
    assert len(variants) == 6
    for path in variants:
        vol = _outcome(path)[0]
        assert isinstance(vol, Volume), path.name
        np.testing.assert_array_equal(vol.data, reference.data, err_msg=path.name)
        np.testing.assert_array_equal(vol.affine, reference.affine)


def test_petct_crop_matches_segmentation_geometry(shared_data: Path) -> None:
    folder = shared_data / "totalsegmentator_petct_dicom"
    series = scan_path(folder / "dicom")
    assert len(series) == 1  # blank Series Instance UID: grouped by geometry
    s = series[0]
    assert s.summary.get("SeriesInstanceUIDSynthesized") is True
    assert s.summary.z_extent_mm == pytest.approx(38.0)
    vol = load_series(s)
    assert vol.shape == (20, 512, 512)
    # SOP Instance UIDs come from the file meta (blank in the data set), in ascending z order
    assert all(uid for uid in vol.slice_sop_instance_uids)
    z = [vol.index_to_lps((0, 0, k))[2] for k in range(20)]
    assert z == sorted(z)
    seg = load_nifti(folder / "example_seg_dicom.nii.gz")
    assert seg.shape == vol.shape
    # README mapping: NIfTI voxel (i, j, k) = DICOM column i, row 511 - j, slice k (ascending z)
    rng = np.random.default_rng(0)
    ijk = rng.integers(0, [512, 512, 20], size=(50, 3))
    flipped = ijk.copy()
    flipped[:, 1] = 511 - flipped[:, 1]
    np.testing.assert_allclose(vol.index_to_lps(ijk), seg.index_to_lps(flipped), atol=1e-3)
    # and the voxel data line up: the labelled vertebra (T11/T12 labels) is bone in the CT
    bone = np.flip(seg.data, axis=1)  # seg in the DICOM row order
    vertebra = np.isin(bone, (32, 33))
    assert vertebra.sum() > 1000
    assert float(np.median(vol.data[vertebra])) > 100.0
    assert float(np.median(vol.data[bone == 0])) < 0.0


def test_enhanced_ct_multiframe_loads(shared_data: Path) -> None:
    [series] = load_path(shared_data / EDGE / "pydicom-data" / "eCT_Supplemental.dcm").series
    vol = load_series(series)
    assert vol.shape == (2, 512, 512)
    assert sorted(f for f in vol.slice_frame_numbers if f is not None) == [1, 2]
    assert vol.spacing[2] == pytest.approx(10.0)
    # k runs along the slice normal (row x column cosine)
    normal = np.cross(vol.affine[:3, 0], vol.affine[:3, 1])
    assert float(np.dot(normal, vol.affine[:3, 2])) > 0


def test_headless_acr_nema_file_loads_with_assumed_syntax(shared_data: Path) -> None:
    path = shared_data / EDGE / "barre_samples" / "CT-MONO2-12-lomb-an2_ACRNEMA_headless.dcm"
    [series] = load_path(path).series
    vol = load_series(series)
    assert vol.header["transfer_syntax_assumed"] is True
    assert vol.shape == (1, 512, 512)
    assert -1100 < float(vol.data.min()) < -800 and float(vol.data.max()) > 800


def test_three_slice_padding_is_air(shared_data: Path) -> None:
    [series] = scan_path(shared_data / "dcmqi_ctc_3slice" / "ct")
    vol = load_series(series)
    assert vol.shape == (3, 512, 512)
    assert vol.header["padding_voxels"] > 0
    assert float(vol.data.min()) >= -1024.0
    assert vol.spacing[2] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(
    ("relpath", "is_ct"),
    [
        ("totalsegmentator_abdomen_nifti/example_ct.nii.gz", True),
        ("totalsegmentator_abdomen_nifti/example_ct_sm.nii.gz", True),
        ("totalsegmentator_mr_nifti/example_mr_sm.nii.gz", False),
        (f"{EDGE}/niivue/CT_AVM_head_cta.nii.gz", False),
    ],
)
def test_nifti_hu_plausibility(shared_data: Path, relpath: str, is_ct: bool) -> None:
    vol = load_nifti(shared_data / relpath)
    if is_ct:
        check_ct_hu(vol)
    else:
        with pytest.raises(NotQualifyingError, match="do not look like CT HU"):
            check_ct_hu(vol)


def test_abdomen_nifti_is_lps_and_axis_order(shared_data: Path) -> None:
    import nibabel as nib

    path = shared_data / "totalsegmentator_abdomen_nifti" / "example_ct.nii.gz"
    img: Any = nib.load(str(path))
    raw = np.asarray(img.dataobj)
    vol = load_nifti(path)
    assert vol.shape == (raw.shape[2], raw.shape[1], raw.shape[0])
    assert vol.data[40, 50, 60] == pytest.approx(float(raw[60, 50, 40]))
    ras = img.affine @ np.array([60, 50, 40, 1.0])
    np.testing.assert_allclose(vol.index_to_lps((60, 50, 40)), (-ras[0], -ras[1], ras[2]))
