"""Knee radiographs: the projection loader (photometric, bit depth, spacing, compression), the knee
preparation, and routing of CR/DX knee images by the shipped rules (issue 12, item 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicomnode.errors import InputError, NotQualifyingError
from dicomnode.imaging.headers import summarize
from dicomnode.imaging.projection import load_radiograph, read_radiograph
from dicomnode.ml.knee import check_knee, prepare_knee
from dicomnode.ml.knee_synthetic import label_of, make_knee, write_dx
from dicomnode.routing import default_rules, select


@pytest.fixture(scope="module")
def case() -> object:
    return make_knee(11, density=0.25, spacing_mm=1.6, laterality="R")


def test_monochrome1_and_2_give_the_same_picture(case: object, tmp_path: Path) -> None:
    m2 = load_radiograph(write_dx(case, tmp_path / "m2.dcm"))  # type: ignore[arg-type]
    m1 = load_radiograph(write_dx(case, tmp_path / "m1.dcm", photometric="MONOCHROME1"))  # type: ignore[arg-type]
    assert m1.photometric == "MONOCHROME1"
    # stored inverted, displayed the same: bone bright in both
    assert float(np.max(np.abs(m1.pixels - m2.pixels))) < 0.01
    raw = pydicom.dcmread(tmp_path / "m1.dcm").pixel_array
    assert np.corrcoef(raw.ravel(), m2.pixels.ravel())[0, 1] < -0.9  # the file really is inverted


@pytest.mark.parametrize(
    ("bits", "syntax"), [(8, RLELossless), (16, RLELossless), (12, JPEG2000Lossless), (10, None)]
)
def test_bit_depths_and_compressed_syntaxes(
    case: object, tmp_path: Path, bits: int, syntax: str | None
) -> None:
    ref = load_radiograph(write_dx(case, tmp_path / "ref.dcm"))  # type: ignore[arg-type]
    kw = {"transfer_syntax": syntax} if syntax else {}
    path = write_dx(case, tmp_path / "x.dcm", bits=bits, window=False, **kw)  # type: ignore[arg-type]
    if syntax:
        assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == syntax
    rad = load_radiograph(path)
    assert rad.pixels.shape == ref.pixels.shape
    assert float(np.mean(np.abs(rad.pixels - ref.pixels))) < 0.02


def test_pixel_spacing_preferred_imager_spacing_corrected_missing_refused(
    case: object, tmp_path: Path
) -> None:
    pixel = load_radiograph(write_dx(case, tmp_path / "p.dcm"))  # type: ignore[arg-type]
    assert pixel.spacing_mm == pytest.approx((1.6, 1.6))
    assert pixel.spacing_source.startswith("Pixel Spacing")
    imager = load_radiograph(write_dx(case, tmp_path / "i.dcm", spacing_attribute="ImagerPixelSpacing"))  # type: ignore[arg-type]
    # 1.76 mm at the detector / magnification 1.1 = 1.6 mm in the patient
    assert imager.spacing_mm == pytest.approx((1.6, 1.6), abs=1e-3)
    assert "magnification" in imager.spacing_source
    with pytest.raises(NotQualifyingError, match="no Pixel Spacing or Imager Pixel Spacing"):
        load_radiograph(write_dx(case, tmp_path / "n.dcm", spacing_attribute="none"))  # type: ignore[arg-type]


def test_not_a_radiograph_and_not_a_knee_get_reasons(case: object, tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dx(case, tmp_path / "ct.dcm"))  # type: ignore[arg-type]
    ds.Modality = "CT"
    with pytest.raises(NotQualifyingError, match="modality CT: not a projection radiograph"):
        read_radiograph(ds)
    chest = load_radiograph(
        write_dx(case, tmp_path / "c.dcm", body_part="CHEST", series_description="CHEST PA")
    )  # type: ignore[arg-type]
    with pytest.raises(NotQualifyingError, match="body part CHEST: not a knee radiograph"):
        check_knee(chest)
    check_knee(load_radiograph(write_dx(case, tmp_path / "k.dcm")))  # type: ignore[arg-type]
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(InputError, match="not a readable DICOM file"):
        load_radiograph(tmp_path / "junk.dcm")


def test_left_knee_is_mirrored_to_a_right_one() -> None:
    right = make_knee(5, density=0.5, laterality="R", spacing_mm=1.6)
    left_pixels = np.ascontiguousarray(right.pixels[:, ::-1])  # the same knee, seen as a left one
    a = prepare_knee(right.pixels, (1.6, 1.6), "R", 3.0, (48, 48))
    b = prepare_knee(left_pixels, (1.6, 1.6), "L", 3.0, (48, 48))
    unmirrored = prepare_knee(left_pixels, (1.6, 1.6), None, 3.0, (48, 48))
    assert b.mirrored and not a.mirrored
    assert float(np.max(np.abs(a.crop - b.crop))) < 1e-4
    assert float(np.max(np.abs(a.crop - unmirrored.crop))) > 0.5
    r0, c0, r1, c1 = b.region_in_source((1.6, 1.6))
    assert 0 <= r0 < r1 and c1 > c0 and (r1 - r0) == pytest.approx(48 * 3.0 / 1.6)


def test_labels_follow_density() -> None:
    assert [label_of(d, 2) for d in (0.9, 0.1)] == [0, 1]
    assert [label_of(d, 3) for d in (0.9, 0.5, 0.1)] == [0, 1, 2]
    dense, sparse = make_knee(1, density=0.95), make_knee(1, density=0.05)
    assert float(dense.pixels.mean()) > float(sparse.pixels.mean())


def _decision(tmp_path: Path, name: str, **kw: object) -> object:
    case = make_knee(3, density=0.5, spacing_mm=1.6)
    ds = pydicom.dcmread(write_dx(case, tmp_path / f"{name}.dcm", **kw), stop_before_pixels=True)  # type: ignore[arg-type]
    (decision,) = select([summarize([ds])], default_rules())
    return decision


def test_shipped_rules_route_knee_radiographs(tmp_path: Path) -> None:
    knee = _decision(tmp_path, "knee")
    assert knee.selected and knee.pipeline == "knee-xray" and knee.rule == "knee-radiograph"  # type: ignore[attr-defined]
    cr = _decision(tmp_path, "cr", modality="CR", body_part="LEG", series_description="Knee AP")
    assert cr.selected and cr.rule == "knee-radiograph-by-description"  # type: ignore[attr-defined]
    chest = _decision(tmp_path, "chest", body_part="CHEST", series_description="CHEST PA")
    assert not chest.selected and chest.rule is None  # type: ignore[attr-defined]
    assert any("BodyPartExamined one of KNEE" in r and "FAIL (CHEST)" in r for r in chest.reasons)  # type: ignore[attr-defined]
    hand = _decision(tmp_path, "hand", body_part="HAND", series_description="HAND PA")
    assert not hand.selected  # type: ignore[attr-defined]


def test_rules_explain_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicomnode.cli import main

    case = make_knee(3, density=0.5, spacing_mm=1.6)
    write_dx(case, tmp_path / "knee" / "a.dcm")
    write_dx(case, tmp_path / "chest" / "a.dcm", body_part="CHEST", series_description="CHEST PA")
    main(["rules", "explain", str(tmp_path / "knee")])
    knee = capsys.readouterr().out
    assert "rule 'knee-radiograph' matched: analyze" in knee
    main(["rules", "explain", str(tmp_path / "chest")])
    chest = capsys.readouterr().out
    assert "knee-radiograph: BodyPartExamined one of KNEE, KNEES: FAIL (CHEST)" in chest
    assert "no rule matched: fallback ignore" in chest


def test_analyze_cli_routes_radiographs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicomnode.cli import main

    case = make_knee(3, density=0.5, spacing_mm=1.6)
    write_dx(case, tmp_path / "knee" / "a.dcm")
    write_dx(case, tmp_path / "chest" / "a.dcm", body_part="CHEST", series_description="CHEST PA")
    assert main(["analyze", str(tmp_path / "knee"), "--out", str(tmp_path / "o1")]) == 2
    assert "not qualifying: no model configured" in capsys.readouterr().err
    assert (tmp_path / "o1" / "result.json").is_file()
    assert main(["analyze", str(tmp_path / "chest"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "DX radiograph, not a knee" in err and "FAIL (CHEST)" in err and "Traceback" not in err
