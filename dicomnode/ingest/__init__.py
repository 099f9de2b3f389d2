"""Receiving DICOM: C-STORE/C-ECHO SCP, STOW-RS receiver, durable spool writes, header summaries.

Light on purpose: never imports torch, MONAI or highdicom, so the receiver keeps receiving while analysis is
busy. The SCP (``dicomnode.ingest.scp``, pynetdicom) and the STOW-RS router (``dicomnode.ingest.stow``,
FastAPI) are imported from their modules; this package exposes the shared write path.
"""

from __future__ import annotations

from dicomnode.ingest.sink import InstanceSink, MemorySink, ReceivedInstance
from dicomnode.ingest.spool import IngestResult, OtherClassPolicy, ReindexReport, Spool, reindex_spool

__all__ = [
    "IngestResult",
    "InstanceSink",
    "MemorySink",
    "OtherClassPolicy",
    "ReceivedInstance",
    "ReindexReport",
    "Spool",
    "reindex_spool",
]
