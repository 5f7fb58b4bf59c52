"""Issue #9, item 7: one annotator poisons 5% of its labels; the audit flags them by agreement
with the other labelers, quarantines the poisoner (and no honest annotator), and the ledger
leaves its preferences out of RM training.

The simulated campaign (`simulate`): 7 annotators label 4,000 two-way comparisons, each
comparison by 6 of them drawn at random (~3,430 labels each). Six are honest with label noise
0.08, 0.09, 0.10, 0.10, 0.11, 0.12 (mean 0.10: a noisy label is the opposite of the gold
preference). The poisoner, ``ann-6``, has honest noise 0.10 and on a random 5% of its labels
answers the opposite of gold on purpose (its *poisoned* labels).

What is measured over what:

* label recall: poisoned labels flagged / poisoned labels (>= 0.9);
* label false positives: honest annotators' *correct* labels (equal to gold) flagged / those
  labels (<= 0.05). Honest *noisy* labels are flagged as often as poisoned ones (~10% of all
  honest labels): a single flag is evidence, not a verdict, which is why the decision is per
  annotator;
* annotator level: the poisoner quarantined and no honest annotator, in the pinned campaign;
  over 30 seeded campaigns (`slow`), poisoner quarantined in >= 90% of them and honest
  annotators quarantined in <= 5% of the 180 honest annotator-campaigns;
* training exclusion: after the quarantine, every label of the poisoner (100% of the poisoned
  ones) and no honest label is left out of the snapshot an RM refresh trains on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from actors.core.annotator_audit import (
    Label,
    audit_annotators,
    binom_sf,
    label_agreement,
    leave_one_out_majority,
)
from actors.core.refresh_split import split_refresh
from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration, NewPreference

HONEST_NOISE = (0.08, 0.09, 0.10, 0.10, 0.11, 0.12)
POISONER = "ann-6"
HONEST = tuple(f"ann-{i}" for i in range(len(HONEST_NOISE)))


@dataclass(frozen=True)
class Campaign:
    """Simulated labels; ``poisoned[k]``/``correct[k]`` describe ``labels[k]``."""

    labels: list[Label]
    poisoned: np.ndarray  # (L,) bool
    correct: np.ndarray  # (L,) bool: equal to the gold preference


def simulate(seed: int, comparisons: int = 4000, per: int = 6, poison: float = 0.05
             ) -> Campaign:
    """The campaign of the module docstring (``poison=0`` makes ``ann-6`` honest)."""
    rng = np.random.default_rng(seed)
    noise = np.array([*HONEST_NOISE, 0.10])
    n = len(noise)
    who = np.argsort(rng.random((comparisons, n)), axis=1)[:, :per]  # (C, per) annotators
    gold = rng.integers(0, 2, comparisons)[:, None]  # (C, 1): 0 = "a" wins
    poisoned = (who == n - 1) & (rng.random(who.shape) < poison)
    wrong = poisoned | (rng.random(who.shape) < noise[who])
    choice = np.where(wrong, 1 - gold, gold)
    labels = [Label(c, f"ann-{w}", "ab"[x])
              for c in range(comparisons) for w, x in zip(who[c], choice[c], strict=True)]
    return Campaign(labels, poisoned.ravel(), ~wrong.ravel())


def label_rates(camp: Campaign) -> tuple[float, float, float]:
    """(label recall, label false-positive rate, share of all honest labels flagged)."""
    flagged = np.array([a is False for a in label_agreement(camp.labels)])
    honest = np.array([label.labeler_id != POISONER for label in camp.labels])
    return (float(flagged[camp.poisoned].mean()), float(flagged[honest & camp.correct].mean()),
            float(flagged[honest].mean()))


def quarantined(labels: Sequence[Label]) -> list[str]:
    return [a.labeler_id for a in audit_annotators(labels, margin=0.01) if a.quarantine]


# -- the pure functions, by hand ---------------------------------------------------------------


def test_binomial_tail_by_hand_and_against_the_naive_sum():
    assert binom_sf(2, 4, 0.5) == pytest.approx(11 / 16, rel=1e-12)
    assert binom_sf(3, 3, 0.5) == pytest.approx(1 / 8, rel=1e-12)
    assert (binom_sf(0, 5, 0.3), binom_sf(6, 5, 0.3), binom_sf(1, 5, 0.0)) == (1.0, 0.0, 0.0)
    for k in (0, 10, 25, 40, 80):
        naive = sum(math.comb(200, j) * 0.1**j * 0.9 ** (200 - j) for j in range(k, 201))
        assert binom_sf(k, 200, 0.1) == pytest.approx(naive, rel=1e-9)


def test_leave_one_out_majority_never_counts_the_label_itself():
    assert leave_one_out_majority(["a", "a", "b"], 2) == "a"
    assert leave_one_out_majority(["a", "a", "b"], 0) is None  # others: a, b (a split)
    assert leave_one_out_majority(["a", "tie", "tie", "b"], 0) == "tie"  # 2 of 3 others
    assert leave_one_out_majority(["a", "tie", "b", "b", "tie"], 0) is None  # 2 of 4: no
    assert leave_one_out_majority(["a"], 0) is None


def test_label_agreement_flags_and_leaves_unscored():
    labels = [Label(1, "x", "a"), Label(1, "y", "a"), Label(1, "z", "b"),
              Label(2, "x", "a"), Label(2, "y", "b"),
              Label(3, "x", "a"), Label(3, "y", "b"), Label(3, "z", "a"), Label(3, "w", "b")]
    # 1: x sees (a, b) and y sees (a, b): splits; z sees (a, a) and says b: flagged.
    # 2: one other each: unscored. 3: a 2-2 split: each label sees the other side 2 to 1.
    assert label_agreement(labels) == [None, None, False, None, None,
                                       False, False, False, False]
    assert label_agreement(labels, min_others=1)[3:5] == [False, False]
    assert label_agreement([*labels[:2], Label(1, "z", "a")]) == [True, True, True]


def test_audit_rates_pool_and_verdict_by_hand():
    # 200 comparisons labeled by x, y, z. 0..59: z says b against x, y's a; 60..69: x says b
    # against y, z's a; 70..199: all say a. With 3 labels a label is scored only when the two
    # others agree: z is flagged on 0..59 and unscored on 60..69, x the other way round, y is
    # unscored on 0..69. z: 60 of 190 scored; x: 10 of 140; y: 0 of 130.
    labels = []
    for c in range(200):
        labels += [Label(c, "x", "b" if 60 <= c < 70 else "a"), Label(c, "y", "a"),
                   Label(c, "z", "b" if c < 60 else "a")]
    audits = {a.labeler_id: a for a in audit_annotators(labels, margin=0.0)}
    z, x, y = audits["z"], audits["x"], audits["y"]
    assert (z.labels, z.scored, z.disagreed, z.rate) == (200, 190, 60, 60 / 190)
    assert z.pool_rate == 10 / 270  # x and y: 10 disagreements of 140 + 130 scored
    assert (x.scored, x.disagreed, x.pool_rate) == (140, 10, 60 / 320)
    assert (y.scored, y.disagreed, y.pool_rate) == (130, 0, 70 / 330)
    assert z.p_value == pytest.approx(binom_sf(60, 190, 10 / 270), rel=1e-12)
    assert z.threshold == pytest.approx(0.01 / 3)
    assert [a.labeler_id for a in audits.values() if a.quarantine] == ["z"]
    assert z.evidence()["disagreed"] == 60 and "60/190" in z.reason
    # too few scored labels: nobody is quarantined on 50 of them
    assert not any(a.quarantine for a in audit_annotators(labels[:150], margin=0.0))


# -- the simulated campaign ---------------------------------------------------------------------


def test_the_poisoner_is_flagged_and_quarantined_and_no_honest_annotator_is():
    camp = simulate(seed=0)
    recall, false_pos, honest_flagged = label_rates(camp)
    assert int(camp.poisoned.sum()) > 100  # ~171 poisoned labels (5% of ~3,430)
    assert recall >= 0.9
    assert false_pos <= 0.05
    assert 0.07 <= honest_flagged <= 0.13  # honest disagreement: why a flag is not a verdict
    assert quarantined(camp.labels) == [POISONER]


def test_negative_control_without_poison_nobody_is_quarantined():
    """The same campaign with ``ann-6`` honest: the verdict above came from the 5% poison, not
    from the annotator's name, its noise, or the test's numbers."""
    camp = simulate(seed=0, poison=0.0)
    assert int(camp.poisoned.sum()) == 0
    assert quarantined(camp.labels) == []
    # and with the poison, leaving the poisoned labels out of the audit clears the poisoner
    poisoned = simulate(seed=0)
    kept = [lab for lab, bad in zip(poisoned.labels, poisoned.poisoned, strict=True) if not bad]
    assert quarantined(kept) == []


@pytest.mark.slow
def test_recall_and_false_positives_over_30_campaigns():
    seeds = range(1, 31)
    caught, honest_quarantined = 0, 0
    for seed in seeds:
        camp = simulate(seed)
        recall, false_pos, _ = label_rates(camp)
        assert recall >= 0.9 and false_pos <= 0.05, (seed, recall, false_pos)
        found = quarantined(camp.labels)
        caught += POISONER in found
        honest_quarantined += sum(name in found for name in HONEST)
    assert caught / len(seeds) >= 0.9
    assert honest_quarantined / (len(seeds) * len(HONEST)) <= 0.05


# -- quarantine in the ledger: RM training leaves the poisoner out ------------------------------


def _ledger_of(url: str, camp: Campaign) -> tuple[Ledger, list[int]]:
    """The campaign in a ledger: 400 prompts x 5 generations, every pair (4,000 comparisons)."""
    ledger = Ledger.open(url)
    ledger.ensure_campaign("c1")
    prompts = ledger.add_prompts("c1", [f"prompt {i}" for i in range(400)])
    gens = ledger.add_generations("c1", [NewGeneration(p, f"answer {p}.{k}", 2, 0, "w0", k)
                                         for p in prompts for k in range(5)])
    pairs = [NewComparison(gens[5 * i + a], gens[5 * i + b])
             for i in range(400) for a in range(5) for b in range(a + 1, 5)]
    comparisons = ledger.add_comparisons("c1", pairs)
    prefs = [NewPreference(comparisons[lab.comparison_id], lab.choice, "human", lab.labeler_id)
             for lab in camp.labels]
    for start in range(0, len(prefs), 4000):
        ledger.record_preferences("c1", prefs[start:start + 4000])
    return ledger, comparisons


def test_audit_to_quarantine_to_training_set_end_to_end(db_url: str):
    camp = simulate(seed=0)
    ledger, comparisons = _ledger_of(db_url, camp)
    before = ledger.snapshot("c1")
    ledger.record_model_version("c1", "rm", 1, snapshot=before.ref)
    assert len(before.rows) == len(camp.labels)

    for audit in audit_annotators(before.rows, margin=0.01):  # what the loop calls
        if audit.quarantine:
            ledger.quarantine("c1", audit.labeler_id, audit.reason, audit.evidence())
    [q] = ledger.quarantines("c1")
    assert (q.labeler_id, q.watermark) == (POISONER, before.watermark)
    assert q.evidence["scored"] > 3000 and q.evidence["p_value"] < q.evidence["threshold"]

    # Snapshots that could exist before the quarantine keep their rows and hash.
    assert ledger.snapshot("c1", before.watermark) == before
    assert ledger.training_set("c1", 1).sha256 == before.sha256
    # The next label moves the watermark past the quarantine: the poisoner's rows leave.
    unlabeled = next(c for c in comparisons  # a comparison ann-0 did not label
                     if all(r.labeler_id != "ann-0" for r in before.rows if r.comparison_id == c))
    new = ledger.record_preference("c1", NewPreference(unlabeled, "a", "human", "ann-0"))
    after = ledger.snapshot("c1")
    assert after.watermark == new.id > q.watermark
    kept = [r for r in before.rows if r.labeler_id != POISONER]
    assert [r.preference_id for r in after.rows] == [r.preference_id for r in kept] + [new.id]
    assert after.rows[:-1] == tuple(kept)
    assert len(before.rows) - len(kept) == sum(lab.labeler_id == POISONER for lab in camp.labels)
    assert after.sha256 != before.sha256

    # RM training: the refresh split of the new snapshot holds no label of the poisoner.
    split = split_refresh(after.rows, fresh_after=0, base_watermark=after.watermark,
                          replay_fraction=0.0, replay_window=10, eval_fraction=0.0, seed=0,
                          refresh=2)
    assert len(split.train) == len(after.rows)
    assert {after.rows[i].labeler_id for i in split.train} == set(HONEST)
    ledger.record_model_version("c1", "rm", 2, snapshot=after.ref, parent_version=1)
    assert ledger.preferences_per_rm_version("c1") == {1: len(before.rows), 2: len(after.rows)}
    assert ledger.training_set("c1", 2).sha256 == after.sha256


def test_quarantine_is_idempotent_scoped_to_its_campaign_and_covers_corrections(db_url: str):
    ledger = Ledger.open(db_url)
    ids = {}
    for name in ("c1", "c2"):
        ledger.ensure_campaign(name)
        [p] = ledger.add_prompts(name, [f"{name} prompt"])
        g = ledger.add_generations(name, [NewGeneration(p, f"{name} {k}", 1, 0, "w", k)
                                          for k in range(3)])
        ids[name] = ledger.add_comparisons(name, [NewComparison(g[0], g[1]),
                                                  NewComparison(g[0], g[2])])
    c1a, c1b = ids["c1"]
    bad = ledger.record_preference("c1", NewPreference(c1a, "a", "ai", "mallory"))
    fixed = ledger.record_preference("c1", NewPreference(c1a, "b", "ai", "mallory",
                                                         supersedes=bad.id))
    honest = ledger.record_preference("c1", NewPreference(c1b, "a", "ai", "alice"))
    other = ledger.record_preference("c2", NewPreference(ids["c2"][0], "a", "ai", "mallory"))
    first = ledger.quarantine("c1", "mallory", "audit", {"p_value": 1e-6})
    assert ledger.quarantine("c1", "mallory", "again, other reason") == first  # idempotent
    assert first.watermark == other.id  # the ledger-wide highest id: no earlier snapshot moves
    assert [r.preference_id for r in ledger.snapshot("c1", other.id).rows] == [fixed.id,
                                                                                honest.id]
    late = ledger.record_preference("c1", NewPreference(c1b, "b", "ai", "bob"))
    assert [r.preference_id for r in ledger.snapshot("c1").rows] == [honest.id, late.id]
    assert [r.preference_id for r in ledger.snapshot("c2").rows] == [other.id]  # c2 untouched
    assert ledger.quarantines("c2") == []
