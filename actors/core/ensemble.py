"""Reward-model ensembles: K members on bootstrap resamples, combined into one reward.

Each member k fits Bradley–Terry on its own bootstrap resample of the n labelled pairs (n draws
with replacement; Efron 1979). The spread of the members' scores is an uncertainty estimate
(Lakshminarayanan et al. 2017) that a policy can be made pessimistic against (Coste et al. 2023,
"Reward Model Ensembles Help Mitigate Overoptimization"):

    mean:            r(x) = (1/K) Σ_k r_k(x)
    min:             r(x) = min_k r_k(x)                       (worst-case optimization)
    mean_minus_std:  r(x) = mean_k r_k(x) − k·std_k r_k(x)     (uncertainty-weighted)

Every std here is the POPULATION std over members, √((1/K) Σ_k (r_k − r̄)²): it is 0, not NaN,
for K = 1, so a one-member "ensemble" is exactly the single reward model under every combine.

Members are K linear heads on one shared backbone (`MultiHeadRewardModel`) or K separate models
(`score_members`); either way scores travel as a `(K, N)` tensor. With a shared backbone the
bootstrap is a per-pair integer count c_ki (how often member k drew pair i), and member k's loss
is the count-weighted Bradley–Terry mean, which equals the plain loss on the resampled batch.

>>> import torch
>>> scores = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # (K=2, N=2)
>>> combine(scores, "mean_minus_std", k=1.0).tolist()  # mean 2, std 1 → 1; mean 0, std 0 → 0
[1.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from actors.core.backbones import Kind
from actors.core.reward_model import (
    Pooling,
    RewardModel,
    build_reward_model,
    load_parts,
    pool_index,
    save_parts,
)

Combine = Literal["mean", "min", "mean_minus_std"]


def _population_std(scores: torch.Tensor) -> torch.Tensor:
    return scores.std(dim=0, unbiased=False)  # (N,)


def combine(scores: torch.Tensor, how: Combine, k: float = 1.0) -> torch.Tensor:
    """Combine member scores into one reward per sample.

    Args:
        scores: `(K, N)` rewards of K members on N samples.
        how: "mean", "min" or "mean_minus_std" (mean − k · population std over members).
        k: Pessimism weight of "mean_minus_std" (ignored otherwise).

    Returns:
        `(N,)` combined rewards.

    Raises:
        ValueError: For an unknown `how` or a `scores` that is not 2-D with K ≥ 1.
    """
    _check_scores(scores)
    if how == "mean":
        return scores.mean(dim=0)
    if how == "min":
        return scores.min(dim=0).values
    if how == "mean_minus_std":
        return scores.mean(dim=0) - k * _population_std(scores)
    raise ValueError(f"combine must be one of 'mean', 'min', 'mean_minus_std', got {how!r}")


def disagreement(scores: torch.Tensor) -> torch.Tensor:
    """Per-sample disagreement of the members: population std of their scores.

    Args:
        scores: `(K, N)` member rewards.

    Returns:
        `(N,)` std over members (0 when K = 1).
    """
    _check_scores(scores)
    return _population_std(scores)


def pair_disagreement(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """How much the members disagree on which of two responses is better.

        p_k = σ(r_k(a) − r_k(b)),   disagreement = std_k p_k   (population std)

    The std is taken of the members' Bradley–Terry win probabilities, not of the raw gaps
    r_k(a) − r_k(b): each member's reward is identified only up to its own shift and scale, so
    members that all prefer a by gaps of 3 and 9 (p = 0.95 and 0.9999) barely differ, while
    members with gaps +1 and −1 (p = 0.73 and 0.27) genuinely disagree. σ bounds the value to
    [0, 0.5], so confident agreement cannot outrank a split vote. Active pair selection asks
    labellers for the pairs with the largest value.

    Args:
        scores_a: `(K, N)` member rewards of the first responses.
        scores_b: `(K, N)` member rewards of the second responses.

    Returns:
        `(N,)` std over members of σ(r_a − r_b).
    """
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"scores_a {tuple(scores_a.shape)} and scores_b "
                         f"{tuple(scores_b.shape)} must have the same (K, N) shape")
    _check_scores(scores_a)
    p_a_wins = torch.sigmoid(scores_a - scores_b)  # (K, N)
    return _population_std(p_a_wins)  # (N,)


def bootstrap_indices(n: int, members: int, seed: int) -> list[torch.Tensor]:
    """Each member's bootstrap resample: n draws with replacement from range(n).

    Member k's draws come from `np.random.default_rng([seed, k])` (as `epoch_permutation` seeds
    by `[seed, epoch]`), so a member's resample depends only on (seed, k): adding members does
    not change the existing ones, and members are independent streams.

    Args:
        n: Number of labelled pairs.
        members: Ensemble size K.
        seed: Run seed.

    Returns:
        K `(n,)` int64 tensors of pair indices.
    """
    if n < 1 or members < 1:
        raise ValueError(f"bootstrap needs n ≥ 1 and members ≥ 1, got n={n}, members={members}")
    return [torch.from_numpy(np.random.default_rng([seed, k]).integers(0, n, size=n))
            for k in range(members)]


def bootstrap_counts(indices: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """How many times each member drew each pair: c_ki.

    Args:
        indices: K index tensors, as from `bootstrap_indices`.
        n: Number of labelled pairs.

    Returns:
        `(K, n)` int64 counts; each row sums to the member's number of draws.
    """
    return torch.stack([torch.bincount(idx, minlength=n) for idx in indices])  # (K, n)


def bootstrap_bradley_terry_losses(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    counts: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-member Bradley–Terry loss, each over its own bootstrap weights.

        loss_k = Σ_i c_ki · nll_ki / Σ_i c_ki,   nll_ki = −[(1−ε) log σ(d_ki) + ε log σ(−d_ki)]

    with d_ki = r_k(chosen_i) − r_k(rejected_i) − m_i. With integer counts this is exactly
    `bradley_terry_loss` on the batch with pair i repeated c_ki times. A member that drew no pair
    of this batch gets loss 0 (and no gradient).

    Args:
        r_chosen: `(K, B)` member rewards of the preferred replies.
        r_rejected: `(K, B)` member rewards of the other replies.
        counts: `(K, B)` non-negative weights: bootstrap counts, or a 0/1 member mask.
        margin: `(B,)` or scalar margin m (None: 0).
        label_smoothing: ε in [0, 0.5).

    Returns:
        `(K,)` losses; their sum is the ensemble's training loss.
    """
    if not r_chosen.shape == r_rejected.shape == counts.shape or r_chosen.dim() != 2:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)}, r_rejected "
                         f"{tuple(r_rejected.shape)} and counts {tuple(counts.shape)} must all "
                         "be the same (K, B)")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = r_chosen - r_rejected  # (K, B)
    if margin is not None:
        logits = logits - margin  # (B,) broadcasts over members
    nll = (-(1.0 - label_smoothing) * F.logsigmoid(logits)
           - label_smoothing * F.logsigmoid(-logits))  # (K, B)
    weights = counts.to(nll.dtype)  # (K, B)
    return (weights * nll).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # (K,)


