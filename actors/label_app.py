"""The human label service: a FastAPI app over the ledger (no Ray; `label_server.py` hosts it).

    GET  /               the label page (static/label.html, label.js, label.css); no token needed
    GET  /healthz        liveness; no token needed
    GET  /api/next       this annotator's comparison: the one it holds, else a new lease
                         (owner = the annotator's name)
    POST /api/labels     {"comparison_id", "choice"} with an `Idempotency-Key` header
    POST /api/skip       {"comparison_id"}: put it aside; its lease runs out, then it is requeued
    POST /api/import     admin: {"labels": [{"comparison_id", "choice", "annotator"}, ...]}
    GET  /api/stats      comparisons by status, labels by kind, effective human labels by annotator

Every /api/ call carries `Authorization: Bearer <token>` (`prefloop annotators add NAME`).
Errors are JSON `{"error": <code>, "detail": <what is wrong and what to do>}`.

Security: the bind is loopback unless at least one annotator token is live (`check_bind`);
requests whose Host is not a loopback name, the bound host or an allowed host get 403, so do
cross-origin requests (an `Origin` that is neither the page's own nor allowed); no CORS headers
are ever sent; bodies over `max_body_bytes` get 413; request schemas are strict (unknown keys,
wrong types, NaN refused); each token has a token bucket (429 with Retry-After). Nothing is
unpickled, evaluated or fetched: bodies are JSON with ints and short strings. Every label,
skip and import call is audited (`ledger.audit`) with the sha256 of its body.

Example:
    >>> app = create_app(Ledger.open("sqlite:///run/ledger.sqlite"), "demo", LabelSettings())
    ... # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from storage.errors import DuplicateLabel, IdempotencyConflict, LeaseLost, LedgerError, UnknownId
from storage.ledger import Ledger
from storage.models import utcnow
from storage.records import Annotator, Claim, NewPreference

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class LabelSettings:
    """How the label service binds, whom it serves and how fast."""

    host: str = "127.0.0.1"
    """Interface to bind; anything but loopback needs at least one live annotator token."""
    port: int = 8765
    """TCP port (0: any free port)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host-header names served besides the loopback names and `host` (e.g. a DNS name)."""
    allowed_origins: tuple[str, ...] = ()
    """Origins (`https://name[:port]`) allowed besides the page's own."""
    lease_s: float = 300.0
    """Lease on a comparison shown to an annotator; it returns to the queue after this."""
    rate_per_s: float = 5.0
    """Sustained requests per second per token."""
    burst: int = 30
    """Requests a token may make at once before the rate applies."""
    max_body_bytes: int = 65_536
    """Largest request body (413 beyond)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise ValueError(f"label server: port must be 0..65535; got {self.port}")
        for name in ("lease_s", "rate_per_s", "burst", "max_body_bytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"label server: {name} must be > 0; got {value!r}")


class UnsafeBind(ValueError):
    """A non-loopback bind was asked for while no annotator token is live."""


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP literals (`127.0.0.0/8`, `::1`)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, ledger: Ledger) -> None:
    """Refuse to serve beyond loopback while the ledger holds no live annotator token.

    Raises:
        UnsafeBind: ``host`` is not loopback and every annotator is revoked (or none exists).
    """
    if is_loopback(host):
        return
    if not any(a.revoked_at is None for a in ledger.list_annotators()):
        raise UnsafeBind(
            f"refusing to bind the label service to {host!r}: it is not a loopback address and "
            "the ledger has no live annotator token, so anyone who can reach it could label. "
            "Create one with `prefloop annotators add NAME`, or bind 127.0.0.1"
        )


# -- request schemas ------------------------------------------------------------------------

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
"""Request models: unknown keys, coerced types (`"1"` for 1, `true` for 1) and NaN refused."""
ComparisonId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Choice = Literal["a", "b", "tie"]
AnnotatorName = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[\w.@:+-]([\w.@:+ -]*[\w.@:+-])?$")
]


class LabelRequest(BaseModel):
    """One label by the calling annotator."""

    model_config = STRICT
    comparison_id: ComparisonId
    choice: Choice


class SkipRequest(BaseModel):
    """A comparison the calling annotator puts aside."""

    model_config = STRICT
    comparison_id: ComparisonId


class ImportedLabel(BaseModel):
    """A human label of a comparison already in the campaign (bulk import)."""

    model_config = STRICT
    comparison_id: ComparisonId
    choice: Choice
    annotator: AnnotatorName
    strength: Annotated[float, Field(ge=-1e6, le=1e6)] | None = None


class ImportRequest(BaseModel):
    """A batch of imported labels: all are recorded, or none."""

    model_config = STRICT
    labels: Annotated[list[ImportedLabel], Field(min_length=1, max_length=1000)]


def validation_problems(exc: ValidationError, whole: str = "body") -> list[tuple[str, str]]:
    """``(field path, what was expected)`` per error, e.g. ``("labels[2].choice", ...)``; an
    error about the whole object is named ``whole``."""
    out = []
    for err in exc.errors(include_url=False):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        message = err["msg"]
        if err["loc"] and err["type"] not in ("missing", "extra_forbidden"):
            shown = repr(err.get("input"))
            message += f"; got {shown if len(shown) <= 60 else shown[:57] + '...'}"
        out.append((path.lstrip(".") or whole, message))
    return out


# -- errors ---------------------------------------------------------------------------------


class ApiError(Exception):
    """A refusal that becomes `{"error": code, "detail": detail}` with ``status``."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def _error_response(err: ApiError) -> JSONResponse:
    body = {"error": err.code, "detail": err.detail}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def parse(model: type[M], raw: bytes) -> M:
    """Validate a JSON body strictly.

    Raises:
        ApiError: 422 naming every bad field.
    """
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        detail = "; ".join(f"{field}: {msg}" for field, msg in problems)
        raise ApiError(422, "invalid_request", detail) from None


