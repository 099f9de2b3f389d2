"""Prometheus metrics read from the database at scrape time (right for ``receive`` + ``work`` split too).

:class:`StoreCollector` adds, per scrape: instances received, series completed, jobs by state, the analysis
duration histogram, deliveries by outcome, spool bytes (kept instances) and free bytes. :func:`metrics_text`
joins them with the process's default registry (the receiver's counters, process and GC metrics).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from dicomnode.store import Store

log = logging.getLogger(__name__)

__all__ = ["ANALYSIS_BUCKETS", "StoreCollector", "analysis_durations", "metrics_text"]

#: Upper bounds (seconds) of the analysis-duration histogram buckets.
ANALYSIS_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


def analysis_durations(store: Store, limit: int = 20000) -> list[float]:
    """Seconds each finished analysis took, newest first (:meth:`Store.analysis_durations`)."""
    return store.analysis_durations(limit)


class StoreCollector:
    """A Prometheus collector over one store (register it in a per-app registry)."""

    def __init__(self, store: Store, spool_dir: Path) -> None:
        self.store = store
        self.spool_dir = spool_dir

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must never 500 because the database hiccupped
            log.warning("metrics: database query failed", exc_info=True)
            up = GaugeMetricFamily("dicomnode_database_up", "Whether the database answered the last scrape")
            up.add_metric([], 0)
            yield up

    def _collect(self) -> Iterator[Metric]:
        s = self.store
        n_instances, spool_bytes, n_completed = s.ingest_totals()
        yield CounterMetricFamily(
            "dicomnode_instances_received",
            "DICOM instances received and kept (all processes, from the database)",
            value=float(n_instances),
        )
        yield CounterMetricFamily(
            "dicomnode_series_completed",
            "Series that reached completion (quiet period over)",
            value=n_completed,
        )
        jobs = GaugeMetricFamily("dicomnode_jobs", "Analysis jobs by state", labels=["state"])
        for state, n in s.job_counts().items():
            jobs.add_metric([state.value], n)
        yield jobs
        deliveries = GaugeMetricFamily("dicomnode_deliveries", "Deliveries by outcome", labels=["outcome"])
        for outcome, n in s.delivery_counts().items():
            deliveries.add_metric([outcome.value], n)
        yield deliveries
        durations = s.analysis_durations()
        buckets: list[tuple[str, float]] = []
        for b in ANALYSIS_BUCKETS:
            buckets.append((_le(b), float(sum(1 for d in durations if d <= b))))
        buckets.append(("+Inf", float(len(durations))))
        yield HistogramMetricFamily(
            "dicomnode_analysis_seconds",
            "Time from a worker claiming a job to its analysis result",
            buckets=buckets,
            sum_value=float(sum(durations)),
        )
        yield GaugeMetricFamily(
            "dicomnode_spool_bytes",
            "Bytes of received instances kept in the spool",
            value=float(spool_bytes),
        )
        free: float
        try:
            free = float(
                shutil.disk_usage(self.spool_dir if self.spool_dir.exists() else self.spool_dir.parent).free
            )
        except OSError:
            free = 0.0
        yield GaugeMetricFamily(
            "dicomnode_spool_free_bytes", "Free bytes on the spool's filesystem", value=free
        )
        up = GaugeMetricFamily("dicomnode_database_up", "Whether the database answered the last scrape")
        up.add_metric([], 1)
        yield up

    def describe(self) -> list[Any]:
        return []  # no describe at registration: collect() queries the database


def _le(b: float) -> str:
    return str(float(b))


def metrics_text(registry: CollectorRegistry) -> bytes:
    """The exposition text: this process's default registry followed by ``registry``."""
    return generate_latest(REGISTRY) + generate_latest(registry)
