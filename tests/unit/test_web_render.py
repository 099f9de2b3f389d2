"""Overlay rendering: secondary-capture DICOM (RGB) and greyscale CT to PNG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from web_testing import write_sc

from dicomnode.errors import InputError
from dicomnode.web.render import dicom_to_png, overlay_files


def test_rgb_secondary_capture_keeps_its_colours(tmp_path: Path) -> None:
    png = dicom_to_png(write_sc(tmp_path / "sc_00.dcm", size=48))
    img = Image.open(io.BytesIO(png))
    assert img.mode == "RGB" and img.size == (48, 48)
    pixel = img.getpixel((18, 18))
    assert isinstance(pixel, tuple) and pixel[:2] == (255, 0)  # the red square drawn by write_sc


def test_greyscale_is_windowed(tmp_path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    arr = np.full((16, 16), 1024 - 1000, np.int16)  # air
    arr[:, 8:] = 1024 + 1000  # bone
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    img = Image.open(io.BytesIO(dicom_to_png(tmp_path / "ct.dcm")))
    assert img.mode == "L" and img.getpixel((0, 0)) == 0 and img.getpixel((15, 0)) == 255


def test_errors_are_one_line_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        dicom_to_png(tmp_path / "missing.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(InputError, match="cannot decode"):
        dicom_to_png(tmp_path / "junk.dcm")


def test_overlay_files_picks_the_secondary_captures() -> None:
    files = [
        Path("out/result.json"),
        Path("out/sr.dcm"),
        Path("out/sc_00_a.dcm"),
        Path("out/overlay_00_a.png"),
    ]
    assert overlay_files(files) == [Path("out/sc_00_a.dcm")]
