"""Recording received instances: one transaction for a batch, a few statements per series (the group commit).

The statements run on a connection inside the caller's write transaction
(:meth:`dicomnode.store.instances.InstanceStore.record_instances`): SQLAlchemy Core statements on any backend
(:class:`_Statements`), or, on SQLite, the same statements compiled once and run straight on the driver's
cursor (:class:`SqliteStatements`): SQLAlchemy's per-execution work (execution context, cache-key
generation, result wrapping) cost several times what SQLite takes to run them, a quarter of the receiver's
interpreter time at four associations.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Dialect, bindparam, func, insert, select, update
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

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
from dicomnode.store.models import InstanceRow, JobRow, SeriesRow, StudyRow

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


class _Statements:
    """The statements recording runs, on a SQLAlchemy connection (any backend)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def study(self, uid: str) -> tuple[int, dict[str, Any]] | None:
        row = self.conn.execute(_SELECT_STUDY, {"uid": uid}).first()
        return None if row is None else (int(row.id), dict(row.attributes or {}))

    def insert_study(self, values: dict[str, Any]) -> int:
        return _new_id(self.conn.execute(_INSERT_STUDY, values))

    def series(self, uid: str) -> tuple[int, datetime, datetime | None, int] | None:
        row = self.conn.execute(_SELECT_SERIES, {"uid": uid}).first()
        if row is None:
            return None
        return int(row.id), row.last_received_at, row.completed_at, int(row.version)

    def insert_series(self, values: dict[str, Any]) -> int:
        return _new_id(self.conn.execute(_INSERT_SERIES, values))

    def known(self, uids: list[str]) -> set[str]:
        return set(self.conn.execute(_SELECT_INSTANCES, {"uids": uids}).scalars())

    def insert_instances(self, rows: list[dict[str, Any]]) -> None:
        self.conn.execute(_INSERT_INSTANCE, rows)

    def touch_study(self, study_id: int, at: datetime) -> None:
        self.conn.execute(_TOUCH_STUDY, {"sid": study_id, "at": at})

    def set_study_attributes(self, study_id: int, attributes: dict[str, Any]) -> None:
        self.conn.execute(update(StudyRow).where(StudyRow.id == study_id).values(attributes=attributes))

    def has_job(self, series_id: int, version: int) -> bool:
        return bool(
            self.conn.execute(
                select(func.count(JobRow.id)).where(JobRow.series_id == series_id, JobRow.version == version)
            ).scalar()
        )

    def update_series(
        self, series_id: int, added: int, last_received_at: datetime | None, reopen: bool, new_version: bool
    ) -> None:
        values: dict[str, Any] = {"n_instances": SeriesRow.n_instances + added}
        if last_received_at is not None:
            values["last_received_at"] = last_received_at
        if reopen:
            values["completed_at"] = None
        if new_version:
            values["version"] = SeriesRow.version + 1
            values["needs_new_version"] = True
        self.conn.execute(update(SeriesRow).where(SeriesRow.id == series_id).values(**values))


def _record_batch(db: _Statements, prepared: list[_Prepared]) -> list[bool]:
    """Record a batch (in the caller's one transaction), series by series: whether each instance was new."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(prepared):
        groups.setdefault((p.study_uid, p.series_uid), []).append(i)
    news = [False] * len(prepared)
    for (study_uid, series_uid), indices in groups.items():
        for i, new in _record_series(db, study_uid, series_uid, [prepared[i] for i in indices]):
            news[indices[i]] = new
    return news


def _record_series(
    db: _Statements, study_uid: str, series_uid: str, items: list[_Prepared]
) -> list[tuple[int, bool]]:
    """Record instances of one series (in one transaction): ``[(index in items, new)]``."""
    first = items[0]
    study_id, study_attributes = _study_row(db, study_uid, first.study_attrs, first.calling_aet, first.at)
    series_id, last_received_at, completed_at, version = _series_state(
        db, series_uid, study_id, first.series_attrs, first.at
    )
    uids = [p.row["sop_instance_uid"] for p in items]
    known = db.known(uids)
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
    db.insert_instances(rows)
    # SQL-side increments: two receivers writing the same series must not lose counts.
    db.touch_study(study_id, latest)
    if study_attributes != merged:
        db.set_study_attributes(study_id, merged)
    new_version = False
    if completed_at is not None:
        new_version = db.has_job(series_id, version)
        log.info("series %s re-opened by a late instance (new version: %s)", series_uid, new_version)
    db.update_series(
        series_id,
        len(rows),
        latest if latest > last_received_at else None,
        completed_at is not None,
        new_version,
    )
    return out


def _study_row(
    db: _Statements, study_uid: str, attrs: dict[str, Any], calling_aet: str | None, at: datetime
) -> tuple[int, dict[str, Any]]:
    """The study's id and stored attributes, inserting the study when it is new."""
    study = db.study(study_uid)
    if study is not None:
        return study
    values = {
        "study_instance_uid": study_uid,
        "attributes": attrs,
        "calling_aet": calling_aet,
        "first_received_at": at,
        "last_received_at": at,
        "routed_at": None,
    }
    return db.insert_study(values), dict(attrs)


