"""Queue indexes of the label API: the claim order and the lease owner.

``ix_comparison_claim`` (campaign_id, status, priority DESC, id) is the claim query's order, so
a claim reads the first claimable rows of the index instead of sorting every pending comparison;
it replaces ``ix_comparison_queue`` (campaign_id, status, priority), of which it serves every
use. ``ix_comparison_lease`` (campaign_id, lease_owner, priority DESC, id), partial on
``lease_owner IS NOT NULL``, holds only leased rows: it finds an owner's leases (``leased_to``,
in claim order) and counts live leases without reading the campaign. Its trailing order columns
are what make both planners pick it for ``leased_to`` over the claim index, which would also
serve that query's ORDER BY. Downgrading restores ``ix_comparison_queue``; no row changes either
way.

Revision ID: 0003_queue_indexes
Revises: 0002_fact_guards
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_queue_indexes"
down_revision: str | None = "0002_fact_guards"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_comparison_claim",
        "comparison",
        ["campaign_id", "status", sa.text("priority DESC"), "id"],
    )
    leased = sa.text("lease_owner IS NOT NULL")
    op.create_index(
        "ix_comparison_lease",
        "comparison",
        ["campaign_id", "lease_owner", sa.text("priority DESC"), "id"],
        sqlite_where=leased,
        postgresql_where=leased,
    )
    op.drop_index("ix_comparison_queue", table_name="comparison")


def downgrade() -> None:
    op.create_index("ix_comparison_queue", "comparison", ["campaign_id", "status", "priority"])
    op.drop_index("ix_comparison_lease", table_name="comparison")
    op.drop_index("ix_comparison_claim", table_name="comparison")
