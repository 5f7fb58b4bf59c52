"""PPO for language models: KL-shaped rewards, GAE, whitening, clipped losses, metrics.

Every per-token tensor is in the *response frame* `(B, T)`: column t is the t-th generated token
a_t of a row, `logprobs[:, t] = log π(a_t | x, a_<t)`, `values[:, t] = V(x, a_<t)`, and `mask` is
1 on real response tokens and 0 on right padding. A response is one episode whose only terminal
state follows its last real token (EOS or the token budget alike).

    r_t   = −β·(log π(a_t) − log π_ref(a_t)) + [t = last]·score + step_t   (Ziegler et al. 2019)
    δ_t   = r_t + γ·V_{t+1} − V_t,     A_t = δ_t + γλ·A_{t+1}     GAE (Schulman et al. 2016)
    ratio = π(a_t) / π_old(a_t)
    L_pg  = E[max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))]               PPO-clip (Schulman et al. 2017)
    L_vf  = ½·E[max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)]

Expectations E[·] are means over the real tokens of a minibatch. Names follow cleanrl/torchtune.
The KL coefficient β comes from `actors.core.kl_control`.

A batch sampled by an older policy μ (the loop's overlapped rollout) is trained with decoupled
PPO (Hilton et al. 2022): the clip stays centred on π_old, the trainer's own policy before the
update, and each token's policy-gradient term is weighted by the truncated importance weight

    w_t   = min(π_old(a_t) / μ(a_t), c)                    (truncation as V-trace's ρ̄, IMPALA)
    L_pg  = E[w · max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))]

(`truncated_is_weights`). A fresh batch (μ = π_old) takes no weight.

>>> adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2),
...                gamma=1.0, lam=0.5)
>>> adv.tolist()  # A_1 = 1, A_0 = 0 + 0.5 · 1
[[0.5, 1.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is true.

    Values at masked-out positions are ignored, even NaN or inf. No check costs a device sync:
    an all-false mask gives NaN (dim None).

    Args:
        x: `(B, T)` values.
        mask: `(B, T)` bool or 0/1.
        dim: Reduce only this dimension; a slice with no true position gives 0.

    Returns:
        A scalar, or `x` reduced over `dim`.
    """
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / keep.sum()
    return total.sum(dim) / keep.sum(dim).clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the positions where `mask` is true.

    Args:
        x: `(B, T)` values.
        mask: `(B, T)` bool or 0/1.
        unbiased: Bessel's correction n/(n − 1) (then at least 2 positions are needed).

    Returns:
        A scalar.
    """
    keep = mask.bool()
    mean = masked_mean(x, keep)
    centered = torch.where(keep, x - mean, torch.zeros_like(x))  # (B, T)
    count = keep.sum()
    var = centered.square().sum() / count
    return var * count / (count - 1) if unbiased else var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening: (x − mean) / sqrt(var + eps) over the real positions.

    Args:
        x: `(B, T)` values, e.g. advantages.
        mask: `(B, T)` bool or 0/1.
        shift_mean: False adds the mean back (scale only).
        eps: Added to the (unbiased) variance.

    Returns:
        `(B, T)`: masked mean 0 (or the old mean) and masked variance ≈ 1; 0 at padding.
    """
    keep = mask.bool()
    mean, var = masked_mean(x, keep), masked_var(x, keep)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros_like(whitened))


def _upcast(logits: Tensor) -> Tensor:
    # log-softmax in half precision loses the low bits of a log-ratio that PPO exponentiates.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probabilities of `labels` under `logits`: log_softmax(logits)[…, label].

    Args:
        logits: `(B, T, V)`; `logits[:, t]` predicts `labels[:, t]` (the caller shifts).
        labels: `(B, T)` int64 token ids; padding must hold a valid id (mask it afterwards).

    Returns:
        `(B, T)` log-probs, float32 for half-precision logits, else the logits' dtype.
    """
    logits = _upcast(logits)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T), no (B, T, V) log-softmax kept


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of the entropy H = −Σ_v p_v log p_v of each next-token distribution.

    Args:
        logits: `(B, T, V)`.
        mask: `(B, T)` bool or 0/1.

    Returns:
        A scalar (differentiable, for the entropy bonus).
    """
    logp = F.log_softmax(_upcast(logits), dim=-1)  # (B, T, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    return masked_mean(entropy, mask)


