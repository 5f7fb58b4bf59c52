"""Annotators (label-API tokens), quarantines, the audit trail, and metrics.

Tokens are ``secrets.token_urlsafe(32)`` (256 bits); only their sha256 is stored, and the token
is returned once, at creation. Revoking a token stops new labels; a quarantine (an append-only
fact, per campaign and labeler id: AI labelers too) takes the labeler's preferences out of RM
training from the next snapshot on (see ``storage.snapshots``). The two are independent.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from storage import validate as v
from storage.errors import InvalidInput, UnknownId
from storage.models import ROLES, Audit, Metric, Quarantine
from storage.models import Annotator as AnnotatorRow
from storage.records import Annotator, AuditRow, MetricRow
from storage.snapshots import safe_max_id

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_NO_MATCH = "0" * 64


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


_ANNOTATOR = AnnotatorRow.__table__
_AUDIT = Audit.__table__
_METRIC = Metric.__table__
_QUARANTINE = Quarantine.__table__


@dataclass(frozen=True)
class QuarantineRow:
    """A labeler left out of RM training: snapshots above ``watermark`` drop its preferences.

    Attributes:
        id: Row id.
        labeler_id: The preferences' ``labeler_id`` (annotator name or AI labeler name).
        reason: Why, in one line (e.g. the audit's verdict).
        evidence: The numbers behind it (JSON object), e.g. disagreement rates and p-value.
        watermark: Highest preference id when it was recorded.
        created_at: When (naive UTC).
    """

    id: int
    labeler_id: str
    reason: str
    evidence: Mapping[str, Any]
    watermark: int
    created_at: datetime


def _annotator(row: Any) -> Annotator:
    return Annotator(row.id, row.name, row.role, row.created_at, row.revoked_at)


def add_annotator(conn: Connection, name: str, role: str, now: datetime) -> str:
    """Create an annotator and return its token (shown once; only its sha256 is kept)."""
    v.name(name, "add_annotator", "name")
    v.one_of(role, ROLES, "add_annotator", "role")
    taken = conn.execute(select(AnnotatorRow.id).where(AnnotatorRow.name == name)).scalar()
    if taken is not None:
        raise InvalidInput(f"add_annotator: name {name!r} is taken (annotator id {taken})")
    token = secrets.token_urlsafe(32)
    conn.execute(
        AnnotatorRow.__table__.insert().values(
            name=name, token_hash=_token_hash(token), role=role, created_at=now
        )
    )
    return token


def authenticate(conn: Connection, token: str) -> Annotator | None:
    """The live annotator holding ``token``, else None (unknown, malformed or revoked)."""
    if not isinstance(token, str) or not token:
        return None
    digest = _token_hash(token)
    row = conn.execute(select(_ANNOTATOR).where(_ANNOTATOR.c.token_hash == digest)).first()
    # The lookup is by a 256-bit hash of the token; the final check is constant-time anyway.
    stored = row.token_hash if row is not None else _NO_MATCH
    if not hmac.compare_digest(stored, digest) or row is None or row.revoked_at is not None:
        return None
    return _annotator(row)


def revoke_annotator(conn: Connection, name: str, now: datetime) -> Annotator:
    """Revoke an annotator's token (idempotent: a second revoke keeps the first time)."""
    conn.execute(
        update(AnnotatorRow)
        .where(AnnotatorRow.name == name, AnnotatorRow.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    row = conn.execute(select(_ANNOTATOR).where(_ANNOTATOR.c.name == name)).first()
    if row is None:
        raise UnknownId(f"revoke_annotator: annotator {name!r} does not exist")
    return _annotator(row)


def list_annotators(conn: Connection) -> list[Annotator]:
    """Every annotator, revoked ones included, by id."""
    rows = conn.execute(select(_ANNOTATOR).order_by(_ANNOTATOR.c.id))
    return [_annotator(row) for row in rows]


def _quarantine(row: Any) -> QuarantineRow:
    return QuarantineRow(
        row.id, row.labeler_id, row.reason, row.evidence, row.watermark, row.created_at
    )


def quarantine(
    conn: Connection,
    campaign_id: int,
    labeler_id: str,
    reason: str,
    evidence: Mapping[str, Any],
    now: datetime,
) -> tuple[QuarantineRow, bool]:
    """Quarantine ``labeler_id`` in the campaign; returns the row and whether it is new.

    Idempotent: a second quarantine of the same labeler returns the first row (its reason,
    evidence and watermark are kept). The watermark is read under the same lock as a
    snapshot's (``safe_max_id``), so no snapshot taken before can be above it.
    """
    v.name(labeler_id, "quarantine", "labeler_id")
    v.text(reason, "quarantine", "reason", 10_000)
    if not isinstance(evidence, Mapping):
        raise v.fail("quarantine", "evidence", "a JSON object (mapping)", evidence)
    evidence = v.json_object(evidence, "quarantine", "evidence")
    mine = (_QUARANTINE.c.campaign_id == campaign_id) & (_QUARANTINE.c.labeler_id == labeler_id)
    found = conn.execute(select(_QUARANTINE).where(mine)).first()
    if found is not None:
        return _quarantine(found), False
    conn.execute(
        _QUARANTINE.insert().values(
            campaign_id=campaign_id,
            labeler_id=labeler_id,
            reason=reason,
            evidence=evidence,
            watermark=safe_max_id(conn),
            created_at=now,
        )
    )
    return _quarantine(conn.execute(select(_QUARANTINE).where(mine)).one()), True


def quarantines(conn: Connection, campaign_id: int) -> list[QuarantineRow]:
    """The campaign's quarantines, oldest first."""
    query = select(_QUARANTINE).where(_QUARANTINE.c.campaign_id == campaign_id)
    return [_quarantine(row) for row in conn.execute(query.order_by(_QUARANTINE.c.id))]


def add_audit(conn: Connection, who: str, what: str, request_hash: str, now: datetime) -> int:
    """Append an audit row; ``request_hash`` is the sha256 (hex) of the request body."""
    v.name(who, "audit", "who")
    v.text(what, "audit", "what", 10_000)
    if not isinstance(request_hash, str) or not _SHA256_HEX.fullmatch(request_hash):
        raise v.fail("audit", "request_hash", "64 lowercase hex characters (sha256)", request_hash)
    result = conn.execute(
        Audit.__table__.insert().values(
            who=who, what=what, request_hash=request_hash, created_at=now
        )
    )
    return int(result.inserted_primary_key[0])


def audit_log(conn: Connection, limit: int) -> list[AuditRow]:
    """The newest ``limit`` audit rows, newest first."""
    limit = v.nonneg_int(limit, "audit", "limit")
    query = select(_AUDIT).order_by(_AUDIT.c.id.desc()).limit(limit)
    return [
        AuditRow(a.id, a.who, a.what, a.request_hash, a.created_at) for a in conn.execute(query)
    ]


def log_metrics(
    conn: Connection, campaign_id: int, iteration: int, values: Mapping[str, float], now: datetime
) -> int:
    """Append one row per key; returns how many."""
    v.nonneg_int(iteration, "log_metrics", "iteration")
    rows = [
        {
            "campaign_id": campaign_id,
            "iteration": iteration,
            "key": v.name(key, "log_metrics", "key"),
            "value": v.finite(value, "log_metrics", f"values[{key!r}]"),
            "created_at": now,
        }
        for key, value in values.items()
    ]
    if rows:
        conn.execute(Metric.__table__.insert(), rows)
    return len(rows)


def metrics(conn: Connection, campaign_id: int, key: str | None) -> list[MetricRow]:
    """Metrics by iteration then key; when a key was logged twice for an iteration, the latest."""
    query = select(_METRIC).where(_METRIC.c.campaign_id == campaign_id).order_by(_METRIC.c.id)
    if key is not None:
        query = query.where(_METRIC.c.key == key)
    latest: dict[tuple[int, str], MetricRow] = {}
    for m in conn.execute(query):
        latest[(m.iteration, m.key)] = MetricRow(m.iteration, m.key, m.value, m.created_at)
    return [latest[k] for k in sorted(latest)]
