"""STOW-RS receiver (PS3.18 10.5): ``POST {prefix}/studies`` and ``POST {prefix}/studies/{study}``.

The body is ``multipart/related; type="application/dicom"``; each part is a DICOM Part 10 file. Parts are
streamed to the spool's temp area (a CT series never sits in memory), then go through the same write path
as C-STORE (:meth:`dicomnode.ingest.spool.Spool.ingest_file`). The response is ``application/dicom+json``
with ReferencedSOPSequence (0008,1199) and FailedSOPSequence (0008,1198), FailureReason (0008,1197) being the
spool's status code; HTTP 200 when everything was stored, 202 when some parts failed, 409 when all failed,
415 for another media type, 400 for a malformed body.

The web module mounts the router: ``app.include_router(build_stow_router(spool))``.
"""

from __future__ import annotations

import contextlib
import email.message
import email.parser
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from dicomnode.ingest.dicomparse import is_valid_uid
from dicomnode.ingest.spool import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, IngestResult, Spool

LOGGER = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
_MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """The multipart body is malformed (message fit for a 400 response)."""


@dataclass
class _Part:
    headers: email.message.Message
    path: Path | None
    fp: BinaryIO | None
    size: int = 0
    complete: bool = False
    skipped_reason: int | None = None


@dataclass
class _Parser:
    """Incremental ``multipart/related`` parser writing each part body to a file of the spool."""

    boundary: bytes
    spool: Spool
    parts: list[_Part] = field(default_factory=list)
    buf: bytearray = field(default_factory=bytearray)
    state: str = "preamble"  # preamble -> headers -> body -> (headers -> body)* -> end

    @property
    def _first(self) -> bytes:
        return b"--" + self.boundary

    @property
    def _delim(self) -> bytes:
        return b"\r\n--" + self.boundary

    def feed(self, chunk: bytes) -> list[_Part]:
        """Consume ``chunk``; return the parts completed by it."""
        self.buf += chunk
        done: list[_Part] = []
        while True:
            if self.state == "preamble":
                i = self.buf.find(self._first)
                if i < 0 or len(self.buf) < i + len(self._first) + 2:
                    if len(self.buf) > 2 * _MAX_HEADER_BYTES and i < 0:
                        raise MultipartError("multipart boundary not found")
                    return done
                del self.buf[: i + len(self._first)]
                if not self._after_delimiter():
                    return done
            elif self.state == "headers":
                j = self.buf.find(b"\r\n\r\n")
                if self.buf.startswith(b"\r\n"):
                    j, hdr = 0, b""
                    del self.buf[:2]
                elif j < 0:
                    if len(self.buf) > _MAX_HEADER_BYTES:
                        raise MultipartError("part headers too large")
                    return done
                else:
                    hdr = bytes(self.buf[:j])
                    del self.buf[: j + 4]
                self._open_part(email.parser.BytesHeaderParser().parsebytes(hdr))
                self.state = "body"
            elif self.state == "body":
                part = self.parts[-1]
                i = self.buf.find(self._delim)
                if i < 0:
                    # Keep a tail that could be the start of a split delimiter.
                    keep = len(self._delim) - 1
                    if len(self.buf) > keep:
                        self._write(part, self.buf[: len(self.buf) - keep])
                        del self.buf[: len(self.buf) - keep]
                    return done
                self._write(part, self.buf[:i])
                del self.buf[: i + len(self._delim)]
                self._close_part(part, complete=True)
                done.append(part)
                self.state = "after"
            elif self.state == "after":
                if not self._after_delimiter():
                    return done
            else:  # end: ignore the epilogue
                self.buf.clear()
                return done

    def _after_delimiter(self) -> bool:
        """After a boundary: ``--`` ends the body, else skip transport padding to CRLF. False = need data."""
        if len(self.buf) < 2:
            self.state = "after"
            return False
        if self.buf[:2] == b"--":
            self.state = "end"
            return True
        k = self.buf.find(b"\r\n")
        if k < 0:
            if len(self.buf) > 1024:
                raise MultipartError("malformed multipart boundary line")
            self.state = "after"
            return False
        if self.buf[:k].strip(b" \t"):
            raise MultipartError("malformed multipart boundary line")
        del self.buf[: k + 2]
        self.state = "headers"
        return True

    def _open_part(self, headers: email.message.Message) -> None:
        if not self.spool.has_free_space():
            # Do not fill the disk further: the part's bytes are read and dropped, and it fails with 0xA700.
            self.parts.append(_Part(headers, None, None, skipped_reason=OUT_OF_RESOURCES))
            return
        path = self.spool.new_temp_path()
        self.parts.append(_Part(headers, path, open(path, "wb")))  # noqa: SIM115 - closed in _close_part

    def _write(self, part: _Part, data: bytes | bytearray) -> None:
        if part.fp is not None and data:
            part.fp.write(data)
        part.size += len(data)

    def _close_part(self, part: _Part, *, complete: bool) -> None:
        part.complete = complete
        if part.fp is not None:
            part.fp.close()
            part.fp = None

    def abort(self) -> None:
        """Close and delete every part file not handed to the spool."""
        for part in self.parts:
            self._close_part(part, complete=part.complete)
            if part.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(part.path)


