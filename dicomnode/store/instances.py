"""Instances and series: what was received, which series are complete, their summaries, routing decisions."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, or_, select

from dicomnode.domain import RuleDecision, SeriesSummary
from dicomnode.store.base import (
    NotFoundError,
    StoreBase,
    _attrs_from_db,
    _count,
    _decision,
    _now,
    _seconds,
    _series,
)
from dicomnode.store.engine import IMMEDIATE
from dicomnode.store.models import DecisionRow, InstanceRow, SeriesRow, StudyRow
from dicomnode.store.recording import (
    NewInstance,
    SqliteStatements,
    WriteQueue,
    _prepare,
    _Prepared,
    _record_batch,
    _Statements,
)
from dicomnode.store.records import Instance, Page, Series, StoredDecision, Study

log = logging.getLogger(__name__)


class InstanceStore(StoreBase):
    """Instances and series (received, complete, summarised, routed)."""

    #: Record received instances on SQLite through the driver's cursor (False: SQLAlchemy Core, as on
    #: PostgreSQL; the tests compare the two).
    sqlite_direct = True
    _sqlite_statements: SqliteStatements | None = None
    _record_queue: WriteQueue | None = None

    def record_instance(
        self,
        *,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        transfer_syntax: str,
        path: Path | str,
        size_bytes: int,
        study_attrs: Mapping[str, Any],
        series_attrs: Mapping[str, Any],
        calling_aet: str | None,
        source: str,
        slice_position: float | None = None,
        number_of_frames: int | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Record one received instance (after its file is safely on disk); idempotent on SOP Instance UID.

        Updates the series' last-received time and instance count. An instance arriving in a series that was
        already complete re-opens it; if a job already exists for the series, the series version is bumped
        (``needs_new_version``) so the next completion creates a job for the new version.

        ``study_attrs`` / ``series_attrs`` are header values by DICOM keyword; ``source`` is one of
        :data:`INSTANCE_SOURCES` (the older ``"stowrs"`` is stored as ``"stow"``); ``slice_position`` is the
        position along the slice normal in mm (the series z-extent for routing). Returns True when the
        instance is new, False when it was already recorded.
        """
        item = NewInstance(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax=transfer_syntax,
            path=path,
            size_bytes=size_bytes,
            study_attrs=study_attrs,
            series_attrs=series_attrs,
            calling_aet=calling_aet,
            source=source,
            slice_position=slice_position,
            number_of_frames=number_of_frames,
            now=now,
        )
        return self.record_instances([item])[0]

    def record_instances(self, batch: Sequence[NewInstance]) -> list[bool]:
        """Record several received instances in **one** transaction (the spool's group commit).

        Same rules as :meth:`record_instance` for each; all or nothing (an error records none). Instances of
        one series share one look-up of their study and series and one update of the counters, so a batch
        costs a few statements per series instead of six per instance. Returns, in order, whether each
        instance was new (the second copy of one SOP instance in a batch is not).
        """
        prepared = [_prepare(item) for item in batch]
        if self.engine.dialect.name == "sqlite" and self.sqlite_direct:
            # a concurrent first insert of the same study or series by another receiving process raises
            # the driver's own IntegrityError on this path
            return self._retry_integrity(
                lambda: self._record_on_sqlite(prepared), errors=(sqlite3.IntegrityError,)
            )

        def run() -> list[bool]:
            # Core statements on a bare connection, no ORM session: this runs while senders wait, and the
            # session's set-up and unit of work cost several times the SQL itself.
            with self.engine.connect() as bare, bare.execution_options(**{IMMEDIATE: True}).begin():
                return _record_batch(_Statements(bare), prepared)

        return self._retry_integrity(run)

    def _record_on_sqlite(self, prepared: list[_Prepared]) -> list[bool]:
        # The same statements on the driver's own cursor (recording.SqliteStatements), in one BEGIN IMMEDIATE
        # transaction on a pooled connection, queued behind the other receiving processes' (WriteQueue).
        statements = self._sqlite_statements
        if statements is None:
            statements = SqliteStatements(self.engine.dialect)
            database = self.engine.url.database
            self._record_queue = WriteQueue(database) if database and database != ":memory:" else None
            self._sqlite_statements = statements
        queue = self._record_queue
        raw = self.engine.raw_connection()
        try:
            held = queue.held() if queue is not None else contextlib.nullcontext()
            driver = raw.driver_connection
            assert driver is not None
            cursor = driver.cursor()
            with held:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    news = _record_batch(statements.on(cursor), prepared)
                    cursor.execute("COMMIT")
                    return news
                except BaseException:
                    if driver.in_transaction:
                        driver.rollback()
                    raise
                finally:
                    cursor.close()
        finally:
            raw.close()

    def instances(self, series_uid: str) -> list[Instance]:
        """The instances of a series (for the analysis step: their files), in arrival order."""
        with self._read() as s:
            rows = s.execute(
                select(InstanceRow, SeriesRow.series_instance_uid)
                .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
                .where(SeriesRow.series_instance_uid == series_uid)
                .order_by(InstanceRow.id)
            ).all()
            return [
                Instance(
                    sop_instance_uid=r.sop_instance_uid,
                    series_instance_uid=uid,
                    sop_class_uid=r.sop_class_uid,
                    transfer_syntax=r.transfer_syntax,
                    path=Path(r.path),
                    size_bytes=r.size_bytes,
                    received_at=r.received_at,
                    source=r.source,
                    calling_aet=r.calling_aet,
                )
                for r, uid in rows
            ]

    def instance_paths(self, series_uid: str) -> list[Path]:
        """Files of a series' instances, in arrival order."""
        return [i.path for i in self.instances(series_uid)]

    def series_ready_for_completion(
        self,
        now: datetime,
        series_quiet: timedelta | float,
        study_quiet: timedelta | float,
        max_wait: timedelta | float,
    ) -> list[Series]:
        """Open series that are complete by the quiet-period rule (seconds may be given as floats).

        Ready means: no instance for the series for ``series_quiet`` and none for its study for
        ``study_quiet``, or the series' first instance arrived ``max_wait`` ago or more.
        """
        sq, stq, mw = _seconds(series_quiet), _seconds(study_quiet), _seconds(max_wait)
        with self._read() as s:
            rows = s.execute(
                select(SeriesRow, StudyRow.study_instance_uid)
                .join(StudyRow, SeriesRow.study_id == StudyRow.id)
                .where(
                    SeriesRow.completed_at.is_(None),
                    or_(
                        and_(SeriesRow.last_received_at <= now - sq, StudyRow.last_received_at <= now - stq),
                        SeriesRow.first_received_at <= now - mw,
                    ),
                )
                .order_by(SeriesRow.first_received_at, SeriesRow.id)
            ).all()
            return [_series(r, uid) for r, uid in rows]

    def mark_series_complete(self, series_uid: str, now: datetime | None = None) -> Series:
        """Mark a series complete (idempotent); returns it with its current ``version``."""
        at = now or _now()
        with self._write() as s:
            row = self._series_row(s, series_uid)
            if row.completed_at is None:
                row.completed_at = at
            s.flush()
            return _series(row, self._study_uid(s, row.study_id))

    def series_summaries(self, study_uid: str, *, complete_only: bool = False) -> list[SeriesSummary]:
        """What routing needs for every series of a study.

        ``attributes`` merge study- and series-level values (series wins); ``SOPClassUID`` and
        ``NumberOfFrames`` come from the recorded instances when the headers lacked them; ``z_extent_mm``
        is the span of the recorded slice positions (None when none were recorded).
        """
        with self._read() as s:
            study = s.scalar(select(StudyRow).where(StudyRow.study_instance_uid == study_uid))
            if study is None:
                raise NotFoundError(f"no study {study_uid}")
            q = select(SeriesRow).where(SeriesRow.study_id == study.id).order_by(SeriesRow.id)
            if complete_only:
                q = q.where(SeriesRow.completed_at.is_not(None))
            series_rows = list(s.scalars(q))
            agg = {
                r.series_id: r
                for r in s.execute(
                    select(
                        InstanceRow.series_id,
                        func.min(InstanceRow.slice_position).label("zmin"),
                        func.max(InstanceRow.slice_position).label("zmax"),
                        func.count(InstanceRow.slice_position).label("npos"),
                        func.max(InstanceRow.number_of_frames).label("frames"),
                        func.max(InstanceRow.sop_class_uid).label("sop_class"),
                    )
                    .where(InstanceRow.series_id.in_([r.id for r in series_rows]))
                    .group_by(InstanceRow.series_id)
                )
            }
            out = []
            for r in series_rows:
                attrs = {**_attrs_from_db(study.attributes), **_attrs_from_db(r.attributes)}
                a = agg.get(r.id)
                z: float | None = None
                if a is not None:
                    if not attrs.get("SOPClassUID") and a.sop_class:
                        attrs["SOPClassUID"] = a.sop_class
                    if a.frames and not attrs.get("NumberOfFrames"):
                        attrs["NumberOfFrames"] = int(a.frames)
                    if a.npos:
                        z = float(a.zmax - a.zmin)
                out.append(
                    SeriesSummary(
                        study_instance_uid=study_uid,
                        series_instance_uid=r.series_instance_uid,
                        attributes=attrs,
                        n_instances=r.n_instances,
                        z_extent_mm=z,
                    )
                )
            return out

    def record_decisions(
        self, study_uid: str, decisions: Sequence[RuleDecision], now: datetime | None = None
    ) -> None:
        """Keep routing decisions (with their reasons) and mark the study routed."""
        at = now or _now()
        with self._write() as s:
            study = s.scalar(select(StudyRow).where(StudyRow.study_instance_uid == study_uid))
            if study is None:
                raise NotFoundError(f"no study {study_uid}")
            for d in decisions:
                s.add(
                    DecisionRow(
                        study_id=study.id,
                        series_instance_uid=d.series_instance_uid,
                        decided_at=at,
                        selected=d.selected,
                        rule=d.rule,
                        action=d.action,
                        pipeline=d.pipeline,
                        destinations=list(d.destinations),
                        reasons=list(d.reasons),
                        rank=d.rank,
                    )
                )
            study.routed_at = at

    def decisions(self, study_uid: str) -> list[StoredDecision]:
        """Every recorded decision for a study, newest first."""
        with self._read() as s:
            rows = s.execute(
                select(DecisionRow, StudyRow.study_instance_uid)
                .join(StudyRow, DecisionRow.study_id == StudyRow.id)
                .where(StudyRow.study_instance_uid == study_uid)
                .order_by(DecisionRow.decided_at.desc(), DecisionRow.id)
            ).all()
            return [_decision(r, uid) for r, uid in rows]

    def list_studies(self, *, limit: int = 50, offset: int = 0) -> Page[Study]:
        """Studies, most recently received first."""
        with self._read() as s:
            q = select(StudyRow)
            total = _count(s, q)
            rows = list(
                s.scalars(
                    q.order_by(StudyRow.last_received_at.desc(), StudyRow.id.desc())
                    .limit(limit)
                    .offset(offset)
                )
            )
            return Page(tuple(self._study(s, r) for r in rows), total, limit, offset)

    def get_study(self, study_uid: str) -> Study:
        with self._read() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.study_instance_uid == study_uid))
            if row is None:
                raise NotFoundError(f"no study {study_uid}")
            return self._study(s, row)

    def list_series(self, *, study_uid: str | None = None, limit: int = 50, offset: int = 0) -> Page[Series]:
        """Series (of one study, or all), most recently received first."""
        with self._read() as s:
            q = select(SeriesRow, StudyRow.study_instance_uid).join(
                StudyRow, SeriesRow.study_id == StudyRow.id
            )
            if study_uid is not None:
                q = q.where(StudyRow.study_instance_uid == study_uid)
            total = _count(s, q)
            rows = s.execute(
                q.order_by(SeriesRow.last_received_at.desc(), SeriesRow.id.desc()).limit(limit).offset(offset)
            )
            return Page(tuple(_series(r, uid) for r, uid in rows.all()), total, limit, offset)

    def get_series(self, series_uid: str) -> Series:
        with self._read() as s:
            row = self._series_row(s, series_uid)
            return _series(row, self._study_uid(s, row.study_id))

    def forget_instances(self, study_uid: str, folder: Path | str) -> int:
        """Delete the rows of the instances of ``study_uid`` whose files were under ``folder`` (the retention
        sweep removed it); returns how many.

        The study, its series (with their counts and times), routing decisions, jobs, results and deliveries
        stay: they are the history the admin UI shows; only rows pointing at files that no longer exist go.
        The same study sent again is recorded anew (and re-opens its series, as any late instance does).
        """
        prefix = str(folder).rstrip("/") + "/"
        with self._write() as s:
            study_id = s.scalar(select(StudyRow.id).where(StudyRow.study_instance_uid == study_uid))
            if study_id is None:
                return 0
            series_ids = select(SeriesRow.id).where(SeriesRow.study_id == study_id)
            result = s.execute(
                delete(InstanceRow)
                .where(InstanceRow.series_id.in_(series_ids))
                .where(func.substr(InstanceRow.path, 1, len(prefix)) == prefix)
                .execution_options(synchronize_session=False)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def ingest_totals(self) -> tuple[int, int, int]:
        """(instances kept, their bytes, series completed) over the whole database (for the metrics)."""
        with self._read() as s:
            n = s.scalar(select(func.count()).select_from(InstanceRow)) or 0
            size = s.scalar(select(func.coalesce(func.sum(InstanceRow.size_bytes), 0))) or 0
            done = s.scalar(
                select(func.count()).select_from(SeriesRow).where(SeriesRow.completed_at.is_not(None))
            )
        return int(n), int(size), int(done or 0)