def _series_state(
    db: _Statements, series_uid: str, study_id: int, attrs: dict[str, Any], at: datetime
) -> tuple[int, datetime, datetime | None, int]:
    """The series' id, last-received time, completion time and version, inserting the series when new."""
    series = db.series(series_uid)
    if series is not None:
        return series
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
    return db.insert_series(values), at, None, 1


class _Compiled:
    """One statement compiled for a dialect: its SQL, the order of its parameters and their bind processors
    (SQLAlchemy's own conversions: aware UTC datetimes to the stored text, JSON, booleans)."""

    __slots__ = ("fixed", "names", "procs", "sql")

    def __init__(self, stmt: ClauseElement, dialect: Dialect, keys: list[str] | None = None) -> None:
        compiled = cast(SQLCompiler, stmt.compile(dialect=dialect, column_keys=keys))
        self.sql = compiled.string
        self.names: list[str] = list(compiled.positiontup or [])
        self.procs = [
            compiled.binds[n].type.dialect_impl(dialect).bind_processor(dialect) for n in self.names
        ]
        #: Values written into the statement itself (``values(completed_at=None)``).
        self.fixed = {n: compiled.binds[n].value for n in self.names}

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, proc in zip(self.names, self.procs, strict=True):
            value = values[name] if name in values else self.fixed[name]
            out.append(value if proc is None else proc(value))
        return tuple(out)


def _result_processor(type_: Any, dialect: Dialect) -> Any:
    return type_.dialect_impl(dialect).result_processor(dialect, None)


