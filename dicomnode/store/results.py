"""Results: what one job's analysis produced (``result.json`` content and its typed outputs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicomnode.domain import ResultFiles
from dicomnode.store.base import (
    NotFoundError,
    StoreBase,
    _now,
    _result,
)
from dicomnode.store.models import (
    JobRow,
    ResultRow,
)
from dicomnode.store.records import (
    Result,
)


class ResultStore(StoreBase):
    """Results of jobs (one per job; a re-run replaces it)."""

    def record_result(
        self,
        job_id: int,
        result_json: Mapping[str, Any],
        files: Sequence[Path | str] | ResultFiles,
        now: datetime | None = None,
    ) -> None:
        """Keep the analysis result (``result.json`` content) and the produced files; a re-run replaces it.

        ``files`` is the typed :class:`~dicomnode.domain.ResultFiles` of the analysis (kept as they are),
        or a plain list of files (kept as a list, with no typed outputs).
        """
        at = now or _now()
        if isinstance(files, ResultFiles):
            names, outputs = list(files.all), files.to_json()
        else:
            names, outputs = [str(f) for f in files], None
        with self._write() as s:
            if s.get(JobRow, job_id) is None:
                raise NotFoundError(f"no job {job_id}")
            row = s.scalar(select(ResultRow).where(ResultRow.job_id == job_id))
            if row is None:
                row = ResultRow(job_id=job_id, created_at=at, result_json=dict(result_json), files=names)
                row.outputs = outputs
                s.add(row)
            else:
                row.created_at = at
                row.result_json = dict(result_json)
                row.files = names
                row.outputs = outputs

    def get_result(self, job_id: int) -> Result | None:
        with self._read() as s:
            row = s.scalar(select(ResultRow).where(ResultRow.job_id == job_id))
            return None if row is None else _result(row)
