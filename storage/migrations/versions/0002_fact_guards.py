"""Fact guards: database triggers that refuse UPDATE/DELETE (and TRUNCATE) of fact rows, and
the indexes of the claim query and of the preference idempotency lookup.

Downgrading removes only the triggers and the index; every row stays.

Revision ID: 0002_fact_guards
Revises: 0001_tables
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002_fact_guards"
down_revision: str | None = "0001_tables"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen at this revision: the append-only tables.
FACT_TABLES = (
    "generation",
    "preference",
    "model_version",
    "model_version_event",
    "metric",
    "audit",
)
PG_FUNCTION = "prefloop_refuse_fact_change"


def _sqlite_upgrade() -> None:
    for table in FACT_TABLES:
        for action in ("UPDATE", "DELETE"):
            message = f"{table} rows are immutable facts: {action} refused (append a new row)"
            op.execute(
                f"CREATE TRIGGER trg_{table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )


def _sqlite_downgrade() -> None:
    for table in FACT_TABLES:
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_no_{action}")


def _pg_upgrade() -> None:
    op.execute(
        f"CREATE FUNCTION {PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION '% rows are immutable facts: % refused (append a new row)', "
        "TG_TABLE_NAME, TG_OP USING ERRCODE = 'restrict_violation'; END $$"
    )
    for table in FACT_TABLES:
        op.execute(
            f"CREATE TRIGGER trg_{table}_immutable BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {PG_FUNCTION}()"
        )
        op.execute(
            f"CREATE TRIGGER trg_{table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {PG_FUNCTION}()"
        )


def _pg_downgrade() -> None:
    for table in FACT_TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_immutable ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_no_truncate ON {table}")
    op.execute(f"DROP FUNCTION IF EXISTS {PG_FUNCTION}()")


def upgrade() -> None:
    op.create_index("ix_comparison_queue", "comparison", ["campaign_id", "status", "priority"])
    op.create_index(
        "ix_preference_comparison_labeler", "preference", ["comparison_id", "labeler_id"]
    )
    if op.get_bind().dialect.name == "postgresql":
        _pg_upgrade()
    else:
        _sqlite_upgrade()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _pg_downgrade()
    else:
        _sqlite_downgrade()
    op.drop_index("ix_preference_comparison_labeler", table_name="preference")
    op.drop_index("ix_comparison_queue", table_name="comparison")
