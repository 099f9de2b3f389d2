"""The REST API of the admin app (``/api/...``; described by ``/api/openapi.json``).

Reading needs any authenticated user (viewer or admin); changing anything needs an admin and, for cookie
sessions, the CSRF token. Errors are JSON ``{"detail": "..."}``: 401 anonymous, 403 role or CSRF, 404 unknown
id / UID, 409 a job or delivery that cannot make that move now, 422 invalid input (invalid rules answer
``{"detail": "...", "problems": [...]}`` naming rule, condition and field).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from dicomnode.domain import DeliveryOutcome, JobState
from dicomnode.errors import ConfigError, InputError
from dicomnode.store import Delivery, InvalidTransitionError, Job, NotFoundError, Study
from dicomnode.web.deps import AdminUser, AnyUser, Ctx
from dicomnode.web.render import dicom_to_png, overlay_files
from dicomnode.web.users import ROLES

__all__ = ["router"]

router = APIRouter(prefix="/api", tags=["admin"])

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]
IdPath = Annotated[int, Path(ge=1, le=2**62)]


# -- models --------------------------------------------------------------------------------------------


class FromRecord(BaseModel):
    """An API model read from a store record's attributes (``Model.model_validate(record)``)."""

    model_config = ConfigDict(from_attributes=True)


class Problem(BaseModel):
    message: str
    rule: str | None = None
    condition: int | None = None
    field: str | None = None
    line: int | None = None


class Me(BaseModel):
    username: str
    role: Literal["admin", "viewer", "sender"]
    auth: str | None
    csrf_token: str | None = None


class RulesOut(BaseModel):
    version: int | None = Field(description="rule version in force; null = config file or shipped defaults")
    source: str
    yaml: str


class RulesIn(BaseModel):
    yaml: str = Field(max_length=200_000)
    comment: str | None = Field(default=None, max_length=500)


class SavedRules(BaseModel):
    version: int


class ValidateIn(BaseModel):
    yaml: str = Field(max_length=200_000)


class ValidateOut(BaseModel):
    valid: bool
    problems: list[Problem]


class ExplainIn(BaseModel):
    study_instance_uid: str = Field(min_length=1, max_length=64, pattern=UID_PATTERN)
    rules: str | None = Field(default=None, max_length=200_000, description="YAML; omitted = rules in force")


class SeriesDecision(BaseModel):
    series_instance_uid: str
    selected: bool
    rule: str | None
    action: str
    rank: int | None
    destinations: list[str]
    reasons: list[str]
    series_description: str
    series_number: Any = None
    images: int | None
    slice_thickness: Any = None
    kernel: Any = None


class ExplainOut(BaseModel):
    study_instance_uid: str
    rules_version: int | None
    series: list[SeriesDecision]


class RuleVersionOut(FromRecord):
    id: int
    created_at: datetime
    author: str
    comment: str | None


class RuleVersionText(RuleVersionOut):
    yaml: str


class VersionsOut(BaseModel):
    items: list[RuleVersionOut]
    total: int
    current: int | None


class DiffOut(BaseModel):
    a: int | None
    b: int | None
    diff: str


class StudyOut(BaseModel):
    study_instance_uid: str
    study_date: str | None
    study_description: str | None
    calling_aet: str | None
    first_received_at: datetime
    last_received_at: datetime
    routed_at: datetime | None
    n_series: int
    n_instances: int


class SeriesOut(BaseModel):
    series_instance_uid: str
    study_instance_uid: str
    series_number: Any = None
    series_description: str | None
    modality: str | None
    n_instances: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    version: int


class JobOut(FromRecord):
    id: int
    series_instance_uid: str
    study_instance_uid: str
    pipeline: str
    destinations: list[str]
    version: int
    state: JobState
    message: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EventOut(FromRecord):
    at: datetime
    from_state: JobState | None
    to_state: JobState
    message: str | None
    actor: str | None


class DeliveryOut(FromRecord):
    id: int
    job_id: int
    destination: str
    version: int
    outcome: DeliveryOutcome
    attempts: int
    message: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    study_instance_uid: str
    series_instance_uid: str


class DecisionOut(BaseModel):
    series_instance_uid: str
    decided_at: datetime
    selected: bool
    rule: str | None
    action: str
    rank: int | None
    reasons: list[str]


class JobDetailOut(BaseModel):
    job: JobOut
    events: list[EventOut]
    result: dict[str, Any] | None
    overlays: list[str] = Field(description="URLs of the overlay images (PNG rendered from the SC DICOM)")
    deliveries: list[DeliveryOut]
    decisions: list[DecisionOut]


