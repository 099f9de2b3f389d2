"""The :class:`Store`: all database reads and writes go through here (only here changes job state).

Split by aggregate: :mod:`~dicomnode.store.instances` (instances, series, routing decisions),
:mod:`~dicomnode.store.jobs` and :mod:`~dicomnode.store.results` (jobs and results),
:mod:`~dicomnode.store.deliveries` (deliveries and their attempts), :mod:`~dicomnode.store.admin` (audit,
rule versions, the scheduler lease), :mod:`~dicomnode.store.users` (the admin UI's accounts);
:mod:`~dicomnode.store.base` holds the sessions, the errors and the row -> record helpers.
"""

from __future__ import annotations

from dicomnode.store.admin import AdminStore
from dicomnode.store.deliveries import DeliveryStore
from dicomnode.store.instances import InstanceStore
from dicomnode.store.jobs import JobStore
from dicomnode.store.labs import LabStore
from dicomnode.store.results import ResultStore

__all__ = ["Store"]


class Store(InstanceStore, JobStore, ResultStore, DeliveryStore, AdminStore, LabStore):
    """Database access for dicomnode (SQLite or PostgreSQL).

    Create it with an engine made in ``cli`` (:func:`dicomnode.store.make_engine`) or :meth:`from_url`;
    apply migrations first with :func:`dicomnode.store.upgrade`. All methods are thread safe; each runs in its
    own short transaction. Times are timezone-aware UTC; ``now`` parameters exist so tests can mock the clock.
    """
