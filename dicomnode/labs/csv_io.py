"""Lab values from a research CSV: ``patient_id,date,loinc,value,unit`` (one value per row).

``date`` is ISO (YYYY-MM-DD). A row that cannot be accepted stops the read with its line number and the
reason (no partial import).
"""

from __future__ import annotations

import csv
from datetime import date
from pathlib import Path

from dicomnode.labs.values import LabInputError, LabValue, make_value

COLUMNS = ("patient_id", "date", "loinc", "value", "unit")


def read_lab_csv(path: Path) -> list[LabValue]:
    """Every row of a lab CSV as a checked :class:`LabValue`.

    Raises
    ------
    LabInputError
        Missing file or column, or a row that is not a valid lab value (line number and reason).
    """
    if not path.is_file():
        raise LabInputError(f"{path}: no such lab CSV")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise LabInputError(f"{path}: missing column(s) {', '.join(missing)} (need {','.join(COLUMNS)})")
        out: list[LabValue] = []
        for n, row in enumerate(reader, start=2):
            try:
                day = date.fromisoformat(str(row["date"]).strip()[:10])
                value = float(str(row["value"]).strip())
                out.append(
                    make_value(str(row["patient_id"]), str(row["loinc"]), value, str(row["unit"]), day)
                )
            except (ValueError, LabInputError) as exc:
                raise LabInputError(f"{path} line {n}: {exc}") from None
    return out
