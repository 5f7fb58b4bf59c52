"""Ledger tables: campaign, prompt, generation, comparison, preference, annotator,
model_version (+ status events), metric, audit.

Revision ID: 0001_tables
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_tables"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the enumerations at this revision (a migration never imports the models).
CHOICE = "choice IN ('a', 'b', 'tie')"
LABELER_KIND = "labeler_kind IN ('ai', 'human', 'gold')"


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), nullable=False)


def _created() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(), nullable=False)


def _ck(sql: str, table: str, name: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(sql, name=op.f(f"ck_{table}_{name}"))


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}"))


def _uq(table: str, *cols: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*cols, name=op.f(f"uq_{table}_{'_'.join(cols)}"))


def _fk(table: str, cols: list[str], target: str, target_cols: list[str]) -> sa.Constraint:
    name = op.f(f"fk_{table}_{'_'.join(cols)}_{target}")
    return sa.ForeignKeyConstraint(cols, [f"{target}.{c}" for c in target_cols], name=name)


def _create_people_and_campaign() -> None:
    op.create_table(
        "annotator",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        _created(),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        _ck("name <> ''", "annotator", "name_nonempty"),
        _ck("role IN ('annotator', 'admin')", "annotator", "role"),
        _pk("annotator"),
        _uq("annotator", "name"),
        _uq("annotator", "token_hash"),
    )
    op.create_table(
        "audit",
        _id(),
        sa.Column("who", sa.String(200), nullable=False),
        sa.Column("what", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        _created(),
        _ck("who <> ''", "audit", "who_nonempty"),
        _pk("audit"),
    )
    op.create_table(
        "campaign",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=True),
        _created(),
        _ck("name <> ''", "campaign", "name_nonempty"),
        _pk("campaign"),
        _uq("campaign", "name"),
    )


def _create_metric_and_models() -> None:
    op.create_table(
        "metric",
        _id(),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        _created(),
        _ck("key <> ''", "metric", "key_nonempty"),
        _ck("iteration >= 0", "metric", "iteration_nonneg"),
        _fk("metric", ["campaign_id"], "campaign", ["id"]),
        _pk("metric"),
    )
    op.create_index("ix_metric_lookup", "metric", ["campaign_id", "key", "iteration"])
    op.create_table(
        "model_version",
        _id(),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("weight_uri", sa.String(1000), nullable=True),
        sa.Column("snapshot_watermark", sa.Integer(), nullable=True),
        sa.Column("snapshot_hash", sa.String(64), nullable=True),
        sa.Column("training_kinds", sa.String(64), nullable=True),
        _created(),
        _ck(
            "kind <> 'rm' OR (snapshot_watermark IS NOT NULL AND snapshot_hash IS NOT NULL)",
            "model_version",
            "rm_has_snapshot",
        ),
        _ck("kind IN ('rm', 'policy')", "model_version", "kind"),
        _ck("version >= 0", "model_version", "version_nonneg"),
        _fk("model_version", ["campaign_id"], "campaign", ["id"]),
        _fk("model_version", ["parent_id"], "model_version", ["id"]),
        _pk("model_version"),
        _uq("model_version", "campaign_id", "kind", "version"),
    )
    op.create_table(
        "model_version_event",
        _id(),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _created(),
        _ck("status IN ('candidate', 'promoted', 'rejected')", "model_version_event", "status"),
        _fk("model_version_event", ["model_version_id"], "model_version", ["id"]),
        _pk("model_version_event"),
        _uq("model_version_event", "model_version_id", "status"),
    )


def _create_prompt_and_generation() -> None:
    op.create_table(
        "prompt",
        _id(),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_hash", sa.String(64), nullable=False),
        sa.Column("source", sa.String(200), nullable=True),
        _created(),
        _ck("text <> ''", "prompt", "text_nonempty"),
        _fk("prompt", ["campaign_id"], "campaign", ["id"]),
        _pk("prompt"),
        _uq("prompt", "campaign_id", "text_hash"),
        _uq("prompt", "id", "campaign_id"),
    )
    op.create_table(
        "generation",
        _id(),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("sample_index", sa.Integer(), nullable=False),
        sa.Column("sampling_params", sa.JSON(), nullable=False),
        _created(),
        _ck("text <> ''", "generation", "text_nonempty"),
        _ck("worker <> ''", "generation", "worker_nonempty"),
        _ck("policy_version >= 0", "generation", "policy_version_nonneg"),
        _ck("sample_index >= 0", "generation", "sample_index_nonneg"),
        _ck("token_count >= 0", "generation", "token_count_nonneg"),
        _fk("generation", ["prompt_id"], "prompt", ["id"]),
        _pk("generation"),
        _uq("generation", "id", "prompt_id"),
        _uq("generation", "prompt_id", "policy_version", "worker", "sample_index"),
    )


def _create_comparison() -> None:
    op.create_table(
        "comparison",
        _id(),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("generation_a_id", sa.Integer(), nullable=False),
        sa.Column("generation_b_id", sa.Integer(), nullable=False),
        sa.Column("selection", sa.String(64), nullable=False),
        sa.Column("priority", sa.Double(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("lease_count", sa.Integer(), nullable=False),
        _created(),
        _ck("selection <> ''", "comparison", "selection_nonempty"),
        _ck("status IN ('pending', 'labeled')", "comparison", "status"),
        _ck("(lease_owner IS NULL) = (lease_expires_at IS NULL)", "comparison", "lease_complete"),
        _ck("generation_a_id <> generation_b_id", "comparison", "distinct_generations"),
        _ck("lease_count >= 0", "comparison", "lease_count_nonneg"),
        _fk("comparison", ["generation_a_id", "prompt_id"], "generation", ["id", "prompt_id"]),
        _fk("comparison", ["generation_b_id", "prompt_id"], "generation", ["id", "prompt_id"]),
        _fk("comparison", ["prompt_id", "campaign_id"], "prompt", ["id", "campaign_id"]),
        _pk("comparison"),
        _uq("comparison", "generation_a_id", "generation_b_id"),
    )


def _create_preference() -> None:
    op.create_table(
        "preference",
        _id(),
        sa.Column("comparison_id", sa.Integer(), nullable=False),
        sa.Column("choice", sa.String(8), nullable=False),
        sa.Column("strength", sa.Double(), nullable=True),
        sa.Column("labeler_kind", sa.String(16), nullable=False),
        sa.Column("labeler_id", sa.String(200), nullable=False),
        sa.Column("supersedes_id", sa.Integer(), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        _created(),
        _ck(CHOICE, "preference", "choice"),
        _ck("labeler_id <> ''", "preference", "labeler_id_nonempty"),
        _ck(LABELER_KIND, "preference", "labeler_kind"),
        _fk("preference", ["comparison_id"], "comparison", ["id"]),
        _fk("preference", ["supersedes_id"], "preference", ["id"]),
        _pk("preference"),
        _uq("preference", "idempotency_key"),
        _uq("preference", "supersedes_id"),
    )
    where = sa.text("supersedes_id IS NULL")
    op.create_index(
        "ux_preference_first_label",
        "preference",
        ["comparison_id", "labeler_id"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )


def upgrade() -> None:
    _create_people_and_campaign()
    _create_metric_and_models()
    _create_prompt_and_generation()
    _create_comparison()
    _create_preference()


def downgrade() -> None:
    op.drop_index("ux_preference_first_label", table_name="preference")
    op.drop_table("preference")
    op.drop_table("comparison")
    op.drop_table("model_version_event")
    op.drop_table("generation")
    op.drop_table("prompt")
    op.drop_table("model_version")
    op.drop_index("ix_metric_lookup", table_name="metric")
    op.drop_table("metric")
    op.drop_table("campaign")
    op.drop_table("audit")
    op.drop_table("annotator")
