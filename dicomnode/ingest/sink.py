"""What ingest hands to the database: one record per received instance, and the protocol that takes it.

``ingest`` depends on this small :class:`InstanceSink` protocol rather than on the store's classes, so the
receiver can be tested with the real :class:`dicomnode.store` object and with the tiny in-memory
:class:`MemorySink` below (also handy for benchmarks and for a receiver without a database).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance that landed in the spool (or was accepted and ignored).

    ``attributes`` are the series- and study-level header values routing needs (``header_dict`` of the
    imaging module: DICOM keyword -> plain Python value); they are the same for every instance of a series.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    #: Absolute path of the stored file; None when the instance was accepted but not kept (discard policy).
    path: Path | None
    size_bytes: int
    #: True for SOP classes we accept but never analyse (SR, SC, MR...) under the "ignore"/"discard" policy.
    ignored: bool
    #: "dimse", "stow" or "reindex".
    source: str
    calling_ae_title: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    instance_number: int | None = None
    #: ImagePositionPatient (mm, LPS) and ImageOrientationPatient, for the series extent; None when absent.
    image_position_patient: tuple[float, float, float] | None = None
    image_orientation_patient: tuple[float, float, float, float, float, float] | None = None
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@runtime_checkable
class InstanceSink(Protocol):
    """Where ingest records a received instance (the database in production)."""

    def record_instance(self, instance: ReceivedInstance) -> bool:
        """Record ``instance``; return True when it is new, False when the SOP instance was already known.

        Must raise on failure (any exception): ingest then answers the sender with a failure status so that
        it retries, and keeps the file for :func:`dicomnode.ingest.spool.reindex_spool`.
        """
        ...


class MemorySink:
    """A thread-safe in-memory sink: SOP Instance UID -> last :class:`ReceivedInstance` recorded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.instances: dict[str, ReceivedInstance] = {}
        self.calls = 0

    def record_instance(self, instance: ReceivedInstance) -> bool:
        with self._lock:
            self.calls += 1
            new = instance.sop_instance_uid not in self.instances
            self.instances[instance.sop_instance_uid] = instance
            return new

    def __len__(self) -> int:
        with self._lock:
            return len(self.instances)
