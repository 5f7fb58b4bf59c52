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
are ever sent; a revoked token is refused within a second (`label_service.AUTH_TTL_S`);
bodies over `max_body_bytes` get 413; request schemas are strict (unknown keys,
wrong types, NaN refused); each token has a token bucket (429 with Retry-After). Nothing is
unpickled, evaluated or fetched: bodies are JSON with ints and short strings. Every label,
skip and import call is audited (`ledger.audit`) with the sha256 of its body.

Routes are `async`. On SQLite they make their ledger calls on the event loop, one request at a
time (`LabelService.run`): each is a few indexed statements (~1 ms: a token the ledger
accepted is trusted for a second, /api/stats answers from recent counts, a label and its
audit row are one transaction). Sync routes ran in a thread pool, where three thread
hand-offs per request and GIL convoys among the route threads cost more than the calls: 16
annotators labeling back to back got 104 labels/s and a p99 of 221 ms that way, 218 labels/s
and 90 ms on the event loop, ~320 labels/s and ~38 ms with the three savings
(`bench/label_api.py`). The price: a ledger call that waits (SQLite's write lock held long by
another process) holds up every request for as long. On PostgreSQL a call mostly waits for
the server, so each request's calls run in a small pool of threads
(`LabelService.POOL_THREADS`), one hand-off per request.

The pieces: `label_schemas` (settings, request bodies, the error body), `label_gate` (bind
check, Host/Origin allowlist, body cap, security headers, rate limiter), `label_service` (what
each route does); this module wires them into a FastAPI app.

Example:
    >>> app = create_app(Ledger.open("sqlite:///run/ledger.sqlite"), "demo", LabelSettings())
    ... # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from actors.label_gate import LOOPBACK_NAMES, Gate, UnsafeBind, check_bind, host_name
from actors.label_schemas import ApiError, LabelSettings, error_response
from actors.label_service import LabelService
from storage.errors import LedgerError
from storage.ledger import Ledger
from storage.records import Annotator

__all__ = ["LabelSettings", "UnsafeBind", "create_app"]  # what callers of create_app need

STATIC = Path(__file__).resolve().parent / "static"


async def _service(request: Request) -> LabelService:
    return request.app.state.labels


async def _raw_body(request: Request) -> bytes:
    return await request.body()


async def _caller(
    service: Annotated[LabelService, Depends(_service)],
    authorization: Annotated[str | None, Header()] = None,
) -> Annotator:
    return service.caller(authorization)


Service = Annotated[LabelService, Depends(_service)]
Caller = Annotated[Annotator, Depends(_caller)]
Body = Annotated[bytes, Depends(_raw_body)]


api = APIRouter()


@api.get("/healthz")
async def healthz(service: Service) -> dict[str, Any]:
    """Liveness (no token needed)."""
    return {"ok": True, "campaign": service.campaign}


@api.get("/api/next")
async def next_comparison(service: Service, who: Caller) -> dict[str, Any]:
    """The caller's comparison (held or newly leased), or null when the queue is empty."""
    return await service.run(service.next_for, who)


@api.post("/api/labels")
async def submit_label(service: Service, who: Caller, body: Body,
                       idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Record a label; a replay of the same key and body answers the same."""
    result, replayed = await service.run(service.label, who, idempotency_key, body)
    return JSONResponse(result, headers={"Idempotent-Replayed": str(replayed).lower()})


@api.post("/api/skip")
async def skip(service: Service, who: Caller, body: Body) -> dict[str, Any]:
    """Put a comparison aside."""
    return await service.run(service.skip, who, body)


@api.post("/api/import")
async def import_labels(service: Service, who: Caller, body: Body) -> dict[str, Any]:
    """Admin: record a batch of human labels of the campaign's comparisons."""
    return await service.run(service.import_labels, who, body)


@api.get("/api/stats")
async def stats(service: Service, who: Caller) -> dict[str, Any]:
    """Queue and label counts."""
    return await service.run(service.stats, who)


def _static(name: str, media_type: str) -> Callable[[], Response]:
    body = (STATIC / name).read_bytes()
    return lambda: Response(body, media_type=media_type)


def _handlers(app: FastAPI) -> None:
    """Every refusal is JSON ``{"error", "detail"}``."""

    @app.exception_handler(ApiError)
    async def _refused(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [".".join(str(p) for p in e["loc"]) for e in exc.errors()]
        return error_response(ApiError(422, "invalid_request", f"invalid {', '.join(fields)}"))

    @app.exception_handler(LedgerError)
    async def _ledger(_: Request, exc: LedgerError) -> JSONResponse:
        return error_response(ApiError(503, "ledger_error", str(exc)))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, code, str(exc.detail)))


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
    bound = () if settings.host in ("0.0.0.0", "::", "") else (host_name(settings.host),)
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
