"""Campaigns, prompts, generations and comparisons: idempotent appends on natural keys.

Functions take an open write connection (one transaction per ledger call) and validate the whole
batch before writing anything, so a bad row means nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Insert, Table, select
from sqlalchemy.dialects import postgresql, sqlite

from storage import validate as v
from storage.errors import IdempotencyConflict, InvalidInput, UnknownId
from storage.models import Campaign as CampaignRow
from storage.models import Comparison, Generation, Prompt, utcnow
from storage.records import Campaign, NewComparison, NewGeneration


def upsert_ignore(conn: Connection, table: Table) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the connection's dialect."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def ensure_campaign(conn: Connection, name: str, config: dict[str, Any] | None) -> Campaign:
    """Create the campaign if missing (concurrent callers both succeed) and return it."""
    v.name(name, "ensure_campaign", "name")
    cfg = v.json_object(config, "ensure_campaign", "config") if config is not None else None
    row = {"name": name, "config": cfg, "created_at": utcnow()}
    conn.execute(upsert_ignore(conn, CampaignRow.__table__), row)
    return get_campaign(conn, name)


def get_campaign(conn: Connection, name: str) -> Campaign:
    """The campaign called ``name``.

    Raises:
        UnknownId: no such campaign.
    """
    row = conn.execute(
        select(CampaignRow.id, CampaignRow.name, CampaignRow.created_at).where(
            CampaignRow.name == name
        )
    ).first()
    if row is None:
        raise UnknownId(f"campaign {name!r} does not exist; create it with ensure_campaign()")
    return Campaign(id=row.id, name=row.name, created_at=row.created_at)


def add_prompts(
    conn: Connection, campaign_id: int, texts: Sequence[str], source: str | None, limit: int
) -> list[int]:
    """Insert prompts missing from the campaign; ids in input order (existing ones reused)."""
    hashes = [v.sha256_hex(v.text(t, f"prompts[{i}]", "text", limit)) for i, t in enumerate(texts)]
    if source is not None:
        v.name(source, "add_prompts", "source")
    unique = {h: t for h, t in zip(hashes, texts, strict=True)}
    now = utcnow()
    rows = [
        {"campaign_id": campaign_id, "text": t, "text_hash": h, "source": source, "created_at": now}
        for h, t in unique.items()
    ]
    if rows:
        conn.execute(upsert_ignore(conn, Prompt.__table__), rows)
    ids: dict[str, int] = {}
    for chunk in v.chunks(list(unique)):
        query = select(Prompt.text_hash, Prompt.id).where(
            Prompt.campaign_id == campaign_id, Prompt.text_hash.in_(chunk)
        )
        ids.update({h: i for h, i in conn.execute(query)})
    return [ids[h] for h in hashes]


def _check_prompts(conn: Connection, campaign_id: int, prompt_ids: Sequence[int]) -> None:
    found: set[int] = set()
    for chunk in v.chunks(sorted(set(prompt_ids))):
        query = select(Prompt.id).where(Prompt.id.in_(chunk), Prompt.campaign_id == campaign_id)
        found.update(conn.execute(query).scalars())
    for i, pid in enumerate(prompt_ids):
        if pid not in found:
            raise UnknownId(
                f"generations[{i}]: field 'prompt_id': prompt {pid} does not exist in this "
                "campaign; add it with add_prompts() first"
            )


def _generation_row(g: NewGeneration, i: int, limit: int, now: Any) -> dict[str, Any]:
    where = f"generations[{i}]"
    return {
        "prompt_id": v.nonneg_int(g.prompt_id, where, "prompt_id"),
        "text": v.text(g.text, where, "text", limit),
        "token_count": v.nonneg_int(g.token_count, where, "token_count"),
        "policy_version": v.nonneg_int(g.policy_version, where, "policy_version"),
        "worker": v.name(g.worker, where, "worker"),
        "sample_index": v.nonneg_int(g.sample_index, where, "sample_index"),
        "sampling_params": v.json_object(g.sampling_params, where, "sampling_params"),
        "created_at": now,
    }


_GEN_KEY = ("prompt_id", "policy_version", "worker", "sample_index")
_GEN_BODY = ("text", "token_count", "sampling_params")


def _gen_key(row: Any) -> tuple[Any, ...]:
    return tuple(row[k] for k in _GEN_KEY)


def _gen_body(row: Any) -> tuple[Any, ...]:
    return (row["text"], row["token_count"], v.canonical_json(row["sampling_params"]))


def _existing_generations(conn: Connection, rows: list[dict[str, Any]]) -> dict[tuple, Any]:
    cols = [Generation.id, *(getattr(Generation, k) for k in _GEN_KEY + _GEN_BODY)]
    versions = sorted({r["policy_version"] for r in rows})
    found: dict[tuple, Any] = {}
    for chunk in v.chunks(sorted({r["prompt_id"] for r in rows})):
        query = select(*cols).where(
            Generation.prompt_id.in_(chunk), Generation.policy_version.in_(versions)
        )
        found.update({_gen_key(r._mapping): r._mapping for r in conn.execute(query)})
    return found


def _conflict_if_differs(key: tuple, old: Any, new: dict[str, Any]) -> None:
    if _gen_body(old) != _gen_body(new):
        label = ", ".join(f"{k}={val!r}" for k, val in zip(_GEN_KEY, key, strict=True))
        raise IdempotencyConflict(
            f"generation({label})", "text, token_count or sampling_params differ"
        )


def add_generations(
    conn: Connection, campaign_id: int, gens: Sequence[NewGeneration], limit: int
) -> list[int]:
    """Append generations; a repeated natural key with the same body returns the existing id.

    Raises:
        InvalidInput: a malformed field.
        UnknownId: a prompt that is not in the campaign.
        IdempotencyConflict: a natural key already stored with a different body.
    """
    now = utcnow()
    rows = [_generation_row(g, i, limit, now) for i, g in enumerate(gens)]
    _check_prompts(conn, campaign_id, [r["prompt_id"] for r in rows])
    known = _existing_generations(conn, rows) if rows else {}
    fresh: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = _gen_key(row)
        earlier = known.get(key) or fresh.get(key)
        if earlier is not None:
            _conflict_if_differs(key, earlier, row)
        else:
            fresh[key] = row
    ids = {key: row["id"] for key, row in known.items()}
    if fresh:
        returning = [Generation.id, *(getattr(Generation, k) for k in _GEN_KEY)]
        stmt = Generation.__table__.insert().returning(*returning)
        for r in conn.execute(stmt, list(fresh.values())):
            ids[_gen_key(r._mapping)] = r.id
    return [ids[_gen_key(r)] for r in rows]


def _comparison_row(c: NewComparison, i: int) -> dict[str, Any]:
    where = f"comparisons[{i}]"
    a = v.nonneg_int(c.generation_a_id, where, "generation_a_id")
    b = v.nonneg_int(c.generation_b_id, where, "generation_b_id")
    if a == b:
        raise InvalidInput(
            f"{where}: generation_a_id and generation_b_id are both {a}; a comparison needs two "
            "different generations"
        )
    return {
        "generation_a_id": a,
        "generation_b_id": b,
        "selection": v.name(c.selection, where, "selection"),
        "priority": v.finite(c.priority, where, "priority"),
    }


def _prompts_of(conn: Connection, campaign_id: int, rows: list[dict[str, Any]]) -> dict[int, int]:
    gen_ids = sorted({r[k] for r in rows for k in ("generation_a_id", "generation_b_id")})
    # Two seeks by primary key: with the campaign filter joined in, SQLite's planner walked
    # every prompt of the campaign per batch (linear in the ledger's size).
    prompt_of: dict[int, int] = {}
    for chunk in v.chunks(gen_ids):
        query = select(Generation.id, Generation.prompt_id).where(Generation.id.in_(chunk))
        prompt_of.update(dict(conn.execute(query).all()))
    ours: set[int] = set()
    for chunk in v.chunks(sorted(set(prompt_of.values()))):
        query = select(Prompt.id).where(Prompt.id.in_(chunk), Prompt.campaign_id == campaign_id)
        ours.update(conn.execute(query).scalars())
    prompt_of = {g: p for g, p in prompt_of.items() if p in ours}
    for i, r in enumerate(rows):
        for field in ("generation_a_id", "generation_b_id"):
            if r[field] not in prompt_of:
                raise UnknownId(
                    f"comparisons[{i}]: field {field!r}: generation {r[field]} does not exist "
                    "in this campaign"
                )
        pa, pb = prompt_of[r["generation_a_id"]], prompt_of[r["generation_b_id"]]
        if pa != pb:
            raise InvalidInput(
                f"comparisons[{i}]: generations {r['generation_a_id']} and "
                f"{r['generation_b_id']} belong to different prompts ({pa} and {pb}); a "
                "comparison needs two generations of one prompt"
            )
    return prompt_of


def add_comparisons(
    conn: Connection, campaign_id: int, comps: Sequence[NewComparison]
) -> list[int]:
    """Create pending comparisons; a repeated (a, b) pair with the same selection is reused.

    Raises:
        InvalidInput: a == b, generations of different prompts, or a malformed field.
        UnknownId: a generation that is not in the campaign.
        IdempotencyConflict: the pair exists with another selection policy.
    """
    rows = [_comparison_row(c, i) for i, c in enumerate(comps)]
    if not rows:
        return []
    prompt_of = _prompts_of(conn, campaign_id, rows)
    pairs = {(r["generation_a_id"], r["generation_b_id"]) for r in rows}
    known: dict[tuple[int, int], tuple[int, str]] = {}
    # Looked up by generation_a_id, the unique (a, b) index's prefix: a row-value IN over
    # (a, b) made SQLite scan the whole index per batch, so adding comparisons slowed down
    # linearly with the ledger's size.
    for chunk in v.chunks(sorted({a for a, _ in pairs})):
        query = select(
            Comparison.generation_a_id,
            Comparison.generation_b_id,
            Comparison.id,
            Comparison.selection,
        ).where(Comparison.generation_a_id.in_(chunk))
        known.update({(a, b): (cid, sel) for a, b, cid, sel in conn.execute(query)
                      if (a, b) in pairs})
    now, fresh = utcnow(), {}
    for r in rows:
        pair = (r["generation_a_id"], r["generation_b_id"])
        selection = known[pair][1] if pair in known else fresh.get(pair, r)["selection"]
        if selection != r["selection"]:
            raise IdempotencyConflict(
                f"comparison{pair}", f"stored selection {selection!r}, got {r['selection']!r}"
            )
        if pair not in known and pair not in fresh:
            fresh[pair] = {
                **r,
                "campaign_id": campaign_id,
                "prompt_id": prompt_of[pair[0]],
                "status": "pending",
                "lease_count": 0,
                "created_at": now,
            }
    ids = {pair: cid for pair, (cid, _) in known.items()}
    if fresh:
        stmt = Comparison.__table__.insert().returning(
            Comparison.id, Comparison.generation_a_id, Comparison.generation_b_id
        )
        ids.update({(a, b): cid for cid, a, b in conn.execute(stmt, list(fresh.values()))})
    return [ids[(r["generation_a_id"], r["generation_b_id"])] for r in rows]
