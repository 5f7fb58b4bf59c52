"""One PPO update of a policy-with-value on a rollout batch, from the pieces of `ppo_math`.

    rollout batch ──forward (no grad)──► old log π_T, log π_ref,T, V_old      `evaluate_rollout`
        + scores ──kl_shaped_rewards, gae, whiten──► Experience               `build_experience`
    epochs × minibatches: clipped policy + value loss (+ entropy) ──► step    `run_ppo_epochs`

The distribution. Rollouts sample from π_T = softmax(z / T) and report log π_T of each token
(`actors.core.sampling`); every log-probability here — old, new, reference — is taken of z / T
with the batch's own temperature, so the first ratio of an update is 1 and the KL penalty is
KL(π_T ‖ π_ref,T), the divergence of the distributions that actually sample. The entropy metric
(and bonus) is that of π_T too. "Old" log-probs are recomputed by the trainer rather than taken
from the sampler, so numerical differences between sampler and trainer never enter the ratio;
their gap is reported as `ppo/sampler_logprob_gap` (a temperature or weight mismatch shows there).

Data parallelism. Each epoch shuffles the N rows with a seed of (seed, update, epoch) and cuts
N // M global minibatches of M rows (the rest of the shuffle waits for the next epoch); rank r of
W trains on rows r, r + W, … of each. Its loss is scaled by W · (its real tokens) / (the
minibatch's real tokens), so the gradient average over ranks equals the gradient of the token
mean over the whole minibatch: W ranks take the same steps as one (to float summation order).

>>> minibatches(6, minibatch_size=2, seed=0, update=0, epoch=0)
[[3, 2], [5, 4], [0, 1]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from actors.core.ppo_math import (
    PPOStats,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_shaped_rewards,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from actors.core.value_model import response_logits

if TYPE_CHECKING:
    from actors.core.sampling import RolloutBatch

Tensor = torch.Tensor
STAT_NAMES = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "vf_clipfrac")
"""The per-minibatch statistics, in the order of `MinibatchLoss.stats`."""


class PPOSettings(Protocol):
    """What the PPO step reads from a config (`loop.config.PPOConfig` fits)."""

    epochs: int
    minibatch_size: int
    clip_range: float
    value_clip: float
    vf_coef: float
    entropy_coef: float
    gamma: float
    lam: float
    whiten_advantages: bool
    max_grad_norm: float


@dataclass(frozen=True)
class PolicyInputs:
    """The token view of N rollout rows that every forward pass needs.

    Attributes:
        input_ids: `(N, Tp + Tr)` prompt (left-padded) ⊕ response (right-padded).
        attention_mask: `(N, Tp + Tr)` 1 on real tokens.
        response_ids: `(N, Tr)` the sampled tokens.
        response_mask: `(N, Tr)` bool, True on real response tokens (EOS included).
        response_start: Tp, the column of the first response token.
        temperature: T of the sampler.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    response_start: int
    temperature: float

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: Sequence[int] | Tensor) -> PolicyInputs:
        """The same view restricted to `index` (in that order)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, input_ids=self.input_ids[index],
                       attention_mask=self.attention_mask[index],
                       response_ids=self.response_ids[index],
                       response_mask=self.response_mask[index])


def policy_inputs(batch: RolloutBatch) -> PolicyInputs:
    """The `PolicyInputs` of a `RolloutBatch`."""
    input_ids, attention_mask = batch.sequences()
    return PolicyInputs(input_ids=input_ids, attention_mask=attention_mask,
                        response_ids=batch.response_ids,
                        response_mask=batch.response_mask.bool(),
                        response_start=int(batch.prompt_ids.shape[1]),
                        temperature=float(batch.temperature))


def tempered_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log π_T(token) = log_softmax(z / T)[token]: `(B, Tr, V)`, `(B, Tr)` → `(B, Tr)` float32."""
    return logprobs_from_logits(logits.float() / temperature, tokens)


