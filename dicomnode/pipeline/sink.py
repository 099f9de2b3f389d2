"""The adapter between ingest's :class:`~dicomnode.ingest.sink.InstanceSink` protocol and the store.

Ingest hands over one :class:`~dicomnode.ingest.sink.ReceivedInstance` per stored file; the store wants
keyword arguments, study- and series-level attributes apart, and a slice position for the series extent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dicomnode.ingest.sink import ReceivedInstance
from dicomnode.store import INSTANCE_SOURCES, NewInstance, Store

#: Study-level keywords (the rest of the header summary is series-level).
STUDY_KEYWORDS: frozenset[str] = frozenset(
    {
        "StudyInstanceUID",
        "StudyDescription",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "InstitutionName",
    }
)

#: Other names some callers use -> the one vocabulary (ingest's, which the store accepts as is).
_ALIASES = {"stowrs": "stow", "dicomweb": "stow", "c-store": "dimse"}


def store_source(source: str) -> str:
    """The store's name for ingest's ``source`` (ingest's names pass unchanged; unknown -> ``import``)."""
    name = _ALIASES.get(source, source)
    return name if name in INSTANCE_SOURCES else "import"


def slice_position(
    position: tuple[float, float, float] | None, orientation: tuple[float, ...] | None
) -> float | None:
    """Position of a slice along its normal (mm): ImagePositionPatient projected on row x column."""
    if position is None or orientation is None or len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return float(sum(p * n for p, n in zip(position, normal, strict=True)))


def split_attributes(attributes: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(study_attrs, series_attrs)`` from one header summary."""
    study = {k: v for k, v in attributes.items() if k in STUDY_KEYWORDS}
    series = {k: v for k, v in attributes.items() if k not in STUDY_KEYWORDS}
    return study, series


class StoreSink:
    """Records received instances in the :class:`~dicomnode.store.Store` (ingest's production sink).

    Instances accepted but not kept (``path is None``: the "discard" policy) are not recorded: there is no
    file to analyze or to clean up, and the database holds only what the spool holds.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def record_instance(self, instance: ReceivedInstance) -> bool:
        """Record ``instance``; True when new. Raises if the database fails (ingest answers a failure)."""
        return self.record_instances([instance])[0]

    def record_instances(self, instances: Sequence[ReceivedInstance]) -> list[bool]:
        """Record several instances in one database transaction (the spool's group commit); all or none.

        Returns, in order, whether each was new. Raises if the database fails.
        """
        out = [True] * len(instances)
        kept = [(i, inst) for i, inst in enumerate(instances) if inst.path is not None]
        if kept:
            news = self.store.record_instances([_new_instance(inst) for _, inst in kept])
            for (i, _), new in zip(kept, news, strict=True):
                out[i] = new
        return out


def _new_instance(instance: ReceivedInstance) -> NewInstance:
    assert instance.path is not None
    study_attrs, series_attrs = split_attributes(instance.attributes)
    frames = instance.attributes.get("NumberOfFrames")
    return NewInstance(
        study_uid=instance.study_instance_uid,
        series_uid=instance.series_instance_uid,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        transfer_syntax=instance.transfer_syntax_uid,
        path=instance.path,
        size_bytes=instance.size_bytes,
        study_attrs=study_attrs,
        series_attrs=series_attrs,
        calling_aet=instance.calling_ae_title,
        source=store_source(instance.source),
        slice_position=slice_position(instance.image_position_patient, instance.image_orientation_patient),
        number_of_frames=int(frames) if isinstance(frames, int | float) and frames > 1 else None,
        now=instance.received_at,
    )
