"""Trend statistics and the per-iteration history that the reward-hacking monitors keep.

The monitors (`actors.core.monitors`) compare each iteration with the ones before it. What they
need from the past is small: one `IterationSummary` per iteration (mean length, mean proxy reward,
mean gold reward), kept for the last few iterations in a `MonitorHistory`, which is immutable and
round-trips through a plain JSON-able dict so a resumed campaign continues its trends.

Two statistics, both in float64:

    slope(x, y) = Σ (x_i − x̄)(y_i − ȳ) / Σ (x_i − x̄)²                    (least squares)
    corr(x, y)  = Σ (x_i − x̄)(y_i − ȳ) / √(Σ (x_i − x̄)² · Σ (y_i − ȳ)²)   (Pearson)

Trends regress on the iteration *numbers*, not on positions in the window, so a skipped iteration
keeps its place on the x axis. `pearson` is 0, not NaN, when either side is constant: a constant
has no linear association to measure, and 0 keeps the monitors' comparisons well defined.

>>> slope([0, 1, 3], [2.5, 3.5, 5.5])
1.0
>>> round(pearson([1, 2, 3, 4], [0, 2, 1, 5]), 6)  # 7 / √70
0.83666
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from typing import Any

import numpy as np


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of `y` on `x`.

    Args:
        x: `(n,)` abscissae (iteration numbers), at least two distinct.
        y: `(n,)` values.

    Returns:
        dy/dx of the least-squares line.

    Raises:
        ValueError: For mismatched lengths or fewer than two distinct `x`.
    """
    xs = np.asarray(x, dtype=np.float64)  # (n,)
    ys = np.asarray(y, dtype=np.float64)  # (n,)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"slope needs two 1-D sequences of one length, got shapes "
                         f"{xs.shape} and {ys.shape}")
    if xs.size < 2 or np.ptp(xs) == 0:
        raise ValueError(f"slope needs at least two distinct x values, got {xs.tolist()}")
    dx = xs - xs.mean()
    return float(dx @ (ys - ys.mean()) / (dx @ dx))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of `x` and `y`; 0 when either is constant (or n < 2).

    Args:
        x: `(n,)` values.
        y: `(n,)` values.

    Returns:
        corr(x, y) in [−1, 1].
    """
    xs = np.asarray(x, dtype=np.float64)  # (n,)
    ys = np.asarray(y, dtype=np.float64)  # (n,)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"pearson needs two 1-D sequences of one length, got shapes "
                         f"{xs.shape} and {ys.shape}")
    # ptp, not the centred sum: the mean of equal floats can differ from them in the last bit.
    if xs.size < 2 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return 0.0
    dx, dy = xs - xs.mean(), ys - ys.mean()
    r = float(dx @ dy / math.sqrt(float(dx @ dx) * float(dy @ dy)))
    return min(1.0, max(-1.0, r))


@dataclass(frozen=True)
class IterationSummary:
    """What later iterations need to know about one iteration.

    Attributes:
        iteration: Loop iteration.
        length_mean: Mean response length in words.
        proxy_mean: Mean proxy (reward-model) reward.
        gold_mean: Mean gold reward; None when the iteration had no gold scores.
        length_corr_gap: corr(length, proxy) − corr(length, gold) of the iteration's batch;
            None without gold scores.
    """

    iteration: int
    length_mean: float
    proxy_mean: float
    gold_mean: float | None
    length_corr_gap: float | None = None


_SUMMARY_KEYS = frozenset(f.name for f in fields(IterationSummary))
_OPTIONAL_KEYS = frozenset({"length_corr_gap"})  # checkpoints written before it existed lack it


@dataclass(frozen=True)
class MonitorHistory:
    """The summaries of the last iterations, oldest first, iteration numbers increasing.

    Immutable: `updated` returns a new history. `to_dict` / `from_dict` are the checkpoint form.

    Attributes:
        summaries: One `IterationSummary` per kept iteration.
    """

    summaries: tuple[IterationSummary, ...] = ()

    def updated(self, summary: IterationSummary, keep: int) -> MonitorHistory:
        """This history with `summary` appended, trimmed to the last `keep` iterations.

        Summaries of the same or a later iteration are dropped first, so re-running an
        iteration after a resume replaces its summary instead of counting it twice.
        """
        if keep < 1:
            raise ValueError(f"a monitor history keeps at least 1 iteration, got keep={keep}")
        earlier = tuple(s for s in self.summaries if s.iteration < summary.iteration)
        return MonitorHistory((*earlier, summary)[-keep:])

    def last(self, n: int) -> tuple[IterationSummary, ...]:
        """The last `n` summaries (fewer when the history is shorter)."""
        return self.summaries[-n:] if n > 0 else ()

    def to_dict(self) -> dict[str, Any]:
        """`{"summaries": [{"iteration": …, "length_mean": …, …}, …]}`: plain, JSON-able."""
        return {"summaries": [asdict(s) for s in self.summaries]}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> MonitorHistory:
        """Restore what `to_dict` returned.

        Raises:
            ValueError: Naming the entry and the keys when `state` is not of that form.
        """
        if set(state) != {"summaries"}:
            raise ValueError(f"monitor history state needs exactly the key 'summaries', got "
                             f"keys {sorted(state)}")
        summaries = []
        for i, entry in enumerate(state["summaries"]):
            if not _SUMMARY_KEYS - _OPTIONAL_KEYS <= set(entry) <= _SUMMARY_KEYS:
                raise ValueError(
                    f"monitor history summaries[{i}] needs keys {sorted(_SUMMARY_KEYS)}, got "
                    f"{sorted(entry)}")
            gold, gap = entry["gold_mean"], entry.get("length_corr_gap")
            summaries.append(IterationSummary(
                iteration=int(entry["iteration"]), length_mean=float(entry["length_mean"]),
                proxy_mean=float(entry["proxy_mean"]),
                gold_mean=None if gold is None else float(gold),
                length_corr_gap=None if gap is None else float(gap)))
        iterations = [s.iteration for s in summaries]
        if any(b <= a for a, b in pairwise(iterations)):
            raise ValueError(f"monitor history iterations must increase, got {iterations}")
        return cls(tuple(summaries))
