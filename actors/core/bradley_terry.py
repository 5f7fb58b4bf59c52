"""Bradley–Terry preference loss and pairwise metrics.

Bradley & Terry (1952): the chosen reply y_w beats y_l with probability

    P(y_w ≻ y_l) = σ(r_w − r_l)

and the reward model minimizes the negative log-likelihood of the observed preferences
(Ouyang et al. 2022, eq. 1). Options from the RLHF literature:

* margin m (Llama 2, Touvron et al. 2023): the chosen reward must win by m, σ(r_w − r_l − m);
* label smoothing ε (conservative targets for noisy labels): the target is 1 − ε, not 1.

    loss = mean_i −[(1−ε)·log σ(d_i) + ε·log σ(−d_i)],   d_i = r_w,i − r_l,i − m_i

>>> import torch
>>> round(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item(), 6)  # log 2
0.693147
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean negative log-likelihood of "chosen beats rejected" under Bradley–Terry.

    Args:
        r_chosen: `(B,)` rewards of the preferred replies.
        r_rejected: `(B,)` rewards of the other replies.
        margin: `(B,)` or scalar margin m subtracted from the reward gap (None: 0).
        label_smoothing: ε in [0, 0.5): weight of the flipped label.

    Returns:
        A scalar: mean over the batch of −[(1−ε)·log σ(d) + ε·log σ(−d)].

    The gradient is ∂loss/∂r_w = (σ(d) − (1 − ε)) / B = −∂loss/∂r_l.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = r_chosen - r_rejected  # (B,)
    if margin is not None:
        logits = logits - margin
    nll = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return nll.mean()


@dataclass(frozen=True)
class PairMetrics:
    """How well rewards order a set of preference pairs.

    Attributes:
        accuracy: Share of pairs with r_w > r_l (ties count half).
        mean_margin: Mean of r_w − r_l.
        ece: Expected calibration error of P(chosen wins) = σ(r_w − r_l), see `calibration_error`.
        n: Number of pairs.
    """

    accuracy: float
    mean_margin: float
    ece: float
    n: int

    def as_metrics(self, prefix: str = "rm/") -> dict[str, float]:
        """`{"rm/accuracy": …, "rm/mean_margin": …, "rm/ece": …}` for a metrics sink."""
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}mean_margin": self.mean_margin,
                f"{prefix}ece": self.ece}


def calibration_error(p_chosen: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of pairwise win probabilities whose true outcome is always "chosen wins".

    Scored against that outcome alone, every prediction would be under-confident except p = 1,
    and ECE would collapse to 1 − mean(p). So each pair is scored in both orders: (p, won) and
    (1 − p, lost). Over those 2B predictions, with equal-width bins on [0, 1],

        ECE = Σ_b (n_b / 2B) · |mean_b(p) − mean_b(outcome)|

    which, for an even `n_bins` (bin edges symmetric about 0.5), equals the usual top-label ECE
    (Guo et al. 2017): confidence max(p, 1−p) against "the favoured reply was chosen".

    Args:
        p_chosen: `(B,)` predicted probabilities that the chosen reply wins.
        n_bins: Number of equal-width bins.

    Returns:
        The ECE in [0, 1].
    """
    p = p_chosen.detach().double().flatten()  # (B,)
    probs = torch.cat([p, 1.0 - p])  # (2B,)
    outcome = torch.cat([torch.ones_like(p), torch.zeros_like(p)])  # (2B,)
    bins = (probs * n_bins).long().clamp(0, n_bins - 1)  # (2B,)
    count = torch.bincount(bins, minlength=n_bins).double()  # (n_bins,)
    gap = (torch.bincount(bins, probs, minlength=n_bins)
           - torch.bincount(bins, outcome, minlength=n_bins))  # (n_bins,) Σ_b p − Σ_b y
    # n_b/N · |Σ_b p / n_b − Σ_b y / n_b| = |Σ_b p − Σ_b y| / N
    return float(gap.abs().sum() / count.sum())


def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                 n_bins: int = 10) -> PairMetrics:
    """Accuracy, mean reward margin and calibration of rewards on preference pairs.

    Args:
        r_chosen: `(B,)` rewards of the preferred replies.
        r_rejected: `(B,)` rewards of the other replies.
        n_bins: Bins of the calibration error.

    Returns:
        `PairMetrics` (all zeros with n = 0 for an empty batch).
    """
    diff = (r_chosen.detach().double() - r_rejected.detach().double()).flatten()  # (B,)
    if diff.numel() == 0:
        return PairMetrics(accuracy=0.0, mean_margin=0.0, ece=0.0, n=0)
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()  # (B,)
    return PairMetrics(accuracy=float(wins.mean()), mean_margin=float(diff.mean()),
                       ece=calibration_error(torch.sigmoid(diff), n_bins), n=diff.numel())
