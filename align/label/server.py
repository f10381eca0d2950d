"""The labeling web app (FastAPI): one self-contained page for people, a JSON API for the page, the
automatic labeler and admins.

Every /api request needs ``Authorization: Bearer TOKEN`` (a token from `align label add-labeler`);
the pages (``GET /`` for labelers, ``GET /admin`` for admins) are static shells with no data that ask
for the token in a login form and keep it in sessionStorage; the admin view's data comes from an
admin route, so it takes the token of a labeler created with ``--admin``. Status codes: 401 missing or unknown token (checked before anything
else, so an anonymous request learns nothing about routes or bodies), 403 another labeler's label, a
pair not assigned to you or an admin route, 404 no such thing, 409 a taken name or round number,
422 a malformed body or query. A request either succeeds or writes nothing (each write is one
store transaction).

    GET  /api/me                       {"name", "admin"}
    GET  /api/pairs/next?limit=&round= {"pairs": [...], "progress": {...}}  (claims free slots; each
                                       pair with "html": its prompt turns and responses as safe HTML)
    POST /api/labels                   LabelIn -> the stored label (resubmitting replaces it; 409 in a closed round)
    POST /api/labels/undo              {"label", "pair", "progress"}: deletes my latest label of an open round
    GET  /api/labels?round=            my labels
    GET  /api/labels/{id}              one of my labels
    GET  /api/progress                 {"labeled", "assigned", "available"}
    POST /api/admin/rounds             RoundIn -> 201 {"round", "pairs"}
    GET  /api/admin/rounds             every round with its counts
    GET  /api/admin/quality            every round with its counts and agreement figures (the admin view)
    GET  /api/admin/rounds/{n}/export  {"records", "agreement", "stats"} (?ties=&skips=&drop_unsafe_chosen=&seed=)
    POST /api/admin/labelers           {"name", "admin"} -> 201 {"name", "token"} (the token, once)
"""

from __future__ import annotations

from typing import Literal, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from align.data.schema import CATEGORIES, RATINGS
from align.label.config import SKIP_POLICIES, TIE_POLICIES
from align.label.export import ExportPolicy, resolve_round
from align.label.markdown import render
from align.label.page import ADMIN_PAGE, PAGE
from align.label.store import (
    CHOICES,
    Conflict,
    Forbidden,
    InvalidInput,
    LabelerInfo,
    LabelStore,
    NotFound,
    StoreError,
    check_label,
    check_pair,
)

STATUS = {InvalidInput: 422, NotFound: 404, Forbidden: 403, Conflict: 409}
# The page may run its own inline script and style and call this origin's API, and load nothing else.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelIn(_Strict):
    """A label of one pair. a|b need a rating; tie|skip take none; a|b|tie need both safety flags."""

    pair_id: StrictInt
    choice: Literal[CHOICES]
    rating: Optional[Literal[RATINGS]] = None
    a_safe: Optional[StrictBool] = None
    b_safe: Optional[StrictBool] = None

    @model_validator(mode="after")
    def _consistent(self):
        try:
            check_label(self.choice, self.rating, self.a_safe, self.b_safe)
        except InvalidInput as e:
            raise ValueError(str(e)) from None
        return self


class MessageIn(_Strict):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class PairIn(_Strict):
    prompt: list[MessageIn] = Field(min_length=1)
    response_a: StrictStr
    response_b: StrictStr
    settings_a: dict = Field(default_factory=dict)
    settings_b: dict = Field(default_factory=dict)
    category: Literal[CATEGORIES] = "helpfulness"
    source: StrictStr = Field("", max_length=200)

    @model_validator(mode="after")
    def _valid_pair(self):
        try:
            check_pair(self.model_dump(), "pair")
        except InvalidInput as e:
            raise ValueError(str(e)) from None
        return self


class RoundIn(_Strict):
    round: Optional[StrictInt] = Field(None, ge=1, description="round number; none = one after the highest")
    labels_per_pair: StrictInt = Field(1, ge=1, le=16)
    assign_to: Optional[list[StrictStr]] = Field(
        None, description="labeler names; none = every non-admin labeler, [] = claimed on demand"
    )
    settings: dict = Field(default_factory=dict)
    pairs: list[PairIn] = Field(min_length=1)


class LabelerIn(_Strict):
    name: StrictStr
    admin: StrictBool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        from align.label.store import NAME_RE

        if not NAME_RE.match(v):
            raise ValueError("use 1-64 letters, digits or _ . @ -")
        return v


def _bearer(request: Request) -> Optional[str]:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def with_html(pair: dict) -> dict:
    """The pair with ``html``: its prompt turns and both responses rendered by `markdown.render`."""
    return {
        **pair,
        "html": {
            "prompt": [render(m["content"]) for m in pair["prompt"]],
            "response_a": render(pair["response_a"]),
            "response_b": render(pair["response_b"]),
        },
    }


