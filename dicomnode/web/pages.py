"""Server-rendered admin pages (Jinja2 templates in ``web/templates``, CSS/JS in ``web/static``).

Pages only read; buttons call the REST API with ``fetch`` (``static/app.js`` sends the CSRF token in the
``X-CSRF-Token`` header). The login form is the one plain form post (it creates the session).
"""

from __future__ import annotations

import math
import shutil
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from dicomnode import __version__
from dicomnode.domain import DeliveryOutcome, JobState
from dicomnode.store import NotFoundError
from dicomnode.web.auth import SESSION_COOKIE, Session, session_cookie_kwargs, too_many_message
from dicomnode.web.deps import AnyUser, Ctx, WebContext, csrf
from dicomnode.web.render import overlay_files

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 25
NAV = (
    ("dashboard", "/", "Dashboard"),
    ("studies", "/studies", "Studies & jobs"),
    ("rules", "/rules", "Rules"),
    ("deliveries", "/deliveries", "Destinations & deliveries"),
    ("audit", "/audit", "Audit"),
    ("health", "/health", "Health"),
)


def _render(ctx: WebContext, request: Request, name: str, active: str, **values: Any) -> HTMLResponse:
    user = getattr(request.state, "user", None)
    values.update(
        request=request,
        user=user,
        csrf_token=getattr(request.state, "csrf", None) or "",
        nav=NAV,
        active=active,
        version=__version__,
        node_role=ctx.role,
    )
    resp = ctx.templates.TemplateResponse(request, name, values)
    # Pages show live state and patient-adjacent data: never cache them, never frame them.
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


def _pager(total: int, page: int, base: str, params: dict[str, Any]) -> dict[str, Any]:
    pages = max(1, math.ceil(total / PAGE_SIZE))

    def url(p: int) -> str:
        q = {k: v for k, v in params.items() if v not in (None, "", [])}
        q["page"] = p
        return f"{base}?{urlencode(q, doseq=True)}"

    return {
        "page": page,
        "pages": pages,
        "total": total,
        "prev": url(page - 1) if page > 1 else None,
        "next": url(page + 1) if page < pages else None,
        "first_item": 0 if total == 0 else (page - 1) * PAGE_SIZE + 1,
        "last_item": min(total, page * PAGE_SIZE),
    }


Page = Annotated[int, Query(ge=1, le=100_000)]


# -- login -----------------------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


#: The only messages ``/login?error=CODE`` shows: a code from this table, never text from the URL (a crafted
#: link must not put words of its author's choosing into an official-looking alert).
LOGIN_ERRORS: dict[str, str] = {
    "credentials": "Wrong user name or password.",
    "expired": "Your session has ended; please log in again.",
}


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, ctx: Ctx, next: str | None = None, error: str | None = None) -> HTMLResponse:
    message = LOGIN_ERRORS.get(error or "")
    return _render(ctx, request, "login.html", "", next=_safe_next(next), error=message)


