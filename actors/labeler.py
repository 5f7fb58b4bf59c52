"""Labeler: an AI labeler that claims pending comparisons by lease, judges them, records labels.

One actor owns one judge (`actors.core.judges`) and a ledger handle. Each round of `label` it
leases comparisons (owner = its actor name), judges them, records the verdicts in one
transaction with lease fencing, and gives back what it did not label: abstentions, and claims it
took only to choose among. `LabelerGroup` is the driver-side handle of L labelers.

    group = LabelerGroup.launch(cfg.labeling, ledger_url, "demo", judge)
    counts = group.label(max_items=64)            # LabelCounts; counts.as_metrics() -> label/*
    group.shutdown()

Exactly once. A comparison is labeled by one labeler: leases keep others off it, and a labeler
whose lease expired (and was re-claimed) gets ``LeaseLost`` instead of writing. A retried write
(same labeler, same comparison, same verdict) returns the stored row: the idempotency key is
``labeler:{name}:{comparison_id}``, so no duplicate row appears.

Pair selection. ``random``: claims come in the ledger's order (priority, then oldest); the pairs
were picked at random when the driver created them (``NewComparison.selection``), so the labeler
adds nothing. ``disagreement``: largest RM-ensemble disagreement first. The ensemble lives with
the RM, not here, so the driver passes per-comparison scores
(`actors.core.ensemble.pair_disagreement`) to `label`; the labeler then claims a window of the
queue, keeps the highest-scored comparisons (unscored ones last, in ledger order) and releases
the rest at once. The order is exact for one labeler whose window covers the queue (at most
``MAX_WINDOW`` claims), approximate across labelers that share it. Without scores the ledger's
``priority`` orders claims, which the driver can set to the disagreement when it creates pairs.

Budget. ``max_items`` counts labels recorded; abstentions do not use it. Each comparison is
judged at most once per call (an abstained one is released and skipped for the rest of the
call), so a call ends when the budget is spent or the queue holds nothing new for this labeler.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import ray

from actors.core.judges import Judge, JudgeInput, Judgment
from storage.errors import LeaseLost
from storage.ledger import Ledger
from storage.records import Claim, NewPreference

if TYPE_CHECKING:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from loop.config import LabelingConfig

MAX_WINDOW = 1024
"""Most comparisons one disagreement-ordered claim looks at."""
EMPTY_RETRIES = 3
"""Rounds a disagreement-ordered labeler waits for peers to release their claim windows."""


@dataclass(frozen=True)
class LabelCounts:
    """What `label` did.

    Attributes:
        labeled: New preference rows.
        repeated: Labels that were already recorded (a retried write): no new row.
        abstained: Comparisons the judge gave no verdict on (released to the queue).
        lease_lost: Verdicts not recorded because the lease expired and another labeler took the
            comparison over.
    """

    labeled: int = 0
    repeated: int = 0
    abstained: int = 0
    lease_lost: int = 0

    def __add__(self, other: LabelCounts) -> LabelCounts:
        return LabelCounts(*(getattr(self, f.name) + getattr(other, f.name)
                             for f in fields(self)))

    def as_metrics(self) -> dict[str, float]:
        """``label/labeled``, ``label/repeated``, ``label/abstained``, ``label/lease_lost``."""
        return {f"label/{f.name}": float(getattr(self, f.name)) for f in fields(self)}


def order_claims(claims: Sequence[Claim], scores: Mapping[int, float] | None) -> list[Claim]:
    """Claims by descending score (unscored last, keeping the ledger's order among equals)."""
    if not scores:
        return list(claims)
    return sorted(claims, key=lambda c: -scores.get(c.comparison_id, float("-inf")))


@ray.remote(num_cpus=0.5)
class Labeler:
    """One AI labeler; its actor name is its lease owner and ledger labeler id."""

    def __init__(self, name: str, ledger_url: str, campaign: str, judge: Judge,
                 selection: str = "random", lease_s: float = 60.0, batch_size: int = 16):
        self.name, self.campaign, self.judge = name, campaign, judge
        self.selection, self.lease_s, self.batch_size = selection, lease_s, batch_size
        self.ledger = Ledger(ledger_url)

    def label(self, max_items: int, disagreement: Mapping[int, float] | None = None
              ) -> LabelCounts:
        """Label up to ``max_items`` comparisons (see the module docstring for the order)."""
        scores = disagreement if self.selection == "disagreement" else None
        counts, empty_rounds = LabelCounts(), 0
        skipped: set[int] = set()
        while (done := counts.labeled + counts.repeated) < max_items:
            want = min(self.batch_size, max_items - done)
            window = min(MAX_WINDOW, want + len(scores)) if scores else want
            claims = self.ledger.claim(self.campaign, self.name, window + len(skipped),
                                       self.lease_s)
            fresh = order_claims([c for c in claims if c.comparison_id not in skipped], scores)
            chosen = fresh[:want]
            kept = {c.comparison_id for c in chosen}
            self._release([c.comparison_id for c in claims if c.comparison_id not in kept])
            if not chosen:
                if scores and empty_rounds < EMPTY_RETRIES and self._peers_hold_claims():
                    empty_rounds += 1
                    time.sleep(0.05 * 2**empty_rounds)
                    continue
                break
            batch, abstained = self._judge_and_record(chosen)
            counts += batch
            skipped.update(abstained)
        return counts

    def label_claims(self, claims: Sequence[Claim]) -> LabelCounts:
        """Judge and record these claims (held by this labeler); release abstentions."""
        return self._judge_and_record(claims)[0]

    def _peers_hold_claims(self) -> bool:
        return self.ledger.comparison_counts(self.campaign).claimed > 0

    def _release(self, ids: Sequence[int]) -> None:
        if ids:
            self.ledger.release(self.campaign, self.name, ids)

    def _judge_and_record(self, claims: Sequence[Claim]) -> tuple[LabelCounts, list[int]]:
        try:
            judgments = self.judge.judge([JudgeInput(c.prompt, c.text_a, c.text_b)
                                          for c in claims])
            abstained = [c.comparison_id for c, j in zip(claims, judgments, strict=True)
                         if j.abstained]
            self._release(abstained)
            counts = self._record([self._preference(c, j)
                                   for c, j in zip(claims, judgments, strict=True)
                                   if not j.abstained])
        except BaseException:
            # give the batch back at once (labeled rows are untouched) instead of letting the
            # leases run out, then fail loudly
            self._release([c.comparison_id for c in claims])
            raise
        return LabelCounts(counts.labeled, counts.repeated, len(abstained),
                           counts.lease_lost), abstained

    def _preference(self, claim: Claim, judgment: Judgment) -> NewPreference:
        assert judgment.choice is not None, "abstentions are released, never recorded"
        return NewPreference(
            comparison_id=claim.comparison_id,
            choice=judgment.choice,
            labeler_kind=self.judge.kind,
            labeler_id=self.name,
            strength=judgment.confidence,
            idempotency_key=f"labeler:{self.name}:{claim.comparison_id}",
        )

    def _record(self, prefs: list[NewPreference]) -> LabelCounts:
        """One transaction; if a lease was lost, one row at a time to keep the others."""
        if not prefs:
            return LabelCounts()
        try:
            results = self.ledger.record_preferences(self.campaign, prefs, self.name)
        except LeaseLost:
            results, lost = [], 0
            for pref in prefs:
                try:
                    results.append(self.ledger.record_preference(self.campaign, pref, self.name))
                except LeaseLost:
                    lost += 1
            created = sum(r.created for r in results)
            return LabelCounts(created, len(results) - created, 0, lost)
        created = sum(r.created for r in results)
        return LabelCounts(created, len(results) - created)


class LabelerGroup:
    """Driver-side handle of L `Labeler` actors named ``{name_prefix}-{i}``."""

    def __init__(self, actors: list, names: list[str]):
        self.actors, self.names = actors, names

    @classmethod
    def launch(cls, cfg: LabelingConfig, ledger_url: str, campaign: str, judge: Judge, *,
               name_prefix: str = "labeler", batch_size: int = 16, num_cpus: float = 0.5,
               max_restarts: int = 0,
               scheduling: Sequence[PlacementGroupSchedulingStrategy] | None = None
               ) -> LabelerGroup:
        """Start ``cfg.labelers`` labelers that share ``judge`` (each gets a copy).

        ``max_restarts`` also bounds retries of a `label` call on a restarted actor, which is
        safe: leases and idempotent writes make a retried call label nothing twice.
        ``scheduling`` gives labeler i its placement-group bundle (`loop.placement`); None
        lets Ray place them.
        """
        names = [f"{name_prefix}-{i}" for i in range(cfg.labelers)]
        places = [None] * len(names) if scheduling is None else list(scheduling)
        if len(places) != len(names):
            raise ValueError(f"{len(places)} scheduling strategies for {len(names)} labelers")
        judge_ref = ray.put(judge)
        actors = [Labeler.options(name=name, num_cpus=num_cpus, max_restarts=max_restarts,
                                  max_task_retries=max_restarts, scheduling_strategy=place)
                  .remote(name, ledger_url, campaign, judge_ref, cfg.selection,
                          cfg.lease_seconds, batch_size)
                  for name, place in zip(names, places, strict=True)]
        return cls(actors, names)

    def label(self, max_items: int, disagreement: Mapping[int, float] | None = None
              ) -> LabelCounts:
        """Label up to ``max_items`` comparisons in all, split evenly across the labelers.

        Args:
            max_items: Label budget of this call (labels recorded).
            disagreement: comparison id → RM-ensemble disagreement, used when
                ``labeling.selection`` is ``disagreement``.
        """
        n = len(self.actors)
        shares = [max_items // n + (i < max_items % n) for i in range(n)]
        scores = ray.put(dict(disagreement)) if disagreement else None
        results = ray.get([actor.label.remote(share, scores)
                           for actor, share in zip(self.actors, shares, strict=True) if share])
        return sum(results, LabelCounts())

    def shutdown(self) -> None:
        """Kill every labeler (idempotent); their unreleased leases simply expire."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.names = [], []
