"""Preferences: idempotent, insert-only recording (corrections supersede) and lease fencing.

A preference's *natural key* is (comparison, labeler_id, supersedes): one first label per
labeler and comparison, and each row superseded at most once (a linear correction chain). Its
*body* is (comparison, choice, strength, labeler_kind, labeler_id, supersedes); a retry with the
same idempotency key or natural key and the same body returns the stored row, a different body
raises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection

from storage import validate as v
from storage.errors import (
    DuplicateLabel,
    IdempotencyConflict,
    InvalidInput,
    LeaseLost,
    UnknownId,
)
from storage.label_sql import insert_rows, statements
from storage.models import CHOICES, LABELER_KINDS
from storage.records import NewPreference, Recorded

NaturalKey = tuple[int, str, int | None]
Body = tuple[int, str, float | None, str, str, int | None]


class _Row(NamedTuple):
    """A validated preference of the batch (``values`` is its insert dict)."""

    index: int
    key: NaturalKey
    idem: str | None
    body: Body
    values: dict[str, Any]


class _Stored(NamedTuple):
    """A preference already in the ledger."""

    id: int
    body: Body


def _stored_row(row: Any) -> _Stored:
    body = (
        row.comparison_id,
        row.choice,
        row.strength,
        row.labeler_kind,
        row.labeler_id,
        row.supersedes_id,
    )
    return _Stored(row.id, body)


def _explain(p: NewPreference, i: int) -> None:
    """Raise the precise error for a preference that failed the fast checks (or return)."""
    where = f"preferences[{i}]"
    v.nonneg_int(p.comparison_id, where, "comparison_id")
    v.one_of(p.choice, CHOICES, where, "choice")
    v.one_of(p.labeler_kind, LABELER_KINDS, where, "labeler_kind")
    v.name(p.labeler_id, where, "labeler_id")
    if p.strength is not None:
        try:
            v.finite(p.strength, where, "strength")
        except InvalidInput:
            raise v.fail(where, "strength", "a finite number or None", p.strength) from None
    if p.supersedes is not None:
        v.nonneg_int(p.supersedes, where, "supersedes")
    if p.idempotency_key is not None:
        v.name(p.idempotency_key, where, "idempotency_key")


def _validated(p: NewPreference, i: int, now: datetime) -> _Row:
    # The fast path is one expression: this runs once per label of every batch.
    cid, labeler, strength, sup, idem = (
        p.comparison_id,
        p.labeler_id,
        p.strength,
        p.supersedes,
        p.idempotency_key,
    )
    if not (
        type(cid) is int
        and cid >= 0
        and p.choice in CHOICES
        and p.labeler_kind in LABELER_KINDS
        and type(labeler) is str
        and 0 < len(labeler) <= v.NAME_MAX
        and (strength is None or (type(strength) in (float, int) and math.isfinite(strength)))
        and (sup is None or (type(sup) is int and sup >= 0))
        and (idem is None or (type(idem) is str and 0 < len(idem) <= v.NAME_MAX))
    ):
        _explain(p, i)  # raises, unless only the types were unusual (e.g. numpy scalars)
        cid, sup = int(cid), None if sup is None else int(sup)
    strength = None if strength is None else float(strength)
    values = {
        "comparison_id": cid,
        "choice": p.choice,
        "strength": strength,
        "labeler_kind": p.labeler_kind,
        "labeler_id": labeler,
        "supersedes_id": sup,
        "idempotency_key": idem,
        "created_at": now,
    }
    body = (cid, p.choice, strength, p.labeler_kind, labeler, sup)
    return _Row(i, (cid, labeler, sup), idem, body, values)


def _comparisons(
    conn: Connection, campaign_id: int, rows: list[_Row], leased: bool
) -> dict[int, Any]:
    """Lease state of the batch's comparisons (row-locked), or ``{}`` when not ``leased``.

    Raises:
        UnknownId: an unknown comparison, or one of another campaign.
    """
    sql = statements(conn.dialect.name)
    params = {"ids": sorted({r.key[0] for r in rows})}
    found: dict[int, Any] = {}
    if leased:
        found = {row.id: row for row in conn.execute(sql.comparison_leases, params)}
        campaign_of = {cid: row.campaign_id for cid, row in found.items()}
    else:
        campaign_of = dict(conn.execute(sql.comparison_campaigns, params).all())
    for r in rows:
        owner = campaign_of.get(r.key[0])
        if owner == campaign_id:
            continue
        if owner is None:
            raise UnknownId(f"preferences[{r.index}]: comparison {r.key[0]} does not exist")
        raise UnknownId(
            f"preferences[{r.index}]: comparison {r.key[0]} belongs to campaign id {owner}, "
            f"not to campaign id {campaign_id}"
        )
    return found


def _stored(
    conn: Connection, rows: list[_Row]
) -> tuple[dict[str, _Stored], dict[NaturalKey, _Stored]]:
    """Stored preferences that share an idempotency key or (comparison, labeler) with the batch."""
    sql = statements(conn.dialect.name)
    by_idem: dict[str, _Stored] = {}
    keys = sorted({r.idem for r in rows if r.idem is not None})
    if keys:
        found = conn.execute(sql.by_idempotency_key, {"keys": keys})
        by_idem = {row.idempotency_key: _stored_row(row) for row in found}
    wanted = {r.key[:2] for r in rows}
    params = {"ids": sorted({k[0] for k in wanted}), "labelers": sorted({k[1] for k in wanted})}
    by_key = {
        (row.comparison_id, row.labeler_id, row.supersedes_id): _stored_row(row)
        for row in conn.execute(sql.by_labeler, params)
        if (row.comparison_id, row.labeler_id) in wanted
    }
    return by_idem, by_key


def _duplicate(r: _Row, old: _Stored | _Row) -> DuplicateLabel:
    cid, labeler, supersedes = r.key
    old_id = old.id if isinstance(old, _Stored) else f"#{old.index} of this batch"
    if supersedes is None:
        return DuplicateLabel(
            f"preferences[{r.index}]: labeler {labeler!r} already labeled comparison {cid} "
            f"(preference {old_id}, choice {old.body[1]!r}); to change it record a correction "
            f"with supersedes={old_id}"
        )
    return DuplicateLabel(
        f"preferences[{r.index}]: preference {supersedes} was already superseded by "
        f"preference {old_id}; supersede {old_id} instead"
    )


def _plan(
    rows: list[_Row], by_idem: dict[str, _Stored], by_key: dict[NaturalKey, _Stored]
) -> tuple[dict[int, int], dict[NaturalKey, _Row]]:
    """Split the batch into stored rows (batch index -> id) and new rows (by natural key).

    A repeat inside the batch (same key, same body) resolves to the first occurrence.
    """
    existing: dict[int, int] = {}
    fresh: dict[NaturalKey, _Row] = {}
    fresh_idem: dict[str, _Row] = {}
    for r in rows:
        if r.idem is not None:
            seen = by_idem.get(r.idem) or fresh_idem.get(r.idem)
            if seen is not None and seen.body != r.body:
                raise IdempotencyConflict(
                    r.idem, f"preferences[{r.index}] is {r.body}, stored {seen.body}"
                )
        same = by_key.get(r.key) or fresh.get(r.key)
        if same is not None and same.body != r.body:
            raise _duplicate(r, same)
        if same is None:
            fresh[r.key] = r
            if r.idem is not None:
                fresh_idem[r.idem] = r
        elif isinstance(same, _Stored):
            existing[r.index] = same.id
    return existing, fresh


def _check_supersedes(conn: Connection, fresh: dict[NaturalKey, _Row]) -> None:
    targets = sorted({r.key[2] for r in fresh.values() if r.key[2] is not None})
    if not targets:
        return
    query = statements(conn.dialect.name).targets
    found = {row.id: row for row in conn.execute(query, {"ids": targets})}
    for r in fresh.values():
        target = r.key[2]
        if target is None:
            continue
        old = found.get(target)
        if old is None:
            raise UnknownId(f"preferences[{r.index}]: supersedes {target}: no such preference")
        mine = (r.key[0], r.key[1], r.values["labeler_kind"])
        if (old.comparison_id, old.labeler_id, old.labeler_kind) != mine:
            raise DuplicateLabel(
                f"preferences[{r.index}]: supersedes {target}, a label of comparison "
                f"{old.comparison_id} by {old.labeler_kind} labeler {old.labeler_id!r}; a "
                "correction must be by the same labeler on the same comparison"
            )


def _check_leases(
    rows: Sequence[_Row], comparisons: dict[int, Any], owner: str, now: datetime
) -> None:
    for r in rows:
        c = comparisons[r.key[0]]
        alive = c.lease_expires_at is not None and c.lease_expires_at >= now
        if c.status != "pending" or c.lease_owner != owner or not alive:
            raise LeaseLost(
                f"preferences[{r.index}]: comparison {c.id} is not leased by {owner!r} "
                f"(status {c.status!r}, lease owner {c.lease_owner!r}, expires "
                f"{c.lease_expires_at}); claim it again"
            )


def record_preferences(
    conn: Connection,
    campaign_id: int,
    prefs: Sequence[NewPreference],
    lease_owner: str | None,
    now: datetime,
) -> list[Recorded]:
    """Record preferences in one transaction; see ``Ledger.record_preferences``."""
    rows = [_validated(p, i, now) for i, p in enumerate(prefs)]
    if not rows:
        return []
    if lease_owner is not None:
        v.name(lease_owner, "record_preferences", "lease_owner")
    comparisons = _comparisons(conn, campaign_id, rows, leased=lease_owner is not None)
    by_idem, by_key = _stored(conn, rows)
    existing, fresh = _plan(rows, by_idem, by_key)
    _check_supersedes(conn, fresh)
    if lease_owner is not None:
        _check_leases(list(fresh.values()), comparisons, lease_owner, now)
    ids: dict[NaturalKey, int] = {}
    if fresh:
        result = insert_rows(conn, [r.values for r in fresh.values()])
        ids = {(c, lab, s): pid for pid, c, lab, s in result}
        mark = statements(conn.dialect.name).mark_labeled
        conn.execute(mark, {"ids": sorted({key[0] for key in fresh})})
    return [
        Recorded(existing[r.index], False)
        if r.index in existing
        else Recorded(ids[r.key], created=fresh[r.key] is r)
        for r in rows
    ]
