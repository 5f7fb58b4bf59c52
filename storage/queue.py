"""The label queue: pending comparisons leased to labelers, with expiry.

A comparison is *claimable* while it is pending and has no live lease (never leased, released,
or expired). PostgreSQL claims with ``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent
claimers never wait on or double-lease a row; SQLite serializes claimers with ``BEGIN
IMMEDIATE``. Recording a preference with ``lease_owner`` re-checks the lease under a row lock
(fencing), so a labeler whose lease expired and was re-claimed cannot label twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, and_, case, func, or_, select, update
from sqlalchemy.orm import aliased

from storage import validate as v
from storage.models import Comparison, Generation, Prompt
from storage.records import Claim, ComparisonCounts


def _claimable(campaign_id: int, now: datetime):
    return and_(
        Comparison.campaign_id == campaign_id,
        Comparison.status == "pending",
        or_(Comparison.lease_expires_at.is_(None), Comparison.lease_expires_at < now),
    )


def claim(
    conn: Connection, campaign_id: int, owner: str, n: int, lease_s: float, now: datetime
) -> list[Claim]:
    """Lease up to ``n`` claimable comparisons (highest priority first, then oldest)."""
    v.name(owner, "claim", "owner")
    v.nonneg_int(n, "claim", "n")
    if v.finite(lease_s, "claim", "lease_s") <= 0:
        raise v.fail("claim", "lease_s", "> 0 seconds", lease_s)
    pick = (
        select(Comparison.id)
        .where(_claimable(campaign_id, now))
        .order_by(Comparison.priority.desc(), Comparison.id)
        .limit(n)
        .with_for_update(skip_locked=True)
    )
    ids = list(conn.execute(pick).scalars())
    if not ids:
        return []
    expires = now + timedelta(seconds=lease_s)
    conn.execute(
        update(Comparison)
        .where(Comparison.id.in_(ids))
        .values(lease_owner=owner, lease_expires_at=expires, lease_count=Comparison.lease_count + 1)
    )
    query = _with_texts().where(Comparison.id.in_(ids))
    return [
        Claim(cid, pid, prompt, a, text_a, b, text_b, owner, expires, attempt)
        for cid, pid, prompt, a, text_a, b, text_b, attempt, _ in conn.execute(query)
    ]


def _with_texts() -> Select[Any]:
    """Comparisons with the texts of a ``Claim`` and their lease expiry, in claim order."""
    gen_a, gen_b = aliased(Generation), aliased(Generation)
    return (
        select(
            Comparison.id,
            Comparison.prompt_id,
            Prompt.text,
            gen_a.id,
            gen_a.text,
            gen_b.id,
            gen_b.text,
            Comparison.lease_count,
            Comparison.lease_expires_at,
        )
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        .join(gen_a, gen_a.id == Comparison.generation_a_id)
        .join(gen_b, gen_b.id == Comparison.generation_b_id)
        .order_by(Comparison.priority.desc(), Comparison.id)
    )


def leased_to(conn: Connection, campaign_id: int, owner: str, now: datetime) -> list[Claim]:
    """The comparisons whose live lease ``owner`` holds, as ``claim`` returned them (claim order).

    Live means what recording under the lease requires: still pending and expiring at or after
    ``now``. ``attempt`` is the comparison's lease count, as when it was claimed.
    """
    v.name(owner, "leased_to", "owner")
    query = _with_texts().where(
        Comparison.campaign_id == campaign_id,
        Comparison.status == "pending",
        Comparison.lease_owner == owner,
        Comparison.lease_expires_at >= now,
    )
    return [
        Claim(cid, pid, prompt, a, text_a, b, text_b, owner, expires, attempt)
        for cid, pid, prompt, a, text_a, b, text_b, attempt, expires in conn.execute(query)
    ]


def release(conn: Connection, campaign_id: int, owner: str, ids: Sequence[int]) -> int:
    """Give back leases held by ``owner`` (labeled or foreign rows are untouched); returns count."""
    released = 0
    for chunk in v.chunks(sorted(set(ids))):
        result = conn.execute(
            update(Comparison)
            .where(
                Comparison.id.in_(chunk),
                Comparison.campaign_id == campaign_id,
                Comparison.lease_owner == owner,
                Comparison.status == "pending",
            )
            .values(lease_owner=None, lease_expires_at=None)
        )
        released += result.rowcount
    return released


def expire(conn: Connection, campaign_id: int, now: datetime) -> int:
    """Clear leases that expired before ``now``; returns how many (they are claimable anyway)."""
    result = conn.execute(
        update(Comparison)
        .where(
            Comparison.campaign_id == campaign_id,
            Comparison.status == "pending",
            Comparison.lease_expires_at < now,
        )
        .values(lease_owner=None, lease_expires_at=None)
    )
    return result.rowcount


def counts(conn: Connection, campaign_id: int, now: datetime) -> ComparisonCounts:
    """Pending (claimable), claimed (live lease) and labeled comparisons of the campaign."""
    live = and_(Comparison.status == "pending", Comparison.lease_expires_at >= now)
    query = select(
        func.sum(case((_claimable(campaign_id, now), 1), else_=0)),
        func.sum(case((live, 1), else_=0)),
        func.sum(case((Comparison.status == "labeled", 1), else_=0)),
    ).where(Comparison.campaign_id == campaign_id)
    pending, claimed, labeled = conn.execute(query).one()
    return ComparisonCounts(int(pending or 0), int(claimed or 0), int(labeled or 0))
