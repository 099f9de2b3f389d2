"""Administration: the audit trail, routing rule versions and the scheduler lease."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from dicomnode.store.base import (
    NotFoundError,
    StoreBase,
    _count,
    _jsonable_value,
    _now,
    _rule_version,
    _seconds,
)
from dicomnode.store.models import (
    AuditRow,
    RuleVersionRow,
    SchedulerLeaseRow,
)
from dicomnode.store.records import (
    AuditEvent,
    Page,
    RuleVersion,
)

log = logging.getLogger(__name__)


class AdminStore(StoreBase):
    """Administration: the audit trail, routing rule versions and the scheduler lease."""

    def acquire_lease(
        self,
        name: str,
        owner: str,
        ttl: timedelta | float,
        *,
        take_from: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Take or renew the lease ``name`` for ``owner`` until ``now + ttl``; False while another holds it.

        One row per lease in ``scheduler_lease``. The lease goes to ``owner`` when nobody holds it, when
        ``owner`` holds it already (renewal), when the holder's lease expired (it died or hangs), or when
        the holder is ``take_from`` (the caller knows that process is dead, e.g. a pid of its own host that
        no longer exists). Atomic on both backends: PostgreSQL locks the row (``FOR UPDATE``), SQLite
        serialises writers.
        """
        at = now or _now()
        until = at + _seconds(ttl)

        def run() -> bool:
            with self._write() as s:
                q = select(SchedulerLeaseRow).where(SchedulerLeaseRow.name == name)
                if self._is_postgres:
                    q = q.with_for_update()
                row = s.scalar(q)
                if row is None:
                    s.add(SchedulerLeaseRow(name=name, owner=owner, acquired_at=at, expires_at=until))
                    s.flush()
                    log.info("lease %s taken by %s", name, owner)
                    return True
                if row.owner == owner:
                    row.expires_at = until
                    return True
                if row.expires_at <= at or (take_from is not None and row.owner == take_from):
                    log.warning("lease %s: taken over from %s by %s", name, row.owner, owner)
                    row.owner, row.acquired_at, row.expires_at = owner, at, until
                    return True
                return False

        return self._retry_integrity(run)

    def release_lease(self, name: str, owner: str) -> bool:
        """Give the lease up (graceful stop) so another process takes over at once; False if not held."""
        with self._write() as s:
            row = s.scalar(
                select(SchedulerLeaseRow).where(
                    SchedulerLeaseRow.name == name, SchedulerLeaseRow.owner == owner
                )
            )
            if row is None:
                return False
            s.delete(row)
            return True

    def lease_holder(self, name: str, *, now: datetime | None = None) -> str | None:
        """The owner of an unexpired lease ``name`` (for the health page), else None."""
        at = now or _now()
        with self._read() as s:
            row = s.get(SchedulerLeaseRow, name)
            return row.owner if row is not None and row.expires_at > at else None

    def audit(
        self,
        actor: str,
        action: str,
        target: str,
        before: Any = None,
        after: Any = None,
        *,
        now: datetime | None = None,
    ) -> int:
        """Append an audit event (who did what to which object, with before/after JSON); returns its id."""
        with self._write() as s:
            row = AuditRow(
                at=now or _now(),
                actor=actor,
                action=action,
                target=target,
                before=_jsonable_value(before),
                after=_jsonable_value(after),
            )
            s.add(row)
            s.flush()
            return row.id

    def list_audit(self, *, target: str | None = None, limit: int = 50, offset: int = 0) -> Page[AuditEvent]:
        with self._read() as s:
            q = select(AuditRow)
            if target is not None:
                q = q.where(AuditRow.target == target)
            total = _count(s, q)
            rows = s.scalars(q.order_by(AuditRow.id.desc()).limit(limit).offset(offset))
            items = tuple(
                AuditEvent(
                    id=r.id,
                    at=r.at,
                    actor=r.actor,
                    action=r.action,
                    target=r.target,
                    before=r.before,
                    after=r.after,
                )
                for r in rows
            )
            return Page(items, total, limit, offset)

    def add_rule_version(
        self, author: str, yaml_text: str, comment: str | None = None, *, now: datetime | None = None
    ) -> int:
        """Keep a version of the routing rules (the admin UI's history); returns its id."""
        with self._write() as s:
            row = RuleVersionRow(
                created_at=now or _now(), author=author, yaml_text=yaml_text, comment=comment
            )
            s.add(row)
            s.flush()
            return row.id

    def list_rule_versions(self, *, limit: int = 50, offset: int = 0) -> Page[RuleVersion]:
        with self._read() as s:
            q = select(RuleVersionRow)
            total = _count(s, q)
            rows = s.scalars(q.order_by(RuleVersionRow.id.desc()).limit(limit).offset(offset))
            return Page(tuple(_rule_version(r) for r in rows), total, limit, offset)

    def get_rule_version(self, version_id: int) -> RuleVersion:
        with self._read() as s:
            row = s.get(RuleVersionRow, version_id)
            if row is None:
                raise NotFoundError(f"no rule version {version_id}")
            return _rule_version(row)

    def latest_rule_version(self) -> RuleVersion | None:
        with self._read() as s:
            row = s.scalar(select(RuleVersionRow).order_by(RuleVersionRow.id.desc()).limit(1))
            return None if row is None else _rule_version(row)
