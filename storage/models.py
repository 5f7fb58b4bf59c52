"""SQLAlchemy 2.0 tables of the preference ledger.

Facts (generations, preferences, model versions and their status events, metrics, audit rows,
quarantines) are append-only: the ledger API never updates or deletes them and migrations
``0002``/``0004`` add database triggers that refuse UPDATE/DELETE. Work-queue state (a
comparison's status and lease) and an annotator's revocation are the only mutable columns.

Natural keys are unique constraints; composite foreign keys make "both generations of a comparison
belong to its prompt, and the prompt to its campaign" a database invariant, not just an API check.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

CHOICES = ("a", "b", "tie")
LABELER_KINDS = ("ai", "human", "gold")
ROLES = ("annotator", "admin")
MODEL_KINDS = ("rm", "policy")
MODEL_STATUSES = ("candidate", "promoted", "rejected")
COMPARISON_STATUSES = ("pending", "labeled")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Naive UTC now: the ledger stores every timestamp as naive UTC on both backends."""
    return datetime.now(UTC).replace(tzinfo=None)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base with a naming convention (Alembic batch mode needs named constraints)."""

    metadata = MetaData(naming_convention=NAMING)


class Campaign(Base):
    """One online preference campaign; everything else hangs off it."""

    __tablename__ = "campaign"
    __table_args__ = (CheckConstraint("name <> ''", name="name_nonempty"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Prompt(Base):
    """A prompt text, unique per campaign by its sha256."""

    __tablename__ = "prompt"
    __table_args__ = (
        UniqueConstraint("campaign_id", "text_hash"),
        UniqueConstraint("id", "campaign_id"),
        CheckConstraint("text <> ''", name="text_nonempty"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"))
    text: Mapped[str] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Generation(Base):
    """One sampled response; natural key (prompt, policy_version, worker, sample_index)."""

    __tablename__ = "generation"
    __table_args__ = (
        UniqueConstraint("prompt_id", "policy_version", "worker", "sample_index"),
        UniqueConstraint("id", "prompt_id"),
        CheckConstraint("text <> ''", name="text_nonempty"),
        CheckConstraint("worker <> ''", name="worker_nonempty"),
        CheckConstraint("token_count >= 0", name="token_count_nonneg"),
        CheckConstraint("policy_version >= 0", name="policy_version_nonneg"),
        CheckConstraint("sample_index >= 0", name="sample_index_nonneg"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompt.id"))
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer)
    policy_version: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(200))
    sample_index: Mapped[int] = mapped_column(Integer)
    sampling_params: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Comparison(Base):
    """Two generations of one prompt to be labeled; a leased work item of the label queue."""

    __tablename__ = "comparison"
    __table_args__ = (
        ForeignKeyConstraint(["prompt_id", "campaign_id"], ["prompt.id", "prompt.campaign_id"]),
        ForeignKeyConstraint(
            ["generation_a_id", "prompt_id"], ["generation.id", "generation.prompt_id"]
        ),
        ForeignKeyConstraint(
            ["generation_b_id", "prompt_id"], ["generation.id", "generation.prompt_id"]
        ),
        UniqueConstraint("generation_a_id", "generation_b_id"),
        CheckConstraint("generation_a_id <> generation_b_id", name="distinct_generations"),
        CheckConstraint(_in("status", COMPARISON_STATUSES), name="status"),
        CheckConstraint("selection <> ''", name="selection_nonempty"),
        CheckConstraint(
            "(lease_owner IS NULL) = (lease_expires_at IS NULL)", name="lease_complete"
        ),
        CheckConstraint("lease_count >= 0", name="lease_count_nonneg"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(Integer)
    prompt_id: Mapped[int] = mapped_column(Integer)
    generation_a_id: Mapped[int] = mapped_column(Integer)
    generation_b_id: Mapped[int] = mapped_column(Integer)
    selection: Mapped[str] = mapped_column(String(64))
    priority: Mapped[float] = mapped_column(Double, default=0.0)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# Queue indexes (migration 0003), here rather than in ``__table_args__`` because ``.desc()`` needs
# the mapped column. The claim order: a claim reads the first claimable rows instead of sorting
# the pending ones. Leased rows only, in claim order: an owner's leases and the live-lease count.
Index(
    "ix_comparison_claim",
    Comparison.campaign_id,
    Comparison.status,
    Comparison.priority.desc(),
    Comparison.id,
)
Index(
    "ix_comparison_lease",
    Comparison.campaign_id,
    Comparison.lease_owner,
    Comparison.priority.desc(),
    Comparison.id,
    sqlite_where=text("lease_owner IS NOT NULL"),
    postgresql_where=text("lease_owner IS NOT NULL"),
)


class Preference(Base):
    """A label: insert-only; a correction is a new row whose ``supersedes_id`` names the old one."""

    __tablename__ = "preference"
    __table_args__ = (
        CheckConstraint(_in("choice", CHOICES), name="choice"),
        CheckConstraint(_in("labeler_kind", LABELER_KINDS), name="labeler_kind"),
        CheckConstraint("labeler_id <> ''", name="labeler_id_nonempty"),
        # At most one first label per (comparison, labeler); later ones must supersede.
        Index(
            "ux_preference_first_label",
            "comparison_id",
            "labeler_id",
            unique=True,
            sqlite_where=text("supersedes_id IS NULL"),
            postgresql_where=text("supersedes_id IS NULL"),
        ),
        Index("ix_preference_comparison_labeler", "comparison_id", "labeler_id"),  # 0002
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparison.id"))
    choice: Mapped[str] = mapped_column(String(8))
    strength: Mapped[float | None] = mapped_column(Double)
    labeler_kind: Mapped[str] = mapped_column(String(16))
    labeler_id: Mapped[str] = mapped_column(String(200))
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("preference.id"), unique=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Annotator(Base):
    """A human labeler (or admin) of the label API; only a sha256 of the token is stored."""

    __tablename__ = "annotator"
    __table_args__ = (
        CheckConstraint(_in("role", ROLES), name="role"),
        CheckConstraint("name <> ''", name="name_nonempty"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class ModelVersion(Base):
    """A trained RM or policy version; an RM row pins the snapshot (watermark + hash) it used."""

    __tablename__ = "model_version"
    __table_args__ = (
        UniqueConstraint("campaign_id", "kind", "version"),
        CheckConstraint(_in("kind", MODEL_KINDS), name="kind"),
        CheckConstraint("version >= 0", name="version_nonneg"),
        CheckConstraint(
            "kind <> 'rm' OR (snapshot_watermark IS NOT NULL AND snapshot_hash IS NOT NULL)",
            name="rm_has_snapshot",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"))
    kind: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    weight_uri: Mapped[str | None] = mapped_column(String(1000))
    snapshot_watermark: Mapped[int | None] = mapped_column(Integer)
    snapshot_hash: Mapped[str | None] = mapped_column(String(64))
    # the snapshot's window: preferences with snapshot_since < id <= snapshot_watermark (0: all)
    snapshot_since: Mapped[int] = mapped_column(Integer, server_default="0")
    training_kinds: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ModelVersionEvent(Base):
    """Append-only status history of a model version; the latest event is its status."""

    __tablename__ = "model_version_event"
    __table_args__ = (
        UniqueConstraint("model_version_id", "status"),
        CheckConstraint(_in("status", MODEL_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Metric(Base):
    """One scalar of one iteration; append-only, readers take the latest row per key."""

    __tablename__ = "metric"
    __table_args__ = (
        Index("ix_metric_lookup", "campaign_id", "key", "iteration"),
        CheckConstraint("iteration >= 0", name="iteration_nonneg"),
        CheckConstraint("key <> ''", name="key_nonempty"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"))
    iteration: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Double)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Audit(Base):
    """Who did what through the label/admin API (request body kept only as a sha256)."""

    __tablename__ = "audit"
    __table_args__ = (CheckConstraint("who <> ''", name="who_nonempty"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    who: Mapped[str] = mapped_column(String(200))
    what: Mapped[str] = mapped_column(Text)
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Quarantine(Base):
    """A labeler quarantined from RM training in a campaign (migration 0004); append-only.

    ``watermark`` is the highest preference id when the quarantine was recorded: snapshots at a
    higher watermark leave out every preference of ``labeler_id`` (earlier ones included), and
    snapshots at or below it, the only ones that could have been taken before, keep them, so
    the training set of every RM version already recorded rebuilds with the same hash.
    """

    __tablename__ = "quarantine"
    __table_args__ = (
        UniqueConstraint("campaign_id", "labeler_id"),
        CheckConstraint("labeler_id <> ''", name="labeler_id_nonempty"),
        CheckConstraint("reason <> ''", name="reason_nonempty"),
        CheckConstraint("watermark >= 0", name="watermark_nonneg"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaign.id"))
    labeler_id: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    watermark: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


#: Fact tables: UPDATE and DELETE are refused by triggers (migrations 0002 and 0004).
FACT_TABLES = (
    "generation",
    "preference",
    "model_version",
    "model_version_event",
    "metric",
    "audit",
    "quarantine",
)