class StudyDetailOut(BaseModel):
    study: StudyOut
    series: list[SeriesOut]
    jobs: list[JobOut]
    decisions: list[DecisionOut]


class PageOf(BaseModel):
    total: int
    limit: int
    offset: int


class StudiesPage(PageOf):
    items: list[StudyOut]


class JobsPage(PageOf):
    items: list[JobOut]


class DeliveriesPage(PageOf):
    items: list[DeliveryOut]


class AuditOut(FromRecord):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    before: Any = None
    after: Any = None


class AuditPage(PageOf):
    items: list[AuditOut]


class DestinationOut(BaseModel):
    name: str
    kind: str
    address: str
    deliveries: dict[str, int]


class ProbeOut(BaseModel):
    destination: str
    ok: bool
    message: str
    elapsed_s: float


class ResendAllIn(BaseModel):
    destination: str | None = Field(default=None, max_length=128)


class ResendAllOut(BaseModel):
    resent: list[int]


class UserOut(BaseModel):
    username: str
    role: Literal["admin", "viewer", "sender"]
    created_at: datetime
    has_token: bool


class UserIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=8, max_length=256)
    role: Literal["admin", "viewer", "sender"]


class TokenOut(BaseModel):
    username: str
    token: str = Field(description="shown once; send it as 'Authorization: Bearer TOKEN'")


class SummaryOut(BaseModel):
    jobs: dict[str, int]
    deliveries: dict[str, int]
    studies: int
    rules_version: int | None
    rules_source: str


# -- converters ----------------------------------------------------------------------------------------


def _attr(attrs: Any, key: str) -> Any:
    v = attrs.get(key) if attrs else None
    if isinstance(v, list | tuple):
        return "\\".join(str(x) for x in v)
    return v


def study_out(s: Study) -> StudyOut:
    return StudyOut(
        study_instance_uid=s.study_instance_uid,
        study_date=_str(_attr(s.attributes, "StudyDate")),
        study_description=_str(_attr(s.attributes, "StudyDescription")),
        calling_aet=s.calling_aet,
        first_received_at=s.first_received_at,
        last_received_at=s.last_received_at,
        routed_at=s.routed_at,
        n_series=s.n_series,
        n_instances=s.n_instances,
    )


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def series_out(s: Any) -> SeriesOut:
    return SeriesOut(
        series_instance_uid=s.series_instance_uid,
        study_instance_uid=s.study_instance_uid,
        series_number=_attr(s.attributes, "SeriesNumber"),
        series_description=_str(_attr(s.attributes, "SeriesDescription")),
        modality=s.modality,
        n_instances=s.n_instances,
        first_received_at=s.first_received_at,
        last_received_at=s.last_received_at,
        completed_at=s.completed_at,
        version=s.version,
    )


def job_out(j: Job) -> JobOut:
    return JobOut.model_validate(j)


def delivery_out(d: Delivery) -> DeliveryOut:
    return DeliveryOut.model_validate(d)


def decision_out(sd: Any) -> DecisionOut:
    d = sd.decision
    return DecisionOut(
        series_instance_uid=d.series_instance_uid,
        decided_at=sd.decided_at,
        selected=d.selected,
        rule=d.rule,
        action=d.action,
        rank=d.rank,
        reasons=list(d.reasons),
    )


def _problems_response(exc: ConfigError) -> JSONResponse:
    from dicomnode.web.rules import problems_of

    problems = [p.as_dict() for p in problems_of(exc)]
    return JSONResponse({"detail": str(exc), "problems": problems}, status_code=422)


def _not_found(exc: Exception) -> HTTPException:
    return HTTPException(404, str(exc))


# -- who am I ------------------------------------------------------------------------------------------


@router.get("/me", response_model=Me)
def me(user: AnyUser, request: Request) -> Me:
    """The authenticated user (and, for cookie sessions, the CSRF token to send in ``X-CSRF-Token``)."""
    return Me(
        username=user.username,
        role=user.role,
        auth=getattr(request.state, "auth", None),
        csrf_token=getattr(request.state, "csrf", None),
    )


@router.get("/summary", response_model=SummaryOut)
def summary(user: AnyUser, ctx: Ctx) -> SummaryOut:
    """Counts for the dashboard: jobs by state, deliveries by outcome, studies, rules in force."""
    cur = ctx.rules.current()
    return SummaryOut(
        jobs={k.value: v for k, v in ctx.store.job_counts().items()},
        deliveries={k.value: v for k, v in ctx.store.delivery_counts().items()},
        studies=ctx.store.list_studies(limit=1).total,
        rules_version=cur.version,
        rules_source=cur.source,
    )