def _response_mask(mask: Tensor, shape: torch.Size, name: str = "mask") -> Tensor:
    """`mask` as bool, checked to be `(B, T)` and right-padded (1…1 0…0 per row)."""
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    keep = mask.bool()
    gaps = (keep[:, 1:] & ~keep[:, :-1]).any(-1)  # (B,) a real token after padding
    if rows := gaps.nonzero().flatten().tolist():
        raise ValueError(f"{name} must be right-padded (real tokens first, then padding); "
                         f"rows {rows} have a real token after a padded one")
    return keep


@torch.no_grad()
def kl_shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    step_rewards: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty on every token, the RM score on the last real one.

    r_t = −β·(log π(a_t) − log π_ref(a_t)) on real tokens, plus `scores[b]` at the last real
    token of row b, plus `step_rewards[b, t]` (a process RM's rewards, already placed at the
    tokens that close the steps, see `place_step_rewards`). The per-token KL is the k1 estimator
    log π − log π_ref, whose sum over a sampled response is unbiased for KL(π ‖ π_ref).

    Args:
        scores: `(B,)` sequence rewards from the RM.
        logprobs: `(B, T)` log π of the sampled tokens.
        ref_logprobs: `(B, T)` log π_ref of the same tokens.
        mask: `(B, T)` right-padded; every row needs at least one real token.
        kl_coef: β.
        step_rewards: `(B, T)` or None; must be 0 on padding.

    Returns:
        `(rewards, kl)`: `(B, T)` rewards (0 on padding) and `(B,)` per-sequence KL
        Σ_t (log π − log π_ref), whose batch mean feeds `KLController.update`.
    """
    keep = _response_mask(mask, logprobs.shape)
    kl_tok = torch.where(keep, logprobs - ref_logprobs, torch.zeros_like(logprobs))  # (B, T)
    rewards = -kl_coef * kl_tok  # (B, T)
    positions = torch.arange(keep.shape[1], device=keep.device)  # (T,)
    last = torch.where(keep, positions, -1).amax(-1)  # (B,) index of the last real token
    if empty := (last < 0).nonzero().flatten().tolist():
        raise ValueError(f"rows {empty} have no real response token to put the score on")
    rewards.scatter_add_(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    if step_rewards is not None:
        if step_rewards.shape != rewards.shape:
            raise ValueError(f"step_rewards has shape {tuple(step_rewards.shape)}, expected "
                             f"{tuple(rewards.shape)}")
        stray = ((step_rewards != 0) & ~keep).any(-1).nonzero().flatten().tolist()
        if stray:
            raise ValueError(f"step_rewards of rows {stray} lie on padding: a step end "
                             "position is past the response")
        rewards = rewards + step_rewards.to(rewards.dtype)
    return rewards, kl_tok.sum(-1)


def place_step_rewards(
    step_rewards: Sequence[Sequence[float]],
    step_end_positions: Sequence[Sequence[int]],
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Scatter a process RM's per-step rewards to the response tokens that end the steps.

    Args:
        step_rewards: Per row, one reward per step.
        step_end_positions: Per row, the response-frame index of each step's last token.
        shape: `(B, T)` of the response frame.
        dtype: Of the result.
        device: Of the result.

    Returns:
        `(B, T)` zeros except at step ends; two steps ending on one token add up.

    >>> place_step_rewards([[-0.5, -0.25], []], [[1, 3], []], (2, 4)).tolist()
    [[0.0, -0.5, 0.0, -0.25], [0.0, 0.0, 0.0, 0.0]]
    """
    n_rows, n_cols = shape
    if len(step_rewards) != n_rows or len(step_end_positions) != n_rows:
        raise ValueError(f"expected {n_rows} rows of step rewards and positions, got "
                         f"{len(step_rewards)} and {len(step_end_positions)}")
    rows, cols, vals = [], [], []
    for row, (rewards, ends) in enumerate(zip(step_rewards, step_end_positions, strict=True)):
        if len(rewards) != len(ends):
            raise ValueError(f"row {row}: {len(rewards)} step rewards but {len(ends)} step end "
                             "positions")
        bad = [p for p in ends if not 0 <= p < n_cols]
        if bad:
            raise ValueError(f"row {row}: step end positions {bad} outside [0, {n_cols})")
        rows += [row] * len(ends)
        cols += list(ends)
        vals += [float(r) for r in rewards]
    index = torch.tensor([rows, cols], dtype=torch.long, device=device).reshape(2, -1)  # (2, N)
    out = torch.zeros(shape, dtype=dtype, device=device)  # (B, T)
    return out.index_put_(tuple(index), torch.tensor(vals, dtype=dtype, device=device),
                          accumulate=True)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
        lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), batched, backwards over time.

        δ_t = r_t + γ·V_{t+1} − V_t,    A_t = δ_t + γλ·A_{t+1},    R_t = A_t + V_t

    with V = 0 and A = 0 after the last real token of each row (the episode ends there).

    Args:
        rewards: `(B, T)` per-token rewards, e.g. from `kl_shaped_rewards`.
        values: `(B, T)` V(s_t) of the rollout policy's critic.
        mask: `(B, T)` right-padded; rows may have different lengths.
        gamma: Discount γ.
        lam: λ.

    Returns:
        `(advantages, returns)`, both `(B, T)` and 0 on padding.
    """
    keep = _response_mask(mask, rewards.shape)
    rewards = torch.where(keep, rewards, torch.zeros_like(rewards))  # (B, T)
    values = torch.where(keep, values, torch.zeros_like(values))  # (B, T)
    advantages = torch.zeros_like(rewards)  # (B, T)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    next_values = torch.zeros_like(last_gae)  # (B,) V_{t+1}
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # (B,)
        last_gae = torch.where(keep[:, t], delta + gamma * lam * last_gae,
                               torch.zeros_like(delta))
        advantages[:, t] = last_gae
        next_values = values[:, t]
    returns = torch.where(keep, advantages + values, torch.zeros_like(values))  # (B, T)
    return advantages, returns


@dataclass(frozen=True)
class PolicyLoss:
    """Output of `policy_loss`.

    Attributes:
        loss: Scalar clipped surrogate loss (differentiable).
        clipfrac: Scalar share of real tokens where the clipped term is active (zero gradient).
        approx_kl: Scalar k3 estimate of KL(π_old ‖ π): E[(ratio − 1) − log ratio] ≥ 0.
    """

    loss: Tensor
    clipfrac: Tensor
    approx_kl: Tensor


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float) -> PolicyLoss:
    """PPO-clip policy loss, E[max(pg_loss1, pg_loss2)] over real tokens.

    pg_loss1 = −A·ratio and pg_loss2 = −A·clip(ratio, 1−ε, 1+ε): once the ratio has moved past
    1 ± ε in the direction the advantage favours, the loss is flat in log π (zero gradient).

    `approx_kl` is the low-variance k3 estimator (Schulman 2020, "Approximating KL divergence"):
    with ratio = π/π_old on tokens sampled from π_old, E[(ratio − 1) − log ratio] = KL(π_old ‖ π),
    and every term is ≥ 0. `clipfrac` counts tokens where pg_loss2 > pg_loss1 (as torchtune and
    TRL), i.e. where clipping actually removes the gradient, not every |ratio − 1| > ε.

    Args:
        logprobs: `(B, T)` log π of the sampled tokens under the policy being trained.
        old_logprobs: `(B, T)` log π_old from the rollout (no gradient).
        advantages: `(B, T)` (no gradient), usually whitened.
        mask: `(B, T)` bool or 0/1.
        clip_range: ε.

    Returns:
        `PolicyLoss` (metrics detached).
    """
    log_ratio = logprobs - old_logprobs.detach()  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    advantages = advantages.detach()
    pg_loss1 = -advantages * ratio  # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approx_kl=approx_kl)


@torch.no_grad()
def truncated_is_weights(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor,
                         cap: float) -> Tensor:
    """Per-token truncated importance weights w_t = min(exp(log π_old − log μ), c).

    μ is the behaviour policy that sampled the tokens (an older version of the policy), π_old the
    policy the update starts from. Weighting PPO's clipped term by w_t corrects the expectation
    from μ's samples to π_old's (decoupled PPO); the cap c bounds the variance a token that μ
    found unlikely would add. As w_t ≥ 0 carries no gradient, w·max(−A·ratio, −A·clip(ratio)) =
    max(−(w·A)·ratio, −(w·A)·clip(ratio)): the weight folds into the advantages.

    Args:
        old_logprobs: `(B, T)` log π_old of the sampled tokens.
        behavior_logprobs: `(B, T)` log μ of the same tokens (the sampler's).
        mask: `(B, T)` bool or 0/1.
        cap: c ≥ 1.

    Returns:
        `(B, T)` float32 weights in [0, c]; 0 on padding.

    >>> truncated_is_weights(torch.tensor([[-1.0, -1.0, 0.0]]), torch.tensor([[-1.5, 0.0, 9.0]]),
    ...                      torch.tensor([[1, 1, 0]]), cap=1.5).tolist()  # e^0.5 > 1.5: capped
    [[1.5, 0.3678794503211975, 0.0]]
    """
    if cap < 1.0:
        raise ValueError(f"the importance-weight cap must be ≥ 1, got {cap}")
    log_w = old_logprobs.float() - behavior_logprobs.float()  # (B, T)
    weights = torch.clamp(torch.exp(log_w), max=cap)  # (B, T)
    return torch.where(mask.bool(), weights, torch.zeros_like(weights))


@dataclass(frozen=True)
class ValueLoss:
    """Output of `value_loss`.

    Attributes:
        loss: Scalar clipped value loss (differentiable).
        vf_clipfrac: Scalar share of real tokens where the clipped error is the larger one.
    """

    loss: Tensor
    vf_clipfrac: Tensor


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               value_clip: float) -> ValueLoss:
    """Clipped value loss ½·E[max((V − R)², (V_clipped − R)²)] over real tokens.

    V_clipped = V_old + clip(V − V_old, −c, c): the critic gains nothing from moving further than
    c from its rollout-time estimate in a direction that lowers the error.

    Args:
        values: `(B, T)` V(s_t) of the critic being trained.
        old_values: `(B, T)` V(s_t) at rollout time (no gradient).
        returns: `(B, T)` targets R_t from `gae` (no gradient).
        mask: `(B, T)` bool or 0/1.
        value_clip: c.

    Returns:
        `ValueLoss` (vf_clipfrac detached).
    """
    old_values, returns = old_values.detach(), returns.detach()
    # = V_old + clip(V − V_old, ±c), written so that an unclipped V comes back bit for bit
    values_clipped = torch.clamp(values, old_values - value_clip, old_values + value_clip)
    vf_loss1 = (values - returns).square()  # (B, T)
    vf_loss2 = (values_clipped - returns).square()  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_loss2 > vf_loss1).to(values.dtype), mask)
    return ValueLoss(loss=loss, vf_clipfrac=vf_clipfrac)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var[R − V] / Var[R] over real tokens: 1 for a perfect critic, ≤ 0 for a useless one.

    Args:
        values: `(B, T)` critic predictions.
        returns: `(B, T)` targets.
        mask: `(B, T)` bool or 0/1.

    Returns:
        A float; NaN when the returns have no variance (as cleanrl).
    """
    keep = mask.bool()
    var_returns = masked_var(returns.detach(), keep)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var((returns - values).detach(), keep) / var_returns)


