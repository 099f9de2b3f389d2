"""Laboratory values (issue 12, item 3): LOINC analytes and units, the research CSV, FHIR R4 Observations,
and the authenticated FHIR endpoint (validated all or nothing, stored with the patient, audited, never
logged at INFO)."""

from __future__ import annotations

import base64
import copy
import logging
import re
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from web_testing import ADMIN_PASSWORD, VIEWER_PASSWORD, build_admin_app, make_settings, make_store

from dicomnode.labs.csv_io import read_lab_csv
from dicomnode.labs.fhir import parse_observations
from dicomnode.labs.values import LabInputError

PATIENT = "MRN-4711"


def observation(
    loinc: str = "17861-6", value: float = 2.3, unit: str = "mmol/L", **extra: Any
) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"obs-{loinc}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "subject": {"reference": "Patient/123", "identifier": {"system": "urn:mrn", "value": PATIENT}},
        "effectiveDateTime": "2026-11-02T08:15:00+01:00",
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }
    obs.update(extra)
    return obs


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": r} for r in resources]}


PANEL = bundle(
    observation("17861-6", 2.3, "mmol/L"),
    observation("2777-1", 1.1, "mmol/L"),
    observation("6768-6", 95, "U/L"),
    observation("62292-8", 50, "nmol/L"),
    observation("2731-8", 4.2, "pmol/L"),
    observation("2160-0", 80, "umol/L"),
    observation("2160-0", 1.0, "mg/dL", status="preliminary", id="prelim"),
)


def test_a_panel_is_read_in_canonical_units() -> None:
    values, skipped = parse_observations(PANEL)
    assert skipped == 1  # the preliminary result is not used
    by = {v.analyte: v for v in values}
    assert set(by) == {"calcium", "phosphate", "alp", "vitamin_d", "pth", "creatinine"}
    assert by["calcium"].value == pytest.approx(9.218, abs=0.01) and by["calcium"].unit == "mg/dL"
    assert by["vitamin_d"].value == pytest.approx(20.03, abs=0.05) and by["vitamin_d"].unit == "ng/mL"
    assert by["creatinine"].value == pytest.approx(0.905, abs=0.005)
    assert all(v.patient_id == PATIENT and v.effective == date(2026, 11, 2) for v in values)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"resourceType": "Patient"}, "an Observation or a Bundle"),
        (bundle(observation(subject={})), "subject needs identifier.value or a reference Patient/<id>"),
        (bundle(observation("1234-5")), "LOINC code '1234-5' is not one of the analytes"),
        (bundle(observation(unit="furlong")), "unit 'furlong' not accepted"),
        (bundle(observation(value=99.0)), "outside"),
        (bundle(observation(effectiveDateTime="2026-02-30T10:00")), "is not a FHIR date"),
        (bundle(observation(valueQuantity={"value": "high", "unit": "mg/dL"})), "must be a number"),
        ({"resourceType": "Bundle", "entry": []}, "entry is missing or empty"),
    ],
)
def test_bad_observations_are_refused_with_one_line(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(LabInputError) as err:
        parse_observations(doc)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_research_csv(tmp_path: Path) -> None:
    good = tmp_path / "labs.csv"
    good.write_text(
        "patient_id,date,loinc,value,unit\np1,2026-01-05,17861-6,9.4,mg/dL\np1,2026-01-05,2731-8,40,pg/mL\n"
    )
    values = read_lab_csv(good)
    assert [(v.analyte, v.value) for v in values] == [("calcium", 9.4), ("pth", 40.0)]
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "patient_id,date,loinc,value,unit\np1,2026-01-05,17861-6,9.4,mg/dL\np1,2026-13-05,2731-8,40,pg/mL\n"
    )
    with pytest.raises(LabInputError, match=r"bad\.csv line 3"):
        read_lab_csv(bad)
    with pytest.raises(LabInputError, match="missing column"):
        (tmp_path / "cols.csv").write_text("patient,value\n")
        read_lab_csv(tmp_path / "cols.csv")


@pytest.fixture
def node(tmp_path: Path) -> tuple[TestClient, Any]:
    from dicomnode.web.fhir import router

    settings = make_settings(tmp_path / "data")
    store = make_store(settings)
    app = build_admin_app(settings, store)
    app.include_router(
        router
    )  # create_app registers it beside the admin; build_admin_app skips create_app's hook
    return TestClient(app), store


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Content-Type": "application/fhir+json"}


def test_endpoint_needs_authentication_and_the_admin_role(node: tuple[TestClient, Any]) -> None:
    client, store = node
    assert client.post("/fhir", json=PANEL).status_code == 401
    assert client.post("/fhir", json=PANEL, headers=_basic("viewer", VIEWER_PASSWORD)).status_code == 403
    assert store.lab_values(PATIENT) == []


def test_endpoint_stores_audits_and_never_logs_values(
    node: tuple[TestClient, Any], caplog: pytest.LogCaptureFixture
) -> None:
    client, store = node
    with caplog.at_level(logging.INFO):
        r = client.post("/fhir", json=PANEL, headers=_basic("admin", ADMIN_PASSWORD))
    assert r.status_code == 200, r.text
    assert (
        r.json()["resourceType"] == "OperationOutcome" and "stored 6" in r.json()["issue"][0]["diagnostics"]
    )
    stored = store.lab_values(PATIENT)
    assert len(stored) == 6 and {s.source for s in stored} == {"fhir"}
    # pushed again: replaced, not duplicated
    assert (
        client.post("/fhir/Observation", json=PANEL, headers=_basic("admin", ADMIN_PASSWORD)).status_code
        == 200
    )
    assert len(store.lab_values(PATIENT)) == 6
    event = store.list_audit(limit=5).items[0]
    assert event.action == "labs.received" and event.actor == "admin"
    info = " ".join(rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO)
    # the lab value 9.2 as a number of its own: the access log's request time ("ms": 79.2) may contain the
    # same digits, which made this test fail on a slower host
    assert PATIENT not in info and re.search(r"(?<![\d.])9\.2(?!\d)", info) is None, info


def test_bad_input_is_4xx_with_one_line_and_nothing_stored(node: tuple[TestClient, Any]) -> None:
    client, store = node
    bad = copy.deepcopy(PANEL)
    bad["entry"][3]["resource"]["valueQuantity"]["code"] = "furlong"
    r = client.post("/fhir", json=bad, headers=_basic("admin", ADMIN_PASSWORD))
    assert r.status_code == 422
    line = r.json()["issue"][0]["diagnostics"]
    assert line.startswith("Bundle entry 3") and "unit 'furlong' not accepted" in line and "\n" not in line
    assert store.lab_values(PATIENT) == []  # all or nothing: the valid entries were not kept either
    r = client.post("/fhir", content=b"{not json", headers=_basic("admin", ADMIN_PASSWORD))
    assert r.status_code == 400 and r.json()["issue"][0]["diagnostics"] == "request body is not JSON"
    headers = {**_basic("admin", ADMIN_PASSWORD), "Content-Type": "text/plain"}
    assert client.post("/fhir", content=b"{}", headers=headers).status_code == 415


def test_the_app_factory_mounts_the_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.web.app import create_app

    monkeypatch.setenv("DICOMNODE_ADMIN_PASSWORD", ADMIN_PASSWORD)
    settings = make_settings(tmp_path / "data")
    paths = create_app(settings, make_store(settings)).openapi()["paths"]
    assert {"/fhir", "/fhir/Observation"} <= set(paths)
