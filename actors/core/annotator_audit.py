"""Annotator audit: who disagrees with the other labelers more than honest noise explains.

Two levels, both from agreement with the *other* labelers of the same comparison (no gold):

* **label**: a label is *flagged* when it differs from the strict majority of the other labels
  of its comparison (leave-one-out, so a label never votes on itself); it is *unscored* when
  fewer than `min_others` others labeled the comparison or they have no strict majority (on an
  evenly split comparison every label is flagged: each sees the other side as the majority);
* **annotator**: its disagreement rate ``d_i = disagreed / scored`` is tested against the
  pooled rate ``p_0`` of every other annotator with a one-sided exact binomial test of
  ``H0: d_i <= p_0 + margin``; an annotator is quarantined when the p-value is below
  ``alpha / n_annotators`` (Bonferroni over the annotators audited) and it has at least
  `min_scored` scored labels.

Honest labelers disagree too (a 10% noisy annotator is flagged on ~10% of its labels), so single
flags are evidence, not verdicts: what is quarantined is an annotator, and the ledger then
leaves all of its labels out of RM training (``Ledger.quarantine``). ``margin`` is the excess
over the pool that honest variation between annotators may show without being quarantined.

The audit needs overlap: comparisons labeled by several labelers (3+ gives a leave-one-out
majority of 2). A loop calls it on a snapshot and quarantines what it returns:

    for a in audit_annotators(ledger.snapshot(name, kinds=("human",)).rows):
        if a.quarantine:
            ledger.quarantine(name, a.labeler_id, a.reason, a.evidence())

>>> rows = [Label(c, who, "a") for c in range(3) for who in ("x", "y", "z")]
>>> rows += [Label(c, "w", "b") for c in range(3)]
>>> [f for f in label_agreement(rows)][-3:]   # w against x, y, z's unanimous "a"
[False, False, False]
>>> round(binom_sf(2, 4, 0.5), 6)   # P(X >= 2), X ~ Bin(4, 1/2) = 11/16
0.6875
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class LabelLike(Protocol):
    """What the audit reads of a label (`storage.records.SnapshotRow` fits)."""

    comparison_id: int
    labeler_id: str
    choice: str


@dataclass(frozen=True)
class Label:
    """A minimal `LabelLike` (tests, simulations)."""

    comparison_id: int
    labeler_id: str
    choice: str


def leave_one_out_majority(choices: Sequence[str], i: int) -> str | None:
    """The strict majority (more than half) of ``choices`` without ``choices[i]``, else None."""
    others = Counter(choices[:i]) + Counter(choices[i + 1 :])
    if not others:
        return None
    choice, count = others.most_common(1)[0]
    return choice if 2 * count > sum(others.values()) else None


def label_agreement(labels: Sequence[LabelLike], min_others: int = 2) -> list[bool | None]:
    """Per label: agrees with the other labelers' strict majority (True), disagrees (False,
    *flagged*), or unscored (None: under ``min_others`` others, or no strict majority).

    Args:
        labels: One label per (comparison, labeler) (a snapshot's effective rows).
        min_others: Fewest other labels of the comparison that make a majority.

    Returns:
        A list aligned with ``labels``.
    """
    by_comparison: dict[int, list[int]] = defaultdict(list)
    for k, label in enumerate(labels):
        by_comparison[label.comparison_id].append(k)
    out: list[bool | None] = [None] * len(labels)
    for members in by_comparison.values():
        if len(members) - 1 < min_others:
            continue
        choices = [labels[k].choice for k in members]
        for i, k in enumerate(members):
            majority = leave_one_out_majority(choices, i)
            out[k] = None if majority is None else choices[i] == majority
    return out


def binom_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, exact (a log-space sum of the pmf)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [
        math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p
        + (n - j) * log_q
        for j in range(k, n + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


@dataclass(frozen=True)
class AnnotatorAudit:
    """One annotator's disagreement with the others and the verdict.

    Attributes:
        labeler_id: Who.
        labels: Its labels in the audit.
        scored: Those with a leave-one-out majority.
        disagreed: Scored labels that differ from the majority (flagged).
        rate: ``disagreed / scored`` (NaN when nothing was scored).
        pool_rate: Pooled disagreement rate of every other annotator.
        p_value: ``P(X >= disagreed)``, ``X ~ Bin(scored, min(1, pool_rate + margin))``.
        threshold: ``alpha / n_annotators``: the p-value below which it is quarantined.
        quarantine: ``p_value < threshold`` and enough scored labels.
    """

    labeler_id: str
    labels: int
    scored: int
    disagreed: int
    rate: float
    pool_rate: float
    p_value: float
    threshold: float
    quarantine: bool

    @property
    def reason(self) -> str:
        """One line for the ledger's quarantine row."""
        return (f"annotator audit: disagrees with the other labelers' majority on "
                f"{self.disagreed}/{self.scored} labels ({self.rate:.3f}) vs {self.pool_rate:.3f} "
                f"for the others (p={self.p_value:.2e} < {self.threshold:.2e})")

    def evidence(self) -> dict[str, float | int]:
        """The numbers behind the verdict (JSON-safe; NaN becomes -1)."""
        def finite(x: float) -> float:
            return x if math.isfinite(x) else -1.0

        return {"labels": self.labels, "scored": self.scored, "disagreed": self.disagreed,
                "rate": finite(self.rate), "pool_rate": finite(self.pool_rate),
                "p_value": self.p_value, "threshold": self.threshold}


def audit_annotators(labels: Sequence[LabelLike], *, alpha: float = 0.01, margin: float = 0.02,
                     min_scored: int = 100, min_others: int = 2) -> list[AnnotatorAudit]:
    """Test every annotator's disagreement rate against the other annotators' pooled rate.

    Args:
        labels: One label per (comparison, labeler).
        alpha: Family-wise false-quarantine rate (Bonferroni over the annotators).
        margin: Excess disagreement over the pool tolerated as honest variation.
        min_scored: Fewest scored labels needed to quarantine anyone.
        min_others: See `label_agreement`.

    Returns:
        One `AnnotatorAudit` per labeler id, sorted by labeler id.
    """
    agreement = label_agreement(labels, min_others)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # labels, scored, disagreed
    for label, agrees in zip(labels, agreement, strict=True):
        c = counts[label.labeler_id]
        c[0] += 1
        if agrees is not None:
            c[1] += 1
            c[2] += not agrees
    total_scored = sum(c[1] for c in counts.values())
    total_disagreed = sum(c[2] for c in counts.values())
    threshold = alpha / max(1, len(counts))
    out = []
    for who in sorted(counts):
        n_labels, scored, disagreed = counts[who]
        pool_n, pool_k = total_scored - scored, total_disagreed - disagreed
        pool = pool_k / pool_n if pool_n else math.nan
        rate = disagreed / scored if scored else math.nan
        p_value = 1.0 if math.isnan(pool) else binom_sf(disagreed, scored,
                                                        min(1.0, pool + margin))
        out.append(AnnotatorAudit(who, n_labels, scored, disagreed, rate, pool, p_value,
                                  threshold, p_value < threshold and scored >= min_scored))
    return out
