"""Structure check and header parse of received datasets (dicomnode.ingest.dicomparse)."""

from __future__ import annotations

import zlib
from io import BytesIO

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from dicomnode.ingest.dicomparse import (
    DatasetError,
    check_structure,
    encode_file_meta,
    get_uid,
    is_valid_uid,
    parse_header,
    scan_header,
)


def _ct(rows: int = 8) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = "Test^Patient"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "1.0"
    # A nested sequence: item with its own sequence, to exercise the walker's recursion.
    inner = Dataset()
    inner.CodeValue = "T-D4000"
    inner.CodingSchemeDesignator = "SRT"
    outer = Dataset()
    outer.AnatomicRegionSequence = Sequence([inner])
    outer.ContrastBolusAgent = "NONE"
    ds.ContrastBolusAgentSequence = Sequence([outer])
    ds.Rows = rows
    ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = (np.arange(rows * rows, dtype=np.int16) - 1000).tobytes()
    return ds


def _encode(ds: Dataset, implicit: bool, little: bool, *, undefined_seq: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    if undefined_seq:
        for elem in ds.iterall():
            if elem.VR == "SQ":
                elem.is_undefined_length = True
        for item in ds.ContrastBolusAgentSequence:
            item.is_undefined_length_sequence_item = True
    write_dataset(fp, ds)
    return fp.getvalue()


ENCODINGS = [
    (ImplicitVRLittleEndian, True, True),
    (ExplicitVRLittleEndian, False, True),
    (ExplicitVRBigEndian, False, False),
]


@pytest.mark.parametrize(("ts", "implicit", "little"), ENCODINGS)
@pytest.mark.parametrize("undefined", [False, True])
def test_complete_datasets_pass_and_parse(ts: str, implicit: bool, little: bool, undefined: bool) -> None:
    ds = _ct()
    data = _encode(ds, implicit, little, undefined_seq=undefined)
    check_structure(data, implicit_vr=implicit, little_endian=little)
    header = parse_header(data, ts)
    assert header.SOPInstanceUID == ds.SOPInstanceUID
    assert header.ContrastBolusAgentSequence[0].AnatomicRegionSequence[0].CodeValue == "T-D4000"
    # The header parse stops before the pixel data (routing never needs it).
    assert "PixelData" not in header


def _top_level_boundaries(ds: Dataset, implicit: bool, little: bool) -> set[int]:
    """Byte offsets at which a top-level element ends (elements are written in tag order)."""
    out = set()
    partial = Dataset()
    for elem in ds:
        partial.add(elem)
        out.add(len(_encode(partial, implicit, little, undefined_seq=False)))
    return out


@pytest.mark.parametrize(("ts", "implicit", "little"), ENCODINGS)
def test_every_cut_inside_an_element_is_detected(ts: str, implicit: bool, little: bool) -> None:
    ds = _ct()
    data = _encode(ds, implicit, little)
    boundaries = _top_level_boundaries(ds, implicit, little)
    assert len(data) in boundaries
    for cut in range(1, len(data)):
        if cut in boundaries:
            # A cut between two top-level elements is a shorter but well-formed dataset; what it lacks is
            # caught later (missing UIDs) or by decoding, not by the structure check.
            check_structure(data[:cut], implicit_vr=implicit, little_endian=little)
        else:
            with pytest.raises(DatasetError):
                parse_header(data[:cut], ts)


@pytest.mark.parametrize(("ts", "implicit", "little"), ENCODINGS)
def test_cut_inside_undefined_length_sequence_is_detected(ts: str, implicit: bool, little: bool) -> None:
    ds = _ct()
    data = _encode(ds, implicit, little, undefined_seq=True)
    start = data.index(b"NONE")  # ContrastBolusAgent, last element of the undefined-length item
    # The item delimiter (8 bytes) and the sequence delimiter (8 bytes) follow; any cut before they are
    # complete leaves the sequence unterminated.
    for cut in range(start, start + 4 + 8 + 8):
        with pytest.raises(DatasetError):
            parse_header(data[:cut], ts)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=1, max_value=127))
def test_cut_inside_pixel_data_is_always_detected(cut: int) -> None:
    data = _encode(_ct(), False, True)
    with pytest.raises(DatasetError, match="truncated"):
        check_structure(data[:-cut], implicit_vr=False, little_endian=True)


def test_encapsulated_pixel_data_is_walked() -> None:
    ds = _ct()
    ds.PixelData = encapsulate([b"\x01\x02" * 10, b"\x03\x04" * 6])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    data = _encode(ds, False, True)
    header = parse_header(data, RLELossless)
    assert header.SOPInstanceUID == ds.SOPInstanceUID
    with pytest.raises(DatasetError):
        parse_header(data[:-8], RLELossless)  # sequence delimiter missing


def test_deflated_dataset_is_inflated() -> None:
    ds = _ct()
    raw = _encode(ds, False, True)
    comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = comp.compress(raw) + comp.flush()
    assert parse_header(deflated, DeflatedExplicitVRLittleEndian).SOPInstanceUID == ds.SOPInstanceUID
    with pytest.raises(DatasetError, match="inflate"):
        parse_header(b"not deflate at all", DeflatedExplicitVRLittleEndian)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 4, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 4],
)
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(DatasetError):
        parse_header(data, ExplicitVRLittleEndian)