# -- rules ---------------------------------------------------------------------------------------------


@router.get("/rules", response_model=RulesOut)
def get_rules(user: AnyUser, ctx: Ctx) -> RulesOut:
    """The routing rules in force (YAML) and where they come from."""
    cur = ctx.rules.current()
    return RulesOut(version=cur.version, source=cur.source, yaml=cur.text)


@router.put(
    "/rules",
    response_model=SavedRules,
    responses={422: {"description": "invalid rules; ``problems`` name rule, condition and field"}},
)
def put_rules(body: RulesIn, user: AdminUser, ctx: Ctx) -> Any:
    """Validate and save the rules as a new version; it applies to the next routed study (no restart)."""
    try:
        vid = ctx.rules.save(body.yaml, user.username, body.comment)
    except ConfigError as exc:
        return _problems_response(exc)
    return SavedRules(version=vid)


@router.post("/rules/validate", response_model=ValidateOut)
def validate_rules(body: ValidateIn, user: AnyUser, ctx: Ctx) -> ValidateOut:
    """Check rules text without saving; each problem names the rule, condition and field."""
    problems = ctx.rules.validate(body.yaml)
    return ValidateOut(valid=not problems, problems=[Problem(**p.as_dict()) for p in problems])


@router.post(
    "/rules/explain",
    response_model=ExplainOut,
    responses={404: {"description": "unknown study"}, 422: {"description": "invalid rules"}},
)
def explain_rules(body: ExplainIn, user: AnyUser, ctx: Ctx) -> Any:
    """Dry run: for each series of a received study, selected or not and every condition passed or failed.

    With ``rules`` the given YAML is used (nothing is saved); without, the rules in force.
    """
    try:
        rows = ctx.rules.explain(body.study_instance_uid, body.rules)
    except ConfigError as exc:
        return _problems_response(exc)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    version = None if body.rules is not None else ctx.rules.current().version
    return ExplainOut(
        study_instance_uid=body.study_instance_uid,
        rules_version=version,
        series=[SeriesDecision(**r) for r in rows],
    )


@router.get("/rules/versions", response_model=VersionsOut)
def rule_versions(user: AnyUser, ctx: Ctx, limit: Limit = 50, offset: Offset = 0) -> VersionsOut:
    """Saved rule versions, newest first."""
    page = ctx.store.list_rule_versions(limit=limit, offset=offset)
    return VersionsOut(
        items=[RuleVersionOut.model_validate(v) for v in page.items],
        total=page.total,
        current=ctx.rules.current().version,
    )


@router.get("/rules/versions/{version_id}", response_model=RuleVersionText)
def rule_version(version_id: IdPath, user: AnyUser, ctx: Ctx) -> RuleVersionText:
    """One saved version with its YAML."""
    try:
        v = ctx.store.get_rule_version(version_id)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    return RuleVersionText(
        id=v.id, created_at=v.created_at, author=v.author, comment=v.comment, yaml=v.yaml_text
    )


@router.get("/rules/diff", response_model=DiffOut)
def rules_diff(
    user: AnyUser,
    ctx: Ctx,
    a: Annotated[int, Query(ge=0, le=2**62, description="version id; 0 = base rules")] = 0,
    b: Annotated[int, Query(ge=0, le=2**62, description="version id; 0 = base rules")] = 0,
) -> DiffOut:
    """Unified diff between two versions."""
    try:
        return DiffOut(a=a or None, b=b or None, diff=ctx.rules.diff(a or None, b or None))
    except NotFoundError as exc:
        raise _not_found(exc) from None


@router.post("/rules/versions/{version_id}/rollback", response_model=SavedRules)
def rollback_rules(version_id: IdPath, user: AdminUser, ctx: Ctx) -> Any:
    """Put an earlier version back in force (saved as a new version)."""
    try:
        return SavedRules(version=ctx.rules.rollback(version_id, user.username))
    except NotFoundError as exc:
        raise _not_found(exc) from None
    except ConfigError as exc:  # e.g. names a destination that is no longer configured
        return _problems_response(exc)


# -- studies and jobs ----------------------------------------------------------------------------------


