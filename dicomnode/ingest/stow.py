"""STOW-RS receiver (PS3.18 10.5): ``POST {prefix}/studies`` and ``POST {prefix}/studies/{study}``.

The body is ``multipart/related; type="application/dicom"``; each part is a DICOM Part 10 file. Parts are
streamed to the spool's temp area (a CT series never sits in memory), then go through the same write path
as C-STORE (:meth:`dicomnode.ingest.spool.Spool.ingest_file`). The response is ``application/dicom+json``
with ReferencedSOPSequence (0008,1199) and FailedSOPSequence (0008,1198), FailureReason (0008,1197) being the
spool's status code; HTTP 200 when everything was stored, 202 when some parts failed, 409 when all failed,
415 for another media type, 400 for a malformed body, 413 for a body or an instance over its limit.

Hostile or broken clients (issue 14):

* **Size limits**: the body may not exceed ``http.stow_max_body_mb`` (refused from ``Content-Length`` before
  anything is read, or when the streamed bytes pass it) nor one part ``http.stow_max_instance_mb`` (the
  write path reads one instance into memory to check it). Both answer 413; what is over the limit is never
  written.
* **Free-space floor**: checked when a part starts *and* every :data:`FLOOR_CHECK_BYTES` while its bytes
  arrive; a part that would go below the floor is deleted at once and fails with 0xA700.
* **Header consistency**: the file meta's Media Storage SOP Class/Instance UID must agree with the dataset,
  by the same rule as a C-STORE request's Affected SOP Class/Instance UID
  (:func:`dicomnode.ingest.consistency.claim_mismatch`: 0xA900, 0xC212).
* **Abandoned uploads**: a client that goes away mid-body costs one INFO line; the partial part is deleted,
  parts that were complete stay stored; never a 500.
* **Log floods**: per-instance refusals are rate limited (:mod:`dicomnode.ingest.lograte`); each request
  ends with one line counting what was stored and refused, by status.

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
from starlette.requests import ClientDisconnect

from dicomnode.ingest import prometheus as metrics
from dicomnode.ingest.consistency import claim_mismatch
from dicomnode.ingest.dicomparse import get_uid, is_valid_uid
from dicomnode.ingest.lograte import limit_repeats
from dicomnode.ingest.spool import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, IngestResult, Spool

LOGGER = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
_MAX_HEADER_BYTES = 16 * 1024
_MB = 1024 * 1024
#: Default limits when neither the router's arguments nor ``app.state.settings`` say otherwise.
DEFAULT_MAX_BODY_BYTES = 4096 * _MB
DEFAULT_MAX_INSTANCE_BYTES = 128 * _MB
#: The spool's free-space floor is checked again after this many bytes of one part.
FLOOR_CHECK_BYTES = 4 * _MB


class MultipartError(ValueError):
    """The multipart body is malformed (message fit for a 400 response)."""


class TooLargeError(ValueError):
    """The body or one of its parts is over its limit (message fit for a 413 response)."""


@dataclass
class _Part:
    headers: email.message.Message
    path: Path | None
    fp: BinaryIO | None
    size: int = 0
    complete: bool = False
    skipped_reason: int | None = None
    skipped_comment: str | None = None
    unchecked: int = 0  # bytes written since the free-space floor was last checked


@dataclass
class _Parser:
    """Incremental ``multipart/related`` parser writing each part body to a file of the spool."""

    boundary: bytes
    spool: Spool
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    parts: list[_Part] = field(default_factory=list)
    buf: bytearray = field(default_factory=bytearray)
    state: str = "preamble"  # preamble -> headers -> body -> (headers -> body)* -> end
    received: int = 0

    @property
    def _first(self) -> bytes:
        return b"--" + self.boundary

    @property
    def _delim(self) -> bytes:
        return b"\r\n--" + self.boundary

    def feed(self, chunk: bytes) -> list[_Part]:
        """Consume ``chunk``; return the parts completed by it.

        Raises
        ------
        MultipartError
            The body is malformed.
        TooLargeError
            The body, or the part being read, is over its limit.
        """
        self.received += len(chunk)
        if self.received > self.max_body_bytes:
            raise TooLargeError(f"request body larger than {_mb(self.max_body_bytes)}")
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
        try:
            fp = open(path, "wb")  # noqa: SIM115 - closed in _close_part
        except OSError as exc:  # disk full, too many open files: this part fails, the request goes on
            self.parts.append(
                _Part(headers, None, None, skipped_reason=OUT_OF_RESOURCES, skipped_comment=_no_space(exc))
            )
            return
        self.parts.append(_Part(headers, path, fp))

    def _write(self, part: _Part, data: bytes | bytearray) -> None:
        part.size += len(data)
        if part.size > self.max_instance_bytes:
            self._drop(part, OUT_OF_RESOURCES, "instance over the size limit")
            raise TooLargeError(f"an instance in the request is larger than {_mb(self.max_instance_bytes)}")
        if part.fp is None or not data:
            return
        part.unchecked += len(data)
        if part.unchecked >= FLOOR_CHECK_BYTES:
            part.unchecked = 0
            if not self.spool.has_free_space():
                # The floor is checked as the bytes arrive, not only when the part started: the rest of
                # this part is read and dropped, and it fails with 0xA700.
                self._drop(part, OUT_OF_RESOURCES, "out of resources: spool free space below floor")
                return
        try:
            part.fp.write(data)
        except OSError as exc:  # disk full (or failing) under us: this part fails, the request goes on
            self._drop(part, OUT_OF_RESOURCES, _no_space(exc))

    def _drop(self, part: _Part, status: int, comment: str) -> None:
        """Stop keeping ``part``: close and delete its file; it will fail with ``status``."""
        self._close_part(part, complete=part.complete)
        if part.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(part.path)
            part.path = None
        part.skipped_reason, part.skipped_comment = status, comment

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


def _no_space(exc: OSError) -> str:
    return f"out of resources: spool write failed ({exc.strerror or type(exc).__name__})"


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


def _mb(n: int) -> str:
    return f"{n / _MB:g} MB"


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


async def _drain(stream: AsyncIterator[bytes], limit: int) -> None:
    """Read and drop the rest of a refused body (at most ``limit`` bytes), so the client reads the answer."""
    seen = 0
    with contextlib.suppress(ClientDisconnect):
        async for chunk in stream:
            seen += len(chunk)
            if seen > limit:
                return


def _limits(request: Request, max_body: int | None, max_instance: int | None) -> tuple[int, int]:
    """The body and instance limits: the router's arguments, else the app's settings, else the defaults."""
    http = getattr(getattr(request.app.state, "settings", None), "http", None)
    body = max_body or (http.stow_max_body_mb * _MB if http is not None else DEFAULT_MAX_BODY_BYTES)
    inst = max_instance or (
        http.stow_max_instance_mb * _MB if http is not None else DEFAULT_MAX_INSTANCE_BYTES
    )
    return body, inst


def _summary(results: list[IngestResult]) -> str:
    """``3 stored, 5000 failed (0xC210 x 4990, 0xA900 x 10)``: one line for a whole request."""
    failed: dict[int, int] = {}
    for r in results:
        if not r.ok:
            failed[r.status] = failed.get(r.status, 0) + 1
    text = f"{sum(r.ok for r in results)} stored, {sum(failed.values())} failed"
    if failed:
        text += " (" + ", ".join(f"0x{k:04X} x {v}" for k, v in sorted(failed.items())) + ")"
    return text


def build_stow_router(
    spool: Spool,
    *,
    prefix: str = "/dicomweb",
    max_body_bytes: int | None = None,
    max_instance_bytes: int | None = None,
) -> APIRouter:
    """The STOW-RS endpoints over ``spool``.

    Parameters
    ----------
    spool
        The shared write path (the same one the C-STORE SCP uses).
    prefix
        Where the DICOMweb service root is mounted (``{prefix}/studies``).
    max_body_bytes, max_instance_bytes
        Limits of one request body and of one part; None = ``http.stow_max_body_mb`` and
        ``http.stow_max_instance_mb`` of the app's settings (``app.state.settings``), else 4 GB and 128 MB.

    Returns
    -------
    fastapi.APIRouter
        Routes ``POST {prefix}/studies`` and ``POST {prefix}/studies/{study}``.
    """
    router = APIRouter(prefix=prefix, tags=["dicomweb"])
    # One bad body can hold thousands of refused parts: the write path's per-instance lines are rate limited.
    limit_repeats(logging.getLogger(Spool.__module__))
    limit_repeats(LOGGER)

    async def _store(request: Request, study: str | None) -> Response:
        max_body, max_instance = _limits(request, max_body_bytes, max_instance_bytes)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            return _error(413, f"request body larger than {_mb(max_body)}")
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

        parser = _Parser(boundary.encode("latin-1"), spool, max_body, max_instance)
        results: list[IngestResult] = []
        handed: set[int] = set()
        stream = _chunks(request)
        try:
            async for chunk in stream:
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
        except TooLargeError as exc:
            LOGGER.info("STOW-RS refused (413): %s; before it: %s", exc, _summary(results))
            parser.parts = [p for p in parser.parts if id(p) not in handed]
            parser.abort()  # the part over the limit is deleted before the rest is read and dropped
            await _drain(stream, max(0, max_body - parser.received))
            return _error(413, str(exc))
        except ClientDisconnect:
            # The client went away mid-body: nobody reads an answer. Complete parts stay stored (each got
            # its own durable write); the partial one is deleted below.
            LOGGER.info("STOW-RS: client went away after %d bytes; %s", parser.received, _summary(results))
            return Response(status_code=400)
        finally:
            parser.parts = [p for p in parser.parts if id(p) not in handed]
            parser.abort()
        if not results:
            return _error(400, "no application/dicom part in the request")
        code, body = stow_response(results)
        LOGGER.info("STOW-RS: %s", _summary(results))
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
        metrics.count_instance("stow", "failed")
        return IngestResult(
            part.skipped_reason or OUT_OF_RESOURCES,
            part.skipped_comment or "out of resources: spool free space below floor",
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
    return await run_in_threadpool(_checked_ingest, spool, part.path, study)


def _checked_ingest(spool: Spool, path: Path, study: str | None) -> IngestResult:
    """The file meta must agree with the dataset (the DIMSE rule), then the spool's write path."""
    refused = file_meta_mismatch(path)
    if refused is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
        metrics.count_instance("stow", "failed")
        return refused
    return spool.ingest_file(path, source="stow", expected_study_uid=study)


def file_meta_mismatch(path: Path) -> IngestResult | None:
    """The refusal when a Part 10 file's meta claims another SOP Class/Instance than its dataset holds.

    Reads the file meta and the dataset's SOP Class/Instance UIDs only (values over 1 KB deferred, pixel data
    never read). A file that cannot be read this way returns None: the spool's checks then refuse it with
    their own reason.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, defer_size=1024, specific_tags=["SOPClassUID", "SOPInstanceUID"]
        )
    except Exception:  # unreadable: the spool answers 0xC210 with its own one-line reason
        return None
    meta = getattr(ds, "file_meta", None)
    sop_class, sop = get_uid(ds, "SOPClassUID"), get_uid(ds, "SOPInstanceUID")
    if meta is None or sop_class is None or sop is None:
        return None
    found = claim_mismatch(
        sop_class,
        sop,
        get_uid(meta, "MediaStorageSOPClassUID"),
        get_uid(meta, "MediaStorageSOPInstanceUID"),
        claimed_by="the file meta",
    )
    if found is None:
        return None
    return IngestResult(found.status, found.comment, sop_class_uid=sop_class, sop_instance_uid=sop)