@dataclass(frozen=True)
class RolloutEval:
    """Forward-pass products on N rows, before any reward math (each `(N, Tr)`, 0 on padding).

    Attributes:
        logprobs: log π_T of the sampled tokens under the policy being trained (π_old).
        ref_logprobs: log π_ref,T of the same tokens.
        values: V_old(x, y_<t) of the critic.
    """

    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor

    @staticmethod
    def cat(parts: Sequence[RolloutEval]) -> RolloutEval:
        """Rows of several evaluations, in order."""
        return RolloutEval(*(torch.cat([getattr(p, f.name) for p in parts])
                             for f in fields(RolloutEval)))


@torch.no_grad()
def evaluate_rollout(model: nn.Module, ref: nn.Module, inputs: PolicyInputs,
                     chunk: int) -> RolloutEval:
    """π_old and π_ref log-probs and V_old of every row, `chunk` rows per forward pass.

    Args:
        model: A `PolicyWithValue` (or a DeepSpeed engine around one).
        ref: The frozen reference causal LM.
        inputs: N rows.
        chunk: Rows per forward pass (bounds the `(chunk, Tr, V)` logits held at once).
    """
    parts = []
    for start in range(0, inputs.num_rows, chunk):
        rows = inputs.rows(range(start, min(start + chunk, inputs.num_rows)))
        keep = rows.response_mask
        out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                    response_start=rows.response_start)
        ref_logits, _ = response_logits(ref, rows.input_ids, rows.attention_mask,
                                        rows.response_start)
        zero = torch.zeros((), dtype=torch.float32)
        parts.append(RolloutEval(
            logprobs=torch.where(keep, tempered_logprobs(out.logits, rows.response_ids,
                                                         rows.temperature), zero),
            ref_logprobs=torch.where(keep, tempered_logprobs(ref_logits, rows.response_ids,
                                                             rows.temperature), zero),
            values=torch.where(keep, out.values, zero)))
    return RolloutEval.cat(parts)


@dataclass(frozen=True)
class Experience:
    """A rollout batch made ready for PPO epochs (per-token tensors `(N, Tr)`, 0 on padding).

    Attributes:
        inputs: The rows' tokens.
        old_logprobs: log π_old,T (no gradient).
        ref_logprobs: log π_ref,T.
        old_values: V_old.
        rewards: KL-shaped per-token rewards.
        advantages: GAE advantages (whitened when the settings say so).
        returns: GAE returns, the value targets.
        scores: `(N,)` sequence rewards of the reward model / function.
        kl: `(N,)` per-sequence KL Σ_t (log π_old,T − log π_ref,T).
        kl_coef: β the rewards were shaped with.
        sampler_logprobs: `(N, Tr)` log π_T reported by the sampler, or None.
    """

    inputs: PolicyInputs
    old_logprobs: Tensor
    ref_logprobs: Tensor
    old_values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor
    kl: Tensor
    kl_coef: float
    sampler_logprobs: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.inputs.num_rows

    def metrics(self) -> dict[str, float]:
        """`ppo/` batch metrics: mean score, mean sequence KL, the KL part of the return,
        response length, and the sampler-vs-trainer log-prob gap."""
        mask = self.inputs.response_mask
        out = {"ppo/mean_reward": float(self.scores.mean()),
               "ppo/mean_kl": float(self.kl.mean()),
               "ppo/mean_non_score_reward": -self.kl_coef * float(self.kl.mean()),
               "ppo/mean_response_tokens": float(mask.sum(1).float().mean())}
        if self.sampler_logprobs is not None:
            gap = (self.old_logprobs - self.sampler_logprobs.float()).abs()
            out["ppo/sampler_logprob_gap"] = float(masked_mean(gap, mask))
        return out


