"""Watermarks and snapshots: the training set of an RM version is a ledger query.

A snapshot at watermark ``W`` holds every *effective* preference of the campaign with
``id <= W``: rows superseded by a correction that is itself ``<= W`` are left out, so inserts
after ``W`` (new labels or corrections) never change it. Rows come in id order and hash to a
sha256 over one canonical JSON line per row.

PostgreSQL allocates ids before commit, so a transaction holding id 7 may commit after one
holding id 8. ``safe_max_id`` therefore takes ``LOCK TABLE preference IN SHARE MODE``, which
waits for every in-flight inserter: afterwards no id at or below the maximum can still appear.
SQLite serializes writers, so its maximum id is always safe.

Quarantined labelers (``storage.people.quarantine``) are left out of every snapshot above the
quarantine's watermark, all of their preferences at once. A quarantine's watermark is the
highest preference id when it was recorded, so every snapshot that could have been taken (and
pinned by an RM version) before it keeps its rows and its hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Select, and_, exists, func, select
from sqlalchemy.orm import aliased

from storage import validate as v
from storage.errors import WatermarkAhead
from storage.models import (
    LABELER_KINDS,
    Comparison,
    Generation,
    Preference,
    Prompt,
    Quarantine,
)
from storage.records import Snapshot, SnapshotRow


def safe_max_id(conn: Connection, campaign_id: int | None = None) -> int:
    """Highest preference id (of the campaign, or overall) below which nothing can still land.

    Call it in a short transaction of its own: on PostgreSQL it briefly blocks new inserts.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("LOCK TABLE preference IN SHARE MODE")
    query = select(func.max(Preference.id))
    if campaign_id is not None:
        query = query.join(Comparison, Comparison.id == Preference.comparison_id).where(
            Comparison.campaign_id == campaign_id
        )
    return int(conn.execute(query).scalar_one() or 0)


def check_watermark(watermark: int, safe: int) -> int:
    """Refuse a watermark that later inserts could still fall under."""
    v.nonneg_int(watermark, "snapshot", "watermark")
    if watermark > safe:
        raise WatermarkAhead(
            f"snapshot: watermark {watermark} is ahead of the ledger (highest committed "
            f"preference id is {safe}); rows at or below it may still arrive"
        )
    return watermark


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """Sorted, de-duplicated labeler kinds, each one of ``ai``/``human``/``gold``."""
    for kind in kinds:
        v.one_of(kind, LABELER_KINDS, "snapshot", "kinds")
    if not kinds:
        raise v.fail("snapshot", "kinds", "a non-empty list of labeler kinds", kinds)
    return tuple(sorted(set(kinds)))


def effective_query(
    campaign_id: int, watermark: int, kinds: tuple[str, ...], since: int = 0, window: bool = False
) -> Select[Any]:
    """The effective preferences of a campaign at a watermark, with texts, in id order (without
    the preferences of labelers quarantined below the watermark); after ``since`` given.
    ``window``: walk the preference ids down from the watermark (a bounded read of the newest
    rows) instead of the campaign's comparisons (best for a whole snapshot)."""
    # A window (a preference-id range) is read by walking that range of preference ids; the
    # campaign filter must then not look usable through the comparison index, or SQLite walks
    # every comparison of the campaign instead (linear in the ledger's size).
    campaign = (Comparison.campaign_id + 0) if window else Comparison.campaign_id
    later = aliased(Preference)
    gen_a, gen_b = aliased(Generation), aliased(Generation)
    superseded = exists().where(and_(later.supersedes_id == Preference.id, later.id <= watermark))
    quarantined = exists().where(
        Quarantine.campaign_id == campaign_id,
        Quarantine.labeler_id == Preference.labeler_id,
        Quarantine.watermark < watermark,
    )
    return (
        select(
            Preference.id,
            Preference.comparison_id,
            Comparison.prompt_id,
            Prompt.text,
            gen_a.id,
            gen_a.text,
            gen_a.policy_version,
            gen_b.id,
            gen_b.text,
            gen_b.policy_version,
            Preference.choice,
            Preference.strength,
            Preference.labeler_kind,
            Preference.labeler_id,
        )
        .join(Comparison, Comparison.id == Preference.comparison_id)
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        .join(gen_a, gen_a.id == Comparison.generation_a_id)
        .join(gen_b, gen_b.id == Comparison.generation_b_id)
        .where(
            campaign == campaign_id,
            Preference.id <= watermark,
            Preference.id > since,
            Preference.labeler_kind.in_(kinds),
            ~superseded,
            ~quarantined,
        )
        .order_by(Preference.id)
    )


def snapshot_rows(
    conn: Connection,
    campaign: str,
    campaign_id: int,
    watermark: int,
    kinds: tuple[str, ...],
    since: int = 0,
) -> Snapshot:
    """Read the snapshot at a (safe) watermark, after preference id ``since``, and hash it."""
    v.nonneg_int(since, "snapshot", "since")
    if since > watermark:
        raise v.fail("snapshot", "since", f"<= the watermark {watermark}", since)
    digest = hashlib.sha256()
    rows: list[SnapshotRow] = []
    query = effective_query(campaign_id, watermark, kinds, since, window=since > 0)
    for values in conn.execute(query):
        row = SnapshotRow(*values)
        digest.update(v.canonical_json(list(values)).encode("utf-8") + b"\n")
        rows.append(row)
    return Snapshot(
        campaign=campaign,
        watermark=watermark,
        kinds=kinds,
        rows=tuple(rows),
        sha256=digest.hexdigest(),
        since=since,
    )


def window_start(
    conn: Connection, campaign_id: int, before: int, rows: int, kinds: tuple[str, ...]
) -> int:
    """The ``since`` of a window holding the last ``rows`` effective preferences at or below
    ``before`` (0 when there are no more than that): the id of the next older one."""
    v.nonneg_int(rows, "window_start", "rows")
    query = (
        effective_query(campaign_id, before, kinds, window=True)
        .with_only_columns(Preference.id)
        .order_by(None)
        .order_by(Preference.id.desc())
        .offset(rows)
        .limit(1)
    )
    return conn.execute(query).scalar() or 0