def create_app(store: LabelStore) -> FastAPI:
    """The app serving ``store``. Sync routes run in the server's thread pool; the store is thread-safe."""
    app = FastAPI(title="align label", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        # Before routing and body parsing: a request without a valid token gets 401 and nothing else.
        if request.url.path.startswith("/api"):
            token = _bearer(request)
            who = await run_in_threadpool(store.authenticate, token) if token else None
            if who is None:
                detail = "missing bearer token" if token is None else "invalid token"
                return JSONResponse(
                    {"detail": f"{detail}: send Authorization: Bearer <token> (from `align label add-labeler`)"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            request.state.labeler = who
        return await call_next(request)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        return JSONResponse({"detail": str(exc)}, status_code=STATUS.get(type(exc), 400))

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes the bad input, which may be a non-finite float (1e400 parses as
        # inf) that JSON cannot hold: it answered 500. The location and message say enough.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    def me(request: Request) -> LabelerInfo:
        return request.state.labeler

    def admin(who: LabelerInfo = Depends(me)) -> LabelerInfo:
        if not who.is_admin:
            raise Forbidden("admin route: your token is not an admin's")
        return who

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store", "Content-Security-Policy": CSP})

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    def admin_page():
        return HTMLResponse(ADMIN_PAGE, headers={"Cache-Control": "no-store", "Content-Security-Policy": CSP})

    @app.get("/api/me")
    def whoami(who: LabelerInfo = Depends(me)):
        return {"name": who.name, "admin": who.is_admin}

    @app.get("/api/pairs/next")
    def next_pairs(
        who: LabelerInfo = Depends(me), limit: int = Query(1, ge=1, le=256), round: Optional[int] = Query(None, ge=1)
    ):
        pairs = store.next_pairs(who.id, limit=limit, round=round)
        return {"pairs": [with_html(p) for p in pairs], "progress": store.progress(who.id)}

    @app.post("/api/labels")
    def post_label(body: LabelIn, who: LabelerInfo = Depends(me)):
        return store.submit_label(who.id, body.pair_id, body.choice, body.rating, body.a_safe, body.b_safe)

    @app.post("/api/labels/undo")
    def undo(who: LabelerInfo = Depends(me)):
        out = store.undo_last(who.id)
        return {"label": out["label"], "pair": with_html(out["pair"]), "progress": store.progress(who.id)}

    @app.get("/api/labels")
    def my_labels(who: LabelerInfo = Depends(me), round: Optional[int] = Query(None, ge=1)):
        return {"labels": store.labels_of(who.id, round)}

    @app.get("/api/labels/{label_id}")
    def get_label(label_id: int, who: LabelerInfo = Depends(me)):
        return store.get_label(label_id, who)

    @app.get("/api/progress")
    def progress(who: LabelerInfo = Depends(me)):
        return store.progress(who.id)

    @app.post("/api/admin/rounds", status_code=201)
    def create_round(body: RoundIn, who: LabelerInfo = Depends(admin)):
        pairs = [p.model_dump() for p in body.pairs]
        number = store.create_round(
            pairs,
            number=body.round,
            labels_per_pair=body.labels_per_pair,
            assign_to=body.assign_to,
            settings=body.settings,
        )
        return {"round": number, "pairs": len(pairs)}

    @app.get("/api/admin/rounds")
    def list_rounds(who: LabelerInfo = Depends(admin)):
        return {"rounds": store.rounds()}

    @app.get("/api/admin/quality")
    def quality(who: LabelerInfo = Depends(admin)):
        from align.label.report import round_quality

        return {"rounds": round_quality(store)}

    @app.get("/api/admin/rounds/{number}/export")
    def export(
        number: int,
        who: LabelerInfo = Depends(admin),
        ties: Literal[TIE_POLICIES] = ExportPolicy.ties,
        skips: Literal[SKIP_POLICIES] = ExportPolicy.skips,
        drop_unsafe_chosen: bool = ExportPolicy.drop_unsafe_chosen,
        seed: int = 0,
    ):
        policy = ExportPolicy(ties=ties, skips=skips, drop_unsafe_chosen=drop_unsafe_chosen, seed=seed)
        records, rows, stats = resolve_round(store.round_pairs(number), number, policy)
        return {"records": records, "agreement": rows, "stats": stats}

    @app.post("/api/admin/labelers", status_code=201)
    def add_labeler(body: LabelerIn, who: LabelerInfo = Depends(admin)):
        return {"name": body.name, "token": store.add_labeler(body.name, body.admin)}

    return app


def serve(db: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app on ``host:port`` until interrupted."""
    import uvicorn

    store = LabelStore.open(db)
    try:
        uvicorn.run(create_app(store), host=host, port=port, log_level="info")
    finally:
        store.close()
