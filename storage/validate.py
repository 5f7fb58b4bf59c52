"""Input checks and canonical hashing shared by the ledger modules.

Every check raises ``InvalidInput`` whose message names where (``preferences[3]``), the field,
what was expected and what was given.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from storage.errors import InvalidInput

NAME_MAX = 200
IN_CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's parameter limits

T = TypeVar("T")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def fail(where: str, field: str, expected: str, value: Any) -> InvalidInput:
    """Build the error for a bad field (the caller raises it)."""
    return InvalidInput(f"{where}: field {field!r} must be {expected}; got {_show(value)}")


def text(value: Any, where: str, field: str, limit: int) -> str:
    """A non-empty string of at most ``limit`` characters."""
    if not isinstance(value, str) or not value:
        raise fail(where, field, "a non-empty string", value)
    if len(value) > limit:
        raise fail(where, field, f"at most {limit} characters (max_text_chars)", f"{len(value)}")
    return value


def name(value: Any, where: str, field: str) -> str:
    """A non-empty identifier-like string of at most 200 characters (labeler, worker, ...)."""
    return text(value, where, field, NAME_MAX)


def nonneg_int(value: Any, where: str, field: str) -> int:
    """An int >= 0 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise fail(where, field, "an integer >= 0", value)
    return value


def finite(value: Any, where: str, field: str) -> float:
    """A finite real number (NaN and +-inf are refused: SQLite would store NaN as NULL)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(where, field, "a finite number", value)
    return float(value)


def one_of(value: Any, allowed: Sequence[str], where: str, field: str) -> str:
    """One of ``allowed``."""
    if value not in allowed:
        raise fail(where, field, f"one of {list(allowed)}", value)
    return value


def json_object(value: Any, where: str, field: str) -> dict[str, Any]:
    """A JSON-serializable mapping with string keys and no NaN/inf."""
    try:
        dumped = canonical_json(dict(value))
    except (TypeError, ValueError) as exc:
        raise fail(where, field, f"a JSON object without NaN/inf ({exc})", value) from None
    return json.loads(dumped)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, NaN/inf refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_hex(data: str) -> str:
    """sha256 of a UTF-8 string, hex."""
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
