"""Delivery results and the classification of DICOM / HTTP statuses into success, transient, permanent."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dicomnode.domain import DeliveryOutcome
from dicomnode.errors import PermanentError, RetryableError


class StatusClass(StrEnum):
    SUCCESS = "success"
    WARNING = "warning"  # stored, with a warning (coercion, elements discarded): counts as delivered
    TRANSIENT = "transient"  # try again later
    PERMANENT = "permanent"  # retrying will not help


def classify_dimse_status(code: int) -> StatusClass:
    """Classify a C-STORE response status (also used for STOW-RS FailureReason values).

    ``0x0000`` success; ``0x0001`` and ``0xB000-0xBFFF`` warning (stored); ``0xA700-0xA7FF`` out of resources,
    ``0x0213`` resource limitation, ``0xFE00`` cancelled and ``0x0110`` processing failure are transient
    (peers such as Orthanc answer 0x0110 for internal errors like a busy database; the retry count bounds it);
    everything else (``0x0122`` SOP class not supported, ``0x0124`` not authorised, ``0xA9xx`` dataset does
    not match SOP class, ``0xCxxx`` cannot understand, unknown codes) is permanent.
    """
    if code == 0x0000:
        return StatusClass.SUCCESS
    if code == 0x0001 or 0xB000 <= code <= 0xBFFF:
        return StatusClass.WARNING
    if 0xA700 <= code <= 0xA7FF or code in (0x0213, 0xFE00, 0x0110):
        return StatusClass.TRANSIENT
    return StatusClass.PERMANENT


def classify_http_status(code: int) -> StatusClass:
    """HTTP status of a STOW-RS response: 2xx success, 5xx/408/429 transient, other 4xx permanent."""
    if 200 <= code < 300:
        return StatusClass.SUCCESS
    if code >= 500 or code in (408, 429):
        return StatusClass.TRANSIENT
    return StatusClass.PERMANENT


def outcome_of(cls: StatusClass) -> DeliveryOutcome:
    """The per-file outcome of a status class."""
    if cls in (StatusClass.SUCCESS, StatusClass.WARNING):
        return DeliveryOutcome.SUCCESS
    if cls is StatusClass.TRANSIENT:
        return DeliveryOutcome.RETRYING
    return DeliveryOutcome.PERMANENT_FAILURE


@dataclass(frozen=True)
class FileStatus:
    """What happened to one file of a delivery."""

    path: Path
    sop_instance_uid: str | None
    #: DICOM status (C-STORE) or FailureReason / WarningReason (STOW-RS); None when no status was received.
    status: int | None
    outcome: DeliveryOutcome
    message: str = ""


@dataclass(frozen=True)
class DeliveryResult:
    """Result of one delivery attempt to one destination.

    ``outcome`` is SUCCESS when every file was confirmed (warnings included), PERMANENT_FAILURE when at
    least one file failed permanently (or the association/request was refused for good), else RETRYING
    (transient: peer down, timeout, out of resources). The retry policy turns RETRYING into
    PERMANENT_FAILURE once attempts are exhausted.
    """

    destination: str
    outcome: DeliveryOutcome
    message: str
    files: tuple[FileStatus, ...] = ()
    warnings: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome is DeliveryOutcome.SUCCESS

    @property
    def transient(self) -> bool:
        return self.outcome is DeliveryOutcome.RETRYING

    def failed_files(self) -> list[Path]:
        """The files that were not confirmed (what a retry must resend)."""
        return [f.path for f in self.files if f.outcome is not DeliveryOutcome.SUCCESS]

    def error(self) -> RetryableError | PermanentError | None:
        """The exception matching the outcome (None on success)."""
        text = f"delivery to {self.destination}: {self.message}"
        if self.outcome is DeliveryOutcome.RETRYING:
            return RetryableError(text)
        if self.outcome is DeliveryOutcome.PERMANENT_FAILURE:
            return PermanentError(text)
        return None

    def raise_for_outcome(self) -> None:
        """Raise :class:`RetryableError` or :class:`PermanentError` unless the delivery succeeded."""
        exc = self.error()
        if exc is not None:
            raise exc


def combine(destination: str, files: list[FileStatus], *, summary: str | None = None) -> DeliveryResult:
    """Overall result from per-file statuses: any permanent -> permanent, else any transient -> retrying."""
    n_ok = sum(f.outcome is DeliveryOutcome.SUCCESS for f in files)
    perm = [f for f in files if f.outcome is DeliveryOutcome.PERMANENT_FAILURE]
    trans = [f for f in files if f.outcome is DeliveryOutcome.RETRYING]
    warnings = sum(
        f.outcome is DeliveryOutcome.SUCCESS and f.status is not None and f.status != 0 for f in files
    )
    if perm:
        outcome = DeliveryOutcome.PERMANENT_FAILURE
        first = perm[0]
    elif trans:
        outcome = DeliveryOutcome.RETRYING
        first = trans[0]
    else:
        outcome = DeliveryOutcome.SUCCESS
        first = None
    if summary is not None:
        message = summary
    elif first is None:
        message = f"{n_ok}/{len(files)} stored" + (f" ({warnings} with warnings)" if warnings else "")
    else:
        message = (
            f"{n_ok}/{len(files)} stored; {len(perm)} permanent, {len(trans)} transient failures; "
            f"{first.message}"
        )
    return DeliveryResult(destination, outcome, message, tuple(files), warnings)
