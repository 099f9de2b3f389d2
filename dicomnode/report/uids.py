"""UID policy for everything the node writes.

With a job key, every UID derives deterministically from ``(job key, version, artefact)``, so re-running a
job (after a crash, or a resend) produces the same SR/SC instances and a PACS replaces rather than
duplicates them. Without a job key (ad-hoc ``dicomnode analyze``) UIDs are random.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

#: Root of our UIDs; pydicom's registered root is used until the project has its own.
DEFAULT_PREFIX = PYDICOM_ROOT_UID


@dataclass(frozen=True)
class UidPolicy:
    """Makes the UIDs of one job's outputs.

    Parameters
    ----------
    job_key
        Stable identifier of the analysis job (e.g. the job id); None means random UIDs.
    version
        Output version of the job; a new version (re-analysis with other results) gets new UIDs.
    prefix
        UID root, ending with a dot.
    """

    job_key: str | None = None
    version: int = 1
    prefix: str = DEFAULT_PREFIX

    @property
    def deterministic(self) -> bool:
        return self.job_key is not None

    def uid(self, artefact: str) -> str:
        """The UID of one artefact of this job, e.g. ``"sr-series"``, ``"sc-instance-L1"``."""
        if self.job_key is None:
            return str(generate_uid(prefix=self.prefix))
        return str(generate_uid(prefix=self.prefix, entropy_srcs=[self.job_key, str(self.version), artefact]))
