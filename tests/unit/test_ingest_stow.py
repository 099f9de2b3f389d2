"""STOW-RS receiver (dicomnode.ingest.stow) through FastAPI's TestClient: real HTTP semantics, real spool."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi import FastAPI
from pydicom.uid import MRImageStorage
from test_ingest_spool import make_ds, part10

from dicomnode.ingest import MemorySink, Spool
from dicomnode.ingest.stow import _Parser, build_stow_router

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette warns about its httpx-based client
    from fastapi.testclient import TestClient

BOUNDARY = "b0undary-42"


def multipart(parts: list[bytes], boundary: str = BOUNDARY, part_type: str = "application/dicom") -> bytes:
    out = b"preamble to be ignored\r\n"
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue".encode()


def ctype(boundary: str = BOUNDARY, quoted: bool = True) -> str:
    b = f'"{boundary}"' if quoted else boundary
    return f'multipart/related; type="application/dicom"; boundary={b}'


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def spool(tmp_path: Path, sink: MemorySink) -> Spool:
    return Spool(tmp_path / "spool", sink, other_classes="refuse")


@pytest.fixture
def client(spool: Spool) -> TestClient:
    app = FastAPI()
    app.include_router(build_stow_router(spool))
    return TestClient(app)


def sops(body: dict[str, object], tag: str) -> list[str]:
    seq = body.get(tag) or {"Value": []}
    assert isinstance(seq, dict)
    return [item["00081155"].get("Value", [None])[0] for item in seq["Value"]]


@pytest.mark.parametrize("quoted", [True, False])
def test_all_stored_gives_200_and_referenced_sops(
    client: TestClient, sink: MemorySink, spool: Spool, quoted: bool
) -> None:
    dss = [make_ds(), make_ds()]
    r = client.post("/dicomweb/studies", content=multipart([part10(d) for d in dss]),
                    headers={"content-type": ctype(quoted=quoted)})  # fmt: skip
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/dicom+json")
    body = r.json()
    assert sorted(sops(body, "00081199")) == sorted(d.SOPInstanceUID for d in dss)
    assert "00081198" not in body
    for d in dss:
        rec = sink.instances[d.SOPInstanceUID]
        assert rec.source == "stow" and rec.path is not None
        assert rec.path.read_bytes() == part10(d), "stored bytes are the part as received"
    assert not list(spool.temp_dir.iterdir())


def test_partial_failure_gives_202_with_failure_reasons(client: TestClient, sink: MemorySink) -> None:
    good = make_ds()
    mr = make_ds(MRImageStorage)
    r = client.post("/dicomweb/studies", content=multipart([part10(good), b"not dicom", part10(mr)]),
                    headers={"content-type": ctype()})  # fmt: skip
    assert r.status_code == 202
    body = r.json()
    assert sops(body, "00081199") == [good.SOPInstanceUID]
    failed = body["00081198"]["Value"]
    reasons = sorted(item["00081197"]["Value"][0] for item in failed)
    assert reasons == sorted([0xC210, 0x0122])
    assert mr.SOPInstanceUID in sops(body, "00081198")
    assert list(sink.instances) == [good.SOPInstanceUID]


def test_all_failed_gives_409(client: TestClient, sink: MemorySink) -> None:
    r = client.post(
        "/dicomweb/studies", content=multipart([b"junk", b"more junk"]), headers={"content-type": ctype()}
    )
    assert r.status_code == 409
    assert len(r.json()["00081198"]["Value"]) == 2
    assert len(sink) == 0


def test_study_in_path_must_match(client: TestClient, sink: MemorySink) -> None:
    a = make_ds()
    b = make_ds(study=a.StudyInstanceUID)
    other = make_ds()
    body = multipart([part10(x) for x in (a, b, other)])
    r = client.post(f"/dicomweb/studies/{a.StudyInstanceUID}", content=body,
                    headers={"content-type": ctype()})  # fmt: skip
    assert r.status_code == 202
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xA900]
    assert set(sink.instances) == {a.SOPInstanceUID, b.SOPInstanceUID}
    assert client.post("/dicomweb/studies/not-a-uid", content=multipart([part10(a)]),
                       headers={"content-type": ctype()}).status_code == 400  # fmt: skip


@pytest.mark.parametrize(
    "content_type",
    ["application/dicom", "application/json", 'multipart/related; type="application/dicom+json"; boundary=x'],
)
def test_wrong_media_type_gives_415(client: TestClient, content_type: str) -> None:
    r = client.post("/dicomweb/studies", content=b"{}", headers={"content-type": content_type})
    assert r.status_code == 415


def test_missing_boundary_or_parts_gives_400(client: TestClient) -> None:
    r = client.post(
        "/dicomweb/studies",
        content=b"x",
        headers={"content-type": 'multipart/related; type="application/dicom"'},
    )
    assert r.status_code == 400
    r = client.post(
        "/dicomweb/studies", content=f"--{BOUNDARY}--\r\n".encode(), headers={"content-type": ctype()}
    )
    assert r.status_code == 400


def test_body_ending_inside_a_part_stores_only_complete_parts(
    client: TestClient, sink: MemorySink, spool: Spool
) -> None:
    a, b = make_ds(), make_ds()
    body = multipart([part10(a)]).rsplit(f"--{BOUNDARY}--".encode(), 1)[0]
    body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10(b)[:300]
    r = client.post("/dicomweb/studies", content=body, headers={"content-type": ctype()})
    assert r.status_code == 202
    assert list(sink.instances) == [a.SOPInstanceUID]
    assert not list(spool.temp_dir.iterdir()), "the incomplete part's temp file is removed"


def test_streamed_tiny_chunks(client: TestClient, sink: MemorySink) -> None:
    dss = [make_ds() for _ in range(3)]
    body = multipart([part10(d) for d in dss])

    def gen() -> Iterator[bytes]:
        for i in range(0, len(body), 13):
            yield body[i : i + 13]

    r = client.post("/dicomweb/studies", content=gen(), headers={"content-type": ctype()})
    assert r.status_code == 200
    assert set(sink.instances) == {d.SOPInstanceUID for d in dss}


@pytest.mark.parametrize("chunk", [1, 2, 5, 17, 1000, 10**6])
def test_parser_is_independent_of_chunking(spool: Spool, chunk: int) -> None:
    payloads = [b"A" * 50, b"\r\n--" + b"x" * 20, b"", b"tail\r\n-"]
    body = multipart(payloads)
    parser = _Parser(BOUNDARY.encode(), spool)
    done = []
    for i in range(0, len(body), chunk):
        done.extend(parser.feed(body[i : i + chunk]))
    assert parser.state == "end"
    assert [p.path.read_bytes() for p in done if p.path is not None] == payloads
    assert all(p.complete for p in done)
    parser.abort()


def test_below_free_space_floor_parts_fail_with_a700(tmp_path: Path) -> None:
    sink = MemorySink()
    spool = Spool(tmp_path / "s", sink, free_space_floor_mb=10**12)
    app = FastAPI()
    app.include_router(build_stow_router(spool, prefix="/dw"))
    r = TestClient(app).post(
        "/dw/studies", content=multipart([part10(make_ds())]), headers={"content-type": ctype()}
    )
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
    assert not list(spool.temp_dir.iterdir())


def test_stored_file_reads_back(client: TestClient, sink: MemorySink) -> None:
    ds = make_ds()
    client.post("/dicomweb/studies", content=multipart([part10(ds)]), headers={"content-type": ctype()})
    path = sink.instances[ds.SOPInstanceUID].path
    assert path is not None
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
