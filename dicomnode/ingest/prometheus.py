"""Prometheus counters for the receiver, registered in prometheus_client's default registry.

The web module exposes them with ``prometheus_client.generate_latest()`` (default registry) on ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter

#: Instances received, by source ("dimse", "stow") and result ("stored", "ignored", "failed").
INSTANCES = Counter(
    "dicomnode_ingest_instances",
    "DICOM instances received, by source and result",
    ["source", "result"],
)
#: Bytes of the instances that were stored (dataset bytes as received, without the file meta).
BYTES = Counter("dicomnode_ingest_bytes", "Bytes of DICOM instances stored", ["source"])
#: Association requests refused (calling AE not allowed, wrong called AE, too many associations).
ASSOCIATIONS_REJECTED = Counter("dicomnode_ingest_associations_rejected", "DICOM associations rejected")


def count_instance(source: str, result: str, size_bytes: int = 0) -> None:
    """Count one received instance (and its bytes when it was kept)."""
    INSTANCES.labels(source=source, result=result).inc()
    if size_bytes > 0:
        BYTES.labels(source=source).inc(size_bytes)
