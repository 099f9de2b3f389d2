"""Laboratory values for osteoporosis models (founding study a): LOINC-coded, keyed by patient and date.

:mod:`~dicomnode.labs.values` names the analytes and their units, :mod:`~dicomnode.labs.csv_io` reads a
research CSV, :mod:`~dicomnode.labs.fhir` reads FHIR R4 Observation resources pushed by a hospital's
integration engine. Pure: no database, no network (the node stores them through ``dicomnode.store``).
Lab values are patient data: never logged at INFO (counts and LOINC codes only).
"""

from dicomnode.labs.values import ANALYTES, LabValue, analyte_for_loinc

__all__ = ["ANALYTES", "LabValue", "analyte_for_loinc"]