@router.get("/studies", response_model=StudiesPage)
def list_studies(user: AnyUser, ctx: Ctx, limit: Limit = 50, offset: Offset = 0) -> StudiesPage:
    """Received studies, most recent first."""
    page = ctx.store.list_studies(limit=limit, offset=offset)
    return StudiesPage(items=[study_out(s) for s in page.items], total=page.total, limit=limit, offset=offset)


@router.get("/studies/{study_instance_uid}", response_model=StudyDetailOut)
def get_study(
    study_instance_uid: Annotated[str, Path(max_length=64, pattern=UID_PATTERN)], user: AnyUser, ctx: Ctx
) -> StudyDetailOut:
    """A study with its series, jobs and routing decisions."""
    try:
        st = ctx.store.get_study(study_instance_uid)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    series = ctx.store.list_series(study_uid=study_instance_uid, limit=500).items
    jobs = ctx.store.list_jobs(study_uid=study_instance_uid, limit=500).items
    return StudyDetailOut(
        study=study_out(st),
        series=[series_out(s) for s in series],
        jobs=[job_out(j) for j in jobs],
        decisions=[decision_out(d) for d in ctx.store.decisions(study_instance_uid)],
    )


@router.get("/jobs", response_model=JobsPage)
def list_jobs(
    user: AnyUser,
    ctx: Ctx,
    state: Annotated[list[JobState] | None, Query()] = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobsPage:
    """Jobs, newest first; filter by state(s) and study."""
    page = ctx.store.list_jobs(state=state or None, study_uid=study_instance_uid, limit=limit, offset=offset)
    return JobsPage(items=[job_out(j) for j in page.items], total=page.total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobDetailOut)
def get_job(job_id: IdPath, user: AnyUser, ctx: Ctx) -> JobDetailOut:
    """A job: timeline, result (the numbers), overlay image URLs, deliveries, routing decisions."""
    try:
        d = ctx.store.job_detail(job_id)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    overlays = overlay_files(list(d.result.files)) if d.result else []
    return JobDetailOut(
        job=job_out(d.job),
        events=[EventOut.model_validate(e) for e in d.events],
        result=dict(d.result.result_json) if d.result else None,
        overlays=[f"/api/jobs/{job_id}/overlays/{i}.png" for i in range(len(overlays))],
        deliveries=[delivery_out(x) for x in d.deliveries],
        decisions=[
            decision_out(x)
            for x in d.decisions
            if x.decision.series_instance_uid == d.job.series_instance_uid
        ],
    )


@router.get(
    "/jobs/{job_id}/overlays/{index}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such job or image"}},
)
def job_overlay(
    job_id: IdPath,
    index: Annotated[int, Path(ge=0, le=1000)],
    user: AnyUser,
    ctx: Ctx,
) -> Response:
    """Overlay image ``index`` of a job's result, rendered from its secondary-capture DICOM to PNG."""
    result = ctx.store.get_result(job_id)
    files = overlay_files(list(result.files)) if result else []
    if index >= len(files):
        raise HTTPException(404, f"job {job_id} has no overlay image {index}")
    try:
        png = dicom_to_png(files[index])
    except InputError as exc:
        raise HTTPException(404, str(exc)) from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.post(
    "/jobs/{job_id}/rerun", response_model=JobOut, responses={409: {"description": "not re-runnable now"}}
)
def rerun_job(job_id: IdPath, user: AdminUser, ctx: Ctx) -> JobOut:
    """Analyse the job's series again (the job goes back to pending; the timeline and audit say who)."""
    try:
        return job_out(ctx.actions.rerun(job_id, user.username))
    except NotFoundError as exc:
        raise _not_found(exc) from None
    except InvalidTransitionError as exc:
        raise HTTPException(409, str(exc)) from None


# -- deliveries and destinations -----------------------------------------------------------------------


