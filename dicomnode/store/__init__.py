"""Persistence: SQLAlchemy 2 tables, Alembic migrations, and the :class:`Store` (the only code that changes
job state).

Typical use (engines are created in ``cli`` and passed in)::

    from dicomnode.store import Store, make_engine, upgrade
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)                      # apply the shipped migrations (idempotent)
    store = Store(engine)

Public API of :class:`Store` (all keyword ``now=`` parameters default to the current UTC time):

ingest / completion
    ``record_instance(*, study_uid, series_uid, sop_instance_uid, sop_class_uid, transfer_syntax, path,
    size_bytes, study_attrs, series_attrs, calling_aet, source, slice_position=None, number_of_frames=None,
    now=None) -> bool``; ``instances(series_uid) -> list[Instance]``; ``instance_paths(series_uid)``;
    ``series_ready_for_completion(now, series_quiet, study_quiet, max_wait) -> list[Series]``;
    ``mark_series_complete(series_uid, now=None) -> Series``;
    ``series_summaries(study_uid, *, complete_only=False) -> list[SeriesSummary]``.
routing
    ``record_decisions(study_uid, decisions, now=None)``; ``decisions(study_uid) -> list[StoredDecision]``.
jobs
    ``create_job(series_uid, pipeline, destinations, version) -> int`` (idempotent);
    ``claim_next_job(worker_id, *, pipelines=None) -> Job | None`` (atomic);
    ``set_job_state(job_id, state, message=None, *, actor=None) -> Job`` (checked transitions, timeline);
    ``rerun_job(job_id, *, actor, message=None) -> Job`` (admin re-run: same version and UIDs, so the new
    result replaces the old one at the destination; deliveries re-opened once the job is reported; audited);
    ``heartbeat(job_id)``; ``get_job(job_id)``; ``unfinished_jobs()``; ``reset_stale_jobs(older_than) ->
    list[int]``; ``supersede(series_uid, *, below_version, message=None) -> list[int]``;
    ``record_result(job_id, result_json, files)``; ``get_result(job_id)``.
deliveries
    ``create_deliveries(job_id, destinations) -> list[Delivery]`` (REPORTED job -> DELIVERING, or DONE when
    there is no destination); ``due_deliveries(now, *, limit=100, lease=None) -> list[Delivery]``;
    ``record_delivery_attempt(delivery_id, outcome, message=None, next_attempt_at=None) -> Delivery`` (the
    job becomes DONE / FAILED once all its deliveries are final); ``resend_delivery(delivery_id, *, actor)``;
    ``delivery_attempts(delivery_id)``; ``get_delivery(delivery_id)``.
scheduler lease (one process owns the sweeps)
    ``acquire_lease(name, owner, ttl) -> bool`` (take, renew, or take over an expired lease);
    ``release_lease(name, owner) -> bool``; ``lease_holder(name) -> str | None``.
audit, rules history
    ``audit(actor, action, target, before=None, after=None) -> int``; ``list_audit(...)``;
    ``add_rule_version(author, yaml_text, comment=None) -> int``; ``list_rule_versions(...)``;
    ``get_rule_version(id)``; ``latest_rule_version()``.
UI / API queries (``Page`` = items + total)
    ``list_studies``, ``get_study``, ``list_series``, ``get_series``, ``list_jobs(state=, study_uid=,
    series_uid=)``, ``job_detail(job_id) -> JobDetail``, ``list_deliveries(job_id=, outcome=, destination=)``,
    ``job_counts()``, ``delivery_counts()``, ``ping()``.

Instance sources (``record_instance(source=...)``): :data:`INSTANCE_SOURCES` = ingest's names ``dimse``,
``stow``, ``reindex``, ``import``. The ``users`` table (admin UI accounts) is :class:`models.UserRow`.

Errors: :class:`NotFoundError` (unknown id/UID), :class:`InvalidTransitionError` (job life cycle), both
:class:`~dicomnode.errors.DicomnodeError`.
"""

from dicomnode.store.base import (
    ALLOWED_TRANSITIONS,
    INSTANCE_SOURCES,
    RERUNNABLE_STATES,
    InvalidTransitionError,
    NotFoundError,
    StoreError,
    jsonable_attrs,
)
from dicomnode.store.engine import make_engine, normalise_url
from dicomnode.store.migrate import current_revision, head_revision, is_up_to_date, upgrade
from dicomnode.store.recording import NewInstance
from dicomnode.store.records import (
    AuditEvent,
    Delivery,
    DeliveryAttempt,
    Instance,
    Job,
    JobDetail,
    JobEvent,
    Page,
    Result,
    RuleVersion,
    Series,
    StoredDecision,
    Study,
)
from dicomnode.store.store import Store

__all__ = [
    "ALLOWED_TRANSITIONS",
    "INSTANCE_SOURCES",
    "RERUNNABLE_STATES",
    "AuditEvent",
    "Delivery",
    "DeliveryAttempt",
    "Instance",
    "InvalidTransitionError",
    "Job",
    "JobDetail",
    "JobEvent",
    "NewInstance",
    "NotFoundError",
    "Page",
    "Result",
    "RuleVersion",
    "Series",
    "Store",
    "StoreError",
    "StoredDecision",
    "Study",
    "current_revision",
    "head_revision",
    "is_up_to_date",
    "jsonable_attrs",
    "make_engine",
    "normalise_url",
    "upgrade",
]