class MultiHeadRewardModel(nn.Module):
    """K scalar heads on one shared backbone. `forward(input_ids, attention_mask) -> (K, B)`.

    Pooling is `reward_model.pool_index` (first token for encoders, last real token for
    decoders), as in `RewardModel`; the K heads are the rows of one bias-free `(K, H)` matrix.
    """

    def __init__(self, backbone: PreTrainedModel, kind: Kind, members: int):
        super().__init__()
        self.backbone = backbone
        self.kind: Kind = kind
        self.pooling: Pooling = "first" if kind == "encoder" else "last"
        self.heads = nn.Linear(backbone.config.hidden_size, members, bias=False)

    @property
    def members(self) -> int:
        """Ensemble size K."""
        return self.heads.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Score a batch with every member.

        Args:
            input_ids: `(B, T)` token ids.
            attention_mask: `(B, T)`, 1 on real tokens.

        Returns:
            `(K, B)` float32 rewards.
        """
        hidden = self.backbone(input_ids=input_ids,
                               attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # (B,)
        pooled = hidden[rows, pool_index(attention_mask, self.pooling)]  # (B, H)
        return self.heads(pooled).T.float()  # (K, B)

    @staticmethod
    def loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, counts: torch.Tensor,
             margin: torch.Tensor | float | None = None,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Training loss: Σ_k of `bootstrap_bradley_terry_losses` (see there for the shapes)."""
        return bootstrap_bradley_terry_losses(r_chosen, r_rejected, counts, margin,
                                              label_smoothing).sum()


    def save(self, directory: str | Path,
             tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Write the `RewardModel.save` layout with a `(K, H)` head (`load_reward_model` reads
        it)."""
        save_parts(directory, self.backbone, self.heads, self.kind, self.pooling, tokenizer)


def load_reward_model(directory: str | Path) -> RewardModel | MultiHeadRewardModel:
    """Load a saved single RM (`RewardModel`, `(B,)` rewards) or K-head ensemble
    (`MultiHeadRewardModel`, `(K, B)` rewards), as the directory says."""
    backbone, head, meta = load_parts(directory)
    members = head["weight"].shape[0]
    if members == 1:
        return RewardModel.load(directory)
    model = MultiHeadRewardModel(backbone, meta["kind"], members).to(backbone.dtype)
    model.pooling = meta["pooling"]
    model.heads.load_state_dict(head)
    return model.eval()


def build_multi_head_reward_model(
    spec_name: str, members: int, seed: int
) -> tuple[MultiHeadRewardModel, PreTrainedTokenizerBase]:
    """A fresh K-head reward model on a named backbone (see `build_reward_model`).

    The backbone is exactly `build_reward_model(spec_name, seed)`'s (pooler frozen, dropout off).
    Head k is initialized as `build_reward_model(spec_name, seed + k)` would initialize its head,
    w_k ~ N(0, 1/(H+1)), so heads differ, and head 0 equals the single model's head.
    """
    if members < 1:
        raise ValueError(f"members must be ≥ 1, got {members}")
    single, tokenizer = build_reward_model(spec_name, seed)
    model = MultiHeadRewardModel(single.backbone, single.kind, members)
    hidden = model.heads.in_features
    rows = [torch.randn((1, hidden), generator=torch.Generator().manual_seed(seed + k))
            for k in range(members)]
    with torch.no_grad():
        model.heads.weight.copy_(torch.cat(rows) / math.sqrt(hidden + 1))  # (K, H)
    return model, tokenizer


def score_members(models: Sequence[nn.Module], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores of an ensemble of separate reward models, each `(B, T) -> (B,)`, as `(K, B)`."""
    return torch.stack([model(input_ids, attention_mask) for model in models])  # (K, B)


class EnsembleSettings(Protocol):
    """What `ensemble_scores` reads from a config (`loop.config.EnsembleConfig` fits)."""

    members: int
    combine: Combine
    k: float


@dataclass(frozen=True)
class EnsembleScores:
    """An ensemble's view of N samples.

    Attributes:
        members: `(K, N)` each member's reward.
        combined: `(N,)` the reward the policy sees (`combine` of `members`).
        disagreement: `(N,)` population std over members, for monitors.
    """

    members: torch.Tensor
    combined: torch.Tensor
    disagreement: torch.Tensor


def ensemble_scores(scores: torch.Tensor, config: EnsembleSettings) -> EnsembleScores:
    """Combine `(K, N)` member scores as `config` says (members, combine, k).

    Raises:
        ValueError: If K differs from `config.members`.
    """
    _check_scores(scores)
    if scores.shape[0] != config.members:
        raise ValueError(f"scores have {scores.shape[0]} members, but ensemble.members is "
                         f"{config.members}")
    return EnsembleScores(members=scores, combined=combine(scores, config.combine, config.k),
                          disagreement=disagreement(scores))


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"member scores must be (K, N) with K ≥ 1, got {tuple(scores.shape)}")
