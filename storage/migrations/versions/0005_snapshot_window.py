"""Snapshot windows: an RM version's training set may start after a preference id.

``model_version.snapshot_since`` (default 0: from the campaign's first preference) records the
window ``snapshot_since < id <= snapshot_watermark`` an RM refresh read, so that a refresh
reads the fresh labels and its bounded replay window instead of the whole ledger, and the
version's training set still rebuilds from the ledger with the recorded hash. Existing rows get
0, which is what they read. Adding a column fires no trigger, so the fact guards of 0002 hold.

Downgrading drops the column only while every row holds 0 (it would lose where a windowed
training set starts otherwise).

Revision ID: 0005_snapshot_window
Revises: 0004_quarantine
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_snapshot_window"
down_revision: str | None = "0004_quarantine"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "model_version",
        sa.Column("snapshot_since", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    windowed = op.get_bind().execute(
        sa.text("SELECT count(*) FROM model_version WHERE snapshot_since <> 0")
    ).scalar_one()
    if windowed:
        raise RuntimeError(
            f"downgrade below 0005_snapshot_window would lose the training-set window of "
            f"{windowed} model version(s); refusing"
        )
    op.drop_column("model_version", "snapshot_since")
