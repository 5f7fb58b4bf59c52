"""What one RM refresh trains on and judges by, and the promotion gate.

A refresh sees the ledger snapshot at a watermark. Its labels fall in three groups:

* **fresh**: preferences that arrived after the serving RM's snapshot (`fresh_after`) — mostly
  comparisons of what the current policy writes, the reason the loop refreshes at all;
* **held out**: a stable share of comparisons (a hash of the seed and the comparison id, so the
  same comparisons at every refresh) that no RM ever trains on — the gate's fresh test set.
  Only labels after the first RM's snapshot (`base_watermark`) are held out: the seed pairs
  all train the first RM, which has the fixed reference set to be judged by;
* **replay**: a seeded sample of older, trainable labels, drawn from the most recent
  `replay_window` of them, sized so that it makes up `replay_fraction` of the training set.

Everything is a function of (snapshot rows, watermarks, config, seed, refresh number), so the
training set of any RM version rebuilds from the ledger (its row records the refresh number as
`rm/refresh`).

>>> rows = [Row(p, p) for p in range(1, 11)]  # preference id = comparison id = 1..10
>>> s = split_refresh(rows, fresh_after=6, base_watermark=0, replay_fraction=0.5,
...                   replay_window=10, eval_fraction=0.0, seed=0, refresh=2)
>>> (s.fresh, s.replay, sorted(rows[i].preference_id for i in s.train)[-4:])
(4, 4, [7, 8, 9, 10])
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from actors.core.bradley_terry import PairMetrics


class LabelRow(Protocol):
    """What the split reads of a snapshot row (`storage.records.SnapshotRow` fits)."""

    preference_id: int
    comparison_id: int


@dataclass(frozen=True)
class Row:
    """A minimal `LabelRow` (tests, examples)."""

    preference_id: int
    comparison_id: int


def held_out(comparison_id: int, seed: int, fraction: float) -> bool:
    """Whether a comparison belongs to the never-trained fresh test set: a stable hash of
    (seed, comparison id) below `fraction` — the same answer at every refresh, on every node."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}:{comparison_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@dataclass(frozen=True)
class RefreshSplit:
    """Row indices (into the snapshot rows) of one refresh.

    Attributes:
        train: Indices trained on: all trainable fresh rows, then the replay sample.
        fresh_eval: Indices of held-out fresh rows (the gate's test set).
        fresh: Trainable fresh rows in `train`.
        replay: Replayed older rows in `train`.
    """

    train: tuple[int, ...]
    fresh_eval: tuple[int, ...]
    fresh: int
    replay: int


def split_refresh(rows: Sequence[LabelRow], fresh_after: int, base_watermark: int,
                  replay_fraction: float, replay_window: int, eval_fraction: float,
                  seed: int, refresh: int) -> RefreshSplit:
    """Split snapshot rows into this refresh's training set and fresh test set.

    Args:
        rows: The snapshot's rows, by preference id.
        fresh_after: Watermark of the serving RM's snapshot (0 for the first RM: all fresh).
        base_watermark: Watermark of the first RM's snapshot: later labels may be held out.
        replay_fraction: Share of the training set drawn from older rows, in [0, 1).
        replay_window: Replay draws from at most this many of the most recent older rows.
        eval_fraction: Share of comparisons held out (see `held_out`).
        seed: Campaign seed.
        refresh: Which of the campaign's refreshes this is (1 for the first RM); seeds the
            replay draw. Not the version number: a refresh recorded after the last checkpoint
            keeps its number, and the resumed campaign redoes it under the next one.

    Returns:
        The `RefreshSplit`.
    """
    if not 0.0 <= replay_fraction < 1.0:
        raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
    evaluation = [i for i, r in enumerate(rows) if r.preference_id > base_watermark
                  and held_out(r.comparison_id, seed, eval_fraction)]
    skip = set(evaluation)
    trainable = [i for i in range(len(rows)) if i not in skip]
    fresh = [i for i in trainable if rows[i].preference_id > fresh_after]
    fresh_eval = tuple(i for i in evaluation if rows[i].preference_id > fresh_after)
    older = [i for i in trainable if rows[i].preference_id <= fresh_after][-replay_window:]
    wanted = math.floor(len(fresh) * replay_fraction / (1.0 - replay_fraction) + 1e-9)
    take = min(wanted, len(older))
    picked = np.random.default_rng([seed, refresh, 2]).choice(len(older), take, replace=False)
    replay = [older[j] for j in sorted(picked.tolist())]
    return RefreshSplit(train=tuple(fresh + replay), fresh_eval=fresh_eval, fresh=len(fresh),
                        replay=len(replay))


def older_trainable(rows: Sequence[LabelRow], fresh_after: int, base_watermark: int,
                    eval_fraction: float, seed: int) -> int:
    """How many rows a replay could draw from: at or below `fresh_after` and not held out
    (`split_refresh` replays from the last `replay_window` of them)."""
    return sum(1 for r in rows if r.preference_id <= fresh_after
               and not (r.preference_id > base_watermark
                        and held_out(r.comparison_id, seed, eval_fraction)))


@dataclass(frozen=True)
class GateDecision:
    """The promotion gate's verdict on a candidate RM.

    Attributes:
        promote: Serve the candidate.
        reason: One line for the ledger's status event and the logs.
        test_set: "fresh" (held-out fresh pairs) or "reference" (the fixed set) or "none".
    """

    promote: bool
    reason: str
    test_set: str


def promotion_gate(candidate: PairMetrics | None, serving: PairMetrics | None,
                   tolerance: float, test_set: str) -> GateDecision:
    """Promote unless the candidate's pair accuracy is below the serving RM's by > tolerance.

    Both are measured on the same pairs (`test_set`). With no serving RM the candidate is
    promoted; with a serving RM but no test pairs it is not (nothing shows it is not worse).
    A NaN accuracy (a broken candidate) is never promoted.
    """
    if serving is None:
        return GateDecision(True, "no serving RM to compare with", test_set)
    if candidate is None or candidate.n == 0:
        return GateDecision(False, "no held-out pairs to compare on: kept the serving RM",
                            "none")
    gap = candidate.accuracy - serving.accuracy
    verdict = f"accuracy {candidate.accuracy:.3f} vs serving {serving.accuracy:.3f} " \
              f"on {candidate.n} {test_set} pairs (tolerance {tolerance:.3f})"
    if math.isnan(candidate.accuracy) or gap < -tolerance - 1e-12:
        return GateDecision(False, f"worse: {verdict}", test_set)
    return GateDecision(True, f"not worse: {verdict}", test_set)
