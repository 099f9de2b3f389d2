"""Laboratory values kept with the patient (founding study a): table ``lab_values`` (migration 0005).

A value is identified by (patient, LOINC code, sampling date, source, source id): the same FHIR
Observation pushed again replaces its value instead of adding a row. Lab values are patient data: logged
by count only, never by value or patient at INFO.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from sqlalchemy import Date, Float, Integer, String, UniqueConstraint, delete, select
from sqlalchemy.orm import Mapped, mapped_column

from dicomnode.store.base import StoreBase, _now
from dicomnode.store.models import Base, UTCDateTime

log = logging.getLogger(__name__)


class LabValueRow(Base):
    __tablename__ = "lab_values"
    __table_args__ = (UniqueConstraint("patient_id", "loinc", "effective", "source", "source_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    analyte: Mapped[str] = mapped_column(String(32))
    loinc: Mapped[str] = mapped_column(String(16))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(16))
    effective: Mapped[date] = mapped_column(Date)
    source: Mapped[str] = mapped_column(String(16))
    source_id: Mapped[str] = mapped_column(String(128), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LabInput(Protocol):
    """What :meth:`LabStore.add_lab_values` reads (``dicomnode.labs.LabValue`` has it)."""

    @property
    def patient_id(self) -> str: ...
    @property
    def analyte(self) -> str: ...
    @property
    def loinc(self) -> str: ...
    @property
    def value(self) -> float: ...
    @property
    def unit(self) -> str: ...
    @property
    def effective(self) -> date: ...
    @property
    def source(self) -> str: ...
    @property
    def source_id(self) -> str | None: ...


@dataclass(frozen=True)
class LabRecord:
    """One stored lab value (canonical unit of its analyte)."""

    patient_id: str
    analyte: str
    loinc: str
    value: float
    unit: str
    effective: date
    source: str
    source_id: str
    received_at: datetime


class LabStore(StoreBase):
    """Lab values by patient."""

    def add_lab_values(self, values: Sequence[LabInput], *, now: datetime | None = None) -> int:
        """Store lab values, all or none; a value with the same patient, code, date, source and source id
        replaces the stored one.

        Returns
        -------
        int
            How many were stored.
        """
        at = now or _now()
        with self._write() as s:
            for v in values:
                key = {
                    "patient_id": str(v.patient_id),
                    "loinc": str(v.loinc),
                    "effective": v.effective,
                    "source": str(v.source),
                    "source_id": str(v.source_id or ""),
                }
                s.execute(delete(LabValueRow).filter_by(**key))
                s.add(
                    LabValueRow(
                        **key, analyte=str(v.analyte), value=float(v.value), unit=str(v.unit), received_at=at
                    )
                )
        log.debug("stored %d lab value(s)", len(values))
        return len(values)

    def lab_values(
        self, patient_id: str, *, since: date | None = None, until: date | None = None
    ) -> list[LabRecord]:
        """The lab values of one patient, oldest first, optionally within [since, until]."""
        with self._read() as s:
            q = select(LabValueRow).where(LabValueRow.patient_id == patient_id)
            if since is not None:
                q = q.where(LabValueRow.effective >= since)
            if until is not None:
                q = q.where(LabValueRow.effective <= until)
            rows = s.scalars(q.order_by(LabValueRow.effective, LabValueRow.id)).all()
            return [
                LabRecord(
                    r.patient_id,
                    r.analyte,
                    r.loinc,
                    r.value,
                    r.unit,
                    r.effective,
                    r.source,
                    r.source_id,
                    r.received_at,
                )
                for r in rows
            ]