def _ledger_refusal(exc: LedgerError, what: str) -> ApiError:
    """The HTTP form of a ledger refusal (``what``: the caller's own wording of it)."""
    text = re.sub(r"^preferences\[(\d+)\]: ", lambda m: f"labels[{m[1]}]: ", str(exc))
    if isinstance(exc, UnknownId):
        return ApiError(404, "unknown_comparison", text)
    if isinstance(exc, IdempotencyConflict):
        return ApiError(409, "idempotency_conflict", what or text)
    if isinstance(exc, LeaseLost):
        return ApiError(409, "lease_lost", what or text)
    if isinstance(exc, DuplicateLabel):
        return ApiError(409, "duplicate_label", text)
    return ApiError(422, "invalid_request", text)


# -- the request gate -----------------------------------------------------------------------


class TokenBucket:
    """Per-key token buckets: ``burst`` requests at once, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[Any, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: Any) -> float:
        """Take a token for ``key``: 0.0 when granted, else seconds until one is available."""
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0


class _BodyTooLarge(Exception):
    pass


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Gate:
    """ASGI middleware run before any route: Host allowlist, Origin check, body cap, headers."""

    def __init__(self, app: Any, hosts: frozenset[str], origins: frozenset[str], max_body: int):
        self.app, self.hosts, self.origins, self.max_body = app, hosts, origins, max_body

    def _refusal(self, headers: Headers) -> ApiError | None:
        host = headers.get("host", "")
        if _host_name(host) not in self.hosts:
            return ApiError(403, "forbidden_host", f"Host {host[:100]!r} is not served here")
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            scheme, _, netloc = origin.partition("://")
            if scheme not in ("http", "https") or netloc.lower() != host.lower():
                return ApiError(403, "forbidden_origin", f"cross-origin request from "
                                f"{origin[:100]!r} refused; open the page served here instead")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return ApiError(413, "body_too_large", f"request body over {self.max_body} bytes")
        return None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                         if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        refusal = self._refusal(Headers(scope=scope))
        if refusal is not None:
            return await _error_response(refusal)(scope, receive, send_with_headers)
        seen = 0

        async def capped_receive() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, capped_receive, send_with_headers)
        except _BodyTooLarge:
            if started:
                raise
            too_large = ApiError(413, "body_too_large", f"request body over {self.max_body} bytes")
            await _error_response(too_large)(scope, receive, send_with_headers)


# -- the service ----------------------------------------------------------------------------


class LabelService:
    """What the routes do, over one ledger and campaign (thread-safe; routes run in a pool)."""

    def __init__(self, ledger: Ledger, campaign: str, settings: LabelSettings) -> None:
        self.ledger, self.campaign, self.settings = ledger, campaign, settings
        self.bucket = TokenBucket(settings.rate_per_s, settings.burst)
        self._held: dict[str, Claim] = {}  # the comparison each annotator is looking at
        self._lock = threading.Lock()

    def caller(self, authorization: str | None) -> Annotator:
        """The live annotator behind an `Authorization: Bearer` header, rate-limited."""
        if authorization is None:
            raise ApiError(401, "missing_token", "send `Authorization: Bearer <token>`; "
                           "an admin creates tokens with `prefloop annotators add NAME`",
                           {"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 256:
            raise ApiError(401, "malformed_token", "the Authorization header must be "
                           "`Bearer <token>`", {"WWW-Authenticate": "Bearer"})
        who = self.ledger.authenticate(token)
        if who is None:
            raise ApiError(401, "invalid_token", "the token is unknown or revoked; ask an "
                           "admin for a new one", {"WWW-Authenticate": "Bearer"})
        wait = self.bucket.take(who.id)
        if wait > 0:
            retry = math.ceil(wait)
            raise ApiError(429, "rate_limited", f"too many requests for annotator {who.name!r}; "
                           f"retry in {retry} s", {"Retry-After": str(retry)})
        return who

    def audit(self, who: Annotator, what: str, raw: bytes) -> None:
        """Append an audit row with the sha256 of the request body."""
        self.ledger.audit(who.name, what, hashlib.sha256(raw).hexdigest())

    def next_for(self, who: Annotator) -> dict[str, Any]:
        """The comparison ``who`` holds if its lease has over half its time left, else a new one."""
        with self._lock:
            held = self._held.get(who.name)
        fresh_until = utcnow() + timedelta(seconds=self.settings.lease_s / 2)
        if held is None or held.expires_at < fresh_until:
            claims = self.ledger.claim(self.campaign, who.name, 1, self.settings.lease_s)
            held = claims[0] if claims else None
            with self._lock:
                if held is None:
                    self._held.pop(who.name, None)
                else:
                    self._held[who.name] = held
        remaining = self.ledger.comparison_counts(self.campaign).pending
        if held is None:
            return {"comparison": None, "remaining": remaining}
        shown = {"id": held.comparison_id, "prompt": held.prompt, "response_a": held.text_a,
                 "response_b": held.text_b, "expires_at": held.expires_at.isoformat() + "Z",
                 "attempt": held.attempt}
        return {"comparison": shown, "remaining": remaining}

    def _let_go(self, who: Annotator, comparison_id: int) -> None:
        with self._lock:
            held = self._held.get(who.name)
            if held is not None and held.comparison_id == comparison_id:
                del self._held[who.name]

    def label(self, who: Annotator, key: str | None, raw: bytes) -> tuple[dict[str, Any], bool]:
        """Record ``who``'s label; returns the result and whether it was a replay."""
        where = f"label campaign={self.campaign!r} key={(key or '')[:100]!r}"
        try:
            if key is None or not _KEY.fullmatch(key):
                raise ApiError(400, "bad_idempotency_key", "send an `Idempotency-Key` header of "
                               "1-100 characters from A-Z a-z 0-9 _ . : - (new for each label)")
            req = parse(LabelRequest, raw)
            pref = NewPreference(req.comparison_id, req.choice, "human", who.name,
                                 idempotency_key=f"label-api:{who.id}:{key}")
            try:
                rec = self.ledger.record_preference(self.campaign, pref, lease_owner=who.name)
            except LedgerError as exc:
                raise _ledger_refusal(exc, {
                    IdempotencyConflict: f"Idempotency-Key {key!r} was already used for a "
                    "different label; send a new key for a new label",
                    LeaseLost: f"comparison {req.comparison_id} is not leased to you (the lease "
                    "expired or was never yours); GET /api/next for work",
                }.get(type(exc), "")) from None
        except ApiError as err:
            self.audit(who, f"{where} -> refused {err.status} {err.code}", raw)
            raise
        self._let_go(who, req.comparison_id)
        state = "created" if rec.created else "replayed"
        self.audit(who, f"{where} comparison={req.comparison_id} choice={req.choice} -> "
                   f"preference {rec.id} {state}", raw)
        result = {"preference_id": rec.id, "comparison_id": req.comparison_id,
                  "choice": req.choice}
        return result, not rec.created

    def skip(self, who: Annotator, raw: bytes) -> dict[str, Any]:
        """Stop showing a comparison to ``who`` (it stays leased until the lease runs out)."""
        req = parse(SkipRequest, raw)
        self._let_go(who, req.comparison_id)
        self.audit(who, f"skip campaign={self.campaign!r} comparison={req.comparison_id}", raw)
        return {"skipped": req.comparison_id}

    def import_labels(self, who: Annotator, raw: bytes) -> dict[str, Any]:
        """Admin only: record human labels of existing comparisons, all or none."""
        where = f"import campaign={self.campaign!r}"
        try:
            if who.role != "admin":
                raise ApiError(403, "admin_only", f"annotator {who.name!r} has role "
                               f"{who.role!r}; importing labels needs an admin token")
            req = parse(ImportRequest, raw)
            prefs = [NewPreference(x.comparison_id, x.choice, "human", x.annotator, x.strength)
                     for x in req.labels]
            try:
                recs = self.ledger.record_preferences(self.campaign, prefs)
            except LedgerError as exc:
                raise _ledger_refusal(exc, "") from None
        except ApiError as err:
            self.audit(who, f"{where} -> refused {err.status} {err.code}", raw)
            raise
        created = sum(r.created for r in recs)
        self.audit(who, f"{where} labels={len(recs)} -> created {created}", raw)
        return {"created": created, "existing": len(recs) - created,
                "preference_ids": [r.id for r in recs]}

    def stats(self, who: Annotator) -> dict[str, Any]:
        """Queue counts, labels by kind, and effective human labels per annotator (admins see
        everyone; an annotator sees itself)."""
        counts = self.ledger.comparison_counts(self.campaign)
        human = self.ledger.snapshot(self.campaign, kinds=("human",))
        per = Counter(row.labeler_id for row in human.rows)
        mine = {who.name: per[who.name]}
        return {
            "campaign": self.campaign,
            "comparisons": {"pending": counts.pending, "claimed": counts.claimed,
                            "labeled": counts.labeled},
            "labels_by_kind": self.ledger.label_counts(self.campaign),
            "by_annotator": dict(sorted(per.items())) if who.role == "admin" else mine,
            "you": {"name": who.name, "role": who.role, "labeled": per[who.name]},
        }