@router.post("/login")
def login(
    request: Request,
    ctx: Ctx,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    name = username.strip()
    address = request.client.host if request.client else ""
    # A locked name or address is refused before the password is checked: the answer (and its cost) is
    # the same for an existing and an unknown user, right password or not.
    wait = ctx.throttle.retry_after(name, address)
    if wait:
        return _locked(ctx, request, next, wait)
    user = ctx.users.verify_password(name, password)
    if user is None:
        ctx.store.audit(name[:64] or "?", "login.failed", "session")
        ctx.throttle.failed(name, address, "session")  # logs and audits a lockout it starts
        q = urlencode({"next": _safe_next(next), "error": "credentials"})
        return RedirectResponse(f"/login?{q}", status_code=303)
    ctx.throttle.succeeded(name, address)
    found = ctx.users.lookup(user.username)
    # The session is bound to the account as it is now: a new password or role ends it (SessionCodec).
    cookie, _ = ctx.sessions.issue(user.username, password_hash=found[1] if found else "", role=user.role)
    resp = RedirectResponse(_safe_next(next), status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(ctx.sessions.max_age_s),
        **session_cookie_kwargs(request.url.scheme == "https"),
    )
    ctx.store.audit(user.username, "login", "session")
    return resp


def _locked(ctx: WebContext, request: Request, next: str, wait: int) -> Response:
    """The login page with a one-line refusal, 429 and ``Retry-After``."""
    resp = _render(ctx, request, "login.html", "", next=_safe_next(next), error=too_many_message(wait))
    resp.status_code = 429
    resp.headers["Retry-After"] = str(wait)
    return resp


@router.post("/logout")
async def logout(request: Request, user: AnyUser, ctx: Ctx) -> Response:
    await csrf(request)
    sess = getattr(request.state, "session", None)
    if isinstance(sess, Session):
        # Server-side: the cookie stops working everywhere, also where a copy of it was kept.
        await run_in_threadpool(ctx.sessions.revoke, sess)
        ctx.store.audit(user.username, "logout", "session")
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# -- dashboard -------------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, user: AnyUser, ctx: Ctx) -> HTMLResponse:
    s = ctx.store
    jobs = s.job_counts()
    deliveries = s.delivery_counts()
    return _render(
        ctx,
        request,
        "dashboard.html",
        "dashboard",
        jobs=jobs,
        deliveries=deliveries,
        studies=s.list_studies(limit=8),
        recent_jobs=s.list_jobs(limit=10),
        failed_jobs=s.list_jobs(state=JobState.FAILED, limit=5),
        failed_deliveries=s.list_deliveries(outcome=DeliveryOutcome.PERMANENT_FAILURE, limit=5),
        rules=ctx.rules.current(),
        n_destinations=len(ctx.settings.destinations),
    )


# -- studies and jobs ------------------------------------------------------------------------------------


@router.get("/studies", response_class=HTMLResponse)
def studies(request: Request, user: AnyUser, ctx: Ctx, page: Page = 1) -> HTMLResponse:
    p = ctx.store.list_studies(limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    job_states: dict[str, list[Any]] = {}
    for st in p.items:
        job_states[st.study_instance_uid] = list(
            ctx.store.list_jobs(study_uid=st.study_instance_uid, limit=20).items
        )
    return _render(
        ctx,
        request,
        "studies.html",
        "studies",
        studies=p,
        job_states=job_states,
        paging=_pager(p.total, page, "/studies", {}),
    )


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study(study_uid: str, request: Request, user: AnyUser, ctx: Ctx) -> HTMLResponse:
    try:
        st = ctx.store.get_study(study_uid)
    except NotFoundError:
        raise HTTPException(404, "no such study") from None
    decisions = ctx.store.decisions(study_uid)
    latest: dict[str, Any] = {}
    for d in decisions:  # newest first: keep the latest decision per series
        latest.setdefault(d.decision.series_instance_uid, d)
    return _render(
        ctx,
        request,
        "study.html",
        "studies",
        study=st,
        series=sorted(ctx.store.list_series(study_uid=study_uid, limit=500).items, key=_series_order),
        jobs=ctx.store.list_jobs(study_uid=study_uid, limit=500).items,
        decisions=latest,
    )


def _series_order(s: Any) -> tuple[float, str]:
    try:
        number = float(s.attributes.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = float("inf")
    return number, s.first_received_at.isoformat()


@router.get("/jobs", response_class=HTMLResponse)
def jobs(
    request: Request,
    user: AnyUser,
    ctx: Ctx,
    page: Page = 1,
    state: Annotated[str | None, Query(max_length=32)] = None,
) -> HTMLResponse:
    st = JobState(state) if state in {s.value for s in JobState} else None
    p = ctx.store.list_jobs(state=st, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    return _render(
        ctx,
        request,
        "jobs.html",
        "studies",
        jobs=p,
        state=st.value if st else "",
        states=list(JobState),
        counts=ctx.store.job_counts(),
        paging=_pager(p.total, page, "/jobs", {"state": st.value if st else None}),
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(job_id: int, request: Request, user: AnyUser, ctx: Ctx) -> HTMLResponse:
    try:
        d = ctx.store.job_detail(job_id)
    except NotFoundError:
        raise HTTPException(404, "no such job") from None
    try:
        series = ctx.store.get_series(d.job.series_instance_uid)
    except NotFoundError:
        series = None
    result = dict(d.result.result_json) if d.result else None
    written = overlay_files(list(d.result.files)) if d.result else []
    # Files removed by retention (retention.results_days) are named, not shown as broken images.
    overlays = [p for p in written if p.is_file()]
    overlays_removed = len(written) - len(overlays)
    decision = next(
        (x for x in d.decisions if x.decision.series_instance_uid == d.job.series_instance_uid), None
    )
    # The milestones describe the current attempt: the events since the job last (re)entered PENDING.
    starts = [i for i, e in enumerate(d.events) if e.to_state is JobState.PENDING]
    attempt_events = d.events[starts[-1] :] if starts else d.events
    return _render(
        ctx,
        request,
        "job.html",
        "studies",
        d=d,
        job=d.job,
        series=series,
        result=result,
        overlays=[f"/api/jobs/{job_id}/overlays/{written.index(p)}.png" for p in overlays],
        overlay_names=[p.stem for p in overlays],
        overlays_removed=overlays_removed,
        decision=decision,
        attempt_events=attempt_events,
        rerunnable=d.job.state in (JobState.DONE, JobState.FAILED, JobState.NOT_QUALIFYING),
    )


# -- rules -----------------------------------------------------------------------------------------------


@router.get("/rules", response_class=HTMLResponse)
def rules(request: Request, user: AnyUser, ctx: Ctx) -> HTMLResponse:
    return _render(
        ctx,
        request,
        "rules.html",
        "rules",
        current=ctx.rules.current(),
        versions=ctx.store.list_rule_versions(limit=50),
        studies=ctx.store.list_studies(limit=20).items,
    )


@router.get("/rules/diff", response_class=HTMLResponse)
def rules_diff(
    request: Request,
    user: AnyUser,
    ctx: Ctx,
    a: Annotated[int, Query(ge=0)] = 0,
    b: Annotated[int, Query(ge=0)] = 0,
) -> HTMLResponse:
    try:
        diff = ctx.rules.diff(a or None, b or None)
    except NotFoundError:
        raise HTTPException(404, "no such rule version") from None
    return _render(ctx, request, "rules_diff.html", "rules", a=a, b=b, diff=diff.splitlines())


# -- deliveries ------------------------------------------------------------------------------------------


@router.get("/deliveries", response_class=HTMLResponse)
def deliveries(
    request: Request,
    user: AnyUser,
    ctx: Ctx,
    page: Page = 1,
    outcome: Annotated[str | None, Query(max_length=32)] = None,
    destination: Annotated[str | None, Query(max_length=128)] = None,
) -> HTMLResponse:
    oc = DeliveryOutcome(outcome) if outcome in {o.value for o in DeliveryOutcome} else None
    dest = destination or None
    p = ctx.store.list_deliveries(
        outcome=oc, destination=dest, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE
    )
    dests = []
    for d in ctx.settings.destinations:
        address = f"{d.ae_title} @ {d.host}:{d.port}" if d.kind == "dimse" else d.url
        failed = ctx.store.list_deliveries(
            outcome=DeliveryOutcome.PERMANENT_FAILURE, destination=d.name, limit=1
        ).total
        ok = ctx.store.list_deliveries(outcome=DeliveryOutcome.SUCCESS, destination=d.name, limit=1).total
        dests.append({"name": d.name, "kind": d.kind, "address": address, "failed": failed, "ok": ok})
    return _render(
        ctx,
        request,
        "deliveries.html",
        "deliveries",
        deliveries=p,
        destinations=dests,
        outcome=oc.value if oc else "",
        destination=dest or "",
        outcomes=list(DeliveryOutcome),
        counts=ctx.store.delivery_counts(),
        paging=_pager(
            p.total, page, "/deliveries", {"outcome": oc.value if oc else None, "destination": dest}
        ),
    )


# -- audit, health, users --------------------------------------------------------------------------------


@router.get("/audit", response_class=HTMLResponse)
def audit(
    request: Request,
    user: AnyUser,
    ctx: Ctx,
    page: Page = 1,
    target: Annotated[str | None, Query(max_length=256)] = None,
) -> HTMLResponse:
    p = ctx.store.list_audit(target=target or None, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    return _render(
        ctx,
        request,
        "audit.html",
        "audit",
        events=p,
        target=target or "",
        paging=_pager(p.total, page, "/audit", {"target": target}),
    )


@router.get("/health", response_class=HTMLResponse)
def health(request: Request, user: AnyUser, ctx: Ctx) -> HTMLResponse:
    spool = ctx.settings.spool_dir
    try:
        du = shutil.disk_usage(spool if spool.exists() else ctx.settings.data_dir)
        disk = {
            "free": du.free,
            "total": du.total,
            "used_pct": 100.0 * (du.total - du.free) / max(du.total, 1),
        }
    except OSError:
        disk = None
    uptime = datetime.now(UTC) - ctx.started_at
    return _render(
        ctx,
        request,
        "health.html",
        "health",
        db_ok=ctx.store.ping(),
        db_url=_redact(ctx.settings.database_url_resolved()),
        disk=disk,
        floor_mb=ctx.settings.dicom.free_space_floor_mb,
        uptime=str(uptime).split(".")[0],
        settings=ctx.settings,
        sweeps_owner=ctx.store.lease_holder("sweeps"),  # dicomnode.pipeline.runner.SWEEP_LEASE
    )


def _redact(url: str) -> str:
    # postgresql+psycopg://user:secret@host/db -> postgresql+psycopg://user:***@host/db
    head, sep, tail = url.partition("://")
    if sep and "@" in tail:
        cred, _, rest = tail.rpartition("@")
        user = cred.split(":", 1)[0]
        return f"{head}://{user}:***@{rest}" if ":" in cred else url
    return url


@router.get("/users", response_class=HTMLResponse)
def users_page(request: Request, user: AnyUser, ctx: Ctx) -> HTMLResponse:
    if not user.is_admin:
        raise HTTPException(403, "this needs the admin role")
    return _render(ctx, request, "users.html", "users", users=ctx.users.list_users())