class SqliteStatements(_Statements):
    """The statements of :class:`_Statements` on a DBAPI cursor of the SQLite driver (see the module
    docstring); compiled once per store by :meth:`prepare`, bound to a cursor by :meth:`on`."""

    def __init__(self, dialect: Dialect) -> None:
        self.cursor: Any = None
        study_cols = [
            "study_instance_uid",
            "attributes",
            "calling_aet",
            "first_received_at",
            "last_received_at",
        ]
        series_cols = [
            "series_instance_uid",
            "study_id",
            "attributes",
            "modality",
            "n_instances",
            "first_received_at",
            "last_received_at",
            "completed_at",
            "version",
            "needs_new_version",
        ]
        instance_cols = [c.key for c in InstanceRow.__table__.columns if c.key != "id"]
        self._select_study = _Compiled(_SELECT_STUDY, dialect)
        self._insert_study = _Compiled(insert(StudyRow), dialect, [*study_cols, "routed_at"])
        self._select_series = _Compiled(_SELECT_SERIES, dialect)
        self._insert_series = _Compiled(insert(SeriesRow), dialect, series_cols)
        self._insert_instance = _Compiled(insert(InstanceRow), dialect, instance_cols)
        self._touch_study = _Compiled(_TOUCH_STUDY, dialect)
        self._study_attributes = _Compiled(
            update(StudyRow)
            .where(StudyRow.id == bindparam("sid"))
            .values(attributes=bindparam("attributes")),
            dialect,
        )
        self._has_job = _Compiled(
            select(func.count(JobRow.id)).where(
                JobRow.series_id == bindparam("sid"), JobRow.version == bindparam("version")
            ),
            dialect,
        )
        self._update_series: dict[tuple[bool, bool, bool], _Compiled] = {}
        for at in (False, True):
            for reopen in (False, True):
                for bump in (False, True):
                    values: dict[str, Any] = {"n_instances": SeriesRow.n_instances + bindparam("n")}
                    if at:
                        values["last_received_at"] = bindparam("at")
                    if reopen:
                        values["completed_at"] = None
                    if bump:
                        values["version"] = SeriesRow.version + 1
                        values["needs_new_version"] = True
                    stmt = update(SeriesRow).where(SeriesRow.id == bindparam("sid")).values(**values)
                    self._update_series[(at, reopen, bump)] = _Compiled(stmt, dialect)
        uid, table = InstanceRow.__table__.c.sop_instance_uid.name, InstanceRow.__tablename__
        self._known_sql = f"SELECT {uid} FROM {table} WHERE {uid} IN "
        self._json_out = _result_processor(StudyRow.__table__.c.attributes.type, dialect)
        self._time_out = _result_processor(SeriesRow.__table__.c.last_received_at.type, dialect)

    def on(self, cursor: Any) -> SqliteStatements:
        """These statements bound to ``cursor`` (a copy: the compiled ones are shared across threads)."""
        bound = copy.copy(self)
        bound.cursor = cursor
        return bound

    def study(self, uid: str) -> tuple[int, dict[str, Any]] | None:
        row = self.cursor.execute(self._select_study.sql, (uid,)).fetchone()
        if row is None:
            return None
        attributes = self._json_out(row[1]) if self._json_out is not None else row[1]
        return int(row[0]), dict(attributes or {})

    def insert_study(self, values: dict[str, Any]) -> int:
        return int(self.cursor.execute(self._insert_study.sql, self._insert_study.params(values)).lastrowid)

    def series(self, uid: str) -> tuple[int, datetime, datetime | None, int] | None:
        row = self.cursor.execute(self._select_series.sql, (uid,)).fetchone()
        if row is None:
            return None
        conv = self._time_out
        last, completed = (conv(row[1]), conv(row[2])) if conv is not None else (row[1], row[2])
        return int(row[0]), cast(datetime, last), cast("datetime | None", completed), int(row[3])

    def insert_series(self, values: dict[str, Any]) -> int:
        return int(self.cursor.execute(self._insert_series.sql, self._insert_series.params(values)).lastrowid)

    def known(self, uids: list[str]) -> set[str]:
        sql = self._known_sql + "(" + ",".join("?" * len(uids)) + ")"
        return {row[0] for row in self.cursor.execute(sql, uids)}

    def insert_instances(self, rows: list[dict[str, Any]]) -> None:
        stmt = self._insert_instance
        self.cursor.executemany(stmt.sql, [stmt.params(r) for r in rows])

    def touch_study(self, study_id: int, at: datetime) -> None:
        stmt = self._touch_study
        self.cursor.execute(stmt.sql, stmt.params({"sid": study_id, "at": at}))

    def set_study_attributes(self, study_id: int, attributes: dict[str, Any]) -> None:
        stmt = self._study_attributes
        self.cursor.execute(stmt.sql, stmt.params({"sid": study_id, "attributes": attributes}))

    def has_job(self, series_id: int, version: int) -> bool:
        stmt = self._has_job
        return bool(
            self.cursor.execute(stmt.sql, stmt.params({"sid": series_id, "version": version})).fetchone()[0]
        )

    def update_series(
        self, series_id: int, added: int, last_received_at: datetime | None, reopen: bool, new_version: bool
    ) -> None:
        stmt = self._update_series[(last_received_at is not None, reopen, new_version)]
        self.cursor.execute(stmt.sql, stmt.params({"sid": series_id, "n": added, "at": last_received_at}))


class WriteQueue:
    """Serialises the recording transactions of every process on one SQLite file (an ``flock`` beside it).

    Without it, a receiving process whose ``BEGIN IMMEDIATE`` meets another one's transaction is put to
    sleep by SQLite's busy handler in steps of 1, 2, 5, 10... ms and tries again; with several receiving
    processes that happened to nearly every batch. Waiting on the lock instead, it goes on the moment the
    other commits. The kernel releases the lock of a process that dies. Other writers (the scheduler, the
    web pages) still meet the busy handler, rarely. Within a process a thread lock comes first (``flock``
    locks belong to the open file, shared by the threads).
    """

    def __init__(self, database: str) -> None:
        self.path = database + "-record.lock"
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            fd = self._fd
            if fd is None:
                try:
                    fd = self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                except OSError:  # a read-only folder: SQLite's own locking still serialises
                    yield
                    return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
