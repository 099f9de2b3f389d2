"""Tolerant-but-honest reading of received datasets: structure check, header parse, UID validation.

pydicom is lenient on purpose: a dataset cut in the middle of an element often parses without a warning.
A receiver must not confirm such a dataset, so :func:`check_structure` walks every element header (tags and
lengths only, no value decoding) and reports data that runs past its end or is not DICOM at all. Only then
is the header (everything before the pixel data) parsed with pydicom for routing.
"""

from __future__ import annotations

import re
import struct
import zlib
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_PIXEL_GROUP = 0x7FE0
#: Explicit-VR VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
#: Every VR of PS3.5 6.2: pydicom refuses any other when it reads the header (checked there, too).
_KNOWN_VRS = frozenset(
    (
        *(b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT"),
        *(b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST"),
        *(b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"),
    )
)
_MAX_DEPTH = 64
#: PS3.5 9.1: digits and dots, no leading zeros in a component, at most 64 characters.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class DatasetError(ValueError):
    """The received bytes are not a usable DICOM dataset; the message says why in one line."""


def _vr_ok(vr: bytes) -> bool:
    return len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90


class _Walker:
    """Walk element headers of an encoded dataset without decoding values.

    On the way it notes where the top-level pixel data group begins (:attr:`stop`: what routing reads ends
    there) and the raw values of the top-level elements in ``collect`` (:attr:`values`).
    """

    def __init__(
        self, buf: bytes | memoryview, little_endian: bool, collect: frozenset[int] = frozenset()
    ) -> None:
        self.buf = buf
        self.n = len(buf)
        self.stop = -1
        self.collect = collect
        self.values: dict[int, bytes] = {}
        e = "<" if little_endian else ">"
        self.hh = struct.Struct(e + "HH")
        self.h = struct.Struct(e + "H")
        self.length = struct.Struct(e + "L")
        # Items and delimiters are always tag + 4-byte length, whatever the VR encoding.
        self.item = struct.Struct(e + "HHL")
        self.le_item = struct.Struct("<HHL")
        self.le_hh = struct.Struct("<HH")
        self.le_length = struct.Struct("<L")
        self.le_h = struct.Struct("<H")

    def _need(self, pos: int, size: int, what: str) -> None:
        if pos + size > self.n:
            raise DatasetError(f"dataset truncated in {what} at byte {pos}")

    def dataset(self, pos: int, implicit: bool, le_only: bool, in_item: bool, depth: int) -> int:
        """Walk elements from ``pos``; return the offset after the dataset (or after its item delimiter)."""
        if depth > _MAX_DEPTH:
            raise DatasetError("sequences nested too deeply")
        hh = self.le_hh if le_only else self.hh
        h4 = self.le_length if le_only else self.length
        h2 = self.le_h if le_only else self.h
        buf = self.buf
        top = depth == 0
        while pos < self.n:
            self._need(pos, 8, "an element header")
            group, elem = hh.unpack_from(buf, pos)
            if top and self.stop < 0 and group >= _PIXEL_GROUP:
                self.stop = pos
            if group == 0xFFFE:
                tag = (group << 16) | elem
                pos += 8
                if tag == _ITEM_DELIM and in_item:
                    return pos
                raise DatasetError(f"unexpected delimiter ({group:04X},{elem:04X}) at byte {pos - 8}")
            vr: bytes | None
            if implicit:
                vr = None
                (length,) = h4.unpack_from(buf, pos + 4)
                pos += 8
            else:
                vr = bytes(buf[pos + 4 : pos + 6])
                if not _vr_ok(vr) or (self.stop < 0 and vr not in _KNOWN_VRS):
                    raise DatasetError(f"invalid VR for ({group:04X},{elem:04X}) at byte {pos}")
                if vr in _LONG_VRS:
                    self._need(pos, 12, "an element header")
                    (length,) = h4.unpack_from(buf, pos + 8)
                    pos += 12
                else:
                    (length,) = h2.unpack_from(buf, pos + 6)
                    pos += 8
            if length == _UNDEFINED:
                if vr is None or vr == b"SQ":
                    pos = self.sequence(pos, implicit, le_only, fragments=False, depth=depth + 1)
                elif vr == b"UN":
                    # PS3.5 6.2.2: UN of undefined length holds an implicit VR little endian sequence.
                    pos = self.sequence(pos, True, True, fragments=False, depth=depth + 1)
                elif vr in (b"OB", b"OW") and group == _PIXEL_GROUP:
                    pos = self.sequence(pos, implicit, le_only, fragments=True, depth=depth + 1)
                else:
                    raise DatasetError(f"undefined length on ({group:04X},{elem:04X}) with VR {vr.decode()}")
            else:
                if top and (group << 16 | elem) in self.collect and pos + length <= self.n:
                    self.values[group << 16 | elem] = bytes(buf[pos : pos + length])
                pos += length
                if pos > self.n:
                    raise DatasetError(
                        f"dataset truncated: element ({group:04X},{elem:04X}) "
                        f"runs {pos - self.n} bytes past the end"
                    )
        if top and self.stop < 0:
            self.stop = pos
        if in_item:
            raise DatasetError("dataset truncated inside a sequence item")
        return pos

    def sequence(self, pos: int, implicit: bool, le_only: bool, fragments: bool, depth: int) -> int:
        item = self.le_item if le_only else self.item
        while True:
            self._need(pos, 8, "a sequence")
            group, elem, length = item.unpack_from(self.buf, pos)
            tag = (group << 16) | elem
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM:
                raise DatasetError(f"expected an item tag, found ({group:04X},{elem:04X}) at byte {pos - 8}")
            if length == _UNDEFINED:
                if fragments:
                    raise DatasetError("pixel data fragment of undefined length")
                pos = self.dataset(pos, implicit, le_only, in_item=True, depth=depth)
            else:
                pos += length
                if pos > self.n:
                    raise DatasetError("dataset truncated inside a sequence item")


def check_structure(data: bytes | memoryview, *, implicit_vr: bool, little_endian: bool) -> int:
    """Check that ``data`` is a complete encoded dataset; raise :class:`DatasetError` otherwise.

    Parameters
    ----------
    data
        The dataset bytes (no preamble, no file meta), already inflated for the deflated transfer syntax.
    implicit_vr, little_endian
        The encoding of the transfer syntax.

    Returns
    -------
    int
        Where the top-level elements of the pixel data group (7FE0) or later begin (the end when none).

    Raises
    ------
    DatasetError
        When an element runs past the end of the data, a VR is not two capital letters (nor a known VR,
        before the pixel data), a sequence is not terminated, or the data is empty.
    """
    return _walk(data, implicit_vr, little_endian, frozenset()).stop


def _walk(
    data: bytes | memoryview, implicit_vr: bool, little_endian: bool, collect: frozenset[int]
) -> _Walker:
    if len(data) < 8:
        raise DatasetError("dataset is empty or shorter than one element")
    walker = _Walker(data, little_endian, collect)
    walker.dataset(0, implicit_vr, False, in_item=False, depth=0)
    return walker


def inflate(data: bytes | memoryview) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian dataset (raw deflate stream, PS3.5 A.5)."""
    try:
        return zlib.decompress(data, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise DatasetError(f"deflated dataset cannot be inflated: {exc}") from exc


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    # Routing needs nothing at or after the pixel data group; stopping there keeps the parse cheap.
    return tag >> 16 >= _PIXEL_GROUP


def parse_header(data: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """Check and parse the dataset bytes received in ``transfer_syntax``, up to the pixel data.

    Parameters
    ----------
    data
        The dataset bytes as received (deflated for the deflated transfer syntax).
    transfer_syntax
        The transfer syntax UID the bytes are encoded in.

    Returns
    -------
    pydicom.dataset.Dataset
        The elements before the pixel data (values decoded lazily by pydicom).

    Raises
    ------
    DatasetError
        When the bytes are not a complete, parseable dataset.
    """
    return scan_header(data, transfer_syntax).dataset()


class HeaderScan:
    """A dataset checked by :func:`scan_header`: raw values of some top-level elements, and the header
    (everything before the pixel data) parsed by pydicom when asked for (:meth:`dataset`)."""

    __slots__ = ("_dataset", "_header", "implicit_vr", "little_endian", "values")

    def __init__(
        self, header: bytes, values: dict[int, bytes], implicit_vr: bool, little_endian: bool
    ) -> None:
        self._header = header
        self.values = values
        self.implicit_vr = implicit_vr
        self.little_endian = little_endian
        self._dataset: Dataset | None = None

    def text(self, tag: int) -> str | None:
        """A collected element's value as text, padding stripped; None when absent or empty."""
        raw = self.values.get(tag)
        if raw is None:
            return None
        return raw.decode("ascii", "replace").strip(" \x00") or None

    def dataset(self) -> Dataset:
        """The header as pydicom reads it (once; later calls return the same Dataset).

        Raises
        ------
        DatasetError
            When pydicom cannot read it.
        """
        if self._dataset is None:
            try:
                ds = read_dataset(
                    BytesIO(self._header), self.implicit_vr, self.little_endian, stop_when=_stop_at_pixels
                )
            except Exception as exc:  # pydicom raises many types on garbage; all mean "cannot understand"
                raise DatasetError(f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc
            ds.set_original_encoding(self.implicit_vr, self.little_endian, "iso8859")
            self._dataset = ds
        return self._dataset


def scan_header(
    data: bytes | memoryview, transfer_syntax: str, collect: frozenset[int] = frozenset()
) -> HeaderScan:
    """Check the dataset bytes received in ``transfer_syntax`` (:func:`check_structure`) and take what
    routing reads: the raw values of the top-level elements in ``collect`` and the bytes before the pixel
    data, for pydicom to parse only when asked (:meth:`HeaderScan.dataset`). Nothing of the pixel data is
    copied.

    Raises
    ------
    DatasetError
        When the bytes are not a complete dataset in that transfer syntax.
    """
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax:
        raise DatasetError(f"unknown transfer syntax {ts}")
    if ts == DeflatedExplicitVRLittleEndian:
        data = inflate(data)
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    walker = _walk(data, implicit, little, collect)
    return HeaderScan(bytes(data[: walker.stop]), walker.values, implicit, little)


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a syntactically valid UID that is safe to use as a file or folder name.

    Checks pydicom's ``UID.is_valid`` and, independently, the PS3.5 grammar (digits and dots, no leading zero
    in a component, 1 to 64 characters), so a UID can never contain a path separator or ``..``.
    """
    if not isinstance(value, str):
        return False
    if not 0 < len(value) <= 64 or not _UID_RE.match(value):
        return False
    return bool(UID(value).is_valid)


def get_uid(ds: Dataset, keyword: str) -> str | None:
    """The value of a UID element as a stripped string, or None when absent, empty or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value must read as "missing", not crash the handler
        return None
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    return text or None


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sxxL", 0x0002, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str | None = None,
    source_ae_title: str | None = None,
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1), explicit VR little endian.

    Equivalent to ``pydicom.filewriter.write_file_meta_info`` for these elements, about ten times faster,
    which matters at hundreds of instances per second. The UIDs must already be validated.
    """
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", _even(transfer_syntax_uid, b"\x00")),
            _meta_element(0x0012, b"UI", _even(implementation_class_uid, b"\x00")),
            _meta_element(0x0013, b"SH", _even(implementation_version_name, b" "))
            if implementation_version_name
            else b"",
            _meta_element(0x0016, b"AE", _even(source_ae_title, b" ")) if source_ae_title else b"",
        )
    )
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body
