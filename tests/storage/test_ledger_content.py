"""Campaigns, prompts, generations, comparisons: idempotent appends on natural keys."""

from __future__ import annotations

import pickle

import pytest

from storage.errors import IdempotencyConflict, UnknownId
from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration


def test_campaign_is_created_once(ledger: Ledger) -> None:
    first = ledger.ensure_campaign("c2", {"seed": 1})
    again = ledger.ensure_campaign("c2", {"seed": 1})
    assert (again.id, again.name) == (first.id, "c2")
    assert ledger.get_campaign("c2").id == first.id
    assert ledger.row_counts()["campaign"] == 2
    with pytest.raises(UnknownId, match="campaign 'nope' does not exist"):
        ledger.get_campaign("nope")
    shipped = pickle.loads(pickle.dumps(ledger))  # what a Ray actor receives
    assert (shipped.url, shipped.get_campaign("c2").id) == (ledger.url, first.id)


def test_prompts_are_idempotent_on_text(ledger: Ledger) -> None:
    ids = ledger.add_prompts("c1", ["p1", "p2", "p1"])
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert ledger.add_prompts("c1", ["p2", "p1"]) == [ids[1], ids[0]]
    ledger.ensure_campaign("c2")
    other = ledger.add_prompts("c2", ["p1"])  # same text, another campaign: another row
    assert other[0] not in ids
    assert ledger.row_counts()["prompt"] == 3


def test_generations_are_idempotent_and_conflicts_name_the_key(ledger: Ledger) -> None:
    (prompt,) = ledger.add_prompts("c1", ["p"])
    gens = [NewGeneration(prompt, f"t{k}", 2, 0, "w0", k, {"temperature": 0.7}) for k in range(3)]
    ids = ledger.add_generations("c1", gens)
    assert len(set(ids)) == 3
    assert ledger.add_generations("c1", gens[::-1]) == ids[::-1]
    changed = NewGeneration(prompt, "other text", 2, 0, "w0", 1, {"temperature": 0.7})
    with pytest.raises(IdempotencyConflict, match=r"sample_index=1") as err:
        ledger.add_generations("c1", [changed])
    assert "worker='w0'" in err.value.key
    assert ledger.row_counts()["generation"] == 3
    ledger.add_generations("c1", [NewGeneration(prompt, "t0", 2, 1, "w0", 0)])
    assert ledger.generations_per_policy_version("c1") == {0: 3, 1: 1}


def test_comparisons_are_idempotent_and_pending(ledger: Ledger, seed) -> None:
    s = seed(ledger, "c1", n_prompts=2, per_prompt=3)
    assert len(s.comparisons) == 6  # 3 pairs per prompt
    g = s.generations[0]
    again = ledger.add_comparisons("c1", [NewComparison(g[0], g[1]), NewComparison(g[1], g[2])])
    assert again == [s.comparisons[0], s.comparisons[2]]
    with pytest.raises(IdempotencyConflict, match="stored selection 'random'"):
        ledger.add_comparisons("c1", [NewComparison(g[0], g[1], "ensemble_disagreement")])
    counts = ledger.comparison_counts("c1")
    assert (counts.pending, counts.claimed, counts.labeled) == (6, 0, 0)
    assert ledger.row_counts()["comparison"] == 6
