"""The one rule for "does what the sender claims match the dataset?", for DIMSE and STOW-RS alike.

A C-STORE request names the SOP Class and SOP Instance UID it stores (Affected SOP Class/Instance UID); a
Part 10 file names them in its file meta (Media Storage SOP Class/Instance UID). Either claim must agree with
the SOPClassUID and SOPInstanceUID inside the dataset, or the instance is refused: a routing decision or a
report must never be made from an instance whose identity depends on which header one reads.

====== ==============================================================================
0xA900 the dataset's SOP Class UID differs from the claimed one (PS3.4 "Data Set does not match SOP Class")
0xC212 the dataset's SOP Instance UID differs from the claimed one ("cannot understand")
====== ==============================================================================

Pure: no I/O, no logging. The C-STORE path (``dicomnode.ingest.spool``) and the STOW-RS receiver
(``dicomnode.ingest.stow``, for the file meta of each part) call :func:`claim_mismatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INSTANCE_MISMATCH", "SOP_CLASS_MISMATCH", "Mismatch", "claim_mismatch"]

#: Status for a SOP Class UID that differs between the claim and the dataset.
SOP_CLASS_MISMATCH = 0xA900
#: Status for a SOP Instance UID that differs between the claim and the dataset.
INSTANCE_MISMATCH = 0xC212


@dataclass(frozen=True)
class Mismatch:
    """Why an instance is refused: the status to answer with and a one-line comment."""

    status: int
    comment: str


def _norm(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.strip().rstrip("\x00").strip()
    return text or None


def claim_mismatch(
    dataset_sop_class: str,
    dataset_sop_instance: str,
    claimed_sop_class: str | None,
    claimed_sop_instance: str | None,
    *,
    claimed_by: str = "the request",
) -> Mismatch | None:
    """Compare the dataset's SOP Class/Instance UIDs with what the request or file meta claims.

    Parameters
    ----------
    dataset_sop_class, dataset_sop_instance
        SOPClassUID and SOPInstanceUID read from the dataset (already validated).
    claimed_sop_class, claimed_sop_instance
        The claim: Affected SOP Class/Instance UID of a C-STORE request, or Media Storage SOP Class/Instance
        UID of a file meta. None (or empty) = nothing claimed, nothing to compare.
    claimed_by
        Who made the claim, for the comment ("the request", "the file meta").

    Returns
    -------
    Mismatch or None
        The refusal (SOP class first, then instance), or None when the claim agrees.
    """
    cls, inst = _norm(claimed_sop_class), _norm(claimed_sop_instance)
    if cls is not None and cls != dataset_sop_class.strip():
        return Mismatch(SOP_CLASS_MISMATCH, f"dataset SOP Class UID differs from {claimed_by}")
    if inst is not None and inst != dataset_sop_instance.strip():
        return Mismatch(INSTANCE_MISMATCH, f"dataset SOP Instance UID differs from {claimed_by}")
    return None
