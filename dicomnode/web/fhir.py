"""FHIR R4 Observation endpoint for laboratory values (founding study a).

``POST /fhir/Observation`` or ``POST /fhir`` with an Observation or a Bundle of Observations
(``application/fhir+json`` or ``application/json``), pushed by the hospital's integration engine.
Authenticated like the rest of the API (HTTP Basic or bearer token; the admin role: a viewer gets 403);
validated as a whole by :func:`dicomnode.labs.fhir.parse_observations` (bad input: 400 or 422 with one
line in a FHIR OperationOutcome, nothing stored); stored with the patient
(:meth:`dicomnode.store.Store.add_lab_values`) and audited (who, how many, which codes). Lab values and
patient identifiers are never logged at INFO.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dicomnode.labs.fhir import parse_observations
from dicomnode.labs.values import LabInputError
from dicomnode.web.deps import AdminUser

log = logging.getLogger(__name__)

router = APIRouter(prefix="/fhir", tags=["fhir"])
MAX_BODY = 2 * 1024 * 1024
FHIR_JSON = "application/fhir+json"


def _outcome(status: int, severity: str, code: str, text: str) -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}],
    }
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


async def _body_within(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to be over ``limit`` bytes (from Content-Length, or
    while it streams in): an oversized body is never held in memory (issue 14)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def _receive(request: Request, user: Any) -> JSONResponse:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in (FHIR_JSON, "application/json"):
        return _outcome(415, "error", "not-supported", f"content type {ctype or 'missing'}: send {FHIR_JSON}")
    body = await _body_within(request, MAX_BODY)
    if body is None:
        return _outcome(413, "error", "too-costly", f"body over {MAX_BODY // (1024 * 1024)} MiB")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _outcome(400, "error", "structure", "request body is not JSON")
    try:
        values, skipped = parse_observations(doc)
    except LabInputError as exc:
        log.debug("FHIR lab values refused: %s", exc)
        return _outcome(422, "error", "invalid", " ".join(str(exc).split())[:300])
    store = request.app.state.store
    # database writes off the event loop (SQLite may wait for the write lock)
    stored = await run_in_threadpool(store.add_lab_values, values) if values else 0
    codes = sorted({v.loinc for v in values})
    patients = sorted({v.patient_id for v in values})
    after = {"stored": stored, "skipped_by_status": skipped, "loinc": codes, "patients": patients}
    await run_in_threadpool(
        store.audit, user.username, "labs.received", f"patients:{len(patients)}", None, after
    )
    log.info("FHIR: %d lab value(s) stored, %d skipped by status", stored, skipped)  # counts only
    return _outcome(200, "information", "informational", f"stored {stored} lab value(s); {skipped} not final")


@router.post("/Observation")
async def post_observation(request: Request, user: AdminUser) -> JSONResponse:
    """Store the lab values of an Observation (or a Bundle of them)."""
    return await _receive(request, user)


@router.post("")
async def post_bundle(request: Request, user: AdminUser) -> JSONResponse:
    """Store the lab values of a Bundle of Observations (or one Observation)."""
    return await _receive(request, user)
