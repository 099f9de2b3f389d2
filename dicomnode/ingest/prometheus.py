"""Prometheus counters for the receiver, registered in prometheus_client's default registry.

The web module exposes them with ``prometheus_client.generate_latest()`` (default registry) on ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable

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


#: In a receiving child process (``dicom.receive_processes`` > 1): where the counts go as well, so that
#: the node's process, which serves ``/metrics``, adds them to its own counters
#: (:mod:`dicomnode.ingest.processes`).
forward_instance: Callable[[str, str, int], None] | None = None
forward_rejection: Callable[[], None] | None = None


def count_instance(source: str, result: str, size_bytes: int = 0) -> None:
    """Count one received instance (and its bytes when it was kept)."""
    INSTANCES.labels(source=source, result=result).inc()
    if size_bytes > 0:
        BYTES.labels(source=source).inc(size_bytes)
    if forward_instance is not None:
        forward_instance(source, result, size_bytes)


def count_rejection() -> None:
    """Count one association refused."""
    ASSOCIATIONS_REJECTED.inc()
    if forward_rejection is not None:
        forward_rejection()
