"""REST API of the admin app: every endpoint, 401 / 403 paths, CSRF, audit, rules applied without restart.

One small phantom study (localizer, bone kernel, 3 mm soft) is received through the real spool and store,
completed and routed by the pipeline's Runner, analysed by a quick stand-in step, and its delivery fails
(closed port): a realistic node state to test against.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from web_testing import ADMIN_PASSWORD, VIEWER_PASSWORD, SeededNode, seed_node

from dicomnode.domain import DeliveryOutcome, JobState
from dicomnode.web.auth import SESSION_COOKIE

ADMIN = ("admin", ADMIN_PASSWORD)
VIEWER = ("viewer", VIEWER_PASSWORD)


class FakeProbe:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, destination: Any, calling_ae: str) -> Any:
        self.calls.append((destination.name, calling_ae))

        class R:
            ok = True
            message = "C-ECHO ok"
            elapsed_s = 0.01

        return R()


PROBE = FakeProbe()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> SeededNode:
    return seed_node(tmp_path_factory.mktemp("webapi"), probe=PROBE)


@pytest.fixture
def client(node: SeededNode) -> Iterator[TestClient]:
    with TestClient(node.app, follow_redirects=False) as c:
        yield c


def openapi_operations(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/api/openapi.json", auth=ADMIN).json()
    ops = []
    for path, item in spec["paths"].items():
        for method in item:
            concrete = re.sub(r"\{[^}]+\}", "1", path)
            ops.append((method.upper(), concrete))
    return ops


# -- anonymous -----------------------------------------------------------------------------------------


def test_health_is_public_and_everything_else_needs_credentials(client: TestClient) -> None:
    assert client.get("/api/health").status_code == 200
    ops = openapi_operations(client)
    assert len(ops) >= 20
    for method, path in ops:
        if path == "/api/health":
            continue
        r = client.request(method, path, json={})
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["www-authenticate"].startswith("Basic")
    for path in ("/metrics", "/api/ready", "/api/openapi.json", "/api/docs"):
        assert client.get(path).status_code == 401, path


def test_api_docs_work_offline(client: TestClient) -> None:
    # FastAPI's Swagger UI / ReDoc load from a CDN: off. /api/docs is rendered locally instead.
    assert client.get("/redoc", auth=ADMIN).status_code in (401, 404)
    assert client.get("/docs", auth=ADMIN).status_code in (401, 404)
    r = client.get("/api/docs", auth=ADMIN)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/api/openapi.json" in page
    for method, path in [("GET", "/api/jobs"), ("PUT", "/api/rules"), ("POST", "/api/jobs/{job_id}/rerun")]:
        assert f"<code>{method}</code></td><td><code>{path}</code>" in page, (method, path)
    # Nothing on the page (or in the API description) points at another host.
    assert not re.search(r"(?:src|href)\s*=\s*['\"]?(?:https?:)?//", page)
    assert "<script" not in page
    assert "cdn" not in client.get("/api/openapi.json", auth=ADMIN).text.lower()


def test_anonymous_pages_redirect_to_login(client: TestClient) -> None:
    for path in ("/", "/studies", "/jobs/1", "/rules", "/deliveries", "/audit", "/health", "/users"):
        r = client.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/login?next=")
    assert client.get("/login").status_code == 200
    assert client.get("/static/app.css").status_code == 200


def test_wrong_credentials_are_refused(client: TestClient) -> None:
    assert client.get("/api/jobs", auth=("admin", "wrong-password")).status_code == 401
    assert client.get("/api/jobs", auth=("nobody", "whatever-pw")).status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Bearer dn_not_a_token"}).status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Basic !!!notbase64"}).status_code == 401
    # Wrong credentials on a page: no redirect loop, a plain 401.
    assert client.get("/", auth=("admin", "wrong-password")).status_code == 401


# -- roles ---------------------------------------------------------------------------------------------


def test_viewer_reads_everything_and_changes_nothing(client: TestClient, node: SeededNode) -> None:
    for method, path in openapi_operations(client):
        if method != "GET" or "{" in path or path in ("/api/users",):
            continue
        if path.endswith(".png") or re.search(r"/\d+$", path) or path.startswith("/api/studies/"):
            continue
        r = client.get(path, auth=VIEWER)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    assert client.get("/api/users", auth=VIEWER).status_code == 403
    job = node.job_id
    for method, path, body in [
        ("PUT", "/api/rules", {"yaml": "rules: []"}),
        ("POST", f"/api/jobs/{job}/rerun", None),
        ("POST", "/api/deliveries/1/resend", None),
        ("POST", "/api/deliveries/resend-failed", {}),
        ("POST", "/api/destinations/pacs/test", None),
        ("POST", "/api/rules/versions/1/rollback", None),
        ("POST", "/api/users", {"username": "x", "password": "12345678", "role": "admin"}),
        ("POST", "/api/users/viewer/token", None),
    ]:
        r = client.request(method, path, json=body, auth=VIEWER)
        assert r.status_code == 403, (method, path, r.status_code)
    # ...and nothing changed.
    assert node.store.get_job(job).state is JobState.FAILED
    assert node.store.latest_rule_version() is None
    # Viewers may dry-run and validate (read-only operations).
    r = client.post("/api/rules/explain", json={"study_instance_uid": node.study.study_uid}, auth=VIEWER)
    assert r.status_code == 200
    assert client.post("/api/rules/validate", json={"yaml": "rules: []"}, auth=VIEWER).status_code == 200
    assert client.get("/users", auth=VIEWER).status_code == 403


# -- rules ---------------------------------------------------------------------------------------------


BROKEN = """\
mode: first_match
rules:
  - name: abdomen
    action: analyse
    conditions:
      - {attribute: Modality, equals: CT}
      - {attribute: SliceThicknes, range: {max: 5}}