def _content_type(value: str) -> email.message.Message:
    msg = email.message.Message()
    msg["content-type"] = value
    return msg


def _sop_item(result: IngestResult, *, failed: bool) -> dict[str, Any]:
    def ui(value: str | None) -> dict[str, Any]:
        return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}

    item: dict[str, Any] = {
        "00081150": ui(result.sop_class_uid),
        "00081155": ui(result.sop_instance_uid),
    }
    if failed:
        item["00081197"] = {"vr": "US", "Value": [result.status]}
    elif result.status != 0:
        item["00081196"] = {"vr": "US", "Value": [result.status]}  # WarningReason
    return item


def stow_response(results: list[IngestResult]) -> tuple[int, dict[str, Any]]:
    """HTTP status and DICOM JSON body for the per-instance ``results`` of one STOW-RS request."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    body: dict[str, Any] = {}
    if ok:
        body["00081199"] = {"vr": "SQ", "Value": [_sop_item(r, failed=False) for r in ok]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_sop_item(r, failed=True) for r in failed]}
    if not failed:
        code = 200
    elif ok:
        code = 202
    else:
        code = 409
    return code, body


def _error(code: int, message: str) -> Response:
    return JSONResponse({"detail": message}, status_code=code)


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


def build_stow_router(spool: Spool, *, prefix: str = "/dicomweb") -> APIRouter:
    """The STOW-RS endpoints over ``spool``.

    Parameters
    ----------
    spool
        The shared write path (the same one the C-STORE SCP uses).
    prefix
        Where the DICOMweb service root is mounted (``{prefix}/studies``).

    Returns
    -------
    fastapi.APIRouter
        Routes ``POST {prefix}/studies`` and ``POST {prefix}/studies/{study}``.
    """
    router = APIRouter(prefix=prefix, tags=["dicomweb"])

    async def _store(request: Request, study: str | None) -> Response:
        ctype = _content_type(request.headers.get("content-type", ""))
        if ctype.get_content_type() != "multipart/related":
            return _error(415, 'expected multipart/related; type="application/dicom"')
        part_type = str(ctype.get_param("type") or "application/dicom").strip().lower()
        if part_type != "application/dicom":
            return _error(415, f"unsupported part type {part_type!r}; only application/dicom is accepted")
        boundary = ctype.get_param("boundary")
        if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
            return _error(400, "multipart boundary parameter missing or invalid")
        if study is not None and not is_valid_uid(study):
            return _error(400, "invalid Study Instance UID in the request path")

        parser = _Parser(boundary.encode("latin-1"), spool)
        results: list[IngestResult] = []
        handed: set[int] = set()
        try:
            async for chunk in _chunks(request):
                for part in parser.feed(chunk):
                    handed.add(id(part))
                    results.append(await _ingest_part(spool, part, study))
            # A body that ends inside a part: that part is incomplete and must not be stored.
            if parser.state == "body":
                part = parser.parts[-1]
                parser._close_part(part, complete=False)
                handed.add(id(part))
                results.append(await _ingest_part(spool, part, study))
        except MultipartError as exc:
            return _error(400, str(exc))
        finally:
            parser.parts = [p for p in parser.parts if id(p) not in handed]
            parser.abort()
        if not results:
            return _error(400, "no application/dicom part in the request")
        code, body = stow_response(results)
        LOGGER.info(
            "STOW-RS: %d stored, %d failed", sum(r.ok for r in results), sum(not r.ok for r in results)
        )
        return JSONResponse(body, status_code=code, media_type=DICOM_JSON)

    @router.post("/studies", summary="Store instances (STOW-RS)")
    async def store_instances(request: Request) -> Response:
        return await _store(request, None)

    @router.post("/studies/{study}", summary="Store instances of one study (STOW-RS)")
    async def store_study_instances(study: str, request: Request) -> Response:
        return await _store(request, study)

    return router


async def _ingest_part(spool: Spool, part: _Part, study: str | None) -> IngestResult:
    if part.skipped_reason is not None or part.path is None:
        return IngestResult(
            part.skipped_reason or OUT_OF_RESOURCES, "out of resources: spool free space below floor"
        )
    if not part.complete:
        with contextlib.suppress(OSError):
            os.unlink(part.path)
        return IngestResult(CANNOT_UNDERSTAND, "multipart body ended inside this part")
    ptype = part.headers.get_content_type() if part.headers.get("content-type") else "application/dicom"
    if ptype != "application/dicom":
        with contextlib.suppress(OSError):
            os.unlink(part.path)
        return IngestResult(CANNOT_UNDERSTAND, f"part media type {ptype} is not application/dicom")
    # ingest_file fsyncs and writes the database: keep the event loop free.
    return await run_in_threadpool(spool.ingest_file, part.path, source="stow", expected_study_uid=study)