# -- the app --------------------------------------------------------------------------------


def _service(request: Request) -> LabelService:
    return request.app.state.labels


async def _raw_body(request: Request) -> bytes:
    return await request.body()


def _caller(
    service: Annotated[LabelService, Depends(_service)],
    authorization: Annotated[str | None, Header()] = None,
) -> Annotator:
    return service.caller(authorization)


Service = Annotated[LabelService, Depends(_service)]
Caller = Annotated[Annotator, Depends(_caller)]
Body = Annotated[bytes, Depends(_raw_body)]


api = APIRouter()


@api.get("/healthz")
def healthz(service: Service) -> dict[str, Any]:
    """Liveness (no token needed)."""
    return {"ok": True, "campaign": service.campaign}


@api.get("/api/next")
def next_comparison(service: Service, who: Caller) -> dict[str, Any]:
    """The caller's comparison (held or newly leased), or null when the queue is empty."""
    return service.next_for(who)


@api.post("/api/labels")
def submit_label(service: Service, who: Caller, body: Body,
                 idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Record a label; a replay of the same key and body answers the same."""
    result, replayed = service.label(who, idempotency_key, body)
    return JSONResponse(result, headers={"Idempotent-Replayed": str(replayed).lower()})


@api.post("/api/skip")
def skip(service: Service, who: Caller, body: Body) -> dict[str, Any]:
    """Put a comparison aside."""
    return service.skip(who, body)


@api.post("/api/import")
def import_labels(service: Service, who: Caller, body: Body) -> dict[str, Any]:
    """Admin: record a batch of human labels of the campaign's comparisons."""
    return service.import_labels(who, body)


@api.get("/api/stats")
def stats(service: Service, who: Caller) -> dict[str, Any]:
    """Queue and label counts."""
    return service.stats(who)


def _static(name: str, media_type: str) -> Callable[[], Response]:
    body = (STATIC / name).read_bytes()
    return lambda: Response(body, media_type=media_type)


def _handlers(app: FastAPI) -> None:
    """Every refusal is JSON ``{"error", "detail"}``."""

    @app.exception_handler(ApiError)
    async def _refused(_: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [".".join(str(p) for p in e["loc"]) for e in exc.errors()]
        return _error_response(ApiError(422, "invalid_request", f"invalid {', '.join(fields)}"))

    @app.exception_handler(LedgerError)
    async def _ledger(_: Request, exc: LedgerError) -> JSONResponse:
        return _error_response(ApiError(503, "ledger_error", str(exc)))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail)))


def create_app(ledger: Ledger, campaign: str, settings: LabelSettings) -> FastAPI:
    """The label app for ``campaign``.

    Raises:
        UnsafeBind: ``settings.host`` is not loopback and no annotator token is live.
        UnknownId: the campaign does not exist.
    """
    check_bind(settings.host, ledger)
    ledger.get_campaign(campaign)
    app = FastAPI(title="prefloop label service", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.labels = LabelService(ledger, campaign, settings)
    bound = () if settings.host in ("0.0.0.0", "::", "") else (_host_name(settings.host),)
    hosts = frozenset({*LOOPBACK_NAMES, *bound, *(h.lower() for h in settings.allowed_hosts)})
    app.add_middleware(Gate, hosts=hosts, origins=frozenset(settings.allowed_origins),
                       max_body=settings.max_body_bytes)
    _handlers(app)
    for path, name, media_type in (("/", "label.html", "text/html"),
                                   ("/label.js", "label.js", "text/javascript"),
                                   ("/label.css", "label.css", "text/css")):
        app.get(path, include_in_schema=False)(_static(name, f"{media_type}; charset=utf-8"))
    app.include_router(api)
    return app