def build_experience(inputs: PolicyInputs, evaluated: RolloutEval, scores: Tensor,
                     kl_coef: float, settings: PPOSettings, step_rewards: Tensor | None = None,
                     sampler_logprobs: Tensor | None = None) -> Experience:
    """KL-shaped rewards, GAE and (optional) whitening over the WHOLE batch.

    Args:
        inputs: N rows.
        evaluated: `evaluate_rollout` of those rows.
        scores: `(N,)` sequence rewards.
        kl_coef: β of the shaping.
        settings: gamma, lam, whiten_advantages.
        step_rewards: `(N, Tr)` process-RM rewards at step ends (see `place_step_rewards`).
        sampler_logprobs: `(N, Tr)` the sampler's log-probs, for the gap metric only.
    """
    mask = inputs.response_mask
    rewards, kl = kl_shaped_rewards(scores.float(), evaluated.logprobs, evaluated.ref_logprobs,
                                    mask, kl_coef, step_rewards)
    advantages, returns = gae(rewards, evaluated.values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = whiten(advantages, mask)
    return Experience(inputs=inputs, old_logprobs=evaluated.logprobs,
                      ref_logprobs=evaluated.ref_logprobs, old_values=evaluated.values,
                      rewards=rewards, advantages=advantages, returns=returns,
                      scores=scores.float(), kl=kl, kl_coef=float(kl_coef),
                      sampler_logprobs=sampler_logprobs)


def minibatches(n: int, minibatch_size: int, seed: int, update: int,
                epoch: int) -> list[list[int]]:
    """Row indices of one epoch's global minibatches: a shuffle seeded by (seed, update, epoch)
    cut into n // minibatch_size runs (the incomplete rest is left out of this epoch)."""
    if not 1 <= minibatch_size <= n:
        raise ValueError(f"ppo.minibatch_size={minibatch_size} must be in [1, {n}] for a batch "
                         f"of {n} rows")
    order = np.random.default_rng([seed, update, epoch]).permutation(n).tolist()
    return [order[k * minibatch_size:(k + 1) * minibatch_size]
            for k in range(n // minibatch_size)]


@dataclass(frozen=True)
class MinibatchLoss:
    """One rank's part of one global minibatch.

    Attributes:
        loss: Scalar to backpropagate: W · share · (L_pg + vf_coef·L_vf − entropy_coef·H).
        stats: `(6,)` detached `STAT_NAMES`, each this rank's token mean times `share`, so the
            sum over ranks is the global minibatch's token mean.
        share: This rank's real tokens / the global minibatch's real tokens.
    """

    loss: Tensor
    stats: Tensor
    share: float


def minibatch_loss(model: nn.Module, exp: Experience, rows: Sequence[int],
                   global_tokens: int, world_size: int, settings: PPOSettings) -> MinibatchLoss:
    """Clipped PPO loss of this rank's `rows` of a global minibatch.

    Args:
        model: A `PolicyWithValue` (or a DeepSpeed engine around one), in train mode.
        exp: The batch's experience.
        rows: This rank's row indices.
        global_tokens: Real response tokens of the whole global minibatch (all ranks).
        world_size: W.
        settings: clip_range, value_clip, vf_coef, entropy_coef.
    """
    index = torch.as_tensor(rows, dtype=torch.long)
    inputs = exp.inputs.rows(index)
    mask = inputs.response_mask  # (B, Tr)
    out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                response_start=inputs.response_start)
    scaled = out.logits.float() / inputs.temperature  # (B, Tr, V): π_T's logits
    logprobs = logprobs_from_logits(scaled, inputs.response_ids)  # (B, Tr)
    pg = policy_loss(logprobs, exp.old_logprobs[index], exp.advantages[index], mask,
                     settings.clip_range)
    vf = value_loss(out.values, exp.old_values[index], exp.returns[index], mask,
                    settings.value_clip)
    with torch.set_grad_enabled(settings.entropy_coef > 0 and torch.is_grad_enabled()):
        entropy = entropy_from_logits(scaled, mask)
    share = float(mask.sum()) / global_tokens
    loss = pg.loss + settings.vf_coef * vf.loss - settings.entropy_coef * entropy
    stats = torch.stack([pg.loss.detach(), vf.loss.detach(), entropy.detach(), pg.approx_kl,
                         pg.clipfrac, vf.vf_clipfrac]).float() * share  # (6,)
    return MinibatchLoss(loss=loss * (world_size * share), stats=stats, share=share)


def torch_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               max_grad_norm: float) -> Callable[[Tensor], None]:
    """The plain-torch optimizer step for `run_ppo_epochs`: backward, clip the global gradient
    norm (as DeepSpeed's `gradient_clipping`), step, zero the gradients."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(loss: Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_ppo_epochs(model: nn.Module, exp: Experience, settings: PPOSettings,
                   step: Callable[[Tensor], None], seed: int, update: int,
                   world_size: int = 1, rank: int = 0,
                   all_reduce: Callable[[Tensor], Tensor] | None = None) -> list[PPOStats]:
    """`settings.epochs` passes of clipped PPO over the experience; one stats row per step.

    Args:
        model: A `PolicyWithValue` (or a DeepSpeed engine around one).
        exp: The batch's experience (the same on every rank).
        settings: The PPO settings.
        step: Takes the loss and does backward + optimizer step (`torch_step`, or DeepSpeed's
            `engine.backward` + `engine.step`).
        seed: Run seed.
        update: Index of this update in the run (a fresh shuffle every update).
        world_size: W.
        rank: This rank.
        all_reduce: Sums a tensor over the ranks (None for W = 1).

    Returns:
        Per optimizer step, the global minibatch's `PPOStats` (explained variance and β are
        the batch's).
    """
    if settings.minibatch_size % world_size:
        raise ValueError(f"ppo.minibatch_size={settings.minibatch_size} must be a multiple of "
                         f"the {world_size} PPO ranks")
    mask = exp.inputs.response_mask
    ev = explained_variance(exp.old_values, exp.returns, mask)
    history = []
    for epoch in range(settings.epochs):
        for index in minibatches(exp.num_rows, settings.minibatch_size, seed, update, epoch):
            global_tokens = int(mask[index].sum())
            part = minibatch_loss(model, exp, index[rank::world_size], global_tokens,
                                  world_size, settings)
            step(part.loss)
            stats = all_reduce(part.stats) if all_reduce is not None else part.stats
            history.append(PPOStats(**dict(zip(STAT_NAMES, stats.tolist(), strict=True)),
                                    explained_variance=ev, kl_coef=exp.kl_coef))
    return history


@dataclass(frozen=True)
class TokenRangeReward:
    """A programmatic sequence reward: the share of a response's tokens whose id lies in
    [low, high). A known, dense reward for toy PPO tasks and benchmarks (picklable, so a Ray
    actor can take it in place of a reward model).

    >>> from types import SimpleNamespace
    >>> batch = SimpleNamespace(response_ids=torch.tensor([[1, 7, 2, 0]]),
    ...                         response_mask=torch.tensor([[1, 1, 1, 0]]))
    >>> TokenRangeReward(0, 5)(batch).tolist()  # 2 of 3 real tokens are < 5
    [0.6666666865348816]
    """

    low: int
    high: int

    def __call__(self, batch: RolloutBatch) -> Tensor:
        """`(N,)` float32 rewards of the batch's rows."""
        keep = batch.response_mask.bool()
        hit = (batch.response_ids >= self.low) & (batch.response_ids < self.high) & keep
        return hit.sum(1).float() / keep.sum(1).clamp_min(1).float()


def update_metrics(exp: Experience, history: Sequence[PPOStats]) -> dict[str, float]:
    """`ppo/` metrics of one update: the mean over its steps of every `PPOStats` field plus
    the batch's `Experience.metrics()`."""
    return PPOStats.mean(history).as_metrics() | exp.metrics()