def test_unknown_transfer_syntax_is_refused() -> None:
    with pytest.raises(DatasetError, match="transfer syntax"):
        parse_header(_encode(_ct(), False, True), "1.2.3.4")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("2.25.123456789012345678901234567890", True),
        ("1.2.3", True),
        ("", False),
        ("1", False),
        ("1.02.3", False),  # leading zero in a component
        ("1.2.3.", False),
        ("../../etc/passwd", False),
        ("1.2/3", False),
        ("1.2.3\x00", False),
        ("1." + "2" * 70, False),  # longer than 64
        (None, False),
        (123, False),
    ],
)
def test_uid_validation(value: object, ok: bool) -> None:
    assert is_valid_uid(value) is ok


def test_get_uid_strips_padding_and_handles_missing() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    assert get_uid(ds, "SOPInstanceUID") == "1.2.3"
    assert get_uid(ds, "StudyInstanceUID") is None


@pytest.mark.parametrize(("version", "ae"), [("DICOMNODE_01", "PACS"), (None, None), ("ODD", "AE3")])
def test_fast_file_meta_matches_pydicom(version: str | None, ae: str | None) -> None:
    sop = generate_uid()
    raw = encode_file_meta(
        CTImageStorage, sop, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, version, ae
    )
    fp = BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    assert fp.tell() == len(raw), "group length covers exactly the meta elements"
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID == sop
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == PYDICOM_IMPLEMENTATION_UID
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.get("ImplementationVersionName") == version
    assert meta.get("SourceApplicationEntityTitle") == ae
    if version is None:
        return  # pydicom would add its own ImplementationVersionName
    # Byte-identical to what pydicom writes for the same elements.
    ref = FileMetaDataset()
    ref.FileMetaInformationVersion = b"\x00\x01"
    ref.MediaStorageSOPClassUID = CTImageStorage
    ref.MediaStorageSOPInstanceUID = sop
    ref.TransferSyntaxUID = ExplicitVRLittleEndian
    ref.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ref.ImplementationVersionName = version
    if ae:
        ref.SourceApplicationEntityTitle = ae
    out = DicomBytesIO()
    write_file_meta_info(out, ref, enforce_standard=True)
    assert raw[132:] == out.getvalue()


@pytest.mark.parametrize(("ts", "implicit", "little"), ENCODINGS)
def test_the_scan_collects_raw_values_and_stops_at_the_pixel_data(
    ts: str, implicit: bool, little: bool
) -> None:
    # What routing reads of every instance comes from the structure check's own walk: the raw values equal
    # pydicom's, the header pydicom parses (only when asked) is the bytes before the pixel data, and the
    # structure check reports where that group begins.
    ds = _ct()
    ds.InstanceNumber = "12"
    ds.ImagePositionPatient = ["-1.5", "2", "3.25"]
    data = _encode(ds, implicit, little)
    tags = frozenset({0x00080018, 0x0020000D, 0x00200013, 0x00200032, 0x00280010, 0x00081030})
    scan = scan_header(data, ts, tags)
    stock = parse_header(data, ts)
    for tag in tags - {0x00081030, 0x00280010}:
        assert scan.values[tag] == stock.get_item(tag).value, hex(tag)
    assert 0x00081030 not in scan.values, "absent"
    assert scan.text(0x00200032) == "-1.5\\2\\3.25" and scan.text(0x00200013) == "12"
    assert scan.text(0x00081030) is None
    pixels = data.index(b"\xe0\x7f\x10\x00" if little else b"\x7f\xe0\x00\x10")
    assert check_structure(data, implicit_vr=implicit, little_endian=little) == pixels
    assert scan.dataset() == stock and scan.dataset() is scan.dataset(), "parsed once"
    assert "PixelData" not in scan.dataset()
    no_pixels = _encode(_without_pixels(ds), implicit, little)
    assert check_structure(no_pixels, implicit_vr=implicit, little_endian=little) == len(no_pixels)


def _without_pixels(ds: Dataset) -> Dataset:
    out = Dataset()
    out.update({e.tag: e for e in ds if e.tag != 0x7FE00010})
    return out


def test_an_unknown_vr_is_refused_before_the_pixel_data_only() -> None:
    # pydicom refuses an unknown VR in what it reads (the header): so does the walk, which pydicom no longer
    # follows on every instance. After the pixel data (never read) only the VR's form is checked, as before.
    data = _encode(_ct(), False, True)
    pixels = data.index(b"\xe0\x7f\x10\x00")
    bad = data.replace(b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00XX", 1)  # Modality
    assert bad != data
    with pytest.raises(DatasetError, match="invalid VR"):
        scan_header(bad, ExplicitVRLittleEndian)
    trailer = b"\xfc\xff\xfc\xffXX\x02\x00ab"  # (FFFC,FFFC) after the pixel data
    scan_header(data + trailer, ExplicitVRLittleEndian)
    assert check_structure(data + trailer, implicit_vr=False, little_endian=True) == pixels
