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
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Update,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import aliased

from storage import validate as v
from storage.models import Comparison, Generation, Prompt
from storage.records import Claim, ComparisonCounts


def _claimable(campaign_id: Any, now: Any) -> ColumnElement[bool]:
    """Pending with no live lease (``campaign_id`` and ``now``: values or bind parameters)."""
    return and_(
        Comparison.campaign_id == campaign_id,
        Comparison.status == "pending",
        or_(Comparison.lease_expires_at.is_(None), Comparison.lease_expires_at < now),
    )


@cache
def _claim_statements() -> tuple[Select[Any], Update, Select[Any]]:
    """The claim's pick, lease and read-back statements, built once (their parameters bound at
    execution): building them cost about as much as running them."""
    ids = bindparam("ids", expanding=True)
    pick = (
        select(Comparison.id)
        .where(_claimable(bindparam("campaign_id"), bindparam("now")))
        .order_by(Comparison.priority.desc(), Comparison.id)
        .limit(bindparam("n"))
        .with_for_update(skip_locked=True)
    )
    lease = (
        update(Comparison)
        .where(Comparison.id.in_(ids))
        .values(
            lease_owner=bindparam("owner"),
            lease_expires_at=bindparam("expires"),
            lease_count=Comparison.lease_count + 1,
        )
    )
    return pick, lease, _with_texts().where(Comparison.id.in_(ids))


def claim(
    conn: Connection, campaign_id: int, owner: str, n: int, lease_s: float, now: datetime
) -> list[Claim]:
    """Lease up to ``n`` claimable comparisons (highest priority first, then oldest)."""
    v.name(owner, "claim", "owner")
    v.nonneg_int(n, "claim", "n")
    if v.finite(lease_s, "claim", "lease_s") <= 0:
        raise v.fail("claim", "lease_s", "> 0 seconds", lease_s)
    pick, lease, read_back = _claim_statements()
    ids = list(conn.execute(pick, {"campaign_id": campaign_id, "now": now, "n": n}).scalars())
    if not ids:
        return []
    expires = now + timedelta(seconds=lease_s)
    conn.execute(lease, {"ids": ids, "owner": owner, "expires": expires})
    return [
        Claim(cid, pid, prompt, a, text_a, b, text_b, owner, expires, attempt)
        for cid, pid, prompt, a, text_a, b, text_b, attempt, _ in conn.execute(
            read_back, {"ids": ids}
        )
    ]


@cache
def _with_texts() -> Select[Any]:
    """Comparisons with the texts of a ``Claim`` and their lease expiry, in claim order.

    Built once: the ORM aliases of ``generation`` cost ~2 ms to build and adapt per query.
    """
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
    """Pending (claimable), claimed (live lease) and labeled comparisons of the campaign.

    One statement (one snapshot) of three counts the indexes serve: rows by status (index-only,
    ``ix_comparison_claim``) and live leases (``ix_comparison_lease``: leased rows only), instead
    of reading every comparison row; claimable is pending minus live (a pending row's lease is
    absent, expired, or live).
    """

    def count(*where: Any) -> Any:
        return select(func.count()).where(Comparison.campaign_id == campaign_id, *where)

    query = select(
        count(Comparison.status == "pending").scalar_subquery(),
        count(
            Comparison.lease_owner.is_not(None),
            Comparison.status == "pending",
            Comparison.lease_expires_at >= now,
        ).scalar_subquery(),
        count(Comparison.status == "labeled").scalar_subquery(),
    )
    pending, claimed, labeled = conn.execute(query).one()
    return ComparisonCounts(pending - claimed, claimed, labeled)
