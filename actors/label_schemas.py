"""The label service's typed shapes: its settings, its request bodies and its error body.

Request models are strict: unknown keys, coerced types (`"1"` for 1, `true` for 1) and NaN are
refused, and every refusal names the field (`labels[2].choice: ...`). A refusal of any kind is
an `ApiError`, which the app answers as `{"error": <code>, "detail": <what to do>}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


def error_response(err: ApiError) -> JSONResponse:
    """The JSON response of a refusal."""
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
