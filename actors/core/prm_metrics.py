"""Step judgments from an outcome RM, threshold picking, and step-error F1 per error class.

An outcome reward model (ORM) gives one score per whole solution, so it has no step output of its
own. (Lightman et al. 2023 compare the two only on whole solutions, by best-of-N.) To get step
judgments from it, score every prefix

    r_0 = r(question),  r_k = r(question, step_1 … step_k),   k = 1 … S

and to flag step k as wrong when the score drops across it by at least a threshold τ:

    d_k = r_{k−1} − r_k,      step k flagged  ⇔  d_k ≥ τ

τ (like a PRM's threshold on P(wrong)) is picked for the best step-error F1 on held-out TRAIN
solutions, from a grid of quantiles of the validation scores (ORM rewards have no fixed scale).

>>> import torch
>>> prefix_drops(torch.tensor([0.5, 0.25, 1.0])).tolist()
[0.25, -0.75]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from actors.core.process_rm import StepErrorF1, step_error_f1


def prefix_drops(prefix_scores: torch.Tensor) -> torch.Tensor:
    """Score drop across each step: d_k = r_{k−1} − r_k.

    Args:
        prefix_scores: `(S+1,)` ORM scores of the prefixes with 0, 1, …, S steps.

    Returns:
        `(S,)` drops; d_k > 0 where adding step k lowered the score.
    """
    if prefix_scores.dim() != 1 or prefix_scores.numel() < 2:
        raise ValueError(f"expected (S+1,) prefix scores with S ≥ 1, got shape "
                         f"{tuple(prefix_scores.shape)}")
    return prefix_scores[:-1] - prefix_scores[1:]  # (S,)


def quantile_grid(values: torch.Tensor, n: int = 99) -> list[float]:
    """Candidate thresholds: the 1/(n+1), …, n/(n+1) quantiles of `values`, deduplicated, sorted.

    Args:
        values: `(N,)` scores (e.g. validation prefix drops), N ≥ 1.
        n: Number of quantiles.

    Returns:
        At most `n` ascending floats.
    """
    if values.numel() == 0:
        raise ValueError("need at least one value to build a threshold grid")
    levels = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)  # (n,)
    return sorted(set(torch.quantile(values.double().flatten(), levels).tolist()))


def pick_threshold(scores: torch.Tensor, true_wrong: torch.Tensor,
                   candidates: Sequence[float]) -> float:
    """The candidate τ whose flags `scores ≥ τ` give the best step-error F1 (first on ties).

    Args:
        scores: `(N,)` per-step "wrongness" scores (P(wrong), or an ORM prefix drop).
        true_wrong: `(N,)` bool, the step is labelled wrong.
        candidates: Thresholds to try, in the order ties are broken.

    Returns:
        The best threshold.
    """
    if not candidates:
        raise ValueError("no candidate thresholds")
    return max(candidates, key=lambda t: step_error_f1(scores >= t, true_wrong).f1)


def per_class_f1(pred_wrong: torch.Tensor, true_wrong: torch.Tensor,
                 classes: Sequence[str]) -> dict[str, StepErrorF1]:
    """Step-error precision/recall/F1 within each class of steps.

    Args:
        pred_wrong: `(N,)` bool, the step is flagged wrong.
        true_wrong: `(N,)` bool, the step is labelled wrong.
        classes: `N` class names, one per step (a solution's error class on each of its steps).

    Returns:
        `{class: StepErrorF1}`, classes in sorted order.
    """
    if not (pred_wrong.numel() == true_wrong.numel() == len(classes)):
        raise ValueError(f"lengths differ: {pred_wrong.numel()} predictions, "
                         f"{true_wrong.numel()} labels, {len(classes)} classes")
    out = {}
    for name in sorted(set(classes)):
        rows = torch.tensor([c == name for c in classes])  # (N,)
        out[name] = step_error_f1(pred_wrong.flatten()[rows], true_wrong.flatten()[rows])
    return out
