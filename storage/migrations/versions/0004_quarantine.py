"""Quarantine: labelers whose preferences RM training leaves out, an append-only fact.

One row per (campaign, labeler id) with the reason, the audit evidence (JSON) and the
preference watermark when it was recorded; snapshots above that watermark leave the labeler's
preferences out (``storage.snapshots``). Triggers refuse UPDATE/DELETE (and TRUNCATE on
PostgreSQL), as revision 0002 does for the other facts; the PostgreSQL trigger function is
0002's.

Downgrading drops the triggers, and the table only while it is empty (or when going to
``base``, which ``storage.db.downgrade`` refuses while rows exist unless told to drop them):
like every other revision's downgrade, it never drops rows. A later upgrade adopts a table
that was kept.

Revision ID: 0004_quarantine
Revises: 0003_queue_indexes
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0004_quarantine"
down_revision: str | None = "0003_queue_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "quarantine"
PG_FUNCTION = "prefloop_refuse_fact_change"  # created by 0002_fact_guards


def _create_table() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("labeler_id", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("watermark", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("labeler_id <> ''", name=op.f("ck_quarantine_labeler_id_nonempty")),
        sa.CheckConstraint("reason <> ''", name=op.f("ck_quarantine_reason_nonempty")),
        sa.CheckConstraint("watermark >= 0", name=op.f("ck_quarantine_watermark_nonneg")),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaign.id"], name=op.f("fk_quarantine_campaign_id_campaign")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine")),
        sa.UniqueConstraint(
            "campaign_id", "labeler_id", name=op.f("uq_quarantine_campaign_id_labeler_id")
        ),
    )


def _create_guards(postgres: bool) -> None:
    if postgres:
        for when, name in (("UPDATE OR DELETE", "immutable"), ("TRUNCATE", "no_truncate")):
            each = "ROW" if name == "immutable" else "STATEMENT"
            op.execute(
                f"CREATE TRIGGER trg_{TABLE}_{name} BEFORE {when} ON {TABLE} "
                f"FOR EACH {each} EXECUTE FUNCTION {PG_FUNCTION}()"
            )
        return
    for action in ("UPDATE", "DELETE"):
        message = f"{TABLE} rows are immutable facts: {action} refused (append a new row)"
        op.execute(
            f"CREATE TRIGGER trg_{TABLE}_no_{action.lower()} BEFORE {action} ON {TABLE} "
            f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
        )


def _drop_guards(postgres: bool) -> None:
    if postgres:
        for name in ("immutable", "no_truncate"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_{TABLE}_{name} ON {TABLE}")
        return
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS trg_{TABLE}_no_{action}")


def upgrade() -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table(TABLE):  # else kept by a downgrade that found rows
        _create_table()
    _create_guards(bind.dialect.name == "postgresql")


def downgrade() -> None:
    bind = op.get_bind()
    _drop_guards(bind.dialect.name == "postgresql")
    rows = bind.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar_one()
    if rows == 0 or context.get_revision_argument() is None:  # None: the destination is base
        op.drop_table(TABLE)
