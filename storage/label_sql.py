"""Prebuilt statements of the preference write path, one set per SQL dialect.

Built once so that a batch only binds values; each list is a single parameter
(``storage.bulk.in_values``), which keeps a 1,000-label batch to a handful of cheap statements.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    Connection,
    Insert,
    Integer,
    Row,
    Select,
    String,
    Update,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from storage.bulk import in_values
from storage.models import Comparison, Preference

_P = Preference.__table__
_C = Comparison.__table__
_STORED = (
    _P.c.id,
    _P.c.comparison_id,
    _P.c.labeler_id,
    _P.c.supersedes_id,
    _P.c.idempotency_key,
    _P.c.choice,
    _P.c.strength,
    _P.c.labeler_kind,
)


@dataclass(frozen=True)
class LabelStatements:
    """Statements with their bound list parameters named in each docstring line."""

    comparison_campaigns: Select[Any]
    """id, campaign_id of comparisons ``:ids``."""
    comparison_leases: Select[Any]
    """lease columns of comparisons ``:ids``, row-locked (fences a concurrent re-claim)."""
    by_idempotency_key: Select[Any]
    """stored preferences with idempotency keys ``:keys``."""
    by_labeler: Select[Any]
    """stored preferences of comparisons ``:ids`` by labelers ``:labelers`` (index seeks)."""
    targets: Select[Any]
    """preferences ``:ids`` that corrections supersede."""
    insert: Insert
    """insert preferences, returning their natural keys with the new ids (``insert_rows``)."""
    mark_labeled: Update
    """pending comparisons ``:ids`` -> labeled, lease cleared."""


INSERT_COLUMNS = (
    "comparison_id",
    "choice",
    "strength",
    "labeler_kind",
    "labeler_id",
    "supersedes_id",
    "idempotency_key",
    "created_at",
)


def _insert(dialect: str) -> Insert:
    returning = (_P.c.id, _P.c.comparison_id, _P.c.labeler_id, _P.c.supersedes_id)
    if dialect != "postgresql":
        return _P.insert().returning(*returning)
    # PostgreSQL: one INSERT ... SELECT FROM unnest(<one array per column>): eight parameters
    # instead of eight per row, about 3x faster than a multi-row VALUES list.
    arrays = [bindparam(c, type_=ARRAY(_P.c[c].type)) for c in INSERT_COLUMNS]
    source = func.unnest(*arrays).table_valued(*INSERT_COLUMNS).render_derived()
    rows = select(*(source.c[c] for c in INSERT_COLUMNS))
    return _P.insert().from_select(list(INSERT_COLUMNS), rows).returning(*returning)


def insert_rows(conn: Connection, values: list[dict[str, Any]]) -> Iterable[Row[Any]]:
    """Insert preference rows; yields (id, comparison_id, labeler_id, supersedes_id)."""
    stmt = statements(conn.dialect.name).insert
    if conn.dialect.name == "postgresql":
        return conn.execute(stmt, {c: [row[c] for row in values] for c in INSERT_COLUMNS})
    return conn.execute(stmt, values)


@cache
def statements(dialect: str) -> LabelStatements:
    """The statements for ``dialect`` (``sqlite`` or ``postgresql``)."""
    ids = in_values(dialect, _C.c.id, "ids", Integer)
    lease_cols = (_C.c.id, _C.c.campaign_id, _C.c.status, _C.c.lease_owner, _C.c.lease_expires_at)
    return LabelStatements(
        comparison_campaigns=select(_C.c.id, _C.c.campaign_id).where(ids),
        comparison_leases=select(*lease_cols).where(ids).with_for_update(),
        by_idempotency_key=select(*_STORED).where(
            in_values(dialect, _P.c.idempotency_key, "keys", String)
        ),
        by_labeler=select(*_STORED).where(
            in_values(dialect, _P.c.comparison_id, "ids", Integer),
            in_values(dialect, _P.c.labeler_id, "labelers", String),
        ),
        targets=select(_P.c.id, _P.c.comparison_id, _P.c.labeler_id, _P.c.labeler_kind).where(
            in_values(dialect, _P.c.id, "ids", Integer)
        ),
        insert=_insert(dialect),
        mark_labeled=update(_C)
        .where(ids, _C.c.status == "pending")
        .values(status="labeled", lease_owner=None, lease_expires_at=None),
    )