@dataclass(frozen=True)
class PPOStats:
    """Metrics of one PPO minibatch (or their mean over an update, see `mean`).

    Attributes:
        policy_loss: Clipped surrogate loss.
        value_loss: Clipped value loss (before `vf_coef`).
        entropy: Mean per-token entropy of the policy.
        approx_kl: k3 estimate of KL(π_old ‖ π) per token.
        clipfrac: Share of tokens with an active policy clip.
        vf_clipfrac: Share of tokens with an active value clip.
        explained_variance: Of the returns by the values.
        kl_coef: β the rewards were shaped with.
    """

    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clipfrac: float
    vf_clipfrac: float
    explained_variance: float
    kl_coef: float

    @classmethod
    def mean(cls, stats: Sequence[PPOStats]) -> PPOStats:
        """Field-wise mean of several minibatches' stats (NaN fields propagate)."""
        if not stats:
            raise ValueError("PPOStats.mean needs at least one PPOStats")
        return cls(**{f.name: sum(getattr(s, f.name) for s in stats) / len(stats)
                      for f in fields(cls)})

    def as_metrics(self, prefix: str = "ppo/") -> dict[str, float]:
        """`{"ppo/policy_loss": …, "ppo/approx_kl": …, …}` for a metrics sink."""
        return {f"{prefix}{f.name}": float(getattr(self, f.name)) for f in fields(self)}