"""


def test_validate_names_rule_condition_and_field(client: TestClient) -> None:
    r = client.post("/api/rules/validate", json={"yaml": BROKEN}, auth=ADMIN)
    assert r.status_code == 200
    body = r.json()
    assert body["valid"] is False
    (p,) = body["problems"]
    assert p["rule"] == "abdomen" and p["condition"] == 2
    assert "SliceThicknes" in p["message"] and "SliceThickness" in p["message"]  # the did-you-mean hint

    bad_op = BROKEN.replace("SliceThicknes, range: {max: 5}", "SliceThickness, range: {max: five}")
    (p,) = client.post("/api/rules/validate", json={"yaml": bad_op}, auth=ADMIN).json()["problems"]
    assert p["rule"] == "abdomen" and p["condition"] == 2 and p["field"] == "range.max"

    r = client.post("/api/rules/validate", json={"yaml": "rules:\n  - name: [unclosed\n"}, auth=ADMIN)
    (p,) = r.json()["problems"]
    assert p["line"] is not None and "YAML" in p["message"]

    ok = client.post(
        "/api/rules/validate", json={"yaml": BROKEN.replace("Thicknes,", "Thickness,")}, auth=ADMIN
    )
    assert ok.json() == {"valid": True, "problems": []}


def test_a_one_line_rules_text_is_never_read_as_a_file(client: TestClient, tmp_path: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("rules: []\n")
    r = client.post("/api/rules/validate", json={"yaml": str(secret)}, auth=ADMIN)
    assert r.json()["valid"] is False  # a plain string, not a mapping: the file was not opened


def test_invalid_rules_are_not_saved(client: TestClient, node: SeededNode) -> None:
    before = node.store.list_rule_versions().total
    r = client.put("/api/rules", json={"yaml": BROKEN}, auth=ADMIN)
    assert r.status_code == 422
    assert r.json()["problems"][0]["rule"] == "abdomen"
    assert node.store.list_rule_versions().total == before


def test_explain_picks_the_soft_series_with_reasons_for_all(client: TestClient, node: SeededNode) -> None:
    r = client.post("/api/rules/explain", json={"study_instance_uid": node.study.study_uid}, auth=ADMIN)
    assert r.status_code == 200
    series = r.json()["series"]
    assert len(series) == 3
    selected = [s for s in series if s["selected"]]
    assert len(selected) == 1
    soft_uid = _series_uid(node.study.soft[0])
    assert selected[0]["series_instance_uid"] == soft_uid
    for s in series:
        assert s["reasons"], s
        assert set(s) >= {"series_instance_uid", "selected", "rule", "reasons"}
    loc = next(s for s in series if "Topogram" in s["series_description"])
    assert loc["rule"] is None and any("FAIL" in x for x in loc["reasons"])
    bone = next(s for s in series if s["series_instance_uid"] == _series_uid(node.study.bone[0]))
    assert any("ranks higher" in x for x in bone["reasons"])


def test_explain_with_edited_rules_and_errors(client: TestClient, node: SeededNode) -> None:
    cur = client.get("/api/rules", auth=ADMIN).json()["yaml"]
    thin = cur.replace(
        "{attribute: derived.slice_mm, range: {max: 5}}", "{attribute: derived.slice_mm, range: {max: 2}}"
    )
    assert thin != cur
    r = client.post(
        "/api/rules/explain", json={"study_instance_uid": node.study.study_uid, "rules": thin}, auth=ADMIN
    )
    assert r.status_code == 200
    assert not any(s["selected"] for s in r.json()["series"])
    assert any("derived.slice_mm <= 2: FAIL" in x for s in r.json()["series"] for x in s["reasons"])
    r = client.post(
        "/api/rules/explain", json={"study_instance_uid": node.study.study_uid, "rules": BROKEN}, auth=ADMIN
    )
    assert r.status_code == 422 and r.json()["problems"]
    assert (
        client.post("/api/rules/explain", json={"study_instance_uid": "1.2.3.4"}, auth=ADMIN).status_code
        == 404
    )
    assert (
        client.post("/api/rules/explain", json={"study_instance_uid": "not a uid"}, auth=ADMIN).status_code
        == 422
    )


def test_save_history_diff_rollback_and_applied_without_restart(client: TestClient, node: SeededNode) -> None:
    base = client.get("/api/rules", auth=ADMIN).json()
    assert base["version"] is None and base["source"] == "default"
    ignore_all = "mode: first_match\nrules: []\nfallback: {action: ignore}\n"
    r = client.put("/api/rules", json={"yaml": ignore_all, "comment": "pause analysis"}, auth=ADMIN)
    assert r.status_code == 200
    v1 = r.json()["version"]
    now = client.get("/api/rules", auth=ADMIN).json()
    assert now["version"] == v1 and now["yaml"] == ignore_all

    # The running node's Runner reads the rules through the provider: the next routing uses v1.
    later = datetime.now(UTC) + timedelta(hours=3)  # after the seeding's routing (done at +2 h)
    assert node.runner.route_study(node.study.study_uid, now=later) == []
    latest = node.store.decisions(node.study.study_uid)[:3]
    assert not any(d.decision.selected for d in latest)

    audit = client.get("/api/audit", params={"target": f"rules:version:{v1}"}, auth=ADMIN).json()["items"]
    assert audit[0]["actor"] == "admin" and audit[0]["action"] == "rules.save"
    assert audit[0]["before"]["source"] == "default" and audit[0]["after"]["yaml"] == ignore_all

    r = client.put("/api/rules", json={"yaml": base["yaml"], "comment": "back"}, auth=ADMIN)
    v2 = r.json()["version"]
    versions = client.get("/api/rules/versions", auth=ADMIN).json()
    assert [v["id"] for v in versions["items"][:2]] == [v2, v1] and versions["current"] == v2
    diff = client.get("/api/rules/diff", params={"a": v1, "b": v2}, auth=ADMIN).json()["diff"]
    assert "-rules: []" in diff and "+rules:" in diff
    assert client.get(f"/api/rules/versions/{v1}", auth=ADMIN).json()["yaml"] == ignore_all
    assert client.get("/api/rules/versions/999999", auth=ADMIN).status_code == 404
    assert client.get("/api/rules/diff", params={"a": 999999}, auth=ADMIN).status_code == 404

    r = client.post(f"/api/rules/versions/{v1}/rollback", auth=ADMIN)
    assert r.status_code == 200
    v3 = r.json()["version"]
    assert client.get("/api/rules", auth=ADMIN).json()["yaml"] == ignore_all
    assert client.post("/api/rules/versions/999999/rollback", auth=ADMIN).status_code == 404
    # Restore the default rules for the other tests.
    client.post(f"/api/rules/versions/{v2}/rollback", auth=ADMIN)
    assert v3 > v2
    assert client.get("/rules/diff", params={"a": v1, "b": v2}, auth=ADMIN).status_code == 200


# -- studies, jobs ---------------------------------------------------------------------------------------


def test_studies_and_jobs(client: TestClient, node: SeededNode) -> None:
    studies = client.get("/api/studies", auth=VIEWER).json()
    assert studies["total"] == 1
    st = studies["items"][0]
    assert st["study_instance_uid"] == node.study.study_uid and st["n_series"] == 3
    assert st["n_instances"] == len(node.study.files)
    detail = client.get(f"/api/studies/{node.study.study_uid}", auth=VIEWER).json()
    assert len(detail["series"]) == 3 and len(detail["jobs"]) == 1
    assert client.get("/api/studies/1.2.3", auth=VIEWER).status_code == 404

    jobs = client.get("/api/jobs", auth=VIEWER).json()
    assert jobs["total"] == 1
    assert client.get("/api/jobs", params={"state": "done"}, auth=VIEWER).json()["total"] == 0
    assert client.get("/api/jobs", params={"state": "bogus"}, auth=VIEWER).status_code == 422
    job = client.get(f"/api/jobs/{node.job_id}", auth=VIEWER).json()
    assert job["job"]["state"] == "failed" and "pacs" in job["job"]["message"]
    states = [e["to_state"] for e in job["events"]]
    assert states[:2] == ["pending", "analysing"] and "reported" in states and states[-1] == "failed"
    assert job["result"]["summary"]["vbmd_l1_l2_mg_cm3"] == 118.5
    assert job["overlays"] == [f"/api/jobs/{node.job_id}/overlays/0.png"]
    assert job["deliveries"][0]["outcome"] == "permanent_failure"
    assert any(x["selected"] and x["rule"] == "abdominal-ct-bmd" for x in job["decisions"])
    png = client.get(job["overlays"][0], auth=VIEWER)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/api/jobs/{node.job_id}/overlays/7.png", auth=VIEWER).status_code == 404
    assert client.get("/api/jobs/424242", auth=VIEWER).status_code == 404


def test_rerun_job(client: TestClient, node: SeededNode) -> None:
    assert client.post("/api/jobs/424242/rerun", auth=ADMIN).status_code == 404
    r = client.post(f"/api/jobs/{node.job_id}/rerun", auth=ADMIN)
    assert r.status_code == 200 and r.json()["state"] == "pending"
    # Not finished any more: a second re-run is refused, nothing changes.
    assert client.post(f"/api/jobs/{node.job_id}/rerun", auth=ADMIN).status_code == 409
    events = node.store.job_detail(node.job_id).events
    assert events[-1].to_state is JobState.PENDING and events[-1].actor == "admin"
    audit = node.store.list_audit(target=f"job:{node.job_id}").items[0]
    assert (
        audit.action == "job.rerun"
        and audit.before["state"] == "failed"
        and audit.after["state"] == "pending"
    )
    # The worker picks it up again and the job gets a new attempt.
    assert node.runner.run_next_job("test-worker") == node.job_id
    assert node.store.get_job(node.job_id).attempts == 2


# -- deliveries, destinations --------------------------------------------------------------------------------


def test_deliveries_resend_and_destinations(client: TestClient, node: SeededNode) -> None:
    failed = client.get("/api/deliveries", params={"outcome": "permanent_failure"}, auth=VIEWER).json()
    assert failed["total"] >= 1
    d = failed["items"][0]
    assert "cannot connect" in d["message"] or "refused" in d["message"]
    r = client.post(f"/api/deliveries/{d['id']}/resend", auth=ADMIN)
    assert r.status_code == 200 and r.json()["outcome"] == "pending"
    assert node.store.get_delivery(d["id"]).outcome is DeliveryOutcome.PENDING
    assert node.store.list_audit(target=f"delivery:{d['id']}").items[0].actor == "admin"
    assert client.post("/api/deliveries/424242/resend", auth=ADMIN).status_code == 404

    node.runner.deliver_due()  # fails again (closed port): permanent after one attempt
    r = client.post("/api/deliveries/resend-failed", json={"destination": "pacs"}, auth=ADMIN)
    assert r.status_code == 200 and d["id"] in r.json()["resent"]
    assert client.post("/api/deliveries/resend-failed", json={}, auth=ADMIN).json() == {"resent": []}

    dests = client.get("/api/destinations", auth=VIEWER).json()
    assert dests[0]["name"] == "pacs" and dests[0]["kind"] == "dimse"
    assert "PACS@127.0.0.1" in dests[0]["address"]
    r = client.post("/api/destinations/pacs/test", auth=ADMIN)
    assert r.status_code == 200 and r.json()["ok"] is True
    assert PROBE.calls[-1] == ("pacs", node.settings.dicom.ae_title)
    assert client.post("/api/destinations/nope/test", auth=ADMIN).status_code == 404


# -- users, tokens, summary ---------------------------------------------------------------------------


def test_users_and_bearer_tokens(client: TestClient, node: SeededNode) -> None:
    r = client.post(
        "/api/users", json={"username": "ops", "password": "ops-pass-123", "role": "viewer"}, auth=ADMIN
    )
    assert r.status_code == 201 and r.json()["role"] == "viewer"
    dup = client.post(
        "/api/users", json={"username": "ops", "password": "ops-pass-123", "role": "viewer"}, auth=ADMIN
    )
    assert dup.status_code == 422
    short = client.post(
        "/api/users", json={"username": "x2", "password": "short", "role": "viewer"}, auth=ADMIN
    )
    assert short.status_code == 422
    assert {u["username"] for u in client.get("/api/users", auth=ADMIN).json()} >= {"admin", "viewer", "ops"}
    token = client.post("/api/users/ops/token", auth=ADMIN).json()["token"]
    me = client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert me["username"] == "ops" and me["role"] == "viewer" and me["auth"] == "bearer"
    assert client.post("/api/users/nobody/token", auth=ADMIN).status_code == 404
    audit = node.store.list_audit(target="user:ops").items
    assert {a.action for a in audit} == {"user.create", "user.token"}
    assert all("password" not in str(a.after) and token not in str(a.after) for a in audit)
    s = client.get("/api/summary", auth=VIEWER).json()
    assert s["studies"] == 1 and sum(s["jobs"].values()) == 1


# -- sessions and CSRF ------------------------------------------------------------------------------------


def _login(client: TestClient, user: str, password: str, next_url: str = "/") -> str:
    r = client.post("/login", data={"username": user, "password": password, "next": next_url})
    assert r.status_code == 303
    return str(r.headers["location"])


def test_login_sets_a_safe_session_cookie(node: SeededNode) -> None:
    with TestClient(node.app, follow_redirects=False) as c:
        r = c.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD, "next": "/rules"})
        assert r.status_code == 303 and r.headers["location"] == "/rules"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax") and "Path=/" in cookie
        assert c.get("/rules").status_code == 200
        assert c.get("/api/me").json()["auth"] == "session"


def test_login_failures_and_open_redirects(node: SeededNode) -> None:
    with TestClient(node.app, follow_redirects=False) as c:
        loc = _login(c, "admin", "nope-nope")
        assert loc.startswith("/login?") and "error=" in loc
        assert c.get("/api/me").status_code == 401
        assert _login(c, "admin", ADMIN_PASSWORD, "//evil.example/x") == "/"
        assert _login(c, "admin", ADMIN_PASSWORD, "https://evil.example/") == "/"
    assert any(a.action == "login.failed" for a in node.store.list_audit(limit=200).items)


def test_csrf_is_required_for_cookie_sessions(node: SeededNode) -> None:
    with TestClient(node.app, follow_redirects=False) as c:
        _login(c, "admin", ADMIN_PASSWORD)
        token = c.get("/api/me").json()["csrf_token"]
        assert token
        body = {"destination": "nobody-here"}
        assert c.post("/api/deliveries/resend-failed", json=body).status_code == 403
        bad = c.post("/api/deliveries/resend-failed", json=body, headers={"X-CSRF-Token": "x" + token})
        assert bad.status_code == 403
        ok = c.post("/api/deliveries/resend-failed", json=body, headers={"X-CSRF-Token": token})
        assert ok.status_code == 200
        # The same token works as a form field (the logout form).
        assert c.post("/logout", data={"csrf_token": "wrong"}).status_code == 403
        r = c.post("/logout", data={"csrf_token": token})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert "Max-Age=0" in r.headers["set-cookie"] or "expires" in r.headers["set-cookie"].lower()
        assert c.get("/api/me").status_code == 401


def test_tampered_or_foreign_session_cookie_is_refused(node: SeededNode) -> None:
    with TestClient(node.app, follow_redirects=False) as c:
        _login(c, "viewer", VIEWER_PASSWORD)
        value = c.cookies.get(SESSION_COOKIE)
        assert value
        payload = base64.urlsafe_b64encode(b'{"u":"admin","c":"x"}').decode().rstrip("=")
        forged = payload + value[value.index(".") :]
        c.cookies.set(SESSION_COOKIE, forged)
        assert c.get("/api/me").status_code == 401


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_pages_render_for_admin_and_viewer(client: TestClient, node: SeededNode) -> None:
    pages = {
        "/": "Dashboard",
        "/studies": "CT ABDOMEN PHANTOM",
        f"/studies/{node.study.study_uid}": "Abdomen 3.0 mm STANDARD",
        "/jobs": f"#{node.job_id}",
        "/jobs?page=1": "1–1 of 1",
        f"/jobs/{node.job_id}": "Timeline",
        "/rules": "Dry run",
        "/rules/diff?a=0&b=0": "identical",
        "/deliveries": "C-STORE",
        "/audit": "Audit log",
        "/health": "Readiness",
    }
    for path, text in pages.items():
        r = client.get(path, auth=VIEWER)
        assert r.status_code == 200, path
        assert text in r.text, path
        assert r.headers["cache-control"] == "no-store"
    job_admin = client.get(f"/jobs/{node.job_id}", auth=ADMIN).text
    job_viewer = client.get(f"/jobs/{node.job_id}", auth=VIEWER).text
    assert 'id="rerun"' in job_admin and 'id="rerun"' not in job_viewer
    assert "Save as new version" in client.get("/rules", auth=ADMIN).text
    assert "Save as new version" not in client.get("/rules", auth=VIEWER).text
    assert client.get("/jobs/424242", auth=VIEWER, headers={"accept": "text/html"}).status_code == 404
    assert client.get("/jobs", params={"page": 0}, auth=VIEWER).status_code == 422


def test_access_log_is_structured_and_has_no_query_strings(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    with caplog.at_level(logging.INFO, logger="dicomnode.web.access"):
        client.get("/api/audit", params={"target": "PATIENT^NAME"}, auth=VIEWER)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dicomnode.web.access"]
    assert lines[-1]["path"] == "/api/audit" and lines[-1]["status"] == 200 and lines[-1]["user"] == "viewer"
    assert all("PATIENT" not in r.getMessage() for r in caplog.records)


# -- results removed by retention ---------------------------------------------------------------------------


def test_results_removed_by_retention_are_named_and_not_resent(tmp_path: Path) -> None:
    own = seed_node(tmp_path)  # its own node: the shared one's files must stay
    job_id = own.job_id
    (d,) = own.store.list_deliveries(job_id=job_id).items
    assert d.outcome is DeliveryOutcome.PERMANENT_FAILURE
    with TestClient(own.app, follow_redirects=False) as c:
        page = c.get(f"/jobs/{job_id}", auth=VIEWER).text
        assert f'<img src="/api/jobs/{job_id}/overlays/0.png"' in page and "overlays-removed" not in page
    removed = own.runner.clean_results(
        now=datetime.now(UTC) + timedelta(days=own.settings.retention.results_days + 1)
    )
    assert removed == 1 and not (own.runner.results_dir / f"job-{job_id}").exists()
    with TestClient(own.app, follow_redirects=False) as c:
        # The job, its result and its deliveries stay visible.
        job = c.get(f"/api/jobs/{job_id}", auth=VIEWER).json()
        assert job["result"]["summary"]["vbmd_l1_l2_mg_cm3"] == 118.5
        assert job["deliveries"][0]["id"] == d.id
        # The overlay image says why it is missing; the page names the removal instead of broken images.
        png = c.get(job["overlays"][0], auth=VIEWER)
        assert png.status_code == 404 and "removed by retention" in png.json()["detail"]
        page = c.get(f"/jobs/{job_id}", auth=VIEWER).text
        assert 'id="overlays-removed"' in page and "<img src=" not in page
        # A resend is refused with a one-line reason; nothing is scheduled, no audit entry is written.
        r = c.post(f"/api/deliveries/{d.id}/resend", auth=ADMIN)
        assert r.status_code == 409
        reason = r.json()["detail"]
        assert "\n" not in reason and "removed" in reason and "re-run" in reason
        assert own.store.get_delivery(d.id).outcome is DeliveryOutcome.PERMANENT_FAILURE
        assert own.store.list_audit(target=f"delivery:{d.id}").total == 0
        assert c.post("/api/deliveries/resend-failed", json={}, auth=ADMIN).json() == {"resent": []}
        assert own.store.get_job(job_id).state is JobState.FAILED
        # A re-run writes the result again; then a resend is accepted.
        assert c.post(f"/api/jobs/{job_id}/rerun", auth=ADMIN).status_code == 200
        own.runner.run_next_job("test-worker")
        assert c.post(f"/api/deliveries/{d.id}/resend", auth=ADMIN).status_code == 200