@router.get("/deliveries", response_model=DeliveriesPage)
def list_deliveries(
    user: AnyUser,
    ctx: Ctx,
    outcome: Annotated[list[DeliveryOutcome] | None, Query()] = None,
    destination: Annotated[str | None, Query(max_length=128)] = None,
    job_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> DeliveriesPage:
    """Deliveries, newest first; filter by outcome(s), destination, job."""
    page = ctx.store.list_deliveries(
        job_id=job_id, outcome=outcome or None, destination=destination, limit=limit, offset=offset
    )
    return DeliveriesPage(
        items=[delivery_out(d) for d in page.items], total=page.total, limit=limit, offset=offset
    )


@router.post(
    "/deliveries/{delivery_id}/resend",
    response_model=DeliveryOut,
    responses={404: {"description": "no such delivery"}},
)
def resend_delivery(delivery_id: IdPath, user: AdminUser, ctx: Ctx) -> DeliveryOut:
    """Send a delivery again (whatever its outcome); the delivery sweep picks it up."""
    try:
        return delivery_out(ctx.actions.resend(delivery_id, user.username))
    except NotFoundError as exc:
        raise _not_found(exc) from None
    except InvalidTransitionError as exc:
        raise HTTPException(409, str(exc)) from None


@router.post("/deliveries/resend-failed", response_model=ResendAllOut)
def resend_failed(body: ResendAllIn, user: AdminUser, ctx: Ctx) -> ResendAllOut:
    """Resend every permanently failed delivery (optionally of one destination)."""
    try:
        done = ctx.actions.resend_failed(user.username, body.destination)
    except InvalidTransitionError as exc:
        raise HTTPException(409, str(exc)) from None
    return ResendAllOut(resent=[d.id for d in done])


@router.get("/destinations", response_model=list[DestinationOut])
def destinations(user: AnyUser, ctx: Ctx) -> list[DestinationOut]:
    """Configured destinations with their delivery counts by outcome."""
    out = []
    for d in ctx.settings.destinations:
        address = f"{d.ae_title}@{d.host}:{d.port}" if d.kind == "dimse" else d.url
        counts = {
            o.value: ctx.store.list_deliveries(outcome=o, destination=d.name, limit=1).total
            for o in DeliveryOutcome
        }
        out.append(DestinationOut(name=d.name, kind=d.kind, address=address, deliveries=counts))
    return out


@router.post(
    "/destinations/{name}/test", response_model=ProbeOut, responses={404: {"description": "unknown"}}
)
def test_destination(name: Annotated[str, Path(max_length=128)], user: AdminUser, ctx: Ctx) -> ProbeOut:
    """C-ECHO a DIMSE destination, or probe a DICOMweb one."""
    try:
        r = ctx.actions.test_destination(name, user.username)
    except KeyError:
        raise HTTPException(404, f"no destination named {name!r}") from None
    return ProbeOut(destination=r.destination, ok=r.ok, message=r.message, elapsed_s=r.elapsed_s)


# -- audit and users -----------------------------------------------------------------------------------


@router.get("/audit", response_model=AuditPage)
def audit(
    user: AnyUser,
    ctx: Ctx,
    target: Annotated[str | None, Query(max_length=256)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> AuditPage:
    """Audit events (who, when, what, before and after), newest first."""
    page = ctx.store.list_audit(target=target, limit=limit, offset=offset)
    return AuditPage(
        items=[AuditOut.model_validate(e) for e in page.items],
        total=page.total,
        limit=limit,
        offset=offset,
    )


@router.get("/users", response_model=list[UserOut])
def users(user: AdminUser, ctx: Ctx) -> list[UserOut]:
    """Every user (admins only)."""
    return [
        UserOut(username=u.username, role=u.role, created_at=at, has_token=tok)
        for u, at, tok in ctx.users.list_users()
    ]


@router.post("/users", response_model=UserOut, status_code=201, responses={422: {"description": "invalid"}})
def create_user(body: UserIn, user: AdminUser, ctx: Ctx) -> UserOut:
    """Add a user (admins only; audited, without the password)."""
    if body.role not in ROLES:
        raise HTTPException(422, "unknown role")
    try:
        u = ctx.users.create(body.username, body.password, body.role)
    except InputError as exc:
        raise HTTPException(422, str(exc)) from None
    ctx.store.audit(user.username, "user.create", f"user:{u.username}", after={"role": u.role})
    for x, at, tok in ctx.users.list_users():
        if x.username == u.username:
            return UserOut(username=x.username, role=x.role, created_at=at, has_token=tok)
    raise HTTPException(500, "user vanished")  # pragma: no cover


@router.post(
    "/users/{username}/token", response_model=TokenOut, responses={404: {"description": "unknown user"}}
)
def new_token(username: Annotated[str, Path(max_length=64)], user: AdminUser, ctx: Ctx) -> TokenOut:
    """Issue a new API token for a user (replaces the previous one; shown once; audited)."""
    if ctx.users.get(username) is None:
        raise HTTPException(404, f"no user {username!r}")
    token = ctx.users.new_token(username)
    ctx.store.audit(user.username, "user.token", f"user:{username}", after={"token": "issued"})
    return TokenOut(username=username, token=token)
