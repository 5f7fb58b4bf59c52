"""Provenance and count queries for reports and the dashboard."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, Integer, cast, exists, func, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from storage import validate as v
from storage.models import LABELER_KINDS, Comparison, Generation, ModelVersion, Preference, Prompt
from storage.snapshots import effective_query


def _epoch(conn: Connection, column: ColumnElement) -> ColumnElement:
    if conn.dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", column)), Integer)
    return cast(func.strftime("%s", column), Integer)


def labels_by_kind(
    conn: Connection, campaign_id: int, bucket_s: int
) -> list[tuple[datetime, str, int]]:
    """Preference rows (corrections included) per labeler kind per time bucket.

    Returns:
        ``(bucket start as naive UTC, labeler kind, count)`` sorted by bucket then kind.
    """
    if v.nonneg_int(bucket_s, "labels_by_kind", "bucket_s") == 0:
        raise v.fail("labels_by_kind", "bucket_s", "> 0 seconds", bucket_s)
    bucket = (_epoch(conn, Preference.created_at) // bucket_s) * bucket_s
    query = (
        select(bucket.label("bucket"), Preference.labeler_kind, func.count())
        .join(Comparison, Comparison.id == Preference.comparison_id)
        .where(Comparison.campaign_id == campaign_id)
        .group_by("bucket", Preference.labeler_kind)
        .order_by("bucket", Preference.labeler_kind)
    )
    return [
        (datetime.fromtimestamp(int(b), UTC).replace(tzinfo=None), kind, int(n))
        for b, kind, n in conn.execute(query)
    ]


def labels_by_kind_total(conn: Connection, campaign_id: int) -> dict[str, int]:
    """Preference rows per labeler kind (corrections included)."""
    query = (
        select(Preference.labeler_kind, func.count())
        .join(Comparison, Comparison.id == Preference.comparison_id)
        .where(Comparison.campaign_id == campaign_id)
        .group_by(Preference.labeler_kind)
    )
    return {kind: int(n) for kind, n in conn.execute(query)}


def effective_by_labeler(conn: Connection, campaign_id: int, kind: str | None) -> dict[str, int]:
    """Effective preferences (not superseded) per labeler id, of labeler kind ``kind`` or all.

    Counts the rows committed by now (no watermark, no table lock), sorted by labeler id.
    """
    if kind is not None:
        v.one_of(kind, LABELER_KINDS, "label_counts_by_labeler", "kind")
    later = aliased(Preference)
    superseded = exists().where(later.supersedes_id == Preference.id)
    query = (
        select(Preference.labeler_id, func.count())
        .join(Comparison, Comparison.id == Preference.comparison_id)
        .where(Comparison.campaign_id == campaign_id, ~superseded)
        .group_by(Preference.labeler_id)
    )
    if kind is not None:
        query = query.where(Preference.labeler_kind == kind)
    return dict(sorted((labeler, int(n)) for labeler, n in conn.execute(query)))


def preferences_per_rm_version(conn: Connection, campaign_id: int) -> dict[int, int]:
    """Size of each RM version's training set (its snapshot's row count), by version."""
    versions = conn.execute(
        select(ModelVersion.version, ModelVersion.snapshot_watermark, ModelVersion.training_kinds)
        .where(ModelVersion.campaign_id == campaign_id, ModelVersion.kind == "rm")
        .order_by(ModelVersion.version)
    )
    out: dict[int, int] = {}
    for version, watermark, kinds in versions:
        rows = effective_query(campaign_id, watermark, tuple((kinds or "").split(","))).subquery()
        out[version] = int(conn.execute(select(func.count()).select_from(rows)).scalar_one())
    return out


def generations_per_policy_version(conn: Connection, campaign_id: int) -> dict[int, int]:
    """Generations per policy version."""
    query = (
        select(Generation.policy_version, func.count())
        .join(Prompt, Prompt.id == Generation.prompt_id)
        .where(Prompt.campaign_id == campaign_id)
        .group_by(Generation.policy_version)
        .order_by(Generation.policy_version)
    )
    return {version: int(n) for version, n in conn.execute(query)}
