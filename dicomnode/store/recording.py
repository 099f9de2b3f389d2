"""Recording received instances: one transaction for a batch, a few statements per series (the group commit).

The statements run on a connection inside the caller's write transaction
(:meth:`dicomnode.store.instances.InstanceStore.record_instances`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select, update

from dicomnode.store.base import (
    _INSERT_INSTANCE,
    _INSERT_SERIES,
    _INSERT_STUDY,
    _LEGACY_SOURCES,
    _SELECT_INSTANCES,
    _SELECT_SERIES,
    _SELECT_STUDY,
    _TOUCH_STUDY,
    INSTANCE_SOURCES,
    _new_id,
    _now,
    jsonable_attrs,
)
from dicomnode.store.models import JobRow, SeriesRow, StudyRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewInstance:
    """One received instance to record (the arguments of :meth:`InstanceStore.record_instance`)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path | str
    size_bytes: int
    study_attrs: Mapping[str, Any]
    series_attrs: Mapping[str, Any]
    calling_aet: str | None
    source: str
    slice_position: float | None = None
    number_of_frames: int | None = None
    now: datetime | None = None


@dataclass(frozen=True)
class _Prepared:
    study_uid: str
    series_uid: str
    at: datetime
    study_attrs: dict[str, Any]
    series_attrs: dict[str, Any]
    calling_aet: str | None
    row: dict[str, Any]


def _prepare(item: NewInstance) -> _Prepared:
    source = _LEGACY_SOURCES.get(item.source, item.source)
    if source not in INSTANCE_SOURCES:
        raise ValueError(f"source must be one of {INSTANCE_SOURCES}, not {item.source!r}")
    at = item.now or _now()
    row = {
        "sop_instance_uid": item.sop_instance_uid,
        "sop_class_uid": item.sop_class_uid,
        "transfer_syntax": item.transfer_syntax,
        "path": str(item.path),
        "size_bytes": int(item.size_bytes),
        "calling_aet": item.calling_aet,
        "source": source,
        "received_at": at,
        "slice_position": item.slice_position,
        "number_of_frames": item.number_of_frames,
    }
    return _Prepared(
        item.study_uid,
        item.series_uid,
        at,
        jsonable_attrs(item.study_attrs),
        jsonable_attrs(item.series_attrs),
        item.calling_aet,
        row,
    )


def _record_series(
    conn: Connection, study_uid: str, series_uid: str, items: list[_Prepared]
) -> list[tuple[int, bool]]:
    """Record instances of one series (in one transaction): ``[(index in items, new)]``."""
    first = items[0]
    study_id, study_attributes = _study_row(conn, study_uid, first.study_attrs, first.calling_aet, first.at)
    series_id, last_received_at, completed_at, version = _series_state(
        conn, series_uid, study_id, first.series_attrs, first.at
    )
    uids = [p.row["sop_instance_uid"] for p in items]
    known = set(conn.execute(_SELECT_INSTANCES, {"uids": uids}).scalars())
    out: list[tuple[int, bool]] = []
    rows: list[dict[str, Any]] = []
    merged = dict(study_attributes)
    latest: datetime | None = None
    for i, p in enumerate(items):
        uid = p.row["sop_instance_uid"]
        if uid in known:
            out.append((i, False))
            continue
        known.add(uid)
        rows.append({**p.row, "series_id": series_id})
        merged.update(p.study_attrs)
        latest = p.at if latest is None or p.at > latest else latest
        out.append((i, True))
    if not rows or latest is None:
        return out
    conn.execute(_INSERT_INSTANCE, rows)
    # SQL-side increments: two receivers writing the same series must not lose counts.
    conn.execute(_TOUCH_STUDY, {"sid": study_id, "at": latest})
    if study_attributes != merged:
        conn.execute(update(StudyRow).where(StudyRow.id == study_id).values(attributes=merged))
    values: dict[str, Any] = {"n_instances": SeriesRow.n_instances + len(rows)}
    if latest > last_received_at:
        values["last_received_at"] = latest
    if completed_at is not None:
        values.update(_reopened(conn, series_uid, series_id, version))
    conn.execute(update(SeriesRow).where(SeriesRow.id == series_id).values(**values))
    return out


def _study_row(
    conn: Connection, study_uid: str, attrs: dict[str, Any], calling_aet: str | None, at: datetime
) -> tuple[int, dict[str, Any]]:
    """The study's id and stored attributes, inserting the study when it is new."""
    study = conn.execute(_SELECT_STUDY, {"uid": study_uid}).first()
    if study is not None:
        return int(study.id), dict(study.attributes or {})
    values = {
        "study_instance_uid": study_uid,
        "attributes": attrs,
        "calling_aet": calling_aet,
        "first_received_at": at,
        "last_received_at": at,
        "routed_at": None,
    }
    return _new_id(conn.execute(_INSERT_STUDY, values)), dict(attrs)


def _series_state(
    conn: Connection, series_uid: str, study_id: int, attrs: dict[str, Any], at: datetime
) -> tuple[int, datetime, datetime | None, int]:
    """The series' id, last-received time, completion time and version, inserting the series when new."""
    series = conn.execute(_SELECT_SERIES, {"uid": series_uid}).first()
    if series is not None:
        return int(series.id), series.last_received_at, series.completed_at, int(series.version)
    values = {
        "series_instance_uid": series_uid,
        "study_id": study_id,
        "attributes": attrs,
        "modality": str(attrs.get("Modality")) if attrs.get("Modality") else None,
        "n_instances": 0,
        "first_received_at": at,
        "last_received_at": at,
        "completed_at": None,
        "version": 1,
        "needs_new_version": False,
    }
    return _new_id(conn.execute(_INSERT_SERIES, values)), at, None, 1


def _reopened(conn: Connection, series_uid: str, series_id: int, version: int) -> dict[str, Any]:
    """Column updates for a complete series a late instance re-opens (a new version when a job exists)."""
    values: dict[str, Any] = {"completed_at": None}
    has_job = conn.execute(
        select(func.count(JobRow.id)).where(JobRow.series_id == series_id, JobRow.version == version)
    ).scalar()
    if has_job:
        values["version"] = SeriesRow.version + 1
        values["needs_new_version"] = True
    log.info("series %s re-opened by a late instance (new version: %s)", series_uid, bool(has_job))
    return values
