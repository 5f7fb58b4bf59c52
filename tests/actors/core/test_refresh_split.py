"""The refresh split (fresh / held out / replay) and the promotion gate, on hand-built rows."""

from __future__ import annotations

import math

import pytest

from actors.core.bradley_terry import PairMetrics
from actors.core.refresh_split import Row, held_out, promotion_gate, split_refresh


def rows(n: int) -> list[Row]:
    return [Row(preference_id=i, comparison_id=100 + i) for i in range(1, n + 1)]


def ids(all_rows, indices) -> list[int]:
    return [all_rows[i].preference_id for i in indices]


def test_first_rm_trains_on_everything_and_holds_nothing_out():
    r = rows(50)
    split = split_refresh(r, fresh_after=0, base_watermark=0, replay_fraction=0.5,
                          replay_window=100, eval_fraction=0.0, seed=0, refresh=1)
    assert ids(r, split.train) == list(range(1, 51))
    assert (split.fresh, split.replay, split.fresh_eval) == (50, 0, ())


def test_replay_is_sized_by_fraction_and_drawn_from_the_recent_window():
    r = rows(100)
    split = split_refresh(r, fresh_after=90, base_watermark=100, replay_fraction=0.75,
                          replay_window=20, eval_fraction=0.0, seed=3, refresh=4)
    assert split.fresh == 10 and ids(r, split.train[:10]) == list(range(91, 101))
    assert split.replay == 20  # wants floor(10 · 0.75 / 0.25) = 30; the window holds 20
    assert sorted(ids(r, split.train[10:])) == list(range(71, 91))  # the whole window
    split = split_refresh(r, fresh_after=90, base_watermark=100, replay_fraction=0.2,
                          replay_window=20, eval_fraction=0.0, seed=3, refresh=4)
    assert split.replay == 2  # floor(10 · 0.2 / 0.8) = 2.5 → 2
    replayed = ids(r, split.train[10:])
    assert all(71 <= p <= 90 for p in replayed) and len(set(replayed)) == 2
    again = split_refresh(r, fresh_after=90, base_watermark=100, replay_fraction=0.2,
                          replay_window=20, eval_fraction=0.0, seed=3, refresh=4)
    assert again == split  # a function of its inputs: rebuildable
    other = [split_refresh(r, fresh_after=90, base_watermark=100, replay_fraction=0.2,
                           replay_window=20, eval_fraction=0.0, seed=3, refresh=v).train
             for v in range(5, 15)]
    assert len(set(other)) > 1  # each refresh draws its own replay


def test_held_out_comparisons_are_stable_and_never_trained_on():
    r = rows(4000)
    chosen = [held_out(row.comparison_id, seed=7, fraction=0.25) for row in r]
    share = sum(chosen) / len(chosen)
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)  # binomial 4-sigma
    assert chosen == [held_out(row.comparison_id, 7, 0.25) for row in r]  # stable
    assert chosen != [held_out(row.comparison_id, 8, 0.25) for row in r]  # seeded
    for fresh_after in (2000, 3000):
        split = split_refresh(r, fresh_after=fresh_after, base_watermark=1000,
                              replay_fraction=0.5, replay_window=4000, eval_fraction=0.25,
                              seed=7, refresh=3)
        trained = set(ids(r, split.train))
        evaluated = set(ids(r, split.fresh_eval))
        held = {row.preference_id for row, c in zip(r, chosen, strict=True)
                if c and row.preference_id > 1000}
        assert not trained & held  # never trained on, fresh or replayed
        assert evaluated == {p for p in held if p > fresh_after}
        assert set(range(1, 1001)) & trained  # seed-era rows are replayable...
        assert split.fresh == len([p for p in range(fresh_after + 1, 4001) if p not in held])


def test_gate_promotes_unless_worse_beyond_tolerance():
    serving = PairMetrics(accuracy=0.70, mean_margin=0.5, ece=0.05, n=40)
    better = PairMetrics(accuracy=0.75, mean_margin=0.6, ece=0.05, n=40)
    slightly_worse = PairMetrics(accuracy=0.675, mean_margin=0.4, ece=0.05, n=40)
    assert promotion_gate(better, serving, 0.0, "fresh").promote
    assert promotion_gate(PairMetrics(0.70, 0.0, 0.0, 40), serving, 0.0, "fresh").promote
    assert not promotion_gate(slightly_worse, serving, 0.0, "fresh").promote
    assert promotion_gate(slightly_worse, serving, 0.025, "fresh").promote
    assert not promotion_gate(slightly_worse, serving, 0.02, "fresh").promote
    broken = PairMetrics(accuracy=float("nan"), mean_margin=float("nan"), ece=0.0, n=40)
    decision = promotion_gate(broken, serving, 1.0, "fresh")
    assert not decision.promote and "worse" in decision.reason
    assert promotion_gate(slightly_worse, None, 0.0, "reference").promote
    empty = promotion_gate(PairMetrics(0.0, 0.0, 0.0, 0), serving, 0.0, "fresh")
    assert not empty.promote and empty.test_set == "none"


def test_replay_fraction_must_leave_room_for_fresh_labels():
    with pytest.raises(ValueError, match="replay_fraction"):
        split_refresh(rows(3), 1, 0, 1.0, 10, 0.0, 0, 2)
