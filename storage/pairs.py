"""Labels of text pairs: prompt, generations, comparison and preference in one transaction.

A label that arrives with its texts (a bulk import, an export of another ledger) needs its
prompt, two generations and comparison before its preference. Written in one transaction, a
refused preference leaves none of them behind, so no new comparison waits in the queue for a
label that was never recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection

from storage import content, labels
from storage.errors import InvalidInput
from storage.records import (
    NewComparison,
    NewGeneration,
    NewPairPreference,
    NewPreference,
    NewResponse,
    Recorded,
)


def _generation(prompt_id: int, r: NewResponse) -> NewGeneration:
    return NewGeneration(
        prompt_id,
        r.text,
        r.token_count,
        r.policy_version,
        r.worker,
        r.sample_index,
        r.sampling_params,
    )


def _preference(p: NewPairPreference, comparison_id: int) -> NewPreference:
    return NewPreference(
        comparison_id, p.choice, p.labeler_kind, p.labeler_id, p.strength, p.idempotency_key
    )


def _add_pairs(
    conn: Connection,
    campaign_id: int,
    pairs: Sequence[NewPairPreference],
    source: str | None,
    limit: int,
) -> list[int]:
    """Find or create the pairs' prompts, generations and comparisons; comparison ids in order.

    Refusals name ``prompts[i]``, ``comparisons[i]`` (the i-th pair) or ``generations[2i]`` and
    ``generations[2i + 1]`` (its responses a and b).
    """
    if not pairs:
        return []
    prompt_ids = content.add_prompts(conn, campaign_id, [p.prompt for p in pairs], source, limit)
    gens = [
        _generation(pid, response)
        for pid, p in zip(prompt_ids, pairs, strict=True)
        for response in (p.response_a, p.response_b)
    ]
    gen_ids = content.add_generations(conn, campaign_id, gens, limit)
    comps = [
        NewComparison(gen_ids[2 * i], gen_ids[2 * i + 1], selection=p.selection)
        for i, p in enumerate(pairs)
    ]
    return content.add_comparisons(conn, campaign_id, comps)


def record_pair_preferences(
    conn: Connection,
    campaign_id: int,
    items: Sequence[NewPreference | NewPairPreference],
    source: str | None,
    limit: int,
    now: datetime,
) -> list[Recorded]:
    """Record ``items`` in one transaction; see ``Ledger.record_pair_preferences``."""
    for i, x in enumerate(items):
        if not isinstance(x, NewPreference | NewPairPreference):
            raise InvalidInput(
                f"items[{i}]: expected a NewPreference or a NewPairPreference; got "
                f"{type(x).__name__}"
            )
    pairs = [(i, x) for i, x in enumerate(items) if isinstance(x, NewPairPreference)]
    new_ids = _add_pairs(conn, campaign_id, [x for _, x in pairs], source, limit)
    comparison_of = {i: cid for (i, _), cid in zip(pairs, new_ids, strict=True)}
    prefs = [
        x if isinstance(x, NewPreference) else _preference(x, comparison_of[i])
        for i, x in enumerate(items)
    ]
    return labels.record_preferences(conn, campaign_id, prefs, None, now)
